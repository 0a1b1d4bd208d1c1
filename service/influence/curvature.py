"""The inverse-curvature interface: ``(H + lambda I)^-1 v`` for influence, its config and damping.

Implementations: ``service/influence/inverse.py`` (identity, diagonal, explicit, cg, arnoldi, and
the ``fit_curvature`` factory) and ``service/influence/kfac.py`` (kfac, ekfac); neither is imported
here. All approximate the same matrix, the Gauss-Newton matrix G of the training loss
(``ParameterSpace.ggn_vector_product``), except ``identity`` (H = I: grad-dot / TracIn-like, no
damping) and ``diagonal`` (the empirical-Fisher diagonal ``mean_n g_n^2``):

- ``explicit``: G formed densely and solved; small parameter spaces only (the test reference);
- ``cg``: conjugate gradient on ``(G + lambda I) x = v`` with exact GGN-vector products (the accuracy reference
  at scale);
- ``arnoldi``: top-r eigenpairs of G by Lanczos with full re-orthogonalisation (Arnoldi for a
  symmetric operator), ``V diag(1 / (mu + lambda)) V^T v``: influence in the dominant subspace
  (Schioppa et al. 2022); with r = P it equals ``explicit``;
- ``kfac`` / ``ekfac``: see ``service/influence/kfac.py``.

The default damping is ``damping_scale`` (0.1) times the mean eigenvalue of G, ``trace(G) / P``,
estimated with Hutchinson probes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.influence.gradients import ParameterSpace
from service.receiver.features import SlotTensors

METHODS = ("identity", "diagonal", "explicit", "cg", "arnoldi", "kfac", "ekfac")


@dataclass
class CurvatureConfig:
    """How H is approximated and damped."""

    method: str = "ekfac"
    damping: float | None = None  # None: damping_scale * trace(G) / P
    damping_scale: float = 0.1
    rank: int = 64  # arnoldi: eigenpairs kept
    cg_iterations: int = 200
    cg_tolerance: float = 1e-8  # relative residual
    trace_probes: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown curvature method '{self.method}' (one of {', '.join(METHODS)})")


class InverseCurvature:
    """``solve(V)`` returns ``(H + lambda I)^-1 V`` for V of shape [P] or [K, P]."""

    name = "base"
    damping = 0.0

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        single = vectors.dim() == 1
        out = self._solve(vectors[None] if single else vectors)
        return out[0] if single else out

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def default_damping(space: ParameterSpace, fit: SlotTensors, config: CurvatureConfig) -> float:
    """``damping_scale * trace(G) / P`` with a Hutchinson estimate of the trace."""
    dtype = next(space.model.parameters()).dtype
    generator = torch.Generator().manual_seed(config.seed)
    probes = (torch.randint(0, 2, (config.trace_probes, space.size), generator=generator) * 2 - 1).to(dtype)
    trace = float((probes * space.ggn_vector_product(fit, probes)).sum(1).mean())
    return config.damping_scale * max(trace, 1e-12) / space.size
