"""Model checkpoints: a directory with ``model.safetensors`` (weights), ``model.json``
(architecture, training data, steps, metrics) and, while training, ``optimizer.safetensors``.

Every file is written to a temporary name, fsynced and renamed, so a crash leaves either the
previous checkpoint or the new one, never a mix of torn files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.receiver.model import DeepRx, DeepRxConfig

WEIGHTS = "model.safetensors"
METADATA = "model.json"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class Checkpoint:
    model: DeepRx
    metadata: dict = field(default_factory=dict)
    optimizer_state: dict[str, torch.Tensor] | None = None


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    _fsync_replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    _fsync_replace(tmp, path)


def save_checkpoint(directory: str | Path, model: DeepRx, metadata: dict,
                    optimizer_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights, then metadata (the commit point: it names the architecture)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_tensors(directory / WEIGHTS, model.state_dict())
    if optimizer_state is not None:
        _write_tensors(directory / OPTIMIZER, optimizer_state)
    _write_json(directory / METADATA, {**metadata, "config": model.config.to_dict()})
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(directory: str | Path, with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint directory; the model is returned in eval mode."""
    directory = Path(directory)
    meta_path = directory / METADATA
    if not meta_path.exists():
        raise FileNotFoundError(f"'{directory}' is not a model checkpoint (no {METADATA})")
    metadata = json.loads(meta_path.read_text())
    model = DeepRx(DeepRxConfig.from_dict(metadata["config"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    model.eval()
    optimizer_state = None
    if with_optimizer and (directory / OPTIMIZER).exists():
        optimizer_state = load_file(str(directory / OPTIMIZER))
    return Checkpoint(model, metadata, optimizer_state)


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam-style per-parameter state as flat tensors ``state.<param index>.<name>``."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            flat[f"state.{index}.{name}"] = torch.as_tensor(value)
    return flat


def restore_optimizer_state(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
