"""Speed and memory options for CogVideoX, all of them diffusers features: weight storage, block caches, regional
compile and attention backends.

=====================  ===============================================================================================
option                 diffusers feature
=====================  ===============================================================================================
weight storage         ``ModelMixin.enable_layerwise_casting(storage_dtype, compute_dtype)``: weights stored in fp8 (or
                       bf16/fp16), upcast per layer for its forward; CogVideoX's ``_skip_layerwise_casting_patterns``
                       (``patch_embed``, ``norm`` — the modulation linears ``norm1/norm2.linear`` too) and the default
                       ``proj_out`` stay in the compute dtype; the ``_all`` storages cast the modulation too
                       (``diffusers.hooks.apply_layerwise_casting`` with :data:`ALL_LINEAR_SKIP_PATTERNS`). Applied
                       once, at load (:func:`apply_weight_storage`).
``first_block_cache``  ``FirstBlockCacheConfig(threshold)``: block 0 always runs; when its output residual changed by
                       less than ``threshold`` (relative mean absolute difference) the other blocks are skipped and
                       their cached residual is added.
``pyramid_attention    ``PyramidAttentionBroadcastConfig``: each block's attention output is computed every
_broadcast``           ``interval``-th call and reused in between, inside a timestep range.
``faster_cache``       ``FasterCacheConfig``: attention reused and extrapolated every other call, and CFG's negative
                       rows skipped (approximated in frequency space from the positive ones) inside a timestep range.
``taylorseer``         ``TaylorSeerCacheConfig``: each block's attention and feed-forward outputs are computed every
                       ``interval`` steps and predicted in between by a first-order Taylor expansion.
``mag_cache``          ``MagCacheConfig``: whole block stack skipped while the accumulated magnitude-ratio error stays
                       under ``threshold`` (at most ``interval`` steps in a row); needs the model's per-step ratios —
                       a run without them calibrates (computes everything) and reports them.
compile                ``ModelMixin.compile_repeated_blocks`` (``torch.compile`` of each ``CogVideoXBlock``).
attention backend      diffusers' attention dispatcher (``dispatch_attention_fn``): ``native`` (SDPA), ``flash``
                       (flash-attn), ``sage`` (sageattention), ``xformers``. CogVideoX's own processor calls SDPA
                       directly (``set_attention_backend`` does not reach it), so
                       :class:`CogVideoXDispatchAttnProcessor` is its copy with that one call routed through the
                       dispatcher.
=====================  ===============================================================================================

Every option but weight storage is recorded on the bundle (:class:`SpeedOptions`, like a patch; one set per bundle)
and applied for one sampling run by :func:`applied_speed`, after the patches, and removed after it — on errors and
interrupts too — so the base model and the next run are untouched and no cache state outlives its run. Settings that
cannot act are refused with one line (:class:`SpeedSettingError`): an empty step range where it is recorded, a range
outside the run or mag ratios of another step count by the sampler (:func:`check_steps`); an attention backend the
model's device, dtype or head width cannot run, and compile through hooks that cut the blocks into one graph per
layer, where the options are recorded (:func:`check_speed`). Caches are diffusers hooks registered after the block
runner's, so they wrap it: a block a cache skips is a block the runner never computes.

What each cache does to each method (see :func:`check_speed` for what is refused). The caches do not know the methods:
:func:`check_speed` asks each patch — its ``cache_notes(kind)`` says what a cache of that :class:`CacheKind` (block or
attention cache, skipping block 0 or not) skips of it and refuses a cache it cannot act with, ``compilable`` whether
torch.compile can serve it with one graph, ``attention_bias`` whether it needs the native attention backend:

* **LoRA** — acts inside the layers; computed wherever a layer runs, cached with the outputs it produced.
* **MagicMirror** (face tokens, CAN, decoupled cross-attention), **subject reference** (reference tokens) — the
  streams ride in ``hidden_states``: block caches (first-block, mag) skip them with every other token and add the
  cached residual of all of them; attention caches reuse attention outputs that already contain the face
  tokens' joint attention and the cross-attention of the step that computed them. MagicMirror's one-way face
  tokens, which only query the joint attention, are still computed every step (their keys and values are
  recomputed when the cache skipped the processor).
* **DualReal** — the StageBlender runs in block 0 before every computed step (first-block cache always computes
  block 0, attention caches and TaylorSeer never skip blocks): one α per step. Its adapters add to the attention and
  feed-forward outputs after the caches' reuse. MagCache skips block 0 on cached steps: refused with DualReal.
* **compile** — one compiled graph serves every block (and every later run) for the base model, LoRAs and the caches;
  MagicMirror, DualReal and the subject reference pick per-block adapters by index or carry token streams, which
  makes torch.compile recompile per block: refused with them.
* **attention backends** — flash, sage and xformers take no bias on the attention scores: refused with MagicMirror's
  two-way form at a strength other than 0 and 1 (the face tokens' weight is such a bias).
* **CFG as two forwards** (MagicMirror's two-way form): the negative and positive passes run in diffusers'
  ``cache_context("uncond")`` / ``("cond")``, as diffusers pipelines with separate CFG passes do, so the caches
  that key their state on the context (first-block, TaylorSeer, mag) keep one state per pass. Pyramid attention
  broadcast keeps one state per attention layer and FasterCache expects a batched ``[uncond, cond]`` forward: both
  are refused with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import re
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

WEIGHT_STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                  "fp8_e4m3fn_all": torch.float8_e4m3fn, "fp8_e5m2_all": torch.float8_e5m2}
# "_all" storages: diffusers' layerwise casting with every linear layer of the blocks in fp8, the AdaLN modulation
# (norm1/norm2.linear) included, as kijai's wrapper stores CogVideoX 1.0 (diffusers' CogVideoX default keeps the
# modulation in the compute dtype as precision-critical: "norm" is in its _skip_layerwise_casting_patterns); the patch
# embedding, time/output layers' norms and proj_out stay in the compute dtype either way
ALL_LINEAR_SKIP_PATTERNS = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "^norm_out", "^norm_final")
CACHE_METHODS = ("none", "first_block_cache", "pyramid_attention_broadcast", "faster_cache", "taylorseer",
                 "mag_cache")
# backend -> (diffusers AttentionBackendName, the pip package it needs or None)
ATTENTION_BACKENDS = {"native": ("native", None), "flash": ("flash", "flash-attn"),
                      "sage": ("sage", "sageattention"), "xformers": ("xformers", "xformers")}
_MODULES = {"flash-attn": "flash_attn", "sageattention": "sageattention", "xformers": "xformers"}

# diffusers' documented settings (the method's config defaults; the CogVideoX examples of the PAB and FasterCache
# docs), used for every setting a SpeedOptions leaves at None
DEFAULTS = {
    "first_block_cache": dict(threshold=0.05),
    "pyramid_attention_broadcast": dict(interval=2, timesteps=(100, 800)),
    "faster_cache": dict(interval=2, timesteps=(-1, 681), uncond_timesteps=(-1, 641)),
    "taylorseer": dict(interval=5, start_step=3),
    "mag_cache": dict(threshold=0.06, interval=3, retention=0.2),
}
# FasterCache's remaining parameters, as in diffusers' CogVideoX example (low/high-frequency weight update ranges,
# attention weight) and its config defaults (the negative rows are recomputed every 5th call)
FASTER_CACHE_FIXED = dict(low_frequency_weight_update_timestep_range=(99, 641),
                          high_frequency_weight_update_timestep_range=(-1, 301), unconditional_batch_skip_range=5,
                          tensor_format="BFCHW")
FASTER_CACHE_ATTENTION_WEIGHT = 0.3
# TaylorSeer's modules for CogVideoX: each block's attention and feed-forward (diffusers' default patterns,
# "^transformer_blocks.*attn" fully matched, would match no CogVideoX module: its attention is "attn1")
TAYLORSEER_MODULES = (r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff")
# caches that skip whole blocks on cached steps (the others reuse attention / feed-forward outputs inside the blocks)
BLOCK_CACHES = ("first_block_cache", "mag_cache")
# block caches whose cached steps skip block 0 too (first-block cache always computes it)
SKIPS_BLOCK_ZERO = ("mag_cache",)
# methods whose state is one per layer, not per cache context, or that need a batched [uncond, cond] forward
NEEDS_BATCHED_CFG = ("pyramid_attention_broadcast", "faster_cache")
# caches whose start_step and end_step both bound the steps they may reuse
STEP_RANGE_CACHES = ("pyramid_attention_broadcast", "faster_cache", "taylorseer")
# What each attention kernel runs on, as the kernels check it themselves (inside the kernel, mid-run, otherwise): the
# device type, the compute dtypes, the widest attention head, the oldest NVIDIA GPU (compute capability) and whether
# AMD GPUs (ROCm builds of torch) are served. flash: flash-attn 2 (its mha_fwd checks: fp16/bf16, head size <= 256,
# Ampere or newer); sage: SageAttention (fp16/bf16, head dims up to 128 — smaller ones padded —, kernels for sm80 and
# newer NVIDIA GPUs only); xformers: memory_efficient_attention (CUDA operators only; fp32 too).
BACKEND_LIMITS = {
    "flash": {"package": "flash-attn", "dtypes": (torch.float16, torch.bfloat16), "max_head_dim": 256,
              "capability": (8, 0), "rocm": True},
    "sage": {"package": "SageAttention", "dtypes": (torch.float16, torch.bfloat16), "max_head_dim": 128,
             "capability": (8, 0), "rocm": False},
    "xformers": {"package": "xformers", "dtypes": None, "max_head_dim": None, "capability": None, "rocm": True},
}


@dataclasses.dataclass(frozen=True)
class CacheKind:
    """What a cache skips, as the patches' ``cache_notes`` see it (see :func:`cache_notes`)."""

    name: str  # the cache (CACHE_METHODS)
    skips_blocks: bool  # cached steps skip whole blocks (first-block, mag); else attention/FF outputs are reused
    skips_block_zero: bool  # cached steps skip block 0 as well (mag cache)

    @classmethod
    def of(cls, cache: str) -> "CacheKind":
        return cls(cache, cache in BLOCK_CACHES, cache in SKIPS_BLOCK_ZERO)


class SpeedConflictError(ValueError):
    """A speed option that cannot act together with a patch (or another option) on one model."""


class AttentionBackendError(RuntimeError):
    """An attention backend whose package is not installed or that cannot run here."""


class SpeedSettingError(ValueError):
    """A speed setting that cannot act: an empty step range, mag ratios of another step count, a second Speed node."""


def storage_skip_patterns(name: str) -> tuple | None:
    """The layerwise-casting skip patterns of a :data:`WEIGHT_STORAGE` name (None: the model's own, diffusers')."""
    return ALL_LINEAR_SKIP_PATTERNS if name.endswith("_all") else None


def apply_weight_storage(transformer: torch.nn.Module, storage: torch.dtype, compute: torch.dtype,
                         skip_modules_pattern: tuple | None = None) -> None:
    """Store the transformer's weights in ``storage`` and compute in ``compute`` (diffusers' layerwise casting, with
    the model's own skip patterns unless ``skip_modules_pattern`` is given). Nothing to do when they are the same dtype.
    Irreversible (as diffusers': casting back would not restore the lost bits) — the loader applies it to a freshly
    loaded model."""
    if storage == compute:
        return
    if skip_modules_pattern is None:
        transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    else:  # (the model method always adds the model's own skip patterns; the hook function takes ours as they are)
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(transformer, storage, compute, skip_modules_pattern=skip_modules_pattern)


def store_adapter_like(adapter: torch.nn.Module, transformer: torch.nn.Module) -> None:
    """Store a freshly loaded adapter's linear layers as the transformer's weights are stored (diffusers'
    ``apply_layerwise_casting`` with the transformer's storage and compute dtypes). The adapter's modulation layers
    (its ``_skip_layerwise_casting_patterns``, as CogVideoX's ``norm``) stay in the compute dtype unless the
    transformer's modulation is stored too (the ``_all`` storages). Nothing when the transformer has no layerwise
    casting. Irreversible, as :func:`apply_weight_storage`: only for an adapter loaded for this model."""
    hooks = {module: hook for module, hook in casting_hooks(transformer)}
    if not hooks:
        return
    from diffusers.hooks import apply_layerwise_casting

    hook = next(iter(hooks.values()))
    modulation_stored = transformer.transformer_blocks[0].norm1.linear in hooks
    skip = () if modulation_stored else tuple(getattr(adapter, "_skip_layerwise_casting_patterns", ()))
    apply_layerwise_casting(adapter, hook.storage_dtype, hook.compute_dtype, skip_modules_pattern=skip)


def casting_hooks(model: torch.nn.Module):
    """(module, diffusers' layerwise casting hook) for every layer of ``model`` that has one."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            yield module, hook


def storage_dtype(transformer: torch.nn.Module) -> torch.dtype | None:
    """The storage dtype of a transformer with layerwise casting, else None."""
    return next((hook.storage_dtype for _, hook in casting_hooks(transformer)), None)


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    """Speed options recorded on a bundle; ``None`` settings take diffusers' documented value for the method
    (:data:`DEFAULTS`).

    * ``threshold`` — first-block and mag cache: how much change is still "the same" (0: nothing is skipped by
      first-block cache).
    * ``interval`` — pyramid attention broadcast / FasterCache: attention computed every ``interval``-th call;
      TaylorSeer: a full step every ``interval`` steps; mag cache: at most ``interval`` skipped steps in a row.
    * ``start_step`` / ``end_step`` — the steps ``start_step <= i < end_step`` may reuse a cache (``end_step`` None:
      the method's default, for PAB/FasterCache its timestep range; -1: to the last step). First-block cache has no
      step range; mag cache only a start (its retention).
    * ``mag_ratios`` — mag cache's per-step magnitude ratios for this model, one per sampling step (a run with another
      step count is refused: :func:`check_steps`); None: the run calibrates them (computes every block) and reports
      them in the sampler's outputs.
    * ``compile`` — ``torch.compile`` the transformer blocks (regional compile); ``attention`` — the backend.
    """

    cache: str = "none"
    threshold: float | None = None
    interval: int | None = None
    start_step: int | None = None
    end_step: int | None = None
    mag_ratios: tuple | None = None
    compile: bool = False
    attention: str = "native"
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" / "aot_eager" check tracing without codegen)

    def __post_init__(self):
        if self.cache not in CACHE_METHODS:
            raise ValueError(f"cache must be one of {CACHE_METHODS}, got {self.cache!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {tuple(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold must be at least 0, got {self.threshold}")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")
        if self.start_step is not None and self.start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {self.start_step}")
        if self.cache == "taylorseer" and self.start_step == 0:
            raise ValueError("taylorseer predicts from computed steps: start_step must be at least 1")
        if self.cache in STEP_RANGE_CACHES and self.end_step is not None and self.end_step >= 0:
            first = self.setting("start_step") or 0
            if self.end_step <= first:
                default = " (diffusers' default)" if self.start_step is None else ""
                raise SpeedSettingError(
                    f"{self.cache}: start_step {first}{default} and end_step {self.end_step} leave no step to cache "
                    "(the steps start_step <= i < end_step reuse it); set end_step above start_step, or -1 for the "
                    "last step.")
        if self.mag_ratios is not None:
            object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))

    @property
    def active(self) -> bool:
        return self.cache != "none" or self.compile or self.attention != "native"

    def summary(self) -> str:
        """The settings that differ from the defaults, ``name=value`` (what an error names)."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                parts.append(f"{field.name}=({len(value)} values)" if field.name == "mag_ratios" else
                             f"{field.name}={value!r}")
        return ", ".join(parts) or "all defaults"

    def setting(self, name: str):
        """A setting, or the method's documented default."""
        value = getattr(self, name)
        return DEFAULTS.get(self.cache, {}).get(name) if value is None else value


def parse_ratios(text: str) -> tuple | None:
    """``"1.0, 1.02, 0.98"`` (or a Python list as diffusers logs it) -> a tuple of floats; empty -> None."""
    text = text.strip().strip("[]()")
    if not text:
        return None
    try:
        return tuple(float(x) for x in re.split(r"[,\s]+", text) if x)
    except ValueError:
        raise ValueError(f"mag_ratios must be numbers separated by commas (as the calibration run logs them), got "
                         f"{text[:60]!r}") from None


def check_attention_backend(name: str, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                            head_dim: int | None = None) -> None:
    """Raise :class:`AttentionBackendError` with one line when ``name`` cannot run here: its package is not installed
    (naming the package to install), or the model's execution ``device``, compute ``dtype`` or attention ``head_dim``
    is one the kernel does not take (:data:`BACKEND_LIMITS`; each checked when given). Checked at the node, before any
    model runs — the kernels themselves would fail mid-run."""
    _check_installed(name)
    problem = attention_backend_problem(name, device=device, dtype=dtype, head_dim=head_dim)
    if problem:
        raise AttentionBackendError(f"attention backend {name!r} cannot run this model: {problem}.")


def _check_installed(name: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    backend, package = ATTENTION_BACKENDS[name]
    if package is not None and importlib.util.find_spec(_MODULES[package]) is None:
        raise AttentionBackendError(f"attention backend {name!r} needs the {package} package, which is not installed: "
                                    f"pip install {package} (in ComfyUI's Python), then restart; or use 'native'.")
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except RuntimeError as e:
        raise AttentionBackendError(f"attention backend {name!r}: {e}") from None


def attention_backend_problem(name: str, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                              head_dim: int | None = None) -> str | None:
    """Why the kernel of backend ``name`` cannot run a model on ``device`` computing in ``dtype`` with attention heads
    ``head_dim`` wide (each checked when given), with the way out; None when it can (or ``name`` has no limits)."""
    limits = BACKEND_LIMITS.get(name)
    if limits is None:
        return None
    kernel, native = limits["package"], "or use attention 'native'"
    if device is not None:
        device = torch.device(device)
        rocm = getattr(torch.version, "hip", None) is not None
        if device.type != "cuda" or (rocm and not limits["rocm"]):
            gpus = "NVIDIA GPUs" if not limits["rocm"] else "CUDA (or ROCm) GPUs"
            return f"{kernel} has kernels for {gpus} only and this model runs on {device} ({native})"
        if limits["capability"] and not rocm and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(device)
            if capability < limits["capability"]:
                need = ".".join(map(str, limits["capability"]))
                return (f"{kernel} needs an NVIDIA GPU of compute capability {need} (Ampere) or newer and "
                        f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]} ({native}, or "
                        "'xformers')")
    if dtype is not None and limits["dtypes"] and dtype not in limits["dtypes"]:
        return (f"{kernel} computes in float16 or bfloat16 only and this model computes in "
                f"{str(dtype).removeprefix('torch.')} (load it with precision bf16 or fp16, {native})")
    if head_dim is not None and limits["max_head_dim"] and head_dim > limits["max_head_dim"]:
        return (f"{kernel} takes attention heads up to {limits['max_head_dim']} wide and this model's are {head_dim} "
                f"({native})")
    return None


def check_speed(options: SpeedOptions | None, patches, bundle=None) -> list[str]:
    """Raise :class:`SpeedConflictError` if ``options`` cannot act with ``patches`` (or with ``bundle``'s weight
    storage and offloading, when given), :class:`AttentionBackendError` if its attention backend cannot run here (on
    ``bundle``'s device, dtype and head width, when given) — checked where either is recorded and before a run moves
    any weights. Returns what the cache does to each method it acts with (the sampler logs these lines)."""
    if options is None or not options.active:
        return []
    from .patches import conditional_only

    runs_on = {} if bundle is None else {"device": bundle.device, "dtype": bundle.dtype,
                                         "head_dim": bundle.transformer.config.attention_head_dim}
    check_attention_backend(options.attention, **runs_on)
    if options.cache in NEEDS_BATCHED_CFG and conditional_only(patches):
        name = options.cache.replace("_", " ")
        raise SpeedConflictError(
            f"{name} cannot act on this model: MagicMirror's two-way face attention runs CFG's negative prompt as a "
            "forward of its own, and " + ("pyramid attention broadcast keeps one cached attention per layer (the "
                                          "positive pass would reuse the negative pass's attention)"
                                          if options.cache == "pyramid_attention_broadcast" else
                                          "FasterCache approximates the negative rows of a batched [negative, "
                                          "positive] forward") +
            ". Use first_block_cache, taylorseer or mag_cache (they keep one state per CFG pass).")
    notes = cache_notes(options.cache, patches)  # (a patch refuses a cache it cannot act with)
    streams = sorted({p.method for p in patches if not getattr(p, "compilable", True)})
    if options.compile and streams:
        raise SpeedConflictError(
            f"compile cannot act with {' and '.join(streams)}: its per-block adapters are picked by block index and "
            "its token streams change the layout of the blocks' inputs, so torch.compile compiles the blocks again "
            "and again (one graph per block; CogVideoX-5B's 42 blocks are beyond torch's recompile limit of 8, after "
            "which it falls back to eager). Turn compile off for this model; compile works with LoRAs and the caches.")
    biased = [p.attention_bias for p in patches if getattr(p, "attention_bias", "")]
    if options.attention != "native" and biased:
        raise SpeedConflictError(
            f"attention backend {options.attention!r} cannot act with {biased[0]}: that weight is a bias on the "
            f"attention scores, which {options.attention} does not take. Use the native backend (or strength 1).")
    if options.compile and bundle is not None:
        check_compile_hooks(bundle.transformer)
    return notes


def check_compile_hooks(transformer: torch.nn.Module) -> None:
    """Raise :class:`SpeedConflictError` when the transformer carries diffusers hooks that torch.compile cannot trace
    through, so that the compiled blocks would be cut into one graph per layer (measured, tests/test_speed.py):
    layerwise casting (fp8 weight storage: its hook recasts each layer's parameters, which dynamo does not trace) and
    leaf-level group offloading (``sequential``: each layer's onload and offload are ``torch.compiler.disable``d).
    Block-level group offloading (``block``) moves whole blocks outside the compiled block bodies: allowed."""
    if storage_dtype(transformer) is not None:
        raise SpeedConflictError(
            f"compile cannot act on weights stored in {str(storage_dtype(transformer)).removeprefix('torch.')}: the "
            "layerwise casting hook recasts every layer's weights as it runs, which torch.compile cannot trace, so "
            "each block is cut into one small graph per layer and nothing is fused. Load the model with "
            "weight_storage 'precision' to compile, or turn compile off.")
    block = transformer.transformer_blocks[0]
    if any(group_offloaded(m) for m in block.modules() if m is not block):
        raise SpeedConflictError(
            "compile cannot act with offload 'sequential': the weights stream layer by layer, and each layer's "
            "transfer is outside what torch.compile can trace, so each block is cut into one small graph per layer "
            "and nothing is fused. Load the model with offload 'block' (whole blocks stream; compile works), 'model' "
            "or 'none', or turn compile off.")


def group_offloaded(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a group of diffusers' group offloading (its weights come and go with it)."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


def check_steps(options: SpeedOptions | None, timesteps) -> None:
    """Raise :class:`SpeedSettingError` with one line when ``options``' cache cannot act in a run over ``timesteps``:
    mag cache's ratios are not one per step, or the cache's step range holds no step of the run (diffusers' own
    conditions: PAB and FasterCache reuse on steps whose timestep lies inside their open timestep range, TaylorSeer
    predicts steps ``start <= i < end``, mag cache may skip steps from ``start`` on). Called by the sampler, where the
    step count is known, before anything runs."""
    if options is None or options.cache in ("none", "first_block_cache"):
        return
    method, ts = options.cache, [float(t) for t in timesteps]
    steps = len(ts)
    if method == "mag_cache" and options.mag_ratios is not None and len(options.mag_ratios) != steps:
        raise SpeedSettingError(
            f"mag_ratios has {len(options.mag_ratios)} values but this run has {steps} steps: mag_cache needs the "
            f"ratio of each step. Calibrate at {steps} steps (leave mag_ratios empty for one run and paste the ratios "
            f"it logs) or sample with {len(options.mag_ratios)} steps.")
    start, end = options.setting("start_step") or 0, options.end_step
    if method in ("pyramid_attention_broadcast", "faster_cache"):
        defaults = [DEFAULTS[method]["timesteps"]] + ([DEFAULTS[method]["uncond_timesteps"]]
                                                      if method == "faster_cache" else [])
        ranges = [_timestep_range(ts, options.start_step, options.end_step, d) for d in defaults]
        if any(low < t < high for low, high in ranges for t in ts):
            return
        where = " or ".join(f"({low:g}, {high:g})" for low, high in ranges)
        raise SpeedSettingError(
            f"{method} caches no step of this {steps}-step run: none of its timesteps ({ts[0]:g} to {ts[-1]:g}) lies "
            f"in the cached range {where}. Set start_step below {steps} and end_step above it (or -1 for diffusers' "
            "default range), or more steps.")
    last = steps if method == "mag_cache" or end is None or end < 0 else min(end, steps)
    if start >= last:
        default = " (diffusers' default)" if options.start_step is None else ""
        raise SpeedSettingError(
            f"{method} caches no step of this {steps}-step run: start_step {start}{default} is "
            + (f"past its last step ({steps - 1})" if last == steps else f"not before end_step {end}")
            + f". Set start_step below {last} (or -1 for diffusers' default), or sample with more steps.")


def cache_notes(cache: str, patches) -> list[str]:
    """What ``cache`` skips of each patch that says (one line per method, by method name), asked of the patches'
    ``cache_notes(kind)`` (:class:`CacheKind`), which raise :class:`SpeedConflictError` for a cache they cannot act
    with."""
    if cache == "none":
        return []
    kind = CacheKind.of(cache)
    notes = []
    for patch in sorted(patches, key=lambda p: getattr(p, "method", None) or ""):
        if hasattr(patch, "cache_notes"):
            notes.extend(patch.cache_notes(kind))
    return notes


def token_stream_notes(kind: CacheKind, method: str, tokens: str) -> list[str]:
    """The note for a method whose tokens ride in the blocks' ``hidden_states`` (MagicMirror's face tokens, subject
    reference tokens): block caches skip them with every other token, attention caches reuse their attention."""
    if kind.skips_blocks:
        return [f"{kind.name} with {method}: on the steps it skips, {tokens} are skipped with every other token "
                "(blocks not computed); the cached residual of the last computed step stands in"]
    return [f"{kind.name} with {method}: reused attention outputs hold {tokens}' attention of the step that computed "
            "them; the method's modulation and adapters run every step"]


# ----------------------------------------------------------------------------------------------------- one run


def _timestep_range(timesteps, start: int | None, end: int | None, default: tuple) -> tuple:
    """diffusers' ``(low, high)`` timestep range (open) in which the steps ``start <= i < end`` fall."""
    ts = [float(t) for t in timesteps]
    low, high = default
    if start is not None:
        high = float("inf") if start <= 0 else (ts[start - 1] + ts[start]) / 2 if start < len(ts) else -float("inf")
    if end is not None:
        low = -float("inf") if end < 0 or end >= len(ts) else (ts[end - 1] + ts[end]) / 2 if end > 0 else float("inf")
    return low, high


def diffusers_cache_config(options: SpeedOptions, timesteps, timestep_fn, *, dtype: torch.dtype = torch.float32,
                           guidance: bool = True):
    """The diffusers cache config for ``options`` on a run with ``timesteps``; ``timestep_fn()`` returns the current
    timestep (PAB and FasterCache read it). ``guidance``: the forwards carry CFG's batched ``[negative, positive]``
    rows (without, FasterCache only reuses attention, as for a guidance-distilled model)."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    method, steps = options.cache, len(timesteps)
    if method == "first_block_cache":
        return FirstBlockCacheConfig(threshold=options.setting("threshold"))
    if method == "pyramid_attention_broadcast":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=options.setting("interval"),
            spatial_attention_timestep_skip_range=_timestep_range(timesteps, options.start_step, options.end_step,
                                                                  DEFAULTS[method]["timesteps"]),
            current_timestep_callback=timestep_fn)
    if method == "faster_cache":
        d = DEFAULTS[method]
        return FasterCacheConfig(
            spatial_attention_block_skip_range=options.setting("interval"),
            spatial_attention_timestep_skip_range=_timestep_range(timesteps, options.start_step, options.end_step,
                                                                  d["timesteps"]),
            unconditional_batch_timestep_skip_range=_timestep_range(timesteps, options.start_step, options.end_step,
                                                                    d["uncond_timesteps"]),
            spatial_attention_block_identifiers=("transformer_blocks",),
            attention_weight_callback=lambda _: FASTER_CACHE_ATTENTION_WEIGHT, current_timestep_callback=timestep_fn,
            is_guidance_distilled=not guidance, **FASTER_CACHE_FIXED)
    if method == "taylorseer":
        end = options.end_step
        return TaylorSeerCacheConfig(cache_interval=options.setting("interval"),
                                     disable_cache_before_step=options.setting("start_step"),
                                     disable_cache_after_step=None if end is None or end < 0 else end,
                                     max_order=1, taylor_factors_dtype=dtype,
                                     cache_identifiers=list(TAYLORSEER_MODULES))
    if method == "mag_cache":
        start = options.start_step
        retention = DEFAULTS[method]["retention"] if start is None else start / steps
        ratios = options.mag_ratios
        return MagCacheConfig(threshold=options.setting("threshold"), max_skip_steps=options.setting("interval"),
                              retention_ratio=retention, num_inference_steps=steps,
                              mag_ratios=None if ratios is None else list(ratios), calibrate=ratios is None)
    raise ValueError(f"no diffusers cache for {method!r}")


class CogVideoXDispatchAttnProcessor:
    """diffusers' ``CogVideoXAttnProcessor2_0`` with its ``F.scaled_dot_product_attention`` call routed through
    diffusers' attention dispatcher (``_attention_backend`` as ``set_attention_backend`` sets it on dispatcher-based
    processors). Everything else is the original, op for op (RoPE applied to the key in place, which the block
    runner's taps rely on); with the ``native`` backend the output is the original's bit for bit (tested). Under
    diffusers' context parallelism (``_parallel_config``, :mod:`.context_parallel`) the dispatcher runs Ulysses
    attention; a 4-D key mask ``[B, 1, 1, S]`` (the block runner's, masking pads) goes to it as it is."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None and attention_mask.ndim != 4:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        # the dispatcher takes [B, S, H, d]
        hidden_states = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states


class SpeedRun:
    """The speed options of one sampling run: the current timestep for the caches and each transformer call's cache
    context (see :func:`applied_speed`)."""

    def __init__(self, transformer, options: SpeedOptions | None):
        self.transformer, self.options = transformer, options
        self.timestep = None
        self.caching = options is not None and options.cache != "none"
        self._mag_log: list = []

    def step(self, timestep) -> None:
        self.timestep = timestep

    def context(self, name: str):
        """diffusers' ``cache_context`` for one transformer call (``"cond_uncond"`` batched, as diffusers' CogVideoX
        pipelines; ``"uncond"`` / ``"cond"`` when CFG runs as two forwards)."""
        return self.transformer.cache_context(name) if self.caching else contextlib.nullcontext()

    def outputs(self) -> dict:
        """What the run reports: mag cache's calibrated ratios (from diffusers' calibration log, last pass)."""
        return {"mag_ratios": self._mag_log[-1]} if self._mag_log else {}


class _MagCalibrationLog(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("MagCache Calibration Results:"):
            self.into.append(tuple(parse_ratios(message.split(":", 1)[1]) or ()))


@contextlib.contextmanager
def applied_speed(transformer, options: SpeedOptions | None, timesteps=(), *, dtype: torch.dtype = torch.float32,
                  guidance: bool = True) -> Iterator[SpeedRun]:
    """Apply ``options`` to ``transformer`` for one sampling run over ``timesteps``; everything is removed on exit
    (errors and interrupts included). Call it after the patches are applied (the caches then wrap the block runner
    and the patches' hooks); call :meth:`SpeedRun.step` before each step and run each transformer call inside
    :meth:`SpeedRun.context`. ``guidance``: CFG runs as batched ``[negative, positive]`` forwards."""
    run = SpeedRun(transformer, options)
    if options is not None and options.active:
        logger.info("Sampling with %s", options)
    with contextlib.ExitStack() as stack:
        if options is not None and options.attention != "native":
            stack.callback(_use_attention_backend(transformer, options.attention))
        if options is not None and options.compile:
            stack.callback(_compile_blocks(transformer, options.compile_backend))
        if run.caching:
            config = diffusers_cache_config(options, timesteps, lambda: run.timestep, dtype=dtype, guidance=guidance)
            if options.cache == "mag_cache" and options.mag_ratios is None:
                stack.enter_context(_capture_mag_calibration(run._mag_log))
            transformer.enable_cache(config)
            stack.callback(transformer.disable_cache)
        yield run


@contextlib.contextmanager
def _capture_mag_calibration(into: list):
    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = _MagCalibrationLog(into), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # (its other INFO lines stay quiet; the result is logged below)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
        if into:
            logger.warning("mag_cache calibrated this run (every block computed); for cached runs at this step count "
                           "set mag_ratios to: %s", ", ".join(f"{r:.5f}" for r in into[-1]))


def _use_attention_backend(transformer, name: str):
    """Route every CogVideoX attention of ``transformer`` through the dispatcher with backend ``name``; returns the
    undo (the original processors back)."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

    saved = {}
    backend = AttentionBackendName(ATTENTION_BACKENDS[name][0])
    for module in transformer.modules():
        if isinstance(module, Attention):
            if not isinstance(module.processor, CogVideoXAttnProcessor2_0):
                for m, p in saved.items():
                    m.processor = p
                raise AttentionBackendError(
                    f"attention backend {name!r} replaces CogVideoX's own attention processor, but this model uses "
                    f"{type(module.processor).__name__}")
            saved[module] = module.processor
            processor = CogVideoXDispatchAttnProcessor()
            processor._attention_backend = backend
            module.processor = processor

    def undo() -> None:
        for module, processor in saved.items():
            module.processor = processor

    return undo


def _compile_blocks(transformer, backend: str = "inductor"):
    """diffusers' regional compile of the ``CogVideoXBlock``s; returns the undo (the blocks' eager calls back).
    Compiled code is cached by torch (per code object and guards), so later runs with the same hooks reuse it."""
    had = "_repeated_blocks" in transformer.__dict__
    transformer._repeated_blocks = ("CogVideoXBlock",)  # diffusers does not declare CogVideoX's repeated blocks
    try:
        transformer.compile_repeated_blocks(backend=backend)
    finally:
        if not had:
            del transformer._repeated_blocks

    def undo() -> None:
        for block in transformer.transformer_blocks:
            block._compiled_call_impl = None

    return undo
