"""The gRPC receiver service, composed: registry, batcher, store, monitor, metrics and the adaptation
worker, behind one servicer made of the RPC groups in ``service/api/`` (inference and feedback;
models; targets and adaptation), plus gRPC health and reflection and graceful shutdown.

The gRPC server is asyncio's (``grpc.aio``) on an event loop thread of its own: ``StreamDetect``, the
hot path, runs on that loop, one thread for every stream; the other RPCs are plain functions that
the server runs on its thread pool (``limits.workers`` threads).

A slot's path: validate -> featurize -> batch -> DeepRx(active version) -> LLRs.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
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
from service.api.requests import MalformedRequestInterceptor
from service.config import ServerConfig
from service.influence.index import GradientIndex
from service.monitoring.monitor import FeedbackMonitor
from service.serving.backend import OnnxFeaturizer, resolve
from service.serving.batcher import DynamicBatcher
from service.serving.metrics import ServiceMetrics
from service.serving.registry import Activation, ModelRegistry
from service.serving.replication import VersionAnnouncer, VersionFollower
from service.serving.store import SampleStore
from service.serving.threads import serve_single_threaded

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
        # torch runs single-threaded in every server thread but the two whose torch work is heavy:
        # the adaptation jobs' (adaptation.threads) and, for eager PyTorch on the CPU, the batcher's
        self._torch_threads_before = serve_single_threaded()
        backend = resolve(config.inference, torch.device(device))
        eager_cpu = device == "cpu" and backend == "torch"
        onnx_cpu = device == "cpu" and backend == "onnxruntime"  # the featurizer runs in ONNX Runtime too
        replication = config.replication
        inference = config.inference.for_workers(config.batching.workers)  # each batcher worker's share
        self.registry = ModelRegistry(replication.registry or store_dir / "models", device, inference,
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
                                      config.batching.max_queue_delay_ms / 1000, config.limits.max_queued_slots,
                                      torch_threads=inference.threads if eager_cpu else 1,
                                      workers=config.batching.workers,
                                      # the servicer is built next; no batch runs before it exists
                                      on_batch=lambda *batch: self.servicer.record_served(*batch),
                                      featurizer=OnnxFeaturizer(config.inference) if onnx_cpu else None)
        self.worker = (AdaptationWorker(self.registry, self.store, self.metrics, config.adaptation)
                       if self.store is not None else None)
        self.servicer = ReceiverServicer(config, self.registry, self.batcher, self.store, self.monitor, self.metrics,
                                         self.worker, self.observer)
        self.announcer = VersionAnnouncer(self.registry, replication.publish) if replication.publish else None
        self.follower = VersionFollower(self.registry, replication.follow) if replication.follow else None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        try:
            self.grpc_server, self.port = self._on_loop(self._build_grpc_server(credentials))
        except BaseException:
            self._close_loop()
            raise
        self._metrics_http = None
        self.metrics_port = config.metrics_port
        self._stopped = threading.Event()

    def _on_loop(self, coroutine):
        """Run ``coroutine`` on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build_grpc_server(self, credentials: grpc.ServerCredentials | None) -> tuple[grpc.aio.Server, int]:
        limits = self.config.limits
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            interceptors=[TokenInterceptor(self.config.security, self.metrics),
                          MalformedRequestInterceptor(self.servicer.count_rejection)],
            options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                     ("grpc.max_send_message_length", limits.max_message_bytes)],
        )
        pb_grpc.add_ReceiverServicer_to_server(self.servicer, server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC port {self.config.host}:{self.config.port}")
        return server, port

    async def _start_grpc(self) -> None:
        await self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _stop_grpc(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()

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
        self._on_loop(self._start_grpc())
        log.info("serving %s on %s:%d, metrics on %s:%d", self.registry.active.version, self.config.host,
                 self.port, self.config.metrics_host, self.metrics_port)
        log_access(self.config.security)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, finish in-flight RPCs, drain the batcher, flush the store."""
        if self._stopped.is_set():
            return
        self._on_loop(self._stop_grpc(grace))
        self._close_loop()
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
        torch.set_num_threads(self._torch_threads_before)
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
