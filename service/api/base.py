"""What every RPC group shares: the server's parts, and turning a refusal into a gRPC status."""
from __future__ import annotations

import grpc

from service.adaptation.worker import AdaptationWorker
from service.api.observer import SlotObserver
from service.api.requests import RequestError
from service.config import ServerConfig
from service.monitoring.monitor import FeedbackMonitor, TargetRule
from service.serving.batcher import DynamicBatcher
from service.serving.metrics import ServiceMetrics
from service.serving.registry import ModelRegistry, ModelVersion
from service.serving.store import SampleStore


class RpcBase:
    """The parts one server hands its RPC groups (``InferenceRpcs``, ``ModelRpcs``, ``AdaptationRpcs``)."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry, batcher: DynamicBatcher,
                 store: SampleStore | None, monitor: FeedbackMonitor, metrics: ServiceMetrics,
                 worker: AdaptationWorker | None, observer: SlotObserver):
        self.config = config
        self.registry = registry
        self.batcher = batcher
        self.store = store
        self.monitor = monitor
        self.metrics = metrics
        self.worker = worker
        self.observer = observer
        self.target_rule = TargetRule(config.monitor.target_absolute_ber, config.monitor.target_relative_to_genie,
                                      config.monitor.target_min_slots)

    def count_rejection(self, method: str, err: RequestError, slots: int = 0) -> None:
        self.metrics.requests.labels(method, "error").inc()
        self.metrics.rejected_requests.labels(err.code.name).inc()
        if slots:
            self.metrics.slots.labels("rejected").inc(slots)

    def _reject(self, method: str, err: RequestError, context: grpc.ServicerContext, slots: int = 0):
        """Count the refusal and end the RPC with its status (``context.abort`` raises)."""
        self.count_rejection(method, err, slots)
        context.abort(err.code, err.message)

    async def _reject_async(self, method: str, err: RequestError, context: grpc.aio.ServicerContext,
                            slots: int = 0):
        """``_reject`` for the asyncio handlers (``StreamDetect``): their ``abort`` is awaited."""
        self.count_rejection(method, err, slots)
        await context.abort(err.code, err.message)

    def _ok(self, method: str) -> None:
        self.metrics.requests.labels(method, "ok").inc()

    def _active(self) -> ModelVersion:
        version = self.registry.active
        if version is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no active model")
        return version
