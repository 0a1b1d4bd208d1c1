"""Update rules and the gate on a tiny model: beneficial data helps the target, harmful data is rejected."""
from dataclasses import replace

import pytest
import torch

from schema.dataset import read_slots
from service.adaptation.gate import GateConfig, gate
from service.adaptation.updates import UpdateConfig, adapt, fine_tune, select_beneficial, target_loss
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import prepare
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


@pytest.mark.parametrize("method", ["first-order", "second-order", "random", "target-only"])
def test_every_rule_returns_a_new_model_and_leaves_the_input_alone(setting, method):
    model, pool, adaptation, _, _ = setting
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt(model, pool, adaptation, _config(method))
    assert result.model is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    if method in ("first-order", "second-order"):
        assert len(result.selected) > 0 and torch.all(result.scores < 0), "only beneficial slots are used"


def test_second_order_line_search_never_raises_the_adaptation_loss(setting):
    model, pool, adaptation, _, _ = setting
    result = adapt(model, pool, adaptation, _config("second-order"))
    assert result.details["adaptation_loss"] <= target_loss(model, adaptation)
    assert target_loss(result.model, adaptation) == pytest.approx(result.details["adaptation_loss"])


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
