"""``deeprx-client``: simulate slots with Sionna (and, later, stream them to the service)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from schema.scenario import PRESETS, ScenarioError, parse_scenario

SCENARIO_HELP = (
    "scenario spec such as 'channel=TDL-E,delay_spread=300,speed=60:120,snr=5:15,dmrs=0,"
    "mod=16qam,prb=4,rx=2' (delay spread ns, speed m/s, SNR dB; a:b draws uniformly, "
    f"A|B picks one) or a preset: {', '.join(PRESETS)}"
)


def _simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from client.simulator import SlotSimulator
    from schema.dataset import SlotWriter

    scenario = parse_scenario(args.scenario)
    simulator = SlotSimulator(scenario, seed=args.seed, group_size=args.group_size)
    attrs = {"scenario": scenario.spec(), "seed": args.seed, "prb": scenario.prb, "rx": scenario.rx,
             "scs_khz": scenario.scs_khz, "carrier_ghz": scenario.carrier_ghz, "group_size": args.group_size}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    with SlotWriter(partial, attrs, scenario.rx, scenario.num_subcarriers) as writer, \
            tqdm(total=args.slots, unit="slot", desc="simulate", disable=args.quiet) as bar:
        for batch in simulator.batches(args.slots):
            writer.append(batch)
            bar.update(len(batch))
    partial.replace(args.out)  # a crash leaves only the .partial file, never a truncated dataset
    if not args.quiet:
        print(f"wrote {args.slots} slots of '{scenario.spec()}' to {args.out}")
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ScenarioError as err:
        print(f"deeprx-client: error: bad --scenario: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
