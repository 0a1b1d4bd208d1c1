"""Influence scores, with the sign and normalisation conventions in one place.

With ``g(z)`` a pool sample's loss gradient, ``g_T`` the target loss gradient and ``H`` the damped
curvature (``InverseCurvature.solve`` applies ``H^-1``):

- influence ``I(z, T) = - g_T^T H^-1 g(z)``: the first-order change of the target loss when z is
  up-weighted (Koh & Liang). **Negative = beneficial**: training on z lowers the target loss.
- self-influence ``s(z) = g(z)^T H^-1 g(z)`` (>= 0).
- ``l-relative`` (RelatIF, loss-relative): ``I / sqrt(s(z))``, discounting samples that are
  influential on everything;
- ``theta-relative``: ``I / ||H^-1 g(z)||``, discounting samples that move the parameters a lot;
- ``cosine``: ``I / (sqrt(s(z)) sqrt(g_T^T H^-1 g_T))``, in [-1, 1].

Rankings sort ascending: the most beneficial sample comes first.
"""
from __future__ import annotations

import torch

from service.influence.curvature import InverseCurvature

NORMALISATIONS = ("raw", "l-relative", "theta-relative", "cosine")
_EPS = 1e-30


def influence(target_gradient: torch.Tensor, pool_gradients: torch.Tensor,
              curvature: InverseCurvature) -> torch.Tensor:
    """``I(z, T)`` for every pool sample: [N] for one target gradient [P], [T, N] for [T, P].
    H is symmetric, so ``g_T^T H^-1 g(z) = (H^-1 g_T)^T g(z)``: one solve per target."""
    return -(curvature.solve(target_gradient) @ pool_gradients.T)


def self_influence(pool_gradients: torch.Tensor, curvature: InverseCurvature) -> torch.Tensor:
    return (pool_gradients * curvature.solve(pool_gradients)).sum(-1)


def normalised(kind: str, target_gradient: torch.Tensor, pool_gradients: torch.Tensor,
               curvature: InverseCurvature) -> torch.Tensor:
    """Influence under normalisation ``kind`` (one of :data:`NORMALISATIONS`)."""
    if kind not in NORMALISATIONS:
        raise ValueError(f"unknown score '{kind}' (one of {', '.join(NORMALISATIONS)})")
    scores = influence(target_gradient, pool_gradients, curvature)
    if kind == "raw":
        return scores
    preconditioned = curvature.solve(pool_gradients)  # H^-1 g(z), [N, P]
    if kind == "theta-relative":
        return scores / preconditioned.norm(dim=-1).clamp_min(_EPS)
    self_inf = (pool_gradients * preconditioned).sum(-1).clamp_min(_EPS)
    scores = scores / self_inf.sqrt()
    if kind == "cosine":
        target_norm = (target_gradient * curvature.solve(target_gradient)).sum(-1, keepdim=True).clamp_min(_EPS)
        scores = scores / target_norm.sqrt()
    return scores


def most_beneficial(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest (most negative, most beneficial) scores, best first."""
    return torch.argsort(scores, dim=-1)[..., :k]
