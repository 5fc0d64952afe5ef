"""The README's uncertainty figure: a real Landsat 8 date the network never saw, filled, beside its uncertainty.

``python pipelines/uncertainty_figure.py`` reconstructs the New York stack of ../shared/data (path/row 013032,
8 dates, its own BQA clouds) with the default path and writes ``docs/uncertainty.png``: the date with the most
filled pixels, in natural colour with the filled area outlined, beside the RMS over the bands of its stated
uncertainty (the predicted standard deviation of the error, reflectance).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from real_stacks import new_york  # this folder: the script's own

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from cmsn_cube.inference import reconstruct
    from cmsn_cube.plot import plot_uncertainty

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stack's edge is observed on no date: said, and left NaN
        result = reconstruct(new_york()).compute()
    print(plot_uncertainty(result, ROOT / "docs" / "uncertainty.png"))


if __name__ == "__main__":
    main()
