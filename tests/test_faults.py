"""Load and faults on tiny sizes: every slot answered or explicitly rejected, kill -9 during an
adaptation job, a follower killed and restarted, clients that disconnect mid-stream."""
import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback

import grpc
import numpy as np

from benchmarks.load import run_load
from client.stream import send_genie_feedback, slot_message, stream_slots
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.config import ServerConfig
from service.server import ReceiverServer
from tests.conftest import address_of, free_port, serve_process, simulate


def test_load_run_answers_every_slot_and_loses_none(server, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    report = run_load(f"127.0.0.1:{server.port}", slots, streams=4, seconds=3.0, window=4)
    assert report.answered > 0 and report.lost == 0 and report.errors == []
    assert report.sent == report.answered + report.rejected
    assert report.feedback_accepted == report.answered, "every answered slot's feedback was matched"


def test_a_full_queue_rejects_explicitly_and_loses_nothing(tmp_path, tiny_checkpoint, train_mix_file):
    config = ServerConfig(port=0, metrics_port=0)
    config.limits.max_queued_slots = 2
    config.batching.max_queue_delay_ms = 20.0
    busy = ReceiverServer(config, tmp_path / "store", tiny_checkpoint).start()
    try:
        slots, _ = read_slots(train_mix_file)
        report = run_load(f"127.0.0.1:{busy.port}", slots, streams=8, seconds=2.0, window=8)
    finally:
        busy.stop(grace=2)
    assert report.rejected > 0, "eight streams of eight in flight overflow a queue of two"
    assert report.lost == 0 and report.sent == report.answered + report.rejected


def test_streams_a_full_queue_ends_report_the_servers_status(tmp_path, tiny_checkpoint, train_mix_file):
    """A stream the server ends with RESOURCE_EXHAUSTED fails with that status at the client however the
    end meets the client's next write: grpc.aio on its own reported INTERNAL 'Internal error from Core'
    in about half of these runs (``client.connection.keep_the_servers_status_when_a_write_fails``)."""
    config = ServerConfig(port=0, metrics_port=0)
    config.limits.max_queued_slots = 2
    config.batching.max_queue_delay_ms = 20.0
    busy = ReceiverServer(config, tmp_path / "store", tiny_checkpoint).start()
    slots, _ = read_slots(train_mix_file)
    slots = slots.select(np.arange(256) % len(slots))  # the client keeps writing while the server ends streams
    refusals = []
    try:
        for attempt in range(8):
            try:
                stream_slots(address_of(busy), slots, "busy", streams=8, window=8, prefix=f"a{attempt}")
            except grpc.RpcError as err:
                refusals.append((err.code(), err.details()))
    finally:
        busy.stop(grace=2)
    assert refusals, "eight streams of eight in flight overflow a queue of two"
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refusals), refusals


@contextlib.contextmanager
def _killed_at_the_end(process):
    """Kill ``process`` even when the test fails before it would (no server outlives its test)."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_kill_during_an_adaptation_job_marks_it_failed_at_restart(tmp_path, trained_tiny_checkpoint,
                                                                   train_mix_file):
    drift = simulate(tmp_path / "drift.h5", "channel=TDL-D,speed=100:150,snr=15:25,dmrs=0", 32, seed=31)
    toml = tmp_path / "server.toml"
    toml.write_text(f'[adaptation]\npool = "{train_mix_file}"\nregression = "{train_mix_file}"\n'
                    'min_target_slots = 16\n')
    store = tmp_path / "store"
    process, port = serve_process(store, trained_tiny_checkpoint, "--config", str(toml))
    slots, _ = read_slots(drift)
    with _killed_at_the_end(process), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ReceiverStub(channel)
        stream_slots(f"127.0.0.1:{port}", slots, "drift", prefix="d")
        send_genie_feedback(channel, slots, prefix="d")
        job = stub.TriggerAdaptation(pb.AdaptationRequest(context="drift", method="target-only",
                                                          options={"steps": "100000"}))
        deadline = time.monotonic() + 60
        while (running := stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id))).stage != "update":
            assert running.state in (pb.AdaptationJob.QUEUED, pb.AdaptationJob.RUNNING), running.message
            assert time.monotonic() < deadline, "the job never started its update"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)  # mid-update, from outside

    db = sqlite3.connect(store / "samples" / "samples.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    process, port = serve_process(store, None, "--config", str(toml))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            failed = stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id))
            assert failed.state == pb.AdaptationJob.FAILED and "interrupted" in failed.message
            assert "update" in failed.message
            assert stub.GetModel(pb.GetModelRequest()).version == "v1"
            assert dict(stub.ListModels(pb.ListModelsRequest()).scoped_versions) == {}
            report, _ = stream_slots(f"127.0.0.1:{port}", slots.select(slice(0, 4)), "drift", prefix="after")
            assert report.versions == {"v1": 4}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_killed_follower_comes_back_on_the_leaders_current_versions(tmp_path, tiny_checkpoint):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    registry = tmp_path / "shared-registry"
    config = ServerConfig(port=0, metrics_port=0)
    config.replication.registry, config.replication.publish = str(registry), endpoint
    leader = ReceiverServer(config, tmp_path / "leader", tiny_checkpoint).start()
    toml = tmp_path / "follower.toml"
    toml.write_text(f'[replication]\nregistry = "{registry}"\nfollow = "{endpoint}"\n')
    follower, port = serve_process(tmp_path / "follower", None, "--config", str(toml))
    try:
        follower.send_signal(signal.SIGKILL)
        follower.wait()
        v2 = leader.registry.import_checkpoint(tiny_checkpoint, creator="while the follower was down")
        v3 = leader.registry.import_checkpoint(tiny_checkpoint, creator="scoped")
        leader.registry.activate(v2)
        leader.registry.activate(v3, "cell-7")
        follower, port = serve_process(tmp_path / "follower", None, "--config", str(toml))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ReceiverStub(channel)
            assert stub.GetModel(pb.GetModelRequest()).version == v2
            assert dict(stub.ListModels(pb.ListModelsRequest()).scoped_versions) == {"cell-7": v3}
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        leader.stop(grace=1)


def _stream_readers(server: ReceiverServer) -> int:
    """StreamDetect's reader tasks still alive on the server's event loop (the loop is the server's
    own; nothing public lists its tasks)."""
    async def count() -> int:
        return sum("StreamDetect" in task.get_coro().__qualname__ for task in asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), server._loop).result(timeout=5)


def _disconnect_mid_stream(server: ReceiverServer, slots, attempt: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        def endless():
            for n in range(10**6):
                yield pb.StreamDetectRequest(slot=slot_message(slots, n % len(slots), f"c{attempt}-{n}", "gone"))
                time.sleep(0.005)

        call = pb_grpc.ReceiverStub(channel).StreamDetect(endless())
        for _ in zip(range(5), call):  # a few results arrive, then the client goes away
            pass
        assert _stream_readers(server) >= 1, "an open stream's reader is seen"
        call.cancel()


def _threads_in_handlers() -> list[str]:
    """Names of RPC pool threads whose stack is inside a servicer (service/api): once every cancellation
    has been noticed, none should be; a handler blocked on a cancelled stream would stay there forever."""
    names = {t.ident: t.name for t in threading.enumerate() if t.name.startswith("grpc_")}
    busy = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)
        if ident in names and any(f"{os.sep}service{os.sep}api{os.sep}" in entry.filename for entry in stack):
            busy.append(names[ident])
    return busy


def _client_request_senders() -> int:
    """Threads of this process's blocking gRPC clients (the disconnecting ones here) still in a
    streaming call's request iterator: grpc's consumer notices a cancel at its next request, so it may
    outlive the call briefly. They live in this process beside the server's threads and are not the
    server's to clean up."""
    return sum(
        any(entry.name == "consume_request_iterator" for entry in traceback.extract_stack(frame))
        for frame in sys._current_frames().values()
    )


def _settled_thread_counts(server: ReceiverServer, senders_before: int) -> tuple[int, int]:
    """(threads outside the server's RPC pool, threads in it) once the server has noticed every
    cancellation (no stream reader left and no pool thread inside a handler) and the test's clients have
    let go of their streams (back to ``senders_before``). The pool grows on demand up to its bound, so
    it is counted apart."""
    deadline = time.monotonic() + 10
    while (_stream_readers(server) or _threads_in_handlers() or _client_request_senders() > senders_before) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _client_request_senders() <= senders_before, "a cancelled client stream kept sending"
    assert _stream_readers(server) == 0, "a stream reader outlived its cancelled stream"
    assert not _threads_in_handlers(), f"handlers still blocked after their streams were cancelled: {_threads_in_handlers()}"
    pool = sum(t.name.startswith("grpc_") for t in threading.enumerate())
    return threading.active_count() - pool, pool


def test_clients_that_disconnect_mid_stream_leave_no_threads_behind(server, train_mix_file):
    """Disconnects cost nothing that accumulates: after rounds of ten disconnects no handler is still
    running (one blocked on a cancelled stream would hold its pool thread forever), threads outside the
    RPC pool do not accumulate, and the pool stays within its bound."""
    slots, _ = read_slots(train_mix_file)
    counts, senders_before = [], _client_request_senders()
    for round_ in range(4):  # the first round also starts what is started once, lazily (counted apart)
        for attempt in range(10):
            _disconnect_mid_stream(server, slots, round_ * 10 + attempt)
        counts.append(_settled_thread_counts(server, senders_before))
    assert counts[3][0] <= counts[1][0], counts
    assert all(pool <= server.config.limits.workers for _, pool in counts), counts
    report, _ = stream_slots(address_of(server), slots.select(slice(0, 4)), "after", prefix="after")
    assert report.failures == 0, "the server still serves"
