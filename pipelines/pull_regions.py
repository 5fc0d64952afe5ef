"""Pull the seed's regions from Earth Engine into ``stores/<region>.zarr``, with progress.

    python pipelines/pull_regions.py --dry-run              # print every plan, offline
    python pipelines/pull_regions.py --project MY_PROJECT   # pull all regions of cmsn_cube/data/regions.yaml
    python pipelines/pull_regions.py --region wuhan --seed-dates --overwrite

Needs Earth Engine credentials (``earthengine authenticate`` or a service-account key in
``EE_SERVICE_ACCOUNT_KEY``); without them it stops at once and says what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from cmsn_cube.exceptions import CMSNCubeError
from cmsn_cube.sources.earthengine import (
    REGIONS_FILE,
    initialize_earthengine,
    load_regions,
    plan_region,
    pull_region,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REGIONS_FILE, help="regions file (default: the packaged one)")
    parser.add_argument("--region", action="append", help="pull only this region (repeatable); default all")
    parser.add_argument("--stores", type=Path, default=Path("stores"), help="folder for <region>.zarr")
    parser.add_argument("--project", help="Earth Engine Cloud project")
    parser.add_argument("--seed-dates", action="store_true", help="keep the seed's dates instead of cloud levels")
    parser.add_argument("--overwrite", action="store_true", help="replace existing stores")
    parser.add_argument("--dry-run", action="store_true", help="print the plans and stop (no network)")
    args = parser.parse_args(argv)
    try:
        names = args.region or list(load_regions(args.config))
        plans = [plan_region(name, config=args.config, use_dates=args.seed_dates) for name in names]
        for plan in plans:
            print(plan.describe(), end="\n\n")
        if args.dry_run:
            return 0
        initialize_earthengine(args.project)  # fail before any progress bar when there are no credentials
        for plan in tqdm(plans, desc="regions", unit="region"):
            path = pull_region(plan, args.stores / f"{plan.name}.zarr", project=args.project, overwrite=args.overwrite)
            tqdm.write(f"wrote {path}")
    except CMSNCubeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
