#!/usr/bin/env python3
"""Generates architecture-faithful benchmark CNNs with random weights (ONNX, dynamic batch).

    python engines/gen_bench_models.py --out engines/bench resnet18 resnet50 mobilenetv2

The graphs follow the published architectures (ResNet-18/50: He et al. 2016; MobileNetV2: Sandler et
al. 2018) with batch normalisation folded into the convolutions, as inference runtimes do.
The weights are random (He initialisation, fixed seed), so the outputs mean nothing: these models
exist to measure throughput and to exercise model cutting, not to classify.
Input: "input" float32 [N, 3, 224, 224]; output: "logits" float32 [N, 1000].
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Graph:
    def __init__(self, seed):
        self.nodes, self.inits, self.n = [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, prefix):
        self.n += 1
        return f"{prefix}_{self.n}"

    def conv(self, x, cin, cout, k, stride=1, group=1, act="relu"):
        w = self.name("w")
        b = self.name("b")
        fan_in = cin // group * k * k
        wt = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        self.inits += [numpy_helper.from_array(wt, w),
                       numpy_helper.from_array(np.zeros(cout, np.float32), b)]
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4, group=group))
        if act == "relu":
            z = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [z]))
            return z
        if act == "relu6":
            z = self.name("relu6")
            lo, hi = self.name("lo"), self.name("hi")
            self.inits += [numpy_helper.from_array(np.array(0.0, np.float32), lo),
                           numpy_helper.from_array(np.array(6.0, np.float32), hi)]
            self.nodes.append(helper.make_node("Clip", [y, lo, hi], [z]))
            return z
        return y

    def op(self, kind, inputs, **attrs):
        y = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [y], **attrs))
        return y

    def head(self, x, cin):
        p = self.op("GlobalAveragePool", [x])
        f = self.op("Flatten", [p], axis=1)
        w, b = self.name("fc_w"), self.name("fc_b")
        wt = self.rng.normal(0.0, np.sqrt(1.0 / cin), (1000, cin)).astype(np.float32)
        self.inits += [numpy_helper.from_array(wt, w), numpy_helper.from_array(np.zeros(1000, np.float32), b)]
        self.nodes.append(helper.make_node("Gemm", [f, w, b], ["logits"], transB=1))

    def model(self, name):
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])
        g = helper.make_graph(self.nodes, name, [inp], [out], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="poolpipe")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def resnet(depth, seed=0):
    g = Graph(seed)
    x = g.conv("input", 3, 64, 7, stride=2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    bottleneck = depth == 50
    layers = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    cin = 64
    for stage, blocks in enumerate(layers):
        width = 64 * 2 ** stage
        cout = width * 4 if bottleneck else width
        for i in range(blocks):
            stride = 2 if (i == 0 and stage > 0) else 1
            if bottleneck:
                y = g.conv(x, cin, width, 1)
                y = g.conv(y, width, width, 3, stride=stride)
                y = g.conv(y, width, cout, 1, act=None)
            else:
                y = g.conv(x, cin, width, 3, stride=stride)
                y = g.conv(y, width, cout, 3, act=None)
            skip = x if (stride == 1 and cin == cout) else g.conv(x, cin, cout, 1, stride=stride, act=None)
            x = g.op("Relu", [g.op("Add", [y, skip])])
            cin = cout
    g.head(x, cin)
    return g.model(f"resnet{depth}")


def mobilenetv2(seed=0):
    g = Graph(seed)
    x = g.conv("input", 3, 32, 3, stride=2, act="relu6")
    cin = 32
    # (expansion t, channels c, repeats n, stride s) from Table 2 of the paper.
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x if t == 1 else g.conv(x, cin, hidden, 1, act="relu6")
            y = g.conv(y, hidden, hidden, 3, stride=stride, group=hidden, act="relu6")
            y = g.conv(y, hidden, c, 1, act=None)
            x = g.op("Add", [x, y]) if (stride == 1 and cin == c) else y
            cin = c
    x = g.conv(x, cin, 1280, 1, act="relu6")
    g.head(x, 1280)
    return g.model("mobilenetv2")


BUILDERS = {"resnet18": lambda: resnet(18), "resnet50": lambda: resnet(50), "mobilenetv2": mobilenetv2}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("models", nargs="+", choices=sorted(BUILDERS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        path = os.path.join(args.out, f"{name}.onnx")
        tmp = path + ".partial"
        onnx.save(BUILDERS[name](), tmp)
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
