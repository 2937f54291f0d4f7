"""The validation layouts of design §4 parse from small files and agree on class indices."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import photo

from verydeep.data.eval_set import (
    check_labels,
    detect_layout,
    open_eval_set,
    read_meta_mat,
    read_synsets,
)
from verydeep.errors import VerydeepError

#: Four real ILSVRC wnids, and the devkit's own (non-sorted) ILSVRC2012_IDs for them.
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # sorted: index = position
DEVKIT_ID = {"n01484850": 1, "n01440764": 2, "n01491361": 3, "n01443537": 4}
#: Image i (1-based) -> wnid: every class, out of order.
TRUTH = {1: "n01491361", 2: "n01440764", 3: "n01484850", 4: "n01443537", 5: "n01440764", 6: "n01491361"}


def name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def write_meta_mat(path) -> None:
    """A devkit-style meta.mat: leaf synsets with their IDs, plus a non-leaf synset."""
    from scipy.io import savemat

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [(i, w, f"words {w}", "gloss", 0, np.zeros((1, 0)), 0, 1300) for w, i in DEVKIT_ID.items()]
    rows.append((5, "n01440000", "fish", "a non-leaf synset", 2, np.array([[2, 4]]), 1, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[k, 0][f] = v
    savemat(str(path), {"synsets": synsets})


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    flat = root / "flat"
    folder = root / "imagefolder"
    flat.mkdir()
    for i, wnid in TRUTH.items():
        im = photo(60 + 10 * i, 80, seed=i)
        im.save(flat / name(i), "JPEG")
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        im.save(folder / wnid / name(i), "JPEG")
    index = {w: k for k, w in enumerate(WNIDS)}
    (root / "val.txt").write_text("".join(f"{name(i)} {index[w]}\n" for i, w in TRUTH.items()))
    devkit = root / "devkit" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{DEVKIT_ID[TRUTH[i]]}\n" for i in TRUTH))
    write_meta_mat(devkit / "meta.mat")
    kaggle = root / "kaggle"
    kaggle.mkdir()
    lines = ["ImageId,PredictionString"]
    for i in (4, 1, 6, 2, 5, 3):  # Kaggle's rows are not in image order
        w = TRUTH[i]
        lines.append(f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4 ")
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (kaggle / "LOC_synset_mapping.txt").write_text("".join(f"{w} some words, more words\n" for w in reversed(WNIDS)))
    return root


def by_name(ds) -> dict[str, int]:
    return {p.name: label for p, label in zip(ds.paths, ds.labels)}


def expected() -> dict[str, int]:
    return {name(i): WNIDS.index(w) for i, w in TRUTH.items()}


def test_every_layout_maps_to_the_same_class_indices(layouts):
    root = layouts
    sets = {
        "imagefolder": open_eval_set(root / "imagefolder"),
        "caffe": open_eval_set(root / "flat", root / "val.txt"),
        "devkit": open_eval_set(root / "flat", root / "devkit/data/ILSVRC2012_validation_ground_truth.txt"),
        "kaggle": open_eval_set(root / "flat", root / "kaggle/LOC_val_solution.csv"),
    }
    for layout, ds in sets.items():
        assert ds.layout == layout
        assert len(ds) == 6
        assert by_name(ds) == expected(), layout
        assert all(p.exists() for p in ds.paths)
    for layout in ("imagefolder", "devkit", "kaggle"):
        assert sets[layout].classes == tuple(WNIDS)
    # Orders: ImageFolder by class folder, devkit by line (= image number), Kaggle by ImageId.
    assert [p.name for p in sets["devkit"].paths] == [name(i) for i in range(1, 7)]
    assert [p.name for p in sets["kaggle"].paths] == [name(i) for i in range(1, 7)]
    assert list(sets["imagefolder"].labels) == sorted(sets["imagefolder"].labels)
    assert sets["imagefolder"].ids[0] == f"{WNIDS[0]}/{name(2)}"


def test_meta_mat_written_by_scipy_maps_ids_to_leaf_wnids(layouts):
    ids = read_meta_mat(layouts / "devkit/data/meta.mat")
    assert ids == {v: k for k, v in DEVKIT_ID.items()}  # the non-leaf synset 5 is left out
    assert read_synsets(layouts / "devkit/data/meta.mat") == tuple(WNIDS)


def test_detect_layout(layouts):
    root = layouts
    assert detect_layout(root / "imagefolder") == "imagefolder"
    assert detect_layout(root / "flat") == "unlabeled"
    assert detect_layout(root / "flat", root / "val.txt") == "caffe"
    assert detect_layout(root / "flat", root / "devkit/data/ILSVRC2012_validation_ground_truth.txt") == "devkit"
    assert detect_layout(root / "flat", root / "kaggle/LOC_val_solution.csv") == "kaggle"


def test_unlabeled_folder(layouts):
    ds = open_eval_set(layouts / "flat")
    assert ds.layout == "unlabeled" and ds.labels is None and len(ds) == 6
    assert ds.ids[0] == name(1)


def test_limit_spreads_over_the_set(layouts):
    ds = open_eval_set(layouts / "imagefolder", limit=4)
    assert len(ds) == 4
    full = open_eval_set(layouts / "imagefolder")
    assert ds.ids == tuple(full.ids[i] for i in (0, 1, 3, 4))  # i * 6 // 4
    assert len(set(ds.labels)) >= 3  # not just the first class


def test_synsets_fix_a_partial_imagefolder(tmp_path, layouts):
    (tmp_path / "n01484850").mkdir()
    photo(seed=1).save(tmp_path / "n01484850" / "a.JPEG")
    assert open_eval_set(tmp_path).labels == (0,)  # alone, the folder is class 0 ...
    ds = open_eval_set(tmp_path, synsets=layouts / "kaggle/LOC_synset_mapping.txt")
    assert ds.labels == (2,)  # ... among the four wnids it is class 2
    with pytest.raises(VerydeepError, match="4 classes, the model has 10"):
        check_labels(ds, 10)
    (tmp_path / "n09999999").mkdir()
    with pytest.raises(VerydeepError, match="n09999999: folder is not a class"):
        open_eval_set(tmp_path, synsets=layouts / "kaggle/LOC_synset_mapping.txt")


def test_check_labels_rejects_indices_beyond_the_model(layouts):
    ds = open_eval_set(layouts / "flat", layouts / "val.txt")
    check_labels(ds, 4)
    with pytest.raises(VerydeepError, match="class index 3 found, but the model has 3 outputs"):
        check_labels(ds, 3)


@pytest.mark.parametrize(
    "content, match",
    [
        ("a.JPEG 1\nb.JPEG x\n", "line 2: expected 'IMAGE LABEL'"),
        ("", "empty labels file"),
        ("a b c\n", "unknown labels format"),
    ],
)
def test_bad_list_files_name_the_problem(tmp_path, layouts, content, match):
    labels = tmp_path / "val.txt"
    labels.write_text(content)
    with pytest.raises(VerydeepError, match=match):
        open_eval_set(layouts / "flat", labels, layout="caffe" if "line 2" in match else "auto")


def test_devkit_needs_its_meta_mat(tmp_path, layouts):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n2\n")
    with pytest.raises(VerydeepError, match="meta.mat"):
        open_eval_set(layouts / "flat", gt)
    gt.write_text("1\n5\n")  # 5 is not a leaf
    with pytest.raises(VerydeepError, match="line 2: ILSVRC2012_ID 5 is not a leaf"):
        open_eval_set(layouts / "flat", gt, meta=layouts / "devkit/data/meta.mat")


def test_kaggle_errors(tmp_path, layouts):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("Id,Prediction\nx,n01440764 1 2 3 4\n")
    with pytest.raises(VerydeepError, match="LOC_synset_mapping.txt"):
        open_eval_set(layouts / "flat", csv)
    with pytest.raises(VerydeepError, match="header"):
        open_eval_set(layouts / "flat", csv, synsets=layouts / "kaggle/LOC_synset_mapping.txt")
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999 1 2 3 4\n")
    with pytest.raises(VerydeepError, match="line 2: expected a wnid"):
        open_eval_set(layouts / "flat", csv, synsets=layouts / "kaggle/LOC_synset_mapping.txt")


def test_wrong_data_folder_is_an_error_not_50000_skips(tmp_path, layouts):
    with pytest.raises(VerydeepError, match="none of the images"):
        open_eval_set(tmp_path, layouts / "val.txt")


def test_synset_words_style_class_list(tmp_path):
    f = tmp_path / "synset_words.txt"
    f.write_text("n01443537 goldfish, Carassius auratus\nn01440764 tench, Tinca tinca\n")
    assert read_synsets(f) == ("n01440764", "n01443537")
    f.write_text("tench\n")
    with pytest.raises(VerydeepError, match="expected a WordNet id"):
        read_synsets(f)
