"""Fuzz the scores file ``evaluate --combine`` reads (``verydeep.evaluate.results.load_scores``):
the zip directory, each array's .npy header and size, the meta JSON, the arrays' agreement.

Python's ``zipfile`` is instrumented too, so the fuzzer is guided through the zip structures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main


def seeds(folder: Path) -> list[bytes]:
    import numpy as np

    from verydeep.evaluate.results import EvalResult, save_scores

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
    labelled = EvalResult({"name": "dense", "scales": [256, 384]}, ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"],
                          probs, np.array([0, 4, 2, 1]), run={"state": {"model": "x"}})  # fmt: skip
    labelled.failed = [{"id": "c/5.jpg", "path": "/data/c/5.jpg", "reason": "image file is truncated"}]
    unlabelled = EvalResult({"name": "center"}, ["x.png", "y.png"], probs[:2], None)
    out = []
    for name, result in (("labelled", labelled), ("unlabelled", unlabelled)):
        out.append(save_scores(result, folder / f"{name}.npz").read_bytes())
    with np.load(folder / "labelled.npz") as z:  # the same arrays, deflated (np.savez_compressed)
        np.savez_compressed(folder / "compressed.npz", **dict(z))
    out.append((folder / "compressed.npz").read_bytes())
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.evaluate.results import load_scores

    path = folder / "input.npz"
    path.write_bytes(data)
    load_scores(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.evaluate.results"], instrument=("verydeep", "zipfile"))
