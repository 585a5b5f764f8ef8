"""Fake insightface packs, written with ``onnx.helper`` at test time (no weights in git).

``build_fake_insightface_pack(root)`` writes ``<root>/models/antelopev2/`` with two ONNX files
that insightface's model zoo routes exactly like the real ones (by graph shapes, not names):

- ``scrfd_10g_bnkps.onnx``: an SCRFD-format detector. Input ``input.1`` ``[1,3,?,?]``; 9 outputs
  (scores ``[N,1]``, box distances ``[N,4]``, keypoint distances ``[N,10]`` for strides 8, 16, 32,
  2 anchors per location, ``N = H/s * W/s * 2``). It detects bright discs ("faces") on a dark
  background with a centre-surround box filter: for an anchor window of side ``K`` px,
  ``f_in`` = bright fraction of the ``K x K`` window and ``f_out`` = bright fraction of the
  ``2K x 2K`` window around it; score = ``sigmoid(16 (f_in - f_out) - 6)``. A disc of
  diameter ``d`` fires for about ``0.8 K <= d <= 1.75 K`` ("bright" = channel mean > 127.5);
  an all-dark image scores ~0 (an all-white one fires at its borders: outside counts as dark). The box is the bright-pixel centroid +- ``d/2`` with ``d`` recovered from the
  ``2K`` window's bright area, and the 5 keypoints sit at fixed places of that disc, so
  ``norm_crop`` maps every face to the same place of the 112 crop. Anchor windows span
  16..256 px (real SCRFD: 16..512), so a close-up face wider than ~450 px at the detector's
  input is missed and found only at a smaller det size, like real detectors miss faces that
  fill the frame (what the 640 -> 256 det-size fallback is for).
- ``glintr100.onnx``: an "ArcFace" recogniser ``[N,3,112,112] -> [N,512]``: 8x8 average pooling
  of the face interior of the crop, per-sample centring, fixed seeded random projection.
  Deterministic; different crops give different embeddings, the same face at another place or
  scale (after alignment) nearly the same one.

``synthetic_face_image`` / ``draw_face`` make matching test images.
"""

from __future__ import annotations

import math
import os

import numpy as np

# SCRFD layout insightface expects from a 9-output detector: strides 8/16/32, 2 anchors each.
STRIDES = (8, 16, 32)
# Anchor window side in cells of its stride (K = cells * stride px): 16, 32, 64, 128, 192, 256.
ANCHOR_CELLS = {8: (2, 4), 16: (4, 8), 32: (6, 8)}
# insightface's ArcFace 112x112 landmark template (utils/face_align.py: arcface_dst).
ARCFACE_DST = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655),
               (70.7299, 92.2041))
# Where a face disc lands in the 112 crop: centre (56, 64), diameter 96 px.
CROP_CENTER, CROP_DIAMETER = (56.0, 64.0), 96.0
# Pack name -> (detector file, recogniser file), as in the real packs.
PACK_FILES = {"antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
              "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx")}

OPSET, IR_VERSION = 17, 8


def kps_template() -> np.ndarray:
    """5 keypoints of a face disc relative to its centre, in units of its diameter. [5,2]"""
    dst = np.asarray(ARCFACE_DST, dtype=np.float32)
    return (dst - np.asarray(CROP_CENTER, dtype=np.float32)) / CROP_DIAMETER


class _Graph:
    """Minimal ``onnx.helper`` graph builder with unique node and constant names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.initializers, self.count = prefix, [], [], 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{self.prefix}_{kind}_{self.count}"

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, num_outputs: int = 1, **attrs):
        from onnx import helper

        name = self._name(op_type.lower())
        outputs = [f"{name}_out{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if num_outputs == 1 else outputs

    def save(self, path: str, inputs, outputs, graph_name: str) -> str:
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", OPSET)],
                                  producer_name="magicmirror_video.tiny_faces")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        onnx.save(model, path)
        return path


def _coords(g: _Graph, shape: str, axis: int, scale: float, offset: float, view) -> str:
    """``arange(shape[axis]) * scale + offset`` reshaped to ``view`` (e.g. [1,1,1,-1])."""
    from onnx import TensorProto

    n = g.op("Gather", [shape, g.const(axis, np.int64)], axis=0)                    # scalar
    r = g.op("Range", [g.const(0, np.int64), n, g.const(1, np.int64)])             # [n]
    r = g.op("Cast", [r], to=TensorProto.FLOAT)
    r = g.op("Add", [g.op("Mul", [r, g.const(scale)]), g.const(offset)])
    return g.op("Reshape", [r, g.const(view, np.int64)])


def _stack_anchors(g: _Graph, maps, channels: int) -> str:
    """Per-anchor maps [1,C,h,w] -> SCRFD rows [h*w*A, C] ordered (y, x, anchor)."""
    stacked = g.op("Concat", [g.op("Unsqueeze", [m, g.const([4], np.int64)]) for m in maps], axis=4)
    rows = g.op("Transpose", [stacked], perm=[0, 2, 3, 4, 1])                       # [1,h,w,A,C]
    return g.op("Reshape", [rows, g.const([-1, channels], np.int64)])


def build_fake_detector(path: str, slope: float = 12.0, gain: float = 16.0, bias: float = -6.0) -> str:
    """Write the SCRFD-format blob detector (see module docstring) to ``path``."""
    from onnx import TensorProto, helper

    g = _Graph("det")
    x = "input.1"                                                                   # [1,3,H,W] (rgb-127.5)/128
    gray = g.op("ReduceMean", [x], axes=[1], keepdims=1)                            # [1,1,H,W]
    bright = g.op("Sigmoid", [g.op("Mul", [gray, g.const(slope)])])                 # [1,1,H,W] ~1 if > 127.5
    shape = g.op("Shape", [bright])
    xs = _coords(g, shape, 3, 1.0, 0.5, [1, 1, 1, -1])                              # pixel centres [1,1,1,W]
    ys = _coords(g, shape, 2, 1.0, 0.5, [1, 1, -1, 1])                              # [1,1,H,1]
    moments = g.op("Concat", [bright, g.op("Mul", [bright, xs]), g.op("Mul", [bright, ys])], axis=1)  # [1,3,H,W]
    template = kps_template()
    ux = g.const(template[:, 0].reshape(1, 5, 1, 1))
    uy = g.const(template[:, 1].reshape(1, 5, 1, 1))

    outputs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        cells = g.op("AveragePool", [moments], kernel_shape=[s, s], strides=[s, s])  # [1,3,h,w]
        cshape = g.op("Shape", [cells])
        ax = _coords(g, cshape, 3, float(s), 0.0, [1, 1, 1, -1])                    # anchor x = j*s [1,1,1,w]
        ay = _coords(g, cshape, 2, float(s), 0.0, [1, 1, -1, 1])                    # [1,1,h,1]
        mass = g.op("Slice", [cells, g.const([0], np.int64), g.const([1], np.int64), g.const([1], np.int64)])
        kps_shape = g.op("Concat", [g.const([1, 10], np.int64),
                                    g.op("Slice", [cshape, g.const([2], np.int64), g.const([4], np.int64)])], axis=0)
        per_anchor = {"score": [], "bbox": [], "kps": []}
        for k in ANCHOR_CELLS[s]:
            side = float(k * s)
            # windows centred on the anchor point (j*s, i*s); outside the image counts as dark
            f_in = g.op("AveragePool", [mass], kernel_shape=[k, k], strides=[1, 1],
                        pads=[k // 2, k // 2, k // 2 - 1, k // 2 - 1], count_include_pad=1)  # [1,1,h,w]
            outer = g.op("AveragePool", [cells], kernel_shape=[2 * k, 2 * k], strides=[1, 1],
                         pads=[k, k, k - 1, k - 1], count_include_pad=1)                     # [1,3,h,w]
            f_out, sx, sy = g.op("Split", [outer], num_outputs=3, axis=1)                     # 3 x [1,1,h,w]
            denom = g.op("Add", [f_out, g.const(1e-6)])
            cx, cy = g.op("Div", [sx, denom]), g.op("Div", [sy, denom])                      # centroid px
            # disc area pi d^2/4 = f_out (2K)^2  ->  d = 4K sqrt(f_out / pi)
            diam = g.op("Sqrt", [g.op("Mul", [f_out, g.const(16.0 * side * side / math.pi)])])
            half = g.op("Mul", [diam, g.const(0.5)])
            score = g.op("Sigmoid", [g.op("Add", [g.op("Mul", [g.op("Sub", [f_in, f_out]), g.const(gain)]),
                                                  g.const(bias)])])
            inv_s = g.const(1.0 / s)
            left = g.op("Mul", [g.op("Sub", [ax, g.op("Sub", [cx, half])]), inv_s])
            top = g.op("Mul", [g.op("Sub", [ay, g.op("Sub", [cy, half])]), inv_s])
            right = g.op("Mul", [g.op("Sub", [g.op("Add", [cx, half]), ax]), inv_s])
            bottom = g.op("Mul", [g.op("Sub", [g.op("Add", [cy, half]), ay]), inv_s])
            bbox = g.op("Concat", [left, top, right, bottom], axis=1)                         # [1,4,h,w]
            kx = g.op("Mul", [g.op("Sub", [g.op("Add", [cx, g.op("Mul", [diam, ux])]), ax]), inv_s])  # [1,5,h,w]
            ky = g.op("Mul", [g.op("Sub", [g.op("Add", [cy, g.op("Mul", [diam, uy])]), ay]), inv_s])
            kxy = g.op("Concat", [g.op("Unsqueeze", [kx, g.const([2], np.int64)]),
                                  g.op("Unsqueeze", [ky, g.const([2], np.int64)])], axis=2)  # [1,5,2,h,w]
            per_anchor["score"].append(score)
            per_anchor["bbox"].append(bbox)
            per_anchor["kps"].append(g.op("Reshape", [kxy, kps_shape]))                       # [1,10,h,w]
        for key, channels in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[key].append(_stack_anchors(g, per_anchor[key], channels))

    # rename the final tensors (SCRFD order: scores x3, bboxes x3, kps x3)
    graph_outputs = []
    for key, channels in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s, tensor in zip(STRIDES, outputs[key]):
            name = f"{key}_{s}"
            g.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"det_out_{name}"))
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", channels]))
    graph_input = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "?", "?"])
    return g.save(path, [graph_input], graph_outputs, "fake_scrfd")


def build_fake_recognizer(path: str, seed: int = 0, dim: int = 512, scale: float = 3.0) -> str:
    """Write the "ArcFace" recogniser ``[N,3,112,112] -> [N,dim]`` to ``path``.

    Node names avoid insightface's mxnet heuristic (``Sub``/``Mul`` names among the first nodes
    switch it to mean 0 / std 1), so insightface feeds it ``(rgb - 127.5) / 127.5`` like glintr100.
    """
    from onnx import TensorProto, helper

    features = 3 * 8 * 8
    proj = np.random.default_rng(seed).standard_normal((features, dim)) * (scale / math.sqrt(features))
    g = _Graph("rec")
    x = "input.1"                                                                   # [N,3,112,112]
    # the face interior (the disc lands at (56, 64), diameter 96): rows 32..96, columns 24..88
    inner = g.op("Slice", [x, g.const([32, 24], np.int64), g.const([96, 88], np.int64), g.const([2, 3], np.int64)])
    pooled = g.op("AveragePool", [inner], kernel_shape=[8, 8], strides=[8, 8])      # [N,3,8,8]
    flat = g.op("Flatten", [pooled], axis=1)                                        # [N,192]
    centred = g.op("Sub", [flat, g.op("ReduceMean", [flat], axes=[1], keepdims=1)])
    emb = g.op("MatMul", [centred, g.const(proj)])                                  # [N,512]
    g.nodes.append(helper.make_node("Identity", [emb], ["embedding"], name="rec_out"))
    return g.save(path, [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 112, 112])],
                  [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])], "fake_arcface")


def build_fake_insightface_pack(root: str, name: str = "antelopev2", seed: int = 0) -> str:
    """Write ``<root>/models/<name>/`` (detector + recogniser, real file names); return the folder."""
    det_file, rec_file = PACK_FILES.get(name, ("det.onnx", "rec.onnx"))
    folder = os.path.join(root, "models", name)
    os.makedirs(folder, exist_ok=True)
    build_fake_detector(os.path.join(folder, det_file))
    build_fake_recognizer(os.path.join(folder, rec_file), seed=seed)
    return folder


def draw_face(image: np.ndarray, center, radius: float, seed: int = 0) -> np.ndarray:
    """Draw a bright textured face disc with dark eyes and mouth on ``image`` (RGB uint8 [H,W,3], in place)."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    cx, cy = float(center[0]), float(center[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)                                 # [H,W]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    # identity: a seeded skin colour plus a smooth seeded texture, all channels stay bright
    base = rng.uniform(185.0, 235.0, size=3)
    u, v = (xx - cx) / radius, (yy - cy) / radius
    texture = np.zeros((h, w, 3), np.float32)
    for _ in range(3):
        fx, fy, phase = rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0), rng.uniform(0, 2 * math.pi)
        texture += rng.uniform(-1, 1, size=3) * np.sin(math.pi * (fx * u + fy * v) + phase)[..., None]
    face = np.clip(base + 7.0 * texture, 150.0, 255.0)
    image[disc] = face[disc].astype(np.uint8)
    # coloured (not dark: the detector sees brightness only) eyes and mouth at the keypoint template
    kps = np.asarray(center, np.float32) + 2.0 * radius * kps_template()
    for px, py in kps[:2]:
        image[(xx - px) ** 2 + (yy - py) ** 2 <= (0.09 * radius) ** 2] = (110, 170, 240)
    (mx1, my1), (mx2, my2) = kps[3], kps[4]
    mouth = (np.abs(yy - 0.5 * (my1 + my2)) <= 0.05 * radius) & (xx >= mx1) & (xx <= mx2)
    image[mouth] = (240, 110, 150)
    return image


def synthetic_face_image(h: int, w: int, center=None, radius: float | None = None, seed: int = 0) -> np.ndarray:
    """A dark, slightly noisy RGB uint8 [H,W,3] image with one face disc (none if ``radius`` is None)."""
    rng = np.random.default_rng(10_000 + seed)
    image = rng.integers(0, 30, size=(h, w, 3), dtype=np.uint8)
    if radius is not None:
        draw_face(image, center if center is not None else (w / 2.0, h / 2.0), radius, seed=seed)
    return image
