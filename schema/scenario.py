"""Scenario specs: which channel, mobility, SNR and NR numerology a batch of slots comes from.

A spec is a comma-separated list of ``key=value`` pairs, e.g.
``channel=TDL-E,delay_spread=300,speed=60:120,snr=5:15,dmrs=0,mod=16qam,prb=4,rx=2``,
or the name of a preset (see :data:`PRESETS`). Numeric keys accept a range ``a:b``
(drawn uniformly); ``channel`` and ``mod`` accept alternatives ``A|B``.
Keys left out take :data:`DEFAULTS`, the configuration the shipped ``small`` model
was trained for, so ``channel=CDL-D`` alone yields slots that model can receive.
"""
from __future__ import annotations

from dataclasses import dataclass

CHANNEL_FAMILIES = tuple(f"{kind}-{letter}" for kind in ("TDL", "CDL") for letter in "ABCDE")
MODULATIONS = {"qpsk": 2, "16qam": 4, "64qam": 6}
MAX_BITS_PER_SYMBOL = 6
NUM_OFDM_SYMBOLS = 14

DEFAULTS = "channel=TDL-C,delay_spread=30:300,speed=0:30,snr=0:25,dmrs=1,mod=16qam,prb=4,rx=2,scs=30,fc=3.5"

PRESETS = {
    "train": "channel=TDL-A|TDL-B|TDL-C|TDL-D|TDL-E,delay_spread=30:300,speed=0:30,snr=0:25,dmrs=0:1,mod=16qam",
    "drift-highspeed": "channel=TDL-C|TDL-D,delay_spread=100:300,speed=90:150,snr=5:25,dmrs=0",
    "drift-longdelay": "channel=TDL-A|TDL-C,delay_spread=700:1200,speed=0:30,snr=5:25,dmrs=0:1",
    "drift-cdl": "channel=CDL-A|CDL-B|CDL-C,delay_spread=100:300,speed=0:30,snr=5:25,dmrs=0:1",
}


# Stratified grids: one spec per cell, the same number of slots per cell. ``grid`` is the standard
# in-distribution grid: every training channel family x DMRS setting x a low/high speed bin x a
# short/long delay-spread bin, all inside the ``train`` ranges, with SNR 0..30 dB.
GRIDS = {
    "grid": [
        f"channel={channel},dmrs={dmrs},speed={speed},delay_spread={delay},snr=0:30,mod=16qam"
        for channel in ("TDL-A", "TDL-B", "TDL-C", "TDL-D", "TDL-E")
        for dmrs in (0, 1)
        for speed in ("0:15", "15:30")
        for delay in ("30:165", "165:300")
    ],
}


class ScenarioError(ValueError):
    """A scenario spec that cannot be simulated; the message names the key."""


@dataclass(frozen=True)
class Range:
    """A closed interval; ``low == high`` is a fixed value."""

    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def __str__(self) -> str:
        fmt = lambda v: f"{v:g}"  # noqa: E731
        return fmt(self.low) if self.fixed else f"{fmt(self.low)}:{fmt(self.high)}"


@dataclass(frozen=True)
class Scenario:
    """A validated scenario. Grid-shaping keys (prb, rx, scs) are single values."""

    channels: tuple[str, ...]
    delay_spread_ns: Range
    speed_mps: Range
    snr_db: Range
    dmrs_additional_positions: Range
    modulations: tuple[str, ...]
    prb: int
    rx: int
    scs_khz: int
    carrier_ghz: float

    @property
    def num_subcarriers(self) -> int:
        return 12 * self.prb

    def spec(self) -> str:
        """The canonical spec string; parsing it gives back an equal scenario."""
        return (
            f"channel={'|'.join(self.channels)},delay_spread={self.delay_spread_ns},"
            f"speed={self.speed_mps},snr={self.snr_db},dmrs={self.dmrs_additional_positions},"
            f"mod={'|'.join(self.modulations)},prb={self.prb},rx={self.rx},"
            f"scs={self.scs_khz},fc={self.carrier_ghz:g}"
        )


def _split_pairs(spec: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ScenarioError(f"'{item}' is not key=value (known keys: {', '.join(_PARSERS)})")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in _PARSERS:
            raise ScenarioError(f"unknown key '{key}' (known keys: {', '.join(_PARSERS)})")
        if not value:
            raise ScenarioError(f"key '{key}' has no value")
        pairs[key] = value
    return pairs


def _range(key: str, value: str, low: float, high: float, integer: bool = False) -> Range:
    parts = value.split(":")
    if len(parts) > 2:
        raise ScenarioError(f"key '{key}': '{value}' is not a number or a range a:b")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ScenarioError(f"key '{key}': '{value}' is not a number or a range a:b") from None
    if integer and any(n != int(n) for n in numbers):
        raise ScenarioError(f"key '{key}' takes integers, got '{value}'")
    lo, hi = numbers[0], numbers[-1]
    if lo > hi:
        raise ScenarioError(f"key '{key}': range {value} is empty (low > high)")
    if lo < low or hi > high:
        raise ScenarioError(f"key '{key}': {value} is outside [{low:g}, {high:g}]")
    return Range(lo, hi)


def _scalar(key: str, value: str, low: float, high: float) -> float:
    if ":" in value:
        raise ScenarioError(f"key '{key}' takes a single value, got '{value}'")
    return _range(key, value, low, high).low


def _single(key: str, value: str, allowed: tuple[int, ...]) -> int:
    if ":" in value:
        raise ScenarioError(f"key '{key}' fixes the grid shape and takes a single value, got '{value}'")
    try:
        number = int(value)
    except ValueError:
        raise ScenarioError(f"key '{key}': '{value}' is not an integer") from None
    if number not in allowed:
        shown = allowed if len(allowed) < 10 else f"{allowed[0]}..{allowed[-1]}"
        raise ScenarioError(f"key '{key}': {number} is not one of {shown}")
    return number


def _choices(key: str, value: str, allowed: tuple[str, ...], normalise) -> tuple[str, ...]:
    picked = tuple(normalise(v.strip()) for v in value.split("|"))
    for choice in picked:
        if choice not in allowed:
            raise ScenarioError(f"key '{key}': '{choice}' is not one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(picked))


_PARSERS = {
    "channel": lambda v: ("channels", _choices("channel", v, CHANNEL_FAMILIES, str.upper)),
    "delay_spread": lambda v: ("delay_spread_ns", _range("delay_spread", v, 1.0, 5000.0)),
    "speed": lambda v: ("speed_mps", _range("speed", v, 0.0, 500.0)),
    "snr": lambda v: ("snr_db", _range("snr", v, -20.0, 50.0)),
    "dmrs": lambda v: ("dmrs_additional_positions", _range("dmrs", v, 0, 3, integer=True)),
    "mod": lambda v: ("modulations", _choices("mod", v, tuple(MODULATIONS), str.lower)),
    "prb": lambda v: ("prb", _single("prb", v, tuple(range(1, 276)))),
    "rx": lambda v: ("rx", _single("rx", v, (1, 2, 4))),
    "scs": lambda v: ("scs_khz", _single("scs", v, (15, 30))),
    "fc": lambda v: ("carrier_ghz", _scalar("fc", v, 0.4, 52.6)),
}


def parse_scenario(spec: str) -> Scenario:
    """Parse a spec string or preset name into a validated :class:`Scenario`.

    Raises :class:`ScenarioError` naming the offending key.
    """
    spec = spec.strip()
    if spec in PRESETS:
        spec = PRESETS[spec]
    elif "=" not in spec:
        raise ScenarioError(f"'{spec}' is neither a preset ({', '.join(PRESETS)}) nor a key=value spec")
    fields = dict(_PARSERS[k](v) for k, v in _split_pairs(DEFAULTS).items())
    fields.update(_PARSERS[k](v) for k, v in _split_pairs(spec).items())
    return Scenario(**fields)
