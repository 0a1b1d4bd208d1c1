"""Version announcements between replicas over ZeroMQ (PUB/SUB).

Replicas share one registry directory (a network file system, or one host). The replica that
adapts (the leader) publishes every activation as ``{"version": ...}``; followers subscribe and
activate the same version from the shared registry, so every replica serves what the leader serves.
A follower that misses a message (PUB/SUB drops while disconnected) catches up at the next one.
"""
from __future__ import annotations

import json
import logging
import threading

import zmq

from service.serving.registry import ModelRegistry, ModelVersion

log = logging.getLogger("deeprx.replication")
TOPIC = b"deeprx.model"


class VersionAnnouncer:
    """PUB socket bound at ``endpoint``; announces every activation of ``registry``."""

    def __init__(self, registry: ModelRegistry, endpoint: str):
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.bind(endpoint)
        self._lock = threading.Lock()
        registry.on_activate(self.announce)

    def announce(self, version: ModelVersion) -> None:
        with self._lock:
            self._socket.send_multipart([TOPIC, json.dumps({"version": version.version}).encode()])

    def close(self) -> None:
        self._socket.close(linger=0)


class VersionFollower:
    """SUB socket connected to a leader; activates announced versions in the local registry."""

    def __init__(self, registry: ModelRegistry, endpoint: str):
        self._registry = registry
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
            version = json.loads(payload)["version"]
            active = self._registry.active
            if active is not None and active.version == version:
                continue
            if version not in self._registry.versions():
                log.warning("announced version %s is not in the shared registry", version)
                continue
            self._registry.activate(version)
            log.info("following the leader: now serving %s", version)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)
