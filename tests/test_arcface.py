"""Pure-torch ArcFace (arcface_torch iresnet) + differentiable ArcFace alignment.

References are independent of our code paths: onnxruntime on a ``torch.onnx.export`` of the model
(and insightface's own ``ArcFaceONNX`` wrapper on it), insightface's ``face_align`` (skimage +
``cv2.warpAffine``). Everything is tiny, random and built at test time.
"""

from __future__ import annotations

import re
import warnings

import cv2
import numpy as np
import pytest
import torch

from magicmirror_video.models.arcface import (
    ARCFACE_DST,
    IRESNET_LAYERS,
    ArcFaceLoss,
    IResNet,
    align_faces,
    embed_faces,
    estimate_norm,
    identity_cosine,
    infer_iresnet_layers,
    iresnet,
    load_arcface_torch,
    warp_affine,
)

TINY_LAYERS = (1, 1, 1, 1)


def _randomise(model: IResNet, seed: int = 0) -> IResNet:
    """Non-trivial weights and BatchNorm running stats (as a trained checkpoint would have)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                if name != "features":  # arcface_torch keeps features.weight at 1
                    mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.normal_(0.0, 0.2, generator=g)
                mod.running_mean.normal_(0.0, 0.2, generator=g)
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                mod.num_batches_tracked.fill_(1234)
            elif isinstance(mod, torch.nn.PReLU):
                mod.weight.uniform_(0.05, 0.4, generator=g)
            elif isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, 1.0 / mod.in_features ** 0.5, generator=g)
                mod.bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(path to an arcface_torch-format backbone.pth of a [1,1,1,1] iresnet, the source model)."""
    torch.manual_seed(0)
    model = _randomise(IResNet(TINY_LAYERS))
    path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory):
    path, model = tiny_ckpt
    onnx_path = tmp_path_factory.mktemp("arcface_onnx") / "tiny_r.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(onnx_path), dynamo=False,
                          input_names=["input.1"], output_names=["embedding"], opset_version=17,
                          dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}})
    return onnx_path


def _smooth_image(rng, h, w, lo=0.0, hi=255.0):
    """Random low-frequency RGB image [h, w, 3] float32 (a stand-in for a natural photo)."""
    coarse = rng.uniform(lo, hi, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), lo, hi)


def _face_kps(rng, scale=1.4, shift=(50.0, 40.0), angle_deg=12.0, jitter=2.0):
    """5 plausible keypoints: the template scaled, rotated, shifted and jittered."""
    a = np.deg2rad(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (ARCFACE_DST - 56.0) @ R.T * scale + 56.0 * scale + np.asarray(shift)
    return (pts + rng.normal(0.0, jitter, (5, 2))).astype(np.float32)


def _insightface_estimate_norm(kps, size=112):
    from insightface.utils import face_align
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage's estimate() deprecation
        return face_align.estimate_norm(kps, image_size=size)


def _norm_crop(img, kps, size=112):
    from insightface.utils import face_align
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return face_align.norm_crop(img, kps, image_size=size)


# ------------------------------------------------------------------------------------------ model

def test_r100_layout_on_meta():
    with torch.device("meta"):
        model = iresnet(100)
    sd = model.state_dict()
    assert model.layers == (3, 13, 30, 3) and model.depth == 100
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.bn1.weight"] == (64,)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer2.0.bn1.running_var"] == (64,)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.running_mean"] == (128,)
    assert shapes["layer3.29.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["layer4.2.prelu.weight"] == (512,)
    assert shapes["bn2.weight"] == (512,)
    assert shapes["fc.weight"] == (512, 25088) and shapes["fc.bias"] == (512,)
    assert shapes["features.weight"] == (512,) and shapes["features.num_batches_tracked"] == ()
    assert not model.features.weight.requires_grad
    for stage, n in zip(range(1, 5), (3, 13, 30, 3)):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        assert idx == set(range(n))
        assert f"layer{stage}.0.downsample.1.weight" in sd and f"layer{stage}.1.downsample.0.weight" not in sd
    # stem 7 + 49 blocks x 18 + 4 downsamples x 6 + head (bn2 5, fc 2, features 5)
    assert len(sd) == 7 + 49 * 18 + 4 * 6 + 12 == 925
    assert infer_iresnet_layers(sd) == (3, 13, 30, 3)
    for depth, layers in IRESNET_LAYERS.items():
        with torch.device("meta"):
            assert iresnet(depth).depth == depth and infer_iresnet_layers(iresnet(depth).state_dict()) == layers


def test_tiny_fc_is_512x7x7():
    with torch.device("meta"):
        model = IResNet(TINY_LAYERS)
    assert tuple(model.fc.weight.shape) == (512, 512 * 7 * 7)


def test_load_infers_depth_and_matches_onnxruntime(tiny_ckpt, tiny_onnx):
    import onnxruntime as ort

    path, src = tiny_ckpt
    model = load_arcface_torch(str(path))
    assert model.layers == TINY_LAYERS and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert int(model.features.num_batches_tracked) == 1234

    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = model(x).numpy()
    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input.1": x.numpy()})[0]
    assert ours.shape == ref.shape == (3, 512)
    assert np.abs(ref).max() > 0.1  # non-degenerate output
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # gradients still reach the input of the frozen model
    xg = x.clone().requires_grad_(True)
    model(xg).square().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_embed_faces_matches_insightface_arcface_onnx(tiny_onnx, tiny_ckpt):
    """End to end vs insightface's own recogniser wrapper: norm_crop + (bgr->rgb − 127.5)/127.5."""
    from insightface.app.common import Face
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    rec = ArcFaceONNX(model_file=str(tiny_onnx))
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)
    model = load_arcface_torch(str(tiny_ckpt[0]))
    rng = np.random.default_rng(3)
    rgb = _smooth_image(rng, 220, 250)
    kps = _face_kps(rng)
    frames = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        ours = embed_faces(model, frames, torch.from_numpy(kps)[None])[0].numpy()
    # float32 BGR image: no uint8 rounding inside norm_crop
    ref = rec.get(np.ascontiguousarray(rgb[..., ::-1]), Face(kps=kps))
    np.testing.assert_allclose(ours, ref, atol=2e-3 * np.abs(ref).max())
    # uint8 image (insightface's usual input): crop rounding only
    rgb8 = rgb.round().astype(np.uint8)
    ref8 = rec.get(np.ascontiguousarray(rgb8[..., ::-1]), Face(kps=kps))
    with torch.no_grad():
        ours8 = embed_faces(model, torch.from_numpy(rgb8).permute(2, 0, 1)[None].float() / 127.5 - 1,
                            torch.from_numpy(kps)[None])[0].numpy()
    cos = float(ours8 @ ref8 / np.linalg.norm(ours8) / np.linalg.norm(ref8))
    assert cos > 0.999


def test_load_variants(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    path, src = tiny_ckpt
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want = src(x)
    # safetensors without num_batches_tracked buffers (some conversions drop them)
    st = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if "num_batches_tracked" not in k}, str(st))
    # arcface_torch training checkpoint with a DDP prefix
    ck = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "state_dict_backbone": {f"module.{k}": v for k, v in sd.items()}}, ck)
    for p in (st, ck):
        model = load_arcface_torch(str(p), layers=TINY_LAYERS)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want)
    with pytest.raises(ValueError, match=r"layers=\(3, 13, 30, 3\) requested"):
        load_arcface_torch(str(path), layers=100)


def test_non_iresnet_files_raise_clear_errors(tmp_path):
    lin = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), lin)
    with pytest.raises(ValueError, match="not an arcface_torch iresnet backbone"):
        load_arcface_torch(str(lin))
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(4, 2), pickled)  # a whole pickled module: refused by weights_only
    with pytest.raises(ValueError, match="weights_only=True"):
        load_arcface_torch(str(pickled))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_arcface_torch(str(junk))
    # right keys, wrong shapes (e.g. a different head): strict load error, reworded
    with torch.device("meta"):
        sd = IResNet(TINY_LAYERS).state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    sd["prelu.weight"] = torch.zeros(32)
    bad = tmp_path / "bad_shapes.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="not a loadable arcface_torch iresnet"):
        load_arcface_torch(str(bad))
    with pytest.raises(FileNotFoundError):
        load_arcface_torch(str(tmp_path / "missing.pth"))


# -------------------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("size", [112, 224, 128])
def test_estimate_norm_matches_insightface(size):
    rng = np.random.default_rng(size)
    batch = []
    for angle in (-25.0, 0.0, 17.0):
        kps = _face_kps(rng, scale=rng.uniform(0.6, 3.0), shift=rng.uniform(0, 300, 2), angle_deg=angle,
                        jitter=4.0)
        ours, ref = estimate_norm(kps, size), _insightface_estimate_norm(kps, size)
        assert ours.shape == (2, 3)
        # float32 keypoints (insightface's usual input): skimage then works in float32, so the
        # translation column of the reference carries ~1e-5 rounding
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        k64 = kps.astype(np.float64)
        np.testing.assert_allclose(estimate_norm(k64, size), _insightface_estimate_norm(k64, size), atol=1e-5)
        batch.append((kps, ref))
    kb = torch.from_numpy(np.stack([k for k, _ in batch]))
    Mb = estimate_norm(kb, size)
    assert torch.is_tensor(Mb) and Mb.shape == (3, 2, 3)
    np.testing.assert_allclose(Mb.numpy(), np.stack([r for _, r in batch]), atol=1e-4)


def test_align_faces_matches_norm_crop():
    rng = np.random.default_rng(7)
    H, W = 200, 240
    imgs = [_smooth_image(rng, H, W), _smooth_image(rng, H, W)]
    kps = [_face_kps(rng, scale=1.3, shift=(40, 20), angle_deg=-15),
           _face_kps(rng, scale=0.9, shift=(90, 60), angle_deg=20)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    out = align_faces(x, torch.from_numpy(np.stack(kps))).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 112, 112, 3)
    for i in range(2):
        ref_f = _norm_crop(imgs[i], kps[i])  # float32 image: OpenCV's float path
        assert np.abs(out[i] - ref_f).mean() < 1e-3 and np.abs(out[i] - ref_f).max() < 0.05
        img8 = imgs[i].round().astype(np.uint8)
        ref8 = _norm_crop(img8, kps[i]).astype(np.float32)  # uint8: result rounded to integers
        ours8 = align_faces(torch.from_numpy(img8).permute(2, 0, 1)[None].float(), kps[i][None])[0]
        diff8 = np.abs(ours8.permute(1, 2, 0).numpy() - ref8)
        assert diff8.mean() < 0.5 and diff8.max() <= 0.51  # < 1/255 of the range

    # white noise (worst case for coordinate precision) and a crop mostly outside the image:
    # grid_sample's zero padding reads 0 per out-of-image tap, exactly like BORDER_CONSTANT 0
    noise = rng.uniform(0, 255, (H, W, 3)).astype(np.float32)
    off = _face_kps(rng, scale=1.5, shift=(-90, -70), angle_deg=5)
    for img, k in ((noise, kps[0]), (imgs[0], off)):
        ref = _norm_crop(img, k)
        ours = align_faces(torch.from_numpy(img).permute(2, 0, 1)[None], k[None])[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - ref).mean() < 0.01 and np.abs(ours - ref).max() < 0.1
    assert (ref == 0).mean() > 0.2  # the off-image case really exercises the border

    # pad_value: norm_crop's black border on a [-1, 1] image is -1
    m11 = torch.from_numpy(imgs[0]).permute(2, 0, 1)[None] / 127.5 - 1
    ours = align_faces(m11, off[None], pad_value=-1.0)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, _norm_crop(imgs[0], off) / 127.5 - 1, atol=1e-3)


def test_warp_affine_identity_and_gradcheck():
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    eye = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(warp_affine(x, eye, (9, 11)), x)
    # integer shift: out(x, y) = in(x + 2, y + 1), like cv2 with M translating by (-2, -1)
    shift = np.array([[1.0, 0, -2], [0, 1.0, -1]])
    torch.testing.assert_close(warp_affine(x, shift, (7, 9)), x[:, :, 1:8, 2:11])
    M = torch.tensor([[0.8, 0.3, 1.5], [-0.25, 0.9, 0.7]], dtype=torch.float64)
    xg = torch.rand(1, 2, 8, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: warp_affine(t, M, 6, pad_value=-1.0), (xg,))


# ------------------------------------------------------------------------------- identity / loss

def test_identity_cosine_gradients_and_self_similarity(tiny_ckpt):
    model = load_arcface_torch(str(tiny_ckpt[0]))
    rng = np.random.default_rng(11)
    imgs = np.stack([_smooth_image(rng, 160, 180, -1.0, 1.0) for _ in range(2)])
    kps = torch.from_numpy(np.stack([_face_kps(rng, 1.1, (20, 10), 8), _face_kps(rng, 1.2, (15, 5), -8)]))
    frames = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()

    loss_fn = ArcFaceLoss(model, weight=0.5)
    ref = loss_fn.embed(frames, kps)
    assert ref.shape == (2, 512) and not ref.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(identity_cosine(model, ref, frames, kps), torch.ones(2), atol=1e-5, rtol=0)

    other = torch.from_numpy(np.stack([_smooth_image(rng, 160, 180, -1.0, 1.0) for _ in range(2)]))
    x = other.permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    cos = identity_cosine(model, ref, x, kps)
    assert cos.shape == (2,) and (cos < 0.9999).all()
    loss = loss_fn(x, kps, ref)
    torch.testing.assert_close(loss, 0.5 * (1 - cos).mean())
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # gradient only where the crop samples: far corners of the frame get none
    assert x.grad[:, :, -3:, -3:].abs().sum() == 0

    # a parent's train() never puts the frozen backbone's BatchNorms into training mode
    torch.nn.ModuleDict({"id": loss_fn}).train()
    assert loss_fn.training and not model.training
