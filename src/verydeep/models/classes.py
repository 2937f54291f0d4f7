"""ImageNet (ILSVRC-2012) class names in the models' output order (sorted WordNet ids).

torchvision ships the 1000 names in that order; we take them from there rather than a copy.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names, index 0 = n01440764 (tench)."""
    from torchvision.models import VGG16_Weights

    names = tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000
    return names
