"""A pure-inference install: without the packages of the ee, stac and train extras, reconstruction works and
the features that need them say which extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cmsn_cube.extras import EXTRAS, missing_message, require

SCRIPT = """
import sys
for name in ("ee", "xee", "xbatcher", "odc", "odc.stac", "pystac", "pystac_client", "shapely"):
    sys.modules[name] = None  # what an uninstalled package looks like to import
import torch
import cmsn_cube
from cmsn_cube.inference import reconstruct
from cmsn_cube.model import CMSN
from cmsn_cube.sources.synthetic import synthetic_scene

torch.manual_seed(0)
cube = synthetic_scene(height=48, width=48, seed=1)
result = reconstruct(cube, model=CMSN(width=8, depth=1, skip_width=4), method="cmsn").compute()
assert int(result.reconstructed.isnull().sum()) < cube.reflectance.size
from cmsn_cube.samples import window_origins
try:
    window_origins(64, 64, size=32, overlap=8)
except ImportError as error:
    print("train:", error)
from cmsn_cube.sources.earthengine import grid_for_bbox
try:
    grid_for_bbox((114.0, 30.0, 114.1, 30.1))
except ImportError as error:
    print("ee:", error)
"""


def test_reconstruction_needs_no_extra_and_the_rest_name_theirs():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        'train: xbatcher is not installed; cutting training windows needs the train extra: pip install "cmsn-cube[train]"'
        in done.stdout
    )
    assert (
        'ee: shapely is not installed; pulling from Earth Engine needs the ee extra: pip install "cmsn-cube[ee]"'
        in done.stdout
    )


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("math", "train").pi > 3
    monkeypatch.setitem(sys.modules, "xee", None)
    with pytest.raises(ImportError, match=r'pip install "cmsn-cube\[ee\]"'):
        require("xee", "ee")
    assert set(EXTRAS) == {"ee", "stac", "train"}
    assert "odc-stac" in missing_message("odc-stac", "stac")
