"""``deeprx-service``: train and evaluate DeepRx (serving and adaptation build on these)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import ServerConfig


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    from service.receiver.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    metadata = train(args.data, args.out, config, progress=not args.quiet, device=args.device)
    metrics = metadata["metrics"]
    print(f"saved {config.size} model ({metadata['parameters']} parameters) after {metadata['steps']} steps "
          f"to {args.out}: val loss {metrics['val_loss_bits']:.4f} bits, val BER {metrics['val_ber']:.5f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from schema.dataset import read_datasets
    from service.receiver.checkpoint import load_checkpoint
    from service.receiver.evaluate import evaluate
    from service.serving.backend import BackendError, InferenceConfig, build_backend

    checkpoint = load_checkpoint(args.model)
    slots, attrs = read_datasets(args.data)
    data = " ".join(str(path) for path in args.data)
    scenario = " + ".join(dict.fromkeys(str(part.get("scenario", "")) for part in attrs))
    if slots.y.shape[1] != checkpoint.model.config.rx:
        raise ValueError(f"the model expects {checkpoint.model.config.rx} receive antennas, "
                         f"'{data}' has {slots.y.shape[1]}")
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    try:  # the model runs through one of the server's backends, on the CPU
        forward = build_backend(checkpoint.model.eval(), InferenceConfig(backend=args.backend), torch.device("cpu"))
    except BackendError as err:
        raise ValueError(f"--backend {args.backend}: {err}") from None
    report = evaluate(checkpoint.model, slots, bin_width_db=args.bin_width, by=by, forward=forward)
    title = f"{Path(args.model).name} on {scenario or data}"
    if args.plot:
        (report.heatmap if by else report.plot)(args.plot, title=title)
    if args.json:
        print(json.dumps({**report.to_dict(), "model": str(args.model), "data": data, "scenario": scenario}))
    else:
        print(f"model {args.model} on {data} ({scenario})")
        print(report.cell_table() if by else report.table())
    return 0


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The server's config: the TOML file, then the flags; the admin token from --admin-token, else the
    file, else DEEPRX_ADMIN_TOKEN."""
    import os

    from service.config import ServerConfig

    config = ServerConfig.from_toml(args.config) if args.config else ServerConfig()
    config.port, config.metrics_port = args.port, args.metrics_port
    config.host = args.host or config.host
    config.metrics_host = args.metrics_host or config.metrics_host
    security = config.security
    security.admin_token = args.admin_token or security.admin_token or os.environ.get("DEEPRX_ADMIN_TOKEN", "")
    security.tls_cert = args.tls_cert or security.tls_cert
    security.tls_key = args.tls_key or security.tls_key
    security.tls_client_ca = args.tls_client_ca or security.tls_client_ca
    return config


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from service.server import ReceiverServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = serve_config(args)
    server = ReceiverServer(config, args.store, args.model).start()
    print(f"serving model {server.registry.active.version} on {config.host}:{server.port}, "
          f"metrics on http://{config.metrics_host}:{server.metrics_port}/metrics", flush=True)

    def shutdown(signum, frame):  # noqa: ARG001 - signal handler signature
        threading.Thread(target=server.stop, args=(args.grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait()
    return 0


def _influence(args: argparse.Namespace) -> int:
    from schema.dataset import read_slots
    from service.influence.curvature import CurvatureConfig
    from service.influence.engine import InfluenceConfig, rank_pool
    from service.receiver.checkpoint import load_checkpoint

    model = load_checkpoint(args.model).model
    pool, _ = read_slots(args.pool)
    targets, target_attrs = read_slots(args.targets)
    config = InfluenceConfig(CurvatureConfig(method=args.method, damping=args.damping, rank=args.rank),
                             score=args.score, fit_slots=args.fit_slots, compression=args.compress)
    result = rank_pool(model, pool, targets, config)
    top = []
    for index in result.ranking()[: args.top].tolist():
        top.append({"index": index, "score": float(result.scores[index]), "channel": str(pool.channel[index]),
                    "delay_spread_ns": float(pool.delay_spread_ns[index]), "speed_mps": float(pool.speed_mps[index]),
                    "snr_db": float(pool.snr_db[index]),
                    "dmrs_additional_position": int(pool.dmrs_additional_position[index])})
    if args.json:
        print(json.dumps({"top": top, "timings": result.timings, "method": args.method, "score": args.score,
                          "pool": len(pool), "targets": len(targets), "parameters": result.parameters}))
        return 0
    print(f"{len(pool)} pool slots ranked for {len(targets)} target slots ({target_attrs.get('scenario', '')}); "
          f"{args.method} curvature, {args.score} scores over {result.parameters} parameters; negative = beneficial")
    print(f"{'rank':>4} {'index':>6} {'score':>11} {'channel':>7} {'ds ns':>6} {'speed':>6} {'snr dB':>6} {'dmrs':>4}")
    for rank, row in enumerate(top, 1):
        print(f"{rank:>4} {row['index']:>6} {row['score']:>11.4g} {row['channel']:>7} {row['delay_spread_ns']:>6.0f} "
              f"{row['speed_mps']:>6.1f} {row['snr_db']:>6.1f} {row['dmrs_additional_position']:>4}")
    print("timings [s]: " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))
    return 0


def _influence_index(args: argparse.Namespace) -> int:
    from schema.dataset import read_slots
    from service.influence.curvature import CurvatureConfig
    from service.influence.index import GradientIndex, IndexConfig
    from service.receiver.checkpoint import load_checkpoint

    runner = {}
    if args.ray:
        from service.influence.distributed import RayShards, SlotFile

        try:
            shards = RayShards(args.ray)
        except ModuleNotFoundError as err:  # ray is an optional extra
            print(f"deeprx-service: error: --ray: {err}", file=sys.stderr)
            return 2
        runner = {"shards": shards}
        pool = SlotFile(args.pool)  # rows are read as shards are sent out, never all at once
    else:
        pool, _ = read_slots(args.pool)
    checkpoint = load_checkpoint(args.model)
    version = args.version or f"{Path(args.model).name}@{checkpoint.metadata.get('steps', 0)}"
    ids = [f"row-{i}" for i in range(len(pool))]
    index = GradientIndex(args.index)
    compression = None if args.compress == "none" else args.compress
    if index.is_stale(version):
        fit = [ids[i] for i in range(0, len(ids), max(1, len(ids) // args.fit_slots))][: args.fit_slots]
        index.build(checkpoint.model, version, pool, ids, fit,
                    IndexConfig(CurvatureConfig(method=args.method, damping=args.damping), compression), **runner)
        print(f"built index of {len(ids)} pool rows for model {version} in {args.index}")
    else:
        fit_rows = [int(i.split("-")[1]) for i in index.manifest["fit_ids"]]
        added = index.extend(checkpoint.model, version, pool, ids, pool.select(fit_rows), **runner)
        print(f"index for model {version} in {args.index}: {added} rows added, {len(index.slot_ids())} in all")
    if runner and runner["shards"].stats:
        stats = runner["shards"].stats
        rate = sum(s["rows"] for s in stats) / sum(s["seconds"] for s in stats)
        print(f"ray: {len(stats)} shards on {runner['shards'].workers} workers "
              f"({len({(s['host'], s['pid']) for s in stats})} processes), {rate:.1f} slots/s per worker, "
              f"peak worker memory {max(s['peak_rss_mib'] for s in stats):.0f} MiB")
    return 0


def _target_file(spec_or_file: str, slots: int, seed: int, workdir: Path) -> tuple[str, Path]:
    """A dataset file as is; a scenario spec simulated by the client CLI (service never imports client)."""
    import subprocess

    path = Path(spec_or_file)
    if path.suffix in (".h5", ".hdf5"):
        if not path.exists():
            raise FileNotFoundError(f"target dataset '{path}' does not exist")
        return path.stem, path
    out = workdir / f"target-{abs(hash(spec_or_file)) % 10**8}.h5"
    subprocess.run([sys.executable, "-m", "client.cli", "simulate", "--scenario", spec_or_file, "--slots",
                    str(slots), "--seed", str(seed), "--out", str(out), "--quiet"], check=True)
    return spec_or_file, out


def _experiment(args: argparse.Namespace) -> int:
    import tempfile

    from tqdm import tqdm

    from schema.dataset import read_slots
    from service.adaptation.experiment import ExperimentConfig, format_table, plot, run, summarise
    from service.adaptation.updates import UpdateConfig
    from service.receiver.checkpoint import load_checkpoint

    model = load_checkpoint(args.model).model
    pool, _ = read_slots(args.pool)
    regression, _ = read_slots(args.regression or args.pool, slice(0, args.regression_slots))
    rehearsal = read_slots(args.rehearsal, slice(0, args.rehearsal_slots))[0] if args.rehearsal else None
    workdir = Path(tempfile.mkdtemp(prefix="deeprx-experiment-"))
    targets = {}
    for i, spec in enumerate(args.targets):
        name, path = _target_file(spec, args.target_slots, 1000 + i, workdir)
        targets[name] = read_slots(path)[0]
    methods = args.methods.split(",")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    resumed = args.rows is not None and args.rows.exists()
    earlier = [json.loads(line) for line in args.rows.read_text().splitlines()] if resumed else []
    iterations = {"second_order_iterations": args.second_order_iterations} if args.second_order_iterations else {}
    config = ExperimentConfig(args.adaptation_slots, args.held_out_slots,
                              UpdateConfig(k=args.k, steps=args.steps, learning_rate=args.learning_rate,
                                           replay=args.replay, fit_slots=args.fit_slots,
                                           validation_fraction=args.validation_fraction,
                                           refine_iterations=args.refine_iterations, **iterations),
                              specialist_slots=args.specialist_slots, specialist_steps=args.specialist_steps)
    shared = [m for m in methods if m != "specialist"] if args.multi_target and len(targets) > 1 else []
    rows_expected = len(seeds) * len(targets) * (len(methods) + len(shared))  # the shared run has no specialist

    with tqdm(total=rows_expected, desc="experiment", unit="result", disable=args.json) as bar, \
            (open(args.rows, "a") if args.rows else contextlib.nullcontext()) as rows_file:
        def record(row: dict) -> None:
            bar.set_postfix(target=row["target"][:16], method=row["method"])
            bar.update(1)
            if rows_file is not None:  # each result lands on disk as it is made
                rows_file.write(json.dumps(row) + "\n")
                rows_file.flush()

        rows = run(model, pool, targets, regression, methods, seeds, config, args.multi_target, progress=record,
                   rehearsal=rehearsal)
    summary = summarise(earlier + rows)  # a resumed run reports every result in its --rows file
    if args.plot:
        plot(summary, str(args.plot))
    if args.json:
        print(json.dumps({"results": rows, "summary": summary}))
    else:
        print(format_table(summary))
    return 0


def _influence_arguments(parser: argparse.ArgumentParser, fit_slots: int) -> None:
    """What every influence command needs: the model, the pool and how H is formed."""
    from service.influence.curvature import METHODS

    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--pool", type=Path, required=True, help="HDF5 pool of labelled slots")
    parser.add_argument("--method", choices=METHODS, default="ekfac", help="curvature H (default ekfac)")
    parser.add_argument("--damping", type=float, help="damping lambda (default: 0.1 x mean GGN eigenvalue)")
    parser.add_argument("--fit-slots", dest="fit_slots", type=int, default=fit_slots,
                        help="pool slots the curvature is fitted on")


def build_parser() -> argparse.ArgumentParser:
    from service.receiver.features import INPUTS
    from service.receiver.model import PADDINGS, SIZES
    from service.receiver.train import TrainConfig

    parser = argparse.ArgumentParser(prog="deeprx-service", description=__doc__)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); serve runs torch on one thread but in "
                             "adaptation jobs (adaptation.threads) and eager CPU batches (inference.threads)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a DeepRx on an HDF5 slot dataset",
                                description="Train DeepRx with the bit-BCE loss; checkpoints to --out "
                                            "(safetensors + JSON) and resumes from it if present.")
    train.add_argument("--data", type=Path, nargs="+", required=True,
                       help="HDF5 datasets from 'deeprx-client simulate' (several: concatenated in order)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory (resumed if it exists)")
    defaults = TrainConfig()
    train.add_argument("--size", default=defaults.size, choices=tuple(SIZES),
                       help="model size: tiny (tests), small, full, or the published plain DeepRx shape")
    train.add_argument("--inputs", default=defaults.inputs, choices=("",) + INPUTS,
                       help="feature channels the model reads (default: the size's own; for ablations): grid = "
                            "received grid, pilots and raw LS; classical adds Sionna's interpolated LS estimate, "
                            "the LMMSE symbol estimate and noise levels; residual adds LS-LMMSE's LLRs to the "
                            "output; weighted adds them times a per-RE weight the network computes; robust also "
                            "reads the robust LMMSE channel estimate (pilots filtered with the channel prior they "
                            "make most likely) and weighs its LLRs the same way")
    train.add_argument("--padding", default=defaults.padding, choices=("",) + PADDINGS,
                       help="what the 3x3 convolutions read past the slot's edges (default: the size's own, zeros; "
                            "for ablations): replicate repeats the edge REs; a resumed run may change it, the "
                            "weights are the same")
    train.add_argument("--init", default=defaults.init, metavar="MODEL_DIR",
                       help="start a new run from this model's weights (a fine-tune; weights the new "
                            "architecture adds, such as the LLR weight of --inputs weighted, start at their initial "
                            "values); ignored when --out already holds a checkpoint to resume")
    train.add_argument("--new-lr-scale", dest="new_lr_scale", type=float, default=defaults.new_lr_scale,
                       help="with --init: the learning rate of the weights the init lacks, as a multiple of "
                            "--learning-rate (they start from nothing while the rest is trained)")
    train.add_argument("--steps", type=int, default=defaults.steps, help="total optimiser steps")
    train.add_argument("--batch-size", dest="batch_size", type=int, default=defaults.batch_size)
    train.add_argument("--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate,
                       help="peak Adam learning rate (after warmup, cosine-decayed)")
    train.add_argument("--final-lr-fraction", dest="final_lr_fraction", type=float,
                       default=defaults.final_lr_fraction)
    train.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=defaults.warmup_steps)
    train.add_argument("--validation-slots", dest="validation_slots", type=int, default=defaults.validation_slots,
                       help="slots of --data held out to report validation loss and BER")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=defaults.checkpoint_every)
    train.add_argument("--loss-floor-bits", dest="loss_floor_bits", type=float, default=defaults.loss_floor_bits,
                       help="0 (default): minimise the mean per-slot bit-BCE; > 0: the mean of log(per-slot loss + "
                            "this), which weighs each slot by 1 / (its loss + this) and so lifts high-SNR slots "
                            "(their losses are 100-1000x smaller than at 0 dB)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--precision", default=defaults.precision, choices=("float32", "bfloat16"),
                       help="bfloat16: forward and loss under autocast (for a GPU; the saved weights are float32)")
    train.add_argument("--device", default="auto",
                       help="where to train: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda[:N]")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    ev = commands.add_parser("eval", help="uncoded BER of a model vs LS-LMMSE and genie",
                             description="Print uncoded BER of DeepRx, LS-LMMSE and perfect-CSI LMMSE "
                                         "overall and per SNR bin.")
    ev.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ev.add_argument("--data", type=Path, nargs="+", required=True,
                    help="HDF5 dataset; several are evaluated as one (a grid simulated in parts, say)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--plot", type=Path, help="write a BER-vs-SNR plot (PNG) here (with --by: a heatmap)")
    ev.add_argument("--bin-width", type=float, default=5.0, help="SNR bin width in dB")
    ev.add_argument("--by", help="group by condition cells: comma-separated keys of channel, dmrs, speed, "
                                 "delay_spread, mod (speed and delay spread in bins); the table then has a row per "
                                 "cell and SNR bin with error counts, --plot draws a heatmap of DeepRx / LS-LMMSE, "
                                 "e.g. --by channel,dmrs,speed,delay_spread on a 'grid' dataset")
    ev.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                    help="what runs the model: eager PyTorch (the reference) or the server's ONNX Runtime "
                         "backend (several times faster on a CPU; LLRs equal within 1e-4)")
    ev.set_defaults(run=_eval)

    from service.influence.scores import NORMALISATIONS

    influence = commands.add_parser(
        "influence", help="rank pool slots by how much training on them would lower a target's loss",
        description="Influence I(z,T) = -g_T^T H^-1 g(z) of every pool slot z on the mean loss of the target "
                    "slots T; negative = beneficial. Prints the top (most beneficial) slots with their scenario "
                    "parameters, so you can see which conditions help the target.")
    _influence_arguments(influence, fit_slots=512)
    influence.add_argument("--targets", type=Path, required=True, help="HDF5 target slots (the weak condition)")
    influence.add_argument("--score", choices=NORMALISATIONS, default="l-relative", help="score normalisation")
    influence.add_argument("--rank", type=int, default=64, help="eigenpairs kept by --method arnoldi")
    influence.add_argument("--compress", help="sketch gradients: mask:FRACTION, gauss:DIM or sjlt:DIM "
                                              "(raw and l-relative scores)")
    influence.add_argument("--top", type=int, default=10, help="how many pool slots to print")
    influence.add_argument("--json", action="store_true", help="print one JSON object")
    influence.set_defaults(run=_influence)

    index = commands.add_parser(
        "influence-index", help="build or extend a gradient index over a pool (also: influence index)",
        description="Index a pool's sketched H^-1 g(z) rows for one-product influence queries. Builds the index "
                    "when it is missing or was built on another model version; otherwise adds the pool rows "
                    "not yet indexed (rows are named row-N by their position in --pool).")
    _influence_arguments(index, fit_slots=256)
    index.add_argument("--index", type=Path, required=True, help="index directory")
    index.add_argument("--version", help="model version tag (default: checkpoint name@steps)")
    index.add_argument("--compress", default="sjlt:4096", help="mask:P, gauss:D, sjlt:D, or none")
    index.add_argument("--ray", metavar="ADDRESS",
                       help="shard the pool's per-sample gradients over Ray workers (needs the 'ray' extra: pip "
                            "install 'deeprx-adapt[ray]'); the index written is the same. ADDRESS: a Ray cluster "
                            "address (e.g. ray://head:10001, head:6379 or auto; its nodes need this project "
                            "installed), or 'local' / 'local:N' to start a local Ray instance with one worker "
                            "process per core / N worker processes, stopped afterwards")
    index.set_defaults(run=_influence_index)

    experiment = commands.add_parser(
        "experiment", help="compare adaptation methods on target conditions over seeds",
        description="For each target (a scenario spec, simulated with deeprx-client, or an HDF5 file): adapt "
                    "with each method, report held-out target BER before/after, gap closure toward genie "
                    "((before - after) / (before - genie)), non-target BER change, wall time, mean and spread "
                    "over seeds. Methods: none, random, target-only, first-order, second-order, target+first-order; "
                    "influence-guided ones take :CURVATURE:SCORE, e.g. first-order:identity:raw; specialist is "
                    "the yardstick (fine-tuned on every target slot not held out until validation BER stops "
                    "falling), and each gain is also reported as a fraction of the specialist's.")
    experiment.add_argument("--model", type=Path, required=True)
    experiment.add_argument("--pool", type=Path, required=True, help="HDF5 pool the methods draw from")
    experiment.add_argument("--targets", nargs="+", required=True, help="scenario specs or HDF5 files")
    experiment.add_argument("--methods", default="none,random,first-order,second-order,target-only")
    experiment.add_argument("--seeds", type=int, default=5)
    experiment.add_argument("--first-seed", dest="first_seed", type=int, default=0,
                            help="seeds run are first-seed .. first-seed + seeds - 1 (to resume a stopped run)")
    experiment.add_argument("--regression", type=Path, help="HDF5 non-target slots (default: the pool)")
    experiment.add_argument("--regression-slots", dest="regression_slots", type=int, default=512)
    experiment.add_argument("--target-slots", dest="target_slots", type=int, default=320,
                            help="slots simulated per target spec")
    experiment.add_argument("--adaptation-slots", dest="adaptation_slots", type=int, default=64,
                            help="labelled target slots a method may use; the rest are held out")
    experiment.add_argument("--held-out-slots", dest="held_out_slots", type=int,
                            help="hold out this many target slots, drawn before the adaptation slots so runs with "
                                 "other --adaptation-slots score the same held-out slots (default: all the rest)")
    experiment.add_argument("--fit-slots", dest="fit_slots", type=int, default=256,
                            help="pool slots the curvature H is fitted on")
    experiment.add_argument("--specialist-slots", dest="specialist_slots", type=int, default=4000,
                            help="target slots (not held out) the specialist trains on; its last fifth, at most "
                                 "256 slots, decides when to stop (needs --held-out-slots; else it gets the "
                                 "adaptation slots)")
    experiment.add_argument("--specialist-steps", dest="specialist_steps", type=int, default=3000,
                            help="the specialist's step cap (checked every 200 steps, stops after 2 checks "
                                 "without a lower validation BER)")
    experiment.add_argument("--rows", type=Path, help="append each result as a JSON line to this file as it is "
                            "made; the table and plot summarise every row in it, earlier runs' included")
    experiment.add_argument("--multi-target", dest="multi_target", action="store_true",
                            help="also adapt to all targets at once")
    experiment.add_argument("--k", type=int, default=64, help="pool slots selected (first-order, random)")
    experiment.add_argument("--steps", type=int, default=50, help="fine-tuning steps")
    experiment.add_argument("--learning-rate", dest="learning_rate", type=float, default=3e-4)
    experiment.add_argument("--second-order-iterations", dest="second_order_iterations", type=int,
                            help="Levenberg-Marquardt steps of second-order (default: the worker's); each "
                                 "costs a gradient and a GGN product over the adaptation slots")
    experiment.add_argument("--validation-fraction", dest="validation_fraction", type=float, default=0.0,
                            help="target-only and target+first-order hold out this part of the adaptation slots "
                                 "and keep the fine-tuning step (0 included) with the lowest BER on it, checked "
                                 "every 50 steps (0: no hold-out, all steps)")
    experiment.add_argument("--refine-iterations", dest="refine_iterations", type=int, default=0,
                            help="Levenberg-Marquardt steps along -H^-1 g_T on the adaptation slots after "
                                 "target-only and target+first-order fine-tuning (0: none)")
    experiment.add_argument("--replay", type=float, default=0.5,
                            help="fraction of each fine-tuning minibatch drawn from the rehearsal set (0: none)")
    experiment.add_argument("--rehearsal", type=Path,
                            help="HDF5 slots the fine-tuning replays, e.g. the training mix (default: the pool); "
                                 "keep them apart from --regression")
    experiment.add_argument("--rehearsal-slots", dest="rehearsal_slots", type=int, default=2000)
    experiment.add_argument("--json", action="store_true")
    experiment.add_argument("--plot", type=Path, help="gap-closure bar chart (PNG)")
    experiment.set_defaults(run=_experiment)

    serve = commands.add_parser("serve", help="run the gRPC receiver service",
                                description="Serve DeepRx over gRPC (deeprx.v1.Receiver, health, reflection) "
                                            "with Prometheus metrics. The registry and sample store live under "
                                            "--store; on first start --model is imported as version v1, later "
                                            "starts resume the last active version.")
    serve.add_argument("--model", type=Path, help="checkpoint to import when the store has no active model")
    serve.add_argument("--store", type=Path, required=True, help="directory for the model registry and samples")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    serve.add_argument("--metrics-port", dest="metrics_port", type=int, default=9100,
                       help="Prometheus /metrics port (0: any free port)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    serve.add_argument("--metrics-host", dest="metrics_host", metavar="HOST",
                       help="address /metrics binds to (default 127.0.0.1: it has no authentication; 0.0.0.0 "
                            "where Prometheus scrapes from another host or container)")
    serve.add_argument("--admin-token", dest="admin_token", metavar="TOKEN",
                       help="bearer token that ActivateModel, ReleaseScope and TriggerAdaptation require (clients "
                            "send 'authorization: Bearer TOKEN'); overrides [security] admin_token and "
                            "DEEPRX_ADMIN_TOKEN. Prefer the variable: a flag is visible in the process list. "
                            "With no token at all these RPCs are open")
    serve.add_argument("--tls-cert", dest="tls_cert", metavar="PEM",
                       help="PEM server certificate (chain): with --tls-key the gRPC port speaks TLS only")
    serve.add_argument("--tls-key", dest="tls_key", metavar="PEM", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", dest="tls_client_ca", metavar="PEM",
                       help="PEM CA: clients must present a certificate it signed (mutual TLS)")
    serve.add_argument("--config", type=Path,
                       help="TOML file overriding the defaults of service/config.py (batching, limits, capture, "
                            "monitor, security, ...)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get on shutdown")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["influence", "index"]:  # `influence index ...` is `influence-index ...`
        argv = ["influence-index", *argv[2:]]
    args = build_parser().parse_args(argv)
    _set_threads(args.threads)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"deeprx-service: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
