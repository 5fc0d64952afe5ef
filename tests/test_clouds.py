"""Simulated clouds: fitting real shapes, reference masks, scoring cubes pasted on clear pixels only."""

from __future__ import annotations

import numpy as np
import pytest

from cmsn_cube.clouds import make_scoring_cube, reference_provider, simulate_clouds
from cmsn_cube.qa import QA_BITS
from cmsn_cube.testing import shared_data_path, tiny_scene

LEVELS = (0.25, 0.15, 0.10)
TOLERANCE = 0.03


def test_simulate_clouds_prefers_a_fitting_real_mask():
    rng = np.random.default_rng(0)
    real = np.zeros((64, 64), dtype=bool)
    real[10:30, 10:40] = True  # 600 px: fits a need of 0.2 * 4096 = 819 px within a factor 2
    pasted, source = simulate_clouds(np.ones((64, 64), bool), 0, 0.2, rng, providers={"store": lambda r, s: real})
    assert source == "store" and pasted.sum() == round(0.2 * 4096)
    assert pasted[15:25, 15:35].all(), "the grown mask keeps the real shape's core"
    tiny = np.zeros((64, 64), dtype=bool)
    tiny[0, 0] = True
    _, source = simulate_clouds(np.ones((64, 64), bool), 0, 0.2, rng, providers={"store": lambda r, s: tiny})
    assert source == "fractal"


def test_no_reference_provider_without_masks(tmp_path):
    assert reference_provider(None) is None
    assert reference_provider(str(tmp_path)) is None  # a folder without any *.npz mask


@pytest.mark.skipif(
    shared_data_path("cloud_masks_ukis") is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent"
)
def test_reference_masks_are_used():
    provider = reference_provider(str(shared_data_path("cloud_masks_ukis")))
    sources = {
        simulate_clouds(np.ones((64, 64), bool), 0, 0.25, np.random.default_rng(i), providers={"reference": provider})[
            1
        ]
        for i in range(6)
    }
    assert "reference" in sources


def test_scoring_cube_pastes_on_clear_pixels_only():
    cube = tiny_scene(size=64, seed=4, cloud_fractions=(0.05, 0.0, 0.1))
    pasted_cube, truth, scored = make_scoring_cube(cube, seed=0)
    cloud = cube["cloud_mask"].values
    assert not (scored.values & cloud).any()
    assert (pasted_cube["cloud_mask"].values == (cloud | scored.values)).all()
    assert (pasted_cube["reflectance"].values.transpose(1, 0, 2, 3)[:, scored.values] == 0).all()
    np.testing.assert_array_equal(
        truth.values.transpose(1, 0, 2, 3)[:, scored.values],
        cube["reflectance"].values.transpose(1, 0, 2, 3)[:, scored.values],
    )
    assert "truth" not in pasted_cube
    fractions = pasted_cube["cloud_mask"].mean(("y", "x")).values
    assert np.all(np.abs(fractions - np.array(LEVELS)) <= TOLERANCE)
    again = make_scoring_cube(cube, seed=0)[2]
    assert (again.values == scored.values).all()


def test_scoring_cube_marks_pasted_pixels_in_the_qa_bits_and_keeps_the_rest():
    cube = tiny_scene(size=64, n_dates=4, seed=4, cloud_fractions=(0.05, 0.0, 0.1, 0.3))
    pasted_cube, _, scored = make_scoring_cube(cube, seed=1, dates=[0, 2], levels=0.3, reference_masks=None)
    hidden = scored.values
    assert hidden[[0, 2]].any() and not hidden[[1, 3]].any(), "only the chosen dates get clouds"
    qa, original = pasted_cube["qa_pixel"].values, cube["qa_pixel"].values
    assert (qa[hidden] & (1 << QA_BITS["cloud"])).all() and not (qa[hidden] & (1 << QA_BITS["clear"])).any()
    np.testing.assert_array_equal(qa[~hidden], original[~hidden])
    for name in ("reflectance", "cloud_mask", "qa_pixel"):
        assert pasted_cube[name].attrs == cube[name].attrs
        assert pasted_cube[name].encoding["grid_mapping"] == "spatial_ref"
    assert pasted_cube.attrs["pasted_cloud_seed"] == 1
    np.testing.assert_allclose(pasted_cube.attrs["pasted_fraction"], hidden.mean(axis=(1, 2)))


def test_scoring_cube_level_counts_the_pixels_inside_the_scene_only():
    """A tilted Landsat footprint leaves an edge without data on every date: the level is a share of the scene."""
    from cmsn_cube.clouds import make_scoring_cube
    from cmsn_cube.testing import tiny_scene

    cube = tiny_scene(size=64, seed=3, cloud_fractions=(0.0, 0.0, 0.0))
    reflectance = cube["reflectance"].values.copy()
    reflectance[:, :, :, :24] = np.nan  # 37.5 % of every date: outside the scene
    cube["reflectance"] = (cube["reflectance"].dims, reflectance)
    _, _, scored = make_scoring_cube(cube, seed=0, levels=0.25, reference_masks=None)
    share = scored.values[:, :, 24:].mean(axis=(1, 2))
    np.testing.assert_allclose(share, 0.25, atol=0.01)
