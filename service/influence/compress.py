"""Gradient compression for influence: sketches ``C`` with ``E[C^T C] = I``, so that
``-(C H^-1 g_T)^T (C g(z))`` is an unbiased estimate of ``I(z, T)``.

- ``mask:p``: a dropout-style random mask keeping a fraction p of the coordinates (the same mask
  for pool and target), scaled by ``1/sqrt(p)``. Output dimension ``round(p P)``; costs a gather.
  Applied to dense gradients it drops coordinates after the fact; ``ParameterSpace.
  masked_per_sample_gradients`` computes only the kept coordinates inside each convolution, which
  the influence engine uses for pool gradients when the score needs no ``H^-1 g(z)`` (``raw``).
- ``gauss:D``: a dense Gaussian projection with ``N(0, 1/D)`` entries, generated block by block from
  the seed (never stored whole): O(P D) time per gradient.
- ``sjlt:D``: a sparse Johnson-Lindenstrauss transform (one +-1 per coordinate, hashed to one of D
  outputs, i.e. a count sketch): O(P) per gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("mask", "gauss", "sjlt")
_BLOCK = 4096


@dataclass(frozen=True)
class Compressor:
    kind: str
    size: float  # keep fraction for mask, output dimension for gauss/sjlt
    seed: int = 0

    @staticmethod
    def parse(spec: str, seed: int = 0) -> "Compressor":
        """``mask:0.05``, ``gauss:4096`` or ``sjlt:4096``."""
        kind, _, value = spec.partition(":")
        if kind not in KINDS or not value:
            raise ValueError(f"compression '{spec}' must be mask:FRACTION, gauss:DIM or sjlt:DIM")
        size = float(value)
        if kind == "mask" and not 0 < size <= 1:
            raise ValueError(f"mask keep fraction must be in (0, 1], got {value}")
        if kind != "mask" and (size < 1 or size != int(size)):
            raise ValueError(f"{kind} dimension must be a positive integer, got {value}")
        return Compressor(kind, size, seed)

    def output_dim(self, parameters: int) -> int:
        return max(1, round(self.size * parameters)) if self.kind == "mask" else int(self.size)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, P] (or [P]) -> [N, D]."""
        single = vectors.dim() == 1
        vectors = vectors[None] if single else vectors
        out = getattr(self, f"_{self.kind}")(vectors)
        return out[0] if single else out

    def _generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def kept(self, parameters: int) -> torch.Tensor:
        """The mask's kept coordinates out of ``parameters``, sorted (the same for pool and target)."""
        return torch.randperm(parameters, generator=self._generator())[: self.output_dim(parameters)].sort().values

    @property
    def mask_scale(self) -> float:
        return 1 / self.size ** 0.5

    def _mask(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors[:, self.kept(vectors.shape[1])] * self.mask_scale

    def _gauss(self, vectors: torch.Tensor) -> torch.Tensor:
        dim = int(self.size)
        out = torch.zeros(vectors.shape[0], dim, dtype=vectors.dtype)
        for block, start in enumerate(range(0, vectors.shape[1], _BLOCK)):
            part = vectors[:, start:start + _BLOCK]
            projection = torch.randn(part.shape[1], dim, generator=self._generator(block + 1)).to(vectors.dtype)
            out += part @ projection
        return out / dim ** 0.5

    def _sjlt(self, vectors: torch.Tensor) -> torch.Tensor:
        dim, p = int(self.size), vectors.shape[1]
        generator = self._generator()
        bucket = torch.randint(0, dim, (p,), generator=generator)
        sign = (torch.randint(0, 2, (p,), generator=generator) * 2 - 1).to(vectors.dtype)
        out = torch.zeros(vectors.shape[0], dim, dtype=vectors.dtype)
        return out.index_add_(1, bucket, vectors * sign)
