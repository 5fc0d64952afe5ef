"""The ``ds.cmsn`` accessor: it holds only the dataset and each method is the public function it names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from cmsn_cube.inference import reconstruct
from cmsn_cube.model import CMSN
from cmsn_cube.qa import encode_qa, observed_ndvi
from cmsn_cube.testing import tiny_scene


def cube_of(red: float, nir: float, **masks: np.ndarray) -> xr.Dataset:
    """A 16 x 16 three-date cube of constant bands (``red``, ``nir`` as given) with the ``masks`` given, if any."""
    scene = tiny_scene(size=16)
    reflectance = np.full(scene.reflectance.shape, 0.05, dtype="float32")
    reflectance[:, 2], reflectance[:, 3] = red, nir
    cube = scene[["reflectance"]].assign(reflectance=scene.reflectance.copy(data=reflectance))
    return cube.assign({name: (("time", "y", "x"), mask) for name, mask in masks.items()})


def test_the_accessor_holds_only_the_dataset():
    ds = cube_of(0.1, 0.4, cloud_mask=np.zeros((3, 16, 16), dtype=bool))
    accessor = ds.cmsn
    assert accessor is ds.cmsn, "xarray caches the accessor on the dataset"
    assert not hasattr(accessor, "__dict__")
    with pytest.raises(AttributeError):
        accessor.cached = "anything"  # type: ignore[attr-defined]


def test_ndvi_is_that_of_the_observation_nan_under_clouds():
    mask = np.zeros((3, 16, 16), dtype=bool)
    mask[1, 2, 3] = True
    ds = cube_of(0.1, 0.4, cloud_mask=mask)  # NIR 0.4, red 0.1: (0.4 - 0.1) / 0.5 = 0.6
    ndvi = ds.cmsn.ndvi()
    assert ndvi.dims == ("time", "y", "x") and ndvi.name == "ndvi"
    np.testing.assert_allclose(ndvi.values[~mask], 0.6, rtol=1e-6)
    assert np.isnan(ndvi.values[1, 2, 3])
    xr.testing.assert_identical(ndvi, observed_ndvi(ds))
    # clouds decoded from qa_pixel when the cube has no mask of its own; none at all: every pixel counts
    decoded = cube_of(0.1, 0.4, qa_pixel=encode_qa({"cloud": mask})).cmsn.ndvi()
    assert np.isnan(decoded.values[1, 2, 3]) and np.isfinite(decoded.values[~mask]).all()
    assert np.isfinite(cube_of(0.1, 0.4).cmsn.ndvi().values).all()


def test_cloud_mask_is_the_cubes_own_or_decoded_with_the_options_given():
    shadow = np.zeros((3, 16, 16), dtype=bool)
    shadow[0, 1, 1] = True
    own = np.zeros((3, 16, 16), dtype=bool)
    ds = cube_of(0.1, 0.4, cloud_mask=own, qa_pixel=encode_qa({"cloud_shadow": shadow}))
    assert not ds.cmsn.cloud_mask().values.any(), "without options the cube's own mask"
    np.testing.assert_array_equal(ds.cmsn.cloud_mask(flags=("cloud_shadow",)).values, shadow)
    assert not ds.cmsn.cloud_mask(flags=("cloud",)).values.any()


def test_reconstruct_is_inference_reconstruct_with_every_option(small_scene):
    torch.manual_seed(0)
    model = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    options = {"model": model, "method": "cmsn", "tile": 64, "overlap": 8, "chunk": 64, "fill_unobserved": True}
    through_accessor = small_scene.cmsn.reconstruct(**options)
    assert through_accessor.reconstructed.chunks is not None, "lazy"
    xr.testing.assert_identical(through_accessor.compute(), reconstruct(small_scene, **options).compute())
