"""The receiver service end to end on 127.0.0.1: streaming, feedback, metrics, models, health."""
import json
import re
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.cli import main as client_main
from client.stream import data_bits, genie_feedback, report_feedback, send_genie_feedback, slot_message, stream_slots
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.receiver.checkpoint import load_checkpoint
from service.receiver.evaluate import evaluate
from tests.conftest import address_of, scrape

NAMED_SERIES = ("deeprx_requests_total", "deeprx_slots_total", "deeprx_inference_seconds_bucket",
                "deeprx_featurize_seconds_bucket", "deeprx_queue_delay_seconds_bucket", "deeprx_batch_size_bucket", "deeprx_model_info",
                "deeprx_model_swaps_total", "deeprx_captured_samples_total", "deeprx_capture_dropped_samples_total",
                "deeprx_context_ber", "deeprx_store_samples", "deeprx_store_bytes", "deeprx_slot_latency_seconds_bucket")


def _sample(text: str, name: str) -> float:
    """The value of the unlabelled series ``name`` in a /metrics page."""
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def test_streamed_ber_matches_offline_eval_and_feedback_shows_in_metrics(server, channel, train_mix_file,
                                                                         tiny_checkpoint):
    slots, _ = read_slots(train_mix_file)
    report, results = stream_slots(address_of(server), slots, context="cell-7", streams=3)
    assert report.slots == len(slots) and report.failures == 0
    assert set(report.versions) == {"v1"}

    offline = evaluate(load_checkpoint(tiny_checkpoint).model, slots).ber()["deeprx"]
    assert report.ber == pytest.approx(offline, abs=2e-4), "served LLRs are the offline model's"

    feedback = send_genie_feedback(channel, slots)
    assert feedback.accepted == len(slots) and feedback.unknown_slots == 0
    assert sum(e.bit_errors for e in feedback.errors) == report.bit_errors

    server.store.flush()
    text = scrape(server.metrics_port)
    for name in NAMED_SERIES:
        assert re.search(rf"^{name}", text, re.M), f"{name} missing from /metrics"
    ber = float(re.search(r'^deeprx_context_ber\{context="cell-7"\} (\S+)', text, re.M).group(1))
    assert ber == pytest.approx(report.bit_errors / report.num_bits, rel=1e-6) and ber > 0
    assert re.search(r'^deeprx_slots_total\{outcome="ok"\} 64\.0', text, re.M)
    featurized, inferred = (_sample(text, f"deeprx_{stage}_seconds_count") for stage in ("featurize", "inference"))
    assert featurized == inferred > 0, "one observation of each per batch"
    assert 0 < _sample(text, "deeprx_featurize_seconds_sum") < _sample(text, "deeprx_inference_seconds_sum")
    assert server.store.count(labelled_only=True) == len(slots)


def test_feedback_sent_the_moment_a_result_arrives_finds_its_slot(server, channel, train_mix_file):
    """What was served is recorded per batch before any of the batch's results is sent, so a client
    that reports feedback as soon as it reads a result is never told the slot is unknown, and the
    errors counted are those of the LLRs it received."""
    slots, _ = read_slots(train_mix_file)
    stub = pb_grpc.ReceiverStub(channel)
    requests = (pb.StreamDetectRequest(slot=slot_message(slots, row, f"prompt-{row}", "prompt"))
                for row in range(16))
    for row, result in enumerate(stub.StreamDetect(requests)):
        response = report_feedback(channel, [genie_feedback(slots, row, result.slot_id)])
        assert (response.accepted, response.unknown_slots) == (1, 0), result.slot_id
        hard = codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**6) > 0
        assert response.errors[0].bit_errors == int((hard != data_bits(slots, row)).sum())


def test_stored_labelled_slots_read_back_as_a_pool(server, channel, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    subset = slots.select(slice(0, 8))
    stream_slots(address_of(server), subset, context="pool")
    send_genie_feedback(channel, subset)
    server.store.flush()
    pool, ids = server.store.labelled(context="pool")
    assert ids == [f"slot-{i}" for i in range(8)]
    np.testing.assert_array_equal(pool.y, subset.y)
    np.testing.assert_array_equal(pool.bits, subset.bits)
    np.testing.assert_array_equal(pool.dmrs_additional_position, subset.dmrs_additional_position)
    np.testing.assert_allclose(pool.snr_db, subset.snr_db, atol=1e-3)


def test_unary_detect_returns_llrs_in_grid_order_and_hard_bits(channel, train_mix_file, tiny_checkpoint):
    slots, _ = read_slots(train_mix_file)
    stub = pb_grpc.ReceiverStub(channel)
    response = stub.Detect(pb.DetectRequest(slots=[slot_message(slots, i, f"u-{i}", "c") for i in range(4)],
                                            return_hard_bits=True))
    assert [r.slot_id for r in response.results] == [f"u-{i}" for i in range(4)]
    for i, result in enumerate(response.results):
        llrs = codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**6)
        hard = codec.decode(result.hard_bits, "hard_bits", pb.Tensor.UINT8, 2, 10**6)
        assert llrs.shape == (slots.data_mask[i].sum(), slots.bits_per_symbol[i])
        np.testing.assert_array_equal(hard, (llrs > 0).astype(np.uint8))
        assert result.model_version == "v1" and result.server_latency_seconds > 0


def test_client_stream_cli_prints_served_and_baseline_ber(server, train_mix_file, capsys):
    code = client_main(["stream", "--server", f"127.0.0.1:{server.port}", "--data", str(train_mix_file),
                        "--slots", "16", "--streams", "2", "--context", "cli", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["slots"] == 16 and summary["feedback_accepted"] == 16
    assert set(summary["ber"]) == {"served", "ls_lmmse", "genie"}
    assert summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0


def test_models_and_activation(server, channel, tiny_checkpoint, capsys):
    v2 = server.registry.import_checkpoint(tiny_checkpoint, creator="test")
    assert client_main(["activate", "--server", f"127.0.0.1:{server.port}", "--version", v2]) == 0
    assert client_main(["models", "--server", f"127.0.0.1:{server.port}"]) == 0
    out = capsys.readouterr().out
    assert "active model is now v2" in out and re.search(r"v2\s+\*", out)
    stub = pb_grpc.ReceiverStub(channel)
    assert stub.GetModel(pb.GetModelRequest()).version == "v2"
    with pytest.raises(grpc.RpcError) as err:
        stub.ActivateModel(pb.ActivateModelRequest(version="v99"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "v99" in err.value.details()
    assert client_main(["activate", "--server", f"127.0.0.1:{server.port}", "--version", "v99"]) == 1
    assert re.search(r'^deeprx_model_info\{version="v2"\} 1\.0', scrape(server.metrics_port), re.M)


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "deeprx.v1.Receiver"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"deeprx.v1.Receiver", "grpc.health.v1.Health"} <= names


def test_graceful_stop_finishes_in_flight_work_and_flushes_the_store(tmp_path, tiny_checkpoint, train_mix_file):
    import threading

    from service.config import ServerConfig
    from service.server import ReceiverServer

    slots, _ = read_slots(train_mix_file)
    server = ReceiverServer(ServerConfig(port=0, metrics_port=0), tmp_path / "store", tiny_checkpoint).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.ReceiverStub(ch)
        future = stub.Detect.future(pb.DetectRequest(slots=[slot_message(slots, i, f"g-{i}", "g") for i in range(32)]))
        threading.Timer(0.01, server.stop, kwargs={"grace": 10}).start()
        assert len(future.result(timeout=30).results) == 32
    server.wait()
    from service.serving.store import SampleStore
    assert SampleStore(tmp_path / "store" / "samples").count() == 32


def test_label_free_estimate_tracks_served_confidence(server, channel, train_mix_file):
    """Estimates are computed off the response path, so they appear shortly after the slots are answered."""
    slots, _ = read_slots(train_mix_file)
    stream_slots(address_of(server), slots.select(slice(0, 16)), context="unlabelled", prefix="u")
    deadline = time.monotonic() + 10
    while True:
        rows = {t.context: t for t in pb_grpc.ReceiverStub(channel).ListTargets(pb.ListTargetsRequest()).contexts}
        if "unlabelled" in rows or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert rows["unlabelled"].slots == 0 and 0 < rows["unlabelled"].estimated_ber <= 0.5
    assert -10 < rows["unlabelled"].pilot_sinr_db < 40  # the training mix spans 0..25 dB SNR
    metrics = scrape(server.metrics_port)
    assert re.search(r'^deeprx_context_ber_estimate\{context="unlabelled"\}', metrics, re.M)
    assert re.search(r'^deeprx_context_pilot_sinr_decibels\{context="unlabelled"\}', metrics, re.M)


def test_crc_feedback_labels_only_blocks_that_decode(server, train_mix_file, capsys):
    code = client_main(["stream", "--server", f"127.0.0.1:{server.port}", "--data", str(train_mix_file),
                        "--slots", "24", "--context", "crc", "--feedback", "crc", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    # an untrained tiny model serves near-random LLRs: no block decodes, so nothing is labelled
    assert summary["transport_blocks_passed"] == summary["feedback_accepted"] == 0
    text = scrape(server.metrics_port)
    assert re.search(r'^deeprx_feedback_total\{kind="crc_fail"\} 24\.0', text, re.M)


def test_crc_feedback_labels_match_the_true_bits_when_blocks_decode(server, channel, train_mix_file):
    """Serve slots, then decode their *true* bits as perfect LLRs: every block passes and the
    re-encoded coded bits the client reports are exactly the genie bits."""
    from client.stream import data_bits, send_crc_feedback

    slots, attrs = read_slots(train_mix_file)
    subset = slots.select(slice(0, 8))
    stream_slots(address_of(server), subset, "crc2", prefix="t")
    perfect = {f"t-{i}": pb.SlotResult(llrs=codec.encode((data_bits(subset, i) * 2.0 - 1.0) * 10)) for i in range(8)}
    response, passed = send_crc_feedback(channel, subset, perfect, int(attrs["scs_khz"]), prefix="t")
    assert passed == 8 and response.accepted == 8
    served_errors = {e.slot_id: e.bit_errors for e in response.errors}
    genie = send_genie_feedback(channel, subset, prefix="t")
    assert served_errors == {e.slot_id: e.bit_errors for e in genie.errors}
