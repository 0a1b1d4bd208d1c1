"""The loop over real RPCs on 127.0.0.1: feedback -> target -> adaptation job -> gate -> swap -> rollback."""
import re
import time

import grpc
import pytest

from client.cli import main as client_main
from client.stream import data_bits, send_genie_feedback, stream_slots
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.config import ServerConfig
from service.server import ReceiverServer
from tests.conftest import address_of, scrape, simulate

DRIFT = "channel=TDL-D,speed=100:150,snr=15:25,dmrs=0"


@pytest.fixture(scope="module")
def files(tmp_path_factory, train_mix_file, trained_tiny_checkpoint):
    root = tmp_path_factory.mktemp("adaptation-service")
    return {"model": trained_tiny_checkpoint, "drift": simulate(root / "drift.h5", DRIFT, 64, seed=21),
            "pool": simulate(root / "pool.h5", "channel=TDL-A|TDL-D,speed=0:150,snr=5:25,dmrs=0:1", 96, seed=22),
            "regression": train_mix_file, "rehearsal": simulate(root / "rehearsal.h5", "train", 32, seed=23)}


def _server(tmp_path, files, **adaptation):
    config = ServerConfig(port=0, metrics_port=0)
    config.monitor.target_min_slots = 16
    config.monitor.target_absolute_ber = 0.01
    a = config.adaptation
    a.pool, a.regression, a.min_target_slots, a.k, a.steps = str(files["pool"]), str(files["regression"]), 16, 24, 60
    a.learning_rate, a.min_relative_improvement, a.max_regression, a.rollback_slots = 3e-3, 0.0, 0.5, 16
    a.replay = 0.5  # tiny models on few steps: half of each minibatch from the target
    for key, value in adaptation.items():
        setattr(a, key, value)
    return ReceiverServer(config, tmp_path / "store", files["model"]).start()


def _serve_labelled(server, channel, slots, context: str, prefix: str, streams: int = 1) -> None:
    """Stream ``slots`` under ``context`` and report their genie labels."""
    stream_slots(address_of(server), slots, context, streams=streams, prefix=prefix)
    send_genie_feedback(channel, slots, prefix=prefix)


def _wait(stub, job_id: str) -> pb.AdaptationJob:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job_id))
        if job.state not in (pb.AdaptationJob.QUEUED, pb.AdaptationJob.RUNNING):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def test_target_is_flagged_adapted_swapped_under_load_and_rolled_back_on_regression(tmp_path, files):
    """A scoped job: the target context gets its own version; another context keeps v1, bit for bit."""
    server = _server(tmp_path, files, method="target-only")
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            _serve_labelled(server, channel, drift.select(slice(0, 48)), "drift", "d", streams=2)
            server.store.flush()
            targets = stub.ListTargets(pb.ListTargetsRequest()).contexts
            assert targets[0].context == "drift" and targets[0].is_target and targets[0].genie_ber >= 0
            assert targets[0].serving_version == "v1"

            before, _ = stream_slots(address_of(server), drift.select(slice(48, 64)), "drift", prefix="pre")
            other_before: list = []
            stream_slots(address_of(server), drift.select(slice(48, 64)), "other", prefix="o1", on_result=other_before.append)
            job = stub.TriggerAdaptation(pb.AdaptationRequest(context="drift", method="target-only"))
            assert job.state == pb.AdaptationJob.QUEUED and job.scope == "drift"
            versions_seen: set[str] = set()
            while stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id)).state in (
                    pb.AdaptationJob.QUEUED, pb.AdaptationJob.RUNNING):  # serving goes on during the job
                report, _ = stream_slots(address_of(server), drift.select(slice(48, 56)), "live", prefix=f"l{len(versions_seen)}")
                assert report.failures == 0
                versions_seen |= set(report.versions)
            done = _wait(stub, job.job_id)
            assert done.state == pb.AdaptationJob.ACCEPTED, done.message
            assert done.ber_after <= done.ber_before and done.new_version == "v2" and done.scope == "drift"
            assert stub.GetModel(pb.GetModelRequest(context="drift")).version == "v2"
            assert stub.GetModel(pb.GetModelRequest()).version == "v1", "the global version is untouched"
            models = stub.ListModels(pb.ListModelsRequest())
            assert dict(models.scoped_versions) == {"drift": "v2"} and models.active_version == "v1"
            assert [m.scoped_contexts for m in models.models if m.version == "v2"] == [["drift"]]
            lineage = server.registry.info("v2")
            assert lineage["parent"] == "v1" and lineage["job"] == job.job_id and lineage["accepted"]
            assert lineage["adapted_for"] == "drift"
            after, _ = stream_slots(address_of(server), drift.select(slice(48, 64)), "drift", prefix="post")
            assert after.versions == {"v2": 16} and after.ber < before.ber, (before.ber, after.ber)
            other_after: list = []
            report, _ = stream_slots(address_of(server), drift.select(slice(48, 64)), "other", prefix="o2",
                                     on_result=other_after.append)
            assert report.versions == {"v1": 16}
            first = sorted(other_before, key=lambda r: r.slot_id[3:])
            second = sorted(other_after, key=lambda r: r.slot_id[3:])
            assert [r.llrs.data for r in first] == [r.llrs.data for r in second], "non-target LLRs bit-identical"
            text = scrape(server.metrics_port)
            assert re.search(r'^deeprx_adaptation_jobs_total\{method="target-only",outcome="accepted"\} 1\.0', text, re.M)
            assert re.search(r'^deeprx_adaptation_ber\{stage="after"\}', text, re.M)
            assert re.search(r"^deeprx_scoped_versions 1\.0", text, re.M)

            # live feedback on v2 says it got worse (bits inverted): the watch releases the scope
            stream_slots(address_of(server), drift.select(slice(0, 16)), "drift", prefix="after")
            wrong = [pb.Feedback(slot_id=f"after-{i}", genie_bits=codec.encode(1 - data_bits(drift, i)))
                     for i in range(16)]
            stub.ReportFeedback(pb.ReportFeedbackRequest(feedback=wrong))
            assert stub.GetModel(pb.GetModelRequest(context="drift")).version == "v1"
            assert dict(stub.ListModels(pb.ListModelsRequest()).scoped_versions) == {}
            assert stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id)).rolled_back
    finally:
        server.stop(grace=5)


def test_global_update_replaces_the_global_version_behind_the_regression_gate(tmp_path, files):
    server = _server(tmp_path, files, method="target-only")
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            _serve_labelled(server, channel, drift.select(slice(0, 48)), "drift", "d")
            job = stub.TriggerAdaptation(pb.AdaptationRequest(context="drift", global_update=True))
            assert job.scope == "global"
            done = _wait(stub, job.job_id)
            assert done.state == pb.AdaptationJob.ACCEPTED, done.message
            assert "regression set" in done.message and done.regression_ber_before > 0
            assert stub.GetModel(pb.GetModelRequest()).version == done.new_version
            assert dict(stub.ListModels(pb.ListModelsRequest()).scoped_versions) == {}
    finally:
        server.stop(grace=5)


def test_jobs_survive_a_restart(tmp_path, files):
    server = _server(tmp_path, files, method="target-only")
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            _serve_labelled(server, channel, drift.select(slice(0, 32)), "drift", "d")
            done = _wait(stub, stub.TriggerAdaptation(pb.AdaptationRequest(context="drift")).job_id)
    finally:
        server.stop(grace=5)
    server = _server(tmp_path, files, method="target-only")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            again = stub.GetAdaptation(pb.GetAdaptationRequest(job_id=done.job_id))
            assert (again.state, again.new_version, again.ber_after, again.scope) == (
                done.state, done.new_version, done.ber_after, "drift")
            assert stub.GetModel(pb.GetModelRequest(context="drift")).version == server.registry.scopes()["drift"]
            assert stub.TriggerAdaptation(pb.AdaptationRequest(context="drift")).job_id == "job-2"
    finally:
        server.stop(grace=5)


def test_harmful_update_is_rejected_and_never_served(tmp_path, files):
    server = _server(tmp_path, files, method="target-only", min_relative_improvement=0.02)
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            _serve_labelled(server, channel, drift.select(slice(0, 48)), "drift", "d")
            server.store.flush()
            job = stub.TriggerAdaptation(pb.AdaptationRequest(context="drift", method="target-only",
                                                              options={"learning_rate": "3.0", "steps": "30"}))
            done = _wait(stub, job.job_id)
            assert done.state == pb.AdaptationJob.REJECTED, done.message
            assert stub.GetModel(pb.GetModelRequest()).version == "v1"
            assert not server.registry.info(done.new_version)["accepted"]
            report, _ = stream_slots(address_of(server), drift.select(slice(48, 56)), "after", prefix="a")
            assert report.versions == {"v1": 8}
    finally:
        server.stop(grace=5)


def test_client_targets_and_adapt_commands(tmp_path, files, capsys):
    server = _server(tmp_path, files, method="target-only")
    drift, _ = read_slots(files["drift"])
    try:
        address = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(address) as channel:
            _serve_labelled(server, channel, drift.select(slice(0, 32)), "cell-9", "c")
        server.store.flush()
        assert client_main(["targets", "--server", address]) == 0
        assert re.search(r"cell-9\s+yes\s+32", capsys.readouterr().out)
        assert client_main(["adapt", "--server", address, "--context", "cell-9", "--method", "target-only",
                            "--option", "steps=20", "--wait"]) == 0
        out = capsys.readouterr().out
        assert "job-1" in out and "held-out target BER" in out and ("ACCEPTED" in out or "REJECTED" in out)
    finally:
        server.stop(grace=5)


def test_client_refuses_a_job_option_without_a_value(capsys):
    with pytest.raises(SystemExit) as exit_code:
        client_main(["adapt", "--server", "127.0.0.1:1", "--context", "x", "--option", "steps"])
    assert exit_code.value.code == 2 and "expected KEY=VALUE, got 'steps'" in capsys.readouterr().err


def test_first_order_retrieves_from_the_gradient_index_and_rebuilds_it_after_a_swap(tmp_path, files):
    server = _server(tmp_path, files, method="first-order", min_relative_improvement=-1.0,  # accept any
                     rehearsal=str(files["rehearsal"]))
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            _serve_labelled(server, channel, drift.select(slice(0, 32)), "drift", "d")
            first = _wait(stub, stub.TriggerAdaptation(pb.AdaptationRequest(context="drift")).job_id)
            assert first.state == pb.AdaptationJob.ACCEPTED and "channels" in first.selected_summary
            lineage = server.registry.info(first.new_version)
            assert lineage["details"]["selection"] == "gradient index"
            assert lineage["replay"] == 0.0, "a scoped version serves only its context: no rehearsal"
            text = scrape(server.metrics_port)
            assert re.search(r"^deeprx_influence_index_builds_total 1\.0", text, re.M)
            assert re.search(r"^deeprx_influence_index_stale 0\.0", text, re.M), "a scoped v2 leaves v1 global"
            second = _wait(stub, stub.TriggerAdaptation(pb.AdaptationRequest(context="drift")).job_id)
            assert second.state == pb.AdaptationJob.ACCEPTED
            assert server.registry.info(second.new_version)["parent"] == first.new_version
            assert re.search(r"^deeprx_influence_index_builds_total 1\.0", scrape(server.metrics_port), re.M)
            third = _wait(stub, stub.TriggerAdaptation(pb.AdaptationRequest(context="drift",
                                                                            global_update=True)).job_id)
            assert third.state == pb.AdaptationJob.ACCEPTED
            global_lineage = server.registry.info(third.new_version)
            assert global_lineage["rehearsal"] == str(files["rehearsal"]) and global_lineage["replay"] == 0.5
            assert re.search(r"^deeprx_influence_index_stale 1\.0", scrape(server.metrics_port), re.M)
            fourth = _wait(stub, stub.TriggerAdaptation(pb.AdaptationRequest(context="drift")).job_id)
            assert fourth.state == pb.AdaptationJob.ACCEPTED
            assert re.search(r"^deeprx_influence_index_builds_total 2\.0", scrape(server.metrics_port), re.M)
    finally:
        server.stop(grace=5)


def test_auto_mode_starts_one_job_per_target_within_the_cooldown(tmp_path, files):
    server = _server(tmp_path, files, method="target-only", auto=True, cooldown_s=3600)
    drift, _ = read_slots(files["drift"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            for round_ in range(2):
                _serve_labelled(server, channel, drift.select(slice(0, 24)), "auto-cell", f"r{round_}")
            jobs = stub.ListAdaptations(pb.ListAdaptationsRequest()).jobs
            assert [j.context for j in jobs] == ["auto-cell"], "one job despite more feedback"
            assert _wait(stub, jobs[0].job_id).state != pb.AdaptationJob.QUEUED
    finally:
        server.stop(grace=5)


def test_bad_adaptation_requests(server, channel):
    stub = pb_grpc.ReceiverStub(channel)
    for request, text in [(pb.AdaptationRequest(context="x", method="magic"), "method"),
                          (pb.AdaptationRequest(method="first-order"), "target"),
                          (pb.AdaptationRequest(context="x", options={"bogus": "1"}), "options"),
                          (pb.AdaptationRequest(context="x", options={"steps": "many"}), "steps='many' is not int"),
                          (pb.AdaptationRequest(context="x", options={"replay": "1.5"}), "replay"),
                          (pb.AdaptationRequest(context="x", options={"validation_fraction": "1"}), "validation"),
                          (pb.AdaptationRequest(context="x", options={"curvature": "magic"}), "curvature")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.TriggerAdaptation(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAdaptation(pb.GetAdaptationRequest(job_id="job-404"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    job = stub.TriggerAdaptation(pb.AdaptationRequest(context="nobody", method="first-order"))
    assert _wait(stub, job.job_id).state == pb.AdaptationJob.FAILED
    assert "labelled" in stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id)).message
    assert [j.job_id for j in stub.ListAdaptations(pb.ListAdaptationsRequest()).jobs] == [job.job_id]


def test_held_out_split_does_not_depend_on_arrival_order(tmp_path, files):
    """The same labelled slots reaching two servers in different orders give the same held-out part."""
    drift, _ = read_slots(files["drift"])
    halves = [(drift.select(slice(0, 16)), "b"), (drift.select(slice(16, 32)), "a")]
    before = []
    for run, order in enumerate((halves, halves[::-1])):
        server = _server(tmp_path / f"run{run}", files, method="target-only")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                for slots, prefix in order:
                    _serve_labelled(server, channel, slots, "drift", prefix)
                stub = pb_grpc.ReceiverStub(channel)
                job = stub.TriggerAdaptation(pb.AdaptationRequest(context="drift", options={"steps": "1"}))
                before.append(_wait(stub, job.job_id).ber_before)
        finally:
            server.stop(grace=5)
    assert before[0] == before[1]
