"""Pure-torch ArcFace recogniser (arcface_torch ``iresnet``) + differentiable ArcFace alignment.

MagicMirror's identity loss ``λ·(1 − cos(ArcFace(ref), ArcFace(D(x̂0))))`` needs gradients through
the recogniser *and* through the face crop, w.r.t. the decoded frames. insightface's ONNX recogniser
and its ``cv2.warpAffine`` crop give neither, so this module re-implements both in torch:

- :class:`IResNet` — the arcface_torch ``iresnet`` backbone (our own code). Its ``state_dict`` key
  names and shapes match the released ``backbone.pth`` files (e.g. ``ms1mv3_arcface_r100_fp16``,
  ``glint360k_cosface_r100_fp16_0.1``), so :func:`load_arcface_torch` loads them strictly. Layout:

  * stem: ``conv1`` (3x3, 3→64, stride 1, pad 1, no bias) → ``bn1`` → ``prelu`` (64 slopes);
  * ``layer1..layer4`` of widths 64/128/256/512, each stage starting with stride 2 (112→56→28→14→7);
    every block is ``IBasicBlock``: ``bn1 → conv1 (3x3) → bn2 → prelu → conv2 (3x3, stride) → bn3``,
    plus the identity or ``downsample = Sequential(conv1x1(stride), BatchNorm2d)`` (present on the
    first block of every stage, because of the stride), summed with *no* activation after the add;
  * head: ``bn2`` (BatchNorm2d 512) → flatten → dropout → ``fc`` (512·7·7 → 512, with bias) →
    ``features`` (BatchNorm1d 512, affine weight fixed at 1 and not trainable).

  All BatchNorms use eps 1e-5 (arcface_torch's value; the mxnet models used 2e-5).
  Depths: r18 ``[2,2,2,2]``, r34 ``[3,4,6,3]``, r50 ``[3,4,14,3]``, r100 ``[3,13,30,3]``,
  r200 ``[6,26,60,6]``. Input: 112x112 **RGB** scaled as ``(x/255 − 0.5)/0.5``, i.e. in [-1, 1]
  (insightface's ``glintr100.onnx``/``w600k_r50.onnx`` are exports of these models and use the same
  ``(rgb − 127.5)/127.5``). Output: the raw (not L2-normalised) 512-d embedding.

- :func:`estimate_norm` / :func:`align_faces` / :func:`warp_affine` — insightface's ``norm_crop``
  (5-point least-squares similarity to the ArcFace template, then ``cv2.warpAffine``) re-done with
  ``affine_grid`` + ``grid_sample`` so that it is differentiable w.r.t. the image.

  Pixel convention: OpenCV's ``warpAffine`` maps destination pixel ``(x, y)`` (integers = pixel
  *centres*) to source coordinates ``M⁻¹·(x, y, 1)``, where integer source coordinates are again
  pixel centres, and samples bilinearly with out-of-image taps reading ``borderValue`` (0).
  ``grid_sample(align_corners=False)`` puts pixel ``i``'s centre at normalised ``(2i + 1)/W − 1`` and
  ``affine_grid(align_corners=False)`` generates exactly those centres for the output, so we build
  ``theta = N_src · M⁻¹ · N_out⁻¹`` with those centre-based normalisations and sample with
  ``padding_mode="zeros"``, which zero-fills out-of-image taps per tap, like ``BORDER_CONSTANT``.
  The two then agree up to OpenCV's fixed-point arithmetic (source coordinates quantised to 1/32
  pixel, and for uint8 images 15-bit weights and rounding of the result); see the tests.
  ``pad_value`` shifts the fill colour (the identity loss uses −1, i.e. black in [-1, 1], which is
  what ``norm_crop``'s ``borderValue=0`` gives on a uint8 image).

- :func:`identity_cosine` / :class:`ArcFaceLoss` — align + embed frames in [-1, 1] and return the
  cosine to reference embeddings, differentiable w.r.t. the frames (the backbone is frozen: its
  parameters have ``requires_grad=False`` but gradients flow through it to the input).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5
INPUT_SIZE = 112
STAGE_WIDTHS = (64, 128, 256, 512)
FC_SCALE = 7 * 7  # spatial size after 4 stride-2 stages on a 112x112 input
IRESNET_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}

# insightface's ArcFace destination landmarks for a 112x112 crop (``face_align.arcface_dst``):
# left eye, right eye, nose tip, left mouth corner, right mouth corner (x, y) in pixels.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------

def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of arcface_torch's iresnet (no ReLU after the add)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """arcface_torch ``iresnet`` backbone; ``layers`` = blocks per stage (see ``IRESNET_LAYERS``).

    ``forward(x)``: ``x`` [B, 3, 112, 112] RGB in [-1, 1] → raw embedding [B, num_features].
    """

    def __init__(self, layers: Sequence[int] = IRESNET_LAYERS[100], num_features: int = 512,
                 dropout: float = 0.0):
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of >= 1 block each, got layers={layers}")
        self.layers = layers
        self.num_features = int(num_features)
        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        cin = STAGE_WIDTHS[0]
        for i, (width, n) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            blocks = [IBasicBlock(cin, width, stride=2)] + [IBasicBlock(width, width) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * FC_SCALE, self.num_features)
        self.features = nn.BatchNorm1d(self.num_features, eps=BN_EPS)
        self._init_weights()

    @property
    def depth(self) -> int:
        """arcface_torch's depth name (18/34/50/100/200); 2·blocks + 2 for non-standard layers."""
        for depth, layers in IRESNET_LAYERS.items():
            if layers == self.layers:
                return depth
        return 2 * sum(self.layers) + 2

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.device.type != "meta":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # arcface_torch keeps the embedding BatchNorm's scale at 1 and does not train it
        with torch.no_grad():
            if self.features.weight.device.type != "meta":
                self.features.weight.fill_(1.0)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"IResNet expects [B, 3, {INPUT_SIZE}, {INPUT_SIZE}] input, got {tuple(x.shape)}")
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int, **kwargs) -> IResNet:
    """``IResNet`` of a named depth (18, 34, 50, 100, 200)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"unknown iresnet depth {depth}; known: {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[depth], **kwargs)


# --------------------------------------------------------------------------------------------
# Loading arcface_torch checkpoints
# --------------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_REQUIRED_KEYS = ("conv1.weight", "bn1.weight", "prelu.weight", "bn2.weight", "fc.weight", "fc.bias",
                  "features.running_mean", "layer1.0.conv1.weight", "layer4.0.bn3.weight")
_WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone", "module")


def _unwrap_state_dict(obj, path: str) -> dict:
    """The tensor dict of a checkpoint (plain state_dict, or arcface_torch's training checkpoint)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
    if not any(torch.is_tensor(v) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap_state_dict(obj[key], path)
        raise ValueError(f"{path}: holds no tensors (top-level keys: {list(obj)[:10]})")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    # DataParallel / DDP prefixes
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_iresnet_layers(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Blocks per stage of an arcface_torch iresnet ``state_dict``; ValueError if it is not one."""
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        sample = list(state_dict)[:8]
        raise ValueError("not an arcface_torch iresnet backbone state_dict: missing "
                         f"{missing} (first keys: {sample}). Expected a file like "
                         "ms1mv3_arcface_r100_fp16/backbone.pth (keys conv1.weight, bn1.*, prelu.weight, "
                         "layer1.0.conv1.weight, ..., fc.weight, features.*)")
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    layers = []
    for stage in range(1, 5):
        idx = blocks[stage]
        if not idx or idx != set(range(len(idx))):
            raise ValueError(f"not an arcface_torch iresnet backbone: layer{stage} block indices {sorted(idx)} "
                             "are not 0..n-1")
        layers.append(len(idx))
    fc = state_dict["fc.weight"]
    if fc.dim() != 2 or fc.shape[1] != STAGE_WIDTHS[-1] * FC_SCALE:
        raise ValueError(f"fc.weight has shape {tuple(fc.shape)}; an arcface_torch iresnet for 112x112 input "
                         f"has [num_features, {STAGE_WIDTHS[-1] * FC_SCALE}]")
    return tuple(layers)


def _read_checkpoint(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ArcFace backbone not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled nn.Module, corrupt file, not a torch file, ...
        raise ValueError(f"{path}: cannot be read as a torch state_dict with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                         "Expected arcface_torch's backbone.pth (a plain state_dict).") from exc
    return obj


def load_arcface_torch(path: str, layers: int | Sequence[int] | None = None, device=None,
                       dtype: torch.dtype | None = None) -> IResNet:
    """Load an arcface_torch iresnet ``backbone.pth`` (or ``.safetensors``) as a frozen eval ``IResNet``.

    ``layers``: None → inferred from the keys; an int depth (e.g. 100) or 4 block counts → checked
    against the file. Strict load (missing ``num_batches_tracked`` buffers, absent from some
    conversions, are filled with 0). The returned model has ``requires_grad=False`` parameters and is
    in eval mode; gradients still flow to its input.
    """
    sd = _read_checkpoint(str(path))
    sd = _unwrap_state_dict(sd, str(path))
    try:
        found = infer_iresnet_layers(sd)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if layers is not None:
        want = IRESNET_LAYERS[layers] if isinstance(layers, int) and layers in IRESNET_LAYERS else layers
        if isinstance(want, int):
            raise ValueError(f"unknown iresnet depth {layers}; known: {sorted(IRESNET_LAYERS)}")
        if tuple(want) != found:
            raise ValueError(f"{path}: layers={tuple(want)} requested but the file is an iresnet with {found}")
    model = IResNet(found, num_features=int(sd["fc.weight"].shape[0]))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            sd.setdefault(f"{name}.num_batches_tracked", torch.zeros((), dtype=torch.long))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a loadable arcface_torch iresnet{found} backbone: {exc}") from None
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# --------------------------------------------------------------------------------------------
# Differentiable alignment
# --------------------------------------------------------------------------------------------

def arcface_template(size: int = INPUT_SIZE) -> np.ndarray:
    """ArcFace destination landmarks [5, 2] for a ``size`` crop, as insightface scales them.

    Multiples of 112 scale the 112 template; otherwise multiples of 128 use the 112 template
    scaled by size/128 and shifted right by 8·size/128 (insightface's 128 mode); any other size
    scales by size/112.
    """
    size = int(size)
    if size % 112 != 0 and size % 128 == 0:
        ratio = size / 128.0
        dst = ARCFACE_DST.astype(np.float64) * ratio
        dst[:, 0] += 8.0 * ratio
        return dst
    return ARCFACE_DST.astype(np.float64) * (size / 112.0)


def _similarity_lstsq(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation + uniform scale + translation, no reflection) src → dst.

    ``src`` [B, N, 2], ``dst`` [N, 2] or [B, N, 2] → [B, 2, 3]. Written with complex numbers:
    ``z ↦ a·z + b`` minimising ``Σ|a·s_i + b − d_i|²`` has ``a = Σ conj(s̃_i)·d̃_i / Σ|s̃_i|²`` on
    centred points and ``b = mean(d) − a·mean(s)``; this is the same optimum Umeyama's SVD
    solution (with scale, det(R)=+1) finds, which is what skimage's ``SimilarityTransform`` uses.
    """
    s = torch.complex(src[..., 0], src[..., 1])
    d = torch.complex(dst[..., 0], dst[..., 1]).expand_as(s)
    sm, dm = s.mean(-1, keepdim=True), d.mean(-1, keepdim=True)
    sc, dc = s - sm, d - dm
    a = (sc.conj() * dc).sum(-1) / (sc.abs() ** 2).sum(-1).clamp_min(1e-12)
    b = dm.squeeze(-1) - a * sm.squeeze(-1)
    row0 = torch.stack([a.real, -a.imag, b.real], -1)
    row1 = torch.stack([a.imag, a.real, b.imag], -1)
    return torch.stack([row0, row1], -2)


def estimate_norm(kps, size: int = INPUT_SIZE):
    """2x3 similarity matrix mapping 5 face keypoints (pixels) onto the ArcFace template.

    Same role and result as insightface's ``face_align.estimate_norm`` (the ``M`` that
    ``cv2.warpAffine(img, M, (size, size))`` uses). ``kps``: [5, 2] or [B, 5, 2], numpy/list or
    torch. numpy in → float64 numpy out; torch in → float64 tensor on the same device (no grad).
    """
    is_torch = torch.is_tensor(kps)
    # tiny problem: solved on the CPU in float64 (complex ops are not available on every backend)
    k = kps.detach().cpu().to(torch.float64) if is_torch else torch.as_tensor(np.asarray(kps, dtype=np.float64))
    if k.shape[-2:] != (5, 2) or k.dim() not in (2, 3):
        raise ValueError(f"kps must be [5, 2] or [B, 5, 2], got {tuple(k.shape)}")
    dst = torch.as_tensor(arcface_template(size), dtype=torch.float64)
    M = _similarity_lstsq(k.reshape(-1, 5, 2), dst).reshape(*k.shape[:-2], 2, 3)
    return M.to(kps.device) if is_torch else M.numpy()


def _affine3(M: torch.Tensor) -> torch.Tensor:
    """[..., 2, 3] → [..., 3, 3] homogeneous."""
    bottom = torch.zeros(*M.shape[:-2], 1, 3, dtype=M.dtype, device=M.device)
    bottom[..., 0, 2] = 1.0
    return torch.cat([M, bottom], -2)


def warp_affine(images: torch.Tensor, M, size: int | tuple[int, int], pad_value: float = 0.0,
                mode: str = "bilinear") -> torch.Tensor:
    """Differentiable ``cv2.warpAffine(img, M, (w, h), borderValue=pad_value)`` for a batch.

    ``images`` [B, C, H, W] float (any range); ``M`` [B, 2, 3] or [2, 3] (numpy or torch) maps
    *source* pixel coordinates to *output* pixel coordinates, OpenCV convention (integer
    coordinates are pixel centres). ``size``: int or (h, w). Returns [B, C, h, w].
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    B, C, H, W = images.shape
    oh, ow = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    Mt = M.detach() if torch.is_tensor(M) else torch.as_tensor(np.asarray(M))
    Mt = Mt.to(device=images.device, dtype=torch.float64)
    if Mt.dim() == 2:
        Mt = Mt.unsqueeze(0)
    Mt = Mt.expand(B, 2, 3)
    # output normalised (align_corners=False) -> output pixel: x = (W_o/2)·u + (W_o − 1)/2
    out_from_norm = torch.tensor([[ow / 2.0, 0.0, (ow - 1) / 2.0],
                                  [0.0, oh / 2.0, (oh - 1) / 2.0],
                                  [0.0, 0.0, 1.0]], dtype=torch.float64, device=images.device)
    # source pixel -> source normalised: u = (2x + 1)/W − 1
    norm_from_src = torch.tensor([[2.0 / W, 0.0, 1.0 / W - 1.0],
                                  [0.0, 2.0 / H, 1.0 / H - 1.0],
                                  [0.0, 0.0, 1.0]], dtype=torch.float64, device=images.device)
    src_from_out = torch.linalg.inv(_affine3(Mt))
    theta = (norm_from_src @ src_from_out @ out_from_norm)[:, :2, :]
    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    x = images.to(work_dtype)
    grid = F.affine_grid(theta.to(work_dtype), [B, C, oh, ow], align_corners=False)
    if pad_value:
        x = x - pad_value
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if pad_value:
        out = out + pad_value
    return out.to(images.dtype)


def align_faces(images: torch.Tensor, kps, size: int = INPUT_SIZE, pad_value: float = 0.0) -> torch.Tensor:
    """ArcFace-aligned crops [B, C, size, size] of ``images`` [B, C, H, W] (differentiable).

    ``kps`` [B, 5, 2] (or [5, 2] for every image) are pixel coordinates in ``images`` (insightface
    ``face.kps`` order). Equivalent to insightface ``face_align.norm_crop`` (with ``borderValue``
    = ``pad_value``), see the module docstring for the pixel convention.
    """
    M = estimate_norm(kps if torch.is_tensor(kps) else np.asarray(kps, dtype=np.float64), size)
    if not torch.is_tensor(M):
        M = torch.from_numpy(M)
    return warp_affine(images, M, size, pad_value=pad_value)


# --------------------------------------------------------------------------------------------
# Identity similarity / loss
# --------------------------------------------------------------------------------------------

def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def embed_faces(model: nn.Module, frames: torch.Tensor, kps) -> torch.Tensor:
    """Raw ArcFace embeddings [B, F] of RGB ``frames`` [B, 3, H, W] in [-1, 1] at keypoints ``kps``.

    ``frames`` in [-1, 1] already equal the backbone's ``(x/255 − 0.5)/0.5`` input scaling; the
    crop is padded with −1 (black, like ``norm_crop``'s ``borderValue=0``).
    """
    aligned = align_faces(frames, kps, INPUT_SIZE, pad_value=-1.0)
    return model(aligned.to(_model_dtype(model)))


def embed_aligned(model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Raw ArcFace embeddings [N, F] of already aligned RGB crops [N, 3, 112, 112] in [-1, 1] (e.g. the
    reference crops ``norm_crop`` made): the same network and input scaling as :func:`embed_faces`."""
    return model(crops.to(_model_dtype(model)))


def identity_cosine(model: nn.Module, ref_embed: torch.Tensor, frames: torch.Tensor, kps) -> torch.Tensor:
    """Cosine similarity [B] between ``ref_embed`` [B, F] (or [F]) and the ArcFace embeddings of
    ``frames`` [B, 3, H, W] (RGB in [-1, 1]) aligned at ``kps`` [B, 5, 2]; differentiable w.r.t.
    ``frames``."""
    emb = embed_faces(model, frames, kps).float()
    ref = ref_embed.to(device=emb.device, dtype=torch.float32)
    return F.cosine_similarity(emb, ref.expand_as(emb), dim=-1, eps=1e-8)


class ArcFaceLoss(nn.Module):
    """``weight · (1 − cos(ArcFace(ref), ArcFace(align(frames))))``, reduced with ``reduction``.

    Holds the frozen backbone; ``train()`` on a parent never switches its BatchNorms to training
    mode. ``forward(frames, kps, ref_embed)``; ``embed(frames, kps)`` gives reference embeddings.
    """

    def __init__(self, model: IResNet, weight: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean/sum/none, got {reduction!r}")
        self.model = model.eval().requires_grad_(False)
        self.weight = float(weight)
        self.reduction = reduction

    @classmethod
    def from_file(cls, path: str, weight: float = 1.0, reduction: str = "mean", device=None,
                  dtype: torch.dtype | None = None) -> "ArcFaceLoss":
        return cls(load_arcface_torch(path, device=device, dtype=dtype), weight=weight, reduction=reduction)

    def train(self, mode: bool = True) -> "ArcFaceLoss":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def embed(self, frames: torch.Tensor, kps) -> torch.Tensor:
        return embed_faces(self.model, frames, kps)

    def forward(self, frames: torch.Tensor, kps, ref_embed: torch.Tensor) -> torch.Tensor:
        loss = self.weight * (1.0 - identity_cosine(self.model, ref_embed, frames, kps))
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
