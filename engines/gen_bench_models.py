#!/usr/bin/env python3
"""Generates architecture-faithful benchmark CNNs with random weights (ONNX, dynamic batch).

    python engines/gen_bench_models.py --out engines/bench resnet18 resnet50 mobilenetv2

The graphs follow the published architectures (ResNet-18/50: He et al. 2016; MobileNetV2: Sandler et
al. 2018) with batch normalisation folded into the convolutions, as inference runtimes do.
The weights are random (He initialisation, fixed seed), so the outputs mean nothing: these models
exist to measure throughput and to exercise model cutting, not to classify.
Input: "input" float32 [N, 3, 224, 224]; output: "logits" float32 [N, 1000].

It also writes the recurrent cells of `kind = "recurrent"` stages (random weights, fixed seed):

    python engines/gen_bench_models.py --out engines/recurrent gru_stream gru_decoder

Each is ONE STEP of a cell: poolpipe feeds the state outputs of a step back as the state inputs of
the next (per stream, or per item), so the same file serves one item or a batch of items that are
at different steps. The GRU equations are written out (MatMul, Sigmoid, Tanh) rather than with
ONNX's GRU operator, so that one call is exactly one step:

    z = sigmoid(x Wz + h Uz + bz)    r = sigmoid(x Wr + h Ur + br)
    n = tanh(x Wn + (r * h) Un + bn) h' = (1 - z) * n + z * h

- gru_stream: per-stream temporal state over frames. Inputs "image" [N,3,32,32] (normalised RGB),
  "h_in" [N,64]; the image is pooled to 8x8 and embedded (Gemm + ReLU) to x [N,64]. Outputs
  "h_out" [N,64] and "scores" [N,4] (softmax of a linear read-out of h'). Metadata "h0": a
  non-zero initial state (64 comma-separated floats).
- gru_decoder: an autoregressive decoder that runs until it emits token 0 (the end token).
  Inputs "image" [N,3,16,16] (the item: a frame or a box's crop), "token" [N,16] (one-hot of the
  previous step's token; zeros at the first step), "h_in" [N,64], "c_in" [N,1] (a step counter).
  Outputs "h_out", "c_out" (= c_in + 1) and "logits" [N,16]. The end token's logit grows with the
  counter, so every item ends, after a number of steps that depends on its image. Metadata
  "tokens": the 16 token strings, one per line.
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


HIDDEN = 64  # hidden size of the recurrent cells


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

    def op(self, kind, inputs, out=None, **attrs):
        y = out or self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [y], **attrs))
        return y

    def const(self, arr, prefix="c"):
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def weight(self, rows, cols, scale=None):
        s = scale if scale is not None else np.sqrt(1.0 / rows)
        return self.const(self.rng.normal(0.0, s, (rows, cols)), "w")

    def linear(self, x, cin, cout, scale=None, bias=0.0):
        return self.op("Add", [self.op("MatMul", [x, self.weight(cin, cout, scale)]),
                               self.const(np.full(cout, bias))])

    def embed_image(self, image, pool, cells):
        p = self.op("AveragePool", [image], kernel_shape=[pool, pool], strides=[pool, pool])
        f = self.op("Flatten", [p], axis=1)
        return self.op("Relu", [self.linear(f, 3 * cells, HIDDEN)])

    def gru(self, x, xdim, h, out):
        def gate(act):
            return self.op(act, [self.op("Add", [self.linear(x, xdim, HIDDEN),
                                                 self.op("MatMul", [h, self.weight(HIDDEN, HIDDEN)])])])
        z = gate("Sigmoid")
        r = gate("Sigmoid")
        rh = self.op("Mul", [r, h])
        n = self.op("Tanh", [self.op("Add", [self.linear(x, xdim, HIDDEN),
                                             self.op("MatMul", [rh, self.weight(HIDDEN, HIDDEN)])])])
        one_minus_z = self.op("Sub", [self.const(1.0), z])
        return self.op("Add", [self.op("Mul", [one_minus_z, n]), self.op("Mul", [z, h])], out=out)

    def model_io(self, name, inputs, outputs, metadata):
        g = helper.make_graph(self.nodes, name,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="poolpipe")
        m.ir_version = 8
        for k, v in metadata.items():
            e = m.metadata_props.add()
            e.key, e.value = k, v
        onnx.checker.check_model(m)
        return m

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


def gru_stream(seed=1):
    c = Graph(seed)
    x = c.embed_image("image", 4, 64)
    h = c.gru(x, HIDDEN, "h_in", "h_out")
    logits = c.linear(h, HIDDEN, 4, scale=1.0)
    c.op("Softmax", [logits], out="scores", axis=1)
    h0 = np.round(c.rng.normal(0.0, 0.1, HIDDEN), 6)
    return c.model_io("gru_stream",
                   [("image", ["N", 3, 32, 32]), ("h_in", ["N", HIDDEN])],
                   [("h_out", ["N", HIDDEN]), ("scores", ["N", 4])],
                   {"h0": ",".join(f"{v:.6f}" for v in h0)})


def gru_decoder(seed=2, vocab=16):
    c = Graph(seed)
    ctx = c.embed_image("image", 4, 16)
    tok = c.linear("token", vocab, 16, scale=1.0)
    x = c.op("Concat", [ctx, tok], axis=1)
    h = c.gru(x, HIDDEN + 16, "h_in", "h_out")
    c.op("Add", ["c_in", c.const(np.ones((1, 1)))], out="c_out")
    # Symbol logits from h'; the end token's logit: a ramp in the step counter, offset by the image.
    sym = c.linear(h, HIDDEN, vocab - 1, scale=0.5)
    start = c.linear(ctx, HIDDEN, 1, scale=0.3, bias=-4.0)
    ramp = c.op("Mul", ["c_in", c.const(np.full((1, 1), 0.25))])
    end = c.op("Add", [start, ramp])
    c.op("Concat", [end, sym], out="logits", axis=1)
    tokens = ["</s>"] + [chr(ord("a") + i) for i in range(vocab - 1)]
    return c.model_io("gru_decoder",
                   [("image", ["N", 3, 16, 16]), ("token", ["N", vocab]), ("h_in", ["N", HIDDEN]),
                    ("c_in", ["N", 1])],
                   [("h_out", ["N", HIDDEN]), ("c_out", ["N", 1]), ("logits", ["N", vocab])],
                   {"tokens": "\n".join(tokens)})


BUILDERS = {"resnet18": lambda: resnet(18), "resnet50": lambda: resnet(50), "mobilenetv2": mobilenetv2,
            "gru_stream": gru_stream, "gru_decoder": gru_decoder}


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
