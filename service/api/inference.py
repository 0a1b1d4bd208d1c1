"""Inference and feedback RPCs: Detect, StreamDetect, ReportFeedback."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np

from proto import codec
from proto import receiver_pb2 as pb
from service.api.base import RpcBase
from service.api.requests import RequestError, check_slot_count, decode_feedback_bits, decode_slot, invalid
from service.monitoring.monitor import ServedSlot
from service.serving.batcher import BatcherClosed, BatcherFull
from service.serving.registry import ModelVersion, Routing
from service.serving.slot import ReceivedSlot
from service.serving.store import SlotLabel

log = logging.getLogger("deeprx.server")


def hard_decisions(llrs: np.ndarray) -> np.ndarray:
    """Bits decided from LLRs (``log P(1)/P(0)``): 1 where positive."""
    return (llrs > 0).astype(np.uint8)


class InferenceRpcs(RpcBase):
    def _decode(self, slot: pb.Slot, field: str, routing: Routing) -> tuple[ReceivedSlot, ModelVersion]:
        """The validated slot and the version that serves its context in ``routing`` (read once per request)."""
        version = routing.version_for(slot.context or "default")
        if version is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no active model")
        return decode_slot(slot, field, version.model.config.rx, self.config.limits.max_subcarriers), version

    def _submit(self, slot: ReceivedSlot, version: ModelVersion, future: asyncio.Future | None = None):
        try:
            return self.batcher.submit(slot, version, future)
        except BatcherClosed as err:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except BatcherFull as err:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from None

    def record_served(self, slots: list[ReceivedSlot], version: ModelVersion, llrs: list[np.ndarray]) -> None:
        """A batch the batcher ran (on its worker, before any result is sent, so feedback always finds
        its slot): remember each slot's hard decisions for feedback, hand the batch to the label-free
        estimates and the slots to capture."""
        for slot, slot_llrs in zip(slots, llrs):
            self.monitor.served(slot.slot_id, ServedSlot(slot.context, version.version, hard_decisions(slot_llrs)))
        self.observer.observe(slots, llrs)
        if self.store is not None:
            for slot in slots:
                self.store.capture(slot, version.version)

    def _finish(self, slot: ReceivedSlot, llrs: np.ndarray, version: ModelVersion,
                return_hard_bits: bool) -> pb.SlotResult:
        """The result message (what was served is recorded per batch: ``record_served``)."""
        latency = time.perf_counter() - slot.arrival
        self.metrics.slot_latency_seconds.observe(latency)
        self.metrics.slots.labels("ok").inc()
        return pb.SlotResult(slot_id=slot.slot_id, llrs=codec.encode(llrs),
                             hard_bits=codec.encode(hard_decisions(llrs)) if return_hard_bits else None,
                             model_version=version.version, server_latency_seconds=latency)

    def Detect(self, request: pb.DetectRequest, context: grpc.ServicerContext) -> pb.DetectResponse:
        n = len(request.slots)
        try:
            check_slot_count(n, self.config.limits.max_slots_per_request)
            routing = self.registry.routing
            decoded = [self._decode(s, f"slots[{i}]", routing) for i, s in enumerate(request.slots)]
            pending = [self._submit(slot, version) for slot, version in decoded]
        except RequestError as err:
            self._reject("Detect", err, context, n)
        try:
            results = [self._finish(slot, p.result(), version, request.return_hard_bits)
                       for (slot, version), p in zip(decoded, pending)]
        except Exception:  # noqa: BLE001
            log.exception("inference failed")
            self.metrics.slots.labels("failed").inc(n)
            self._reject("Detect", RequestError(grpc.StatusCode.INTERNAL, "inference failed"), context)
        self._ok("Detect")
        return pb.DetectResponse(results=results)

    async def StreamDetect(self, request_iterator, context: grpc.aio.ServicerContext):
        """Results in request order; at most ``stream_window`` slots in flight, then the server stops
        reading the stream and HTTP/2 flow control holds the client back. It runs on the server's
        event loop (the other RPCs run on its thread pool): one thread serves every stream, where a
        reader and a handler thread per stream cost about a quarter of the server's CPU per slot
        (1.0 of 4.2 ms) (``docs/operations.md#serving-cpu-budget``)."""
        window: asyncio.Queue = asyncio.Queue(maxsize=self.config.limits.stream_window)
        end = object()

        async def read() -> None:
            loop = asyncio.get_running_loop()
            try:
                index = 0
                async for request in request_iterator:
                    slot, version = self._decode(request.slot, f"slot (message {index})", self.registry.routing)
                    pending = self._submit(slot, version, loop.create_future())
                    await window.put((slot, pending, version, request.return_hard_bits))
                    index += 1
                await window.put(end)
            except Exception as err:  # noqa: BLE001 - a refused slot, or a broken stream
                await window.put(err)

        reader = asyncio.create_task(read())
        try:
            while (item := await window.get()) is not end:
                if isinstance(item, RequestError):
                    await self._reject_async("StreamDetect", item, context, 1)
                if isinstance(item, Exception):
                    log.warning("stream ended: %s", item)
                    await self._reject_async("StreamDetect", RequestError(grpc.StatusCode.INTERNAL, str(item)), context)
                slot, pending, version, hard = item
                try:
                    llrs = await pending
                except Exception:  # noqa: BLE001
                    log.exception("inference failed")
                    self.metrics.slots.labels("failed").inc()
                    await self._reject_async("StreamDetect", RequestError(grpc.StatusCode.INTERNAL, "inference failed"),
                                             context)
                yield self._finish(slot, llrs, version, hard)
        finally:  # the stream ended, failed or was cancelled: stop reading it
            reader.cancel()
        self._ok("StreamDetect")

    def ReportFeedback(self, request: pb.ReportFeedbackRequest, context: grpc.ServicerContext):
        checked = []
        try:
            for i, item in enumerate(request.feedback):
                field = f"feedback[{i}]"
                served = self.monitor.lookup(item.slot_id)
                kind = item.WhichOneof("label")
                if kind is None:
                    raise invalid(f"{field}: no label (set genie_bits or transport_block)")
                if served is None:
                    checked.append((item, None, None, "unknown"))
                elif kind == "transport_block" and not item.transport_block.crc_ok:
                    checked.append((item, served, None, "crc_fail"))
                else:
                    checked.append((item, served, *decode_feedback_bits(item, field, served.hard_bits)))
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
        if response.accepted:
            self.metrics.targets.set(len(self.monitor.targets(self.target_rule)))
        self._ok("ReportFeedback")
        return response
