"""Per-pixel uncertainty: every filler states one, calibrated on the scene, and it holds against the truth."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.export import to_cogs
from cmsn_cube.inference import FILLED, NO_DATA_FILLED, SERIES_FILLED, reconstruct, write_reconstruction
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_reconstruction
from cmsn_cube.uncertainty import calibration_error, calibration_scale, coverage, rank_correlation


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene(height=320, width=320, seed=5001)  # a seed no training run used


@pytest.fixture(scope="module")
def results(scene):
    observed = scene.drop_vars("truth")
    return {method: reconstruct(observed, method=method).compute() for method in ("auto", "regression", "cmsn")}


def _scored(result, scene):
    """Errors and stated sigma at every filled pixel that has a truth, ``(band, n)`` each."""
    truth = scene["truth"].values
    filled = np.isin(result.filled.values, (FILLED, NO_DATA_FILLED, SERIES_FILLED)) & np.isfinite(truth).all(axis=1)
    values, sigma = result.reconstructed.values, result.uncertainty.values
    errors = np.stack([(values[:, b] - truth[:, b])[filled] for b in range(4)])
    return errors, np.stack([sigma[:, b][filled] for b in range(4)])


@pytest.mark.parametrize("method", ["auto", "regression", "cmsn"])
def test_every_method_states_an_uncertainty_that_holds_against_the_truth(results, scene, method):
    result = results[method]
    assert result.uncertainty.dims == ("time", "band", "y", "x") and result.uncertainty.dtype == np.float32
    filled = np.isin(result.filled.values, (FILLED, NO_DATA_FILLED, SERIES_FILLED))
    finite = np.isfinite(result.uncertainty.values).all(axis=1)
    assert (finite == filled).all(), "an uncertainty where something was filled, NaN elsewhere"
    errors, sigma = _scored(result, scene)
    within_1, within_2 = coverage(errors, sigma)
    # a normal error: 68.3 % and 95.4 %; the scene's own calibration gets within a few points on a new seed
    assert 0.60 < within_1 < 0.80 and 0.88 < within_2 < 0.99, (within_1, within_2)
    # a larger stated sigma means a larger error: the regression's own fits rank its errors best; the network's
    # prior ranks the network's errors less well (about 0.25-0.3 on the generator's scenes)
    assert rank_correlation(errors, sigma) > (0.3 if method == "regression" else 0.2)


def test_the_self_check_calibrates_each_date_and_method(results):
    from cmsn_cube.selfcheck import METHODS, METRICS

    scales = results["auto"].quality.values[..., METRICS.index("uncertainty_scale")]
    assert scales.shape == (3, len(METHODS)) and np.isfinite(scales).all() and (scales > 0).all()
    # the factors differ between methods: each is calibrated on its own errors
    assert np.ptp(scales.mean(axis=0)) > 0.01


def test_uncertainty_is_lazy_written_exported_summarised_and_drawn(scene, tmp_path):
    lazy = reconstruct(scene.drop_vars("truth"), method="regression")
    assert lazy.uncertainty.chunks is not None, "lazy like the rest"
    store = str(tmp_path / "out.zarr")
    write_reconstruction(lazy, store, progress=False)
    reopened = open_reconstruction(store).load()
    np.testing.assert_array_equal(reopened.uncertainty.values, lazy.uncertainty.values)
    paths = to_cogs(reopened, tmp_path / "cogs", progress=False)
    layer = next(p for p in paths if p.endswith("_uncertainty.tif"))
    with rasterio.open(layer) as cog:
        assert cog.descriptions == ("blue", "green", "red", "nir")
        np.testing.assert_array_equal(cog.read(), reopened.uncertainty.isel(time=0).values)
    info = CliRunner().invoke(main, ["info", store])
    assert info.exit_code == 0 and "uncertainty RMS (refl.)" in info.output, info.output
    rms = np.sqrt(np.nanmean(reopened.uncertainty.isel(time=0).values ** 2))
    assert f"{rms:.4f}" in info.output
    png = reopened.cmsn.plot(tmp_path / "uncertainty.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_calibration_scale_recovers_a_known_factor_and_judges_it():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.005, 0.05, 50_000)
    errors = rng.normal(0, 1.7 * sigma)
    assert calibration_scale(errors, sigma) == pytest.approx(1.7, rel=0.02)
    within_1, within_2 = coverage(errors, 1.7 * sigma)
    assert within_1 == pytest.approx(0.683, abs=0.01) and within_2 == pytest.approx(0.954, abs=0.01)
    assert calibration_error(errors, 1.7 * sigma) < 0.001 < calibration_error(errors, sigma)
    assert rank_correlation(errors, sigma) > 0.3 and abs(rank_correlation(errors, rng.permutation(sigma))) < 0.05


def test_the_prior_spread_is_the_noise_no_helper_explains():
    from cmsn_cube.model.prior import local_regression_spread

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 4, 96, 96, generator=generator)  # normalised units, as the network feeds it
    dates = torch.cat([base, 0.8 * base + 0.1, 1.2 * base - 0.05], dim=1)
    dates[:, 0] += 0.2 * torch.randn(1, 4, 96, 96, generator=generator)  # date 0: noise no helper predicts
    clear = torch.ones(1, 3, 1, 96, 96)
    clear[:, 0, :, 30:60, 30:60] = 0
    filled, variance = local_regression_spread(dates * clear, clear, factor=1)
    hidden = (slice(None), 0, slice(None), slice(30, 60), slice(30, 60))
    assert variance is not None
    assert variance[hidden].sqrt().median().item() == pytest.approx(0.2, rel=0.15)
    no_spread = local_regression_spread(dates * clear, clear, factor=1, spread=False)
    assert no_spread[1] is None and torch.equal(no_spread[0], filled)


def test_a_large_cloud_interior_is_stated_as_uncertain_not_certain():
    """No window around the pixel holds a pixel clear in both dates: the spread is the date's own, never 0."""
    from cmsn_cube.model.prior import local_regression_spread

    generator = torch.Generator().manual_seed(1)
    dates = torch.randn(1, 3, 4, 96, 96, generator=generator)
    clear = torch.ones(1, 3, 1, 96, 96)
    clear[:, 0, :, 8:88, 8:88] = 0  # far wider than the 31 px window
    _, variance = local_regression_spread(dates * clear, clear, factor=1)
    assert variance is not None
    interior = variance[0, 0, :, 40:56, 40:56]
    assert torch.isfinite(interior).all() and (interior >= 1).all()
    clear[:, :, :, 0:4, 0:4] = 0  # no date at all: no spread
    _, variance = local_regression_spread(dates * clear, clear, factor=1)
    assert variance is not None and torch.isnan(variance[0, 0, :, 0:4, 0:4]).all()


def test_the_blend_is_the_mean_of_the_network_and_the_regression(scene):
    observed = scene.drop_vars("truth")
    parts = {m: reconstruct(observed, method=m).compute() for m in ("blend", "cmsn", "regression")}
    filled = parts["blend"].filled.values == FILLED
    mean = (parts["cmsn"].reconstructed.values + parts["regression"].reconstructed.values) / 2
    np.testing.assert_allclose(parts["blend"].reconstructed.values.transpose(1, 0, 2, 3)[:, filled],
                               mean.transpose(1, 0, 2, 3)[:, filled], atol=1e-5)  # fmt: skip
    assert np.isfinite(parts["blend"].uncertainty.values.transpose(1, 0, 2, 3)[:, filled]).all()


def test_run_filler_gives_each_method_its_own_fill(scene):
    """The public window filler: the blend is the mean of the network and the regression, not another filler."""
    from cmsn_cube.baselines import days_of
    from cmsn_cube.inference import model_channels, run_filler
    from cmsn_cube.inference.models import model_spec

    window = scene.drop_vars("truth").isel(y=slice(0, 96), x=slice(0, 96))
    channels, to_fill = model_channels(window.reflectance.values.astype(np.float32), window.cloud_mask.values)
    options = {"spec": model_spec(None), "device": "cpu", "days": list(days_of(window))}
    fills = {m: run_filler(m, channels[None], **options)[0] for m in ("cmsn", "regression", "blend")}
    seen_elsewhere = (to_fill.sum(axis=0) < to_fill.shape[0]) & to_fill  # pixels another date observes
    gaps = np.broadcast_to(seen_elsewhere[:, None], fills["blend"].shape)
    np.testing.assert_allclose(fills["blend"][gaps], ((fills["cmsn"] + fills["regression"]) / 2)[gaps], atol=1e-6)
    assert np.abs(fills["cmsn"] - fills["regression"])[gaps].max() > 1e-3  # the two differ: the test can tell
    only = run_filler("regression", channels[None], targets=[1], **options)[0]
    assert np.isnan(only[[0, 2]]).all() and np.array_equal(only[1][gaps[1]], fills["regression"][1][gaps[1]])


def test_the_network_states_its_spread_only_when_asked():
    """Training, validation and window views do not pay for the spread; asking for it changes no fill."""
    from cmsn_cube.model import CMSN

    torch.manual_seed(0)
    model = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    inputs = torch.rand(1, 3, 5, 32, 32)
    inputs[:, :, -1] = (inputs[:, :, -1] > 0.8).float()
    with torch.inference_mode():
        plain, asked = model(inputs), model(inputs, spread=True)
    assert plain.spread is None and asked.spread is not None and asked.spread.shape == asked.output.shape
    assert torch.equal(plain.output, asked.output)


def test_the_uncertainty_figure_takes_a_date_by_index_or_by_day(results, tmp_path):
    from cmsn_cube.plot import plot_uncertainty

    result = results["regression"]
    day = str(result.time.values[2])[:10]
    for choice in (2, day):
        figure = plot_uncertainty(result, date=choice)
        assert figure.axes[0].get_title().startswith(day)
    with pytest.raises(ValueError, match="date must be 0, 1 or 2"):
        plot_uncertainty(result, tmp_path / "x.png", date=3)


def test_the_uncertainty_figure_refuses_a_dataset_without_the_layer(scene):
    from cmsn_cube.plot import plot_uncertainty

    with pytest.raises(ValueError, match="no 'uncertainty' in this dataset"):
        plot_uncertainty(scene)
