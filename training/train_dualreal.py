"""Train DualReal's identity and motion adapters jointly: ``python -m training.train_dualreal``.

Each optimizer step is a motion step with probability γ (``motion_prob``, 0.5) and an identity
step otherwise. Identity data: subject images (single frames) with prompts like ``a dog *``;
motion data: clips with a prompt. Both adapter sets and the StageBlender run forward every step;
before the optimizer step the gradients of the other dimension's adapters are dropped (set to None,
so AdamW leaves those weights untouched), while the controller learns from both. The motion
adapters are conditioned on the CLIP ViT-H/14 embedding of a reference image of the subject.
Loss: CogVideoX's v-prediction loss (x0 space, weight 1/(1−ᾱ)). Defaults from the paper: AdamW
lr 1e-3, 1000 steps, bf16. Export: ``dualreal.safetensors`` for the DualReal StageBlender node
(official ``adapter.pth`` key names).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from ..models.clip_vision import image_embeds, load_clip_vision
from ..models.cogvideox import base_model_of
from ..models.dualreal import (
    DualRealAdapters,
    DualRealConfig,
    check_groups,
    inject_dualreal,
    load_dualreal,
    save_dualreal,
)
from .config import InputError, TrainConfig, doc
from .data import first_frame, load_frame
from .losses import v_prediction_loss
from .trainer import TaskSwitchingTrainer, TrainingDataset, TrainingModule, cli_main

IDENTITY, MOTION = "identity", "motion"


@dataclass
class DualRealTrainConfig(TrainConfig):
    learning_rate: float = doc(1e-3, "Peak learning rate (the paper's 1e-3).")
    identity_data: str = doc("", "Subject images with prompts (metadata.jsonl or images.txt + prompts.txt), "
                                 "e.g. 'a dog *'.")
    motion_prob: float = doc(0.5, "γ: probability that a step is a motion step.")
    identity_batch_size: int = doc(1, "Subject images per device per micro-step of an identity step (official "
                                      "recipe: 1).")
    motion_batch_size: int = doc(3, "Clips per device per micro-step of a motion step (official recipe: 3).")
    reference_image: str = doc("", "Image of the subject whose CLIP embedding conditions the motion adapters of "
                                   "validation videos (default: the first identity image). Training conditions "
                                   "each motion step on a random frame of its clip, identity steps on nothing.")
    frame_sampling: str = doc("start", "How frames are picked from longer videos: start (the official recipe: the "
                                       "first num_frames contiguous frames) | uniform | random.",
                              choices=("uniform", "start", "random"))
    lr_scheduler: str = doc("cosine_with_restarts", "constant | constant_with_warmup | linear | cosine | "
                            "cosine_with_restarts (the official recipe).",
                            choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"))
    lr_warmup_steps: int = doc(200, "Linear warm-up steps (the official recipe: 200).")
    use_8bit_adam: bool = doc(importlib.util.find_spec("bitsandbytes") is not None,
                              "8-bit AdamW from bitsandbytes, as the official recipe (CUDA only); the default is on "
                              "when bitsandbytes is installed.")
    clip_vision: str = doc("", "CLIP vision model file/folder for the motion condition (OpenCLIP ViT-H/14).")
    hidden_dim: int = doc(64, "Adapter bottleneck width.")
    n_groups: int = doc(0, "StageBlender block groups; must divide the block count (0 = groups of 6 blocks, i.e. 7 "
                           "for the 5B; else the largest divisor up to num_layers // 6).")
    init_from: str = doc("", "Start from a DualReal adapter (.safetensors or the official adapter.pth).")
    tiny_demo: bool = doc(False, "Generate tiny random models and synthetic data under output_dir and train on "
                                 "them (set by --preset tiny). It fills model_path, data, identity_data and "
                                 "clip_vision, so those cannot be set with it (--no-tiny_demo keeps the preset's "
                                 "other settings for your own files).",
                          generates=("model_path", "data", "identity_data", "clip_vision"))


PRESETS = {
    "paper": dict(learning_rate=1e-3, max_steps=1000, mixed_precision="bf16", num_frames=49, height=480, width=720,
                  identity_batch_size=1, motion_batch_size=3),
    "tiny": dict(max_steps=10, learning_rate=1e-3, lr_scheduler="constant", lr_warmup_steps=0, height=32, width=32,
                 num_frames=9, motion_batch_size=2, mixed_precision="no", gradient_checkpointing=False,
                 checkpointing_steps=5, report_to="none", output_dir="runs/dualreal-tiny", tiny_demo=True),
}


class DualRealTrainingModule(TrainingModule):
    """The adapters; ``frozen["clip"]`` embeds the motion condition."""

    def __init__(self, adapters: DualRealAdapters, spec, config, **frozen):
        super().__init__(spec, config, **frozen)
        self.adapters = adapters

    def forward(self, batch: dict, generator: torch.Generator):
        spec = self.spec
        latents = spec.pad_frames(spec.video_latents(batch, generator))
        text = spec.text_embeds(batch)
        noise, t, noisy = spec.add_noise(latents, generator)
        condition = None  # identity steps: no motion condition (as the official recipe)
        if "condition_image" in batch:  # motion steps: the CLIP embedding of a random frame of each clip
            with torch.no_grad():
                condition = image_embeds(self.frozen["clip"], batch["condition_image"])[:, None].to(spec.dtype)
        undo, state = inject_dualreal(spec.transformer, self.adapters, condition, record=False)
        try:
            v = spec.forward(noisy, text, t)
        finally:
            undo()
        loss = v_prediction_loss(spec.x0(noisy, v, t), latents, spec.loss_weights(t)).mean()
        return loss, {f"loss_{batch['kind']}": loss.detach(), "alpha_mean": state.alpha.mean().detach()}


class DualRealTrainer(TaskSwitchingTrainer):
    config_class = DualRealTrainConfig
    method = "dualreal"
    title = "DualReal"
    tasks = (IDENTITY, MOTION)
    task_batch_sizes = {IDENTITY: "identity_batch_size", MOTION: "motion_batch_size"}
    required_inputs = {"model_path": "a diffusers CogVideoX folder", "identity_data": "subject images",
                       "data": "motion clips", "clip_vision": "CLIP ViT-H/14 vision model"}

    @property
    def switch_prob(self) -> float:
        return self.config.motion_prob

    def sequence_shapes(self) -> list:
        c = self.config
        return [(1, c.height, c.width), (c.num_frames, c.height, c.width)]  # identity images, motion clips

    def validate_inputs(self) -> dict:
        from .inputs import check_manifest, check_media, check_path, check_text_to_video

        inputs, c = super().validate_inputs(), self.config
        check_text_to_video(inputs["transformer_config"], "DualReal")
        identity = check_manifest(c.identity_data, "--identity_data", expected="subject images with prompts")
        check_media(identity, "--identity_data", num_frames=1)
        motion = check_manifest(c.data, "--data", expected="motion clips with prompts")
        check_media(motion, "--data", num_frames=self.checked_frames, videos_only=True)
        identity, identity_buckets = self.assign_buckets(identity, "--identity_data", images=True)
        motion, motion_buckets = self.assign_buckets(motion, "--data")
        check_path(c.clip_vision, "--clip_vision", "CLIP vision model", folder=None)
        if c.reference_image:
            check_path(c.reference_image, "--reference_image", "reference image")
        if c.init_from:
            check_path(c.init_from, "--init_from", "DualReal adapter")
        if c.n_groups:
            try:
                check_groups(inputs["transformer_config"]["num_layers"], c.n_groups)
            except ValueError as e:
                raise InputError(f"--n_groups: {e}") from None
        return {**inputs, "identity": identity, "motion": motion,
                "buckets": {IDENTITY: identity_buckets, MOTION: motion_buckets}}

    def reference_condition(self, clip) -> torch.Tensor:
        """The CLIP image embedding [1, 1, C] of the reference image (validation videos), preprocessed by the same
        function as the StageBlender node (``clip_vision.clip_pixels``: centre crop, resize)."""
        c = self.config
        image = first_frame(c.reference_image or self.inputs["identity"][0].media)
        image = torch.from_numpy(image).float()[None] / 255.0  # a ComfyUI IMAGE [1, H, W, 3] in 0..1
        return image_embeds(clip, image)[:, None]

    def build(self) -> torch.nn.Module:
        c = self.config
        self.identity, self.motion = self.inputs["identity"], self.inputs["motion"]
        spec = self.load_base()
        bundle = self.bundle
        clip = load_clip_vision(c.clip_vision).to(self.device).eval().requires_grad_(False)
        condition_dim = clip.config.projection_dim
        if c.init_from:
            adapters = load_dualreal(c.init_from).requires_grad_(True)
        else:
            adapters = DualRealAdapters(DualRealConfig.for_transformer(
                bundle.transformer, hidden_dim=c.hidden_dim, condition_dim=condition_dim,
                n_groups=c.n_groups or None))
        adapters.check_compatible(bundle.transformer)
        # trained on from here: the export records this model (files from before the record had none)
        adapters.config = dataclasses.replace(adapters.config, base_model=base_model_of(bundle.transformer))
        self.adapters = adapters.train()
        self.clip = clip
        return DualRealTrainingModule(adapters, spec, c, clip=clip)

    def dataset(self):
        buckets = self.inputs["buckets"]
        return {IDENTITY: FramesDataset(self, self.identity, buckets[IDENTITY]),
                MOTION: FramesDataset(self, self.motion, buckets[MOTION])}

    def collate(self, items: list, kind: str = IDENTITY) -> dict:
        return {"kind": kind, **{k: torch.stack([it[k] for it in items]) for k in items[0]}}

    def validate(self, step: int) -> None:
        """Validation videos with the adapters, conditioned on the reference image; their CLIP-I to it is logged
        (``validation/clip_i``; the motion condition's CLIP model scores)."""
        c = self.config
        if not c.validation_prompts:
            return
        from ..models.dualreal import DualRealPatch
        from .data import first_frame

        adapters = self.accelerator.unwrap_model(self.module).adapters
        adapters.eval()
        try:
            patch = DualRealPatch(adapters, self.reference_condition(self.clip))
            videos = self.validation_videos(self.bundle.with_patch(patch), step)
        finally:
            adapters.train()
        image = torch.from_numpy(first_frame(c.reference_image or self.inputs["identity"][0].media)).float()[None] / 255
        self.log_validation_metrics(step, self.clip_i_metrics(self.clip, videos, image))

    def before_optimizer_step(self, step: int) -> None:
        """Drop the gradients of the other dimension's adapters: identity steps train the identity
        adapters, motion steps the motion adapters; the controller trains on both."""
        adapters = self.accelerator.unwrap_model(self.module).adapters
        frozen_kind = "motion" if self.task_of(step) == IDENTITY else "id"
        for p in adapters.parameters_of(frozen_kind):
            p.grad = None

    def export(self, path: str) -> None:
        save_dualreal(path, self.accelerator.unwrap_model(self.module).adapters, {"steps": self.step})


class FramesDataset(TrainingDataset):
    """Identity images (1 frame) or motion clips (their bucket's frames), the caption, and for clips one of their
    frames (an IMAGE [H, W, 3] in 0..1) whose CLIP embedding conditions the motion adapters."""

    def __init__(self, trainer, samples, buckets):
        super().__init__(trainer, samples, buckets)
        self.tokenizer = trainer.bundle.tokenizer

    def cache_specs(self, index: int):
        s = self.samples[index]
        return [dict(path=s.media, **self.pick(index))], [s.caption]

    def __getitem__(self, index):
        s, g, frames = self.samples[index], self.generator(index), self.buckets[index].frames
        item = {**self.trainer.media("pixels", s.media, generator=g, **self.pick(index)),
                **self.trainer.caption(s.caption, self.tokenizer)}
        if frames > 1:  # a motion clip: one of its frames for the condition
            frame = int(torch.randint(0, frames, (1,), generator=g))
            pixels = item["pixels"][frame] if "pixels" in item else load_frame(s.media, position=frame,
                                                                               **self.pick(index))
            item["condition_image"] = pixels.permute(1, 2, 0) * 0.5 + 0.5
        return item


def main(argv=None) -> int:
    from .presets import build_tiny_dualreal

    return cli_main(DualRealTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_dualreal,
                    use_hint="copy it to ComfyUI/models/dualreal/ and load it with 'DualReal StageBlender'")


if __name__ == "__main__":
    raise SystemExit(main())
