from __future__ import annotations

import pytest
import torch

from cmsn_cube.model import CMSNLoss, CMSNOutput, cmsn_loss

TERMS = ("mtgl", "mtfr", "refine", "total")


def perfect(batch):
    return CMSNOutput(coarse=batch["truth"].clone(), refined=batch["truth"].clone(), output=batch["truth"].clone())


def test_each_loss_is_zero_for_a_perfect_prediction(batch_factory):
    batch = batch_factory()
    terms = cmsn_loss(perfect(batch), batch)
    for name in TERMS:
        assert terms[name].item() == 0.0, name


def test_invalid_pixels_are_not_scored(batch_factory):
    batch = batch_factory()
    prediction = perfect(batch)
    invalid = ~batch["truth_valid"].unsqueeze(2).expand_as(batch["truth"])
    prediction.coarse[invalid] = 0.7
    prediction.refined[invalid] = 0.3
    terms = cmsn_loss(prediction, batch)
    for name in TERMS:
        assert terms[name].item() == 0.0, name


@pytest.mark.parametrize("where", ["clear", "cloudy"])
def test_coarse_errors_make_mtgl_and_mtfr_positive(batch_factory, where):
    batch = batch_factory()
    prediction = perfect(batch)
    cloudy = batch["inputs"][:, :, 4] > 0.5
    region = (cloudy if where == "cloudy" else ~cloudy) & batch["truth_valid"]
    prediction.coarse[:, :, 2][region] += 0.05
    terms = cmsn_loss(prediction, batch)
    assert terms["mtgl"] > 0 and terms["mtfr"] > 0 and terms["total"] > 0
    assert terms["refine"].item() == 0.0
    assert terms[f"mtgl_{where}"] > 0


def test_refined_errors_make_refine_positive(batch_factory):
    batch = batch_factory()
    prediction = perfect(batch)
    prediction.refined[0, 1, 3, 5, 5] += 0.2
    terms = cmsn_loss(prediction, batch)
    assert terms["refine"] > 0 and terms["total"] > 0
    assert terms["mtgl"].item() == 0.0 and terms["mtfr"].item() == 0.0


def test_weights_scale_their_terms(batch_factory):
    batch = batch_factory()
    prediction = perfect(batch)
    prediction.coarse.add_(0.01)
    prediction.refined.sub_(0.02)
    base = cmsn_loss(prediction, batch, lambda_cloudy=1.0, delta=0.0, xi=0.0)
    heavy = cmsn_loss(prediction, batch, lambda_cloudy=3.0, delta=2.0, xi=5.0)
    torch.testing.assert_close(base["total"], base["mtgl_clear"] + base["mtgl_cloudy"])
    torch.testing.assert_close(
        heavy["total"], heavy["mtgl_clear"] + 3 * heavy["mtgl_cloudy"] + 2 * heavy["mtfr"] + 5 * heavy["refine"]
    )
    assert CMSNLoss(xi=5.0)(prediction, batch)["total"] > CMSNLoss(xi=0.0)(prediction, batch)["total"]


def test_bad_inputs_are_refused(batch_factory):
    batch = batch_factory()
    with pytest.raises(KeyError, match="truth_valid"):
        cmsn_loss(perfect(batch), {"inputs": batch["inputs"], "truth": batch["truth"]})
    wrong = CMSNOutput(batch["truth"][..., :-1], batch["truth"], batch["truth"])
    with pytest.raises(ValueError, match="shape"):
        cmsn_loss(wrong, batch)
    with pytest.raises(ValueError, match="delta"):
        CMSNLoss(delta=-1.0)


# The module is what train() and evaluate_batches() use: each of its weights must reach the total.
WEIGHT_TERMS = {"lambda_cloudy": "mtgl_cloudy", "delta": "mtfr", "xi": "refine"}


def imperfect(batch):
    """A prediction with errors everywhere: coarse in clear and cloudy pixels (so MTGL and MTFR), refined."""
    generator = torch.Generator().manual_seed(1)
    truth = batch["truth"]
    coarse = truth + 0.05 * torch.randn(truth.shape, generator=generator)
    refined = truth + 0.02 * torch.randn(truth.shape, generator=generator)
    return CMSNOutput(coarse=coarse, refined=refined, output=refined.clone())


@pytest.mark.parametrize("name", sorted(WEIGHT_TERMS))
def test_the_module_total_moves_with_each_weight_by_its_term(batch_factory, name):
    batch = batch_factory()
    prediction = imperfect(batch)
    a, b = 0.7, 0.0
    heavy = CMSNLoss(**{name: a})(prediction, batch)
    light = CMSNLoss(**{name: b})(prediction, batch)
    term = WEIGHT_TERMS[name]
    assert heavy[term] > 0.01  # a term that matters; the terms themselves do not depend on the weights
    for key in ("mtgl_clear", "mtgl_cloudy", "mtfr", "refine"):
        torch.testing.assert_close(heavy[key], light[key])
    torch.testing.assert_close(heavy["total"] - light["total"], (a - b) * heavy[term])


def test_the_module_total_is_the_documented_weighted_sum(batch_factory):
    batch = batch_factory()
    prediction = imperfect(batch)
    loss = CMSNLoss(lambda_cloudy=3.0, delta=0.4, xi=2.5)
    assert loss.weights == {"lambda_cloudy": 3.0, "delta": 0.4, "xi": 2.5}
    terms = loss(prediction, batch)
    expected = terms["mtgl_clear"] + 3.0 * terms["mtgl_cloudy"] + 0.4 * terms["mtfr"] + 2.5 * terms["refine"]
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(terms["mtgl"], terms["mtgl_clear"] + 3.0 * terms["mtgl_cloudy"])
