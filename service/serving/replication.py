"""Version announcements between replicas over ZeroMQ (PUB/SUB).

Replicas share one registry directory (a network file system, or one host). The replica that
adapts (the leader) publishes every activation as ``{"version": ..., "context": ..., "sha256": ...}``
(context null for the global version; version "" and no digest when a context's scope was released);
followers subscribe and apply the same change from the shared registry, so every replica serves what
the leader serves. The digest is the SHA-256 of the version's weights file as the leader has it: a
follower whose copy differs or is missing (a stale or partly synced volume, a tampered file) refuses
to activate it rather than serve other weights under the same name. A follower that misses a message
(PUB/SUB drops while disconnected) catches up at the next one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading

import zmq

from service.serving.registry import Activation, ModelRegistry, UnknownVersion

log = logging.getLogger("deeprx.replication")
TOPIC = b"deeprx.model"
WEIGHTS_FILE = "model.safetensors"


def weights_sha256(registry: ModelRegistry, version: str) -> str:
    """Hex SHA-256 of ``version``'s weights file in ``registry``: what leader and followers compare.
    Raises :class:`UnknownVersion` or :class:`FileNotFoundError` when this registry lacks it."""
    with open(registry.path(version) / WEIGHTS_FILE, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class VersionAnnouncer:
    """PUB socket bound at ``endpoint``; announces every activation of ``registry``."""

    def __init__(self, registry: ModelRegistry, endpoint: str):
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.bind(endpoint)
        self._registry = registry
        self._lock = threading.Lock()
        registry.on_activate(self.announce)

    def announce(self, activation: Activation) -> None:
        version = activation.version.version if activation.version else ""
        message = {"version": version, "context": activation.context,
                   "sha256": weights_sha256(self._registry, version) if version else ""}
        with self._lock:
            self._socket.send_multipart([TOPIC, json.dumps(message).encode()])

    def close(self) -> None:
        self._socket.close(linger=0)


class VersionFollower:
    """SUB socket connected to a leader; activates announced versions in the local registry once the
    local weights match the announced digest. ``refused`` counts announcements not followed for that."""

    def __init__(self, registry: ModelRegistry, endpoint: str):
        self._registry = registry
        self.refused = 0
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self._socket.setsockopt(zmq.RCVTIMEO, 200)
        self._socket.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, payload = self._socket.recv_multipart()
            except zmq.Again:
                continue
            message = json.loads(payload)
            version, context = message["version"], message.get("context")
            if not version:
                self._registry.release(context)
                log.info("following the leader: context %s back on the global version", context)
                continue
            current = (self._registry.active.version if context is None and self._registry.active
                       else self._registry.scopes().get(context))
            if current == version:
                continue
            announced = message.get("sha256", "")
            try:
                local = weights_sha256(self._registry, version)
            except (UnknownVersion, FileNotFoundError):
                local = ""
            if not announced or local != announced:
                self.refused += 1
                log.warning("not activating %s for %s: the leader's weights have SHA-256 %s, this replica's "
                            "copy %s", version, context or "every context", announced or "(not announced)",
                            local or "(missing)")
                continue
            try:
                self._registry.activate(version, context)
            except Exception:  # one version this replica cannot serve must not end the following
                log.exception("following the leader: cannot activate %s for %s", version, context or "every context")
                continue
            log.info("following the leader: %s now served by %s", context or "every context", version)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)
