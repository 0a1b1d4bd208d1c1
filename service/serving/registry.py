"""Model registry: numbered versions on disk, one global active version plus optional versions
scoped to contexts (specialists), swapped atomically.

Layout under ``root``: ``versions/v<N>/`` holds a checkpoint (``model.safetensors``,
``model.json``) plus ``version.json`` (lineage: parent, creator, created, metrics). A version is
written into ``.tmp-<host>-<pid>-*``, fsynced, then renamed into ``versions/`` in one step, so a crash
never leaves a partly written version listed; a later start on the same host removes the leftovers
of dead processes. ``ACTIVE`` names the
global version and ``SCOPES.json`` maps contexts to their versions (each written to a temp file,
fsynced, renamed), so a restart serves what was last activated, scopes included.

A slot is served by its context's scoped version, else by the global one
(:meth:`ModelRegistry.active_for`). At most ``max_scoped`` contexts have a version of their own:
activating one more is refused (:class:`ScopeLimitError`) until an operator or a rollback releases
a scope; nothing is evicted behind anyone's back. Loading a version builds its inference backend
(``backend.py``); a version whose backend cannot be built raises and is never activated.

Serving reads the version once per slot when the slot arrives: a slot that started on v finishes
on v even if v+1 is activated meanwhile.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from service.receiver.checkpoint import load_checkpoint, save_checkpoint
from service.receiver.model import DeepRx
from service.serving.backend import Backend, InferenceConfig, build_backend

VERSION_FILE = "version.json"
ACTIVE_FILE = "ACTIVE"
SCOPES_FILE = "SCOPES.json"


class UnknownVersion(KeyError):
    """Raised for a version the registry does not hold."""


class ScopeLimitError(RuntimeError):
    """Raised when activating a version for one more context would exceed ``max_scoped``."""


@dataclass(frozen=True)
class ModelVersion:
    """An immutable loaded version: its name, the model in eval mode on the serving device, lineage,
    and the backend that runs its forward pass."""

    version: str
    model: DeepRx
    info: dict
    backend: Backend


@dataclass(frozen=True)
class Routing:
    """Which version serves which context, as one immutable value: a request reads it once, so all
    its slots of one context are served by one version even while versions are swapped."""

    global_version: ModelVersion | None
    scoped: dict[str, ModelVersion]

    def version_for(self, context: str) -> ModelVersion | None:
        return self.scoped.get(context, self.global_version)


@dataclass(frozen=True)
class Activation:
    """A change of what serves: ``context`` None is the global version; ``version`` None means the
    context's scope was released and the global version serves it again."""

    context: str | None
    version: ModelVersion | None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix() -> str:
    """Temp files and directories carry host and pid, so replicas sharing the registry directory never
    collide, and a replica cleans up only its own host's leftovers of dead processes (never a version
    another replica is writing)."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix() + path.name, dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_dead_leftovers(root: Path) -> None:
    host = socket.gethostname()
    for leftover in root.glob(f".tmp-{host}-*"):
        pid = leftover.name[len(f".tmp-{host}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ModelRegistry:
    def __init__(self, root: str | Path, device: torch.device | str = "cpu",
                 inference: InferenceConfig | None = None, max_scoped: int = 16):
        self.root = Path(root)
        self.device = torch.device(device)
        self.inference = inference or InferenceConfig()
        self.max_scoped = max_scoped
        self._versions_dir = self.root / "versions"
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_leftovers(self.root)
        self._lock = threading.Lock()  # the loaded-version cache
        self._activation_lock = threading.Lock()  # one activation at a time, files and memory together
        self._loaded: dict[str, ModelVersion] = {}
        self._listeners: list[Callable[[Activation], None]] = []
        known = set(self.versions())
        active_file = self.root / ACTIVE_FILE
        name = active_file.read_text().strip() if active_file.exists() else ""
        scopes_file = self.root / SCOPES_FILE
        scoped = json.loads(scopes_file.read_text()) if scopes_file.exists() else {}
        self._routing = Routing(self.load(name) if name in known else None,
                                {context: self.load(v) for context, v in scoped.items() if v in known})

    # ----------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        names = [p.name for p in self._versions_dir.iterdir() if (p / VERSION_FILE).exists()]
        return sorted(names, key=lambda n: int(n[1:]))

    def path(self, version: str) -> Path:
        """The directory holding ``version``'s checkpoint files."""
        if not (self._versions_dir / version / VERSION_FILE).exists():
            raise UnknownVersion(version)
        return self._versions_dir / version

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
        model = load_checkpoint(self.path(version)).model.to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        loaded = ModelVersion(version, model, info, build_backend(model, self.inference, self.device))
        with self._lock:
            return self._loaded.setdefault(version, loaded)

    @property
    def active(self) -> ModelVersion | None:
        """The global version: serves every context without a scope of its own."""
        return self._routing.global_version

    @property
    def routing(self) -> Routing:
        """What serves which context now (read it once per request)."""
        return self._routing

    def active_for(self, context: str) -> ModelVersion | None:
        """The version that serves ``context``: its scoped version, else the global one."""
        return self._routing.version_for(context)

    def scopes(self) -> dict[str, str]:
        """Context -> the name of the version scoped to it."""
        return {context: loaded.version for context, loaded in self._routing.scoped.items()}

    # ----------------------------------------------------------------- writing
    def publish(self, model: DeepRx, creator: str, parent: str | None = None,
                metrics: dict[str, float] | None = None, extra: dict | None = None) -> str:
        """Write ``model`` as a new version (not activated) and return its name."""
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=self.root))
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

    def activate(self, version: str, context: str | None = None) -> ModelVersion:
        """Make ``version`` serve new slots: globally, or (``context`` given) for that context only.
        Durable before it takes effect; refused with :class:`ScopeLimitError` past ``max_scoped``."""
        loaded = self.load(version)  # builds the backend: a version that cannot be served fails here
        with self._activation_lock:
            routing = self._routing
            if context is None:
                _write_durably(self.root / ACTIVE_FILE, version)
                previous, self._routing = routing.global_version, Routing(loaded, routing.scoped)
            else:
                if context not in routing.scoped and len(routing.scoped) >= self.max_scoped:
                    raise ScopeLimitError(f"{len(routing.scoped)} contexts already have a scoped version "
                                          f"(max_scoped = {self.max_scoped}); release one first")
                previous = routing.scoped.get(context)
                self._write_scopes({**routing.scoped, context: loaded})
            changed = previous is None or previous.version != version
        if changed:
            self._notify(Activation(context, loaded))
        return loaded

    def release(self, context: str) -> bool:
        """Remove ``context``'s scope (the global version serves it again); False if it had none."""
        with self._activation_lock:
            if context not in self._routing.scoped:
                return False
            self._write_scopes({c: v for c, v in self._routing.scoped.items() if c != context})
        self._notify(Activation(context, None))
        return True

    def _write_scopes(self, scoped: dict[str, ModelVersion]) -> None:
        _write_durably(self.root / SCOPES_FILE, json.dumps({c: v.version for c, v in scoped.items()}, sort_keys=True))
        self._routing = Routing(self._routing.global_version, scoped)

    def _notify(self, activation: Activation) -> None:
        for listener in list(self._listeners):
            listener(activation)

    def on_activate(self, listener: Callable[[Activation], None]) -> None:
        """Call ``listener(activation)`` after every change of what serves (global or a scope)."""
        self._listeners.append(listener)
