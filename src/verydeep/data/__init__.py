"""From image files to the networks' input: decoding, Caffe's preprocessing, the image sets the
jobs read, and the paper's training augmentation.

- :mod:`.choices`: the names a user picks from (rescaling filters, label layouts), free of torch.
- :mod:`.preprocess`: decoding to RGB, :func:`~.preprocess.rescale` (shorter side to S or Q,
  the one rescaling every job uses), Caffe's BGR / mean-pixel space, the seed's centre crop.
- :mod:`.images`: image lists, and a dataset and collate function that turn an unreadable file
  into a :class:`~.images.Failed` record instead of an error.
- :mod:`.eval_set`: the layouts ILSVRC-2012 validation data comes in, as one :class:`~.eval_set.EvalSet`.
- :mod:`.training`: ImageFolder scanning, the per-epoch order and sharding of training batches.
- :mod:`.calibration`: int8 calibration images from a folder, preprocessed as the center crop.
- :mod:`.augment`: scale jittering, crops, flips and colour shifts, drawn per image from a seed.

Split by what a caller needs: the command line reads :mod:`.choices` without paying for torch,
evaluation needs no training code, and :mod:`.preprocess` is the only module that knows the
colour space. This ``__init__`` imports no submodule, so importing one stays as cheap as it is.
"""

__all__ = ["augment", "calibration", "choices", "eval_set", "images", "preprocess", "training"]
