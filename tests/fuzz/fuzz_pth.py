"""Fuzz the ``.pth`` reader (``verydeep.formats.torchvision.load_torchvision``): torch's zip and
legacy formats under ``weights_only=True``, checkpoint wrappers, the state dict's keys and values."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: VGG-A at 1/256 of Table 1's width: a 14 KB file.
WIDTH = 1 / 256


def seeds(folder: Path) -> list[bytes]:
    import torch

    from verydeep import VGG
    from verydeep.formats.torchvision import to_torchvision_state

    torch.manual_seed(0)
    model = VGG("A", num_classes=3, width=WIDTH)
    files = {
        "torchvision.pth": (to_torchvision_state(model), True),
        "legacy.pth": (to_torchvision_state(model), False),  # torch < 1.6's format, as torchvision published
        "checkpoint.pth": ({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, True),
    }
    out = []
    for name, (obj, zipped) in files.items():
        torch.save(obj, folder / name, _use_new_zipfile_serialization=zipped)
        out.append((folder / name).read_bytes())
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.formats.torchvision import load_torchvision

    path = folder / "input.pth"
    path.write_bytes(data)
    load_torchvision(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.formats.torchvision", "verydeep.models.build"])
