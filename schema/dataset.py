"""The slot dataset: one HDF5 file, one row per slot, written by the simulator, read by the receiver.

Layout (``N`` slots, ``A`` receive antennas, ``S`` = 14 OFDM symbols, ``F`` subcarriers):

==================  =====================  ===========================================================
dataset             shape, dtype           meaning
==================  =====================  ===========================================================
``y``               (N, A, S, F) complex64  received resource grid after the channel and noise
``pilots``          (N, S, F) complex64     transmitted DMRS values at pilot REs, 0 elsewhere
``data_mask``       (N, S, F) bool          REs that carry data (PUSCH, not DMRS or DMRS-CDM)
``bits``            (N, S, F, 6) uint8      coded bits per data RE, padded with 0 beyond the modulation
``bits_per_symbol`` (N,) uint8              2 (QPSK), 4 (16QAM), 6 (64QAM)
``snr_db``          (N,) float32            Es/N0 per RE; noise variance ``no = 10**(-snr_db/10)``
``channel``         (N,) bytes              channel family, e.g. ``TDL-C``
``delay_spread_ns`` ``speed_mps`` ``dmrs_additional_position``: (N,) per-slot scenario draws
``ls_lmmse_errors``  (N,) int32             bit errors of LS estimation + LMMSE equalisation
``genie_errors``     (N,) int32             bit errors of perfect-CSI LMMSE
``num_bits``         (N,) int32             coded bits in the slot (data REs x bits per symbol)
==================  =====================  ===========================================================

File attributes: ``scenario`` (canonical spec), ``seed``, ``prb``, ``rx``, ``scs_khz``,
``carrier_ghz``, ``schema_version``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1

PER_SLOT_SCALARS = {
    "bits_per_symbol": np.uint8,
    "snr_db": np.float32,
    "delay_spread_ns": np.float32,
    "speed_mps": np.float32,
    "dmrs_additional_position": np.uint8,
    "ls_lmmse_errors": np.int32,
    "genie_errors": np.int32,
    "num_bits": np.int32,
}


@dataclass
class SlotBatch:
    """A batch of simulated slots, as arrays (see the module docstring for shapes)."""

    y: np.ndarray
    pilots: np.ndarray
    data_mask: np.ndarray
    bits: np.ndarray
    bits_per_symbol: np.ndarray
    snr_db: np.ndarray
    channel: np.ndarray
    delay_spread_ns: np.ndarray
    speed_mps: np.ndarray
    dmrs_additional_position: np.ndarray
    ls_lmmse_errors: np.ndarray
    genie_errors: np.ndarray
    num_bits: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def select(self, index) -> "SlotBatch":
        """Rows ``index`` (a slice, an index array or a boolean mask) as a new batch."""
        return SlotBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concatenate(batches: list["SlotBatch"]) -> "SlotBatch":
        return SlotBatch(**{
            f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(SlotBatch)
        })


class SlotWriter:
    """Appends batches to a new HDF5 dataset file; rows are visible once the file is closed."""

    def __init__(self, path: str | Path, attrs: dict, rx: int, num_subcarriers: int):
        self._file = h5py.File(path, "w")
        self._file.attrs.update({**attrs, "schema_version": SCHEMA_VERSION})
        s, f = 14, num_subcarriers
        shapes = {
            "y": ((rx, s, f), np.complex64),
            "pilots": ((s, f), np.complex64),
            "data_mask": ((s, f), np.bool_),
            "bits": ((s, f, 6), np.uint8),
            "channel": ((), h5py.string_dtype("ascii")),
            **{name: ((), dtype) for name, dtype in PER_SLOT_SCALARS.items()},
        }
        for name, (shape, dtype) in shapes.items():
            self._file.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                chunks=(64, *shape), compression="lzf",
            )

    def append(self, batch: SlotBatch) -> None:
        n = len(batch)
        for f in fields(batch):
            ds = self._file[f.name]
            start = ds.shape[0]
            ds.resize(start + n, axis=0)
            value = getattr(batch, f.name)
            ds[start:] = value.astype(object) if f.name == "channel" else value

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SlotWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_slots(path: str | Path, index=None) -> tuple[SlotBatch, dict]:
    """Read all rows (or ``index``: a slice or sorted index array) and the file attributes."""
    index = slice(None) if index is None else index
    try:
        handle = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise FileNotFoundError(f"cannot open slot dataset '{path}': {err}") from None
    with handle as file:
        version = file.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"'{path}' has schema_version {version}, expected {SCHEMA_VERSION}")
        columns = {f.name: file[f.name][index] for f in fields(SlotBatch)}
        columns["channel"] = np.asarray([c.decode() if isinstance(c, bytes) else c for c in columns["channel"]])
        return SlotBatch(**columns), dict(file.attrs)


def read_datasets(paths: Sequence[str | Path]) -> tuple[SlotBatch, list[dict]]:
    """Several datasets read as one, concatenated in order (a training set in parts, or a grid
    simulated in parallel parts), with each file's attributes; their slots must share antennas and
    grid size."""
    parts = [read_slots(path) for path in paths]
    shapes = {part.y.shape[1:] for part, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"datasets differ in antennas or grid size ({sorted(shapes)}); use one shape at a time")
    return SlotBatch.concatenate([part for part, _ in parts]), [attrs for _, attrs in parts]
