"""Server configuration: dataclasses with defaults, optionally overridden by a TOML file.

Example ``server.toml``::

    metrics_host = "127.0.0.1"  # /metrics has no authentication; 0.0.0.0 only where Prometheus scrapes it

    [batching]
    max_batch_size = 64
    max_queue_delay_ms = 0.0  # 0: a batch takes what queued while the last one ran; > 0: waits for more
    workers = 2             # batches run at once, each on its own thread

    [inference]
    backend = "auto"        # onnxruntime on CPU when installed, else torch
    spinning = true         # ONNX Runtime's threads busy-wait between a run's operators (false: less CPU, slower)
    spin_between_runs = false  # true: and between runs too (ONNX Runtime's default; more CPU, same speed)
    threads = 0             # each batcher worker's ONNX Runtime or eager CPU threads (0: cores / workers)

    [models]
    max_scoped = 16         # contexts that may have a scoped version (specialist)

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
    method = "target-only"
    threads = 0             # torch threads of adaptation jobs (0: one per core); other threads use one

    [security]
    admin_token = ""        # empty: --admin-token or DEEPRX_ADMIN_TOKEN; none at all: admin RPCs are open
    protect_reads = false   # true: every RPC but the gRPC health check needs the token
    # tls_cert = "server.pem"   # with tls_key, the gRPC port speaks TLS only
    # tls_key = "server.key"
    # tls_client_ca = "ca.pem"  # mutual TLS: clients need a certificate signed by this CA
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from service.adaptation.worker import AdaptationConfig
from service.serving.backend import InferenceConfig


@dataclass
class BatchingConfig:
    max_batch_size: int = 64
    # 0: a batch takes the slots that queued while the last one ran, and no slot waits for company:
    # under load the queue fills during each forward pass anyway, and at one stream a 2 ms wait was
    # most of a slot's latency (docs/operations.md#serving-cpu-budget); > 0 waits up to that long
    max_queue_delay_ms: float = 0.0
    # threads that run batches at once, each featurizing, running and recording its own batch: while
    # one runs a forward pass another featurizes or records, and no model run waits on threads that
    # the event loop has taken a core from (2 workers of one ONNX Runtime thread each on two cores,
    # against one worker of two threads: 16 streams 862 vs 748 slots/s, 1-stream p50 2.87 vs 3.33 ms,
    # docs/operations.md)
    workers: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"batching.workers must be at least 1, got {self.workers}")


@dataclass
class LimitsConfig:
    max_slots_per_request: int = 256
    max_message_bytes: int = 64 * 1024 * 1024  # larger messages get RESOURCE_EXHAUSTED
    max_rx: int = 8
    max_subcarriers: int = 3300  # 275 PRB
    max_concurrent_rpcs: int = 512
    stream_window: int = 64  # slots in flight per stream before the server stops reading it
    max_queued_slots: int = 1024  # slots waiting for a batch; beyond it slots get RESOURCE_EXHAUSTED
    workers: int = 64  # threads for the unary RPCs (StreamDetect runs on the server's event loop)


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
class ModelsConfig:
    max_scoped: int = 16  # contexts with a version of their own; one more is refused until one is released


@dataclass
class ReplicationConfig:
    registry: str = ""  # shared registry directory (default: <store>/models, not shared)
    publish: str = ""  # leader: ZeroMQ endpoint to announce activations on, e.g. tcp://0.0.0.0:5557
    follow: str = ""  # follower: the leader's endpoint, e.g. tcp://leader:5557


@dataclass
class SecurityConfig:
    """Who may call what (checked in ``service/api/auth.py``); the token never appears in a repr or a log."""

    admin_token: str = field(default="", repr=False)  # ActivateModel, ReleaseScope, TriggerAdaptation need it
    protect_reads: bool = False  # true: every RPC but the gRPC health check needs the token too
    tls_cert: str = ""  # PEM server certificate (chain); with tls_key the gRPC port speaks TLS only
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA for client certificates (mutual TLS)
    require_client_cert: bool = True  # with tls_client_ca: false verifies a client certificate only when offered


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"  # /metrics has no authentication: expose it only where Prometheus needs it
    metrics_port: int = 9100
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

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
    if hasattr(config, "__post_init__"):
        config.__post_init__()  # a config's own checks see the file's values too
    return config
