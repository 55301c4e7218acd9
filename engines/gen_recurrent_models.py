#!/usr/bin/env python3
"""Generates the recurrent cells of `kind = "recurrent"` stages (ONNX, dynamic batch, random weights).

    python engines/gen_recurrent_models.py --out engines/recurrent gru_stream gru_decoder

Each model is ONE STEP of a recurrent cell: poolpipe feeds the state outputs of a step back as the
state inputs of the next (per stream, or per item), so the same file serves one item or a batch of
items that are at different steps. The GRU equations are written out (MatMul, Sigmoid, Tanh)
rather than with ONNX's GRU operator, so that one call is exactly one step:

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

The weights are random (fixed seed): the outputs mean nothing. They exist to exercise recurrent
stages and cellular batching on real engines.
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 64


class Cell:
    def __init__(self, seed):
        self.nodes, self.inits, self.n = [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, prefix):
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, arr, prefix="c"):
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def weight(self, rows, cols, scale=None):
        s = scale if scale is not None else np.sqrt(1.0 / rows)
        return self.const(self.rng.normal(0.0, s, (rows, cols)), "w")

    def op(self, kind, inputs, out=None, **attrs):
        y = out or self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [y], **attrs))
        return y

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

    def model(self, name, inputs, outputs, metadata):
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


def gru_stream(seed=1):
    c = Cell(seed)
    x = c.embed_image("image", 4, 64)
    h = c.gru(x, HIDDEN, "h_in", "h_out")
    logits = c.linear(h, HIDDEN, 4, scale=1.0)
    c.op("Softmax", [logits], out="scores", axis=1)
    h0 = np.round(c.rng.normal(0.0, 0.1, HIDDEN), 6)
    return c.model("gru_stream",
                   [("image", ["N", 3, 32, 32]), ("h_in", ["N", HIDDEN])],
                   [("h_out", ["N", HIDDEN]), ("scores", ["N", 4])],
                   {"h0": ",".join(f"{v:.6f}" for v in h0)})


def gru_decoder(seed=2, vocab=16):
    c = Cell(seed)
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
    return c.model("gru_decoder",
                   [("image", ["N", 3, 16, 16]), ("token", ["N", vocab]), ("h_in", ["N", HIDDEN]),
                    ("c_in", ["N", 1])],
                   [("h_out", ["N", HIDDEN]), ("c_out", ["N", 1]), ("logits", ["N", vocab])],
                   {"tokens": "\n".join(tokens)})


BUILDERS = {"gru_stream": gru_stream, "gru_decoder": gru_decoder}


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
