"""Train MagicMirror adapters: ``python -m training.train_magicmirror``.

Two stages (paper §3.3): ``--stage image`` on image pairs (reference face -> target image), then
``--stage video --init_from <stage-1 adapter>`` on videos. Only the adapters train (face Q-Former,
ID fusion, CAN, per-block face modulation and cross-attention K/V); CogVideoX, the VAE, T5, CLIP,
PhotoMaker-V2's perceiver and ArcFace stay frozen.

Loss per sample: CogVideoX's v-prediction loss in x0 space weighted by 1/(1 − ᾱ_t) — on a random
``face_region_prob`` share of the samples restricted to the face box — plus
``id_loss_weight · (1 − cos(ArcFace(reference), ArcFace(D(x̂0))))`` through a differentiable
ArcFace (the first frame of x̂0 is decoded and aligned with the target's face keypoints).

Data: ``metadata.jsonl`` rows written by ``python -m training.prepare_magicmirror``::

    {"media": "targets/0001.mp4", "caption": "a man img is ...", "faces": "faces/0001.safetensors",
     "face_box": [x1, y1, x2, y2], "face_kps": [[x, y] x 5], "size": [width, height]}

``faces`` holds the frozen face-encoder outputs of the reference photo(s): ``arcface`` [N, 512],
``x_id`` [N, 2, 2048], ``clip_penultimate`` [N, 257, 1024]; box and keypoints are in the target's
pixel coordinates (first frame).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.cogvideox import base_model_of, read_safetensors
from ..models.magicmirror import (
    MagicMirrorAdapter,
    MagicMirrorConfig,
    inject_magicmirror,
    load_magicmirror,
    save_magicmirror,
)
from ..models.text import identity_token_mask, split_trigger
from .config import InputError, TrainConfig, doc
from .losses import box_to_latent_mask, identity_loss, v_prediction_loss
from .trainer import VALIDATION_FPS, Trainer, TrainingDataset, TrainingModule, cli_main


@dataclass
class MagicMirrorTrainConfig(TrainConfig):
    num_frames: int = doc(1, "Frames per sample (4k+1): 1 for stage=image, e.g. 49 for stage=video.")
    batch_size: int = doc(1, "Samples per device per micro-step.")
    stage: str = doc("image", "image: stage 1 on single frames (num_frames 1); video: stage 2 on clips of "
                              "num_frames > 1.", choices=("image", "video"))
    init_from: str = doc("", "Adapter .safetensors to start from (stage 2 starts from the stage-1 export).")
    trigger_word: str = doc("img", "Trigger word after the class word in captions ('a man img ...').")
    id_loss_weight: float = doc(0.1, "λ of the identity loss (0 = off; the paper does not give its value).")
    face_region_prob: float = doc(0.5, "Share of samples whose diffusion loss only counts inside the face box.")
    arcface_path: str = doc("", "insightface arcface_torch backbone (.pth, e.g. ms1mv3_arcface_r100) for the "
                                "identity loss; required when id_loss_weight > 0.")
    validation_faces: str = doc("", "A faces .safetensors (from prepare_magicmirror) for validation videos.")
    validation_insightface: str = doc("", "insightface root (holding models/<pack>/) to score validation videos: "
                                          "identity similarity of each frame's face to validation_faces (logged).")
    validation_insightface_pack: str = doc("antelopev2", "insightface pack name for validation scoring (the pack "
                                                         "prepare_magicmirror used: the references are the "
                                                         "validation_faces' ArcFace embeddings, so frames must be "
                                                         "embedded by the same recogniser, whatever the "
                                                         "validation_protocol).")
    # adapter sizes (the face dims come from the data's face files)
    qformer_dim: int = doc(1024, "Face Q-Former width.")
    qformer_depth: int = doc(4, "Face Q-Former layers.")
    qformer_dim_head: int = doc(64, "Face Q-Former head width.")
    cond_dim: int = doc(1024, "CAN hidden width.")
    fuse_hidden: int = doc(4096, "ID fusion MLP hidden width.")
    tiny_demo: bool = doc(False, "Generate tiny random models and a synthetic dataset under output_dir and train "
                                 "on them (set by --preset tiny). It fills model_path, data and arcface_path, so "
                                 "those cannot be set with it (--no-tiny_demo keeps the preset's other settings "
                                 "for your own files).", generates=("model_path", "data", "arcface_path"))

    def __post_init__(self):
        if self.stage == "image" and self.num_frames != 1:
            raise InputError(f"stage=image trains on single frames but num_frames={self.num_frames}: leave "
                             "num_frames at 1 for stage=image, or set --stage video to train on clips")
        if self.stage == "video" and self.num_frames == 1:
            raise InputError("stage=video trains on clips but num_frames=1: set --num_frames (4k+1, e.g. 49), "
                             "or use --stage image for single frames")


PRESETS = {
    # Paper §4.1: lr 1e-5 (decayed), stage 1 30K steps at batch 64, stage 2 5K steps at batch 8.
    "paper-stage1": dict(stage="image", max_steps=30_000, learning_rate=1e-5, lr_scheduler="cosine",
                         gradient_accumulation_steps=64),
    "paper-stage2": dict(stage="video", max_steps=5_000, learning_rate=1e-5, lr_scheduler="cosine",
                         gradient_accumulation_steps=8, num_frames=49),
    # Builds its own tiny random models and dataset, trains a few dozen steps on the CPU.
    "tiny": dict(stage="image", max_steps=40, learning_rate=1e-3, lr_scheduler="constant", height=64, width=64,
                 mixed_precision="no", gradient_checkpointing=False, checkpointing_steps=20, report_to="none",
                 output_dir="runs/magicmirror-tiny", qformer_dim=32, qformer_depth=1, qformer_dim_head=16,
                 cond_dim=32, fuse_hidden=32, id_loss_weight=0.1, tiny_demo=True),
}


def fit_points(points: torch.Tensor, src_w: int, src_h: int, width: int, height: int) -> torch.Tensor:
    """Map pixel coordinates [..., 2] through the loader's cover-resize + centre-crop (``data.resize_crop``)."""
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = points.clone().float()
    out[..., 0] = out[..., 0] * (new_w / src_w) - left
    out[..., 1] = out[..., 1] * (new_h / src_h) - top
    return out


class MagicMirrorTrainingModule(TrainingModule):
    """The trainable adapter (``frozen``: the ArcFace loss network when the identity loss is on)."""

    def __init__(self, adapter: MagicMirrorAdapter, spec, config: MagicMirrorTrainConfig, **frozen):
        super().__init__(spec, config, **frozen)
        self.adapter = adapter

    def forward(self, batch: dict, generator: torch.Generator):
        c, spec = self.config, self.spec
        latents = spec.pad_frames(spec.video_latents(batch, generator))  # [B, T, C, h, w]
        text = spec.text_embeds(batch)
        noise, t, noisy = spec.add_noise(latents, generator)
        v = torch.empty_like(noisy)
        for rows in reference_groups(batch["x_id"]):  # samples with as many reference photos run together
            adapter = self.adapter
            face_tokens = torch.cat([adapter.face_tokens(batch["clip_penultimate"][i].to(spec.device, spec.dtype))
                                     for i in rows])
            id_vec = torch.cat([adapter.id_vector(batch["x_id"][i].to(spec.device, spec.dtype)) for i in rows])
            index = torch.tensor(rows, device=noisy.device)
            undo = inject_magicmirror(spec.transformer, adapter, face_tokens=face_tokens, id_vec=id_vec,
                                      identity_mask=batch["identity_mask"][rows])
            try:
                v[index] = spec.forward(noisy[index], text[index], t[index])
            finally:
                undo()
        x0_pred = spec.x0(noisy, v, t)
        b = latents.shape[0]
        in_face = torch.rand(b, generator=generator) < c.face_region_prob
        height, width = (n * spec.vae_scale for n in latents.shape[-2:])  # the batch's bucket
        mask = box_to_latent_mask(batch["face_box"], height, width, spec.vae_scale).to(noisy.device)
        mask = torch.where(in_face.to(noisy.device)[:, None, None, None, None], mask, torch.ones_like(mask))
        noise_loss = v_prediction_loss(x0_pred, latents, spec.loss_weights(t), mask)
        logs = {"loss_noise": noise_loss.mean().detach(), "face_region_share": in_face.float().mean()}
        loss = noise_loss
        if c.id_loss_weight > 0:
            from ..models.arcface import embed_aligned, identity_cosine

            arcface, vae = self.frozen["arcface"], spec.vae
            with torch.no_grad():  # the references through the loss network itself (one network on both sides)
                ref = torch.stack([F.normalize(F.normalize(embed_aligned(arcface, crops.to(noisy.device)).float(),
                                                           dim=-1).mean(0), dim=-1) for crops in batch["ref_crops"]])
            first = x0_pred[:, :1]  # frame 0 (CogVideoX 1.5's padding repeats it in front)
            frames = vae.decode((first.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).to(vae.dtype)).sample
            cos = identity_cosine(arcface, ref, frames[:, :, 0].float(), batch["face_kps"].to(noisy.device))
            loss = loss + c.id_loss_weight * identity_loss(cos)
            logs["id_cosine"] = cos.mean().detach()
        return loss.mean(), logs


def reference_groups(x_ids: list) -> list[list[int]]:
    """Batch rows grouped by their number of reference photos (each photo adds 32 face tokens, so a group
    shares one face-token length): ``[[rows with N refs], [rows with M refs], ...]`` in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(x_ids):
        groups.setdefault(x.shape[0], []).append(i)
    return list(groups.values())


class MagicMirrorTrainer(Trainer):
    config_class = MagicMirrorTrainConfig
    method = "magicmirror"
    title = "MagicMirror"

    @property
    def vae_needed_with_cache(self) -> bool:
        return self.config.id_loss_weight > 0  # the identity loss decodes x̂0
    required_inputs = {"model_path": "a diffusers CogVideoX folder", "data": "metadata.jsonl"}

    def validate_inputs(self) -> dict:
        from .inputs import check_manifest, check_media, check_numbers, check_path, check_text_to_video

        inputs, c = super().validate_inputs(), self.config
        check_text_to_video(inputs["transformer_config"], "MagicMirror")
        samples = check_manifest(c.data, "--data", columns=("faces", "face_box", "face_kps", "size"),
                                 expected="the metadata.jsonl of python -m training.prepare_magicmirror (rows {media, "
                                          "caption, faces, face_box, face_kps, size})")
        check_numbers(samples, "--data", {"face_box": (4,), "face_kps": (5, 2), "size": (2,)})
        bad = next((s for s in samples if min(s.extra["size"]) <= 0), None)
        if bad is not None:
            raise InputError(f"--data: {bad.where}: size={bad.extra['size']} must be [width, height] > 0; rebuild "
                             "the manifest with python -m training.prepare_magicmirror")
        check_media(samples, "--data", num_frames=self.checked_frames, videos_only=c.stage == "video")
        if isinstance(self.bucket_list, list):
            wrong = [b for b in self.bucket_list if (b.frames == 1) != (c.stage == "image")]
            if wrong:
                want = ("single frames: give 1xHEIGHTxWIDTH buckets" if c.stage == "image"
                        else "clips: give buckets of more than 1 frame")
                raise InputError(f"--buckets {wrong[0]}: stage={c.stage} trains {want}")
        samples, buckets = self.assign_buckets(samples, "--data")
        if c.init_from:
            check_path(c.init_from, "--init_from", "MagicMirror adapter")
        if c.id_loss_weight > 0:
            if not c.arcface_path:
                raise InputError("id_loss_weight > 0 needs --arcface_path (an insightface arcface_torch backbone "
                                 ".pth); or pass --id_loss_weight 0")
            check_path(c.arcface_path, "--arcface_path", "ArcFace backbone")
        if c.validation_faces:
            check_path(c.validation_faces, "--validation_faces", "faces .safetensors")
        if c.validation_insightface:
            check_path(c.validation_insightface, "--validation_insightface", "insightface root", folder=True)
        return {**inputs, "samples": samples, "buckets": buckets}

    def build(self) -> torch.nn.Module:
        c = self.config
        self.samples = self.inputs["samples"]
        spec = self.load_base()
        bundle, frozen = self.bundle, {}
        first = read_safetensors(self._faces_path(self.samples[0]))[0]
        if c.init_from:
            adapter = load_magicmirror(c.init_from).requires_grad_(True)
            adapter.check_compatible(bundle.transformer)
            # trained on from here: the export records this model (files from before the record had none)
            adapter.config = dataclasses.replace(adapter.config, base_model=base_model_of(bundle.transformer))
        else:
            adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(
                bundle.transformer, id_dim=first["x_id"].shape[-1], id_tokens=first["x_id"].shape[-2],
                clip_dim=first["clip_penultimate"].shape[-1], qformer_dim=c.qformer_dim,
                qformer_depth=c.qformer_depth, qformer_dim_head=c.qformer_dim_head, cond_dim=c.cond_dim,
                fuse_hidden=c.fuse_hidden))
        self.adapter = adapter.train()
        if c.id_loss_weight > 0:
            from ..models.arcface import load_arcface_torch

            frozen["arcface"] = load_arcface_torch(c.arcface_path).to(self.device)
        return MagicMirrorTrainingModule(self.adapter, spec, c, **frozen)

    def _faces_path(self, sample) -> str:
        path = sample.extra.get("faces")  # resolved against the manifest folder by read_manifest
        if not path:
            raise SystemExit(f"{sample.media}: manifest row has no 'faces' entry; build the dataset with "
                             "python -m training.prepare_magicmirror")
        return path

    def dataset(self):
        return MagicMirrorDataset(self)

    def collate(self, items: list) -> dict:
        keys = ("pixels", "input_ids", "latents", "prompt_embeds", "identity_mask", "face_box", "face_kps")
        out = {k: torch.stack([it[k] for it in items]) for k in keys if k in items[0]}
        for key in ("x_id", "clip_penultimate", "ref_crops"):  # per sample: reference counts may differ
            if key in items[0]:
                out[key] = [it[key] for it in items]
        return out

    def export(self, path: str) -> None:
        adapter = self.accelerator.unwrap_model(self.module).adapter
        save_magicmirror(path, adapter, {"stage": self.config.stage, "steps": self.step})

    def validate(self, step: int) -> None:
        """Validation videos with ``validation_faces``; with ``validation_insightface`` also the identity similarity
        of every frame's face to those faces (logged as ``validation/face_sim``, with face rate, decay, dynamics)."""
        c = self.config
        if not (c.validation_prompts and c.validation_faces):
            return
        from ..models.magicmirror import FaceEmbeds, MagicMirrorPatch

        tensors, _ = read_safetensors(c.validation_faces)
        faces = FaceEmbeds(arcface=tensors["arcface"], x_id=tensors["x_id"], clip_penultimate=tensors["clip_penultimate"])
        adapter = self.accelerator.unwrap_model(self.module).adapter
        adapter.eval()
        try:
            videos = self.validation_videos(self.bundle.with_patch(MagicMirrorPatch(adapter, faces)), step,
                                            trigger=c.trigger_word)
        finally:
            adapter.train()
        if c.validation_insightface:
            from ..models.face_analysis import FaceAnalyzer
            from ..models.metrics import ReferenceFaces, evaluate_video

            if not hasattr(self, "analyzer"):
                self.analyzer = FaceAnalyzer(c.validation_insightface, name=c.validation_insightface_pack)
            references = ReferenceFaces.from_embeddings(faces.arcface)  # the pack's recogniser, as the frames'
            self.log_validation_metrics(step, [evaluate_video(v, protocol=c.validation_protocol, fps=VALIDATION_FPS,
                                                              analyzer=self.analyzer, references=references)
                                               for v in videos])


class MagicMirrorDataset(TrainingDataset):
    """Target media (or its cached latents), the caption (trigger word removed), identity mask, face box/keypoints
    mapped to the training resolution, and the references' frozen face-encoder outputs (+ crops for the loss)."""

    def __init__(self, trainer: MagicMirrorTrainer):
        super().__init__(trainer, trainer.samples, trainer.inputs["buckets"])
        self.tokenizer = trainer.bundle.tokenizer

    def cache_specs(self, index: int):
        s = self.samples[index]
        return [dict(path=s.media, **self.pick(index))], [split_trigger(s.caption, self.config.trigger_word)[0]]

    def __getitem__(self, index: int) -> dict:
        c, sample, bucket = self.config, self.samples[index], self.buckets[index]
        text, spans = split_trigger(sample.caption, c.trigger_word)
        item = {**self.trainer.media("pixels", sample.media, generator=self.generator(index), **self.pick(index)),
                **self.trainer.caption(text, self.tokenizer)}
        faces_path = self.trainer._faces_path(sample)
        faces = read_safetensors(faces_path)[0]
        src_w, src_h = sample.extra["size"]
        box = torch.tensor(sample.extra["face_box"], dtype=torch.float32).view(2, 2)
        item.update({
            "identity_mask": identity_token_mask(self.tokenizer, text, spans)[0],
            "face_box": fit_points(box, src_w, src_h, bucket.width, bucket.height).flatten(),
            "face_kps": fit_points(torch.tensor(sample.extra["face_kps"], dtype=torch.float32), src_w, src_h,
                                   bucket.width, bucket.height),
            "x_id": faces["x_id"].float(),
            "clip_penultimate": faces["clip_penultimate"].float(),
        })
        if c.id_loss_weight > 0:
            item["ref_crops"] = reference_crops(faces, faces_path)
        return item


def reference_crops(faces: dict, faces_path: str) -> torch.Tensor:
    """The aligned reference face crops [N, 3, 112, 112] in [-1, 1] that the identity loss embeds with its own
    network: the ``crops`` tensor of the faces file, or (datasets made before it was stored there) the
    ``crops/<stem>-ref<k>.png`` files that ``prepare_magicmirror`` writes beside ``faces/``. The face encoder
    aligns at 224 px (``norm_crop``'s template scaled by 2), so the crops are resized to ArcFace's 112."""
    if "crops" in faces:
        crops = faces["crops"]  # [N, 112, 112, 3] uint8
    else:
        import numpy as np
        from PIL import Image

        root, name = os.path.split(faces_path)
        stem = os.path.splitext(name)[0]
        n = faces["x_id"].shape[0]
        crops = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(
            os.path.dirname(root), "crops", f"{stem}-ref{k}.png")).convert("RGB")) for k in range(n)]))
    x = crops.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != 112:
        x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
    return x


def main(argv=None) -> int:
    from .presets import build_tiny_magicmirror

    return cli_main(MagicMirrorTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_magicmirror,
                    use_hint="copy it to ComfyUI/models/magicmirror/ and pick it in 'MagicMirror Apply'")


if __name__ == "__main__":
    raise SystemExit(main())
