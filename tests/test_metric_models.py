"""Optional metric models: the CurricularFace IR layout of the released file, CLIP-T (ConsisID's CLIPScore and the
magicmirror definition) and DINO-I against transformers' own forward, model search with every searched path, FID."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from magicmirror_video.models import curricularface, metric_models, metrics
from magicmirror_video.testing import tiny_metrics


def test_ir101_has_the_released_curricularface_layout():
    """TFace IR_101 (TFace num_layers=100): stem, 3 + 13 + 30 + 3 units of widths 64/128/256/512, each stage opening
    with a stride-2 unit, a 1x1 conv shortcut where the width changes, a 512*7*7 -> 512 head."""
    with torch.device("meta"):
        sd = curricularface.IRBackbone().state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"input_layer.0.weight": (64, 3, 3, 3), "input_layer.2.weight": (64,)}
    expected.update({f"input_layer.1.{k}": (64,) if k != "num_batches_tracked" else () for k in bn})
    unit, in_width = 0, 64
    for count, width in zip((3, 13, 30, 3), (64, 128, 256, 512)):
        for k in range(count):
            p = f"body.{unit}."
            expected[p + "res_layer.1.weight"] = (width, in_width, 3, 3)
            expected[p + "res_layer.3.weight"] = (width,)                              # PReLU
            expected[p + "res_layer.4.weight"] = (width, width, 3, 3)
            for i, w in ((0, in_width), (2, width), (5, width)):
                expected.update({f"{p}res_layer.{i}.{b}": (w,) if b != "num_batches_tracked" else () for b in bn})
            if in_width != width:
                expected[p + "shortcut_layer.0.weight"] = (width, in_width, 1, 1)
                expected.update({f"{p}shortcut_layer.1.{b}": (width,) if b != "num_batches_tracked" else ()
                                 for b in bn})
            unit, in_width = unit + 1, width
    expected.update({f"output_layer.0.{b}": (512,) if b != "num_batches_tracked" else () for b in bn})
    expected.update({"output_layer.3.weight": (512, 512 * 7 * 7), "output_layer.3.bias": (512,),
                     "output_layer.4.running_mean": (512,), "output_layer.4.running_var": (512,),
                     "output_layer.4.num_batches_tracked": ()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert unit == 49 and curricularface.config_from_state_dict(sd) == curricularface.IRConfig()


def test_curricularface_file_loads_strictly_and_embeds_the_224_crop(tmp_path):
    import cv2

    path = tiny_metrics.build_curricularface_file(str(tmp_path / curricularface.FILE_NAMES[0]))
    model = curricularface.load_curricularface(path)
    assert model.config == curricularface.IRConfig(units=(1, 2, 1, 1), widths=(8, 16, 24, 32), stem_width=8,
                                                   embedding_dim=64)
    crops = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    # the scripts' ``inference``: cv2.resize to 112, /255, -0.5, /0.5, the network (eval), L2 norm
    reference = curricularface.IRBackbone(model.config)
    reference.load_state_dict(torch.load(path, weights_only=True))
    x = torch.from_numpy(np.stack([cv2.resize(c, (112, 112)) for c in crops])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = reference.eval()((x / 255 - 0.5) / 0.5).double().numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(curricularface.curricularface_embeddings(model, crops), expected, atol=1e-6)
    torch.save({"fnet.conv1.weight": torch.zeros(1)}, tmp_path / "wrong.bin")
    with pytest.raises(ValueError, match="not a CurricularFace IR backbone"):
        curricularface.load_curricularface(str(tmp_path / "wrong.bin"))


def test_find_metric_model_lists_every_searched_path(tmp_path):
    (tmp_path / "a").mkdir()
    path, searched = metric_models.find_metric_model("curricularface", [tmp_path / "a", tmp_path / "b"])
    assert path is None and searched == [str(tmp_path / d / n) for d in ("a", "b") for n in curricularface.FILE_NAMES]
    reason = metric_models.missing_reason("curricularface", searched)
    assert reason == f"no {' or '.join(curricularface.FILE_NAMES)} in {tmp_path / 'a'}, {tmp_path / 'b'}"
    tiny_metrics.build_curricularface_file(str(tmp_path / "b" / curricularface.FILE_NAMES[0]))
    assert metric_models.find_metric_model("curricularface", [tmp_path / "a", tmp_path / "b"])[0] == \
        str(tmp_path / "b" / curricularface.FILE_NAMES[0])
    tiny_metrics.build_clip_folder(str(tmp_path / "b" / "clip-vit-tiny"))
    tiny_metrics.build_dino_folder(str(tmp_path / "b" / "dino-tiny"))
    assert metric_models.find_metric_model("clip_text", [tmp_path / "a", tmp_path / "b"])[0] == \
        str(tmp_path / "b" / "clip-vit-tiny")
    assert metric_models.find_metric_model("dino", [tmp_path / "b"])[0] == str(tmp_path / "b" / "dino-tiny")


@pytest.fixture(scope="module")
def text_clip(tmp_path_factory):
    return metric_models.load_text_clip(tiny_metrics.build_clip_folder(str(tmp_path_factory.mktemp("m") / "clip")))


def _clip_logits(text_clip, images, prompt):
    """transformers' CLIPModel forward on the folder's own tokenizer and image processor: logits_per_image [N]."""
    inputs = text_clip.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
    pixels = text_clip.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return text_clip.model(**inputs, pixel_values=pixels).logits_per_image[:, 0].double().numpy()


def test_clip_t_consisid_is_its_clipscore_and_magicmirror_is_100_cos(text_clip):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (21, 40, 48, 3), dtype=np.uint8)
    frames[..., 0] //= 3  # make the BGR/RGB order matter
    prompt = "a woman smiles at the camera"
    # ConsisID get_clipscore.py: 16 frames int(i * T / 16), the cv2 (BGR) arrays, logits_per_image averaged
    chosen = [int(i * 21 / 16) for i in range(16)]
    expected = _clip_logits(text_clip, frames[chosen][..., ::-1], prompt)
    out = metrics.evaluate_video(frames, protocol="consisid", text_clip=text_clip, prompt=prompt, dynamics=False)
    assert out.curves["clip_t_frames"] == chosen and out.counts["clip_t"] == 16
    np.testing.assert_allclose(out.curves["clip_t"], expected, rtol=1e-5)
    assert out.clip_t == pytest.approx(expected.mean(), rel=1e-5)
    # magicmirror: every frame, RGB, 100 * cosine
    scale = float(text_clip.model.logit_scale.exp())
    expected = _clip_logits(text_clip, frames, prompt) / scale * 100
    out = metrics.evaluate_video(frames, text_clip=text_clip, prompt=prompt, dynamics=False)
    np.testing.assert_allclose(out.curves["clip_t"], expected, rtol=1e-5)
    assert out.counts["clip_t"] == 21
    assert metrics.evaluate_video(frames, text_clip=text_clip, dynamics=False).unavailable["clip_t"] == \
        "no prompt for this video"


def test_dino_i_is_the_cls_cosine(tmp_path):
    dino = metric_models.load_dino(tiny_metrics.build_dino_folder(str(tmp_path / "dino-tiny")))
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (1, 36, 36, 3), dtype=np.uint8)

    def cls(images):
        pixels = dino.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return dino.model(pixel_values=pixels).last_hidden_state[:, 0].double()

    expected = torch.nn.functional.cosine_similarity(cls(frames), cls(ref)).numpy()
    out = metrics.evaluate_video(frames, dino=dino, dino_references=ref, dynamics=False)
    np.testing.assert_allclose(out.curves["dino_i"], expected, atol=1e-6)
    assert out.counts["dino_i"] == 5


def test_consisid_fid_is_the_squared_inception_feature_distance(tmp_path):
    """ConsisID's FID of one crop against one crop: the covariances of two identical rows vanish, leaving
    ||mu_ref - mu_frame||^2 of the Inception-v3 pool features of the 224 crops resized (PIL bilinear) to 299."""
    pytest.importorskip("torchvision")
    from PIL import Image
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True).eval()
    torch.save(net.state_dict(), tmp_path / metric_models.INCEPTION_FILES[0])
    model = metric_models.load_inception(str(tmp_path / metric_models.INCEPTION_FILES[0]))
    net.fc = torch.nn.Identity()
    crops = np.random.default_rng(3).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(c).resize((299, 299), Image.BILINEAR)))
                     for c in crops]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        feats = net(x).double().numpy()
    np.testing.assert_allclose(metric_models.inception_features(model, crops), feats, rtol=1e-4, atol=1e-5)
    assert os.path.basename(metric_models.find_metric_model("inception", [tmp_path])[0]) == \
        metric_models.INCEPTION_FILES[0]
