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


def bit_errors(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hard-decision (logit > 0 is bit 1) errors per slot [B] over valid bits."""
    return (((logits > 0).to(labels.dtype) != labels) & valid).sum(dim=(1, 2, 3))
