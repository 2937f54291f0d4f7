"""The nets' features put to use: extracted at scale to files, or as a perceptual/style loss.

- :mod:`.job`: :func:`extract`, the resumable loop over chunks of images (sharded under
  torchrun, partial results in a :class:`~verydeep.core.store.ChunkStore`) and the merge of
  the chunks into one file.
- :mod:`.writers`: the file formats (.npy, .npz, .parquet, .h5), written chunk by chunk, and
  :func:`read_features`.
- :mod:`.perceptual`: :class:`PerceptualLoss`, feature and Gram-matrix losses on VGG taps.

Split so a file format can be added or read without the job, and the job read without the
formats; the loss shares only the taps with them.
"""

from verydeep.extract.job import POOLS, ExtractResult, extract
from verydeep.extract.perceptual import DEFAULT_TAPS, PerceptualLoss, gram
from verydeep.extract.writers import WRITERS, read_features

__all__ = ["DEFAULT_TAPS", "POOLS", "WRITERS", "ExtractResult", "PerceptualLoss", "extract", "gram", "read_features"]
