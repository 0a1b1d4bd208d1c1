"""The capacity-like loss: binary cross-entropy in bits over the data REs' valid bits.

Per slot, ``loss = sum_valid BCE(logit, bit) / (n_valid * ln 2)``: 1 bit for a receiver that
knows nothing, 0 for a perfect one, so ``1 - loss`` is a BMD-rate style figure per coded bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_slot_bce_bits(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logits, labels, valid [B, 6, F, S] -> loss per slot [B] in bits."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    valid = valid.to(bce.dtype)
    return (bce * valid).sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)).clamp_min(1) * math.log(2))


def bce_bits(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over slots of :func:`per_slot_bce_bits` (each slot weighs the same)."""
    return per_slot_bce_bits(logits, labels, valid).mean()


def training_objective(per_slot: torch.Tensor, floor_bits: float = 0.0) -> torch.Tensor:
    """What training minimises over a batch's per-slot losses [B]: their mean, or with ``floor_bits`` > 0
    the mean of ``log(loss + floor_bits)``. The log divides each slot's gradient by its loss (plus the
    floor), so a slot at 25 dB whose loss is 1e-4 bits counts about as much as one at 0 dB at 0.5 bits,
    where the plain mean lets the low-SNR slots set the direction of every step."""
    return (per_slot + floor_bits).log().mean() if floor_bits > 0 else per_slot.mean()


def bit_errors(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hard-decision (logit > 0 is bit 1) errors per slot [B] over valid bits."""
    return (((logits > 0).to(labels.dtype) != labels) & valid).sum(dim=(1, 2, 3))
