"""Caffe's formats, read and written without Caffe.

- :mod:`.prototxt`: text nets (V1 and V2) -> one normalised V2 ``NetParameter``; the Table 1
  deploy nets (:func:`vgg_net`) and their recognition (:func:`vgg_spec`).
- :mod:`.caffemodel`: binary weights, read and written at memory speed.
- :mod:`.graph`: :class:`CaffeGraph`, any deploy net of the supported layers as a torch module.
- :mod:`.load`: :func:`load_caffemodel`, a caffemodel as a VGG or a CaffeGraph.
- :mod:`.export`: a VGG written back as a V2 prototxt + caffemodel, checked in OpenCV.

The schema is ``caffe.proto`` (ours: only what these need, with Caffe's field numbers);
``caffe_pb2.py`` and its type stub ``caffe_pb2.pyi`` are generated from it and committed,
with protoc 25.1 (``grpcio-tools==1.62.3``) because that gencode imports on every protobuf runtime from 4.21 up
(newer protoc emits a check that refuses runtimes older than itself). To regenerate, in a
scratch environment::

    pip install grpcio-tools==1.62.3
    python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src src/verydeep/formats/caffe/caffe.proto
"""

from importlib import resources

from verydeep.formats.caffe.caffemodel import CaffeModel, read_caffemodel, write_caffemodel
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.caffe.prototxt import (
    SUPPORTED_TYPES,
    NetParameter,
    format_prototxt,
    read_prototxt,
    upgrade,
    validate,
    vgg_net,
    vgg_spec,
    write_prototxt,
)

#: The published VGG-16 deploy prototxt (V1), as shipped with the package.
VGG16_DEPLOY = resources.files(__name__) / "prototxts" / "VGG_ILSVRC_16_layers_deploy.prototxt"

__all__ = [
    "SUPPORTED_TYPES",
    "VGG16_DEPLOY",
    "CaffeGraph",
    "CaffeModel",
    "NetParameter",
    "format_prototxt",
    "read_caffemodel",
    "read_prototxt",
    "upgrade",
    "validate",
    "vgg_net",
    "vgg_spec",
    "write_caffemodel",
    "write_prototxt",
]
