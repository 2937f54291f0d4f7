"""Fuzz the train TOML (``verydeep.train.config.load``): the TOML parser, every option's type and
range (``SCHEMA``), the relations between options, paths relative to the file.

Python's ``tomllib`` is instrumented too, so the fuzzer is guided through TOML's syntax.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main


def seeds(folder: Path) -> list[bytes]:
    from verydeep.train import config as tc

    configs = [
        tc.TrainConfig(),
        tc.TrainConfig(
            data="train", val="val", scale=[256, 512], val_scale=384, arch="E", width=0.5, num_classes=10,
            weights="vgg16", init_layers=["conv1_1", "fc8"], freeze_through="pool5", lr_mult={"fc8": 10.0},
            micro_batch=32, lr=0.02, clip_grad_norm=5.0, max_steps=100, out="runs/x", device="cuda:1",
            precision="bf16", channels_last="on", metrics_format="csv", workers=4,
        ),
    ]  # fmt: skip
    out = []
    for i, config in enumerate(configs):
        path = tc.save_toml(config, folder / f"config{i}.toml")  # the file train writes in its run folder
        out.append(path.read_bytes())
    out.append(b'# hand-written\nbatch-size = 64\n"lr" = 1e-2\nscale = 256\n[lr_mult]\n"fc8.bias" = 20\n')
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.train import config as tc

    path = folder / "run.toml"
    path.write_bytes(data)
    tc.load(path)


if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["tomllib"]):
        import tomllib  # noqa: F401
    main(seeds, one_input, ["verydeep.train.config"])
