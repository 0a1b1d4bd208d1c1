import json

import numpy as np

from service.receiver.evaluate import BerReport


def _report() -> BerReport:
    """Four cells in one 5 dB bin each; every error count sits on the cell's first slot."""
    cells = {  # name: (slots, SNR, DeepRx, LS-LMMSE and genie errors)
        "a": (100, 22.0, 3, 2, 1),  # worse by one error: noise
        "b": (100, 27.0, 30, 5, 6),  # worse well beyond noise; perfect CSI worse too
        "c": (50, 22.0, 100, 0, 0),  # too few slots to count
        "d": (100, 12.0, 1, 4, 0),  # better
    }
    labels, snr, errors = [], [], {"deeprx": [], "ls_lmmse": [], "genie": []}
    for name, (slots, snr_db, *counts) in cells.items():
        labels += [name] * slots
        snr += [snr_db] * slots
        for receiver, count in zip(errors, counts):
            errors[receiver] += [count] + [0] * (slots - 1)
    return BerReport({k: np.asarray(v) for k, v in errors.items()}, np.full(len(labels), 1000),
                     np.asarray(snr), cells=np.asarray(labels))


def test_the_cell_comparison_marks_which_losses_are_beyond_noise():
    report = _report()
    comparison = report.comparison()
    assert comparison["cells"] == 3 and comparison["cell_snr_bins"] == 3
    assert [(w["cell"], w["snr_low"], w["beyond_noise"]) for w in comparison["worse_than_ls_lmmse"]] == [
        ("a", 20.0, False), ("b", 25.0, True)]
    assert comparison["worse_beyond_noise"] == 1
    assert comparison["genie_worse_than_ls_lmmse"] == 1
    assert comparison["high_snr_errors"] == {"deeprx_errors": 133, "ls_lmmse_errors": 7, "genie_errors": 7}
    assert json.loads(json.dumps(report.to_dict()))["comparison"] == comparison
    assert ("pairs where DeepRx is worse than LS-LMMSE: 2 of 3 (1 beyond two standard deviations of the error "
            "counts; perfect CSI is worse in 1)") in report.cell_table()
