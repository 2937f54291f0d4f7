"""The one exception type users see: a message that names the file, the layer, expected and found."""

from __future__ import annotations


class VerydeepError(Exception):
    """A problem with the user's input (file, layer, option) rather than a bug.

    The CLI prints ``str(error)`` on one line and exits non-zero, without a traceback unless
    ``--debug`` is given. Build messages as ``"<file>: layer <name>: expected <x>, found <y>"``.
    """


class CaffeFormatError(VerydeepError):
    """A prototxt or caffemodel that cannot be read or does not fit the net."""


class WeightsError(VerydeepError):
    """Weights that cannot be found, downloaded, verified or mapped onto a model."""


class ImageError(VerydeepError):
    """An image file that cannot be decoded."""
