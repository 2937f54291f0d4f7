"""The file formats VGG weights travel in, each read and written side by side.

- :mod:`.caffe`: Caffe's prototxt (V1 and V2) and caffemodel, the :class:`CaffeGraph` module for
  any deploy net, :func:`load_caffemodel`, and the Caffe export.
- :mod:`.safetensors`: verydeep's own weights file (metadata rebuilds the net) and plain state
  dicts in Caffe names.
- :mod:`.torchvision`: torchvision's VGG names, module and ``.pth`` files, both ways.
- :mod:`.keras`: Keras' VGG16/VGG19 ``.h5`` weight files (read).
- :mod:`.onnx`: ONNX export, checked by onnxruntime.
- :mod:`.input_space`: the input spaces (Caffe, torchvision, RGB 0..255/0..1) and folding their
  difference into conv1_1, which every conversion between them uses.
- :mod:`.checks` and :mod:`.export`: every export is read back by an independent consumer and
  compared with verydeep before it counts; :func:`export` dispatches by format.

Formats build nets through :mod:`verydeep.models`; which file to read, and where it comes from,
is :mod:`verydeep.hub`'s business.
"""

from verydeep.formats.caffe import CaffeGraph, read_caffemodel, read_prototxt, write_caffemodel, write_prototxt
from verydeep.formats.caffe.load import load_caffemodel
from verydeep.formats.export import FORMATS, ExportReport, export, probe
from verydeep.formats.input_space import INPUT_SPACES, InputSpace, fold_input, to_space, unfold_input
from verydeep.formats.safetensors import load_safetensors, read_metadata, save_safetensors

__all__ = [
    "FORMATS",
    "INPUT_SPACES",
    "CaffeGraph",
    "ExportReport",
    "InputSpace",
    "export",
    "fold_input",
    "load_caffemodel",
    "load_safetensors",
    "probe",
    "read_caffemodel",
    "read_metadata",
    "read_prototxt",
    "save_safetensors",
    "to_space",
    "unfold_input",
    "write_caffemodel",
    "write_prototxt",
]
