"""Fuzz the label and list files: class lists (synsets), Caffe's ``val.txt``, the devkit's ground
truth and ``meta.mat``, Kaggle's ``LOC_val_solution.csv``, path lists, and layout detection.

The first byte of an input picks the reader, the rest is the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

WNIDS = ("n01440764", "n01443537", "n01484850")


def _meta_mat(path: Path) -> None:
    """A devkit-style meta.mat (as tests/test_data.py writes it): three leaf synsets."""
    import numpy as np
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "num_children"]
    synsets = np.zeros((len(WNIDS), 1), dtype=[(f, object) for f in fields])
    for k, wnid in enumerate(WNIDS):
        synsets[k, 0]["ILSVRC2012_ID"], synsets[k, 0]["WNID"], synsets[k, 0]["num_children"] = k + 1, wnid, 0
    savemat(str(path), {"synsets": synsets})


def _files(folder: Path) -> dict[str, bytes]:
    """One valid file per reader, written as the tests and the datasets write them."""
    meta = folder / "meta.mat"
    _meta_mat(meta)
    return {
        "synsets": "".join(f"{w} some words, more words\n" for w in WNIDS).encode(),
        "caffe": "".join(f"ILSVRC2012_val_{i:08d}.JPEG {i % 3}\n" for i in range(1, 5)).encode(),
        "devkit": b"1\n3\n2\n2\n",
        "meta": meta.read_bytes(),
        "kaggle": (
            "ImageId,PredictionString\n"
            + "".join(f"ILSVRC2012_val_{i:08d},{WNIDS[i % 3]} 1 2 3 4 {WNIDS[0]} 5 6 7 8\n" for i in range(1, 5))
        ).encode(),
        "paths": b"# images\nimg0.jpg\nsub/img1.png 3\n\n/abs/img2.jpeg\n",
        "detect": b"ILSVRC2012_val_00000001.JPEG 0\n",
    }


#: The readers, in the order the first byte of an input picks them.
READERS = ("synsets", "caffe", "devkit", "meta", "kaggle", "paths", "detect")


def seeds(folder: Path) -> list[bytes]:
    files = _files(folder)
    return [bytes([READERS.index(name)]) + data for name, data in files.items()]


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.data import eval_set
    from verydeep.data.images import read_path_list

    if not data:
        return
    reader, content = READERS[data[0] % len(READERS)], data[1:]
    if not (folder / "meta.mat").exists():
        _meta_mat(folder / "meta.mat")
        (folder / "LOC_synset_mapping.txt").write_text("".join(f"{w} words\n" for w in WNIDS))
    path = folder / {"meta": "input.mat", "kaggle": "input.csv"}.get(reader, "input.txt")
    path.write_bytes(content)
    if reader == "synsets":
        eval_set.read_synsets(path)
    elif reader == "caffe":
        eval_set.read_caffe_list(path, folder)
    elif reader == "devkit":
        eval_set.read_devkit(path, folder, folder / "meta.mat")
    elif reader == "meta":
        eval_set.read_meta_mat(path)
    elif reader == "kaggle":
        eval_set.read_kaggle(path, folder, folder / "LOC_synset_mapping.txt")
    elif reader == "paths":
        read_path_list(path, folder)
    else:
        eval_set.detect_layout(folder, path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.data.eval_set", "verydeep.data.images"])
