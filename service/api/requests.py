"""Request validation for every RPC, in one place: each refusal is a gRPC status whose message names
the offending field, never an exception that escapes as INTERNAL."""
from __future__ import annotations

import time
from typing import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from proto import codec
from proto import receiver_pb2 as pb
from schema.scenario import MODULATIONS, NUM_OFDM_SYMBOLS
from service.receiver.classical import PilotLayoutError, check_pilot_layout
from service.serving.slot import ReceivedSlot

MAX_ID_LENGTH = 128
RECEIVER = pb.DESCRIPTOR.services_by_name["Receiver"].full_name
_BITS_PER_SYMBOL = set(MODULATIONS.values())


class RequestError(Exception):
    """A request the server refuses; becomes a gRPC status with this code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parses the Receiver's request messages inside its handlers, so bytes that are no valid message
    end the call with INVALID_ARGUMENT saying so (grpc.aio would answer UNKNOWN and log a traceback).
    Its RPCs are unary or, ``StreamDetect``, streaming both ways on the event loop."""

    def __init__(self, on_refusal: Callable[[str, RequestError], None]):
        self._on_refusal = on_refusal  # counts the refusal: (method, error)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None or service != RECEIVER or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer

        def parse(raw: bytes):
            try:
                return deserialize(raw)
            except DecodeError as err:
                raise invalid(f"the request is not a valid {method} message: {err}") from None

        if handler.request_streaming and handler.response_streaming:
            behaviour = handler.stream_stream

            async def stream(requests, context: grpc.aio.ServicerContext):
                async def parsed():  # a RequestError here is the handler's to answer, like any refused slot
                    async for raw in requests:
                        yield parse(raw)

                async for response in behaviour(parsed(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream, None, handler.response_serializer)
        if not handler.request_streaming and not handler.response_streaming:
            behaviour = handler.unary_unary

            def unary(raw: bytes, context: grpc.ServicerContext):
                try:
                    request = parse(raw)
                except RequestError as err:
                    self._on_refusal(method, err)
                    context.abort(err.code, err.message)
                return behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
        return handler


def decode_slot(slot: pb.Slot, field: str, expected_rx: int, max_subcarriers: int) -> ReceivedSlot:
    """Validate one Slot message; every error names the offending field."""
    arrival = time.perf_counter()
    if not slot.slot_id or len(slot.slot_id) > MAX_ID_LENGTH:
        raise invalid(f"{field}.slot_id: must be 1..{MAX_ID_LENGTH} characters")
    if len(slot.context) > MAX_ID_LENGTH:
        raise invalid(f"{field}.context: longer than {MAX_ID_LENGTH} characters")
    if slot.modulation not in _BITS_PER_SYMBOL:
        raise invalid(f"{field}.modulation: must be QPSK, QAM16 or QAM64, got {slot.modulation}")
    if not np.isfinite(slot.noise_variance) or slot.noise_variance < 0:
        raise invalid(f"{field}.noise_variance: must be finite and >= 0")
    limit = expected_rx * NUM_OFDM_SYMBOLS * max_subcarriers * 2
    try:
        grid = codec.decode_complex(slot.grid, f"{field}.grid", 3, limit)
        pilots = codec.decode_complex(slot.pilots, f"{field}.pilots", 2, limit)
        mask = codec.decode(slot.data_mask, f"{field}.data_mask", pb.Tensor.UINT8, 2, limit)
    except codec.TensorError as err:
        raise invalid(str(err)) from None
    a, s, f = grid.shape
    if a != expected_rx:
        raise invalid(f"{field}.grid: {a} receive antennas, the active model expects {expected_rx}")
    if s != NUM_OFDM_SYMBOLS or f % 12 or f > max_subcarriers:
        raise invalid(f"{field}.grid: shape [A, S, F] must have S = 14 and F a multiple of 12 "
                      f"up to {max_subcarriers}, got {[a, s, f]}")
    if pilots.shape != (s, f):
        raise invalid(f"{field}.pilots: shape {list(pilots.shape)} does not match grid [14, {f}]")
    if mask.shape != (s, f):
        raise invalid(f"{field}.data_mask: shape {list(mask.shape)} does not match grid [14, {f}]")
    data = mask.astype(bool)
    if not data.any():
        raise invalid(f"{field}.data_mask: no data REs")
    if not pilots.any():
        raise invalid(f"{field}.pilots: no pilot REs")
    try:
        dmrs_position = check_pilot_layout(pilots)
    except PilotLayoutError as err:
        raise invalid(f"{field}.pilots: {err}") from None
    return ReceivedSlot(slot.slot_id, slot.context or "default", grid, pilots, data, int(slot.modulation),
                        float(slot.noise_variance), dmrs_position, arrival)


def check_context(context: str, field: str) -> None:
    if not context or len(context) > MAX_ID_LENGTH:
        raise invalid(f"{field}: must be 1..{MAX_ID_LENGTH} characters")


def check_slot_count(count: int, limit: int) -> None:
    if count == 0:
        raise invalid("slots: empty request")
    if count > limit:
        raise invalid(f"slots: {count} slots exceed max_slots_per_request ({limit})")


def decode_feedback_bits(item: pb.Feedback, field: str, served_bits: np.ndarray) -> tuple[np.ndarray, str]:
    """The labelled coded bits of one feedback item and their source ('genie' or 'crc'), checked
    against the hard decisions served for that slot. A CRC failure carries no bits: not for here."""
    kind = item.WhichOneof("label")
    tensor, source = ((item.genie_bits, "genie") if kind == "genie_bits"
                      else (item.transport_block.coded_bits, "crc"))
    try:
        bits = codec.decode(tensor, f"{field}.{kind}", pb.Tensor.UINT8, 2, served_bits.size)
    except codec.TensorError as err:
        raise invalid(str(err)) from None
    if bits.shape != served_bits.shape:
        raise invalid(f"{field}.{kind}: shape {list(bits.shape)} does not match the served slot's "
                      f"{list(served_bits.shape)}")
    if bits.max() > 1:
        raise invalid(f"{field}.{kind}: bits must be 0 or 1")
    return bits, source
