"""AxisTiling on its own: the blending weights and the tile/block plan, against expectations written here
(by hand or from the documented formula), never built with the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from cmsn_cube.inference import AxisTiling

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
