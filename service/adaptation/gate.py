"""The validation gate: a candidate model is served only if it helps the target and hurts nothing else.

Accept when held-out target BER falls by at least ``min_relative_improvement`` (relative) and the
BER of a protected set rises by at most ``max_regression`` (absolute): the training-mix regression
set for a global update, the context's own newest slots for a scoped one. Rejected candidates are
kept for inspection, never served.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from service.receiver.features import SlotTensors
from service.receiver.model import DeepRx
from service.receiver.train import validate


@dataclass
class GateConfig:
    min_relative_improvement: float = 0.02
    max_regression: float = 0.002
    protected: str = "regression set"  # what the protected set is, for the reason


@dataclass
class GateDecision:
    accepted: bool
    target_ber_before: float
    target_ber_after: float
    regression_ber_before: float
    regression_ber_after: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def gate(baseline: DeepRx, candidate: DeepRx, held_out_target: SlotTensors, regression: SlotTensors,
         config: GateConfig) -> GateDecision:
    before, after = validate(baseline, held_out_target)["ber"], validate(candidate, held_out_target)["ber"]
    reg_before, reg_after = validate(baseline, regression)["ber"], validate(candidate, regression)["ber"]
    if after > before * (1 - config.min_relative_improvement):
        reason = f"target BER {before:.5f} -> {after:.5f}: less than {config.min_relative_improvement:.0%} better"
        return GateDecision(False, before, after, reg_before, reg_after, reason)
    if reg_after > reg_before + config.max_regression:
        reason = (f"{config.protected} BER {reg_before:.5f} -> {reg_after:.5f}: worse by more than "
                  f"{config.max_regression}")
        return GateDecision(False, before, after, reg_before, reg_after, reason)
    return GateDecision(True, before, after, reg_before, reg_after,
                        f"target BER {before:.5f} -> {after:.5f}, {config.protected} {reg_before:.5f} -> {reg_after:.5f}")
