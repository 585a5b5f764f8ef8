"""Train a subject-reference LoRA with proxy experience replay: ``python -m training.train_subject_replay``.

Algorithm 1 of "Subject-driven video generation emerges from experience replays" (arXiv 2504.17816):
every optimizer step draws u ~ U(0, 1);

* u < ``replay_prob`` — **video replay** (I2V-style): an unpaired video; a random frame i ~ U(1, T)
  becomes the reference tokens, each reference token dropped with ``token_drop_prob``; the loss is
  the v-prediction loss on the video;
* otherwise — **S2I pair**: the source image is the reference, the target image (one frame) is
  denoised, the prompt starts with ``<cls>``.

LoRA rank 128 / alpha 64 / dropout 0.1 on attention, FFN, ``patch_embed.proj`` and ``norm1/norm2``;
the norm LoRA acts on the reference tokens only. Every ``conflict_steps`` steps the cosine between
the LoRA gradients of the two tasks is logged (``grad_cosine``) and plotted to ``output_dir/grad_conflict.png``:
of a fixed image and a fixed video probe batch (``conflict_monitor=probes``), or, as the paper, of the latest
training step of each task (``conflict_monitor=training``).

Data: ``--pairs`` a metadata.jsonl of S2I pairs (``{"src": ..., "tgt": ..., "caption": ...}``,
Subject200K-like) and ``--data`` unpaired videos (metadata.jsonl or prompts.txt + videos.txt).
Export: a diffusers-format LoRA (alpha baked) for the Subject Reference LoRA Loader node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..models.lora import TrainableLora, find_lora_targets
from ..models.subject import CLS_TOKEN, LORA_TARGETS, NORM_LORA_MODULES, inject_reference
from ..models.text import with_extra_tokens
from .buckets import Bucket
from .config import TrainConfig, doc
from .losses import v_prediction_loss
from .trainer import TaskSwitchingTrainer, TrainingDataset, TrainingModule, cli_main

IMAGE, VIDEO = "image", "video"


@dataclass
class SubjectReplayTrainConfig(TrainConfig):
    learning_rate: float = doc(5e-5, "Peak learning rate (the paper's 5e-5).")
    pairs: str = doc("", "S2I pair manifest (metadata.jsonl rows {src, tgt, caption}).")
    replay_prob: float = doc(0.2, "p: probability that a step is a video-replay step (the paper uses 0.1).")
    token_drop_prob: float = doc(0.3, "p_drop: each reference token of a video-replay step is dropped with this "
                                      "probability (value not given in the paper).")
    pair_height: int = doc(512, "Height of S2I pair images (multiple of 16).")
    pair_width: int = doc(512, "Width of S2I pair images (multiple of 16).")
    pair_buckets: list = doc([], "Sizes HEIGHTxWIDTH of the S2I pairs, e.g. 512x512 384x640 640x384: each pair (source "
                                 "and target) trains at the size nearest its target's aspect ratio, a batch holds one "
                                 "size. Empty: every pair at pair_height x pair_width. (--buckets sizes the replay "
                                 "videos.)")
    pair_batch_size: int = doc(1, "S2I pairs per device per micro-step of a pair step (the paper: 256 per step "
                                  "in all, see --preset paper).")
    video_batch_size: int = doc(1, "Videos per device per micro-step of a video-replay step (the paper: 32 per "
                                   "step in all).")
    lora_rank: int = doc(128, "LoRA rank.")
    lora_alpha: float = doc(64.0, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = doc(0.1, "LoRA dropout.")
    lora_targets: list = doc(list(LORA_TARGETS), "Module names the LoRA adapts.")
    validation_reference: str = doc("", "Subject image for validation videos (with validation_prompts starting with "
                                        "<cls>); on I2V models it is also the first frame.")
    validation_clip_vision: str = doc("", "CLIP vision model to score validation videos: CLIP-I of every frame to the "
                                          "validation reference (logged as validation/clip_i).")
    conflict_steps: int = doc(100, "Log cos(g_img, g_vid) every N steps (0 = off).")
    conflict_monitor: str = doc("probes", "probes: the LoRA gradients of a fixed image and a fixed video probe batch "
                                          "(comparable across steps); training: the paper's form, the latest training "
                                          "gradients of each task (kept on the CPU).", choices=("probes", "training"))
    tiny_demo: bool = doc(False, "Generate tiny random models and synthetic pairs/videos under output_dir and train "
                                 "on them (set by --preset tiny). It fills model_path, data and pairs, so those "
                                 "cannot be set with it (--no-tiny_demo keeps the preset's other settings for your "
                                 "own files).", generates=("model_path", "data", "pairs"))


PRESETS = {
    # 256 image pairs / 32 videos per step on one process; divide gradient_accumulation_steps by the GPU count.
    "paper": dict(learning_rate=5e-5, lr_scheduler="cosine_with_restarts", max_steps=4000, mixed_precision="bf16",
                  replay_prob=0.1, pair_batch_size=8, video_batch_size=1, gradient_accumulation_steps=32),
    "tiny": dict(max_steps=12, learning_rate=1e-3, lr_scheduler="constant", height=32, width=32, num_frames=9,
                 pair_height=32, pair_width=32, pair_batch_size=2, mixed_precision="no", gradient_checkpointing=False,
                 lora_rank=4,
                 lora_alpha=4.0, checkpointing_steps=6, report_to="none", conflict_steps=4, replay_prob=0.5,
                 output_dir="runs/subject-tiny", tiny_demo=True),
}


class SubjectReplayModule(TrainingModule):
    """The LoRA; its forward computes the loss of one batch of either kind.

    On I2V models video-replay steps are conditioned on the clip's first frame, as I2V training is; S2I pair
    steps (one-frame targets) on no image (zero condition latents), so the target never leaks in."""

    def __init__(self, lora: TrainableLora, spec, config: SubjectReplayTrainConfig):
        super().__init__(spec, config)
        self.lora = lora

    def forward(self, batch: dict, generator: torch.Generator):
        spec, video = self.spec, batch["kind"] == VIDEO
        latents = spec.pad_frames(spec.video_latents(batch, generator, "target"))  # [B, T, C, h, w]
        with torch.no_grad():  # the clean reference: posterior mode, scaled, one latent frame [B, C, h, w]
            ref = batch["reference_latents"].to(spec.device) if "reference_latents" in batch else \
                spec.posterior(batch["reference"][:, None]).mode()[:, :, 0]
            ref = (ref * spec.vae.config.scaling_factor).to(spec.dtype)
        text = spec.text_embeds(batch)
        image_latents = None
        if spec.i2v:
            image_latents = spec.image_condition(batch["target"][:, 0] if "target" in batch else None, latents.shape[1],
                                                 generator, batch.get("first_frame_latents")) if video \
                else torch.zeros_like(latents)
        noise, t, noisy = spec.add_noise(latents, generator)
        drop = self.config.token_drop_prob if video else 0.0
        preds = []
        for i in range(latents.shape[0]):  # references may differ per sample: one reference stream per forward
            undo = inject_reference(spec.transformer, ref[i:i + 1], vae_scale=spec.vae_scale, drop_prob=drop,
                                    generator=generator)
            try:
                preds.append(spec.forward(noisy[i:i + 1], text[i:i + 1], t[i:i + 1],
                                          None if image_latents is None else image_latents[i:i + 1]))
            finally:
                undo()
        loss = v_prediction_loss(spec.x0(noisy, torch.cat(preds), t), latents, spec.loss_weights(t)).mean()
        return loss, {f"loss_{batch['kind']}": loss.detach(), "is_video": float(video)}


class SubjectReplayTrainer(TaskSwitchingTrainer):
    config_class = SubjectReplayTrainConfig
    method = "subject_replay"
    title = "subject replay"
    tasks = (IMAGE, VIDEO)
    task_batch_sizes = {IMAGE: "pair_batch_size", VIDEO: "video_batch_size"}

    def sequence_shapes(self) -> list:
        c = self.config
        return [(1, c.pair_height, c.pair_width), (c.num_frames, c.height, c.width)]  # S2I pairs, replayed videos
    required_inputs = {"model_path": "a diffusers CogVideoX folder", "pairs": "S2I pair manifest",
                       "data": "unpaired videos"}

    @property
    def switch_prob(self) -> float:
        return self.config.replay_prob

    def validate_inputs(self) -> dict:
        from .inputs import check_manifest, check_media, check_path, check_size

        inputs, c = super().validate_inputs(), self.config
        check_size(1, c.pair_height, c.pair_width, ("", "--pair_height", "--pair_width"))
        pair_buckets = self.check_buckets(c.pair_buckets, "--pair_buckets", spatial=True)
        self.check_bucket_sides(pair_buckets, "--pair_buckets")
        pairs = check_manifest(c.pairs, "--pairs", columns=("src", "tgt"),
                               expected="S2I pairs (metadata.jsonl rows {src, tgt, caption})")
        check_media(pairs, "--pairs", num_frames=1, keys=("src", "media"))
        videos = check_manifest(c.data, "--data", expected="unpaired videos with captions")
        check_media(videos, "--data", num_frames=self.checked_frames, videos_only=True)
        pairs, pair_sizes = self.assign_buckets(pairs, "--pairs", images=True, buckets=pair_buckets,
                                                bucket_option="--pair_buckets",
                                                default=Bucket(1, c.pair_height, c.pair_width))
        videos, video_buckets = self.assign_buckets(videos, "--data")
        if c.validation_reference:
            check_path(c.validation_reference, "--validation_reference", "validation subject image")
        if c.validation_clip_vision:
            check_path(c.validation_clip_vision, "--validation_clip_vision", "CLIP vision model", folder=None)
        return {**inputs, "pairs": pairs, "videos": videos, "buckets": {IMAGE: pair_sizes, VIDEO: video_buckets}}

    def build(self) -> torch.nn.Module:
        c = self.config
        self.pairs, self.videos = self.inputs["pairs"], self.inputs["videos"]
        spec = self.load_base()
        bundle = self.bundle
        self.tokenizer = with_extra_tokens(bundle.tokenizer)  # knows <cls>; the model's tokenizer is untouched
        targets = find_lora_targets(bundle.transformer, c.lora_targets)
        torch.manual_seed(c.seed)
        lora = TrainableLora(bundle.transformer, targets, c.lora_rank, c.lora_alpha, c.lora_dropout,
                             reference_only=NORM_LORA_MODULES).to(self.device)
        self.lora = lora
        self.undo_lora = lora.apply(bundle.transformer)
        self.conflicts: list[tuple[int, float]] = []
        self.latest_gradient: dict[str, torch.Tensor] = {}
        return SubjectReplayModule(lora, spec, c)

    def dataset(self):
        return {IMAGE: PairDataset(self), VIDEO: ReplayDataset(self)}

    def collate(self, items: list, kind: str = IMAGE) -> dict:
        return {"kind": kind, **{k: torch.stack([it[k] for it in items]) for k in items[0]}}

    def gradient_cosine(self, image_batch: dict, video_batch: dict, generator_seed: int = 0) -> float:
        """cos(g_img, g_vid) of the LoRA gradients on two probe batches, with LoRA dropout off and fixed
        noise, so the curve is comparable across steps (no effect on training: nothing is accumulated)."""
        module = self.accelerator.unwrap_model(self.module)
        params = [p for p in module.lora.parameters() if p.requires_grad]
        was_training = module.training
        module.eval()
        try:
            grads = []
            for batch in (image_batch, video_batch):
                loss, _ = module(batch, torch.Generator().manual_seed(generator_seed))
                grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        finally:
            module.train(was_training)
        return torch.nn.functional.cosine_similarity(grads[0].double(), grads[1].double(), dim=0).item()

    def validate(self, step: int) -> None:
        """Validation videos with the LoRA (its hooks are on the transformer) and the validation reference; with
        ``validation_clip_vision`` also their CLIP-I to the reference."""
        c = self.config
        if not (c.validation_prompts and c.validation_reference):
            return
        from ..models.subject import SubjectReferencePatch, encode_reference
        from .data import first_frame

        image = torch.from_numpy(first_frame(c.validation_reference)).float()[None] / 255.0  # IMAGE [1, H, W, 3]
        module = self.accelerator.unwrap_model(self.module)
        module.eval()  # no LoRA dropout
        try:
            patched = self.bundle.with_patch(SubjectReferencePatch(encode_reference(self.bundle, image),
                                                                   vae_scale=self.spec.vae_scale))
            videos = self.validation_videos(patched, step, image=image if self.spec.i2v else None)
        finally:
            module.train()
        if c.validation_clip_vision:
            if getattr(self, "validation_clip", None) is None:
                from ..models.clip_vision import load_clip_vision

                self.validation_clip = load_clip_vision(c.validation_clip_vision)
            self.log_validation_metrics(step, self.clip_i_metrics(self.validation_clip, videos, image))

    def before_optimizer_step(self, step: int) -> None:
        """With ``conflict_monitor=training``: keep this step's (all-reduced, unclipped) LoRA gradient as the
        latest gradient of its task."""
        if self.config.conflict_monitor != "training" or not self.config.conflict_steps:
            return
        lora = self.accelerator.unwrap_model(self.module).lora
        grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in lora.parameters() if p.requires_grad]
        self.latest_gradient[self.task_of(step)] = torch.cat(grads).float().cpu()

    def after_step(self, step: int, logs: dict) -> None:
        c = self.config
        if not (c.conflict_steps and step % c.conflict_steps == 0 and self.accelerator.is_main_process):
            return
        if c.conflict_monitor == "training":
            if len(self.latest_gradient) < 2:
                return  # one task has not had a step yet
            g_img, g_vid = self.latest_gradient[IMAGE], self.latest_gradient[VIDEO]
            cos = torch.nn.functional.cosine_similarity(g_img.double(), g_vid.double(), dim=0).item()
        else:
            if not hasattr(self, "probes"):
                data = self.dataset()
                self.probes = (self.collate([data[IMAGE][0]], IMAGE), self.collate([data[VIDEO][0]], VIDEO))
            cos = self.gradient_cosine(*self.probes)
        self.conflicts.append((step, cos))
        logs["grad_cosine"] = cos

    def export(self, path: str) -> None:
        lora = self.accelerator.unwrap_model(self.module).lora
        self.spec.export_lora(path, lora.layers(), {"method": "subject_replay", "subject_lora_scope": "reference",
                                                    "rank": lora.rank, "alpha": lora.alpha, "steps": self.step})

    def finish(self) -> None:
        if self.conflicts:
            from .plots import line_plot_png

            steps, values = zip(*self.conflicts)
            source = "fixed probe batches" if self.config.conflict_monitor == "probes" else "latest training steps"
            line_plot_png(os.path.join(self.config.output_dir, "grad_conflict.png"), steps, values,
                          title=f"cos(g_img, g_vid) on {source}", ylabel="cosine")
            with open(os.path.join(self.config.output_dir, "grad_conflict.json"), "w") as f:
                json.dump([{"step": s, "cosine": v} for s, v in self.conflicts], f)


def random_frame_index(num_frames: int, generator: torch.Generator) -> int:
    """The replay reference frame i ~ U(1, T) (1-based, as the paper writes it)."""
    return int(torch.randint(1, num_frames + 1, (1,), generator=generator))


class PairDataset(TrainingDataset):
    """S2I pairs: reference = source image, target = one-frame 'video', caption with <cls> first."""

    def __init__(self, trainer):
        super().__init__(trainer, trainer.pairs, trainer.inputs["buckets"][IMAGE])
        self.tokenizer = trainer.tokenizer

    def pick(self, index: int, sampling: str | None = None) -> dict:
        return super().pick(index, "uniform")

    def caption_of(self, index: int) -> str:
        caption = self.samples[index].caption
        return caption if caption.startswith(CLS_TOKEN) else f"{CLS_TOKEN} {caption}"

    def cache_specs(self, index: int):
        s, pick = self.samples[index], self.pick(index)
        return [dict(path=s.media, **pick), dict(path=s.extra["src"], **pick)], [self.caption_of(index)]

    def __getitem__(self, index):
        s, g, pick = self.samples[index], self.generator(index), self.pick(index)
        ref = self.trainer.media("reference", s.extra["src"], generator=g, mode=True, **pick)
        ref = {k: v[0] if k == "reference" else v[:, 0] for k, v in ref.items()}  # one frame: [3, H, W] | [C, h, w]
        return {**self.trainer.media("target", s.media, generator=g, **pick), **ref,
                **self.trainer.caption(self.caption_of(index), self.tokenizer)}


class ReplayDataset(TrainingDataset):
    """Unpaired videos: a random frame (i ~ U(1, T)) of the clip is the reference."""

    def __init__(self, trainer):
        super().__init__(trainer, trainer.videos, trainer.inputs["buckets"][VIDEO])
        self.tokenizer = trainer.tokenizer

    def cache_specs(self, index: int):
        s, pick = self.samples[index], self.pick(index)
        return [dict(path=s.media, **pick), dict(path=s.media, per_frame=True, **pick)], [s.caption]

    def __getitem__(self, index):
        s, g, pick = self.samples[index], self.generator(index), self.pick(index)
        item = {**self.trainer.media("target", s.media, generator=g, **pick),
                **self.trainer.caption(s.caption, self.tokenizer)}
        frame = random_frame_index(pick["num_frames"], g) - 1
        if "target" in item:
            item["reference"] = item["target"][frame]
        else:  # cached: the reference and the I2V first frame, each encoded alone as an image
            item["reference_latents"] = self.trainer.media("reference", s.media, generator=g, per_frame=True, mode=True,
                                                           **pick)["reference_latents"][frame]
            first = self.trainer.media("first", s.media, generator=g, per_frame=True, **pick)["first_latents"]
            item["first_frame_latents"] = first[:1].transpose(0, 1)  # [C, 1, h, w]
        return item


def main(argv=None) -> int:
    from .presets import build_tiny_subject

    return cli_main(SubjectReplayTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_subject,
                    use_hint="copy it to ComfyUI/models/loras/ and load it with 'Subject Reference LoRA Loader'")


if __name__ == "__main__":
    raise SystemExit(main())
