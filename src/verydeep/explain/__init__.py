"""What the net sees: saliency maps and class models (Simonyan, Vedaldi & Zisserman,
arXiv:1312.6034), Grad-CAM, guided backpropagation, guided Grad-CAM and dense score maps.

- :mod:`.methods`: :func:`saliency` (and SmoothGrad), :func:`gradcam`, :func:`guided_backprop`,
  :func:`guided_gradcam`, :func:`score_map`, each returning an :class:`Explanation`.
- :mod:`.class_model`: :func:`class_model`, the image that maximises a class score under an L2
  penalty, as a :class:`ClassModel`.
- :mod:`.nets`: the nets run layer by layer with out-of-place ReLUs (so a layer's output
  survives the in-place ReLUs, and guided backpropagation swaps the ReLUs' backward pass
  without module hooks); a VGG or a CaffeGraph.
- :mod:`.render` and :mod:`.job`: the pictures and the ``verydeep explain`` job over files.

Inputs are Caffe-space batches (N x 3 x H x W, BGR, 0..255, mean pixel subtracted) on the
model's device; targets are ``"top"``, a class index or a class name, one for all images or
one per image.
"""

from verydeep.explain.class_model import L2, STEP, STEPS, ClassModel, class_model
from verydeep.explain.job import ExplainRun, class_model_files, explain_files
from verydeep.explain.methods import (
    METHODS,
    Explanation,
    gradcam,
    guided_backprop,
    guided_gradcam,
    saliency,
    score_map,
)
from verydeep.explain.nets import GuidedReLU, fast_dense

__all__ = [
    "L2",
    "METHODS",
    "STEP",
    "STEPS",
    "ClassModel",
    "ExplainRun",
    "Explanation",
    "GuidedReLU",
    "class_model",
    "class_model_files",
    "explain_files",
    "fast_dense",
    "gradcam",
    "guided_backprop",
    "guided_gradcam",
    "saliency",
    "score_map",
]
