"""Labelled image sets in the layouts ILSVRC-2012 validation data comes in.

Users hold the 50,000 validation images in one of four layouts (design §4); each maps to the
same class indices: the position of the class's WordNet id among the sorted wnids, which is
the order the models' 1000 outputs are in.

===============  ==========================================================  ===============
layout           files                                                        order
===============  ==========================================================  ===============
``imagefolder``  ``DATA/<wnid>/*.JPEG``; class index = sorted folder names    folder, name
``caffe``        ``val.txt`` lines ``ILSVRC2012_val_00000001.JPEG 65``        file order
``devkit``       ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_ID     line order
                 per line, image i = ``ILSVRC2012_val_%08d.JPEG``) + ``meta.mat``
``kaggle``       ``LOC_val_solution.csv`` + ``LOC_synset_mapping.txt``        ImageId
``unlabeled``    any folder (or list file) of images; predictions only        path
===============  ==========================================================  ===============
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from verydeep.data.choices import LAYOUTS
from verydeep.data.images import (
    IMAGE_SUFFIXES,
    check_path_text,
    find_images,
    listed_once,
    path_exists,
    quoted,
    read_lines,
    read_text,
    reason,
    resolve_inputs,
)
from verydeep.errors import VerydeepError

#: File names the devkit and Kaggle use; found next to the labels file when not given.
DEVKIT_META = "meta.mat"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
#: How the devkit and Kaggle name validation image i (1-based).
DEVKIT_IMAGE = "ILSVRC2012_val_{:08d}.JPEG"
KAGGLE_SUFFIX = ".JPEG"

_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class EvalSet:
    """Images to evaluate, in a fixed order, with their class indices (None: unlabeled).

    ``ids`` name images in results (the path relative to ``root`` for folders, the name in
    the labels file otherwise); ``classes`` lists the wnid (or folder name) of each class
    index when the layout knows it.
    """

    root: Path
    paths: tuple[Path, ...]
    ids: tuple[str, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    layout: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int]) -> EvalSet:
        return replace(
            self,
            paths=tuple(self.paths[i] for i in indices),
            ids=tuple(self.ids[i] for i in indices),
            labels=None if self.labels is None else tuple(self.labels[i] for i in indices),
        )

    def spread(self, n: int | None) -> EvalSet:
        """``n`` images spread evenly over the set (all when ``n`` is None or too large).

        Evenly spaced rather than the first ``n``: an ImageFolder lists class by class, so
        its first 500 images would all be tench.
        """
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise VerydeepError(f"--limit must be positive, found {n}")
        total = len(self)
        return self.subset([i * total // n for i in range(n)])


# -- class lists --------------------------------------------------------------------------------
def read_synsets(path: str | os.PathLike) -> tuple[str, ...]:
    """The sorted wnids of a class list: ``LOC_synset_mapping.txt`` / ``synset_words.txt``
    (``wnid words`` per line), a plain wnid-per-line file, or the devkit's ``meta.mat``."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        return tuple(sorted(read_meta_mat(path).values()))
    first: dict[str, int] = {}
    for n, line in read_lines(path, "class list"):
        wnid = line.split()[0]
        if not _WNID.match(wnid):
            raise VerydeepError(f"{path}: line {n}: expected a WordNet id (n########) first, found {quoted(wnid)}")
        listed_once(first, wnid, n, path, f"wnid {wnid}")
    if not first:
        raise VerydeepError(f"{path}: no classes in the class list (expected 'n######## words' lines)")
    return tuple(sorted(first))


def read_meta_mat(path: str | os.PathLike) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (num_children == 0) in the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is an optional dependency
        raise VerydeepError(f"{path}: reading the devkit's meta.mat needs scipy (pip install scipy)") from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        names = synsets.dtype.names or ()
    except FileNotFoundError:
        raise VerydeepError(f"{path}: no such file (the devkit's meta.mat)") from None
    except Exception as e:
        # scipy's MAT reader meets arbitrary bytes with MatReadError, struct.error, OSError,
        # ValueError, NotImplementedError (v7.3 files), ...: each means this is not meta.mat.
        raise VerydeepError(f"{path}: not the devkit's meta.mat with a 'synsets' struct ({reason(e)})") from None
    missing = {"ILSVRC2012_ID", "WNID", "num_children"} - set(names)
    if missing:
        raise VerydeepError(f"{path}: synsets lack the field(s) {', '.join(sorted(missing))}")
    import numpy as np

    try:
        ids = np.atleast_1d(synsets["ILSVRC2012_ID"])
        wnids = np.atleast_1d(synsets["WNID"])
        children = np.atleast_1d(synsets["num_children"])
        return {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}
    except (TypeError, ValueError, OverflowError) as e:
        raise VerydeepError(f"{path}: synsets: expected integer IDs and child counts ({reason(e)})") from None


def _index_of(wnids: Sequence[str]) -> dict[str, int]:
    return {w: i for i, w in enumerate(sorted(wnids))}


@lru_cache(maxsize=1)
def ilsvrc2012_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids in the models' output order (sorted), shipped with the
    package (``ilsvrc2012_wnids.txt``: the list timm publishes as ``imagenet_synsets.txt``, the
    same order as Caffe's ``synset_words.txt``)."""
    text = resources.files("verydeep.data").joinpath("ilsvrc2012_wnids.txt").read_text(encoding="ascii")
    return tuple(text.split())


# -- layouts ------------------------------------------------------------------------------------
def read_imagefolder(root: str | os.PathLike, synsets: Sequence[str] | None = None) -> EvalSet:
    """``root/<class>/**/image``: class index = position of the folder name among the sorted
    folder names (torchvision's ImageFolder), or among ``synsets`` when given (so that a
    folder holding only some of the 1000 classes still maps to the model's outputs)."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise VerydeepError(f"{root}: no class folders (expected {root}/<wnid>/*.JPEG)")
    classes = tuple(sorted(synsets)) if synsets is not None else tuple(folders)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise VerydeepError(f"{root}/{unknown[0]}: folder is not a class of the class list ({len(classes)} classes)")
    paths, labels = [], []
    for folder in folders:
        for p in find_images(root / folder):
            paths.append(p)
            labels.append(index[folder])
    if not paths:
        raise VerydeepError(f"{root}: no images in its class folders")
    ids = tuple(p.relative_to(root).as_posix() for p in paths)
    return EvalSet(root, tuple(paths), ids, tuple(labels), classes, "imagefolder")


def read_caffe_list(
    list_file: str | os.PathLike, root: str | os.PathLike, synsets: Sequence[str] | None = None
) -> EvalSet:
    """Caffe's ``val.txt``: ``name label`` per line, label in sorted-wnid order; names are
    relative to ``root``."""
    list_file, root = Path(list_file), Path(root)
    labels: list[int] = []
    first: dict[str, int] = {}  # image name -> its line, in file order
    for n, line in read_lines(list_file, "labels file"):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _is_int(parts[1]):
            raise VerydeepError(f"{list_file}: line {n}: expected 'IMAGE LABEL', found {quoted(line)}")
        listed_once(first, check_path_text(parts[0], list_file, n), n, list_file)
        labels.append(int(parts[1]))
    names = list(first)
    if not names:
        raise VerydeepError(f"{list_file}: no 'IMAGE LABEL' lines")
    paths = tuple(root / name for name in names)
    classes = tuple(sorted(synsets)) if synsets is not None else None
    return EvalSet(root, paths, tuple(names), tuple(labels), classes, "caffe")


def read_devkit(
    ground_truth: str | os.PathLike, root: str | os.PathLike, meta: str | os.PathLike | None = None
) -> EvalSet:
    """The devkit's ground truth: line i holds the ILSVRC2012_ID of image i (1-based, the
    devkit's own class order); ``meta.mat`` maps it to a wnid, then to the sorted-wnid index."""
    ground_truth, root = Path(ground_truth), Path(root)
    meta = Path(meta) if meta is not None else ground_truth.parent / DEVKIT_META
    if not meta.exists():
        raise VerydeepError(f"{meta}: no such file; the devkit's ground truth needs its meta.mat (--meta PATH)")
    id_to_wnid = read_meta_mat(meta)
    index = _index_of(list(id_to_wnid.values()))
    labels, names = [], []
    # Image i is the i-th ID in the file: blank and comment lines take no image number.
    for i, (n, line) in enumerate(read_lines(ground_truth, "ground-truth file"), start=1):
        if not _is_int(line):
            raise VerydeepError(f"{ground_truth}: line {n}: expected an ILSVRC2012_ID, found {quoted(line)}")
        ilsvrc_id = int(line)
        if ilsvrc_id not in id_to_wnid:
            raise VerydeepError(f"{ground_truth}: line {n}: ILSVRC2012_ID {ilsvrc_id} is not a leaf synset of {meta}")
        labels.append(index[id_to_wnid[ilsvrc_id]])
        names.append(DEVKIT_IMAGE.format(i))
    if not names:
        raise VerydeepError(f"{ground_truth}: no ILSVRC2012_ID lines")
    paths = tuple(root / name for name in names)
    return EvalSet(root, paths, tuple(names), tuple(labels), tuple(sorted(index)), "devkit")


def read_kaggle(
    solution: str | os.PathLike, root: str | os.PathLike, synsets: str | os.PathLike | None = None
) -> EvalSet:
    """Kaggle's ``LOC_val_solution.csv`` (ImageId, PredictionString whose first token is the
    wnid) with ``LOC_synset_mapping.txt``; images are ``root/<ImageId>.JPEG``, sorted by id."""
    solution, root = Path(solution), Path(root)
    mapping = Path(synsets) if synsets is not None else solution.parent / KAGGLE_SYNSETS
    if not mapping.exists():
        raise VerydeepError(
            f"{mapping}: no such file; Kaggle's solution file needs LOC_synset_mapping.txt (--synsets PATH)"
        )
    index = _index_of(read_synsets(mapping))
    reader = csv.reader(io.StringIO(read_text(solution, "Kaggle solution file"), newline=""))
    rows: list[tuple[str, int]] = []  # (ImageId, class index)
    first: dict[str, int] = {}  # ImageId -> its line
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            found = "nothing" if header is None else quoted(",".join(header))
            raise VerydeepError(f"{solution}: line 1: expected the header 'ImageId,PredictionString', found {found}")
        for row in reader:
            n = reader.line_num
            if not row or not any(field.strip() for field in row):
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens or tokens[0] not in index:
                found = quoted(tokens[0]) if tokens else "nothing"
                raise VerydeepError(f"{solution}: line {n}: expected a wnid of {mapping.name}, found {found}")
            image_id = check_path_text(row[0].strip(), solution, n)
            if not image_id:
                raise VerydeepError(f"{solution}: line {n}: expected an ImageId, found nothing")
            listed_once(first, image_id, n, solution)
            rows.append((image_id, index[tokens[0]]))
    except csv.Error as e:  # a field beyond csv.field_size_limit(), a quote left open, ...
        raise VerydeepError(f"{solution}: line {reader.line_num}: not a CSV row ({e})") from None
    if not rows:
        raise VerydeepError(f"{solution}: no rows after the header 'ImageId,PredictionString'")
    rows.sort()  # by ImageId (each is listed once)
    names = tuple(image_id + KAGGLE_SUFFIX for image_id, _ in rows)
    paths = tuple(root / name for name in names)
    return EvalSet(root, paths, names, tuple(label for _, label in rows), tuple(sorted(index)), "kaggle")


def read_unlabeled(data: str | os.PathLike) -> EvalSet:
    """A folder (scanned recursively), a list file of paths, or one image: predictions only."""
    paths = tuple(resolve_inputs(data))
    if not paths:
        raise VerydeepError(f"{data}: no images found")
    root = Path(data) if Path(data).is_dir() else Path(".")
    ids = tuple(_relative(p, root) for p in paths)
    return EvalSet(root, paths, ids, None, None, "unlabeled")


# -- detection --------------------------------------------------------------------------------
def detect_layout(data: str | os.PathLike, labels: str | os.PathLike | None = None) -> str:
    """The layout of ``data`` (+ ``labels``): by the labels file's form, else by the folder."""
    if labels is not None:
        labels = Path(labels)
        if not labels.is_file():
            raise VerydeepError(f"{labels}: no such labels file")
        if labels.suffix.lower() == ".csv":
            return "kaggle"
        lines = read_lines(labels, "labels file")
        if not lines:
            raise VerydeepError(f"{labels}: empty labels file")
        n, line = lines[0]
        parts = line.split()
        if len(parts) == 1 and _is_int(parts[0]):
            return "devkit"
        if len(parts) >= 2 and _is_int(parts[-1]):
            return "caffe"
        raise VerydeepError(
            f"{labels}: line {n}: unknown labels format; expected 'IMAGE LABEL' lines (Caffe), one ILSVRC2012_ID "
            f"per line (devkit), or LOC_val_solution.csv (Kaggle), found {quoted(line)}"
        )
    path = Path(data)
    if path.is_dir():
        top_images = any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in path.iterdir())
        subfolders = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
        if subfolders and not top_images:
            return "imagefolder"
    return "unlabeled"


def open_eval_set(
    data: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    *,
    layout: str = "auto",
    meta: str | os.PathLike | None = None,
    synsets: str | os.PathLike | None = None,
    limit: int | None = None,
) -> EvalSet:
    """Read ``data`` in ``layout`` ("auto" detects it), keep ``limit`` images spread evenly,
    and check that its images are there.

    ``meta`` is the devkit's meta.mat (default: next to the ground-truth file); ``synsets`` a
    class list (``LOC_synset_mapping.txt``, ``synset_words.txt`` or ``meta.mat``) that fixes
    the class order for ImageFolder and Caffe lists and replaces Kaggle's mapping file.
    """
    if layout not in LAYOUTS:
        raise VerydeepError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(data, labels)
    if layout in ("caffe", "devkit", "kaggle") and labels is None:
        raise VerydeepError(f"layout {layout} needs --labels FILE")
    root = Path(data)
    if layout != "unlabeled" and not root.is_dir():
        raise VerydeepError(f"{root}: not a folder of images")
    wnids = read_synsets(synsets) if synsets is not None and layout != "kaggle" else None
    if layout == "imagefolder":
        ds = read_imagefolder(root, wnids)
    elif layout == "unlabeled" or labels is None:  # the layouts with a labels file have one (checked above)
        ds = read_unlabeled(data)
    elif layout == "caffe":
        ds = read_caffe_list(labels, root, wnids)
    elif layout == "devkit":
        ds = read_devkit(labels, root, meta)
    else:
        ds = read_kaggle(labels, root, synsets)
    ds = ds.spread(limit)  # every reader refuses an empty set, and spread keeps at least one image
    if not any(path_exists(p) for p in ds.paths[:1000]):
        raise VerydeepError(
            f"{root}: none of the images the {layout} layout names is there (e.g. {ds.paths[0]}); "
            "is DATA the folder that holds them?"
        )
    return ds


def fit_classes(ds: EvalSet, num_classes: int) -> EvalSet:
    """``ds`` with its class indices in a 1000-class model's output order when its classes are
    some of ILSVRC-2012's WordNet ids (a ``val/<wnid>/`` subset of ImageNet); else ``ds``."""
    wnids = ilsvrc2012_wnids()
    if num_classes != len(wnids) or ds.labels is None or ds.classes is None or len(ds.classes) == len(wnids):
        return ds
    position = {w: i for i, w in enumerate(wnids)}
    if not all(c in position for c in ds.classes):
        return ds
    labels = tuple(position[ds.classes[label]] for label in ds.labels)
    return replace(ds, labels=labels, classes=wnids)


def check_labels(ds: EvalSet, num_classes: int) -> None:
    """Raise when the set's class indices cannot be the model's outputs."""
    if ds.labels is None:
        return
    top = max(ds.labels)
    if top >= num_classes or min(ds.labels) < 0:
        raise VerydeepError(
            f"{ds.root}: class index {top if top >= num_classes else min(ds.labels)} found, but the model "
            f"has {num_classes} outputs"
        )
    if ds.classes is not None and len(ds.classes) != num_classes:
        raise VerydeepError(
            f"{ds.root}: the {ds.layout} layout lists {len(ds.classes)} classes, the model has {num_classes} "
            "outputs; pass --synsets (LOC_synset_mapping.txt, synset_words.txt or meta.mat) to fix the class order"
        )


# -- helpers ------------------------------------------------------------------------------------
def _is_int(text: str) -> bool:
    # At most 18 digits: class indices and IDs are small, and Python refuses to parse 4,300+.
    return bool(re.fullmatch(r"[+-]?\d{1,18}", text.strip()))


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()
