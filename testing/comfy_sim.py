"""ComfyUI core's own memory manager driving this pack's placements under each launch flag, on a simulated card.

Runs in ComfyUI's Python (``comfy`` importable): :func:`boot` patches ``torch.cuda`` with a
:class:`~.fake_cuda.FakeCuda` of the given size, starts core's ``comfy.model_management`` with the launch flag
(``novram``, ``lowvram``, ``normal`` (none), ``highvram``, ``gpu-only``: ComfyUI's ``--novram`` ...) parsed from the
command line as ``main.py`` does, and every module the pack hands to core then goes through core's real
``load_models_gpu`` / ``free_memory`` / ``ModelPatcher`` code. An :class:`Observer` records, per stage: where each
module of the stage was at the stage's start (streamed, loaded whole or partly by core, and on which device), the
devices the stage's forwards ran on, the bytes on the card, the ``memory_required`` the pack asked core for, and every
unload core made of a module while a stage using it ran.

* :func:`run_tiny` runs the real stages on tiny random models — prompts (T5), the method's encoders (face encoder,
  CLIP vision, the subject reference's VAE encode), sampling with the method's patches, decode — through the nodes'
  loader and placements; tensors compute on the CPU while the card's tensors say they are on ``cuda:0``, so a module
  left on the wrong device fails as it would on a GPU, and the video is compared with the same run headless.
* :func:`plan_5b` places CogVideoX-5B's real sizes (every model built on the meta device, as ``bench/memory.py``
  builds them) and enters each stage without computing: core's decisions at real scale (what it loads whole, partly,
  or evicts on a 12 GiB card), and the figures the pack asks it for.

``python testing/comfy_sim.py COMFYUI FLAG [--card GIB] [--tiny]`` prints one flag's rows (and, for 5B,
bench/memory.py's estimate of the same models) as JSON on a ``RESULT`` line;
``bench/memory.py --flags`` runs every flag and prints the matrix.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import weakref

import torch

GIB = 2**30
FLAGS = ("novram", "lowvram", "normal", "highvram", "gpu-only")  # ComfyUI's --novram ... --gpu-only; normal: none
MODES = ("auto", "none", "model", "sequential", "block")
STACKS = ("base", "magicmirror", "all")  # all: MagicMirror + subject reference + DualReal + LoRA
STACK_METHODS = {"base": (), "magicmirror": ("magicmirror",), "all": ("magicmirror", "subject", "dualreal", "lora")}


def boot(flag: str, card_bytes: int):
    """Start core's model management with ``flag`` on a simulated card of ``card_bytes``; returns ``(card, mm)``."""
    from .fake_cuda import FakeCuda

    card = FakeCuda(card_bytes)
    card.install()
    sys.argv = ["main.py"] + ([] if flag == "normal" else [f"--{flag}"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm

    return card, mm


# ----------------------------------------------------------------------------------------------------- observing


class Observer:
    """Records what core and the placements do, per stage (see the module doc). ``stage`` names the stage now
    running (set by the driver)."""

    def __init__(self, card):
        from comfy.model_patcher import ModelPatcher

        from ..models.placement import Placement
        from ..nodes.host import ComfyModelManager

        self.card, self.stage, self.stages, self.evictions = card, None, {}, []
        self.simulate_activations = False
        self._seen = weakref.WeakSet()  # every module a stage used (for what stays on the card between stages)
        self._bodies: list[dict] = []  # the modules of each stage body running now (their load is done)
        observer = self
        run, load, free = Placement.run, ComfyModelManager.load, ComfyModelManager.free
        unload, detach = ModelPatcher.partially_unload, ModelPatcher.detach

        @contextlib.contextmanager
        def observed_run(placement, *modules, memory_required=0):
            body: dict = {}  # the stage's modules core must not unload: each from its load on, all once it runs
            observer._bodies.append(body)
            activations = None
            try:
                with run(placement, *modules, memory_required=memory_required):
                    try:
                        body.update({id(m): m for m in modules if m is not None})
                        observer._enter(placement, list(body.values()))
                        activations = observer._activations(placement, body.values(), memory_required)
                        yield
                    finally:
                        body.clear()  # (what the stage unloads once it ran is its own business)
            finally:
                body.clear()
                observer._bodies.remove(body)
                del activations

        def observed_load(manager, modules, placement, memory_required):
            observer._row()["asked"].append(("load", int(memory_required)))
            out = load(manager, modules, placement, memory_required)
            if observer._bodies:
                observer._bodies[-1].update({id(m): m for m in modules})
            return out

        def observed_free(manager, memory_required, device, keep=()):
            observer._row()["asked"].append(("free", int(memory_required)))
            return free(manager, memory_required, device, **({"keep": keep} if keep else {}))

        def observed_unload(patcher, device_to, memory_to_free=0):
            observer._unloading(patcher, "partly unloaded")
            return unload(patcher, device_to, memory_to_free)

        def observed_detach(patcher, unpatch_all=True):
            observer._unloading(patcher, "unloaded")
            return detach(patcher, unpatch_all)

        Placement.run, ComfyModelManager.load, ComfyModelManager.free = observed_run, observed_load, observed_free
        ModelPatcher.partially_unload, ModelPatcher.detach = observed_unload, observed_detach
        self._forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._forward)

    def _row(self) -> dict:
        return self.stages.setdefault(self.stage, {"asked": [], "modules": {}, "ran_on": set(), "card": 0,
                                                   "on_card": []})

    def _enter(self, placement, modules) -> None:
        from ..nodes.host import _PATCHER_KEY

        row = self._row()
        row["card"] = max(row["card"], self.card.used())
        for m in modules:
            self._seen.add(m)
        row["on_card"] = sorted({type(m).__name__ for m in self._seen
                                 if any(self.card.on(t) for t in (*m.parameters(), *m.buffers()))})
        for m in modules:
            device, offload = placement.device_of(m), placement.offload_device_of(m)
            if placement.home(m) == "streamed":
                held = "streamed"
            else:
                patcher = m.__dict__.get(_PATCHER_KEY)
                if patcher is None:  # moved by the placement itself (no manager)
                    held = "moved"
                else:
                    loaded, size = patcher.loaded_size(), patcher.model_size()
                    held = "whole" if loaded >= size else "cast" if loaded == 0 else f"part {loaded / size:.0%}"
                    device, offload = patcher.load_device, patcher.offload_device
            row["modules"][type(m).__name__] = {"device": str(device), "offload": str(offload), "held": held}

    def _activations(self, placement, modules, memory_required: int):
        """With ``simulate_activations`` (runs that compute nothing): a card allocation of the stage's activation
        estimate and what its streamed modules hold, for the stage's duration, so a stage that would not fit beside
        the weights core left on the card runs out of memory as it would on a GPU."""
        if not self.simulate_activations or not any(placement.device_of(m).type == "cuda" for m in modules):
            return None
        streamed = placement.streamed_bytes(list(modules))
        block = torch.empty(int(memory_required) + streamed, dtype=torch.uint8, device="meta")
        self.card._mark(block)
        self.card._allocated()
        return block

    def _forward(self, module, args) -> None:
        if self._bodies:
            for a in args:
                if isinstance(a, torch.Tensor):
                    self._row()["ran_on"].add(str(a.device))
                    break

    def _unloading(self, patcher, what: str) -> None:
        module = getattr(patcher.model, "module", None)
        if module is not None and any(id(module) in body for body in self._bodies):
            self.evictions.append({"stage": self.stage, "module": type(module).__name__, "what": what,
                                   "loaded": patcher.loaded_size()})

    def rows(self) -> dict:
        return {stage: dict(row, ran_on=sorted(row["ran_on"])) for stage, row in self.stages.items()}

    def reset(self) -> None:
        self.stages, self.evictions, self.stage = {}, [], None
        self._seen = weakref.WeakSet()


@contextlib.contextmanager
def stage(observer: Observer, name: str):
    previous, observer.stage = observer.stage, name
    try:
        yield
    finally:
        observer.stage = previous


def clear_core(mm) -> None:
    """Unload everything core holds and collect the runs' modules (a module and its ModelPatcher refer to each other)
    between runs."""
    import gc

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


# ----------------------------------------------------------------------------------------------------- tiny models


def _randomised(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval().requires_grad_(False)


def tiny_method_models(transformer) -> dict:
    """The methods' modules for the tiny transformer (the same weights on every call): MagicMirror's adapter and
    face encoder (CLIP + ID perceiver), DualReal's adapters and CLIP vision tower, a LoRA."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    from ..models.dualreal import DualRealAdapters, DualRealConfig
    from ..models.id_encoder import IDEncoder, IDPerceiver, IDPerceiverConfig
    from ..models.lora import LoraLayer, LoraWeights, find_lora_targets
    from ..models.magicmirror import MagicMirrorAdapter, MagicMirrorConfig

    torch.manual_seed(0)
    vit = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_hidden_layers": 1,
           "patch_size": 14, "image_size": 56}
    out = {"magicmirror": _randomised(MagicMirrorAdapter(MagicMirrorConfig.for_transformer(
        transformer, id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1, qformer_dim_head=16, cond_dim=32,
        fuse_hidden=32)), 5),
           "face_encoder": _randomised(IDEncoder(CLIPVisionModel(CLIPVisionConfig(**vit)),
                                                 IDPerceiver(IDPerceiverConfig(dim=256, clip_dim=64, depth=1))), 7),
           "dualreal": _randomised(DualRealAdapters(DualRealConfig.for_transformer(
               transformer, condition_dim=16, hidden_dim=8, n_groups=1)), 6),
           "clip": _randomised(CLIPVisionModelWithProjection(CLIPVisionConfig(**vit, projection_dim=16)), 8)}
    g, modules = torch.Generator().manual_seed(8), dict(transformer.named_modules())
    layers = {p: LoraLayer(torch.randn(4, modules[p].in_features, generator=g) * 0.1,
                           torch.randn(modules[p].out_features, 4, generator=g) * 0.1, 0.5)
              for p in find_lora_targets(transformer, ["to_q", "to_v", "ff.net.2"])}
    out["lora"] = LoraWeights(name="lora", layers=layers)
    return out


def tiny_pipeline(bundle, side, observer: Observer | None, methods, size=(9, 32, 32)) -> torch.Tensor:
    """Prompts, the methods' encoders, sampling, decode (the Decode node's default tiling) as the nodes run them;
    ``side``: the placement of the encoders outside the bundle (``nodes/host.placement()``). Returns the video."""
    from ..models.clip_vision import image_embeds
    from ..models.dualreal import DualRealPatch
    from ..models.lora import LoraPatch
    from ..models.magicmirror import FaceEmbeds, MagicMirrorPatch
    from ..models.sampler import decode_latents, sample_video
    from ..models.subject import NORM_LORA_MODULES, SubjectReferencePatch, encode_reference
    from ..models.text import encode_prompt

    frames, height, width = size
    named = (lambda name: stage(observer, name)) if observer is not None else (lambda name: contextlib.nullcontext())
    m = tiny_method_models(bundle.transformer)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, height, width, 3, generator=g)
    with named("t5"):
        pos = encode_prompt(bundle, "a man img is walking on the beach", trigger="img")
        neg = encode_prompt(bundle, "blurry")
    patches = []
    if "magicmirror" in methods:
        enc = m["face_encoder"]
        crops, arcface = torch.rand(1, 3, enc.image_size, enc.image_size, generator=g), torch.randn(1, 512, generator=g)
        with named("face encoder"), side.run(enc):
            x_id, penultimate = enc(crops.to(side.device), arcface.to(side.device))
        faces = FaceEmbeds(arcface=arcface, x_id=x_id.float().cpu(), clip_penultimate=penultimate.float().cpu())
        patches.append(MagicMirrorPatch(m["magicmirror"], faces))
    if "subject" in methods:
        with named("reference encode"):
            latents = encode_reference(bundle, image)
        patches.append(SubjectReferencePatch(latents, vae_scale=bundle.vae_scale_factor_spatial))
    if "dualreal" in methods:
        with named("CLIP vision"), side.run(m["clip"]):
            embeds = image_embeds(m["clip"], image, device=side.device)
        patches.append(DualRealPatch(m["dualreal"], embeds[:, None]))
    if "lora" in methods:
        patches.append(LoraPatch(m["lora"], reference_only=NORM_LORA_MODULES if "subject" in methods else ()))
    model = bundle
    for p in patches:
        model = model.with_patch(p)
    with named("sampling"):
        latents = sample_video(model, pos, neg, num_frames=frames, height=height, width=width, steps=2, cfg=6.0,
                               seed=1)
    with named("decode"):
        return decode_latents(bundle, latents, tiling=True)


def run_tiny(folder: str, flag: str, mode: str, stack: str, observer: Observer, mm, reference: torch.Tensor) -> dict:
    """One run of the tiny pipeline through the nodes' loader inside core (see the module doc)."""
    from ..nodes import host
    from ..nodes.cogvideox import CogVideoXModelLoader

    observer.reset()
    result = {"flag": flag, "mode": mode, "stack": stack}
    card = observer.card
    try:
        with card:
            bundle = CogVideoXModelLoader().load(model=folder, precision="fp32", offload=mode)[0]
            result["resolved"] = bundle.offload
            video = tiny_pipeline(bundle, host.placement(), observer, STACK_METHODS[stack])
            result["same_video"] = bool(torch.equal(video, reference))
            result["card_after"] = card.used()
            del bundle
            clear_core(mm)
            result["card_cleared"] = card.used()
    except Exception as e:  # noqa: BLE001 (the row records what failed)
        result["error"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception), card:
            clear_core(mm)
    result.update(stages=observer.rows(), evictions=observer.evictions, card_peak=card.peak)
    card.peak = card.used()
    return result


def tiny_reference(folder: str, stack: str) -> torch.Tensor:
    """The tiny pipeline headless (no ComfyUI manager, offload none, the CPU): the video every run must give."""
    from ..models.cogvideox import load_cogvideox
    from ..models.placement import Placement

    bundle = load_cogvideox(folder, dtype=torch.float32, offload="none")
    return tiny_pipeline(bundle, Placement("cpu"), None, STACK_METHODS[stack])


# ----------------------------------------------------------------------------------------------------- 5B sizes


def _bench_memory():
    """``bench/memory.py`` of this pack, imported by path (bench/ is not a package)."""
    import importlib.util

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("mmv_bench_memory", os.path.join(bench, "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unplace(module: torch.nn.Module) -> None:
    """Forget a module's placement between runs: diffusers' offloading hooks, the bundle's and ComfyUI's keys."""
    from diffusers.hooks import HookRegistry

    from ..models.placement import PLACEMENT_KEY
    from ..nodes.host import _PATCHER_KEY

    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
                if registry.get_hook(name) is not None:
                    registry.remove_hook(name, recurse=False)
        m.__dict__.pop(PLACEMENT_KEY, None)
        m.__dict__.pop(_PATCHER_KEY, None)
    module.to("cpu")  # off the card (the tensors stay on the meta device)


class Models5B:
    """CogVideoX-5B and the methods' modules on the meta device (``bench/memory.build_models``), reused by every run
    (:func:`_unplace` between runs)."""

    def __init__(self):
        self.bench = _bench_memory()
        self.m = self.bench.build_models("meta", fp8=False)
        self.config = self.bench.load_reference_config("scheduler_config_5b.json")

    def reset(self) -> None:
        for module in self.m.values():
            if isinstance(module, torch.nn.Module):
                _unplace(module)

    def bench_figures(self) -> dict:
        """``bench/memory.py``'s estimate for these models (bf16, 49x480x720): activations per stage and method, the
        bytes its streamed modes hold, the weights on the device per mode x method x stage."""
        from ..models.placement import largest_leaf_bytes

        _, acts, table = self.bench.estimate(self.m)
        leaf = {k: 2 * largest_leaf_bytes(self.m[k]) for k in ("transformer", "t5")}
        return {"activations": acts,
                "stream": {"sequential": leaf, "block": {**leaf, "transformer": self.bench.block_stream_bytes(
                    self.m["transformer"])}},
                "weights": {f"{mode}/{method}/{stage}": table[(mode, "bf16")][method][stage][0]
                            for mode in self.bench.MODES for method in self.bench.METHODS
                            for stage in self.bench.STAGES},
                "face_queries": self.m["magicmirror"].config.face_queries}


def plan_5b(models: Models5B, flag: str, mode: str, stack: str, observer: Observer, mm,
            size=(49, 480, 720)) -> dict:
    """Enter every stage of a 5B run (bf16, CFG 6, tiled decode) without computing (see the module doc)."""
    from ..models.cogvideox import placed_bundle
    from ..models.dualreal import DualRealPatch
    from ..models.lora import LoraPatch
    from ..models.magicmirror import FaceEmbeds, MagicMirrorPatch
    from ..models.memory import vae_encode_activation_bytes
    from ..models.patches import patch_models
    from ..models.sampler import decode_memory, sampling_memory
    from ..models.subject import NORM_LORA_MODULES, SubjectReferencePatch
    from ..models.text import t5_memory
    from ..nodes import host

    frames, height, width = size
    m = models.m
    observer.reset()
    result = {"flag": flag, "mode": mode, "stack": stack}
    card, methods = observer.card, STACK_METHODS[stack]
    try:
        with card:
            parts = {"transformer": m["transformer"], "vae": m["vae"], "text_encoder": m["t5"], "tokenizer": None,
                     "scheduler_config": models.config, "dtype": torch.bfloat16}
            bundle = placed_bundle(parts, device=host.torch_device(), offload=mode,
                                   offload_device=host.offload_device(), manager=host.model_manager(),
                                   devices=host.component_devices())
            result["resolved"] = bundle.offload
            placement, side = bundle.placement, host.placement()
            for _ in ("positive", "negative"):
                with stage(observer, "t5"), placement.run(bundle.text_encoder, memory_required=t5_memory(m["t5"], 226)):
                    pass
            patches = []
            if "magicmirror" in methods:
                with stage(observer, "face encoder"), side.run(m["face_encoder"]):
                    pass
                cfg = m["magicmirror"].config
                faces = FaceEmbeds(arcface=torch.zeros(1, 512), x_id=torch.zeros(1, 2, cfg.id_dim),
                                   clip_penultimate=torch.zeros(1, 257, cfg.clip_dim))
                patches.append(MagicMirrorPatch(m["magicmirror"], faces))
            if "subject" in methods:
                need = vae_encode_activation_bytes(m["vae"].config, height, width, element_size=2)
                with stage(observer, "reference encode"), placement.run(bundle.vae, memory_required=need):
                    pass
                latents = torch.zeros(1, 16, height // 8, width // 8)
                patches.append(SubjectReferencePatch(latents))
            if "dualreal" in methods:
                with stage(observer, "CLIP vision"), side.run(m["clip_h"]):
                    pass
                patches.append(DualRealPatch(m["dualreal"], torch.zeros(1, 1, 1024)))
            if "lora" in methods:
                patches.append(LoraPatch(m["subject_lora"], reference_only=NORM_LORA_MODULES))
            model = bundle
            for p in patches:
                model = model.with_patch(p)
            need = sampling_memory(model, frames, height, width, 6.0)
            with stage(observer, "sampling"), placement.run(bundle.transformer, *patch_models(model.patches),
                                                            memory_required=need):
                pass
            with stage(observer, "decode"), placement.run(bundle.vae,
                                                          memory_required=decode_memory(bundle, height, width, True)):
                pass
            result["card_after"] = card.used()
            del bundle, model, patches
            clear_core(mm)
    except Exception as e:  # noqa: BLE001 (the row records what failed)
        result["error"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(Exception), card:
            clear_core(mm)
    with card:
        models.reset()
    result.update(stages=observer.rows(), evictions=observer.evictions, card_peak=card.peak)
    card.peak = card.used()
    return result


# ----------------------------------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> None:
    """``COMFYUI FLAG [--card GIB] [--tiny] [--modes a,b] [--stacks a,b]``: one flag's runs, printed as one JSON
    ``RESULT`` line (a list of rows)."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("comfyui")
    ap.add_argument("flag", choices=FLAGS)
    ap.add_argument("--card", type=float, default=12.0, help="the simulated card's memory in GiB")
    ap.add_argument("--tiny", action="store_true", help="run the tiny pipeline instead of placing 5B sizes")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--stacks", default=",".join(STACKS))
    args = ap.parse_args(argv)
    os.chdir(args.comfyui)
    if args.comfyui not in sys.path:
        sys.path.insert(0, args.comfyui)
    card, mm = boot(args.flag, int(args.card * GIB))
    observer = Observer(card)
    rows, bench = [], None
    modes, stacks = args.modes.split(","), args.stacks.split(",")
    if args.tiny:
        from . import tiny

        with tempfile.TemporaryDirectory() as tmp:
            folder = tiny.build_model_folder(os.path.join(tmp, "tiny"), num_layers=2)
            for s in stacks:
                reference = tiny_reference(folder, s)
                rows += [run_tiny(folder, args.flag, mode, s, observer, mm, reference) for mode in modes]
    else:
        models = Models5B()
        observer.simulate_activations = True
        bench = models.bench_figures()
        rows = [plan_5b(models, args.flag, mode, s, observer, mm) for s in stacks for mode in modes]
    print("RESULT " + json.dumps({"rows": rows, "bench": bench}), flush=True)


def bootstrap() -> None:
    """Import this pack as ``magicmirror_video`` from its folder (ComfyUI's Python does not have it installed)."""
    import importlib.util

    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "magicmirror_video" not in sys.modules:
        spec = importlib.util.spec_from_file_location("magicmirror_video", os.path.join(pack, "__init__.py"),
                                                      submodule_search_locations=[pack])
        module = importlib.util.module_from_spec(spec)
        sys.modules["magicmirror_video"] = module
        spec.loader.exec_module(module)


if __name__ == "__main__":
    bootstrap()
    from magicmirror_video.testing.comfy_sim import main as _main

    _main(sys.argv[1:])
