"""Shared fixtures: small simulated datasets, made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import main as client_main

HIGH_SNR_SPEC = "channel=TDL-C,delay_spread=100,speed=0:10,snr=25:30,dmrs=1,mod=qpsk"


def simulate(path: Path, spec: str, slots: int, seed: int = 0) -> Path:
    assert client_main(["simulate", "--scenario", spec, "--slots", str(slots), "--seed", str(seed),
                        "--out", str(path), "--quiet"]) == 0
    return path


@pytest.fixture(scope="session")
def train_mix_file(tmp_path_factory) -> Path:
    """64 slots of the training mix."""
    return simulate(tmp_path_factory.mktemp("data") / "train-mix.h5", "train", 64, seed=3)


@pytest.fixture(scope="session")
def high_snr_file(tmp_path_factory) -> Path:
    """96 easy QPSK slots at high SNR: a dataset a tiny model can learn in seconds."""
    return simulate(tmp_path_factory.mktemp("data") / "high-snr.h5", HIGH_SNR_SPEC, 96, seed=4)
