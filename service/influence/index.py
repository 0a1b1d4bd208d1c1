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

Rows are computed by :func:`pool_rows`, chunk by chunk, whoever runs it: :meth:`GradientIndex.build`
and :meth:`~GradientIndex.extend` take a ``shards`` runner (:data:`Sharding`) that yields the rows of
consecutive runs of pool rows; the default, :func:`in_process`, is one run over the whole pool (one
shard file); ``service/influence/distributed.py`` runs contiguous, chunk-aligned runs as Ray tasks
(one shard file each). Either way the manifest is written once, after every shard file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
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


def pool_rows(model: DeepRx, curvature: InverseCurvature, compressor: Compressor | None, pool: SlotBatch,
              chunk: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows ``C H^-1 g(z)`` [N, D] and self-influence ``s(z)`` [N] of every slot of ``pool``,
    ``chunk`` slots at a time (float32). The one computation of index rows: the single-process build
    runs it over the whole pool, a sharded build over chunk-aligned runs of it (same chunks, same rows)."""
    space = ParameterSpace.convolutions(model)
    rows, self_influence = [], []
    for start in tqdm(range(0, len(pool), chunk), desc="index", unit="chunk", disable=not progress):
        grads = space.per_sample_gradients(prepare(pool.select(slice(start, start + chunk))), chunk)
        preconditioned = curvature.solve(grads)
        self_influence.append((grads * preconditioned).sum(-1))
        rows.append(compressor(preconditioned) if compressor else preconditioned)
    return torch.cat(rows).float(), torch.cat(self_influence).float()


Sharding = Callable[[DeepRx, InverseCurvature, Compressor | None, SlotBatch, list[str], int, bool],
                    Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]]
"""``shards(model, curvature, compressor, pool, ids, chunk, progress)`` yields ``(rows, self_influence,
slot ids)`` for consecutive runs of ``pool`` in order, each computed by :func:`pool_rows`."""


def in_process(model: DeepRx, curvature: InverseCurvature, compressor: Compressor | None, pool: SlotBatch,
               ids: list[str], chunk: int, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The whole pool in this process: one run, one shard."""
    yield (*pool_rows(model, curvature, compressor, pool, chunk, progress), list(ids))


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
    def _write_shards(self, manifest: dict, shards: Sharding, model: DeepRx, curvature: InverseCurvature,
                      compressor: Compressor | None, pool: SlotBatch, ids: list[str], chunk: int,
                      progress: bool) -> None:
        """Write a shard file per run ``shards`` yields, then the manifest naming them (the commit point)."""
        expected = manifest["rows"] + len(ids)
        for rows, self_influence, shard_ids in shards(model, curvature, compressor, pool, ids, chunk, progress):
            if not len(rows) == len(self_influence) == len(shard_ids):
                raise RuntimeError(f"a shard of {len(shard_ids)} slots came back with {len(rows)} rows")
            name = f"shard-{len(manifest['shards']):05d}"
            tmp = self.directory / f"{name}.safetensors.tmp"
            save_file({"rows": rows.contiguous(), "self_influence": self_influence.contiguous()}, str(tmp))
            os.replace(tmp, self.directory / f"{name}.safetensors")
            _write_json(self.directory / f"{name}.json", shard_ids)
            manifest["shards"].append(name)
            manifest["rows"] += len(shard_ids)
        if manifest["rows"] != expected:
            raise RuntimeError(f"the shards hold {manifest['rows']} rows, expected {expected}")
        _write_json(self.directory / MANIFEST, manifest)  # the commit point

    def _curvature(self, model: DeepRx, fit: SlotBatch, config: IndexConfig) -> InverseCurvature:
        return fit_curvature(ParameterSpace.convolutions(model.eval()), prepare(fit), config.curvature)

    def build(self, model: DeepRx, model_version: str, pool: SlotBatch, ids: list[str], fit_ids: list[str],
              config: IndexConfig, progress: bool = True, shards: Sharding = in_process) -> None:
        """Index ``pool`` (slot ``ids``) from scratch; H is fitted here on the pool slots named ``fit_ids``
        and ``shards`` computes the rows with it (default: in this process)."""
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
        self._write_shards(manifest, shards, model, curvature, compressor, pool, list(ids), config.chunk, progress)

    def extend(self, model: DeepRx, model_version: str, pool: SlotBatch, ids: list[str], fit: SlotBatch,
               progress: bool = True, shards: Sharding = in_process) -> int:
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
        self._write_shards(manifest, shards, model, curvature, compressor, pool.select(new), [ids[i] for i in new],
                           config.chunk, progress)
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
