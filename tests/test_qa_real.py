"""QA decoding on real Landsat 8 quality bands (skipped when the shared data folder is absent).

- ``landsat8_c2l2_qa_pixel``: five Collection 2 Level-2 scenes (downsampled to 512 x 512) with their real
  ``QA_PIXEL``, decoded with :mod:`cmsn_cube.qa` and checked against explicit bit arithmetic written here
  (Collection 2 bits: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow, 5 snow, 6 clear, 7 water,
  8-9 cloud, 10-11 shadow, 12-13 snow/ice, 14-15 cirrus confidence).
- ``landsat8_cloudy_bqa``: a pre-collection Level-1 scene (LC80200392015216LGN00) whose ``BQA`` has another
  layout (Landsat 8 Data Users Handbook v1.0, section 5.4: 0 fill, 1 dropped frame, 2 terrain occlusion, 4-5 water,
  10-11 snow/ice, 12-13 cirrus, 14-15 cloud confidence), decoded by its own function.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from cmsn_cube.exceptions import ArgumentError
from cmsn_cube.qa import (
    QA_BITS,
    cloud_mask_from_bqa_pre_collection,
    cloud_mask_from_qa,
    decode_bqa_pre_collection,
    decode_qa,
    qa_confidence,
    qa_flag,
)
from cmsn_cube.testing import shared_data_path

C2_FOLDER = shared_data_path("landsat8_c2l2_qa_pixel")
BQA_FOLDER = shared_data_path("landsat8_cloudy_bqa")
ABSENT = "shared data (../shared/data or $CMSN_SHARED_DATA) absent"
SCENES = [
    "LC08_L2SP_001070_20190114_20200830_02_T2",
    "LC08_L2SP_005009_20150710_20200908_02_T2",
    "LC08_L2SP_008059_20191201_20200825_02_T1",
    "LC08_L2SP_017036_20130419_20200913_02_T2",
    "LC08_L2SR_099120_20191129_20201016_02_T2",
]


def _read(path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def qa_pixel() -> dict[str, np.ndarray]:
    if C2_FOLDER is None:
        pytest.skip(ABSENT)
    return {scene: _read(C2_FOLDER / f"{scene}_QA_PIXEL.TIF") for scene in SCENES}


@pytest.fixture(scope="module")
def bqa() -> np.ndarray:
    if BQA_FOLDER is None:
        pytest.skip(ABSENT)
    return _read(BQA_FOLDER / "l8_BQA.tif")


# ------------------------------------------------------------------------------- Collection 2 QA_PIXEL


def _bit(words: np.ndarray, bit: int) -> np.ndarray:
    return (words.astype(np.int64) // 2**bit) % 2 == 1  # arithmetic, not the shifts the decoder uses


def _two_bits(words: np.ndarray, low_bit: int) -> np.ndarray:
    return (words.astype(np.int64) // 2**low_bit) % 4


@pytest.mark.parametrize("scene", SCENES)
def test_flag_counts_match_explicit_bit_arithmetic(qa_pixel, scene):
    words = qa_pixel[scene]
    assert words.dtype == np.uint16
    decoded = decode_qa(xr.DataArray(words, dims=("y", "x")))
    for flag, bit in {"fill": 0, "dilated_cloud": 1, "cirrus": 2, "cloud": 3, "cloud_shadow": 4, "clear": 6}.items():
        assert int(decoded[flag].sum()) == int(_bit(words, bit).sum()), flag
    for field, low in {"cloud_confidence": 8, "cloud_shadow_confidence": 10, "cirrus_confidence": 14}.items():
        counts = np.bincount(decoded[field].values.ravel(), minlength=4)
        np.testing.assert_array_equal(counts, np.bincount(_two_bits(words, low).ravel(), minlength=4), field)
    # the default mask: cloud, shadow, cirrus or dilated cloud, never on fill
    expected = (_bit(words, 1) | _bit(words, 2) | _bit(words, 3) | _bit(words, 4)) & ~_bit(words, 0)
    mask = cloud_mask_from_qa(xr.DataArray(words)) & ~qa_flag(xr.DataArray(words), "fill")
    assert int(mask.sum()) == int(expected.sum())
    np.testing.assert_array_equal(mask.values, expected)


def test_known_counts_of_one_scene(qa_pixel):
    """Pinned counts of LC08_L2SP_001070_20190114 (512 x 512 = 262,144 px), from the bit arithmetic above."""
    words = xr.DataArray(qa_pixel[SCENES[0]])
    counts = {flag: int(qa_flag(words, flag).sum()) for flag in QA_BITS}
    assert counts == {
        "fill": 83209,
        "dilated_cloud": 11902,
        "cirrus": 17225,
        "cloud": 135396,
        "cloud_shadow": 15421,
        "snow": 7,
        "clear": 31637,
        "water": 172,
    }
    # cloud confidence 0 is exactly the fill: the algorithm ran on every scene pixel
    assert np.bincount(qa_confidence(words, "cloud_confidence").values.ravel()).tolist() == [83209, 37570, 5969, 135396]


def test_fully_cloudy_scenes_are_all_cloud(qa_pixel):
    """The data's note: 017036 and 099120 are 100 % cloud over their valid area."""
    for scene in SCENES[3:]:
        words = qa_pixel[scene]
        valid = ~_bit(words, 0)
        assert _bit(words, 3)[valid].all() and not _bit(words, 6)[valid].any(), scene
        assert bool(cloud_mask_from_qa(xr.DataArray(words)).values[valid].all())


@pytest.mark.parametrize(
    ("word", "flags", "confidences"),
    [
        # word: set single-bit flags; (cloud, shadow, snow/ice, cirrus) confidence
        (1, {"fill"}, (0, 0, 0, 0)),
        (21824, {"clear"}, (1, 1, 1, 1)),  # clear land
        (21952, {"clear", "water"}, (1, 1, 1, 1)),  # clear water
        (22280, {"cloud"}, (3, 1, 1, 1)),  # high-confidence cloud
        (55052, {"cloud", "cirrus"}, (3, 1, 1, 3)),  # high-confidence cloud and cirrus
        (21762, {"dilated_cloud"}, (1, 1, 1, 1)),  # the buffer around a cloud
        (23888, {"cloud_shadow", "clear"}, (1, 3, 1, 1)),  # shadow (clear means: not cloud)
        (24082, {"dilated_cloud", "cloud_shadow"}, (2, 3, 1, 1)),
        (30048, {"snow", "clear"}, (1, 1, 3, 1)),  # snow, Greenland
    ],
)
def test_pixel_values_by_hand(qa_pixel, word, flags, confidences):
    assert any((words == word).any() for words in qa_pixel.values()), f"{word} is not in the data"
    decoded = decode_qa(xr.DataArray(np.array([word], dtype=np.uint16)))
    assert {flag for flag in QA_BITS if bool(decoded[flag][0])} == flags
    names = ("cloud_confidence", "cloud_shadow_confidence", "snow_ice_confidence", "cirrus_confidence")
    assert tuple(int(decoded[name][0]) for name in names) == confidences
    in_mask = bool(cloud_mask_from_qa(xr.DataArray(np.array([word], dtype=np.uint16)))[0])
    assert in_mask == bool(flags & {"cloud", "cirrus", "dilated_cloud", "cloud_shadow"})


def test_cloud_pixels_are_bright_in_blue(qa_pixel):
    """The bits mean what they say on real pixels: cloud is brighter than clear land in SR_B2."""
    for scene in (SCENES[0], SCENES[2]):  # the snow scene (005009) is bright everywhere
        words = qa_pixel[scene]
        blue = _read(C2_FOLDER / f"{scene}_SR_B2.TIF").astype("float64")
        cloud, clear = _bit(words, 3) & ~_bit(words, 0), _bit(words, 6) & ~_bit(words, 0)
        assert blue[cloud].mean() > 2 * blue[clear].mean(), scene


# ------------------------------------------------------------------------------- pre-collection BQA


def test_bqa_cloud_confidence_matches_the_data_notes(bqa):
    """README: BQA high-confidence cloud 6 % (22,776 px), medium 9 % (33,406 px), of 627 x 603 px."""
    assert bqa.shape == (603, 627) and bqa.dtype == np.uint16
    flags = decode_bqa_pre_collection(bqa)
    confidence = flags["cloud_confidence"].values
    np.testing.assert_array_equal(confidence, _two_bits(bqa, 14))
    high, medium = int((confidence == 3).sum()), int((confidence == 2).sum())
    assert (high, medium) == (22776, 33406)
    assert round(100 * high / bqa.size) == 6 and round(100 * medium / bqa.size) == 9
    assert float(cloud_mask_from_bqa_pre_collection(bqa).mean()) == pytest.approx(high / bqa.size)
    both = cloud_mask_from_bqa_pre_collection(bqa, min_cloud_confidence=2)
    assert int(both.sum()) == high + medium
    for field, low in {"cirrus_confidence": 12, "snow_ice_confidence": 10, "water_confidence": 4}.items():
        np.testing.assert_array_equal(flags[field].values, _two_bits(bqa, low), field)
    for flag, bit in {"fill": 0, "dropped_frame": 1, "terrain_occlusion": 2}.items():
        assert int(flags[flag].sum()) == int(_bit(bqa, bit).sum()) == 0, flag  # none in this excerpt
    with_cirrus = cloud_mask_from_bqa_pre_collection(bqa, min_cirrus_confidence=3)
    assert int(with_cirrus.sum()) == int(((_two_bits(bqa, 14) == 3) | (_two_bits(bqa, 12) == 3)).sum())


@pytest.mark.parametrize(
    ("word", "cloud", "cirrus", "snow", "water"),
    [
        (20480, 1, 1, 0, 0),  # clear: cloud "no", cirrus "no"
        (20512, 1, 1, 0, 2),  # clear, water "maybe"
        (53248, 3, 1, 0, 0),  # cloud "yes"
        (61440, 3, 3, 0, 0),  # cloud and cirrus "yes"
        (45056, 2, 3, 0, 0),  # cloud "maybe", cirrus "yes"
        (28672, 1, 3, 0, 0),  # cirrus only
        (23552, 1, 1, 3, 0),  # snow/ice "yes"
    ],
)
def test_bqa_values_by_hand(bqa, word, cloud, cirrus, snow, water):
    assert (bqa == word).any(), f"{word} is not in the data"
    flags = decode_bqa_pre_collection(np.array([word], dtype=np.uint16))
    got = tuple(int(flags[f"{name}_confidence"][0]) for name in ("cloud", "cirrus", "snow_ice", "water"))
    assert got == (cloud, cirrus, snow, water)


def test_bqa_clouds_are_bright_and_the_collection_2_decoder_misses_them(bqa):
    blue = _read(BQA_FOLDER / "l8_B2.tif").astype("float64")
    confidence = decode_bqa_pre_collection(bqa)["cloud_confidence"].values
    assert blue[confidence == 3].mean() > blue[confidence == 2].mean() > blue[confidence == 1].mean()
    # the Collection 2 layout reads these words as "snow/cirrus confidence" bits and finds no cloud at all
    assert not bool(cloud_mask_from_qa(xr.DataArray(bqa)).any())
    with pytest.raises(ArgumentError, match="min_cloud_confidence"):
        cloud_mask_from_bqa_pre_collection(bqa, min_cloud_confidence=4)
