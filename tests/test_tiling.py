"""The pure-numpy tiling on its own: AxisTiling's blending weights and tile/block plan, the tiles a block runs and
how its outputs are finished, against expectations written here (by hand or from the documented formula), never
built with the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from cmsn_cube.inference import FILLED, INVENTED, NO_DATA_FILLED, OBSERVED, UNOBSERVED, AxisTiling
from cmsn_cube.inference import tiling as tiling_module
from cmsn_cube.inference.tiling import BlockBlend, finish_block, spilled_strip

# ------------------------------------------------------------------------------------------ weights


def test_weights_are_a_sin2_ramp_over_the_overlap_and_1_inside():
    weights = AxisTiling.plan(200, tile=64, overlap=16, chunk=96).weights()
    assert weights.shape == (64,)
    assert np.all(weights[16:48] == 1.0)  # inside: exactly 1
    start, end = weights[:16], weights[-16:]
    assert np.all(np.diff(start) > 0)  # strictly increasing...
    assert np.all((start > 0) & (start < 1))  # ...inside (0, 1): never 0, never a full weight
    # sin² over 16 points strictly between 0 and π/2 (the end points 0 and 1 left out)
    expected = np.sin(np.linspace(0, np.pi / 2, 18)[1:-1]) ** 2
    np.testing.assert_allclose(start, expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(end, start[::-1])  # the end mirrors the start
    assert weights.min() > 0


@pytest.mark.parametrize(
    ("overlap", "ramp"),
    [
        (1, [0.5]),  # sin²(π/4)
        (2, [0.25, 0.75]),  # sin²(π/6), sin²(π/3)
        (3, [(2 - 2**0.5) / 4, 0.5, (2 + 2**0.5) / 4]),  # sin²(π/8), sin²(π/4), sin²(3π/8)
    ],
)
def test_short_ramps_have_their_hand_computed_values(overlap, ramp):
    weights = AxisTiling.plan(100, tile=8, overlap=overlap, chunk=64).weights()
    expected = np.array([*ramp, *[1.0] * (8 - 2 * overlap), *ramp[::-1]])
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (32, 8), (10, 3), (8, 1)])
def test_neighbouring_tiles_weights_add_up_to_1(tile, overlap):
    # Lay 4 tiles at the stride along a line and add their weights: every pixel that two tiles share, and
    # every pixel of one tile alone, sums to 1; only the outer ramps of the first and last tiles stay below.
    tiling = AxisTiling.plan(1000, tile=tile, overlap=overlap, chunk=64)
    stride = tile - overlap
    weights = tiling.weights().astype(np.float64)
    line = np.zeros(3 * stride + tile)
    for k in range(4):
        line[k * stride : k * stride + tile] += weights
    np.testing.assert_allclose(line[overlap:-overlap], 1.0, rtol=0, atol=1e-6)
    # the shared pixels themselves: a tile's end ramp plus the next one's start ramp
    np.testing.assert_allclose(weights[-overlap:] + weights[:overlap], 1.0, rtol=0, atol=1e-6)
    for k in range(1, 4):
        np.testing.assert_allclose(line[k * stride : k * stride + overlap], 1.0, rtol=0, atol=1e-6)
    assert np.all(line[:overlap] < 1) and np.all(line[-overlap:] < 1)


def test_no_overlap_gives_all_ones():
    weights = AxisTiling.plan(200, tile=64, overlap=0, chunk=64).weights()
    np.testing.assert_array_equal(weights, np.ones(64))
    # an axis no longer than a tile is one window without overlap: all ones too
    np.testing.assert_array_equal(AxisTiling.plan(50, tile=64, overlap=16, chunk=64).weights(), np.ones(50))


# ------------------------------------------------------------------------------------------ plan


def test_plan_of_200_pixels_tile_64_overlap_16_chunk_100():
    tiling = AxisTiling.plan(200, tile=64, overlap=16, chunk=100)
    # stride 64 - 16 = 48; tiles start at 0, 48, 96, 144 (the last covers 144..208, past the end mirrored):
    # n_tiles = ceil((200 - 16) / 48) = ceil(3.83) = 4.
    assert (tiling.tile, tiling.overlap, tiling.stride, tiling.n_tiles) == (64, 16, 48, 4)
    assert tiling.starts.tolist() == [0, 48, 96, 144]
    # block: chunk 100 rounded down to whole strides = 2 * 48 = 96; blocks 0..96, 96..192, 192..200.
    assert tiling.block == 96 and tiling.n_blocks == 3
    assert tiling.output_chunks == (96, 96, 8)
    # 2 tiles per block; the last block (8 pixels, shorter than the overlap) starts no tile.
    assert [list(tiling.block_tiles(b)) for b in range(3)] == [[0, 1], [2, 3], []]
    # block 0 reads up to the end of tile 1 (48 + 64 = 112); block 1 to the end of tile 3 (144 + 64 = 208).
    assert [tiling.block_extent(b) for b in range(3)] == [(0, 112), (96, 208), (192, 200)]
    # block 0's tiles lie 16 pixels over block 1; block 1's reach 16 past 192 but block 2 has only 8.
    assert tiling.spill(0) == slice(96, 112) and tiling.spill(1) == slice(96, 104) and tiling.spill(2) is None
    # pixels 200..207 read the scene mirrored at its last pixel 199: 198, 197, ..., 191.
    assert tiling.block_source(1)[-8:].tolist() == [198, 197, 196, 195, 194, 193, 192, 191]


def test_plan_of_130_pixels_with_a_chunk_smaller_than_the_stride():
    tiling = AxisTiling.plan(130, tile=64, overlap=16, chunk=30)
    # n_tiles = ceil((130 - 16) / 48) = ceil(2.375) = 3; block = max(stride, 30 // 48 * 48 = 0) = 48.
    assert (tiling.n_tiles, tiling.block) == (3, 48)
    # blocks of 48: 0..48, 48..96, 96..130 (34 pixels); one tile each.
    assert tiling.output_chunks == (48, 48, 34)
    assert [list(tiling.block_tiles(b)) for b in range(3)] == [[0], [1], [2]]


def test_plan_of_tiles_that_fit_exactly_in_one_block():
    tiling = AxisTiling.plan(112, tile=64, overlap=16, chunk=512)
    # n_tiles = ceil((112 - 16) / 48) = 2: 0..64 and 48..112, ending on the last pixel; block 512 // 48 * 48
    # = 480, more than the scene: one block of 112.
    assert (tiling.n_tiles, tiling.block, tiling.output_chunks) == (2, 480, (112,))
    assert tiling.block_extent(0) == (0, 112) and tiling.spill(0) is None


@pytest.mark.parametrize("size", [64, 50])
def test_plan_of_an_axis_no_longer_than_a_tile_is_one_window(size):
    tiling = AxisTiling.plan(size, tile=64, overlap=16, chunk=32)
    # one window of the whole axis, no overlap, one block: what the model gives on the whole cube at once
    assert (tiling.tile, tiling.overlap, tiling.n_tiles, tiling.block) == (size, 0, 1, size)
    assert tiling.output_chunks == (size,)
    assert tiling.block_extent(0) == (0, size)


# ------------------------------------------------------------------------------------------ a block's tiles


def small_block() -> tuple[tuple[AxisTiling, AxisTiling], np.ndarray]:
    """One block of 16 rows (one window) by 24 columns (tiles of 16 every 12 px): two tiles, at columns 0 and 12.

    One gap, on date 1 at column 2: only in the first tile.
    """
    tilings = (AxisTiling.plan(16, tile=16, overlap=4, chunk=16), AxisTiling.plan(40, tile=16, overlap=4, chunk=24))
    to_fill = np.zeros((3, 16, 28), dtype=bool)  # the block's extent: 24 columns and the 4 its last tile lays over
    to_fill[1, 5, 2] = True
    return tilings, to_fill


def test_a_block_runs_only_its_tiles_with_a_gap():
    tilings, to_fill = small_block()
    blend = BlockBlend.plan(tilings, (0, 0), to_fill)
    assert blend.corners == [(0, 0)]  # the tile at column 12 has nothing to fill: not run
    assert blend.gaps.tolist() == [[False, True, False]]
    # only the tile that runs is weighted: 1 inside it, a ramp over its last 4 columns, nothing past it
    assert np.all(blend.weight[:, 4:12] == 1) and np.all(blend.weight[:, 16:] == 0)
    assert np.all((blend.weight[:, 12:16] > 0) & (blend.weight[:, 12:16] < 1))


def test_each_triplet_and_filler_runs_only_where_a_date_it_serves_has_a_gap(monkeypatch):
    tilings, to_fill = small_block()
    blend = BlockBlend.plan(tilings, (0, 0), to_fill)
    runs = blend.runs(((0, 1, 2),) * 3, ["cmsn", "cmsn", "regression"])
    # dates 0 and 1 share a triplet and a filler: one run; date 2 has no gap in any tile: its run has no tile
    assert [(run.method, run.served, run.tiles) for run in runs] == [("cmsn", [0, 1], [0]), ("regression", [2], [])]
    monkeypatch.setattr(tiling_module, "SKIP_CLEAR_DATES", False)
    assert [run.tiles for run in blend.runs(((0, 1, 2),) * 3, ["cmsn", "cmsn", "regression"])] == [[0], [0]]


def test_a_filler_output_is_laid_over_the_dates_it_serves_only():
    tilings, to_fill = small_block()
    blend = BlockBlend.plan(tilings, (0, 0), to_fill)
    run = blend.runs(((0, 1, 2),) * 3, ["cmsn", "cmsn", "regression"])[0]
    assert run.served == [0, 1]
    output = np.stack([np.full((4, 16, 16), 10.0 * (date + 1), dtype=np.float32) for date in run.served])[None]
    sigma = output / 100
    sigma[0, 1, :, 0, 0] = np.nan  # a pixel no date observes: no spread, laid as 0
    blend.add(output, sigma, run.tiles, run)
    # date d gets its own output, 10 (d + 1), and spread, times the tile's weights; date 2 is another run's
    for date, value in ((0, 10), (1, 20)):
        expected = np.broadcast_to(value * blend.weight[:, :16], (4, 16, 16))
        np.testing.assert_allclose(blend.sums[date, :4, :, :16], expected, rtol=1e-6)
        spread = expected / 100
        if date == 1:
            spread = spread.copy()
            spread[:, 0, 0] = 0
        np.testing.assert_allclose(blend.sums[date, 4:, :, :16], spread, rtol=1e-6)
    assert not blend.sums[2].any() and not blend.sums[..., 16:].any()


def test_the_regression_sees_every_date_in_one_run():
    tilings, to_fill = small_block()
    blend = BlockBlend.plan(tilings, (0, 0), np.concatenate([to_fill, to_fill]))
    triplets = ((0, 1, 2), (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (3, 4, 5))
    runs = blend.runs(triplets, ["cmsn", "regression", "regression", "cmsn", "regression", "regression"])
    assert [(run.triplet, run.method, run.served) for run in runs] == [
        ((0, 1, 2), "cmsn", [0]),
        ((0, 1, 2, 3, 4, 5), "regression", [1, 2, 4, 5]),
        ((2, 3, 4), "cmsn", [3]),
    ]


def test_a_spilled_strip_is_a_copy():
    block = {"sums": np.ones((3, 4, 6, 6), dtype=np.float32), "weight": np.ones((6, 6), dtype=np.float32)}
    sums, weight = spilled_strip(block, slice(4, 6), slice(0, 6))
    block["sums"][:] = 5
    block["weight"][:] = 5
    assert sums.shape == (3, 4, 2, 6) and weight.shape == (2, 6)
    assert np.all(sums == 1) and np.all(weight == 1)


def finished_block_inputs() -> tuple:
    """A 2 x 3 block core (4 columns of extent) with one strip from the left over its first column.

    Its own sums are 2 and weights 2; the strip brings sums 3 and weight 1. Date 0 is all gap; pixel (1, 2) is
    a gap on every date (observed on no date of the triplet); pixel (0, 1) of date 1 has no data in one band.
    """
    sums = np.concatenate([np.full((3, 4, 2, 4), 2.0), np.full((3, 4, 2, 4), 0.1)], axis=1).astype(np.float32)
    observed = np.full((3, 4, 2, 3), 0.5, dtype=np.float32)
    observed[1, 2, 0, 1] = np.nan
    to_fill = np.zeros((3, 2, 3), dtype=bool)
    to_fill[0] = True
    to_fill[:, 1, 2] = True
    to_fill[1, 0, 1] = True
    block = {"sums": sums, "weight": np.full((2, 4), 2.0, np.float32), "observed": observed, "to_fill": to_fill}
    strip = (np.concatenate([np.full((3, 4, 2, 1), 3.0), np.full((3, 4, 2, 1), 0.2)], axis=1).astype(np.float32),
             np.ones((2, 1), dtype=np.float32))  # fmt: skip
    return block, None, strip, None


FINISH_OPTIONS = {"core": (slice(0, 2), slice(0, 3)), "triplets": ((0, 1, 2),) * 3}


def finished(fill_unobserved: bool) -> dict[str, np.ndarray]:
    return finish_block(*finished_block_inputs(), fill_unobserved=fill_unobserved, **FINISH_OPTIONS)


def test_a_finished_block_blends_its_strips_and_keeps_clear_pixels():
    out = finished(fill_unobserved=False)
    assert out["reconstructed"].shape == (3, 4, 2, 3)
    # date 0 is all gap: (2 + 3) / (2 + 1) in the strip's column, 2 / 2 elsewhere
    np.testing.assert_allclose(out["reconstructed"][0, :, 0, 0], 5 / 3, rtol=1e-6)
    np.testing.assert_array_equal(out["reconstructed"][0, :, :, 1], 1.0)
    # clear pixels are the observation itself, not a blend that averages to it
    assert np.all(out["reconstructed"][2, :, 0, :] == 0.5)
    assert out["filled"].tolist() == [
        [[FILLED, FILLED, FILLED], [FILLED, FILLED, UNOBSERVED]],
        [[OBSERVED, NO_DATA_FILLED, OBSERVED], [OBSERVED, OBSERVED, UNOBSERVED]],
        [[OBSERVED, OBSERVED, OBSERVED], [OBSERVED, OBSERVED, UNOBSERVED]],
    ]
    assert np.isnan(out["reconstructed"][:, :, 1, 2]).all(), "a gap no date observes stays NaN"
    # NDVI (NIR - red) / (NIR + red) of equal bands is 0; the observed NDVI is NaN wherever there is a gap
    assert out["ndvi"][2, 0, 0] == 0 and np.isnan(out["ndvi_observed"][0]).all()
    assert out["ndvi_observed"][2, 0, 0] == 0


def test_a_finished_block_states_the_calibrated_spread_of_what_it_filled_only():
    from cmsn_cube.selfcheck import METHODS, METRICS
    from cmsn_cube.uncertainty import DEFAULT_SCALE

    out = finished(fill_unobserved=False)
    # blended like the bands: (0.1 + 0.2) / (2 + 1) in the strip's column, 0.1 / 2 elsewhere, times the factor
    np.testing.assert_allclose(out["uncertainty"][0, :, 0, 0], 0.1 * DEFAULT_SCALE, rtol=1e-6)
    np.testing.assert_allclose(out["uncertainty"][0, :, 0, 1], 0.05 * DEFAULT_SCALE, rtol=1e-6)
    filled = np.isin(out["filled"], (FILLED, NO_DATA_FILLED))
    assert np.isfinite(out["uncertainty"]).all(axis=1).tolist() == filled.tolist()  # NaN where observed or not filled
    # with a self-check, each date's factor is its own filler's
    quality = np.full((3, len(METHODS), len(METRICS)), np.nan)
    quality[..., METRICS.index("uncertainty_scale")] = [[2.0, 3.0, 4.0, 5.0]] * 3
    block = finished_block_inputs()
    checked = finish_block(
        *block, quality=quality, methods=np.array([1, 0, 0]), fill_unobserved=False, **FINISH_OPTIONS
    )
    np.testing.assert_allclose(checked["uncertainty"][0, :, 0, 1], 0.05 * 3.0, rtol=1e-6)  # date 0: regression


def test_a_finished_block_can_invent_what_no_date_observed():
    out = finished(fill_unobserved=True)
    assert (out["filled"][:, 1, 2] == INVENTED).all()
    np.testing.assert_array_equal(out["reconstructed"][:, :, 1, 2], 1.0)
