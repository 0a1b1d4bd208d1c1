"""The Ray-sharded gradient index equals the single-process one (service/influence/distributed.py).

One local Ray instance for the module: 2 CPUs, loopback only, no dashboard, the smallest object
store Ray accepts; shut down at the end. The `test` extra installs ray.
"""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from schema.dataset import read_slots
from service.cli import main as service_main
from service.influence.curvature import CurvatureConfig
from service.influence.index import GradientIndex, IndexConfig
from service.receiver.checkpoint import load_checkpoint

ray = pytest.importorskip("ray", reason="ray is not installed (the 'test' extra installs it: pip install -e '.[test]')")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The driver's builds on one thread, like each Ray worker's: on 2 cores shared with the 2 workers, more
    threads only contend (and much worse on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=80 * 2 ** 20,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setting(train_mix_file, high_snr_file, trained_tiny_checkpoint):
    pool, _ = read_slots(train_mix_file)
    targets, _ = read_slots(high_snr_file, slice(0, 8))
    ids = [f"p{i}" for i in range(len(pool))]
    return load_checkpoint(trained_tiny_checkpoint).model, pool, targets, ids


def _stored(index: GradientIndex) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [load_file(str(index.directory / f"{name}.safetensors")) for name in index.manifest["shards"]]
    return torch.cat([t["rows"] for t in tensors]), torch.cat([t["self_influence"] for t in tensors])


def _assert_same_index(sharded: GradientIndex, single: GradientIndex, model, targets, k: int) -> None:
    assert sharded.slot_ids() == single.slot_ids()
    a, b = sharded.manifest, single.manifest
    assert {key: v for key, v in a.items() if key != "shards"} == {key: v for key, v in b.items() if key != "shards"}
    rows_a, self_a = _stored(sharded)
    rows_b, self_b = _stored(single)
    torch.testing.assert_close(rows_a, rows_b, rtol=1e-4, atol=1e-5 * float(rows_b.abs().max()))
    torch.testing.assert_close(self_a, self_b, rtol=1e-4, atol=0)
    version = a["model_version"]
    query_a, query_b = sharded.query(model, version, targets, k), single.query(model, version, targets, k)
    assert query_a.slot_ids == query_b.slot_ids
    torch.testing.assert_close(query_a.scores, query_b.scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method, compression", [("ekfac", "sjlt:512"), ("kfac", None)])
def test_ray_sharded_build_equals_the_single_process_build(ray_session, setting, tmp_path, method, compression):
    from service.influence.distributed import RayShards

    model, pool, targets, ids = setting
    config = IndexConfig(CurvatureConfig(method=method), compression=compression, chunk=8)
    single = GradientIndex(tmp_path / "single")
    single.build(model, "v1", pool, ids, fit_ids=ids[::4], config=config, progress=False)

    shards = RayShards("local:2", shard_rows=12)  # rounded up to 16 rows: 4 tasks over the 2 workers
    sharded = GradientIndex(tmp_path / "ray")
    sharded.build(model, "v1", pool, ids, fit_ids=ids[::4], config=config, progress=False, shards=shards)
    assert len(sharded.manifest["shards"]) == 4 and [s["start"] for s in shards.stats] == [0, 16, 32, 48]
    assert shards.workers == 2 and not list(sharded.directory.glob("*.tmp"))
    _assert_same_index(sharded, single, model, targets, k=len(pool))


def test_ray_sharded_extend_equals_a_full_build(ray_session, setting, tmp_path):
    from service.influence.distributed import RayShards

    model, pool, targets, ids = setting
    config = IndexConfig(CurvatureConfig(method="ekfac", damping=1e-3), compression="sjlt:256", chunk=8)
    grown = GradientIndex(tmp_path / "grown")
    grown.build(model, "v1", pool.select(slice(0, 24)), ids[:24], fit_ids=ids[:16], config=config, progress=False)
    added = grown.extend(model, "v1", pool, ids, fit=pool.select(slice(0, 16)), progress=False,
                         shards=RayShards("local:2"))
    assert added == 40 and len(grown.manifest["shards"]) == 3  # 40 new rows over 2 workers: 24 + 16
    full = GradientIndex(tmp_path / "full")
    full.build(model, "v1", pool, ids, fit_ids=ids[:16], config=config, progress=False)
    _assert_same_index(grown, full, model, targets, k=20)


def test_cli_ray_flag_writes_the_same_index(ray_session, train_mix_file, high_snr_file, trained_tiny_checkpoint,
                                            tmp_path, capsys):
    args = ["influence", "index", "--model", str(trained_tiny_checkpoint), "--pool", str(train_mix_file),
            "--method", "kfac", "--compress", "sjlt:256", "--fit-slots", "8", "--version", "v3"]
    assert service_main([*args, "--index", str(tmp_path / "single")]) == 0
    # this process is already connected to Ray (the fixture): the command uses that session as it is
    assert service_main([*args, "--index", str(tmp_path / "ray"), "--ray", "local:2"]) == 0
    out = capsys.readouterr().out
    assert "built index of 64 pool rows" in out and "ray: 2 shards on 2 workers" in out
    assert ray.is_initialized()
    model = load_checkpoint(trained_tiny_checkpoint).model
    targets, _ = read_slots(high_snr_file, slice(0, 8))
    _assert_same_index(GradientIndex(tmp_path / "ray"), GradientIndex(tmp_path / "single"), model, targets, k=10)
    assert service_main([*args, "--index", str(tmp_path / "ray"), "--ray", "local:2"]) == 0
    assert "0 rows added, 64 in all" in capsys.readouterr().out


def test_bad_ray_address_is_a_usage_error(train_mix_file, tiny_checkpoint, tmp_path, capsys):
    assert service_main(["influence", "index", "--model", str(tiny_checkpoint), "--pool", str(train_mix_file),
                         "--index", str(tmp_path / "index"), "--ray", "local:0"]) == 2
    assert "local:N needs a positive worker count" in capsys.readouterr().err


def test_service_imports_and_reports_a_clear_error_without_ray(train_mix_file, tiny_checkpoint, tmp_path):
    """Ray stays optional: with ``import ray`` failing, every service module imports and ``--ray`` says what
    to install."""
    script = f"""
import importlib, pkgutil, sys
sys.modules["ray"] = None  # import ray now raises ModuleNotFoundError
import service
for module in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(module.name)
from service.cli import main
code = main(["influence", "index", "--model", {str(tiny_checkpoint)!r}, "--pool", {str(train_mix_file)!r},
             "--index", {str(tmp_path / "index")!r}, "--ray", "local"])
assert code == 2, code
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--ray: sharding over Ray needs the 'ray' package: pip install 'deeprx-adapt[ray]'" in result.stderr
