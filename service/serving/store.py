"""Sample store: captured slots and their feedback labels in SQLite (WAL) with tensor blobs.

Capture happens off the hot path: :meth:`SampleStore.capture` and :meth:`SampleStore.label`
put onto a bounded queue and never wait; when the queue is full the item is dropped (and
counted). One writer thread drains the queue in transactions, so after a crash (even kill -9)
the database holds whole transactions only; ``PRAGMA synchronous=NORMAL`` in WAL mode can lose
the last commits on power loss, never corrupt. Retention keeps the newest ``max_samples`` rows.

The store reads back as a :class:`schema.dataset.SlotBatch`, so a pool of labelled field slots
feeds training, influence and adaptation the same way a simulated dataset does.
"""
from __future__ import annotations

import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from schema.dataset import SlotBatch
from schema.scenario import MAX_BITS_PER_SYMBOL
from service.serving.slot import ReceivedSlot

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slot_id TEXT NOT NULL UNIQUE,
    context TEXT NOT NULL,
    model_version TEXT NOT NULL,
    created REAL NOT NULL,        -- when the slot arrived (unix seconds); labelled() reads in this order
    rx INTEGER NOT NULL,
    subcarriers INTEGER NOT NULL,
    bits_per_symbol INTEGER NOT NULL,
    noise_variance REAL NOT NULL,
    grid BLOB NOT NULL,           -- complex64 [rx, 14, subcarriers]
    pilots BLOB NOT NULL,         -- complex64 [14, subcarriers]
    data_mask BLOB NOT NULL,      -- uint8 [14, subcarriers]
    labels BLOB,                  -- uint8 [data REs, bits_per_symbol]; NULL until feedback
    label_source TEXT,            -- genie | crc
    bit_errors INTEGER,           -- served hard-decision errors measured by the feedback
    num_bits INTEGER,
    reference_genie_errors INTEGER,
    reference_ls_lmmse_errors INTEGER
);
CREATE INDEX IF NOT EXISTS samples_context ON samples (context, id);
"""


@dataclass(frozen=True)
class CapturedSlot:
    slot: ReceivedSlot
    model_version: str


@dataclass(frozen=True)
class SlotLabel:
    slot_id: str
    labels: np.ndarray  # uint8 [data REs, bits per symbol]
    source: str
    bit_errors: int
    num_bits: int
    reference_genie_errors: int | None = None
    reference_ls_lmmse_errors: int | None = None


_STOP = object()


class SampleStore:
    def __init__(self, directory: str | Path, max_samples: int = 100_000, queue_size: int = 4096,
                 on_dropped: Callable[[], None] = lambda: None, on_written: Callable[[int], None] = lambda n: None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "samples.sqlite"
        self.max_samples = max_samples
        self._on_dropped = on_dropped
        self._on_written = on_written
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="sample-store-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    # ------------------------------------------------------------ hot path (never blocks)
    def _offer(self, item) -> bool:
        if self._closed:
            return False
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._on_dropped()
            return False

    def capture(self, slot: ReceivedSlot, model_version: str) -> bool:
        """Queue a slot served by ``model_version`` for storage; False (and counted) when the queue is full."""
        return self._offer(CapturedSlot(slot, model_version))

    def label(self, label: SlotLabel) -> bool:
        """Queue a feedback label for a captured slot."""
        return self._offer(label)

    # ------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        db = self._connect()
        stop = False
        while not stop:
            items = [self._queue.get()]
            deadline = time.monotonic() + 0.05
            while len(items) < 256 and (remaining := deadline - time.monotonic()) > 0:
                try:
                    items.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            slots = [i for i in items if isinstance(i, CapturedSlot)]
            labels = [i for i in items if isinstance(i, SlotLabel)]
            now, clock = time.time(), time.perf_counter()  # created: when the slot arrived, in wall time
            with db:
                db.executemany(
                    "INSERT OR IGNORE INTO samples (slot_id, context, model_version, created, rx, subcarriers, "
                    "bits_per_symbol, noise_variance, grid, pilots, data_mask) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(c.slot.slot_id, c.slot.context, c.model_version,
                      now - (clock - c.slot.arrival) if c.slot.arrival else now, c.slot.grid.shape[0],
                      c.slot.grid.shape[2], c.slot.bits_per_symbol, c.slot.noise_variance,
                      c.slot.grid.astype(np.complex64).tobytes(), c.slot.pilots.astype(np.complex64).tobytes(),
                      c.slot.data_mask.astype(np.uint8).tobytes())
                     for c in slots])
                db.executemany(
                    "UPDATE samples SET labels=?, label_source=?, bit_errors=?, num_bits=?, "
                    "reference_genie_errors=?, reference_ls_lmmse_errors=? WHERE slot_id=?",
                    [(lab.labels.astype(np.uint8).tobytes(), lab.source, lab.bit_errors, lab.num_bits,
                      lab.reference_genie_errors, lab.reference_ls_lmmse_errors, lab.slot_id) for lab in labels])
                db.execute("DELETE FROM samples WHERE id <= (SELECT MAX(id) FROM samples) - ?", (self.max_samples,))
            if slots:
                self._on_written(len(slots))
            for marker in (i for i in items if isinstance(i, _Marker)):
                marker.event.set()
        db.close()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far is committed."""
        if self._closed:
            return
        marker = _Marker(threading.Event())
        self._queue.put(marker)
        marker.event.wait(timeout)

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join()

    # ------------------------------------------------------------ reading
    def count(self, labelled_only: bool = False) -> int:
        with self._connect() as db:
            where = " WHERE labels IS NOT NULL" if labelled_only else ""
            return int(db.execute(f"SELECT COUNT(*) FROM samples{where}").fetchone()[0])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("samples.sqlite*") if p.exists())

    def labelled(self, context: str | None = None, limit: int | None = None) -> tuple[SlotBatch, list[str]]:
        """Labelled samples in the order they arrived (batchers that run batches at once store them in
        the order their batches finish) as a SlotBatch plus their slot ids.

        Field slots carry no scenario draws: ``channel`` holds the context, delay spread and speed
        are NaN, SNR comes from the noise-variance hint, reference errors are -1 when unreported.
        Raises LookupError when nothing matches.
        """
        query = ("SELECT slot_id, context, rx, subcarriers, bits_per_symbol, noise_variance, grid, pilots, "
                 "data_mask, labels, bit_errors, num_bits, reference_genie_errors, reference_ls_lmmse_errors "
                 "FROM samples WHERE labels IS NOT NULL")
        args: list = []
        if context is not None:
            query += " AND context = ?"
            args.append(context)
        query += " ORDER BY created, id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return _rows_to_batch(rows), [r[0] for r in rows]


class _Marker:
    """A queue item that is 'written' by signalling; lets flush() wait for the writer."""

    def __init__(self, event: threading.Event):
        self.event = event


def _rows_to_batch(rows: list[tuple]) -> SlotBatch:
    ys, pilots, masks, bits, ks, snrs, contexts = [], [], [], [], [], [], []
    errors, num_bits, genie, ls = [], [], [], []
    for (_, context, rx, f, k, nv, grid, pil, mask, labels, errs, nbits, g_err, ls_err) in rows:
        data_mask = np.frombuffer(mask, np.uint8).reshape(14, f).astype(bool)
        grid_bits = np.zeros((14, f, MAX_BITS_PER_SYMBOL), np.uint8)
        grid_bits[data_mask, :k] = np.frombuffer(labels, np.uint8).reshape(-1, k)
        ys.append(np.frombuffer(grid, np.complex64).reshape(rx, 14, f))
        pilots.append(np.frombuffer(pil, np.complex64).reshape(14, f))
        masks.append(data_mask)
        bits.append(grid_bits)
        ks.append(k)
        snrs.append(-10 * np.log10(nv) if nv > 0 else np.nan)
        contexts.append(context)
        errors.append(errs)
        num_bits.append(nbits)
        genie.append(-1 if g_err is None else g_err)
        ls.append(-1 if ls_err is None else ls_err)
    if not rows:
        raise LookupError("no labelled samples match")
    n = len(rows)
    pilots_array = np.stack(pilots)
    dmrs_symbols = (np.abs(pilots_array) > 0).any(axis=2).sum(axis=1)
    return SlotBatch(
        y=np.stack(ys), pilots=pilots_array, data_mask=np.stack(masks), bits=np.stack(bits),
        bits_per_symbol=np.asarray(ks, np.uint8), snr_db=np.asarray(snrs, np.float32),
        channel=np.asarray(contexts), delay_spread_ns=np.full(n, np.nan, np.float32),
        speed_mps=np.full(n, np.nan, np.float32),
        dmrs_additional_position=(dmrs_symbols - 1).clip(0).astype(np.uint8),
        ls_lmmse_errors=np.asarray(ls, np.int32), genie_errors=np.asarray(genie, np.int32),
        num_bits=np.asarray(num_bits, np.int32),
    )
