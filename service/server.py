"""The gRPC receiver service, composed: registry, batcher, store, monitor, metrics and the adaptation
worker, behind one servicer made of the RPC groups in ``service/api/`` (inference and feedback;
models; targets and adaptation), plus gRPC health and reflection and graceful shutdown.

A slot's path: validate -> featurize -> batch -> DeepRx(active version) -> LLRs.
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from service.adaptation.worker import AdaptationWorker
from service.api.adaptation import AdaptationRpcs
from service.api.auth import TokenInterceptor, check_security, log_access
from service.api.inference import InferenceRpcs
from service.api.models import ModelRpcs
from service.api.observer import SlotObserver
from service.config import ServerConfig
from service.influence.index import GradientIndex
from service.monitoring.monitor import FeedbackMonitor
from service.serving.batcher import DynamicBatcher
from service.serving.metrics import ServiceMetrics
from service.serving.registry import Activation, ModelRegistry
from service.serving.replication import VersionAnnouncer, VersionFollower
from service.serving.store import SampleStore

log = logging.getLogger("deeprx.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Receiver"].full_name


class ReceiverServicer(InferenceRpcs, ModelRpcs, AdaptationRpcs, pb_grpc.ReceiverServicer):
    """The one ``deeprx.v1.Receiver`` service on the wire, made of its RPC groups (``service/api/``)."""


class ReceiverServer:
    """Everything one serving process owns, started and stopped together."""

    def __init__(self, config: ServerConfig, store_dir: str | Path, model_dir: str | Path | None = None,
                 device: str | None = None):
        self.config = config
        credentials = check_security(config.security)  # bad settings fail before anything starts
        store_dir = Path(store_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        replication = config.replication
        self.registry = ModelRegistry(replication.registry or store_dir / "models", device, config.inference,
                                      config.models.max_scoped)
        if self.registry.active is None:
            if model_dir is None:
                raise ValueError(f"'{store_dir}' holds no active model and no --model was given")
            self.registry.activate(self.registry.import_checkpoint(model_dir, creator="serve --model"))
        self.metrics = ServiceMetrics(CollectorRegistry(), config.monitor.max_contexts)
        self.metrics.model.info({"version": self.registry.active.version})
        self.metrics.show_scopes(self.registry.scopes())
        self.registry.on_activate(self._on_swap)
        self.store = None
        if config.capture.enabled:
            self.store = SampleStore(store_dir / "samples", config.capture.max_samples, config.capture.queue_size,
                                     on_dropped=self.metrics.capture_dropped.inc,
                                     on_written=self.metrics.captured_samples.inc)
            self.metrics.store_samples.set_function(self.store.count)
            self.metrics.store_bytes.set_function(self.store.size_bytes)
        self.monitor = FeedbackMonitor(config.monitor.served_slots_memory, config.monitor.ber_window_slots)
        self.observer = SlotObserver(self.monitor, self.metrics)
        self.batcher = DynamicBatcher(self.metrics, config.batching.max_batch_size,
                                      config.batching.max_queue_delay_ms / 1000, config.limits.max_queued_slots)
        limits = config.limits
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            interceptors=[TokenInterceptor(config.security, self.metrics)],
            options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                     ("grpc.max_send_message_length", limits.max_message_bytes)],
        )
        self.worker = (AdaptationWorker(self.registry, self.store, self.metrics, config.adaptation)
                       if self.store is not None else None)
        self.servicer = ReceiverServicer(config, self.registry, self.batcher, self.store, self.monitor, self.metrics,
                                         self.worker, self.observer)
        pb_grpc.add_ReceiverServicer_to_server(self.servicer, self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc_server)
        self.announcer = VersionAnnouncer(self.registry, replication.publish) if replication.publish else None
        self.follower = VersionFollower(self.registry, replication.follow) if replication.follow else None
        address = f"{config.host}:{config.port}"
        self.port = (self.grpc_server.add_secure_port(address, credentials) if credentials
                     else self.grpc_server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {config.host}:{config.port}")
        self._metrics_http = None
        self.metrics_port = config.metrics_port
        self._stopped = threading.Event()

    def _on_swap(self, activation: Activation) -> None:
        self.metrics.model_swaps.inc()
        if activation.context is not None:
            served = activation.version.version if activation.version else f"{self.registry.active.version} (global)"
            self.metrics.show_scopes(self.registry.scopes())
            log.info("context %s is now served by %s", activation.context, served)
            return
        self.metrics.model.info({"version": activation.version.version})
        if self.worker is not None:
            built_on = GradientIndex(self.worker.index_directory()).model_version()
            self.metrics.influence_index_stale.set(int(built_on is not None and built_on != activation.version.version))
        log.info("global model is now %s", activation.version.version)

    def start(self) -> "ReceiverServer":
        self._metrics_http, _ = start_http_server(self.config.metrics_port, addr=self.config.metrics_host,
                                                  registry=self.metrics.registry)
        self.metrics_port = self._metrics_http.server_port
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d, metrics on %s:%d", self.registry.active.version, self.config.host,
                 self.port, self.config.metrics_host, self.metrics_port)
        log_access(self.config.security)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, finish in-flight RPCs, drain the batcher, flush the store."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if self.worker is not None:
            self.worker.close(timeout=grace)
        self.batcher.close()
        self.observer.close()
        if self.store is not None:
            self.store.close()
        for endpoint in (self.announcer, self.follower):
            if endpoint is not None:
                endpoint.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
