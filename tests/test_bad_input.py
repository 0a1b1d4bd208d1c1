"""Malformed requests get a status code naming the field, and the server keeps serving."""
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.stream import slot_message, stream_slots
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from tests.conftest import address_of

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def good_slot(train_mix_file) -> pb.Slot:
    slots, _ = read_slots(train_mix_file)
    return slot_message(slots, 0, "good-0", "ctx")


def _mutated(slot: pb.Slot, mutate) -> pb.Slot:
    copy = pb.Slot()
    copy.CopyFrom(slot)
    mutate(copy)
    return copy


def _nan_grid(s):
    a = np.frombuffer(s.grid.data, np.float32).copy()
    a[5] = np.nan
    s.grid.data = a.tobytes()


def _inf_pilots(s):
    a = np.frombuffer(s.pilots.data, np.float32).copy()
    a[0] = np.inf
    s.pilots.data = a.tobytes()


CASES = {
    "empty slot id": (lambda s: setattr(s, "slot_id", ""), "slot_id"),
    "grid wrong dtype": (lambda s: setattr(s.grid, "dtype", pb.Tensor.UINT8), "grid: dtype"),
    "grid unset dtype": (lambda s: setattr(s.grid, "dtype", 0), "grid: dtype"),
    "grid wrong rank": (lambda s: s.grid.shape.pop(), "grid: expected 4 dimensions"),
    "grid bytes mismatch": (lambda s: setattr(s.grid, "data", s.grid.data[:-4]), "grid: "),
    "grid empty": (lambda s: (s.grid.ClearField("shape"), s.grid.shape.extend([2, 14, 0, 2]),
                              setattr(s.grid, "data", b"")), "grid: empty"),
    "grid NaN": (_nan_grid, "grid: contains NaN"),
    "pilots Inf": (_inf_pilots, "pilots: contains NaN"),
    "grid 3 antennas": (lambda s: (s.grid.ClearField("shape"), s.grid.shape.extend([3, 14, 16, 2]),
                                   setattr(s.grid, "data", bytes(3 * 14 * 16 * 2 * 4))), "receive antennas"),
    "grid 13 symbols": (lambda s: (s.grid.ClearField("shape"), s.grid.shape.extend([2, 13, 48, 2]),
                                   setattr(s.grid, "data", bytes(2 * 13 * 48 * 2 * 4))), "grid: shape"),
    "pilots shape mismatch": (lambda s: (s.pilots.ClearField("shape"), s.pilots.shape.extend([14, 24, 2]),
                                         setattr(s.pilots, "data", bytes(14 * 24 * 2 * 4))), "pilots: shape"),
    "data mask missing": (lambda s: s.ClearField("data_mask"), "data_mask"),
    "data mask all zero": (lambda s: setattr(s.data_mask, "data", bytes(len(s.data_mask.data))), "data_mask: no data"),
    "unknown modulation": (lambda s: setattr(s, "modulation", 3), "modulation"),
    "unset modulation": (lambda s: setattr(s, "modulation", 0), "modulation"),
    "negative noise": (lambda s: setattr(s, "noise_variance", -1.0), "noise_variance"),
    "NaN noise": (lambda s: setattr(s, "noise_variance", float("nan")), "noise_variance"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_slot_is_invalid_argument_naming_the_field(channel, good_slot, name):
    mutate, expected = CASES[name]
    stub = pb_grpc.ReceiverStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(pb.DetectRequest(slots=[good_slot, _mutated(good_slot, mutate)]))
    assert err.value.code() == INVALID
    assert "slots[1]" in err.value.details() and expected in err.value.details()
    assert len(stub.Detect(pb.DetectRequest(slots=[good_slot])).results) == 1, "still serving"


def test_malformed_slot_in_a_stream_ends_that_stream_only(channel, good_slot):
    stub = pb_grpc.ReceiverStub(channel)
    bad = _mutated(good_slot, lambda s: setattr(s, "modulation", 5))
    requests = [pb.StreamDetectRequest(slot=_mutated(good_slot, lambda s, i=i: setattr(s, "slot_id", f"s{i}")))
                for i in range(3)] + [pb.StreamDetectRequest(slot=bad)]
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for result in stub.StreamDetect(iter(requests)):
            received.append(result.slot_id)
    assert err.value.code() == INVALID and "modulation" in err.value.details()
    assert received == ["s0", "s1", "s2"]
    assert len(list(stub.StreamDetect(iter(requests[:2])))) == 2


CORRUPT = b"\x0a\xff\xff\xff"  # field 1, a length past the end: no protobuf message parses


def test_bytes_that_are_no_message_are_invalid_argument(channel, good_slot):
    stub = pb_grpc.ReceiverStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/deeprx.v1.Receiver/Detect")(CORRUPT, timeout=10)
    assert err.value.code() == INVALID and "not a valid Detect message" in err.value.details()
    good = pb.StreamDetectRequest(slot=good_slot).SerializeToString()
    raw_stream = channel.stream_stream("/deeprx.v1.Receiver/StreamDetect")
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for result in raw_stream(iter([good, CORRUPT]), timeout=10):
            received.append(pb.SlotResult.FromString(result).slot_id)
    assert err.value.code() == INVALID and "not a valid StreamDetect message" in err.value.details()
    assert received == ["good-0"]
    assert len(stub.Detect(pb.DetectRequest(slots=[good_slot])).results) == 1, "still serving"


def test_empty_and_too_many_slots(channel, good_slot, server):
    stub = pb_grpc.ReceiverStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(pb.DetectRequest())
    assert err.value.code() == INVALID and "slots: empty" in err.value.details()
    limit = server.config.limits.max_slots_per_request
    with pytest.raises(grpc.RpcError) as err:
        stub.Detect(pb.DetectRequest(slots=[good_slot] * (limit + 1)))
    assert err.value.code() == INVALID and "max_slots_per_request" in err.value.details()


def test_oversize_message_is_resource_exhausted(tmp_path, tiny_checkpoint, good_slot):
    from service.config import ServerConfig
    from service.server import ReceiverServer

    config = ServerConfig(port=0, metrics_port=0)
    config.limits.max_message_bytes = 256 * 1024
    server = ReceiverServer(config, tmp_path / "store", tiny_checkpoint).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ReceiverStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Detect(pb.DetectRequest(slots=[good_slot] * 64))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stub.Detect(pb.DetectRequest(slots=[good_slot])).results) == 1
    finally:
        server.stop(grace=1)


def test_a_stream_the_server_ends_leaves_no_client_thread_waiting(tmp_path, tiny_checkpoint, train_mix_file):
    """When the server ends a stream with an error, the client's sender stops instead of waiting for
    room that no result will make, and the status reaches the caller: a long-running client leaks
    nothing per failed stream."""
    from service.config import ServerConfig
    from service.server import ReceiverServer

    config = ServerConfig(port=0, metrics_port=0)
    config.limits.max_message_bytes = 1024  # every slot is larger: the first one ends the stream
    server = ReceiverServer(config, tmp_path / "store", tiny_checkpoint).start()
    slots, _ = read_slots(train_mix_file)
    try:
        before = threading.active_count()
        with pytest.raises(grpc.RpcError) as err:
            stream_slots(address_of(server), slots.select(slice(0, 16)), "too-big", window=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before, [t.name for t in threading.enumerate()]
    finally:
        server.stop(grace=1)


def test_a_client_that_fails_to_send_raises_instead_of_waiting(server, train_mix_file, monkeypatch):
    """A sender that fails on its own (here: a slot it cannot encode) ends its call, so the caller gets
    the error instead of a reader waiting forever for answers to slots never sent."""
    import client.stream

    encode = client.stream.slot_message

    def fails_on_row_2(slots, row, slot_id, context):
        if row == 2:
            raise ValueError("cannot encode row 2")
        return encode(slots, row, slot_id, context)

    monkeypatch.setattr(client.stream, "slot_message", fails_on_row_2)
    slots, _ = read_slots(train_mix_file, slice(0, 8))
    with pytest.raises(ValueError, match="cannot encode row 2"):
        stream_slots(address_of(server), slots, "unencodable", streams=2)


def test_feedback_errors_name_the_field(channel, good_slot):
    stub = pb_grpc.ReceiverStub(channel)
    stub.Detect(pb.DetectRequest(slots=[good_slot]))
    n_data = int(np.frombuffer(good_slot.data_mask.data, np.uint8).sum())
    cases = [
        (pb.Feedback(slot_id="good-0"), "no label"),
        (pb.Feedback(slot_id="good-0", genie_bits=codec.encode(np.zeros((3, 4), np.uint8))), "does not match"),
        (pb.Feedback(slot_id="good-0", genie_bits=codec.encode(np.full((n_data, 4), 2, np.uint8))), "0 or 1"),
        (pb.Feedback(slot_id="good-0", genie_bits=codec.encode(np.zeros((n_data, 4), np.float32))), "dtype"),
    ]
    for feedback, expected in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportFeedback(pb.ReportFeedbackRequest(feedback=[feedback]))
        assert err.value.code() == INVALID and "feedback[0]" in err.value.details()
        assert expected in err.value.details()
    unknown = stub.ReportFeedback(pb.ReportFeedbackRequest(feedback=[
        pb.Feedback(slot_id="never-served", genie_bits=codec.encode(np.zeros((n_data, 4), np.uint8)))]))
    assert unknown.unknown_slots == 1 and unknown.accepted == 0


_tensor = st.builds(
    pb.Tensor,
    dtype=st.integers(-1, 4),
    shape=st.lists(st.integers(-3, 60), max_size=5),
    data=st.binary(max_size=2048),
)
_slot = st.builds(
    pb.Slot,
    slot_id=st.text(max_size=140),
    context=st.text(max_size=140),
    grid=_tensor, pilots=_tensor, data_mask=_tensor,
    modulation=st.integers(-2, 8),
    noise_variance=st.floats(allow_nan=True, allow_infinity=True, width=32),
)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(slots=st.lists(_slot, min_size=0, max_size=3), raw=st.binary(max_size=64))
def test_fuzzed_requests_never_break_the_server(fuzz_stub, slots, raw):
    stub, good = fuzz_stub
    try:
        stub.Detect(pb.DetectRequest(slots=slots), timeout=10)
    except grpc.RpcError as err:
        assert err.code() in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED), (err.code(), err.details())
    # raw bytes that may not even parse as a DetectRequest
    raw_call = stub._channel.unary_unary("/deeprx.v1.Receiver/Detect")
    try:
        raw_call(raw, timeout=10)
    except grpc.RpcError as err:
        assert err.code() == INVALID, (err.code(), err.details())


@pytest.fixture(scope="module")
def fuzz_stub(tmp_path_factory, tiny_checkpoint, good_slot):
    from service.config import ServerConfig
    from service.server import ReceiverServer

    server = ReceiverServer(ServerConfig(port=0, metrics_port=0), tmp_path_factory.mktemp("fuzz"),
                            tiny_checkpoint).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ReceiverStub(channel)
    stub._channel = channel
    yield stub, good_slot
    assert len(stub.Detect(pb.DetectRequest(slots=[good_slot])).results) == 1, "serving after the fuzz"
    channel.close()
    server.stop(grace=1)
