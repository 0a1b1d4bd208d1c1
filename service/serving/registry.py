"""Model registry: numbered versions on disk, one active, swapped atomically.

Layout under ``root``: ``versions/v<N>/`` holds a checkpoint (``model.safetensors``,
``model.json``) plus ``version.json`` (lineage: parent, creator, created, metrics). A version is
written into ``.tmp-*``, fsynced, then renamed into ``versions/`` in one step, so a crash never
leaves a partly written version listed; leftovers are removed at start. ``ACTIVE`` names the
active version (temp file + rename), so a restart serves the last activated version.

Serving reads :attr:`ModelRegistry.active` once per request: a request that started on v
finishes on v even if v+1 is activated meanwhile.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from service.receiver.checkpoint import load_checkpoint, save_checkpoint
from service.receiver.model import DeepRx

VERSION_FILE = "version.json"
ACTIVE_FILE = "ACTIVE"


class UnknownVersion(KeyError):
    """Raised for a version the registry does not hold."""


@dataclass(frozen=True)
class ModelVersion:
    """An immutable loaded version: its name, the model in eval mode on the serving device, lineage."""

    version: str
    model: DeepRx
    info: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRegistry:
    def __init__(self, root: str | Path, device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.device = torch.device(device)
        self._versions_dir = self.root / "versions"
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._lock = threading.Lock()
        self._loaded: dict[str, ModelVersion] = {}
        self._listeners: list[Callable[[ModelVersion], None]] = []
        self._active: ModelVersion | None = None
        active_file = self.root / ACTIVE_FILE
        if active_file.exists():
            name = active_file.read_text().strip()
            if name in self.versions():
                self._active = self.load(name)

    # ----------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        names = [p.name for p in self._versions_dir.iterdir() if (p / VERSION_FILE).exists()]
        return sorted(names, key=lambda n: int(n[1:]))

    def info(self, version: str) -> dict:
        path = self._versions_dir / version / VERSION_FILE
        if not path.exists():
            raise UnknownVersion(version)
        return json.loads(path.read_text())

    def load(self, version: str) -> ModelVersion:
        with self._lock:
            if version in self._loaded:
                return self._loaded[version]
        info = self.info(version)
        model = load_checkpoint(self._versions_dir / version).model.to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        loaded = ModelVersion(version, model, info)
        with self._lock:
            return self._loaded.setdefault(version, loaded)

    @property
    def active(self) -> ModelVersion | None:
        return self._active

    # ----------------------------------------------------------------- writing
    def publish(self, model: DeepRx, creator: str, parent: str | None = None,
                metrics: dict[str, float] | None = None, extra: dict | None = None) -> str:
        """Write ``model`` as a new version (not activated) and return its name."""
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        info = {"parent": parent or "", "creator": creator, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "metrics": metrics or {}, "parameters": model.num_parameters(), **(extra or {})}
        save_checkpoint(tmp, model, {"lineage": info})
        with self._lock:
            existing = [int(p.name[1:]) for p in self._versions_dir.iterdir() if p.name.startswith("v")]
            version = f"v{max(existing, default=0) + 1}"
            info["version"] = version
            (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
            with open(tmp / VERSION_FILE, "rb") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, self._versions_dir / version)
            _fsync_dir(self._versions_dir)
        return version

    def import_checkpoint(self, directory: str | Path, creator: str = "import") -> str:
        """Publish a training checkpoint directory as a new version."""
        checkpoint = load_checkpoint(directory)
        meta = checkpoint.metadata
        metrics = {k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))}
        return self.publish(checkpoint.model, creator=creator, metrics=metrics,
                            extra={"source": str(directory), "size": meta.get("size", "")})

    def activate(self, version: str) -> ModelVersion:
        """Make ``version`` the one new requests use; durable before it takes effect."""
        loaded = self.load(version)
        tmp = self.root / f"{ACTIVE_FILE}.tmp"
        tmp.write_text(version)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / ACTIVE_FILE)
        _fsync_dir(self.root)
        previous, self._active = self._active, loaded
        if previous is None or previous.version != version:
            for listener in list(self._listeners):
                listener(loaded)
        return loaded

    def on_activate(self, listener: Callable[[ModelVersion], None]) -> None:
        """Call ``listener(version)`` after every change of the active version."""
        self._listeners.append(listener)
