"""Server configuration: dataclasses with defaults, optionally overridden by a TOML file.

Example ``server.toml``::

    [batching]
    max_batch_size = 64
    max_queue_delay_ms = 2.0

    [limits]
    max_slots_per_request = 256

    [capture]
    max_samples = 100000

    [monitor]
    max_contexts = 64

    [adaptation]
    pool = "data/pool.h5"
    regression = "data/train-heldout.h5"
    rehearsal = "data/train.h5"
    method = "first-order"
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from service.adaptation.worker import AdaptationConfig


@dataclass
class BatchingConfig:
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0


@dataclass
class LimitsConfig:
    max_slots_per_request: int = 256
    max_message_bytes: int = 64 * 1024 * 1024  # larger messages get RESOURCE_EXHAUSTED
    max_rx: int = 8
    max_subcarriers: int = 3300  # 275 PRB
    max_concurrent_rpcs: int = 512
    stream_window: int = 64  # slots in flight per stream before the server stops reading it
    workers: int = 64  # gRPC handler threads


@dataclass
class CaptureConfig:
    enabled: bool = True
    queue_size: int = 4096
    max_samples: int = 100_000


@dataclass
class MonitorConfig:
    max_contexts: int = 64  # contexts beyond this share the label "_other"
    ber_window_slots: int = 200  # per-context BER gauge covers the last N slots with feedback
    served_slots_memory: int = 100_000  # slots remembered for feedback matching
    target_absolute_ber: float = 0.05  # a context is a target above this BER ...
    target_relative_to_genie: float = 1.5  # ... or above this multiple of the reported genie BER
    target_min_slots: int = 50  # ... over at least this many labelled slots


@dataclass
class ReplicationConfig:
    registry: str = ""  # shared registry directory (default: <store>/models, not shared)
    publish: str = ""  # leader: ZeroMQ endpoint to announce activations on, e.g. tcp://0.0.0.0:5557
    follow: str = ""  # follower: the leader's endpoint, e.g. tcp://leader:5557


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)

    @staticmethod
    def from_toml(path: str | Path) -> "ServerConfig":
        with open(path, "rb") as handle:
            return _apply(ServerConfig(), tomllib.load(handle), "")


def _apply(config, values: dict, prefix: str):
    known = {f.name: f for f in fields(config)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key '{prefix}{key}' (known: {', '.join(known)})")
        current = getattr(config, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{prefix}{key}' must be a table")
            _apply(current, value, f"{prefix}{key}.")
        else:
            if type(current) is float and isinstance(value, int):
                value = float(value)
            if type(value) is not type(current):
                raise ValueError(f"config key '{prefix}{key}' must be {type(current).__name__}, "
                                 f"got {type(value).__name__}")
            setattr(config, key, value)
    return config
