"""20 version switches while streams run: nothing fails, and every result is the named version's."""
import re
import threading
import time

import numpy as np
import torch

from client.stream import slot_message, stream_slots
from proto import codec
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.receiver.features import prepare
from service.receiver.model import DeepRx, config_for
from tests.conftest import address_of, scrape


def _expected_llrs(model: DeepRx, slots, row: int) -> np.ndarray:
    t = prepare(slots.select(slice(row, row + 1)))
    with torch.inference_mode():
        logits = model(t.features, t.bits_per_symbol)[0]
    k = int(slots.bits_per_symbol[row])
    return logits[:k].permute(2, 1,0).numpy()[slots.data_mask[row]]


def test_twenty_swaps_under_load(server, channel, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    versions = ["v1"]
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        versions.append(server.registry.publish(DeepRx(config_for("tiny")).eval(), creator=f"test seed {seed}"))
    stub = pb_grpc.ReceiverStub(channel)
    stop = threading.Event()
    unary_versions: list[set[str]] = []
    failures: list[Exception] = []

    def swap() -> None:
        for i in range(20):
            time.sleep(0.04)
            stub.ActivateModel(pb.ActivateModelRequest(version=versions[(i + 1) % len(versions)]))

    def unary() -> None:
        n = 0
        while not stop.is_set():
            request = pb.DetectRequest(slots=[slot_message(slots, r, f"unary-{n}-{r}", "u") for r in range(4)])
            try:
                response = stub.Detect(request)
            except Exception as err:  # noqa: BLE001 - counted as a failure
                failures.append(err)
                return
            unary_versions.append({r.model_version for r in response.results})
            n += 1

    swapper, unary_thread = threading.Thread(target=swap), threading.Thread(target=unary)
    swapper.start()
    unary_thread.start()
    collected = []
    report, results = stream_slots(address_of(server), slots.select(np.r_[0:64, 0:64, 0:64]), "swap", streams=4, rate=120,
                                   on_result=collected.append)
    swapper.join()
    stop.set()
    unary_thread.join()

    assert report.failures == 0 and not failures
    assert report.slots == 192
    assert len(set(report.versions)) >= 3, report.versions  # the swaps really happened under the stream
    assert all(len(v) == 1 for v in unary_versions), "a request is served by one version"
    assert server.registry.active.version == versions[20 % len(versions)]
    models = {v: server.registry.load(v).model for v in versions}
    rows = np.r_[0:64, 0:64, 0:64]
    for result in collected:
        row = rows[int(result.slot_id.split("-")[1])]
        llrs = codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**6)
        np.testing.assert_allclose(llrs, _expected_llrs(models[result.model_version], slots, row),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{result.slot_id} is not {result.model_version}'s")
    assert re.search(r"^deeprx_model_swaps_total 20\.0", scrape(server.metrics_port), re.M)


def test_scoped_swaps_under_mixed_context_streams(server, channel, train_mix_file):
    """Two contexts stream at once while one of them has its scoped version cycled: zero failures,
    every slot carries the LLRs of the version its context maps to, and the other context never
    leaves the global version."""
    slots, _ = read_slots(train_mix_file)
    models = {"v1": server.registry.load("v1").model}
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = DeepRx(config_for("tiny")).eval()
        models[server.registry.publish(model, creator=f"test seed {seed}")] = model
    scoped = [v for v in models if v != "v1"]
    stub = pb_grpc.ReceiverStub(channel)

    def swap() -> None:
        for i in range(12):
            time.sleep(0.05)
            if i % 4 == 3:
                stub.ReleaseScope(pb.ReleaseScopeRequest(context="cell-a"))
            else:
                stub.ActivateModel(pb.ActivateModelRequest(version=scoped[i % 2], context="cell-a"))

    results: dict[str, list] = {"cell-a": [], "cell-b": []}
    reports = {}

    def run(context: str) -> None:
        reports[context], _ = stream_slots(address_of(server), slots.select(np.r_[0:48, 0:48]), context, streams=2, rate=100,
                                           prefix=context, on_result=results[context].append)

    threads = [threading.Thread(target=swap)] + [threading.Thread(target=run, args=(c,)) for c in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.failures == 0 and r.slots == 96 for r in reports.values())
    assert set(reports["cell-b"].versions) == {"v1"}, "the other context stays on the global version"
    assert len(set(reports["cell-a"].versions)) >= 2, reports["cell-a"].versions
    for result in results["cell-a"] + results["cell-b"]:
        row = int(result.slot_id.split("-")[-1]) % 48
        expected = _expected_llrs(models[result.model_version], slots, row)
        np.testing.assert_allclose(codec.decode(result.llrs, "llrs", pb.Tensor.FLOAT32, 2, 10**6), expected,
                                   atol=1e-4)
