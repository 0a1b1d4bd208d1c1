"""Ranking a pool of labelled slots by how much training on each would lower a target's loss.

What is measured (the task): the mean BCE-in-bits loss over the target slots. How: per-sample
gradients of the pool, one target gradient, an inverse-curvature operator fitted on (a subset of)
the pool, and a score normalisation (see ``scores.py`` for the sign convention).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from schema.dataset import SlotBatch
from service.influence.compress import Compressor
from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.influence.scores import normalised
from service.receiver.features import prepare
from service.receiver.model import DeepRx


@dataclass
class InfluenceConfig:
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    score: str = "l-relative"
    fit_slots: int = 512  # pool slots H is fitted on (the first ones after a seeded shuffle)
    compression: str | None = None  # mask:P | gauss:D | sjlt:D (see compress.py); None: exact
    chunk: int = 32  # samples per vmap call for per-sample gradients
    seed: int = 0


@dataclass
class InfluenceResult:
    scores: torch.Tensor  # [N] pool scores, negative = beneficial
    timings: dict[str, float]
    parameters: int

    def ranking(self) -> torch.Tensor:
        """Pool indices, most beneficial first."""
        return torch.argsort(self.scores)


def compressed_scores(kind: str, compressor: Compressor, target_gradient: torch.Tensor,
                      pool_gradients: torch.Tensor, curvature) -> torch.Tensor:
    """Scores from sketched vectors: ``I ~ -(C H^-1 g_T)^T (C g)``; self-influence (for l-relative)
    is sketched the same way, ``s ~ (C H^-1 g)^T (C g)``."""
    if kind not in ("raw", "l-relative"):
        raise ValueError(f"compressed scores support raw and l-relative, not '{kind}'")
    pool = compressor(pool_gradients)
    scores = -(pool @ compressor(curvature.solve(target_gradient)))
    if kind == "l-relative":
        self_influence = (compressor(curvature.solve(pool_gradients)) * pool).sum(-1)
        scores = scores / self_influence.clamp_min(1e-30).sqrt()
    return scores


def rank_pool(model: DeepRx, pool: SlotBatch, targets: SlotBatch, config: InfluenceConfig) -> InfluenceResult:
    """Influence of every pool slot on the mean loss of ``targets`` under ``model`` (eval mode)."""
    timings: dict[str, float] = {}
    model = model.eval()
    space = ParameterSpace.convolutions(model)

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - start, 4)
        return value

    pool_data = timed("featurize", lambda: prepare(pool))
    target_data = prepare(targets)
    compressor = Compressor.parse(config.compression, config.seed) if config.compression else None
    order = torch.randperm(len(pool_data), generator=torch.Generator().manual_seed(config.seed))
    fit_index = order[: config.fit_slots]
    if compressor is not None and compressor.kind == "mask" and config.score == "raw":
        # raw scores need only C g(z) of the pool: compute just the kept coordinates, layer by layer
        kept = compressor.kept(space.size)
        pool_sketch = timed("pool_gradients", lambda: compressor.mask_scale * space.masked_per_sample_gradients(
            pool_data, kept, config.chunk))
        target_gradient = timed("target_gradient", lambda: space.mean_gradient(target_data))
        curvature = timed("fit_curvature", lambda: fit_curvature(space, pool_data[fit_index], config.curvature))
        scores = timed("scores", lambda: -(pool_sketch @ compressor(curvature.solve(target_gradient))))
    else:
        pool_gradients = timed("pool_gradients", lambda: space.per_sample_gradients(pool_data, config.chunk))
        target_gradient = timed("target_gradient", lambda: space.mean_gradient(target_data))
        curvature = timed("fit_curvature", lambda: fit_curvature(space, pool_data[fit_index], config.curvature,
                                                                 fit_gradients=pool_gradients[fit_index]))
        scores = timed("scores", lambda: normalised(config.score, target_gradient, pool_gradients, curvature)
                       if compressor is None else
                       compressed_scores(config.score, compressor, target_gradient, pool_gradients, curvature))
    timings["total"] = round(sum(timings.values()), 4)
    return InfluenceResult(scores.detach(), timings, space.size)
