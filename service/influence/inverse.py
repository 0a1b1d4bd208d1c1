"""Inverse-curvature operators built from a ``CurvatureConfig``: the dense-vector methods and the factory.

``identity``, ``diagonal``, ``explicit``, ``cg`` and ``arnoldi`` live here; ``kfac`` / ``ekfac`` in
``service/influence/kfac.py``. The interface and the damping rule are in ``service/influence/curvature.py``.
"""
from __future__ import annotations

import torch

from service.influence.curvature import CurvatureConfig, InverseCurvature, default_damping
from service.influence.gradients import ParameterSpace
from service.influence.kfac import KroneckerFactored
from service.receiver.features import SlotTensors


class Identity(InverseCurvature):
    name = "identity"

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors


class Diagonal(InverseCurvature):
    name = "diagonal"

    def __init__(self, fit_gradients: torch.Tensor, damping: float):
        self.diagonal = fit_gradients.square().mean(0)
        self.damping = damping

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors / (self.diagonal + self.damping)


class Explicit(InverseCurvature):
    name = "explicit"
    MAX_PARAMETERS = 5000

    def __init__(self, space: ParameterSpace, fit: SlotTensors, damping: float):
        if space.size > self.MAX_PARAMETERS:
            raise ValueError(f"explicit curvature forms a {space.size}^2 matrix; use it below "
                             f"{self.MAX_PARAMETERS} parameters")
        dtype = next(space.model.parameters()).dtype
        self.matrix = space.ggn_vector_product(fit, torch.eye(space.size, dtype=dtype), vector_chunk=128)
        self.matrix = 0.5 * (self.matrix + self.matrix.T)
        self.damping = damping
        self._factor = torch.linalg.cholesky(self.matrix + damping * torch.eye(space.size, dtype=dtype))

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(vectors.T, self._factor).T


class ConjugateGradient(InverseCurvature):
    name = "cg"

    def __init__(self, space: ParameterSpace, fit: SlotTensors, damping: float, iterations: int, tolerance: float):
        self.space, self.fit, self.damping = space, fit, damping
        self.iterations, self.tolerance = iterations, tolerance
        self.last_iterations: list[int] = []

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return self.space.ggn_vector_product(self.fit, x) + self.damping * x

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """Batched CG: all K right-hand sides advance together (one vmapped GGN product per step)."""
        x = torch.zeros_like(vectors)
        r = vectors.clone()
        p = r.clone()
        rr = (r * r).sum(1)
        target = self.tolerance ** 2 * (vectors * vectors).sum(1)
        active = rr > target
        steps = 0
        while active.any() and steps < self.iterations:
            ap = self._product(p)
            alpha = torch.where(active, rr / (p * ap).sum(1).clamp_min(1e-300), torch.zeros_like(rr))
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rr_new = (r * r).sum(1)
            beta = torch.where(active, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr))
            p = r + beta[:, None] * p
            rr = rr_new
            active = rr > target
            steps += 1
        self.last_iterations.append(steps)
        return x


class Arnoldi(InverseCurvature):
    name = "arnoldi"

    def __init__(self, space: ParameterSpace, fit: SlotTensors, damping: float, rank: int, seed: int):
        rank = min(rank, space.size)
        dtype = next(space.model.parameters()).dtype
        generator = torch.Generator().manual_seed(seed)
        basis = torch.zeros(rank, space.size, dtype=dtype)
        alphas, betas = [], []

        def orthogonalised(w: torch.Tensor, upto: int) -> torch.Tensor:
            for _ in range(2):  # full re-orthogonalisation, twice for stability
                w = w - basis[:upto].T @ (basis[:upto] @ w)
            return w

        q = torch.randn(space.size, generator=generator, dtype=torch.float64).to(dtype)
        q /= q.norm()
        for i in range(rank):
            basis[i] = q
            w = space.ggn_vector_product(fit, q)
            alphas.append(float(q @ w))
            w = orthogonalised(w, i + 1)
            beta = float(w.norm())
            if i + 1 == rank:
                break
            if beta < 1e-10 * max(1.0, max(abs(a) for a in alphas)):
                # an invariant subspace is exhausted (G is rank-deficient): restart orthogonally, coupling 0
                w = orthogonalised(torch.randn(space.size, generator=generator, dtype=torch.float64).to(dtype), i + 1)
                beta_coupling, q = 0.0, w / w.norm()
            else:
                beta_coupling, q = beta, w / beta
            betas.append(beta_coupling)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        eigenvalues, eigenvectors = torch.linalg.eigh(tridiagonal)
        self.eigenvalues = eigenvalues.to(dtype).clamp_min(0)
        self.eigenvectors = (eigenvectors.to(dtype).T @ basis)  # [r, P], rows orthonormal
        self.damping = damping

    def _solve(self, vectors: torch.Tensor) -> torch.Tensor:
        coefficients = vectors @ self.eigenvectors.T
        return (coefficients / (self.eigenvalues + self.damping)) @ self.eigenvectors


def fit_curvature(space: ParameterSpace, fit: SlotTensors, config: CurvatureConfig,
                  fit_gradients: torch.Tensor | None = None) -> InverseCurvature:
    """Build the inverse-curvature operator of ``config.method`` on the fit set ``fit``."""
    if config.method == "identity":
        return Identity()
    damping = config.damping if config.damping is not None else default_damping(space, fit, config)
    if config.method == "diagonal":
        grads = fit_gradients if fit_gradients is not None else space.per_sample_gradients(fit)
        return Diagonal(grads, damping)
    if config.method == "explicit":
        return Explicit(space, fit, damping)
    if config.method == "cg":
        return ConjugateGradient(space, fit, damping, config.cg_iterations, config.cg_tolerance)
    if config.method == "arnoldi":
        return Arnoldi(space, fit, damping, config.rank, config.seed)
    return KroneckerFactored(space, fit, damping, eigen_corrected=config.method == "ekfac", seed=config.seed)
