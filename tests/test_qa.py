"""QA_PIXEL decoding against hand-computed Collection 2 words, cloud fractions and date selection."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from cmsn_cube.qa import (
    QA_BITS,
    add_cloud_mask,
    cloud_fraction,
    cloud_mask_from_qa,
    decode_qa,
    encode_qa,
    ensure_cloud_mask,
    qa_confidence,
    select_dates,
)
from cmsn_cube.sources.synthetic import synthetic_scene

# Hand-decoded Collection 2 QA_PIXEL words (bits: 0 fill, 1 dilated, 2 cirrus, 3 cloud, 4 shadow, 5 snow, 6 clear,
# 7 water, 8-9 cloud conf, 10-11 shadow conf, 12-13 snow conf, 14-15 cirrus conf):
#   21824 = 64 + 256 + 1024 + 4096 + 16384: clear land, all confidences low
#   21952 = 21824 + 128: clear water
#   55052 = 4 + 8 + 256 + 512 + 1024 + 4096 + 16384 + 32768: cloud and cirrus, cloud and cirrus conf high
#   23888 = 16 + 64 + 256 + 1024 + 2048 + 4096 + 16384: cloud shadow, shadow conf high
#   30048 = 32 + 64 + 256 + 1024 + 4096 + 8192 + 16384: snow, snow conf high (the seed took bit 5 for cloud)
#   2 = dilated cloud only; 1 = fill
WORDS = np.array([21824, 21952, 55052, 23888, 30048, 2, 1], dtype=np.uint16)


def qa_array() -> xr.DataArray:
    return xr.DataArray(WORDS, dims=("x",))


def test_single_bits_match_hand_decoding():
    flags = decode_qa(qa_array())
    assert flags.clear.values.tolist() == [True, True, False, True, True, False, False]
    assert flags.water.values.tolist() == [False, True, False, False, False, False, False]
    assert flags.cloud.values.tolist() == [False, False, True, False, False, False, False]
    assert flags.cirrus.values.tolist() == [False, False, True, False, False, False, False]
    assert flags.cloud_shadow.values.tolist() == [False, False, False, True, False, False, False]
    assert flags.snow.values.tolist() == [False, False, False, False, True, False, False]
    assert flags.dilated_cloud.values.tolist() == [False, False, False, False, False, True, False]
    assert flags.fill.values.tolist() == [False, False, False, False, False, False, True]


def test_confidences_match_hand_decoding():
    assert qa_confidence(qa_array(), "cloud_confidence").values.tolist() == [1, 1, 3, 1, 1, 0, 0]
    assert qa_confidence(qa_array(), "cloud_shadow_confidence").values.tolist() == [1, 1, 1, 3, 1, 0, 0]
    assert qa_confidence(qa_array(), "snow_ice_confidence").values.tolist() == [1, 1, 1, 1, 3, 0, 0]
    assert qa_confidence(qa_array(), "cirrus_confidence").values.tolist() == [1, 1, 3, 1, 1, 0, 0]


def test_cloud_mask_is_cloud_shadow_cirrus_dilated_but_not_snow():
    mask = cloud_mask_from_qa(qa_array())
    assert mask.values.tolist() == [False, False, True, True, False, True, False]


def test_cloud_mask_options():
    only_cloud = cloud_mask_from_qa(qa_array(), flags=("cloud",))
    assert only_cloud.values.tolist() == [False, False, True, False, False, False, False]
    by_confidence = cloud_mask_from_qa(qa_array(), flags=(), min_cloud_confidence=3)
    assert by_confidence.values.tolist() == [False, False, True, False, False, False, False]


def test_encode_is_inverse_of_decode():
    flags = decode_qa(qa_array())
    words = encode_qa(
        {name: flags[name].values for name in QA_BITS},
        {
            name: flags[name].values
            for name in ("cloud_confidence", "cloud_shadow_confidence", "snow_ice_confidence", "cirrus_confidence")
        },
    )
    np.testing.assert_array_equal(words, WORDS)


def test_float_qa_is_refused():
    with pytest.raises(ValueError, match="integer"):
        cloud_mask_from_qa(qa_array().astype("float32"))


@pytest.mark.parametrize("levels", [(0.25, 0.15, 0.10), (0.4, 0.05, 0.0)])
def test_synthetic_cloud_fraction_within_two_points(levels):
    scene = synthetic_scene(height=160, width=160, cloud_fractions=levels, seed=11)
    decoded = add_cloud_mask(scene.drop_vars("cloud_mask"))
    measured = cloud_fraction(decoded).values
    assert np.all(np.abs(measured - np.array(levels)) <= 0.02), (measured, levels)


def test_cloud_fraction_ignores_no_data_and_is_lazy(small_scene, no_compute):
    cube = small_scene.copy()
    refl = cube.reflectance.values.copy()
    refl[0, :, :48, :] = np.nan  # top half of date 1 is no data
    cube["reflectance"] = (cube.reflectance.dims, refl)
    lazy = cloud_fraction(cube.chunk({"time": 1}))  # builds the graph only
    assert lazy.chunks is not None


def test_cloud_fraction_counts_only_valid_pixels(small_scene):
    cube = small_scene.copy()
    refl = cube.reflectance.values.copy()
    refl[0, :, :48, :] = np.nan
    cube["reflectance"] = (cube.reflectance.dims, refl)
    mask = cube.cloud_mask.values[0, 48:, :]
    assert cloud_fraction(cube).values[0] == pytest.approx(mask.mean())


def test_select_dates_nearest_levels():
    fractions = xr.DataArray([0.02, 0.31, 0.16, 0.09, 0.6], dims="time")
    assert select_dates(fractions, (0.25, 0.15, 0.10)) == [1, 2, 3]
    assert select_dates(fractions, (0.10, 0.25), keep_order=False) == [3, 1]


def test_ensure_cloud_mask_keeps_decodes_or_says_what_is_missing():
    from cmsn_cube.exceptions import CubeValidationError, DimensionError

    scene = synthetic_scene(height=32, width=32, seed=5)
    own = scene.assign(cloud_mask=~scene["cloud_mask"])  # a mask QA_PIXEL would not give
    assert ensure_cloud_mask(own)["cloud_mask"].equals(own["cloud_mask"]), "the cube's own mask is kept"
    decoded = ensure_cloud_mask(scene.drop_vars("cloud_mask"))["cloud_mask"]
    np.testing.assert_array_equal(decoded.values, add_cloud_mask(scene.drop_vars("cloud_mask"))["cloud_mask"].values)
    redecoded = ensure_cloud_mask(own, min_cloud_confidence=3)["cloud_mask"]  # options: decoded anew from QA
    assert not redecoded.equals(own["cloud_mask"])
    with pytest.raises(CubeValidationError, match="cloud_mask"):
        ensure_cloud_mask(scene.drop_vars(["cloud_mask", "qa_pixel"]))
    with pytest.raises(DimensionError, match="3"):
        ensure_cloud_mask(scene.isel(time=[0, 1]), min_dates=3)
