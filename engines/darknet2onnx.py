#!/usr/bin/env python3
"""Darknet YOLO (cfg + weights) -> ONNX with dynamic batch and the YOLO heads decoded in the graph.

    python engines/darknet2onnx.py convert --cfg yolov3-tiny.cfg --weights yolov3-tiny.weights --out yolov3-tiny.onnx
    python engines/darknet2onnx.py check --cfg ... --weights ... --onnx ... --rgb frame.rgb --width W --height H

`convert` folds batch normalisation into the convolutions and decodes every [yolo] head inside the
graph, so that the model's one output is "detections" float32 [N, boxes, 5 + classes]: centre x,
centre y, width, height (input pixels), objectness, class probabilities (all after the sigmoid).
Input "images" float32 [N, 3, H, W]: RGB, divided by 255.

`check` is the reference the conversion is tested against: a plain numpy forward pass over the
*unfolded* weights, in Darknet's own order of operations (batch norm as Darknet computes it, its
own decoding loop), on one letterboxed frame (raw packed RGB). It compares every decoded value with
what ONNX Runtime computes from the converted file, and prints the reference detections (per-class
NMS) in frame pixels as JSON, for the detection tests of the Rust side.

Supported layers: convolutional (batch_normalize, leaky / linear activation), maxpool, route,
upsample, shortcut, yolo: enough for YOLOv3 and YOLOv3-tiny.
"""
import argparse
import json
import sys

import numpy as np


def parse_cfg(path):
    sections = []
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                sections.append({"type": line.strip("[]").strip()})
            else:
                k, v = (s.strip() for s in line.split("=", 1))
                sections[-1][k] = v
    if not sections or sections[0]["type"] not in ("net", "network"):
        sys.exit(f"{path}: the first section must be [net]")
    return sections[0], sections[1:]


def ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def load_weights(path, net, layers):
    """Per convolutional layer: dict with w (out, in, k, k), b, and bn (scales, mean, var) or None."""
    data = open(path, "rb").read()
    major, minor, _rev = np.frombuffer(data[:12], np.int32)
    off = 12 + (8 if major * 10 + minor >= 2 else 4)
    vals = np.frombuffer(data[off:], np.float32)
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(vals):
            sys.exit(f"{path}: too short for the cfg (layer needs {n} more values)")
        out = vals[pos:pos + n].copy()
        pos += n
        return out

    channels = [int(net.get("channels", 3))]
    params = []
    for L in layers:
        t = L["type"]
        cin = channels[-1]
        if t == "convolutional":
            n, k = int(L["filters"]), int(L["size"])
            bn = int(L.get("batch_normalize", 0))
            b = take(n)
            norm = (take(n), take(n), take(n)) if bn else None  # scales, rolling mean, rolling var
            w = take(n * cin * k * k).reshape(n, cin, k, k)
            params.append({"w": w, "b": b, "bn": norm})
            channels.append(n)
        else:
            params.append(None)
            if t == "route":
                idx = [i if i >= 0 else len(channels) - 1 + i for i in ints(L["layers"])]
                channels.append(sum(channels[i + 1] for i in idx))
            elif t in ("maxpool", "upsample", "shortcut", "yolo"):
                channels.append(cin)
            else:
                sys.exit(f"unsupported layer [{t}]")
    if pos != len(vals):
        sys.exit(f"{path}: {len(vals) - pos} values left over after the last layer")
    return params


def yolo_anchors(L):
    a = ints(L["anchors"])
    pairs = [(a[2 * i], a[2 * i + 1]) for i in range(len(a) // 2)]
    return [pairs[m] for m in ints(L["mask"])]


# --- ONNX ------------------------------------------------------------------------------------------

def convert(cfg, weights, out, opset=13):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    net, layers = parse_cfg(cfg)
    params = load_weights(weights, net, layers)
    W, H = int(net["width"]), int(net["height"])
    nodes, inits, count = [], [], [0]

    def name(p):
        count[0] += 1
        return f"{p}_{count[0]}"

    def const(arr, p="c"):
        n = name(p)
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(kind, inputs, **attrs):
        y = name(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [y], **attrs))
        return y

    outs, heads = [], []
    x = "images"
    for i, (L, p) in enumerate(zip(layers, params)):
        t = L["type"]
        if t == "convolutional":
            w, b = p["w"], p["b"]
            if p["bn"] is not None:
                scales, mean, var = p["bn"]
                f = scales / (np.sqrt(var) + 1e-6)  # Darknet: (x - mean) / (sqrt(var) + .000001)
                w = w * f[:, None, None, None]
                b = b - mean * f
            k, s = int(L["size"]), int(L.get("stride", 1))
            pad = k // 2 if int(L.get("pad", 0)) else int(L.get("padding", 0))
            x = op("Conv", [x, const(w.astype(np.float32), "w"), const(b.astype(np.float32), "b")],
                   kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)
            act = L.get("activation", "logistic")
            if act == "leaky":
                x = op("LeakyRelu", [x], alpha=0.1)
            elif act != "linear":
                sys.exit(f"layer {i}: unsupported activation {act}")
        elif t == "maxpool":
            k, s = int(L["size"]), int(L.get("stride", 1))
            total = int(L.get("padding", k - 1))
            lo = total // 2  # Darknet's offset is -pad/2 (C division): the rest pads the far side
            x = op("MaxPool", [x], kernel_shape=[k, k], strides=[s, s], pads=[lo, lo, total - lo, total - lo])
        elif t == "route":
            idx = [j if j >= 0 else i + j for j in ints(L["layers"])]
            x = outs[idx[0]] if len(idx) == 1 else op("Concat", [outs[j] for j in idx], axis=1)
        elif t == "upsample":
            s = float(L.get("stride", 2))
            x = op("Resize", [x, "", const(np.array([1, 1, s, s], np.float32), "scales")], mode="nearest")
        elif t == "shortcut":
            j = int(L["from"])
            x = op("Add", [x, outs[i + j if j < 0 else j]])
        elif t == "yolo":
            anchors = yolo_anchors(L)
            na, nc = len(anchors), int(L["classes"])
            gh, gw = H // _stride_of(outs, i, H), W // _stride_of(outs, i, H)
            heads.append(_decode_head(op, const, x, na, nc, gh, gw, W, H, anchors, float(L.get("scale_x_y", 1))))
        outs.append(x)
    det = heads[0] if len(heads) == 1 else op("Concat", heads, axis=1)
    nodes.append(helper.make_node("Identity", [det], ["detections"]))
    nc = int(next(L for L in layers if L["type"] == "yolo")["classes"])
    graph = helper.make_graph(
        nodes, "darknet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", "boxes", 5 + nc])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="poolpipe darknet2onnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)


# Spatial sizes of every layer's output, filled by _shapes() before conversion.
_SIZES = {}


def _stride_of(outs, i, H):
    return H // _SIZES[i]


def _decode_head(op, const, x, na, nc, gh, gw, W, H, anchors, sxy):
    """[N, na*(5+nc), gh, gw] -> [N, na*gh*gw, 5+nc] decoded (Darknet's channel order: anchor-major)."""
    e = 5 + nc
    r = op("Reshape", [x, const(np.array([0, na, e, gh, gw], np.int64), "shape")])
    xy = op("Slice", [r, const(np.array([0], np.int64)), const(np.array([2], np.int64)), const(np.array([2], np.int64))])
    wh = op("Slice", [r, const(np.array([2], np.int64)), const(np.array([4], np.int64)), const(np.array([2], np.int64))])
    rest = op("Slice", [r, const(np.array([4], np.int64)), const(np.array([e], np.int64)), const(np.array([2], np.int64))])
    gy, gx = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij")
    grid = np.stack([gx, gy])[None, None]  # [1, 1, 2, gh, gw]
    cell = np.array([W / gw, H / gh], np.float32).reshape(1, 1, 2, 1, 1)
    sig = op("Sigmoid", [xy])
    if sxy != 1.0:
        sig = op("Add", [op("Mul", [sig, const(np.float32(sxy))]), const(np.float32(-(sxy - 1) / 2))])
    xy = op("Mul", [op("Add", [sig, const(grid, "grid")]), const(cell, "cell")])
    anc = np.array(anchors, np.float32).reshape(1, na, 2, 1, 1)
    wh = op("Mul", [op("Exp", [wh]), const(anc, "anchors")])
    rest = op("Sigmoid", [rest])
    d = op("Concat", [xy, wh, rest], axis=2)
    t = op("Transpose", [d], perm=[0, 1, 3, 4, 2])
    return op("Reshape", [t, const(np.array([0, -1, e], np.int64), "shape")])


def _shapes(cfg):
    net, layers = parse_cfg(cfg)
    size = [int(net["height"])]
    for i, L in enumerate(layers):
        t = L["type"]
        s = size[-1]
        if t == "convolutional":
            k, st = int(L["size"]), int(L.get("stride", 1))
            pad = k // 2 if int(L.get("pad", 0)) else int(L.get("padding", 0))
            s = (s + 2 * pad - k) // st + 1
        elif t == "maxpool":
            k, st = int(L["size"]), int(L.get("stride", 1))
            s = (s + int(L.get("padding", k - 1)) - k) // st + 1
        elif t == "route":
            s = size[1 + ([j if j >= 0 else i + j for j in ints(L["layers"])][0])]
        elif t == "upsample":
            s = s * int(L.get("stride", 2))
        size.append(s)
        _SIZES[i] = s


# --- numpy reference -------------------------------------------------------------------------------

def reference_forward(cfg, weights, x):
    """Darknet's forward pass on one image x [3, H, W]: raw yolo layer outputs [(na, 5+nc, gh, gw)]."""
    net, layers = parse_cfg(cfg)
    params = load_weights(weights, net, layers)
    outs, heads = [], []
    for i, (L, p) in enumerate(zip(layers, params)):
        t = L["type"]
        if t == "convolutional":
            k, s = int(L["size"]), int(L.get("stride", 1))
            pad = k // 2 if int(L.get("pad", 0)) else int(L.get("padding", 0))
            xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
            win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::s, ::s]
            c, oh, ow = win.shape[:3]
            cols = win.transpose(0, 3, 4, 1, 2).reshape(c * k * k, oh * ow)
            y = (p["w"].reshape(p["w"].shape[0], -1) @ cols).reshape(-1, oh, ow)
            if p["bn"] is not None:
                scales, mean, var = p["bn"]
                y = (y - mean[:, None, None]) / (np.sqrt(var)[:, None, None] + 1e-6)
                y = y * scales[:, None, None]
            y = y + p["b"][:, None, None]
            if L.get("activation") == "leaky":
                y = np.where(y > 0, y, 0.1 * y)
            x = y.astype(np.float32)
        elif t == "maxpool":
            k, s = int(L["size"]), int(L.get("stride", 1))
            total = int(L.get("padding", k - 1))
            lo = total // 2
            xp = np.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo)), constant_values=-np.inf)
            win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::s, ::s]
            x = win.max(axis=(3, 4))
        elif t == "route":
            idx = [j if j >= 0 else i + j for j in ints(L["layers"])]
            x = np.concatenate([outs[j] for j in idx], axis=0)
        elif t == "upsample":
            s = int(L.get("stride", 2))
            x = x.repeat(s, axis=1).repeat(s, axis=2)
        elif t == "shortcut":
            j = int(L["from"])
            x = x + outs[i + j if j < 0 else j]
        elif t == "yolo":
            na = len(ints(L["mask"]))
            heads.append((L, x.reshape(na, -1, x.shape[1], x.shape[2])))
        outs.append(x)
    return net, heads


def reference_decode(net, heads):
    """Darknet's get_yolo_detections, one box at a time: rows of (cx, cy, w, h, obj, probs...)."""
    W, H = int(net["width"]), int(net["height"])
    rows = []
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    for L, raw in heads:
        anchors = yolo_anchors(L)
        na, e, gh, gw = raw.shape
        for a in range(na):
            for row in range(gh):
                for col in range(gw):
                    v = raw[a, :, row, col].astype(np.float64)
                    rows.append([(col + sig(v[0])) / gw * W, (row + sig(v[1])) / gh * H,
                                 np.exp(v[2]) * anchors[a][0], np.exp(v[3]) * anchors[a][1],
                                 sig(v[4]), *sig(v[5:])])
    return np.array(rows, np.float64)


def letterbox(rgb, fw, fh, W, H, pad):
    """Packed RGB frame -> [3, H, W] in [0, 1], aspect kept, centred, borders `pad` (0..255);
    bilinear with half-pixel centres. Returns (tensor, scale, dx, dy)."""
    img = np.frombuffer(rgb, np.uint8).reshape(fh, fw, 3).astype(np.float32)
    scale = min(W / fw, H / fh)
    nw, nh = max(1, round(fw * scale)), max(1, round(fh * scale))
    dx, dy = (W - nw) // 2, (H - nh) // 2
    sx, sy = fw / nw, fh / nh
    fx = np.clip((np.arange(nw) + 0.5) * sx - 0.5, 0, fw - 1)
    fy = np.clip((np.arange(nh) + 0.5) * sy - 0.5, 0, fh - 1)
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    x1, y1 = np.minimum(x0 + 1, fw - 1), np.minimum(y0 + 1, fh - 1)
    wx, wy = (fx - x0)[None, :, None], (fy - y0)[:, None, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    out = np.full((H, W, 3), pad, np.float32)
    out[dy:dy + nh, dx:dx + nw] = top * (1 - wy) + bot * wy
    return (out / 255.0).transpose(2, 0, 1).astype(np.float32), scale, dx, dy


def nms(rows, score_thresh, iou_thresh):
    """Per-class NMS over (cx, cy, w, h, obj, probs...) rows: [(class, score, x0, y0, x1, y1)]."""
    found = []
    for r in rows:
        c = int(np.argmax(r[5:]))
        s = r[4] * r[5 + c]
        if s > score_thresh:
            found.append((c, s, r[0] - r[2] / 2, r[1] - r[3] / 2, r[0] + r[2] / 2, r[1] + r[3] / 2))
    found.sort(key=lambda d: -d[1])
    kept = []
    for d in found:
        ok = True
        for k in kept:
            if k[0] != d[0]:
                continue
            iw = max(0.0, min(d[4], k[4]) - max(d[2], k[2]))
            ih = max(0.0, min(d[5], k[5]) - max(d[3], k[3]))
            inter = iw * ih
            union = (d[4] - d[2]) * (d[5] - d[3]) + (k[4] - k[2]) * (k[5] - k[3]) - inter
            if union > 0 and inter / union > iou_thresh:
                ok = False
                break
        if ok:
            kept.append(d)
    return kept


def check(args):
    import onnxruntime as ort

    net, heads = None, None
    W = H = None
    rgb = open(args.rgb, "rb").read()
    net, _ = parse_cfg(args.cfg)
    W, H = int(net["width"]), int(net["height"])
    x, scale, dx, dy = letterbox(rgb, args.width, args.height, W, H, args.pad)
    net, heads = reference_forward(args.cfg, args.weights, x)
    ref = reference_decode(net, heads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x[None]})[0][0]
    if got.shape != ref.shape:
        sys.exit(f"ONNX output {got.shape} != reference {ref.shape}")
    # Coordinates are in pixels (up to ~400): compare them relative to the input size.
    diff_xywh = float(np.abs(got[:, :4] - ref[:, :4]).max() / max(W, H))
    diff_prob = float(np.abs(got[:, 4:] - ref[:, 4:]).max())
    names = open(args.names).read().split("\n") if args.names else []
    dets = []
    for c, s, x0, y0, x1, y1 in nms(ref, args.score, args.iou):
        bx0, by0 = (x0 - dx) / scale, (y0 - dy) / scale
        bx1, by1 = (x1 - dx) / scale, (y1 - dy) / scale
        bx0, by0 = max(0.0, bx0), max(0.0, by0)
        bx1, by1 = min(float(args.width), bx1), min(float(args.height), by1)
        dets.append({"class_id": c, "label": names[c] if c < len(names) else f"class_{c}",
                     "score": round(float(s), 4),
                     "box": {"x": bx0, "y": by0, "w": bx1 - bx0, "h": by1 - by0}})
    json.dump({"boxes": int(ref.shape[0]), "max_diff_xywh": diff_xywh, "max_diff_prob": diff_prob,
               "detections": dets}, sys.stdout)
    print()
    tol = 1e-3
    if diff_xywh > tol or diff_prob > tol:
        sys.exit(f"the converted model disagrees with the reference: {diff_xywh:.2e} (boxes), {diff_prob:.2e} (scores)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--cfg", required=True)
    c.add_argument("--weights", required=True)
    c.add_argument("--out", required=True)
    k = sub.add_parser("check")
    k.add_argument("--cfg", required=True)
    k.add_argument("--weights", required=True)
    k.add_argument("--onnx", required=True)
    k.add_argument("--rgb", required=True, help="one frame, packed RGB bytes")
    k.add_argument("--width", type=int, required=True)
    k.add_argument("--height", type=int, required=True)
    k.add_argument("--pad", type=float, default=127.5, help="border pixel value (Darknet: 0.5 * 255)")
    k.add_argument("--score", type=float, default=0.25)
    k.add_argument("--iou", type=float, default=0.45)
    k.add_argument("--names", help="class names, one per line")
    a = ap.parse_args()
    if a.cmd == "convert":
        _shapes(a.cfg)
        convert(a.cfg, a.weights, a.out)
    else:
        check(a)


if __name__ == "__main__":
    main()
