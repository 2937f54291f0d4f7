"""The paper's evaluation (Sec. 3.2, 4): top-1/top-5 error under its test protocols, and classify.

- :mod:`.protocols`: :class:`Protocol` (center, multi-crop, dense, combined at scales Q) and
  where the crops sit; free of torch, so the command line lists its choices cheaply.
- :mod:`.scoring`: rescaling to the test scales in the loader, and :class:`~.scoring.Scorer`,
  the soft-max outputs of a batch under a protocol on the device.
- :mod:`.results`: :class:`EvalResult`, the scores file (:func:`save_scores`, :func:`load_scores`),
  the fusion of runs (:func:`combine`) and the predictions CSV.
- :mod:`.run`: :func:`evaluate`, a resumable run sharded over torchrun ranks.
- :mod:`.classify`: top-k classes of a few image files (:func:`classify_files`).

Split so each step can be read and tested alone: what a protocol is, how a batch is scored, what
a run writes, and how a run is cut into chunks that survive a kill. The names below are
imported on first use, so ``import verydeep.evaluate.protocols`` does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verydeep.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from verydeep.data.choices import INTERPOLATIONS
    from verydeep.evaluate.classify import classify_files, predict
    from verydeep.evaluate.protocols import DEFAULT_SCALES, DENSE_AVERAGES, GRIDS, PROTOCOLS, Protocol
    from verydeep.evaluate.results import EvalResult, combine, load_scores, save_scores, write_predictions
    from verydeep.evaluate.run import EXIT_AFTER_ENV, evaluate
    from verydeep.evaluate.scoring import RescaleToScales, Scorer

__all__ = [
    "DEFAULT_SCALES",
    "DENSE_AVERAGES",
    "EXIT_AFTER_ENV",
    "GRIDS",
    "INTERPOLATIONS",
    "PROTOCOLS",
    "EvalResult",
    "Protocol",
    "RescaleToScales",
    "Scorer",
    "classify_files",
    "combine",
    "evaluate",
    "load_scores",
    "predict",
    "save_scores",
    "write_predictions",
]
#: Public name -> the module that defines it (protocols and the option names need no torch).
_DEFINED_IN = {
    "DEFAULT_SCALES": "verydeep.evaluate.protocols",
    "DENSE_AVERAGES": "verydeep.evaluate.protocols",
    "GRIDS": "verydeep.evaluate.protocols",
    "PROTOCOLS": "verydeep.evaluate.protocols",
    "Protocol": "verydeep.evaluate.protocols",
    "EXIT_AFTER_ENV": "verydeep.evaluate.run",
    "evaluate": "verydeep.evaluate.run",
    "INTERPOLATIONS": "verydeep.evaluate.protocols",
    "EvalResult": "verydeep.evaluate.results",
    "combine": "verydeep.evaluate.results",
    "load_scores": "verydeep.evaluate.results",
    "save_scores": "verydeep.evaluate.results",
    "write_predictions": "verydeep.evaluate.results",
    "RescaleToScales": "verydeep.evaluate.scoring",
    "Scorer": "verydeep.evaluate.scoring",
    "classify_files": "verydeep.evaluate.classify",
    "predict": "verydeep.evaluate.classify",
}
__getattr__ = lazy_attributes(__name__, _DEFINED_IN)
