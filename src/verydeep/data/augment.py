"""The paper's training augmentation, drawn per image from a seed so it is reproducible.

Training (Sec. 3.1): rescale the image isotropically so its shorter side is S (fixed, or drawn
uniformly from [S_min, S_max] for each image: scale jittering), take a random 224x224 crop,
flip it horizontally with probability 1/2, and shift its colour along the principal components
of ImageNet's RGB pixels (AlexNet's "PCA lighting"). Validation: the central crop of the image
rescaled to Q.

Each image's random numbers come from a generator seeded with (seed, epoch, index), so the
result does not depend on the number of loader workers or ranks, or on where a resumed run
restarted. Transforms return uint8 crops plus a 3-vector RGB shift; the float conversion,
the shift and the Caffe mean subtraction happen on the device (:func:`to_input`), which keeps
the loader's traffic at one byte per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verydeep.data.preprocess import center_crop, rescale, to_caffe

#: Eigenvalues and eigenvectors (columns) of the covariance of ImageNet's RGB pixels on a 0..1
#: scale, as published with fb.resnet.torch and used by most AlexNet-style lighting noise.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random numbers of one image in one epoch (independent of workers, ranks, resumes)."""
    return np.random.default_rng([seed, epoch, index])


def lighting_shift(alpha: np.ndarray) -> np.ndarray:
    """RGB shift (0..255 scale) for the PCA weights ``alpha``: eigvec @ (alpha * eigval) * 255."""
    return IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL) * 255.0


@dataclass(frozen=True)
class TrainTransform:
    """Scale jittering, random crop, flip and lighting of one uint8 3xHxW RGB image."""

    scale: tuple[int, int] = (256, 256)  # S_min, S_max (equal: fixed S)
    crop: int = 224
    flip: bool = True
    lighting_std: float = 0.1
    seed: int = 0

    def apply(self, image: torch.Tensor, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """uint8 3xHxW RGB -> (uint8 3 x crop x crop, float32 RGB shift, the choices made)."""
        rng = sample_rng(self.seed, epoch, index)
        s = int(rng.integers(self.scale[0], self.scale[1] + 1))
        x = rescale(image, s)
        h, w = x.shape[-2:]
        top = int(rng.integers(0, h - self.crop + 1))
        left = int(rng.integers(0, w - self.crop + 1))
        flip = bool(rng.random() < 0.5) if self.flip else False
        alpha = rng.normal(0.0, self.lighting_std, size=3) if self.lighting_std > 0 else np.zeros(3)
        shift = lighting_shift(alpha)
        x = x[:, top : top + self.crop, left : left + self.crop]
        if flip:
            x = x.flip(-1)
        params = {"S": s, "top": top, "left": left, "flip": flip, "alpha": alpha, "shift": shift}
        return x.contiguous(), torch.tensor(shift, dtype=torch.float32), params

    def __call__(self, image: torch.Tensor, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        crop, shift, _ = self.apply(image, epoch, index)
        return crop, shift


@dataclass(frozen=True)
class ValTransform:
    """The central crop of the image rescaled to Q (the seed's single-crop protocol at Q=256)."""

    scale: int = 256
    crop: int = 224

    def __call__(self, image: torch.Tensor, epoch: int = 0, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x = center_crop(rescale(image, self.scale), self.crop)
        return x.contiguous(), torch.zeros(3, dtype=torch.float32)


def to_input(crops: torch.Tensor, shifts: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB crops + N x 3 RGB shifts -> float32 Caffe input, on their device."""
    x = crops.to(torch.float32) + shifts.to(torch.float32)[:, :, None, None]
    x = to_caffe(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
