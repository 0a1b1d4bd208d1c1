"""Learned influence (NN-CIFT style): a small network predicts influence from cheap features.

Per slot, one forward pass gives its features: DeepRx's last-block activations averaged over the
grid, the slot's loss and mean |logit|, and pilot statistics (raw LS channel power, its variation
across pilot subcarriers, i.e. frequency selectivity, and across DMRS symbols, i.e. Doppler). A pair
(pool slot z, target T) is ``[f(z), f(T), f(z) * f(T), |f(z) - f(T)|]`` with ``f(T)`` the target's
mean feature. The MLP is trained on exact scores of a small fraction of pairs (per-sample gradients
are only needed for those pool rows) and predicts the rest from forward passes alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.receiver.features import SlotTensors
from service.receiver.loss import per_slot_bce_bits
from service.receiver.model import DeepRx


@torch.no_grad()
def slot_features(model: DeepRx, data: SlotTensors, chunk: int = 128) -> torch.Tensor:
    """[N, C + 5] cheap per-slot features (one forward pass each)."""
    model.eval()
    rows = []
    captured: dict[str, torch.Tensor] = {}
    # the last feature map, as it enters the output head (its normalisation)
    handle = model.head[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    try:
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            logits = model(part.features, part.bits_per_symbol)
            pooled = captured["h"].mean(dim=(2, 3))
            loss = per_slot_bce_bits(logits, part.labels, part.valid)[:, None]
            confidence = (logits.abs() * part.valid).sum(dim=(1, 2, 3)) / part.valid.sum(dim=(1, 2, 3))
            rows.append(torch.cat([pooled, loss, confidence[:, None], _pilot_statistics(part.features, model)], 1))
    finally:
        handle.remove()
    return torch.cat(rows).float()


def _pilot_statistics(features: torch.Tensor, model: DeepRx) -> torch.Tensor:
    """Channel power, frequency selectivity and time variation of the raw LS estimate at pilots."""
    rx = model.config.rx
    ls = torch.complex(features[:, 2 * rx + 2:3 * rx + 2], features[:, 3 * rx + 2:4 * rx + 2])  # [B, A, F, S]
    on = (features[:, 2 * rx:2 * rx + 2].abs().sum(1) > 0)  # [B, F, S]
    power = (ls.abs().square().sum(1) * on).sum(dim=(1, 2)) / on.sum(dim=(1, 2)).clamp_min(1)
    symbols = on.any(dim=1)  # [B, S]: DMRS symbols
    freq_var, time_var = [], []
    for b in range(len(features)):
        cols = symbols[b].nonzero().flatten()
        pilots = ls[b][:, on[b][:, cols[0]], :][:, :, cols]  # [A, pilot subcarriers, DMRS symbols]
        freq_var.append((pilots[:, 1:] - pilots[:, :-1]).abs().square().mean())
        time_var.append((pilots[..., 1:] - pilots[..., :-1]).abs().square().mean() if len(cols) > 1
                        else torch.zeros((), dtype=power.dtype))
    norm = power.clamp_min(1e-12)
    return torch.stack([power.log(), torch.stack(freq_var) / norm, torch.stack(time_var) / norm], 1)


def pair_features(pool: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pool [N, F], target [F] -> [N, 4F]."""
    target = target.expand_as(pool)
    return torch.cat([pool, target, pool * target, (pool - target).abs()], 1)


@dataclass
class EstimatorConfig:
    hidden: int = 64
    epochs: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class InfluenceEstimator(nn.Module):
    """MLP from pair features to a standardised influence score."""

    def __init__(self, num_features: int, config: EstimatorConfig):
        super().__init__()
        self.config = config
        with torch.random.fork_rng():  # the initial weights follow config.seed, not whatever ran before
            torch.manual_seed(config.seed)
            self.net = nn.Sequential(nn.Linear(4 * num_features, config.hidden), nn.ReLU(),
                                     nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def _pairs(self, pool: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        normalise = lambda x: (x - self.feature_mean) / self.feature_std  # noqa: E731
        return pair_features(normalise(pool), normalise(target))

    def fit(self, pool: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor) -> "InfluenceEstimator":
        """pool [N, F] features, targets [T, F] features, scores [T, N] exact influence."""
        torch.manual_seed(self.config.seed)
        both = torch.cat([pool, targets])
        self.feature_mean, self.feature_std = both.mean(0), both.std(0).clamp_min(1e-6)
        self.score_mean, self.score_std = scores.mean(), scores.std().clamp_min(1e-12)
        x = torch.cat([self._pairs(pool, t) for t in targets])
        y = ((scores - self.score_mean) / self.score_std).reshape(-1, 1).float()
        optimiser = torch.optim.Adam(self.parameters(), lr=self.config.learning_rate,
                                     weight_decay=self.config.weight_decay)
        self.train()
        for _ in range(self.config.epochs):
            optimiser.zero_grad()
            loss = nn.functional.mse_loss(self.net(x), y)
            loss.backward()
            optimiser.step()
        self.eval()
        return self

    @torch.no_grad()
    def predict(self, pool: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Predicted influence of every pool row on one target: [N]."""
        return self.net(self._pairs(pool, target))[:, 0] * self.score_std + self.score_mean


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = lambda x: torch.argsort(torch.argsort(x)).double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([ranks(a.flatten()), ranks(b.flatten())]))[0, 1])
