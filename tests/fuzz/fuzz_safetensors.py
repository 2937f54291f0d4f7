"""Fuzz the safetensors reader (``verydeep.formats.safetensors.load_safetensors``): the header
length, the header's JSON, verydeep's metadata, the tensors against the net they describe.

An input is a file as written, or (when it starts with ``{``) the header's JSON, a NUL, and the
tensor bytes: the target writes the length in front, so that mutations of the JSON (metadata
values, shapes, dtypes, offsets) reach verydeep instead of dying on a length that no longer fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: VGG-A at 1/256 of Table 1's width (1 to 2 channels, fc 16 wide): a 10 KB file.
WIDTH = 1 / 256


def seeds(folder: Path) -> list[bytes]:
    import torch
    from safetensors.torch import save_file

    from verydeep import VGG
    from verydeep.formats.safetensors import save_safetensors

    torch.manual_seed(0)
    model = VGG("A", num_classes=3, width=WIDTH, class_names=["cat", "dog", "fish"])
    ours = save_safetensors(model, folder / "vgg.safetensors", source="seed", epochs=2)
    plain = folder / "plain.safetensors"  # a state dict in Caffe names, no metadata: recognised from shapes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    files = [ours.read_bytes(), plain.read_bytes()]
    return files + [_split(f) for f in files]


def _split(file: bytes) -> bytes:
    """A safetensors file as header JSON + NUL + tensor bytes (see the module's docstring)."""
    length = int.from_bytes(file[:8], "little")
    return file[8 : 8 + length].rstrip() + b"\0" + file[8 + length :]


def _join(data: bytes) -> bytes:
    if not data.startswith(b"{") or b"\0" not in data:
        return data
    header, tensors = data.split(b"\0", 1)
    return len(header).to_bytes(8, "little") + header + tensors


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.formats.safetensors import load_safetensors

    path = folder / "input.safetensors"
    path.write_bytes(_join(data))
    load_safetensors(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.formats.safetensors"])
