"""The gRPC receiver service: validate -> featurize -> batch -> DeepRx(active version) -> LLRs.

Also: feedback -> per-context BER, model management over the registry, capture to the sample
store, gRPC health and reflection, Prometheus metrics, graceful shutdown.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.scenario import MODULATIONS, NUM_OFDM_SYMBOLS
from service.batcher import BatcherClosed, DynamicBatcher
from service.config import ServerConfig
from service.features import featurize
from service.influence.index import GradientIndex
from service.metrics import ServiceMetrics
from service.adaptation.worker import AdaptationError, AdaptationWorker
from service.monitor import FeedbackMonitor, ServedSlot, TargetRule
from service.pilots import pilot_sinr_db
from service.registry import ModelRegistry, ModelVersion, UnknownVersion
from service.replication import VersionAnnouncer, VersionFollower
from service.slot import ReceivedSlot
from service.store import SampleStore, SlotLabel

log = logging.getLogger("deeprx.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Receiver"].full_name
MAX_ID_LENGTH = 128
_BITS_PER_SYMBOL = set(MODULATIONS.values())


class RequestError(Exception):
    """A request the server refuses; becomes a gRPC status with this code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode_slot(slot: pb.Slot, field: str, expected_rx: int, max_subcarriers: int) -> ReceivedSlot:
    """Validate one Slot message; every error names the offending field."""
    arrival = time.perf_counter()
    if not slot.slot_id or len(slot.slot_id) > MAX_ID_LENGTH:
        raise _invalid(f"{field}.slot_id: must be 1..{MAX_ID_LENGTH} characters")
    if len(slot.context) > MAX_ID_LENGTH:
        raise _invalid(f"{field}.context: longer than {MAX_ID_LENGTH} characters")
    if slot.modulation not in _BITS_PER_SYMBOL:
        raise _invalid(f"{field}.modulation: must be QPSK, QAM16 or QAM64, got {slot.modulation}")
    if not np.isfinite(slot.noise_variance) or slot.noise_variance < 0:
        raise _invalid(f"{field}.noise_variance: must be finite and >= 0")
    limit = expected_rx * NUM_OFDM_SYMBOLS * max_subcarriers * 2
    try:
        grid = codec.decode_complex(slot.grid, f"{field}.grid", 3, limit)
        pilots = codec.decode_complex(slot.pilots, f"{field}.pilots", 2, limit)
        mask = codec.decode(slot.data_mask, f"{field}.data_mask", pb.Tensor.UINT8, 2, limit)
    except codec.TensorError as err:
        raise _invalid(str(err)) from None
    a, s, f = grid.shape
    if a != expected_rx:
        raise _invalid(f"{field}.grid: {a} receive antennas, the active model expects {expected_rx}")
    if s != NUM_OFDM_SYMBOLS or f % 12 or f > max_subcarriers:
        raise _invalid(f"{field}.grid: shape [A, S, F] must have S = 14 and F a multiple of 12 "
                       f"up to {max_subcarriers}, got {[a, s, f]}")
    if pilots.shape != (s, f):
        raise _invalid(f"{field}.pilots: shape {list(pilots.shape)} does not match grid [14, {f}]")
    if mask.shape != (s, f):
        raise _invalid(f"{field}.data_mask: shape {list(mask.shape)} does not match grid [14, {f}]")
    data = mask.astype(bool)
    if not data.any():
        raise _invalid(f"{field}.data_mask: no data REs")
    if not (np.abs(pilots) > 0).any():
        raise _invalid(f"{field}.pilots: no pilot REs")
    return ReceivedSlot(slot.slot_id, slot.context or "default", grid, pilots, data, int(slot.modulation),
                       float(slot.noise_variance), arrival)


def _model_info(registry: ModelRegistry, version: str) -> pb.ModelInfo:
    info = registry.info(version)
    active = registry.active
    return pb.ModelInfo(
        version=version, parent=info.get("parent", ""), creator=info.get("creator", ""),
        created=info.get("created", ""), size=str(info.get("size", "")), parameters=int(info.get("parameters", 0)),
        metrics={k: float(v) for k, v in info.get("metrics", {}).items() if isinstance(v, (int, float))},
        active=active is not None and active.version == version,
    )


class ReceiverServicer(pb_grpc.ReceiverServicer):
    def __init__(self, config: ServerConfig, registry: ModelRegistry, batcher: DynamicBatcher,
                 store: SampleStore | None, monitor: FeedbackMonitor, metrics: ServiceMetrics,
                 worker: AdaptationWorker | None):
        self.config = config
        self.worker = worker
        self.target_rule = TargetRule(config.monitor.target_absolute_ber, config.monitor.target_relative_to_genie,
                                      config.monitor.target_min_slots)
        self.registry = registry
        self.batcher = batcher
        self.store = store
        self.monitor = monitor
        self.metrics = metrics

    # ---------------------------------------------------------------- helpers
    def _reject(self, method: str, err: RequestError, context: grpc.ServicerContext, slots: int = 0):
        self.metrics.requests.labels(method, "error").inc()
        self.metrics.rejected_requests.labels(err.code.name).inc()
        if slots:
            self.metrics.slots.labels("rejected").inc(slots)
        context.abort(err.code, err.message)

    def _active(self) -> ModelVersion:
        version = self.registry.active
        if version is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no active model")
        return version

    def _decode(self, slot: pb.Slot, field: str, version: ModelVersion) -> ReceivedSlot:
        return decode_slot(slot, field, version.model.config.rx, self.config.limits.max_subcarriers)

    def _submit(self, slot: ReceivedSlot, version: ModelVersion):
        features = featurize(torch.from_numpy(slot.grid)[None], torch.from_numpy(slot.pilots)[None])[0]
        try:
            return self.batcher.submit(features, slot.bits_per_symbol, version)
        except BatcherClosed as err:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(err)) from None

    def _finish(self, slot: ReceivedSlot, logits: torch.Tensor, version: ModelVersion,
                return_hard_bits: bool) -> pb.SlotResult:
        """LLRs at the data REs in grid order; remember and capture what was served."""
        k = slot.bits_per_symbol
        llrs = logits[:k].permute(2, 1, 0).numpy()[slot.data_mask]  # [data REs, k]
        hard = (llrs > 0).astype(np.uint8)
        latency = time.perf_counter() - slot.arrival
        self.metrics.slot_latency_seconds.observe(latency)
        self.metrics.slots.labels("ok").inc()
        self.monitor.served(slot.slot_id, ServedSlot(slot.context, version.version, hard))
        expected_ber = float((1.0 / (1.0 + np.exp(np.abs(llrs)))).mean())
        label = self.metrics.context_label(slot.context)
        estimate = self.monitor.record_estimate(label, expected_ber, pilot_sinr_db(slot.grid, slot.pilots))
        self.metrics.context_ber_estimate.labels(label).set(estimate.expected_ber)
        self.metrics.context_pilot_sinr.labels(label).set(estimate.pilot_sinr_db)
        if self.store is not None:
            self.store.capture(slot, version.version)
        return pb.SlotResult(slot_id=slot.slot_id, llrs=codec.encode(llrs),
                             hard_bits=codec.encode(hard) if return_hard_bits else None,
                             model_version=version.version, server_latency_seconds=latency)

    # ---------------------------------------------------------------- inference
    def Detect(self, request: pb.DetectRequest, context: grpc.ServicerContext) -> pb.DetectResponse:
        n = len(request.slots)
        try:
            if n == 0:
                raise _invalid("slots: empty request")
            if n > self.config.limits.max_slots_per_request:
                raise _invalid(f"slots: {n} slots exceed max_slots_per_request "
                               f"({self.config.limits.max_slots_per_request})")
            version = self._active()
            decoded = [self._decode(s, f"slots[{i}]", version) for i, s in enumerate(request.slots)]
            pending = [self._submit(s, version) for s in decoded]
        except RequestError as err:
            self._reject("Detect", err, context, n)
        try:
            results = [self._finish(s, p.result(), version, request.return_hard_bits)
                       for s, p in zip(decoded, pending)]
        except Exception:  # noqa: BLE001
            log.exception("inference failed")
            self.metrics.slots.labels("failed").inc(n)
            self._reject("Detect", RequestError(grpc.StatusCode.INTERNAL, "inference failed"), context)
        self.metrics.requests.labels("Detect", "ok").inc()
        return pb.DetectResponse(results=results)

    def StreamDetect(self, request_iterator, context: grpc.ServicerContext):
        """Results in request order; at most ``stream_window`` slots in flight, then the server stops
        reading the stream and HTTP/2 flow control holds the client back."""
        window: queue.Queue = queue.Queue(maxsize=self.config.limits.stream_window)
        end = object()

        def put(item) -> None:
            while context.is_active():
                try:
                    window.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                for index, request in enumerate(request_iterator):
                    version = self._active()
                    slot = self._decode(request.slot, f"slot (message {index})", version)
                    put((slot, self._submit(slot, version), version, request.return_hard_bits))
                put(end)
            except RequestError as err:
                put(err)
            except Exception as err:  # noqa: BLE001 - a cancelled or broken stream ends the reader
                put(err)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while True:
            item = window.get()
            if item is end:
                break
            if isinstance(item, RequestError):
                self._reject("StreamDetect", item, context, 1)
            if isinstance(item, Exception):
                if context.is_active():
                    log.warning("stream ended: %s", item)
                    self._reject("StreamDetect", RequestError(grpc.StatusCode.INTERNAL, str(item)), context)
                return
            slot, pending, version, hard = item
            yield self._finish(slot, pending.result(), version, hard)
        self.metrics.requests.labels("StreamDetect", "ok").inc()

    # ---------------------------------------------------------------- feedback
    def ReportFeedback(self, request: pb.ReportFeedbackRequest, context: grpc.ServicerContext):
        checked = []
        try:
            for i, item in enumerate(request.feedback):
                field = f"feedback[{i}]"
                served = self.monitor.lookup(item.slot_id)
                kind = item.WhichOneof("label")
                if kind is None:
                    raise _invalid(f"{field}: no label (set genie_bits or transport_block)")
                if served is None:
                    checked.append((item, None, None, "unknown"))
                    continue
                if kind == "transport_block" and not item.transport_block.crc_ok:
                    checked.append((item, served, None, "crc_fail"))
                    continue
                tensor, source = ((item.genie_bits, "genie") if kind == "genie_bits"
                                  else (item.transport_block.coded_bits, "crc"))
                try:
                    bits = codec.decode(tensor, f"{field}.{kind}", pb.Tensor.UINT8, 2, served.hard_bits.size)
                except codec.TensorError as err:
                    raise _invalid(str(err)) from None
                if bits.shape != served.hard_bits.shape:
                    raise _invalid(f"{field}.{kind}: shape {list(bits.shape)} does not match the served slot's "
                                   f"{list(served.hard_bits.shape)}")
                if bits.max() > 1:
                    raise _invalid(f"{field}.{kind}: bits must be 0 or 1")
                checked.append((item, served, bits, source))
        except RequestError as err:
            self._reject("ReportFeedback", err, context)

        response = pb.ReportFeedbackResponse()
        for item, served, bits, source in checked:
            self.metrics.feedback.labels("crc_ok" if source == "crc" else source).inc()
            if bits is None:
                response.unknown_slots += source == "unknown"
                continue
            errors, num_bits = int((bits != served.hard_bits).sum()), int(bits.size)
            label = self.metrics.context_label(served.context)
            genie = item.reference_genie_errors if item.HasField("reference_genie_errors") else None
            window = self.monitor.record(label, errors, num_bits, genie)
            self.metrics.feedback_bits.labels(label).inc(num_bits)
            self.metrics.feedback_bit_errors.labels(label).inc(errors)
            self.metrics.context_ber.labels(label).set(window.ber)
            if self.worker is not None:
                self.worker.observe(served.context, served.model_version, errors, num_bits)
                self.worker.consider(served.context, self.target_rule.is_target(window))
            if self.store is not None:
                self.store.label(SlotLabel(item.slot_id, bits, source, errors, num_bits, genie,
                                           item.reference_ls_lmmse_errors
                                           if item.HasField("reference_ls_lmmse_errors") else None))
            response.accepted += 1
            response.errors.add(slot_id=item.slot_id, context=served.context, bit_errors=errors,
                                num_bits=num_bits, model_version=served.model_version)
        self.metrics.requests.labels("ReportFeedback", "ok").inc()
        return response

    # ---------------------------------------------------------------- models
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        try:
            version = request.version or self._active().version
            info = _model_info(self.registry, version)
        except UnknownVersion:
            self._reject("GetModel", RequestError(grpc.StatusCode.NOT_FOUND, f"version: '{request.version}' "
                                                  "is not in the registry"), context)
        except RequestError as err:
            self._reject("GetModel", err, context)
        self.metrics.requests.labels("GetModel", "ok").inc()
        return info

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        active = self.registry.active
        self.metrics.requests.labels("ListModels", "ok").inc()
        return pb.ListModelsResponse(models=[_model_info(self.registry, v) for v in self.registry.versions()],
                                     active_version=active.version if active else "")

    def ActivateModel(self, request: pb.ActivateModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        try:
            if request.version not in self.registry.versions():
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"version: '{request.version}' is not in the registry")
            current = self._active()
            candidate = self.registry.load(request.version)
            if candidate.model.config.rx != current.model.config.rx:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"version: '{request.version}' expects {candidate.model.config.rx} receive "
                                   f"antennas, the active model {current.model.config.rx}")
            self.registry.activate(request.version)
        except RequestError as err:
            self._reject("ActivateModel", err, context)
        self.metrics.requests.labels("ActivateModel", "ok").inc()
        return _model_info(self.registry, request.version)

    # ---------------------------------------------------------------- targets and adaptation
    def ListTargets(self, request, context) -> pb.ListTargetsResponse:
        rows = []
        for name, window in self.monitor.windows().items():
            genie = window.genie_ber
            estimate = self.monitor.estimate(name)
            rows.append(pb.Target(context=name, ber=window.ber, genie_ber=-1.0 if genie is None else genie,
                                  slots=window.slots, is_target=self.target_rule.is_target(window),
                                  estimated_ber=-1.0 if estimate is None else estimate.expected_ber,
                                  pilot_sinr_db=estimate.pilot_sinr_db if estimate else float("nan")))
        rows.sort(key=lambda t: (not t.is_target, -t.ber))
        self.metrics.targets.set(sum(t.is_target for t in rows))
        self.metrics.requests.labels("ListTargets", "ok").inc()
        return pb.ListTargetsResponse(contexts=rows)

    def _job_message(self, job) -> pb.AdaptationJob:
        return pb.AdaptationJob(
            job_id=job.job_id, state=pb.AdaptationJob.State.Value(job.state), method=job.method,
            context=job.context, progress=job.progress, ber_before=job.ber_before, ber_after=job.ber_after,
            new_version=job.new_version, message=job.message, regression_ber_before=job.regression_ber_before,
            regression_ber_after=job.regression_ber_after, selected_summary=job.selected_summary,
            rolled_back=job.rolled_back)

    def _require_worker(self) -> AdaptationWorker:
        if self.worker is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "adaptation needs sample capture enabled")
        return self.worker

    def TriggerAdaptation(self, request: pb.AdaptationRequest, context) -> pb.AdaptationJob:
        try:
            job = self._require_worker().submit(request.context, list(request.slot_ids), request.method,
                                                dict(request.options))
        except AdaptationError as err:
            self._reject("TriggerAdaptation", _invalid(str(err)), context)
        except RequestError as err:
            self._reject("TriggerAdaptation", err, context)
        self.metrics.requests.labels("TriggerAdaptation", "ok").inc()
        return self._job_message(job)

    def GetAdaptation(self, request: pb.GetAdaptationRequest, context) -> pb.AdaptationJob:
        try:
            job = self._require_worker().get(request.job_id)
            if job is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"job_id: '{request.job_id}' is unknown")
        except RequestError as err:
            self._reject("GetAdaptation", err, context)
        self.metrics.requests.labels("GetAdaptation", "ok").inc()
        return self._job_message(job)

    def ListAdaptations(self, request, context) -> pb.ListAdaptationsResponse:
        try:
            jobs = self._require_worker().jobs()
        except RequestError as err:
            self._reject("ListAdaptations", err, context)
        self.metrics.requests.labels("ListAdaptations", "ok").inc()
        return pb.ListAdaptationsResponse(jobs=[self._job_message(j) for j in jobs])


class ReceiverServer:
    """Everything one serving process owns, started and stopped together."""

    def __init__(self, config: ServerConfig, store_dir: str | Path, model_dir: str | Path | None = None,
                 device: str | None = None):
        self.config = config
        store_dir = Path(store_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        replication = config.replication
        self.registry = ModelRegistry(replication.registry or store_dir / "models", device)
        if self.registry.active is None:
            if model_dir is None:
                raise ValueError(f"'{store_dir}' holds no active model and no --model was given")
            self.registry.activate(self.registry.import_checkpoint(model_dir, creator="serve --model"))
        self.metrics = ServiceMetrics(CollectorRegistry(), config.monitor.max_contexts)
        self.metrics.model.info({"version": self.registry.active.version})
        self.registry.on_activate(self._on_swap)
        self.store = None
        if config.capture.enabled:
            self.store = SampleStore(store_dir / "samples", config.capture.max_samples, config.capture.queue_size,
                                     on_dropped=self.metrics.capture_dropped.inc,
                                     on_written=self.metrics.captured_samples.inc)
            self.metrics.store_samples.set_function(self.store.count)
            self.metrics.store_bytes.set_function(self.store.size_bytes)
        self.monitor = FeedbackMonitor(config.monitor.served_slots_memory, config.monitor.ber_window_slots)
        self.batcher = DynamicBatcher(self.metrics, config.batching.max_batch_size,
                                      config.batching.max_queue_delay_ms / 1000)
        limits = config.limits
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                     ("grpc.max_send_message_length", limits.max_message_bytes)],
        )
        self.worker = (AdaptationWorker(self.registry, self.store, self.metrics, config.adaptation)
                       if self.store is not None else None)
        self.servicer = ReceiverServicer(config, self.registry, self.batcher, self.store, self.monitor, self.metrics,
                                         self.worker)
        pb_grpc.add_ReceiverServicer_to_server(self.servicer, self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc_server)
        self.announcer = VersionAnnouncer(self.registry, replication.publish) if replication.publish else None
        self.follower = VersionFollower(self.registry, replication.follow) if replication.follow else None
        self.port = self.grpc_server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {config.host}:{config.port}")
        self._metrics_http = None
        self.metrics_port = config.metrics_port
        self._stopped = threading.Event()

    def _on_swap(self, version: ModelVersion) -> None:
        self.metrics.model.info({"version": version.version})
        self.metrics.model_swaps.inc()
        if self.worker is not None:
            built_on = GradientIndex(self.worker.index_directory()).model_version()
            self.metrics.influence_index_stale.set(int(built_on is not None and built_on != version.version))
        log.info("active model is now %s", version.version)

    def start(self) -> "ReceiverServer":
        self._metrics_http, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                                  registry=self.metrics.registry)
        self.metrics_port = self._metrics_http.server_port
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d, metrics on :%d", self.registry.active.version, self.config.host,
                 self.port, self.metrics_port)
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
