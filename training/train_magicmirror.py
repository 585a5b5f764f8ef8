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

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.cogvideox import read_safetensors
from ..models.magicmirror import (
    MagicMirrorAdapter,
    MagicMirrorConfig,
    inject_magicmirror,
    load_magicmirror,
    save_magicmirror,
)
from ..models.sampler import rotary_embeddings
from ..models.text import identity_token_mask, split_trigger, tokenize
from .config import TrainConfig, doc
from .data import item_generator, load_media, read_manifest
from .losses import box_to_latent_mask, identity_loss, loss_weights, v_prediction_loss, x0_from_v
from .trainer import Trainer, cli_main


@dataclass
class MagicMirrorTrainConfig(TrainConfig):
    stage: str = doc("image", "image: stage 1 on image pairs (num_frames forced to 1); video: stage 2 on videos.",
                     choices=("image", "video"))
    init_from: str = doc("", "Adapter .safetensors to start from (stage 2 starts from the stage-1 export).")
    trigger_word: str = doc("img", "Trigger word after the class word in captions ('a man img ...').")
    id_loss_weight: float = doc(0.1, "λ of the identity loss (0 = off; the paper does not give its value).")
    face_region_prob: float = doc(0.5, "Share of samples whose diffusion loss only counts inside the face box.")
    arcface_path: str = doc("", "insightface arcface_torch backbone (.pth, e.g. ms1mv3_arcface_r100) for the "
                                "identity loss; required when id_loss_weight > 0.")
    validation_faces: str = doc("", "A faces .safetensors (from prepare_magicmirror) for validation videos.")
    # adapter sizes (the face dims come from the data's face files)
    qformer_dim: int = doc(1024, "Face Q-Former width.")
    qformer_depth: int = doc(4, "Face Q-Former layers.")
    qformer_dim_head: int = doc(64, "Face Q-Former head width.")
    cond_dim: int = doc(1024, "CAN hidden width.")
    fuse_hidden: int = doc(4096, "ID fusion MLP hidden width.")
    tiny_demo: bool = doc(False, "Generate tiny random models and a synthetic dataset under output_dir and train "
                                 "on them (set by --preset tiny; model_path/data are filled in).")

    def __post_init__(self):
        if self.stage == "image":
            self.num_frames = 1


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


class MagicMirrorTrainingModule(torch.nn.Module):
    """The trainable adapter; its forward computes the loss of one micro-batch (DDP-friendly).

    Frozen models are kept in a plain dict so they are neither parameters of this module (not in
    checkpoints, not synchronised by DDP) nor moved by ``accelerate.prepare``.
    """

    def __init__(self, adapter: MagicMirrorAdapter, frozen: dict, config: MagicMirrorTrainConfig):
        super().__init__()
        self.adapter = adapter
        self.frozen = frozen
        self.config = config

    def forward(self, batch: dict, generator: torch.Generator):
        c, f = self.config, self.frozen
        transformer, vae, scheduler = f["transformer"], f["vae"], f["scheduler"]
        device, dtype = next(transformer.parameters()).device, next(transformer.parameters()).dtype
        with torch.no_grad():
            if "latents" in batch:  # precompute cache: a posterior draw made by the dataset
                latents = batch["latents"].to(device)  # [B, C, T, h, w], unscaled
            else:
                pixels = batch["pixels"].to(device, vae.dtype)  # [B, F, 3, H, W] in [-1, 1]
                posterior = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
                noise_z = torch.randn(posterior.mean.shape, generator=generator).to(device, posterior.mean.dtype)
                latents = posterior.mean + posterior.std * noise_z
            latents = (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4).to(dtype)  # [B, T, C, h, w]
            if "prompt_embeds" in batch:
                text = batch["prompt_embeds"].to(device, dtype)
            else:
                text = f["text_encoder"](batch["input_ids"].to(device))[0].to(dtype)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        rope = rotary_embeddings(transformer, c.height, c.width, latents.shape[1], 8, device)

        adapter = self.adapter
        face_tokens = torch.cat([adapter.face_tokens(x.to(device, dtype)) for x in batch["clip_penultimate"]])
        id_vec = torch.cat([adapter.id_vector(x.to(device, dtype)) for x in batch["x_id"]])
        undo = inject_magicmirror(transformer, adapter, face_tokens=face_tokens, id_vec=id_vec,
                                  identity_mask=batch["identity_mask"])
        try:
            v = transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                            return_dict=False)[0]
        finally:
            undo()
        x0_pred = x0_from_v(scheduler, noisy, v.float(), t)
        weights = loss_weights(scheduler, t)
        in_face = torch.rand(b, generator=generator) < c.face_region_prob
        mask = box_to_latent_mask(batch["face_box"], c.height, c.width, 8).to(device)
        mask = torch.where(in_face.to(device)[:, None, None, None, None], mask, torch.ones_like(mask))
        noise_loss = v_prediction_loss(x0_pred, latents, weights, mask)
        logs = {"loss_noise": noise_loss.mean().detach(), "face_region_share": in_face.float().mean()}
        loss = noise_loss
        if c.id_loss_weight > 0:
            from ..models.arcface import identity_cosine

            first = x0_pred[:, :1].permute(0, 2, 1, 3, 4) / vae.config.scaling_factor  # [B, C, 1, h, w]
            frames = vae.decode(first.to(vae.dtype)).sample[:, :, 0].float()  # [B, 3, H, W] in ~[-1, 1]
            cos = identity_cosine(f["arcface"], batch["ref_arcface"].to(device), frames, batch["face_kps"].to(device))
            loss = loss + c.id_loss_weight * identity_loss(cos)
            logs["id_cosine"] = cos.mean().detach()
        return loss.mean(), logs


class MagicMirrorTrainer(Trainer):
    config_class = MagicMirrorTrainConfig
    method = "magicmirror"

    def build(self) -> torch.nn.Module:
        c = self.config
        frozen = self.load_base()
        bundle = self.bundle
        self.samples = read_manifest(c.data)
        first = read_safetensors(self._faces_path(self.samples[0]))[0]
        if c.init_from:
            adapter = load_magicmirror(c.init_from).requires_grad_(True)
            adapter.check_compatible(bundle.transformer)
        else:
            adapter = MagicMirrorAdapter(MagicMirrorConfig.for_transformer(
                bundle.transformer, id_dim=first["x_id"].shape[-1], id_tokens=first["x_id"].shape[-2],
                clip_dim=first["clip_penultimate"].shape[-1], qformer_dim=c.qformer_dim,
                qformer_depth=c.qformer_depth, qformer_dim_head=c.qformer_dim_head, cond_dim=c.cond_dim,
                fuse_hidden=c.fuse_hidden))
        self.adapter = adapter.train()
        self.cache_keys = None
        if c.precompute_cache:
            self.cache_keys = self._precompute(bundle)
            frozen["text_encoder"] = None  # prompts come from the cache; T5 leaves memory
            bundle.placement.offload(bundle.text_encoder)  # on the CPU; validation brings it in for its prompts
            if c.id_loss_weight == 0:
                bundle.placement.offload(bundle.vae)  # the identity loss still decodes x̂0, else the VAE is not needed
        if c.id_loss_weight > 0:
            if not c.arcface_path:
                raise SystemExit("id_loss_weight > 0 needs --arcface_path (an insightface arcface_torch backbone "
                                 ".pth); or pass --id_loss_weight 0")
            from ..models.arcface import load_arcface_torch

            frozen["arcface"] = load_arcface_torch(c.arcface_path).to(self.device)
        return MagicMirrorTrainingModule(self.adapter, frozen, c)

    def _precompute(self, bundle) -> list[dict]:
        from .cache import PrecomputeCache, precompute

        c = self.config
        cache = PrecomputeCache(c.cache_dir or os.path.join(c.output_dir, "cache"))
        with self.accelerator.main_process_first():
            return precompute(self.samples, vae=bundle.vae, text_encoder=bundle.text_encoder,
                              tokenizer=bundle.tokenizer, cache=cache, height=c.height, width=c.width,
                              num_frames=c.num_frames, sampling=c.frame_sampling, model_id=os.path.abspath(c.model_path),
                              caption_transform=lambda caption: split_trigger(caption, c.trigger_word)[0],
                              progress=self.accelerator.is_main_process)

    def _faces_path(self, sample) -> str:
        path = sample.extra.get("faces")  # resolved against the manifest folder by read_manifest
        if not path:
            raise SystemExit(f"{sample.media}: manifest row has no 'faces' entry; build the dataset with "
                             "python -m training.prepare_magicmirror")
        return path

    def dataset(self):
        return MagicMirrorDataset(self)

    def collate(self, items: list) -> dict:
        keys = ("pixels", "input_ids", "latents", "prompt_embeds", "identity_mask", "face_box", "face_kps",
                "ref_arcface")
        out = {k: torch.stack([it[k] for it in items]) for k in keys if k in items[0]}
        out["x_id"] = [it["x_id"] for it in items]
        out["clip_penultimate"] = [it["clip_penultimate"] for it in items]
        return out

    def export(self, path: str) -> None:
        adapter = self.accelerator.unwrap_model(self.module).adapter
        save_magicmirror(path, adapter, {"stage": self.config.stage, "steps": self.step})

    def validate(self, step: int) -> None:
        c = self.config
        if not (c.validation_prompts and c.validation_faces):
            return
        from ..models.magicmirror import FaceEmbeds, MagicMirrorPatch
        from ..models.sampler import decode_latents, sample_video
        from ..models.text import encode_prompt
        from ..models.video_io import write_video

        tensors, _ = read_safetensors(c.validation_faces)
        faces = FaceEmbeds(arcface=tensors["arcface"], x_id=tensors["x_id"], clip_penultimate=tensors["clip_penultimate"])
        adapter = self.accelerator.unwrap_model(self.module).adapter
        adapter.eval()
        try:
            patched = self.bundle.with_patch(MagicMirrorPatch(adapter, faces))
            for i, prompt in enumerate(c.validation_prompts):
                pos = encode_prompt(self.bundle, prompt, trigger=c.trigger_word)
                latents = sample_video(patched, pos, num_frames=c.validation_num_frames, height=c.height,
                                       width=c.width, steps=c.validation_steps_sampling, cfg=6.0, seed=c.seed)
                frames = decode_latents(self.bundle, latents)[0]
                write_video(os.path.join(c.output_dir, "validation", f"step-{step:08d}-{i}.mp4"), frames)
        finally:
            adapter.train()


class MagicMirrorDataset(torch.utils.data.Dataset):
    """Target media (or its cached latents), tokenised caption, identity mask, face box/keypoints
    mapped to the training resolution, and the references' frozen face-encoder outputs."""

    def __init__(self, trainer: MagicMirrorTrainer):
        self.trainer, self.config, self.samples = trainer, trainer.config, trainer.samples
        self.tokenizer = trainer.bundle.tokenizer
        self.epoch = 0
        self.cached = None
        if trainer.cache_keys is not None:
            from .cache import CachedDataset, PrecomputeCache

            c = self.config
            cache = PrecomputeCache(c.cache_dir or os.path.join(c.output_dir, "cache"))
            self.cached = CachedDataset(self.samples, cache, trainer.cache_keys, seed=c.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.cached is not None:
            self.cached.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        c, sample = self.config, self.samples[index]
        text, spans = split_trigger(sample.caption, c.trigger_word)
        if self.cached is not None:
            cached = self.cached[index]
            item = {"latents": cached["latents"], "prompt_embeds": cached["prompt_embeds"]}
        else:
            item = {"pixels": load_media(sample.media, num_frames=c.num_frames, height=c.height, width=c.width,
                                         sampling=c.frame_sampling,
                                         generator=item_generator(c.seed, self.epoch, index)),
                    "input_ids": tokenize(self.tokenizer, text).input_ids[0]}
        faces = read_safetensors(self.trainer._faces_path(sample))[0]
        src_w, src_h = sample.extra["size"]
        box = torch.tensor(sample.extra["face_box"], dtype=torch.float32).view(2, 2)
        ref = F.normalize(faces["arcface"].float(), dim=-1).mean(0)
        item.update({
            "identity_mask": identity_token_mask(self.tokenizer, text, spans)[0],
            "face_box": fit_points(box, src_w, src_h, c.width, c.height).flatten(),
            "face_kps": fit_points(torch.tensor(sample.extra["face_kps"], dtype=torch.float32), src_w, src_h,
                                   c.width, c.height),
            "ref_arcface": F.normalize(ref, dim=-1),
            "x_id": faces["x_id"].float(),
            "clip_penultimate": faces["clip_penultimate"].float(),
        })
        return item


def main(argv=None) -> int:
    from .presets import build_tiny_magicmirror

    return cli_main(MagicMirrorTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_magicmirror,
                    required={"model_path": "a diffusers CogVideoX folder", "data": "metadata.jsonl"},
                    use_hint="copy it to ComfyUI/models/magicmirror/ and pick it in 'MagicMirror Apply'")


if __name__ == "__main__":
    raise SystemExit(main())
