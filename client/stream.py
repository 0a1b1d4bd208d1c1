"""Streaming simulated slots to a receiver service and measuring what comes back."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Coroutine

import grpc
import numpy as np

from client.connection import Endpoint
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import SlotBatch


def slot_message(slots: SlotBatch, row: int, slot_id: str, context: str) -> pb.Slot:
    """Row ``row`` of a dataset as a wire Slot (noise variance from the simulated SNR)."""
    return pb.Slot(
        slot_id=slot_id, context=context,
        grid=codec.encode_complex(slots.y[row]), pilots=codec.encode_complex(slots.pilots[row]),
        data_mask=codec.encode(slots.data_mask[row].astype(np.uint8)),
        modulation=int(slots.bits_per_symbol[row]),
        noise_variance=float(10 ** (-slots.snr_db[row] / 10)),
    )


def data_bits(slots: SlotBatch, row: int) -> np.ndarray:
    """The coded bits of a slot in the service's LLR layout: [data REs in grid order, bits per symbol]."""
    return slots.bits[row][slots.data_mask[row], : int(slots.bits_per_symbol[row])]


@dataclass
class StreamReport:
    """What one streaming run measured."""

    slots: int = 0
    bit_errors: int = 0
    num_bits: int = 0
    latencies: list[float] = field(default_factory=list)  # client round trip per slot, seconds
    server_latencies: list[float] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU while the slots streamed (scoring them afterwards excluded)
    failures: int = 0

    @property
    def ber(self) -> float:
        return self.bit_errors / max(1, self.num_bits)

    def percentile_ms(self, q: float, server: bool = False) -> float:
        values = self.server_latencies if server else self.latencies
        return float(np.percentile(values, q) * 1000) if values else float("nan")


@contextlib.asynccontextmanager
async def writing(call: grpc.aio.StreamStreamCall, sender: Coroutine) -> AsyncIterator[None]:
    """Run ``sender`` (the coroutine that writes ``call``'s requests) while the block reads its
    responses. A sender that fails on its own cancels the call, so the reader does not wait for
    answers to requests never sent, and its error is raised when the block ends; a write that failed
    because the call ended is not the sender's error: the reader gets the call's status."""
    task = asyncio.create_task(sender)
    task.add_done_callback(lambda done: done.cancelled() or done.exception() is None or call.cancel())
    try:
        yield
    finally:
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception) and not isinstance(outcome, (grpc.RpcError, asyncio.InvalidStateError)):
            raise outcome


def stream_slots(endpoint: Endpoint | str, slots: SlotBatch, context: str, streams: int = 1, rate: float = 0.0,
                 prefix: str = "slot", window: int = 8,
                 on_result: Callable[[pb.SlotResult], None] | None = None,
                 ) -> tuple[StreamReport, dict[str, pb.SlotResult]]:
    """Send every slot over ``streams`` concurrent StreamDetect calls (slot i on stream i % streams),
    pacing to ``rate`` slots/s in total when > 0, with at most ``window`` slots in flight per stream
    (a closed loop, so latency is service time rather than queue depth).

    ``endpoint``: an :class:`Endpoint` or a plaintext address. Every stream runs on one asyncio event
    loop in the calling thread (grpc's threaded streams took a sender and a reader thread per stream
    and twice the client CPU per slot); call it from code that is not itself running an event loop.
    A stream that fails ends on its own; the first failure is raised once every stream has ended.
    Returns the report and the results by slot id."""
    endpoint = Endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    report = StreamReport()
    results: dict[str, pb.SlotResult] = {}
    start, cpu_start = time.perf_counter(), time.process_time()

    async def run(stream_index: int, stub: pb_grpc.ReceiverStub) -> None:
        call = stub.StreamDetect(metadata=endpoint.metadata)
        sent: dict[str, float] = {}
        room = asyncio.Semaphore(window)

        async def send() -> None:
            for n, row in enumerate(range(stream_index, len(slots), streams)):
                await room.acquire()
                if rate > 0:
                    await asyncio.sleep(max(0.0, start + (n * streams + stream_index) / rate - time.perf_counter()))
                slot_id = f"{prefix}-{row}"
                sent[slot_id] = time.perf_counter()
                await call.write(pb.StreamDetectRequest(slot=slot_message(slots, row, slot_id, context)))
            await call.done_writing()

        async with writing(call, send()):
            async for result in call:
                room.release()
                report.latencies.append(time.perf_counter() - sent[result.slot_id])
                report.server_latencies.append(result.server_latency_seconds)
                report.versions[result.model_version] = report.versions.get(result.model_version, 0) + 1
                results[result.slot_id] = result
                if on_result is not None:
                    on_result(result)

    async def run_all() -> list:
        async with endpoint.aio_channel() as channel:
            stub = pb_grpc.ReceiverStub(channel)
            return await asyncio.gather(*(run(i, stub) for i in range(streams)), return_exceptions=True)

    outcomes = asyncio.run(run_all())
    report.seconds = time.perf_counter() - start
    report.cpu_seconds = time.process_time() - cpu_start
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    report.failures = sum(isinstance(failure, grpc.RpcError) for failure in failures)
    if failures:
        bugs = [failure for failure in failures if not isinstance(failure, grpc.RpcError)]
        raise (bugs or failures)[0]
    for row in range(len(slots)):
        result = results[f"{prefix}-{row}"]
        hard = codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**8) > 0
        truth = data_bits(slots, row)
        report.bit_errors += int((hard != truth).sum())
        report.num_bits += int(truth.size)
    report.slots = len(results)
    return report, results


def genie_feedback(slots: SlotBatch, row: int, slot_id: str) -> pb.Feedback:
    """Row ``row``'s true coded bits (and the baselines' errors) as feedback for ``slot_id``."""
    return pb.Feedback(slot_id=slot_id, genie_bits=codec.encode(data_bits(slots, row)),
                       reference_genie_errors=int(slots.genie_errors[row]),
                       reference_ls_lmmse_errors=int(slots.ls_lmmse_errors[row]))


def send_genie_feedback(channel: grpc.Channel, slots: SlotBatch, prefix: str = "slot",
                        chunk: int = 64) -> pb.ReportFeedbackResponse:
    """Report every slot's true coded bits (and the baselines' errors) to the service."""
    items = [genie_feedback(slots, row, f"{prefix}-{row}") for row in range(len(slots))]
    return report_feedback(channel, items, chunk)


def report_feedback(channel: grpc.Channel, items: list[pb.Feedback], chunk: int = 64) -> pb.ReportFeedbackResponse:
    """Send feedback ``chunk`` items per request; one response summing them all."""
    stub = pb_grpc.ReceiverStub(channel)
    total = pb.ReportFeedbackResponse()
    for start in range(0, len(items), chunk):
        response = stub.ReportFeedback(pb.ReportFeedbackRequest(feedback=items[start:start + chunk]))
        total.accepted += response.accepted
        total.unknown_slots += response.unknown_slots
        total.errors.extend(response.errors)
    return total


def send_crc_feedback(channel: grpc.Channel, slots: SlotBatch, results: dict[str, pb.SlotResult], scs_khz: int,
                      prefix: str = "slot", chunk: int = 64) -> tuple[pb.ReportFeedbackResponse, int]:
    """Decode every served slot's LLRs as a transport block and report the CRC result, with the
    re-encoded coded bits when it passed (no genie involved). Returns the response and CRC passes."""
    from client.transport import coder_for

    prb = slots.y.shape[-1] // 12
    items: list[pb.Feedback] = []
    passed = 0
    groups: dict[tuple[int, int], list[int]] = {}
    for row in range(len(slots)):
        key = (int(slots.dmrs_additional_position[row]), int(slots.bits_per_symbol[row]))
        groups.setdefault(key, []).append(row)
    for (dmrs, k), rows in groups.items():
        llrs = np.stack([codec.decode(results[f"{prefix}-{row}"].llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**8)
                         for row in rows])
        crc_ok, coded = coder_for(prb, scs_khz, dmrs, k).decode(llrs)
        for i, row in enumerate(rows):
            block = pb.TransportBlockResult(crc_ok=bool(crc_ok[i]),
                                            coded_bits=codec.encode(coded[i]) if crc_ok[i] else None)
            items.append(pb.Feedback(slot_id=f"{prefix}-{row}", transport_block=block))
        passed += int(crc_ok.sum())
    return report_feedback(channel, items, chunk), passed
