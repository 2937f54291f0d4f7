"""Fuzz the prototxt reader and what ``verydeep info`` builds from it.

Each input is read as a prototxt file and described by ``verydeep.hub.info.summarize`` (parse,
validate, CaffeGraph on the meta device at the declared input, the layer table), within the
graph's parameter and blob caps. Two properties are checked besides "only VerydeepError":

- the graph's shape inference is what torch computes: the net is run on meta tensors of the
  declared input shapes and every layer's tops must have the shapes the graph inferred;
- the writer round-trips: the V2 text of the net reads back to the same text.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: A deploy net with every compute type the graph runs besides the Table 1 ones: LRN both ways,
#: Concat, Eltwise, Flatten, AVE and global pooling, grouped and dilated convolution.
BRANCHY_NET = """
name: "branchy"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 19 dim: 23 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1"
        relu_param { negative_slope: 0.1 } }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.001 beta: 0.75 k: 2 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "a" type: "Convolution" bottom: "pool1" top: "a" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "pool1" top: "b"
        convolution_param { num_output: 4 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 group: 2 } }
layer { name: "c" type: "Convolution" bottom: "pool1" top: "c"
        convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "cat" concat_param { axis: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "c" top: "max" eltwise_param { operation: MAX } }
layer { name: "norm2" type: "LRN" bottom: "cat" top: "norm2"
        lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "gap" type: "Pooling" bottom: "max" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "pool2" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def seeds(folder: Path) -> list[bytes]:
    """Narrow Table 1 nets from the project's writer (V1 and V2, classic and dense, at small
    inputs so that thousands run per second) and the branchy net above, written back by it too."""
    from verydeep.formats.caffe.prototxt import format_prototxt, parse_prototxt, vgg_net

    nets = [
        (vgg_net("A-LRN", 1 / 16, 10, size=32), "V1"),
        (vgg_net("D", 1 / 16, 10, size=32), "V2"),
        (vgg_net("A", 1 / 16, 5, dense=True, size=64, batch=2), "V2"),
        (parse_prototxt(BRANCHY_NET), "V2"),
    ]
    return [format_prototxt(net, version).encode() for net, version in nets]


def check_inferred_shapes(graph) -> None:
    """Run ``graph`` (a ``CaffeGraph``) on zeros of its declared input shapes, on torch's default
    device (``meta`` computes shapes only): every layer's tops must have the shapes it inferred."""
    import torch

    blobs = {name: torch.zeros(graph.blob_shapes[name]) for name in graph.inputs}
    with torch.no_grad():
        for step in graph.steps:
            tops = getattr(graph, step.attr)(*(blobs[b] for b in step.bottoms))
            found = tuple(tuple(t.shape) for t in tops)
            assert found == step.shapes, f"layer {step.name!r}: torch computes {found}, the graph {step.shapes}"
            blobs.update(zip(step.tops, tops))


def one_input(data: bytes, folder: Path) -> None:
    import torch

    from verydeep.formats.caffe.graph import CaffeGraph
    from verydeep.formats.caffe.prototxt import format_prototxt, parse_prototxt
    from verydeep.hub.info import summarize

    path = folder / "input.prototxt"
    path.write_bytes(data)
    summarize(path)  # what `verydeep info` does: a meta-device graph at the declared input
    net = parse_prototxt(data.decode("utf-8"), str(path))  # summarize read it: valid UTF-8
    text = format_prototxt(net)
    assert format_prototxt(parse_prototxt(text)) == text, "the V2 text does not read back to itself"
    with torch.device("meta"):
        check_inferred_shapes(CaffeGraph(net, source=str(path)))


if __name__ == "__main__":
    main(
        seeds,
        one_input,
        ["verydeep.formats.caffe.prototxt", "verydeep.formats.caffe.graph", "verydeep.hub.info"],
    )
