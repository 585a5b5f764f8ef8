"""Reg-DPO: SFT-regularised DPO LoRA training on GT-Pairs: ``python -m training.train_regdpo``.

Runs on CogVideoX (v-prediction) and on Wan 2.1 / 2.2 (flow matching; the paper's own base models) through the
model specification (``training/spec.py``); nothing here depends on the base.

Loss per pair (arXiv 2511.01450, Eq. 6): ``−log σ(−β·s) + r·err_θ(w)`` with
``s = (err_θ(w) − err_ref(w)) − (err_θ(l) − err_ref(l))`` and ``err`` the specification's per-sample error of the
prediction against the training target (CogVideoX: the v-prediction; Wan: the velocity ε − x0), ``DGR = β(1 −
σ(−β·s))`` and by default ``r = DGR`` (detached). Winner and loser share noise and timestep (σ) and, by default,
one forward (pair-parallel). The reference is the same transformer with the LoRA switched off under ``no_grad`` —
no second copy. ``--train full`` trains every weight of the transformer(s) instead of a LoRA (fp32 master weights,
AdamW, gradient checkpointing as configured); its reference is a frozen copy of the transformer(s) at the start,
which waits on the CPU and streams to the device block by block for its no-grad forward (the paper's frozen-module
offload; diffusers' group offloading through ``models/placement.py``), or under FSDP is sharded like the trained
weights. Logged every step: DGR, r, DGR+r, Win Gap, Lose Gap, s, L_DPO, implicit accuracy (share of pairs
with s < 0). ``--mode sft`` is plain supervised fine-tuning: one forward over the winners, no loser and no
reference forward.

**β convention:** ``err`` is the MEAN squared error over a sample's N latent elements, and β multiplies s directly
(no 0.5 factor). Default 500, from the paper's grid (100, 500, 1000, 2000). With a summed error (the paper's
‖·‖² written literally) the same update needs β/N; Diffusion-DPO's code (mean error, ``−0.5·β_D·s``) has
β_D = 2β. At step 0 the LoRA is zero: s = 0, L_DPO = ln 2, DGR = β/2.

Data: the pair manifest written by ``python -m training.build_gt_pairs`` (winner = real video, loser = a base
model's video from the same first frame and prompt; rows {winner, loser, caption[, first_frame]}; sft needs
only winner/media and caption). Export: CogVideoX — a diffusers-format LoRA (alpha baked) for the CogVideoX
LoRA Loader node and diffusers' ``load_lora_weights``; Wan — ComfyUI core's Wan LoRA layout for core's LoRA
loaders (and diffusers' Wan loader); Wan 2.2 A14B — one file per expert, ``regdpo_high_noise.safetensors`` and
``regdpo_low_noise.safetensors``. ``--train full`` exports each trained transformer as a diffusers folder
(``regdpo_transformer/transformer/``, Wan 2.2 A14B also ``transformer_2/``: ``from_pretrained`` loads it) and as one
safetensors file for ComfyUI (``regdpo_transformer.safetensors``, A14B one per expert): on Wan in the original Wan
names core's Load Diffusion Model detects, on CogVideoX in diffusers' names for the CogVideoX Model Loader's
``transformer_file``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from dataclasses import dataclass

import torch

from ..models.lora import TrainableLora, find_lora_targets
from .config import InputError, TrainConfig, doc
from .losses import regdpo_loss
from .spec import concat_draws, repeat_condition
from .trainer import Trainer, TrainingDataset, TrainingModule, cli_main

MODES = ("regdpo", "fixed", "dpo", "sft")


@dataclass
class RegDPOTrainConfig(TrainConfig):
    model_path: str = doc("", "Diffusers CogVideoX (1.0/1.5, T2V/I2V) or Wan (2.1 T2V/I2V, 2.2 TI2V-5B, 2.2 "
                              "T2V/I2V A14B) folder.")
    learning_rate: float = doc(5e-6, "Peak learning rate (the paper's 5e-6).")
    batch_size: int = doc(1, "GT-Pairs per device per micro-step.")
    beta: float = doc(500.0, "β of the paper's grid (100, 500, 1000, 2000) for err = the MEAN squared error of a "
                             "sample; β multiplies s directly (no 0.5 factor). A summed error needs β/N; "
                             "Diffusion-DPO's −0.5·β_D convention has β_D = 2β.")
    mode: str = doc("regdpo", "regdpo: r = DGR (detached, dynamic); fixed: r = --r; dpo: r = 0 (vanilla "
                              "Diffusion-DPO); sft: supervised fine-tuning on the winners only (no loser, no "
                              "reference forward).", choices=MODES)
    r: float = doc(0.0, "The SFT weight for mode=fixed.")
    lora_rank: int = doc(16, "LoRA rank (the paper: 16).")
    lora_alpha: float = doc(32.0, "LoRA alpha (the paper: 32; scale alpha/rank).")
    lora_targets: list = doc([], "Modules the LoRA adapts (names PEFT-style); empty: the base's default — CogVideoX "
                                 "to_q to_k to_v to_out.0; Wan to_q to_k to_v to_out.0 ffn.net.0.proj ffn.net.2 of "
                                 "both attentions (original names self_attn/cross_attn q k v o, ffn.0, ffn.2).")
    pair_parallel: bool = doc(True, "Winner and loser in one forward (batch 2B) instead of two.")
    train: str = doc("lora", "lora: train a LoRA per transformer (lora_rank, lora_alpha, lora_targets); full: every "
                             "weight of the transformer(s) (Wan 2.2 A14B: each trained expert), fp32 master weights "
                             "with AdamW, exported as a diffusers transformer folder and one safetensors file "
                             "ComfyUI loads.", choices=("lora", "full"))
    reference_model: str = doc("auto", "auto: lora_disabled with --train lora, copy with --train full; "
                               "lora_disabled: the reference is the same transformer with the LoRA off (no copy); "
                               "copy: a frozen copy of the transformer(s) at the start.",
                               choices=("auto", "lora_disabled", "copy"))
    reference_offload: bool = doc(True, "The frozen reference copy waits on the CPU and streams to the device block "
                                        "by block for its no-grad forward (the paper's frozen-module offload); under "
                                        "FSDP it is sharded instead. --no-reference_offload keeps it on the device.")
    tiny_demo: bool = doc(False, "Generate a tiny model and synthetic GT-Pairs under output_dir and train on "
                                 "them (set by --preset tiny). It fills model_path and data, so those cannot be "
                                 "set with it (--no-tiny_demo keeps the preset's other settings for your own "
                                 "files).", generates=("model_path", "data"))


PRESETS = {
    "tiny": dict(max_steps=8, learning_rate=1e-3, lr_scheduler="constant", height=32, width=32, num_frames=9,
                 mixed_precision="no", gradient_checkpointing=False, checkpointing_steps=4, report_to="none",
                 lora_rank=4, lora_alpha=8.0, output_dir="runs/regdpo-tiny", tiny_demo=True),
}


def reference_kind(config: RegDPOTrainConfig) -> str:
    """``copy`` or ``lora_disabled``: ``reference_model`` with ``auto`` resolved (copy for ``--train full``)."""
    if config.reference_model != "auto":
        return config.reference_model
    return "copy" if config.train == "full" else "lora_disabled"


def loaded_dtype(module: torch.nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype diffusers' ``from_pretrained(torch_dtype=dtype)`` gives ``module``'s tensor ``name``: ``dtype``,
    except for non-floating tensors and those of the modules the class keeps in float32 (``_keep_in_fp32_modules``)."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return dtype if tensor.is_floating_point() and not keep & set(name.split(".")) else tensor.dtype


def frozen_copy(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen copy of ``transformer``; with ``dtype``, in that dtype as diffusers' ``from_pretrained(torch_dtype=
    dtype)`` loads it (:func:`loaded_dtype`)."""
    copy_ = copy.deepcopy(transformer).requires_grad_(False)
    if dtype is None:
        return copy_
    for name, p in copy_.named_parameters():
        p.data = p.data.to(loaded_dtype(copy_, name, p, dtype))
    return copy_


class RegDPOModule(TrainingModule):
    """One LoRA per trained transformer (``loras``, in the specification's ``transformers`` order), or with
    ``--train full`` the transformers themselves (``transformers``: their weights are this module's parameters);
    ``frozen["reference"]`` holds frozen copies of the transformers when the reference is a copy."""

    def __init__(self, loras: list[TrainableLora], spec, config: RegDPOTrainConfig, trained=(), **frozen):
        super().__init__(spec, config, **frozen)
        self.loras = torch.nn.ModuleList(loras)
        if trained:
            self.transformers = torch.nn.ModuleList(trained)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy for the block: the same transformers with every LoRA off."""
        with contextlib.ExitStack() as stack:
            for lora in self.loras:
                stack.enter_context(lora.disabled())
            yield

    def predictions(self, noisy: list, condition: dict, draw, transformers=None) -> list:
        """The predictions for each of ``noisy`` (winner[, loser]) with the shared condition and noise draw: one
        forward over all of them (pair-parallel) or one each."""
        spec = self.spec
        if self.config.pair_parallel and len(noisy) > 1:
            n = len(noisy)
            both = spec.predict(torch.cat(noisy), repeat_condition(condition, n), concat_draws([draw] * n),
                                transformers)
            return list(both.chunk(n))
        return [spec.predict(x, condition, draw, transformers) for x in noisy]

    def forward(self, batch: dict, generator: torch.Generator):
        c, spec = self.config, self.spec
        out = self.outputs(batch, generator)
        err_w = spec.error(out["pred_w"], out["target_w"])
        if c.mode == "sft":
            return err_w.mean(), {"err_w": err_w.mean().detach()}
        return regdpo_loss(err_w, spec.error(out["pred_l"], out["target_l"]), spec.error(out["ref_w"], out["target_w"]),
                           spec.error(out["ref_l"], out["target_l"]), beta=c.beta, mode=c.mode, r=c.r)

    def outputs(self, batch: dict, generator: torch.Generator) -> dict:
        """Predictions of the model (and, except for sft, of the reference) for winner and loser, and their targets;
        winner and loser share the condition, the noise and the timestep."""
        c, spec = self.config, self.spec
        sft = c.mode == "sft"
        clean = [spec.latents(batch, generator, "winner")] + ([] if sft else [spec.latents(batch, generator, "loser")])
        condition = spec.condition(batch, generator, clean[0])
        draw = spec.draw_noise(clean[0], generator)
        noisy = [spec.noisy(x, draw) for x in clean]
        names = ("w", "l")
        out = {f"target_{k}": spec.target(x, draw) for k, x in zip(names, clean)}
        out.update({f"pred_{k}": p for k, p in zip(names, self.predictions(noisy, condition, draw))})
        if sft:
            return out
        with torch.no_grad():
            if reference_kind(c) == "copy":
                ref = self.predictions(noisy, condition, draw, self.frozen["reference"])
            else:
                with self.reference():
                    ref = self.predictions(noisy, condition, draw)
        out.update({f"ref_{k}": p for k, p in zip(names, ref)})
        return out


class RegDPOTrainer(Trainer):
    config_class = RegDPOTrainConfig
    method = "regdpo"
    required_inputs = {"model_path": "a diffusers CogVideoX or Wan folder",
                       "data": "the GT-Pair manifest from training.build_gt_pairs"}
    supported_bases = ("cogvideox", "wan")
    title = "Reg-DPO"

    def validate_inputs(self) -> dict:
        from .inputs import check_manifest, check_media

        inputs, c = super().validate_inputs(), self.config
        if c.train == "full" and c.reference_model == "lora_disabled":
            raise InputError("--train full --reference_model lora_disabled: a full-parameter run has no LoRA to switch "
                             "off; use --reference_model copy (or auto)")
        clips = ("media",) if c.mode == "sft" else ("media", "loser")
        if c.mode == "sft":
            pairs = check_manifest(c.data, "--data", expected="videos with captions (a GT-Pair manifest's winners)")
        else:
            pairs = check_manifest(c.data, "--data", columns=("loser",),
                                   expected="the GT-Pair manifest of python -m training.build_gt_pairs (rows {winner, "
                                            "loser, caption[, first_frame]}); --mode sft trains on winners alone")
        check_media(pairs, "--data", num_frames=self.checked_frames, keys=clips, videos_only=True)
        check_media(pairs, "--data", num_frames=1, keys=("first_frame",))
        pairs, buckets = self.assign_buckets(pairs, "--data", keys=clips)  # winner and loser: one bucket
        return {**inputs, "pairs": pairs, "buckets": buckets}

    def build(self) -> torch.nn.Module:
        c = self.config
        self.pairs = self.inputs["pairs"]
        spec = self.load_base()
        frozen = {}
        if reference_kind(c) == "copy" and c.mode != "sft":
            frozen["reference"] = [frozen_copy(t, self.weight_dtype if c.train == "full" else None)
                                   for t in spec.transformers]
        if c.train == "full":
            return RegDPOModule([], spec, c, [t.requires_grad_(True).train() for t in spec.transformers], **frozen)
        torch.manual_seed(c.seed)
        targets = c.lora_targets or list(spec.default_lora_targets)
        loras = [TrainableLora(t, find_lora_targets(t, targets), c.lora_rank, c.lora_alpha).to(self.device)
                 for t in spec.transformers]
        self.undo_lora = [lora.apply(t) for lora, t in zip(loras, spec.transformers)]
        return RegDPOModule(loras, spec, c, **frozen)

    def shard_frozen_model(self, module: torch.nn.Module) -> None:
        """Under FSDP the reference copies join the wrapped module (sharded, one unit per block, like the trained
        transformers); otherwise, with ``reference_offload``, they wait on the CPU and stream to the device block by
        block for their forward (``models/placement.py``'s ``block`` streaming: diffusers' group offloading)."""
        from accelerate.utils import DistributedType

        from ..models.placement import Placement

        super().shard_frozen_model(module)
        copies = module.frozen.get("reference")
        if not copies:
            return
        if self.accelerator.distributed_type == DistributedType.FSDP:
            module.reference_copies = torch.nn.ModuleList(copies)
        elif self.config.reference_offload:
            self.reference_placement = Placement(self.device, "cpu", "block")
            for transformer in copies:
                self.reference_placement.add(transformer, stream="block")

    def before_export(self) -> None:
        """``--train full`` under FSDP: every rank takes part in gathering the full weights for the export."""
        from accelerate.utils import DistributedType

        if self.config.train == "full" and self.accelerator.distributed_type == DistributedType.FSDP:
            self.full_state_dict = self.accelerator.get_state_dict(self.module)

    def context_parallel_models(self, module) -> list:
        """The trained transformers and, with ``--reference_model copy``, their frozen copies."""
        frozen = self.accelerator.unwrap_model(module).frozen
        return list(self.spec.transformers) + list(frozen.get("reference", []))

    def dataset(self):
        return PairDataset(self)

    def export_name(self) -> str:
        return f"{self.method}_transformer.safetensors" if self.config.train == "full" else super().export_name()

    def export(self, path: str) -> list[str]:
        """One file per trained transformer (``path``, or ``<stem>_high_noise`` / ``_low_noise`` for Wan 2.2 A14B);
        ``--train full``: :meth:`export_full`."""
        if self.config.train == "full":
            return self.export_full(path)
        module, c = self.accelerator.unwrap_model(self.module), self.config
        folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
        written = []
        for lora, expert, name in zip(module.loras, self.spec.expert_names, self.spec.lora_file_names(stem)):
            meta = {"method": "regdpo", "mode": c.mode, "beta": c.beta, "rank": lora.rank, "alpha": lora.alpha,
                    "steps": self.step, **({"expert": expert} if expert else {})}
            written.append(os.path.join(folder, name))
            self.spec.export_lora(written[-1], lora.layers(), meta)
        return written

    def export_full(self, path: str) -> list[str]:
        """Each trained transformer in the mixed-precision dtype (its float32 modules kept so, as ``from_pretrained``
        keeps them): a diffusers folder ``<stem>/<transformer|transformer_2>`` (``save_pretrained``) and one
        safetensors file per transformer (``path``; Wan 2.2 A14B ``<stem>_high_noise`` / ``_low_noise``) in the
        format the base's single-file loader reads (:meth:`~.spec.ModelSpec.export_transformer_file`)."""
        from accelerate import init_empty_weights

        c, spec = self.config, self.spec
        folder, stem = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
        module = self.accelerator.unwrap_model(self.module)
        gathered = getattr(self, "full_state_dict", None)  # under FSDP (before_export)
        written = []
        for i, (transformer, expert, sub, name) in enumerate(zip(module.transformers, spec.expert_names,
                                                                 spec.transformer_folders, spec.lora_file_names(stem))):
            if gathered is not None:
                prefix = f"transformers.{i}."
                state = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
            else:
                state = transformer.state_dict()
            state = {k: v.detach().to("cpu", loaded_dtype(transformer, k, v, self.weight_dtype)).contiguous()
                     for k, v in state.items()}
            with init_empty_weights():
                saved = type(transformer).from_config(transformer.config)
            saved.load_state_dict(state, strict=True, assign=True)
            target = os.path.join(folder, stem, sub)
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            saved.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            meta = {"method": "regdpo", "train": "full", "mode": c.mode, "beta": c.beta, "steps": self.step,
                    **({"expert": expert} if expert else {})}
            spec.export_transformer_file(os.path.join(folder, name), state, meta)
            written += [os.path.join(folder, name), target]
        self.use_hint = ("copy the .safetensors file(s) to ComfyUI/models/diffusion_models/ and load "
                         + ("each with core's 'Load Diffusion Model'" if spec.base == "wan" else
                            "it as the 'CogVideoX Model Loader (MMV)' transformer_file") +
                         "; the folder loads with diffusers' from_pretrained (or replaces the model folder's)")
        return written

class PairDataset(TrainingDataset):
    """Winner and loser clips (their first frames, as many as the pair's bucket has; sft: the winner only), the caption,
    and for image-conditioned models the first frame (the row's ``first_frame`` image, else the winner's first
    frame), all at the bucket's size."""

    def __init__(self, trainer):
        super().__init__(trainer, trainer.pairs, trainer.inputs["buckets"])
        self.image = trainer.spec.image_conditioned
        self.sft = trainer.config.mode == "sft"

    def clips(self, index: int) -> list[tuple[str, str]]:
        """(batch key, path) of each clip item ``index`` reads."""
        s = self.samples[index]
        return [("winner", s.media)] + ([] if self.sft else [("loser", s.extra["loser"])])

    def first_frame(self, index: int) -> str:
        s = self.samples[index]
        return s.extra.get("first_frame") or s.media

    def cache_specs(self, index: int):
        b = self.buckets[index]
        media = [dict(path=path, **b.pick, sampling="start") for _, path in self.clips(index)]
        if self.image:
            media.append(dict(path=self.first_frame(index), height=b.height, width=b.width, image_condition=b.frames))
        return media, [self.samples[index].caption]

    def __getitem__(self, index):
        s, g, b = self.samples[index], self.generator(index), self.buckets[index]
        item = self.trainer.caption(s.caption)
        for key, path in self.clips(index):
            item.update(self.trainer.media(key, path, **b.pick, sampling="start", generator=g))
        if self.image:
            item.update(self.trainer.image_condition(self.first_frame(index), clip_frames=b.frames, height=b.height,
                                                     width=b.width, generator=g))
        return item


def main(argv=None) -> int:
    from .presets import build_tiny_regdpo

    return cli_main(RegDPOTrainer, argv, PRESETS, description=__doc__, build_tiny=build_tiny_regdpo,
                    use_hint="copy it to ComfyUI/models/loras/ and load it with 'CogVideoX LoRA Loader' (CogVideoX) "
                             "or core's 'LoraLoaderModelOnly' (Wan)")


if __name__ == "__main__":
    raise SystemExit(main())
