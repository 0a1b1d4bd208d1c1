"""``deeprx-client``: simulate slots with Sionna (and, later, stream them to the service)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from schema.scenario import GRIDS, PRESETS, ScenarioError, parse_scenario

SCENARIO_HELP = (
    "scenario spec such as 'channel=TDL-E,delay_spread=300,speed=60:120,snr=5:15,dmrs=0,"
    "mod=16qam,prb=4,rx=2' (delay spread ns, speed m/s, SNR dB; a:b draws uniformly, "
    f"A|B picks one) or a preset: {', '.join(PRESETS)}; 'simulate' also takes the stratified "
    f"grid{'s' if len(GRIDS) > 1 else ''} {', '.join(GRIDS)} (--slots split evenly over its cells)"
)


def _simulate(args: argparse.Namespace) -> int:
    import math

    from tqdm import tqdm

    from client.simulator import SlotSimulator
    from schema.dataset import SlotWriter

    cells = GRIDS.get(args.scenario, [args.scenario])
    scenarios = [parse_scenario(spec) for spec in cells]
    first = scenarios[0]
    per_cell = math.ceil(args.slots / len(cells))
    attrs = {"scenario": args.scenario if len(cells) > 1 else first.spec(), "seed": args.seed, "prb": first.prb,
             "rx": first.rx, "scs_khz": first.scs_khz, "carrier_ghz": first.carrier_ghz,
             "group_size": args.group_size, "slots_per_cell": per_cell}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    with SlotWriter(partial, attrs, first.rx, first.num_subcarriers) as writer, \
            tqdm(total=per_cell * len(cells), unit="slot", desc="simulate", disable=args.quiet) as bar:
        for cell, scenario in enumerate(scenarios):  # a grid's cells: one seed each, all derived from --seed
            simulator = SlotSimulator(scenario, seed=args.seed * 1000 + cell if len(cells) > 1 else args.seed,
                                      group_size=args.group_size)
            for batch in simulator.batches(per_cell):
                writer.append(batch)
                bar.update(len(batch))
    partial.replace(args.out)  # a crash leaves only the .partial file, never a truncated dataset
    if not args.quiet:
        print(f"wrote {per_cell * len(cells)} slots of '{attrs['scenario']}' to {args.out}")
    return 0


def _endpoint(args: argparse.Namespace):
    """``--server`` with the TLS and token options of ``_server_arguments``."""
    import os

    from client.connection import Endpoint

    return Endpoint(args.server, args.token or os.environ.get("DEEPRX_ADMIN_TOKEN", ""),
                    args.tls_ca, args.tls_cert, args.tls_key)


def _channel(args: argparse.Namespace):
    """A channel to ``--server`` once it answers (``--connect-timeout``)."""
    return _endpoint(args).connect(args.connect_timeout)


def _load_or_simulate(args: argparse.Namespace):
    from schema.dataset import SlotBatch, read_slots

    if args.data:
        slots, attrs = read_slots(args.data)
        return (slots.select(slice(0, args.slots)) if args.slots else slots), int(attrs["scs_khz"])
    from tqdm import tqdm

    from client.simulator import SlotSimulator

    scenario = parse_scenario(args.scenario)
    simulator = SlotSimulator(scenario, seed=args.seed)
    with tqdm(total=args.slots, unit="slot", desc="simulate", disable=args.json) as bar:
        batches = []
        for batch in simulator.batches(args.slots):
            batches.append(batch)
            bar.update(len(batch))
    return SlotBatch.concatenate(batches), scenario.scs_khz


def _stream(args: argparse.Namespace) -> int:
    import json

    from client.stream import send_crc_feedback, send_genie_feedback, stream_slots

    if not args.data and not args.slots:
        raise ScenarioError("give --slots with --scenario")
    slots, scs_khz = _load_or_simulate(args)
    crc_passed = None
    endpoint = _endpoint(args)
    with endpoint.connect(args.connect_timeout) as channel:  # waits for a service that is still starting
        report, results = stream_slots(endpoint, slots, args.context, streams=args.streams, rate=args.rate,
                                       prefix=args.prefix, window=args.window)
        feedback = None
        if args.feedback == "genie":
            feedback = send_genie_feedback(channel, slots, prefix=args.prefix)
        elif args.feedback == "crc":
            feedback, crc_passed = send_crc_feedback(channel, slots, results, scs_khz, prefix=args.prefix)
    bits = max(1, int(slots.num_bits.sum()))
    summary = {
        "slots": report.slots, "streams": args.streams, "seconds": round(report.seconds, 3),
        "slots_per_second": report.slots / report.seconds,
        "ber": {"served": report.ber, "ls_lmmse": int(slots.ls_lmmse_errors.sum()) / bits,
                "genie": int(slots.genie_errors.sum()) / bits},
        "latency_ms": {"p50": report.percentile_ms(50), "p90": report.percentile_ms(90),
                       "p99": report.percentile_ms(99)},
        "server_latency_ms": {"p50": report.percentile_ms(50, server=True),
                              "p99": report.percentile_ms(99, server=True)},
        "model_versions": report.versions,
        "feedback_accepted": feedback.accepted if feedback else 0,
        "transport_blocks_passed": crc_passed,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['slots']} slots over {args.streams} stream(s) in {report.seconds:.2f} s: "
          f"{summary['slots_per_second']:.1f} slots/s; model versions {report.versions}")
    print(f"latency round trip p50 {summary['latency_ms']['p50']:.1f} ms, p90 {summary['latency_ms']['p90']:.1f} ms, "
          f"p99 {summary['latency_ms']['p99']:.1f} ms (server p50 {summary['server_latency_ms']['p50']:.1f} ms)")
    print(f"uncoded BER  served {summary['ber']['served']:.5f}   LS-LMMSE {summary['ber']['ls_lmmse']:.5f}   "
          f"genie {summary['ber']['genie']:.5f}")
    if feedback:
        print(f"feedback ({args.feedback}): {feedback.accepted} slots labelled, {feedback.unknown_slots} unknown "
              f"to the server" + (f"; {crc_passed}/{len(slots)} transport blocks passed CRC"
                                  if crc_passed is not None else ""))
    return 0


def _call(args: argparse.Namespace, method: str, request):
    """One RPC on the service named by ``--server``."""
    from proto import receiver_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        return getattr(pb_grpc.ReceiverStub(channel), method)(request, timeout=args.timeout)


def _models(args: argparse.Namespace) -> int:
    from proto import receiver_pb2 as pb

    response = _call(args, "ListModels", pb.ListModelsRequest())
    print(f"{'version':>8} {'active':>6} {'parent':>8} {'creator':>16} {'created':>25} {'serves contexts':>16}  metrics")
    for m in response.models:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items()))
        scoped = ",".join(m.scoped_contexts) or "-"
        print(f"{m.version:>8} {'*' if m.active else '':>6} {m.parent:>8} {m.creator[:16]:>16} {m.created:>25} "
              f"{scoped[:16]:>16}  {metrics}")
    return 0


def _activate(args: argparse.Namespace) -> int:
    from proto import receiver_pb2 as pb

    info = _call(args, "ActivateModel", pb.ActivateModelRequest(version=args.version, context=args.context or ""))
    print(f"{info.version} now serves context '{args.context}'" if args.context else f"active model is now {info.version}")
    return 0


def _release(args: argparse.Namespace) -> int:
    from proto import receiver_pb2 as pb

    response = _call(args, "ReleaseScope", pb.ReleaseScopeRequest(context=args.context))
    state = "released" if response.released else "had no scoped version"
    print(f"'{args.context}' {state}; served by {response.serving_version}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from proto import receiver_pb2 as pb

    response = _call(args, "ListTargets", pb.ListTargetsRequest())
    print(f"{'context':>20} {'target':>6} {'slots':>6} {'served BER':>11} {'genie BER':>10} {'estimated':>10} "
          f"{'pilot SINR':>10}")
    for t in response.contexts:
        genie = f"{t.genie_ber:.5f}" if t.genie_ber >= 0 else "-"
        estimate = f"{t.estimated_ber:.5f}" if t.estimated_ber >= 0 else "-"
        sinr = f"{t.pilot_sinr_db:.1f} dB" if t.pilot_sinr_db == t.pilot_sinr_db else "-"  # NaN: none served
        print(f"{t.context[:20]:>20} {'yes' if t.is_target else '':>6} {t.slots:>6} {t.ber:>11.5f} {genie:>10} "
              f"{estimate:>10} {sinr:>10}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from proto import receiver_pb2 as pb
    from proto import receiver_pb2_grpc as pb_grpc

    options = dict(args.option)
    with _channel(args) as channel:
        stub = pb_grpc.ReceiverStub(channel)
        job = stub.TriggerAdaptation(pb.AdaptationRequest(context=args.context or "", slot_ids=args.slot_ids,
                                                          method=args.method, options=options,
                                                          global_update=args.global_update), timeout=args.timeout)
        print(f"queued {job.job_id} ({job.method} on '{job.context}', scope {job.scope})")
        if not args.wait:
            return 0
        running = (pb.AdaptationJob.QUEUED, pb.AdaptationJob.RUNNING)
        # percent done, time so far and the stage: a rate in %/s and an ETA from it jump between stages
        with tqdm(total=100, desc=job.job_id, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}") as bar:
            while job.state in running:
                time.sleep(0.5)
                job = stub.GetAdaptation(pb.GetAdaptationRequest(job_id=job.job_id), timeout=args.timeout)
                bar.update(round(job.progress * 100) - bar.n)
                bar.set_postfix_str(job.stage)
    state = pb.AdaptationJob.State.Name(job.state)
    protected = "regression set" if job.scope in ("", "global") else "guard (the context's newest slots)"
    print(f"{job.job_id}: {state}; held-out target BER {job.ber_before:.5f} -> {job.ber_after:.5f}; "
          f"{protected} BER {job.regression_ber_before:.5f} -> {job.regression_ber_after:.5f}")
    if job.new_version:
        print(f"version {job.new_version} ({'active' if state == 'ACCEPTED' else 'kept, not served'}); "
              f"selected: {job.selected_summary or '-'}")
    print(job.message)
    if job.stage_seconds:
        slowest_first = sorted(job.stage_seconds.items(), key=lambda stage: -stage[1])
        print("stages: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in slowest_first))
    return 0 if state in ("ACCEPTED", "REJECTED") else 1


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key, value


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the service")
    parser.add_argument("--connect-timeout", dest="connect_timeout", type=float, default=30.0,
                        help="seconds to wait for the service to answer")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-RPC timeout in seconds")
    parser.add_argument("--token", metavar="TOKEN", help="admin token, sent as 'authorization: Bearer TOKEN' on every call "
                                        "(default: $DEEPRX_ADMIN_TOKEN); activate and adapt need it when the "
                                        "service has one, every command when it protects reads too")
    parser.add_argument("--tls-ca", dest="tls_ca", type=Path, metavar="PEM",
                        help="PEM CA of the server's certificate: connect over TLS (default: plaintext)")
    parser.add_argument("--tls-cert", dest="tls_cert", type=Path, metavar="PEM",
                        help="PEM client certificate for a service that requires one (mutual TLS)")
    parser.add_argument("--tls-key", dest="tls_key", type=Path, metavar="PEM", help="PEM private key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeprx-client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "simulate", help="simulate 5G NR PUSCH slots to an HDF5 dataset",
        description="Simulate PUSCH slots through a 3GPP channel with Sionna and write them, with "
                    "the LS-LMMSE and genie baselines' bit errors, to an HDF5 file.",
    )
    sim.add_argument("--scenario", required=True, help=SCENARIO_HELP)
    sim.add_argument("--slots", type=int, required=True, help="number of slots to simulate")
    sim.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    sim.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    sim.add_argument("--group-size", type=int, default=8,
                     help="slots sharing one draw of channel, delay spread, speed, DMRS, modulation")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(run=_simulate)

    stream = commands.add_parser(
        "stream", help="stream simulated slots to a receiver service",
        description="Simulate slots (or read --data), stream them over gRPC, send genie feedback, and print "
                    "the served BER beside the LS-LMMSE and genie BER of the same slots, throughput and latency.",
    )
    _server_arguments(stream)
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenario", help=SCENARIO_HELP)
    source.add_argument("--data", type=Path, help="stream slots from this HDF5 dataset instead")
    stream.add_argument("--slots", type=int, help="number of slots (with --data: the first N)")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--rate", type=float, default=0.0, help="total slots/s to send (0: as fast as served)")
    stream.add_argument("--streams", type=int, default=1, help="concurrent StreamDetect calls")
    stream.add_argument("--window", type=int, default=8, help="slots in flight per stream (closed loop)")
    stream.add_argument("--feedback", choices=("genie", "crc", "none"), default="genie",
                        help="after streaming, report labels: the simulator's true coded bits (genie), or the "
                             "CRC result of LDPC-decoding the served LLRs with the re-encoded bits when it "
                             "passed (crc: the label a real deployment has)")
    stream.add_argument("--context", default="default", help="context key the slots are served under")
    stream.add_argument("--prefix", default="slot", help="slot id prefix (ids are PREFIX-ROW)")
    stream.add_argument("--json", action="store_true", help="print one JSON object")
    stream.set_defaults(run=_stream)

    models = commands.add_parser("models", help="list the service's model versions")
    _server_arguments(models)
    models.set_defaults(run=_models)

    targets = commands.add_parser("targets", help="per-context served BER and which contexts are targets")
    _server_arguments(targets)
    targets.set_defaults(run=_targets)

    adapt = commands.add_parser("adapt", help="start an adaptation job for a target",
                                description="Ask the service to adapt its model to a target (a context key or "
                                            "explicit slot ids); with --wait, follow the job to its end.")
    _server_arguments(adapt)
    adapt.add_argument("--context", help="target context key")
    adapt.add_argument("--slot-ids", dest="slot_ids", nargs="*", default=[], help="explicit target slot ids")
    adapt.add_argument("--method", default="",
                       help="first-order, second-order, random or target-only (default: the server's "
                            "[adaptation] method)")
    adapt.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                       help="job option: k, steps, learning_rate, replay, curvature, validation_fraction, "
                            "refine_iterations (repeatable; the server's [adaptation] values otherwise)")
    adapt.add_argument("--wait", action="store_true", help="show progress until the job ends")
    adapt.add_argument("--global", dest="global_update", action="store_true",
                       help="publish for every context (gated on the training-mix regression set) instead of a "
                            "version scoped to --context")
    adapt.set_defaults(run=_adapt)

    activate = commands.add_parser("activate", help="switch the service to (or roll back to) a stored version")
    _server_arguments(activate)
    activate.add_argument("--version", required=True, help="version name, e.g. v3")
    activate.add_argument("--context", help="serve the version to this context only (a scoped version); "
                                            "default: the global version")
    activate.set_defaults(run=_activate)

    release = commands.add_parser("release", help="send a context back to the global version",
                                  description="Drop the context's scoped version (admin); its slots are served "
                                              "by the global version again.")
    _server_arguments(release)
    release.add_argument("--context", required=True, help="context key")
    release.set_defaults(run=_release)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import grpc

    try:
        return args.run(args)
    except ScenarioError as err:
        print(f"deeprx-client: error: bad --scenario: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"deeprx-client: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        print(f"deeprx-client: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
