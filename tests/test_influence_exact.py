"""Influence on a tiny DeepRx in float64: every inverse-curvature path against a GGN formed by hand,
and the sign convention against real SGD steps."""
import math

import pytest
import torch
from torch.func import functional_call, jacrev

from schema.dataset import read_slots
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.influence.scores import influence, most_beneficial, normalised, self_influence
from service.receiver.features import prepare
from service.receiver.loss import per_slot_bce_bits
from service.receiver.model import DeepRx, DeepRxConfig, config_for


def _data(path, rows, prb=1):
    slots, _ = read_slots(path, slice(rows.start, rows.stop))
    f = 12 * prb
    slots.y, slots.pilots = slots.y[..., :f], slots.pilots[..., :f]
    slots.data_mask, slots.bits = slots.data_mask[..., :f], slots.bits[:, :, :f]
    data = prepare(slots)
    data.features, data.labels = data.features.double(), data.labels.double()
    return data


@pytest.fixture(scope="module")
def setup(train_mix_file):
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny")).double().eval()
    space = ParameterSpace(model, [n for n in ParameterSpace.convolutions(model).names
                                   if n.startswith(("blocks.1.", "head."))])
    return model, space, _data(train_mix_file, range(0, 6)), _data(train_mix_file, range(6, 30)), \
        _data(train_mix_file, range(30, 34))


def _ggn_by_hand(model, space, fit):
    """G = 1/N sum_n J_n^T Lambda_n J_n with J from autograd Jacobians (independent of the engine)."""
    names = space.names
    base = {n: p.detach() for n, p in model.named_parameters()}

    def logits(flat, n):
        params = dict(base)
        params.update(space.unflatten(flat))
        return functional_call(model, {**params, **dict(model.named_buffers())},
                               (fit.features[n:n + 1], fit.bits_per_symbol[n:n + 1]))[0].reshape(-1)

    theta = torch.cat([base[n].reshape(-1) for n in names])
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for n in range(len(fit)):
        jac = jacrev(logits)(theta, n)  # [O, P]
        f = logits(theta, n)
        valid = fit.valid[n].reshape(-1).double()
        weight = valid * torch.sigmoid(f) * (1 - torch.sigmoid(f)) / (valid.sum() * math.log(2))
        total += jac.T @ (weight[:, None] * jac)
    return total / len(fit)


def test_inverse_curvature_paths_agree_with_a_hand_formed_ggn(setup):
    model, space, fit, _, _ = setup
    ggn = _ggn_by_hand(model, space, fit)
    damping = 1e-3
    reference_inverse = torch.linalg.inv(ggn + damping * torch.eye(space.size, dtype=torch.float64))
    vectors = torch.randn(3, space.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = vectors @ reference_inverse
    for method, extra in [("explicit", {}), ("cg", {"cg_iterations": 2000, "cg_tolerance": 1e-12}),
                          ("arnoldi", {"rank": space.size})]:
        curvature = fit_curvature(space, fit, CurvatureConfig(method=method, damping=damping, **extra))
        got = curvature.solve(vectors)
        error = float((got - expected).norm() / expected.norm())
        assert error < 1e-4, f"{method}: relative error {error:.2e}"
    identity = fit_curvature(space, fit, CurvatureConfig(method="identity"))
    assert torch.equal(identity.solve(vectors), vectors)


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(setup):
    model, space, fit, _, _ = setup
    ggn = _ggn_by_hand(model, space, fit)
    curvature = fit_curvature(space, fit, CurvatureConfig(method="explicit", trace_probes=64))
    mean_eigenvalue = float(torch.trace(ggn)) / space.size
    assert curvature.damping == pytest.approx(0.1 * mean_eigenvalue, rel=0.3)


def test_score_normalisations_follow_their_definitions(setup):
    _, space, fit, pool, target = setup
    curvature = fit_curvature(space, fit, CurvatureConfig(method="explicit", damping=1e-3))
    g_pool, g_target = space.per_sample_gradients(pool), space.mean_gradient(target)
    raw = influence(g_target, g_pool, curvature)
    h_inv_g = curvature.solve(g_pool)
    torch.testing.assert_close(raw, -(g_pool @ curvature.solve(g_target)))
    torch.testing.assert_close(raw, -(h_inv_g @ g_target))  # symmetric H: either side
    s = self_influence(g_pool, curvature)
    assert torch.all(s > 0)
    torch.testing.assert_close(normalised("l-relative", g_target, g_pool, curvature), raw / s.sqrt())
    torch.testing.assert_close(normalised("theta-relative", g_target, g_pool, curvature), raw / h_inv_g.norm(dim=1))
    cosine = normalised("cosine", g_target, g_pool, curvature)
    assert torch.all(cosine.abs() <= 1 + 1e-9)


def _target_loss(model, space, params_flat, target) -> float:
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update(space.unflatten(params_flat))
    with torch.no_grad():
        logits = functional_call(model, {**params, **dict(model.named_buffers())},
                                 (target.features, target.bits_per_symbol))
        return float(per_slot_bce_bits(logits, target.labels, target.valid).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["identity", "explicit"])
def test_beneficial_samples_lower_the_target_loss_and_harmful_ones_raise_it(train_mix_file, trained_tiny_checkpoint,
                                                                           seed, method):
    """Trained model: far from an optimum (untrained) every slot is beneficial for every target."""
    from service.receiver.checkpoint import load_checkpoint

    model = load_checkpoint(trained_tiny_checkpoint).model.double().eval()
    space = ParameterSpace.convolutions(model) if method == "identity" else ParameterSpace(
        model, [n for n in ParameterSpace.convolutions(model).names if n.startswith(("blocks.1.", "head."))])
    pool = _data(train_mix_file, range(8 * seed, 8 * seed + 24), prb=2)
    target = _data(train_mix_file, range(40, 44), prb=2)
    curvature = fit_curvature(space, pool[:12], CurvatureConfig(method=method, damping=1e-2))
    g_pool = space.per_sample_gradients(pool)
    scores = influence(space.mean_gradient(target), g_pool, curvature)
    best, worst = int(most_beneficial(scores, 1)[0]), int(torch.argmax(scores))
    assert scores[best] < 0 < scores[worst]
    theta = space.flatten(space.values())
    before = _target_loss(model, space, theta, target)
    # up-weighting z by a small epsilon: the step is -eps H^-1 g(z) (plain SGD for identity)
    for index, sign in ((best, -1), (worst, +1)):
        step = curvature.solve(g_pool[index])
        eps = 1e-5 / float(step.norm())
        change = _target_loss(model, space, theta - eps * step, target) - before
        assert sign * change > 0, (method, seed, index, change)
        # ReLU makes the loss piecewise smooth: a step can cross kinks, so the match is approximate
        assert change == pytest.approx(eps * float(scores[index]), rel=0.15), "first-order prediction"


def test_per_sample_gradients_through_the_matched_filter_equal_autograd(train_mix_file):
    torch.manual_seed(1)
    model = DeepRx(DeepRxConfig((8, 8), ((1, 1), (2, 3)), rx=2, products=2, products_after=0)).double().eval()
    space = ParameterSpace.convolutions(model)
    assert "matched_filter.estimate.weight" in space.names and "matched_filter.project.weight" in space.names
    data = _data(train_mix_file, range(0, 3))
    gradients = space.per_sample_gradients(data)
    params = dict(model.named_parameters())
    for n in range(len(data)):
        loss = per_slot_bce_bits(model(data.features[n:n + 1], data.bits_per_symbol[n:n + 1]),
                                 data.labels[n:n + 1], data.valid[n:n + 1]).sum()
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[p] for p in space.names])])
        assert torch.allclose(gradients[n], expected, rtol=1e-8, atol=1e-12)
