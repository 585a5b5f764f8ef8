"""CurricularFace recogniser (TFace ``IR`` backbone) for the FaceSim-Cur column of ConsisID and OpenS2V-Eval.

Both benchmarks score identity twice: with the insightface pack's ArcFace embedding and with
``glint360k_curricular_face_r101_backbone.bin``, a TFace ``IR_101`` trained with the CurricularFace
loss on Glint360K (ConsisID ``eval/get_facesim_fid.py``, OpenS2V-Nexus ``eval/get_facesim.py``; the
network is TFace's ``recognition/torchkit/backbone/model_irse.py``). This module is our own code for
that network; its ``state_dict`` keys and shapes are the released file's, so it loads strictly:

* ``input_layer``: 3x3 conv 3→64 (no bias) → BatchNorm2d → PReLU;
* ``body.<i>``: one "IR" unit per entry, stages of widths 64/128/256/512 with 3/13/30/3 units (IR-101; the
  file name says r101, TFace calls the depth 100), each stage starting with a stride-2 unit. A unit is
  ``res_layer`` = BN → 3x3 conv → BN → PReLU → 3x3 conv (stride) → BN, plus ``shortcut_layer`` = a 1x1 conv
  (stride) + BN when the width changes, else a stride-s subsampling (a 1x1 max-pool: no weights);
* ``output_layer``: BatchNorm2d → dropout → flatten → Linear(512·7·7 → 512) → BatchNorm1d without affine.

Input, as both scripts feed it: the 224x224 aligned face crop (insightface ``norm_crop`` on the 5
landmarks), **RGB**, resized to 112x112 with OpenCV's bilinear ``resize``, scaled ``(x/255 − 0.5)/0.5``;
the output embedding is L2-normalised.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import torch
import torch.nn as nn

FILE_NAMES = ("glint360k_curricular_face_r101_backbone.bin", "glint360k_curricular_face_r101_backbone.safetensors")
INPUT_SIZE = 112


@dataclasses.dataclass(frozen=True)
class IRConfig:
    """Units per stage and stage widths (IR-101: 3/13/30/3 units of 64/128/256/512), embedding size."""

    units: tuple = (3, 13, 30, 3)
    widths: tuple = (64, 128, 256, 512)
    stem_width: int = 64
    embedding_dim: int = 512


class IRUnit(nn.Module):
    """``res_layer(x) + shortcut_layer(x)``; no activation after the sum."""

    def __init__(self, in_width: int, width: int, stride: int):
        super().__init__()
        if in_width == width:
            self.shortcut_layer = nn.MaxPool2d(1, stride)                          # subsample only
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_width, width, 1, stride, bias=False),
                                                nn.BatchNorm2d(width))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_width), nn.Conv2d(in_width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
            nn.PReLU(width), nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """TFace ``Backbone(input_size=[112, 112], mode='ir')``: 112x112 RGB in [-1, 1] -> raw embedding [N, D]."""

    def __init__(self, config: IRConfig = IRConfig()):
        super().__init__()
        self.config = config
        self.input_layer = nn.Sequential(nn.Conv2d(3, config.stem_width, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(config.stem_width), nn.PReLU(config.stem_width))
        units, in_width = [], config.stem_width
        for count, width in zip(config.units, config.widths):
            for k in range(count):
                units.append(IRUnit(in_width, width, 2 if k == 0 else 1))
                in_width = width
        self.body = nn.Sequential(*units)
        side = INPUT_SIZE // 2 ** len(config.units)                                  # 7 after 4 stride-2 stages
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(in_width), nn.Dropout(0.4), nn.Flatten(),
            nn.Linear(in_width * side * side, config.embedding_dim),
            nn.BatchNorm1d(config.embedding_dim, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                              # [N,3,112,112] -> [N,D]
        return self.output_layer(self.body(self.input_layer(x)))


def config_from_state_dict(sd: dict) -> IRConfig:
    """The :class:`IRConfig` of an IR state dict: units and widths from ``body.<i>.res_layer.1.weight`` (a new
    stage wherever the width changes, and at unit 0), the embedding size from the final Linear."""
    widths_per_unit = []
    for i in range(len(sd)):
        key = f"body.{i}.res_layer.1.weight"
        if key not in sd:
            break
        widths_per_unit.append((int(sd[key].shape[1]), int(sd[key].shape[0])))
    if not widths_per_unit or "input_layer.0.weight" not in sd or "output_layer.3.weight" not in sd:
        raise ValueError("not a TFace IR backbone state dict (expected input_layer.*, body.<i>.res_layer.*, "
                         "output_layer.*)")
    units, widths = [], []
    for k, (w_in, w_out) in enumerate(widths_per_unit):
        if k == 0 or w_in != w_out:
            units.append(0)
            widths.append(w_out)
        units[-1] += 1
    return IRConfig(units=tuple(units), widths=tuple(widths), stem_width=int(sd["input_layer.0.weight"].shape[0]),
                    embedding_dim=int(sd["output_layer.3.weight"].shape[0]))


def load_curricularface(path: str, device: torch.device | str = "cpu") -> IRBackbone:
    """The CurricularFace IR backbone from ``glint360k_curricular_face_r101_backbone.bin`` (read with
    ``weights_only=True``) or a .safetensors copy; strict load, eval mode, frozen."""
    from .cogvideox import WeightsFileError, read_safetensors, read_torch_pickle

    sd = read_safetensors(path)[0] if path.endswith((".safetensors", ".sft")) else read_torch_pickle(path)
    sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
    try:
        model = IRBackbone(config_from_state_dict(sd))
        model.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as e:
        raise WeightsFileError(f"{os.path.basename(path)}: not a CurricularFace IR backbone ({e}); expected "
                               f"{FILE_NAMES[0]} as ConsisID / OpenS2V ship it") from e
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def curricularface_embeddings(model: IRBackbone, crops: np.ndarray,
                               device: torch.device | str = "cpu") -> np.ndarray:
    """Unit embeddings ``[N, D]`` (float64) of aligned RGB uint8 crops ``[N, S, S, 3]`` (the scripts use the
    224 crop): each resized to 112x112 with ``cv2.resize`` (bilinear), scaled to [-1, 1]. ``device`` is where the
    model was loaded (the caller placed it; it is not read from the weights)."""
    import cv2

    crops = np.asarray(crops)
    if len(crops) == 0:
        return np.zeros((0, model.config.embedding_dim))
    small = np.stack([cv2.resize(np.ascontiguousarray(c), (INPUT_SIZE, INPUT_SIZE)) for c in crops])  # [N,112,112,3]
    x = torch.from_numpy(small).permute(0, 3, 1, 2).to(device, torch.float32)                  # [N,3,112,112]
    x = (x / 255.0 - 0.5) / 0.5
    emb = model(x.to(next(model.parameters()).dtype)).double().cpu().numpy()
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
