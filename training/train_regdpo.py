"""Reg-DPO: SFT-regularised DPO LoRA training on GT-Pairs: ``python -m training.train_regdpo``.

Loss per pair (arXiv 2511.01450, Eq. 6): ``−log σ(−β·s) + r·err_θ(w)`` with
``s = (err_θ(w) − err_ref(w)) − (err_θ(l) − err_ref(l))``, err = mean v-prediction MSE of a sample,
``DGR = β(1 − σ(−β·s))`` and by default ``r = DGR`` (detached). **β convention:** β multiplies s
directly (there is no 0.5 factor), default 500. Winner and loser share noise and timestep and, by
default, one forward (pair-parallel). The reference is the same transformer with the LoRA switched
off under ``no_grad`` — no second copy. Logged every step: DGR, r, DGR+r, Win Gap, Lose Gap, s,
L_DPO, implicit accuracy (share of pairs with s < 0).

Data: the pair manifest written by ``python -m training.build_gt_pairs`` (winner = real video,
loser = the base model's video from the same first frame and prompt). Export: a diffusers-format
LoRA (alpha baked) for the CogVideoX LoRA Loader node and diffusers' ``load_lora_weights``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..models.lora import TrainableLora, find_lora_targets, save_lora
from .config import TrainConfig, doc
from .losses import per_sample_mse, regdpo_loss
from .trainer import Trainer, TrainingDataset, TrainingModule, cli_main

MODES = ("regdpo", "fixed", "dpo", "sft")


@dataclass
class RegDPOTrainConfig(TrainConfig):
    learning_rate: float = doc(5e-6, "Peak learning rate (the paper's 5e-6).")
    batch_size: int = doc(1, "GT-Pairs per device per micro-step.")
    beta: float = doc(500.0, "β; multiplies s directly (no 0.5 factor).")
    mode: str = doc("regdpo", "regdpo: r = DGR (detached, dynamic); fixed: r = --r; dpo: r = 0 (vanilla "
                              "Diffusion-DPO); sft: only the winner's error.", choices=MODES)
    r: float = doc(0.0, "The SFT weight for mode=fixed.")
    lora_rank: int = doc(16, "LoRA rank.")
    lora_alpha: float = doc(32.0, "LoRA alpha (scale alpha/rank, baked into the exported lora_B).")
    lora_targets: list = doc(["to_q", "to_k", "to_v", "to_out.0"], "Modules the LoRA adapts.")
    pair_parallel: bool = doc(True, "Winner and loser in one forward (batch 2B) instead of two.")
    reference_model: str = doc("lora_disabled", "lora_disabled: the reference is the same transformer with the "
                               "LoRA off (no copy); copy: a frozen copy (more memory, for comparison).",
                               choices=("lora_disabled", "copy"))
    tiny_demo: bool = doc(False, "Generate a tiny model and synthetic GT-Pairs under output_dir and train on "
                                 "them (set by --preset tiny).")


PRESETS = {
    "tiny": dict(max_steps=8, learning_rate=1e-3, lr_scheduler="constant", height=32, width=32, num_frames=9,
                 mixed_precision="no", gradient_checkpointing=False, checkpointing_steps=4, report_to="none",
                 lora_rank=4, lora_alpha=8.0, output_dir="runs/regdpo-tiny", tiny_demo=True),
}


class RegDPOModule(TrainingModule):
    """The LoRA; ``frozen["reference"]`` is the frozen copy when ``reference_model=copy``."""

    def __init__(self, lora: TrainableLora, spec, config: RegDPOTrainConfig, **frozen):
        super().__init__(spec, config, **frozen)
        self.lora = lora

    def pair_predictions(self, transformer, noisy_w, noisy_l, text, t, image_latents):
        predict = self.spec.predict
        if self.config.pair_parallel:
            both = predict(torch.cat([noisy_w, noisy_l]), torch.cat([text, text]), torch.cat([t, t]),
                           None if image_latents is None else torch.cat([image_latents] * 2), transformer)
            return both.chunk(2)
        return (predict(noisy_w, text, t, image_latents, transformer),
                predict(noisy_l, text, t, image_latents, transformer))

    def forward(self, batch: dict, generator: torch.Generator):
        c = self.config
        out = self.outputs(batch, generator)
        return regdpo_loss(per_sample_mse(out["pred_w"], out["target_w"]), per_sample_mse(out["pred_l"], out["target_l"]),
                           per_sample_mse(out["ref_w"], out["target_w"]), per_sample_mse(out["ref_l"], out["target_l"]),
                           beta=c.beta, mode=c.mode, r=c.r)

    def outputs(self, batch: dict, generator: torch.Generator) -> dict:
        """v-predictions of the model and the reference for winner and loser, and their targets."""
        c, spec = self.config, self.spec
        x_w = spec.pad_frames(spec.video_latents(batch, generator, "winner"))
        x_l = spec.pad_frames(spec.video_latents(batch, generator, "loser"))
        text = spec.text_embeds(batch)
        image_latents = spec.image_condition(batch.get("first_frame"), x_w.shape[1], generator,
                                             batch.get("first_frame_latents")) if spec.i2v else None
        noise, t, noisy_w = spec.add_noise(x_w, generator)  # winner and loser share noise and timestep
        noisy_l = spec.scheduler.add_noise(x_l, noise, t)
        target_w, target_l = spec.velocity(x_w, noise, t), spec.velocity(x_l, noise, t)
        pred_w, pred_l = self.pair_predictions(spec.transformer, noisy_w, noisy_l, text, t, image_latents)
        with torch.no_grad():
            if c.reference_model == "copy":
                ref_w, ref_l = self.pair_predictions(self.frozen["reference"], noisy_w, noisy_l, text, t, image_latents)
            else:
                with self.lora.disabled():
                    ref_w, ref_l = self.pair_predictions(spec.transformer, noisy_w, noisy_l, text, t, image_latents)
        return {"pred_w": pred_w, "pred_l": pred_l, "ref_w": ref_w, "ref_l": ref_l, "target_w": target_w,
                "target_l": target_l}


class RegDPOTrainer(Trainer):
    config_class = RegDPOTrainConfig
    method = "regdpo"
    required_inputs = {"model_path": "a diffusers CogVideoX folder",
                       "data": "the GT-Pair manifest from training.build_gt_pairs"}

    def validate_inputs(self) -> dict:
        from .inputs import check_manifest, check_media

        inputs, c = super().validate_inputs(), self.config
        pairs = check_manifest(c.data, "--data", columns=("loser",),
                               expected="the GT-Pair manifest of python -m training.build_gt_pairs (rows {winner, "
                                        "loser, caption[, first_frame]})")
        check_media(pairs, "--data", num_frames=c.num_frames, keys=("media", "loser"), videos_only=True)
        check_media(pairs, "--data", num_frames=1, keys=("first_frame",))
        return {**inputs, "pairs": pairs}

    def build(self) -> torch.nn.Module:
        c = self.config
        self.pairs = self.inputs["pairs"]
        spec = self.load_base()
        bundle, frozen = self.bundle, {}
        if c.reference_model == "copy":
            frozen["reference"] = copy.deepcopy(bundle.transformer).requires_grad_(False)
        torch.manual_seed(c.seed)
        lora = TrainableLora(bundle.transformer, find_lora_targets(bundle.transformer, c.lora_targets), c.lora_rank,
                             c.lora_alpha).to(self.device)
        self.undo_lora = lora.apply(bundle.transformer)
        return RegDPOModule(lora, spec, c, **frozen)

    def dataset(self):
        return PairDataset(self)

    def export(self, path: str) -> None:
        lora = self.accelerator.unwrap_model(self.module).lora
        save_lora(path, lora.layers(), {"method": "regdpo", "mode": self.config.mode, "beta": self.config.beta,
                                        "rank": lora.rank, "alpha": lora.alpha, "steps": self.step})


class PairDataset(TrainingDataset):
    """Winner and loser clips (their first ``num_frames``), the caption, and the first frame (the row's
    ``first_frame`` image, else the winner's first frame) for I2V models."""

    def __init__(self, trainer):
        super().__init__(trainer, trainer.pairs)
        self.tokenizer, self.i2v = trainer.bundle.tokenizer, trainer.spec.i2v

    def picks(self, index: int) -> list[tuple[str, str, int]]:
        """(batch key, path, frames) of each medium item ``index`` reads."""
        s, c = self.samples[index], self.config
        picks = [("winner", s.media, c.num_frames), ("loser", s.extra["loser"], c.num_frames)]
        if self.i2v:
            picks.append(("first_frame", s.extra.get("first_frame") or s.media, 1))
        return picks

    def cache_specs(self, index: int):
        c = self.config
        return ([dict(path=path, num_frames=n, height=c.height, width=c.width, sampling="start")
                 for _, path, n in self.picks(index)], [self.samples[index].caption])

    def __getitem__(self, index):
        c, s, g = self.config, self.samples[index], self.generator(index)
        item = self.trainer.caption(s.caption, self.tokenizer)
        for key, path, n in self.picks(index):
            item.update(self.trainer.media(key, path, num_frames=n, height=c.height, width=c.width, sampling="start",
                                           generator=g))
        if "first_frame" in item:
            item["first_frame"] = item["first_frame"][0]  # [3, H, W]
        return item


def main(argv=None) -> int:
    from .presets import build_tiny_regdpo

    return cli_main(RegDPOTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_regdpo,
                    use_hint="copy it to ComfyUI/models/loras/ and load it with 'CogVideoX LoRA Loader'")


if __name__ == "__main__":
    raise SystemExit(main())
