"""Gradient index: pool rows pre-multiplied by ``H^-1`` and sketched, on disk, queried with one product.

Each row is ``C H^-1 g(z)`` for a pool slot z (C the sketch of ``compress.py``; none = exact), with
its self-influence ``s(z) = g(z)^T H^-1 g(z)``. A target's influence on every row is then
``I(z, T) = -(C H^-1 g(z))^T (C g_T)`` (H symmetric): no curvature is needed at query time.

On disk (next to the sample store): ``manifest.json`` (model version, curvature and sketch settings,
the slot ids H was fitted on, the shards) and ``shard-<n>.safetensors`` (rows, self-influence) with
``shard-<n>.json`` (slot ids). Shards are written first and the manifest is replaced atomically
last, so a crash leaves the previous index intact. An index built on model version v is *stale*
once another version serves: :meth:`GradientIndex.extend` refuses it, and the caller rebuilds.
Extending re-fits H on the recorded fit slots (deterministic for the same model and slots) and
appends a shard for the slots not yet indexed.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from schema.dataset import SlotBatch
from service.influence.compress import Compressor
from service.influence.curvature import CurvatureConfig, InverseCurvature
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.receiver.features import prepare
from service.receiver.model import DeepRx

MANIFEST = "manifest.json"


class StaleIndexError(RuntimeError):
    """The index was built on another model version."""


@dataclass
class IndexConfig:
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    compression: str | None = "sjlt:4096"
    chunk: int = 32


@dataclass
class QueryResult:
    slot_ids: list[str]  # most beneficial first
    scores: torch.Tensor  # raw or l-relative influence, negative = beneficial


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class GradientIndex:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state
    @property
    def manifest(self) -> dict | None:
        path = self.directory / MANIFEST
        return json.loads(path.read_text()) if path.exists() else None

    def model_version(self) -> str | None:
        manifest = self.manifest
        return manifest["model_version"] if manifest else None

    def is_stale(self, model_version: str) -> bool:
        return self.model_version() != model_version

    def slot_ids(self) -> list[str]:
        manifest = self.manifest or {"shards": []}
        ids: list[str] = []
        for shard in manifest["shards"]:
            ids += json.loads((self.directory / f"{shard}.json").read_text())
        return ids

    # ------------------------------------------------------------------ writing
    def _rows(self, space: ParameterSpace, curvature: InverseCurvature, compressor: Compressor | None,
              pool: SlotBatch, chunk: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, self_influence = [], []
        for start in tqdm(range(0, len(pool), chunk), desc="index", unit="chunk", disable=not progress):
            grads = space.per_sample_gradients(prepare(pool.select(slice(start, start + chunk))), chunk)
            preconditioned = curvature.solve(grads)
            self_influence.append((grads * preconditioned).sum(-1))
            rows.append(compressor(preconditioned) if compressor else preconditioned)
        return torch.cat(rows).float(), torch.cat(self_influence).float()

    def _append_shard(self, manifest: dict, rows: torch.Tensor, self_influence: torch.Tensor,
                      ids: list[str]) -> None:
        name = f"shard-{len(manifest['shards']):05d}"
        tmp = self.directory / f"{name}.safetensors.tmp"
        save_file({"rows": rows.contiguous(), "self_influence": self_influence.contiguous()}, str(tmp))
        os.replace(tmp, self.directory / f"{name}.safetensors")
        _write_json(self.directory / f"{name}.json", ids)
        manifest["shards"].append(name)
        manifest["rows"] += len(ids)
        _write_json(self.directory / MANIFEST, manifest)  # the commit point

    def _curvature(self, model: DeepRx, fit: SlotBatch, config: IndexConfig) -> InverseCurvature:
        return fit_curvature(ParameterSpace.convolutions(model.eval()), prepare(fit), config.curvature)

    def build(self, model: DeepRx, model_version: str, pool: SlotBatch, ids: list[str], fit_ids: list[str],
              config: IndexConfig, progress: bool = True) -> None:
        """Index ``pool`` (slot ``ids``) from scratch; H is fitted on the pool slots named ``fit_ids``."""
        if len(ids) != len(pool) or len(set(ids)) != len(ids):
            raise ValueError("ids must name each pool slot once")
        position = {slot_id: i for i, slot_id in enumerate(ids)}
        missing = [i for i in fit_ids if i not in position]
        if missing:
            raise ValueError(f"fit slots not in the pool: {missing[:3]}")
        for old in self.directory.glob("shard-*"):
            old.unlink()
        (self.directory / MANIFEST).unlink(missing_ok=True)
        curvature = self._curvature(model, pool.select([position[i] for i in fit_ids]), config)
        manifest = {"model_version": model_version, "fit_ids": list(fit_ids), "damping": curvature.damping,
                    "config": {**asdict(config), "curvature": asdict(config.curvature)}, "shards": [], "rows": 0}
        compressor = Compressor.parse(config.compression) if config.compression else None
        rows, self_influence = self._rows(ParameterSpace.convolutions(model), curvature, compressor, pool,
                                          config.chunk, progress)
        self._append_shard(manifest, rows, self_influence, list(ids))

    def extend(self, model: DeepRx, model_version: str, pool: SlotBatch, ids: list[str], fit: SlotBatch,
               progress: bool = True) -> int:
        """Add the slots of ``pool`` not yet indexed; ``fit`` holds the manifest's fit slots, in order.
        Returns how many rows were added."""
        manifest = self.manifest
        if manifest is None:
            raise FileNotFoundError(f"no gradient index in '{self.directory}'")
        if manifest["model_version"] != model_version:
            raise StaleIndexError(f"index built on {manifest['model_version']}, model is {model_version}: rebuild")
        known = set(self.slot_ids())
        new = [i for i, slot_id in enumerate(ids) if slot_id not in known]
        if not new:
            return 0
        settings = manifest["config"]
        config = IndexConfig(CurvatureConfig(**{**settings["curvature"], "damping": manifest["damping"]}),
                             settings["compression"], settings["chunk"])
        curvature = self._curvature(model, fit, config)
        compressor = Compressor.parse(config.compression) if config.compression else None
        rows, self_influence = self._rows(ParameterSpace.convolutions(model), curvature, compressor,
                                          pool.select(new), config.chunk, progress)
        self._append_shard(manifest, rows, self_influence, [ids[i] for i in new])
        return len(new)

    # ------------------------------------------------------------------ reading
    def query(self, model: DeepRx, model_version: str, targets: SlotBatch, k: int,
              score: str = "l-relative") -> QueryResult:
        """The ``k`` most beneficial indexed slots for the mean loss of ``targets``."""
        manifest = self.manifest
        if manifest is None:
            raise FileNotFoundError(f"no gradient index in '{self.directory}'")
        if manifest["model_version"] != model_version:
            raise StaleIndexError(f"index built on {manifest['model_version']}, model is {model_version}: rebuild")
        if score not in ("raw", "l-relative"):
            raise ValueError(f"the index serves raw and l-relative scores, not '{score}'")
        space = ParameterSpace.convolutions(model.eval())
        target = space.mean_gradient(prepare(targets)).float()
        compression = manifest["config"]["compression"]
        target = Compressor.parse(compression)(target) if compression else target
        tensors = [load_file(str(self.directory / f"{name}.safetensors")) for name in manifest["shards"]]
        rows = torch.cat([t["rows"] for t in tensors])
        scores = -(rows @ target)
        if score == "l-relative":
            scores = scores / torch.cat([t["self_influence"] for t in tensors]).clamp_min(1e-30).sqrt()
        order = torch.argsort(scores)[:k]
        ids = self.slot_ids()
        return QueryResult([ids[i] for i in order.tolist()], scores[order])
