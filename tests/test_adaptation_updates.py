"""Update rules and the gate on a tiny model: beneficial data helps the target, harmful data is rejected."""
from dataclasses import replace

import pytest
import torch

from schema.dataset import read_slots
from service.adaptation.gate import GateConfig, gate
from service.adaptation.updates import (
    EarlyStop,
    UpdateConfig,
    adapt,
    fine_tune,
    second_order_step,
    select_beneficial,
    target_loss,
)
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import prepare
from service.receiver.train import validate
from tests.conftest import simulate


@pytest.fixture(scope="module")
def setting(tmp_path_factory, train_mix_file, trained_tiny_checkpoint):
    """A tiny model trained on the training mix; a target condition it has not seen (fast UEs, 1 DMRS)."""
    root = tmp_path_factory.mktemp("adapt")
    target_file = simulate(root / "target.h5", "channel=TDL-D,speed=100:150,snr=15:25,dmrs=0", 48, seed=9)
    pool_file = simulate(root / "pool.h5", "channel=TDL-A|TDL-D,speed=0:150,snr=5:25,dmrs=0:1", 96, seed=10)
    target = prepare(read_slots(target_file)[0])
    return (load_checkpoint(trained_tiny_checkpoint).model, prepare(read_slots(pool_file)[0]), target[:24], target[24:],
            prepare(read_slots(train_mix_file)[0]))


def _config(method: str) -> UpdateConfig:
    return UpdateConfig(method=method, k=24, steps=40, batch_size=8, learning_rate=1e-3, fit_slots=32,
                        curvature=CurvatureConfig(method="ekfac"))


@pytest.mark.parametrize("method", ["first-order", "second-order", "random", "target-only", "target+first-order"])
def test_every_rule_returns_a_new_model_reports_progress_and_leaves_the_input_alone(setting, method):
    model, pool, adaptation, _, _ = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heard = []
    result = adapt(model, pool, adaptation, _config(method), progress=heard.append)
    assert result.model is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    if method in ("first-order", "second-order", "target+first-order"):
        assert len(result.selected) > 0 and torch.all(result.scores < 0), "only beneficial slots are used"
    if method == "target+first-order":  # the target's own slots train beside the selection
        assert result.details["slots"] == len(adaptation) + len(result.selected)
    # progress is heard as the update goes: rising, ending at 1 when every step or iteration ran
    assert heard and heard == sorted(heard) and 0 < heard[0] and heard[-1] <= 1
    if method != "second-order":
        assert len(heard) == _config(method).steps and heard[-1] == 1


def test_early_stopping_keeps_the_best_checked_weights(setting):
    model, _, adaptation, held_out, _ = setting
    stop = EarlyStop(held_out, every=10, patience=2)
    tuned = fine_tune(model, adaptation, replace(_config("target-only"), steps=200, learning_rate=3e-3, replay=0.0),
                      early_stop=stop)
    steps, bers = zip(*stop.history)
    assert list(steps) == list(range(0, stop.steps_run + 1, 10))  # step 0: the unchanged model
    if stop.steps_run < 200:  # stopped early: the low came before the last two checks, which did not beat it
        assert min(bers) in bers[:-2] and min(bers[-2:]) >= min(bers)
    assert validate(tuned, held_out)["ber"] == min(bers)
    assert stop.best_step == steps[bers.index(min(bers))]


@pytest.mark.parametrize("method", ["target-only", "target+first-order"])
def test_a_held_out_part_of_the_target_keeps_the_model_unchanged_when_fine_tuning_only_hurts(setting, method):
    model, pool, adaptation, _, _ = setting
    wrecking = replace(_config(method), learning_rate=0.3, validation_fraction=0.25, check_every=10)
    result = adapt(model, pool, adaptation, wrecking)
    assert result.details["best_step"] == 0 and result.details["validation_slots"] == 6
    for key, value in model.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value)


@pytest.mark.parametrize("method", ["target-only", "target+first-order"])
def test_refinement_after_fine_tuning_lowers_the_adaptation_loss_and_counts_its_evaluations(setting, method):
    model, pool, adaptation, _, _ = setting
    tuned = adapt(model, pool, adaptation, _config(method))
    heard = []
    refined = adapt(model, pool, adaptation, replace(_config(method), refine_iterations=2), progress=heard.append)
    refine = refined.details["refine"]
    assert target_loss(refined.model, adaptation) == pytest.approx(refine["adaptation_loss"], rel=1e-5)
    assert refine["adaptation_loss"] <= target_loss(tuned.model, adaptation)
    iterations_run = len(refine["steps"])
    assert refined.details["gradient_evaluations"] == 40 * 8 + 2 * len(adaptation) * iterations_run
    assert heard == sorted(heard) and heard[-1] <= 1


def test_second_order_never_raises_the_adaptation_loss(setting):
    model, pool, adaptation, _, _ = setting
    result = adapt(model, pool, adaptation, _config("second-order"))
    assert result.details["adaptation_loss"] <= target_loss(model, adaptation)
    assert target_loss(result.model, adaptation) == pytest.approx(result.details["adaptation_loss"])
    assert result.details["gradient_evaluations"] > 0


def test_the_step_length_is_the_quadratic_models_minimiser(setting):
    model, pool, adaptation, _, _ = setting
    space = ParameterSpace.convolutions(model.eval())
    curvature = fit_curvature(space, pool[:32], CurvatureConfig(method="ekfac"))
    gradient = space.mean_gradient(adaptation)
    product = space.ggn_vector_product(adaptation, -gradient)
    # d = -g: eta* = -g.d / d.(G + lambda I) d = g.g / (g.G g + lambda g.g), and G(-g) = -G g
    expected = float(gradient @ gradient) / (-float(gradient @ product) + curvature.damping * float(gradient @ gradient))
    _, details = second_order_step(model, curvature, -gradient, adaptation, iterations=1)
    assert details["steps"][0]["eta"] == pytest.approx(expected, rel=1e-4)


def test_an_ascent_direction_is_not_taken(setting):
    model, pool, adaptation, _, _ = setting
    space = ParameterSpace.convolutions(model.eval())
    curvature = fit_curvature(space, pool[:32], CurvatureConfig(method="ekfac"))
    tuned, details = second_order_step(model, curvature, space.mean_gradient(adaptation), adaptation, iterations=3)
    assert details["accepted_steps"] == 0 and details["adaptation_loss"] == target_loss(model, adaptation)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))


def test_beneficial_slots_help_the_target_more_than_harmful_ones(setting):
    model, pool, adaptation, held_out, _ = setting
    config = _config("first-order")
    scores, _, _, _, _ = select_beneficial(model, pool, adaptation, config)
    order = torch.argsort(scores)
    helped = fine_tune(model, pool[order[:24]], config)
    hurt = fine_tune(model, pool[order[-24:]], config)
    assert target_loss(helped, held_out) < target_loss(model, held_out) < target_loss(hurt, held_out)


def test_gate_rejects_a_harmful_update(setting):
    model, pool, adaptation, held_out, regression = setting
    scores, _, _, _, _ = select_beneficial(model, pool, adaptation, _config("first-order"))
    harmful = fine_tune(model, pool[torch.argsort(scores)[-24:]], replace(_config("first-order"), steps=60))
    decision = gate(model, harmful, held_out, regression, GateConfig())
    assert not decision.accepted and "target BER" in decision.reason
    assert decision.target_ber_after >= decision.target_ber_before * 0.98
    same = gate(model, model, held_out, regression, GateConfig())
    assert not same.accepted, "no improvement is not enough"


def test_replay_from_the_pool_limits_forgetting_of_the_training_mix(setting):
    model, pool, adaptation, _, regression = setting
    narrow = adaptation  # fitting only the target's own slots is the narrowest update
    config = replace(_config("target-only"), steps=60)
    without = fine_tune(model, narrow, replace(config, replay=0.0))
    with_replay = fine_tune(model, narrow, replace(config, replay=0.5), rehearsal=pool)
    assert target_loss(with_replay, regression) < target_loss(without, regression)
    with pytest.raises(ValueError, match="replay"):
        UpdateConfig(replay=1.0)


def test_precomputed_pool_gradients_give_the_same_selection(setting):
    model, pool, adaptation, _, _ = setting
    config = _config("first-order")
    gradients = ParameterSpace.convolutions(model.eval()).per_sample_gradients(pool)
    fresh = adapt(model, pool, adaptation, config)
    cached = adapt(model, pool, adaptation, config, pool_gradients=gradients)
    assert torch.equal(fresh.selected, cached.selected)
    assert torch.allclose(fresh.scores, cached.scores)
