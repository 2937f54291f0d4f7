"""Fuzz the Keras ``.h5`` reader (``verydeep.formats.keras.load_keras``): HDF5 itself, Keras'
three layouts, the datasets' shapes, types and storage against the net and the file's size."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: VGG-A at 1/256 of Table 1's width: files of 20-40 KB (HDF5's headers are most of it).
WIDTH = 1 / 256
#: libFuzzer's inputs are no larger than the largest seed (under 50 KB).
MAX_INPUT = 64 * 1024
_limited = False  # whether this process's memory is bounded yet (after torch and h5py are mapped)


def write_keras(path: Path, model, layout: str = "old", top: bool = True, pools: bool = False) -> Path:
    """``model`` (a verydeep VGG of 3x3 convolutions) in one of Keras' layouts: ``old`` (root
    ``layer_names``, ``block1_conv1_W_1:0``), ``new`` (a whole-model file: ``model_weights``,
    ``block1_conv1/kernel:0``) or ``keras3`` (``layers/block1_conv1/vars/0``). HWIO kernels,
    Dense (in, out), fc1's rows in channels_last (H, W, C) order. ``pools`` also lists the layers
    without weights (``block1_pool``, ``flatten``), each an empty group, as the published files do."""
    import h5py

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layers: list[tuple[str, list]] = []
    for spec in model.specs:
        if spec.kind == "conv":
            s, i = spec.name[4:].split("_")
            w = state[f"{spec.name}.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
            layers.append((f"block{s}_conv{i}", [w, state[f"{spec.name}.bias"]]))
        elif spec.kind == "pool" and pools:
            layers.append((f"block{spec.name[4:]}_pool", []))
    if top:
        w6 = state["fc6.weight"]
        c = w6.shape[1] // 49
        k6 = w6.reshape(-1, c, 7, 7).transpose(2, 3, 1, 0).reshape(49 * c, -1)  # (H, W, C, out) rows
        layers += [("flatten", [])] if pools else []
        layers += [
            ("fc1", [k6, state["fc6.bias"]]),
            ("fc2", [state["fc7.weight"].T, state["fc7.bias"]]),
            ("predictions", [state["fc8.weight"].T, state["fc8.bias"]]),
        ]
    with h5py.File(path, "w") as f:
        if layout == "keras3":
            for name, arrays in layers:
                group = f.create_group(f"layers/{name}/vars")
                for i, a in enumerate(arrays):
                    group.create_dataset(str(i), data=a)
            return path
        root = f.create_group("model_weights") if layout == "new" else f
        root.attrs["layer_names"] = [n.encode() for n, _ in [("input_1", []), *layers]]
        root.create_group("input_1").attrs["weight_names"] = []
        for name, arrays in layers:
            group = root.create_group(name)
            names = [f"{name}_W_1:0", f"{name}_b_1:0"] if layout == "old" else [f"{name}/kernel:0", f"{name}/bias:0"]
            names = names[: len(arrays)]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays):
                group.create_dataset(n, data=a)
    return path


def seeds(folder: Path) -> list[bytes]:
    import torch

    from verydeep import VGG

    torch.manual_seed(0)
    model = VGG("A", num_classes=3, width=WIDTH)
    cases = {"old": ("old", True), "new": ("new", True), "keras3": ("keras3", True), "notop": ("old", False)}
    return [write_keras(folder / f"{n}.h5", model, layout, top).read_bytes() for n, (layout, top) in cases.items()]


def one_input(data: bytes, folder: Path) -> None:
    """``load_keras`` as users call it (HDF5 in a child process with a time limit), then, unless
    HDF5 itself hung or crashed there, the same reading in this process: only here does the
    fuzzer see which lines of ``verydeep.formats.keras`` ran, and it may (the child finished)."""
    from verydeep.errors import VerydeepError
    from verydeep.formats import keras
    from verydeep.formats.keras import HDF5Failure, load_keras, read_keras_arrays

    keras.READ_SECONDS = 2.0  # the seeds read in 50 ms: HDF5's own endless loops end sooner
    global _limited
    if not _limited:  # this process reads in-process too: the child's memory bound, here as well
        keras.limit_memory(keras.CHILD_MEMORY_BASE + keras.CHILD_MEMORY_PER_BYTE * MAX_INPUT)
        _limited = True
    path = folder / "input.h5"
    path.write_bytes(data)
    try:
        load_keras(path)
    except HDF5Failure:
        return  # contained and reported as one line: the defect is HDF5's
    except VerydeepError:
        pass
    read_keras_arrays(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.formats.keras"])
