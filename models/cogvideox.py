"""CogVideoX model bundle: loading a diffusers folder or a single-file transformer.

A :class:`CogVideoXBundle` holds the five components of a CogVideoX pipeline plus the
list of patches (LoRAs, adapters) recorded by patch nodes. Bundles are immutable from
the user's point of view: ``with_patch`` returns a new bundle sharing the same modules,
and the sampler applies the recorded patches only for the duration of one run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from collections import OrderedDict

import torch

from .placement import OFFLOAD_MODES, PLACEMENT_KEY, Placement, choose_offload, free_memory, module_bytes, placement_of

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_COMPONENTS = ("text_encoder", "tokenizer")  # optional for the nodes: a ComfyUI T5-XXL CLIP may encode instead


class ModelFolderError(FileNotFoundError):
    """A model folder or file is missing or incomplete."""


class WeightsFileError(ValueError):
    """A weights file could not be read (corrupt, truncated or of an unknown format)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """What kind of CogVideoX a transformer is, as read from its config."""

    size: str  # "2B" | "5B" | "<width>w" for unusual (e.g. tiny test) models
    version: str  # "1.0" | "1.5"
    i2v: bool

    def __str__(self) -> str:
        return f"CogVideoX{'1.5' if self.version == '1.5' else ''}-{self.size} {'I2V' if self.i2v else 'T2V'}"


def variant_of(config) -> Variant:
    inner = config.num_attention_heads * config.attention_head_dim
    size = {1920: "2B", 3072: "5B"}.get(inner, f"{inner}w")
    version = "1.5" if config.patch_size_t is not None else "1.0"
    i2v = config.in_channels == 2 * config.out_channels
    return Variant(size=size, version=version, i2v=i2v)


# The metadata key of every adapter and LoRA file the pack writes: the base model it was trained on, as the variant
# names it (``str(Variant)``: "CogVideoX-5B T2V", "CogVideoX1.5-5B I2V"; Wan LoRAs: ``str(WanVariant)``).
BASE_MODEL_KEY = "base_model"


class BaseModelMismatchError(ValueError):
    """A file trained on another base model (version, task or size) than the loaded one."""


def base_model_of(transformer) -> str:
    """What a file trained on ``transformer`` records as its base (:data:`BASE_MODEL_KEY`)."""
    return str(variant_of(transformer.config))


def check_base_model(recorded: str | None, transformer, what: str) -> None:
    """Raise :class:`BaseModelMismatchError` (one line naming both) when ``recorded``, the base a file records, is not
    the transformer's; a file without the record (None) passes (its layer sizes are all that can be checked)."""
    if recorded is None:
        return
    loaded = base_model_of(transformer)
    if recorded != loaded:
        raise BaseModelMismatchError(f"{what} was trained on {recorded} but the loaded model is {loaded}: load "
                                     f"{recorded}, or use a file trained on {loaded}.")


def unrecorded_base_note(what: str) -> str:
    """The one-line note for a file that records no base model (logged as a warning where it is loaded)."""
    return (f"{what} does not record the base model it was trained on (written before the record, or by another "
            "tool): it loads as before, with only its layer sizes checked against the model.")


class TextEmbedCache:
    """Small LRU of prompt -> T5 output, owned by a bundle's text encoder (no globals); ``derived`` keeps
    objects made from the text encoder's tokenizer (e.g. its copy with extra tokens)."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self.derived: dict = {}

    def get(self, key):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass(frozen=True)
class CogVideoXBundle:
    """Everything the sampler needs, plus the patches to apply for a run.

    ``placement`` (:class:`~.placement.Placement`) is where the components live and run: built from ``device``,
    ``offload_device`` and ``offload`` when not given (``"auto"`` is resolved here), shared by every bundle
    ``with_patch`` derives. ``text_encoder``/``tokenizer`` are None for a folder without ``text_encoder/`` (its
    prompts are encoded by a ComfyUI CLIP).
    """

    transformer: torch.nn.Module  # diffusers CogVideoXTransformer3DModel
    vae: torch.nn.Module  # diffusers AutoencoderKLCogVideoX
    text_encoder: torch.nn.Module | None  # transformers T5EncoderModel
    tokenizer: object  # T5 tokenizer (slow or fast)
    scheduler_config: dict
    dtype: torch.dtype
    device: torch.device  # execution device
    offload: str = "none"  # see OFFLOAD_MODES; "auto" becomes the mode it chose
    offload_device: torch.device = torch.device("cpu")
    name: str = ""
    patches: tuple = ()
    speed: object = None  # SpeedOptions (models/speed.py) recorded by the Speed node, applied per sampling run
    text_cache: TextEmbedCache = dataclasses.field(default_factory=TextEmbedCache, compare=False)
    placement: Placement | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def variant(self) -> Variant:
        return variant_of(self.transformer.config)

    @property
    def vae_scale_factor_spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae.config.temporal_compression_ratio

    def __post_init__(self):
        from .block_runner import block_runner
        from .patches import check_patches

        check_patches(self.patches)  # (with_patch checks first; a bundle built or replaced with patches: here)
        block_runner(self.transformer)  # before any other diffusers hook on the blocks (group offloading wraps it)
        device, offload_device = torch.device(self.device), torch.device(self.offload_device)
        placed = placement_of(self.transformer)
        placement = self.placement or placed
        if placement is None:
            placement = Placement(device, offload_device, resolve_offload(self.offload, device, self))
        if placed is None:
            place_components(placement, self)
        elif placed is not placement or (self.placement is None and (
                (placed.device, placed.offload_device) != (device, offload_device)
                or self.offload not in ("auto", placed.mode))):
            raise ValueError(f"this transformer is already placed by {placed}; another bundle of it must share that "
                             "placement (derive it with with_patch)")
        object.__setattr__(self, "placement", placement)
        object.__setattr__(self, "offload", placement.mode)
        object.__setattr__(self, "device", placement.device)
        object.__setattr__(self, "offload_device", placement.offload_device)

    def with_patch(self, patch) -> "CogVideoXBundle":
        """A new bundle sharing this one's modules, with ``patch`` recorded last. Raises
        :class:`~.patches.PatchConflictError` if the patch cannot join the ones already recorded."""
        from .patches import check_can_add
        from .speed import check_speed

        check_can_add(self.patches, patch)
        check_speed(self.speed, self.patches + (patch,), self)
        return dataclasses.replace(self, patches=self.patches + (patch,))

    def with_speed(self, options) -> "CogVideoXBundle":
        """A new bundle sharing this one's modules, with the speed options ``options`` (:class:`~.speed.SpeedOptions`).
        Raises :class:`~.speed.SpeedSettingError` if the bundle already has speed options (one Speed node per model:
        a second one would silently replace the first), :class:`~.speed.SpeedConflictError` if they cannot act with
        the recorded patches, the weight storage or the offloading, :class:`~.speed.AttentionBackendError` if the
        attention backend cannot run here (package, device, dtype, head width)."""
        from .speed import SpeedSettingError, check_speed

        if self.speed is not None:
            raise SpeedSettingError(
                f"this model already has speed options ({self.speed.summary()}): use one Speed node per model and set "
                "every option there (a second Speed node would replace the first).")
        check_speed(options, self.patches, self)
        return dataclasses.replace(self, speed=options)


def place_components(placement: Placement, bundle) -> None:
    """Give the bundle's components their homes: the transformer and T5 stream in ``sequential`` mode (leaf by leaf),
    in ``block`` mode the transformer block by block and T5 leaf by leaf (its blocks sit inside ``encoder`` beside a
    tied embedding; it runs once per prompt), the VAE moves whole (its activations, not its weights, dominate the
    decode). T5 and the VAE take their devices from the placement's ``text_encoder`` and ``vae`` roles when it has
    them. The transformer remembers its placement."""
    placement.add(bundle.transformer, stream=True)
    placement.add(bundle.text_encoder, stream="leaf", role="text_encoder")
    placement.add(bundle.vae, role="vae")
    bundle.transformer.__dict__[PLACEMENT_KEY] = placement


def resolve_offload(mode: str, device: torch.device, bundle, manager=None, devices: dict | None = None) -> str:
    """``mode``, with ``"auto"`` decided from the device's free memory and the sizes of the components that run on
    it (``devices``: the roles of the components that run elsewhere, e.g. ``{"text_encoder": (cpu, cpu)}``), logged."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    device = torch.device(device)
    here = [k for k in ("transformer", "text_encoder", "vae")
            if torch.device((devices or {}).get(k, (device,))[0]) == device]
    weights = {k: v for k, v in component_bytes(bundle).items() if k in here}
    acts = stage_activation_bytes(bundle)
    stage_acts = {k: acts[k] for k in here if k in acts}
    # `none` keeps every component resident: a decode without tiling must fit beside them
    resident_peak = max([*stage_acts.values(), acts["vae_untiled"] if "vae" in here else 0])
    streamed = {"block": {k: v for k, v in block_stream_bytes(bundle).items() if k in here}}
    chosen, reason = choose_offload(free_memory(device, manager), weights, stage_acts, streamed=streamed,
                                    none_activations=resident_peak)
    logger.info("offload=auto on %s chose %r: %s", device, chosen, reason)
    return chosen


def component_bytes(bundle) -> dict:
    """Weight bytes of the base components (what ``auto`` weighs against the free memory)."""
    return {"transformer": module_bytes(bundle.transformer), "text_encoder": module_bytes(bundle.text_encoder),
            "vae": module_bytes(bundle.vae)}


def block_stream_bytes(bundle) -> dict:
    """Bytes each streamed component holds on the device in ``block`` mode (:func:`~.placement.streamed_bytes`): the
    transformer's two blocks (the running one and the prefetched one) and everything outside its blocks, two of
    T5's leaves."""
    from .placement import streamed_bytes

    out = {"transformer": streamed_bytes(bundle.transformer, "block")}
    if bundle.text_encoder is not None:
        out["text_encoder"] = streamed_bytes(bundle.text_encoder, "leaf")
    return out


# Frames, height and width each CogVideoX version was trained at (1.0: 49x480x720; 1.5: 81x768x1360): what ``auto``
# plans for
NATIVE_SIZE = {"1.0": (49, 480, 720), "1.5": (81, 768, 1360)}


def stage_activation_bytes(bundle) -> dict:
    """Activation estimates of each component's stage at the version's native size (:data:`NATIVE_SIZE`): the CFG
    batch of the transformer, T5 on one prompt, the VAE decode tiled (``vae``, the Decode node's default) and untiled
    (``vae_untiled``)."""
    from .memory import t5_activation_bytes, transformer_activation_bytes, vae_decode_activation_bytes

    cfg, vae = bundle.transformer.config, bundle.vae.config
    frames, height, width = NATIVE_SIZE[variant_of(cfg).version]
    e = torch.finfo(bundle.dtype).bits // 8
    out = {"transformer": transformer_activation_bytes(cfg, frames, height, width, element_size=e),
           "vae": vae_decode_activation_bytes(vae, height, width, tiling=True, element_size=e),
           "vae_untiled": vae_decode_activation_bytes(vae, height, width, tiling=False, element_size=e)}
    if bundle.text_encoder is not None:
        t5 = bundle.text_encoder.config
        out["text_encoder"] = t5_activation_bytes(t5.d_model, t5.d_ff, t5.num_heads, element_size=e)
    return out


# ----------------------------------------------------------------------------- loading


def _missing(path: str, what: str, searched: list[str]) -> ModelFolderError:
    lines = "\n  ".join(searched)
    return ModelFolderError(f"{what} not found: {path!r}. Paths searched:\n  {lines}")


def missing_components(folder: str, *, text_encoder: bool = True) -> list[str]:
    """The sub-folders of a diffusers CogVideoX folder that ``folder`` lacks (empty when complete). With
    ``text_encoder=False`` a folder may lack ``text_encoder/`` and ``tokenizer/`` together (a ComfyUI CLIP then
    encodes its prompts)."""
    optional = () if text_encoder or os.path.isdir(os.path.join(folder, "text_encoder")) else TEXT_COMPONENTS
    return [p for p in COMPONENTS if p not in optional and not os.path.isdir(os.path.join(folder, p))]


def find_model_folder(name: str, roots: list[str]) -> str:
    """Resolve ``name`` (a folder name or an absolute path) against ``roots``.

    Raises :class:`ModelFolderError` listing every path that was tried. ``text_encoder/`` and ``tokenizer/`` are
    optional: without them prompts are encoded by a ComfyUI T5-XXL CLIP connected to Text Encode.
    """
    candidates = [name] if os.path.isabs(name) else [os.path.join(r, name) for r in roots]
    for c in candidates:
        if os.path.isdir(c):
            missing = missing_components(c, text_encoder=False)
            if missing:
                raise ModelFolderError(
                    f"CogVideoX folder {c!r} is incomplete: missing subfolder(s) {', '.join(missing)}. "
                    "A diffusers CogVideoX folder has transformer/, vae/, scheduler/ and (unless a T5-XXL CLIP from "
                    "models/text_encoders/ encodes the prompts) text_encoder/ and tokenizer/ "
                    "(download e.g. THUDM/CogVideoX-5b completely).")
            return c
    raise _missing(name, "CogVideoX model folder", candidates or [f"(no CogVideo model folders registered) {name}"])


def find_model_file(name: str, roots: list[str], what: str = "Model file") -> str:
    """Resolve a weights file ``name`` (relative or absolute) against ``roots``, listing paths searched."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(r, name) for r in roots]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise _missing(name, what, candidates)


def read_safetensors(path: str, device: str = "cpu") -> tuple[dict, dict]:
    """Read a .safetensors file, returning (tensors, metadata), with a clear error if it is unreadable."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise _missing(path, "Weights file", [path])
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = os.path.getsize(path)
        raise WeightsFileError(
            f"Could not read {path!r} ({size} bytes) as safetensors: {e}. The file is corrupt or truncated "
            "(an interrupted download?). Delete it and download it again.") from e
    return tensors, metadata


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> str:
    """Write ``tensors`` (detached, contiguous, CPU) as .safetensors atomically: a temp file renamed
    into place, so a crash never leaves a half-written file. Non-string metadata values are JSON."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def config_from_metadata(config_class, raw, path: str, what: str, defaults: dict | None = None, **overrides):
    """A config dataclass from a file's ``config`` metadata (JSON text or a dict) over ``defaults``, ``overrides`` on
    top, with one line naming the file for anything that does not fit: unreadable JSON, unknown fields, a wrong type,
    or a value the config's own checks refuse (e.g. ``face_attention``)."""
    try:
        fields = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise WeightsFileError(f"{path!r}: its {what} config is not valid JSON ({e.msg}); re-export the file.") \
            from None
    if not isinstance(fields, dict):
        raise WeightsFileError(f"{path!r}: its {what} config is not a JSON object; re-export the file.")
    known = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise WeightsFileError(f"{path!r}: unknown {what} config field(s) {', '.join(map(repr, unknown))} (known: "
                               f"{', '.join(known)}); it was written by another version of the pack, or edited.")
    fields = {**(defaults or {}), **fields, **overrides}
    for name, value in fields.items():
        annotation = str(known[name].type).replace(" ", "")
        optional = annotation.endswith("|None")
        types = _FIELD_TYPES.get(annotation.removesuffix("|None"))
        if types is None or (value is None and optional):
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WeightsFileError(f"{path!r}: {what} config field {name!r} must be "
                                   f"{annotation.replace('|', ' or ')}, got {value!r}; fix the file or re-export it.")
    try:
        return config_class(**fields)
    except ValueError as e:
        raise WeightsFileError(f"{path!r}: {e}; fix the file's {what} config or re-export it.") from None


def check_positive(config, names) -> None:
    """Raise ValueError naming the first of ``config``'s integer fields ``names`` that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


def read_torch_pickle(path: str) -> dict:
    """Read a .bin/.pth/.pt checkpoint safely (tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise _missing(path, "Weights file", [path])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise WeightsFileError(
            f"Could not read {path!r} as a PyTorch checkpoint with weights_only=True: {e}. "
            "Only plain tensor checkpoints are accepted; re-save it as .safetensors or download it again.") from e


def load_cogvideox(
    folder: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    offload: str = "none",
    offload_device: torch.device | str = "cpu",
    transformer_file: str | None = None,
    vae_dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
    weight_skip_patterns: tuple | None = None,
    manager=None,
    devices: dict | None = None,
) -> CogVideoXBundle:
    """Load a diffusers CogVideoX folder (T2V or I2V, 1.0 or 1.5).

    ``transformer_file`` replaces the folder's transformer by a single-file checkpoint
    (diffusers or ComfyUI key names); its variant is detected from the weights. ``offload`` is one of
    :data:`~.placement.OFFLOAD_MODES` (``"auto"`` decides from the device's free memory); ``manager`` is the host's
    model manager (ComfyUI's, see ``nodes/host.py``), which then loads and evicts the components. A folder without
    ``text_encoder/`` loads without T5 (its prompts come from a ComfyUI CLIP). ``weight_dtype``: the transformer's
    weights are stored in it (e.g. ``torch.float8_e4m3fn``) and computed in ``dtype`` (diffusers' layerwise casting,
    :func:`~.speed.apply_weight_storage`; ``weight_skip_patterns``: the layers kept in ``dtype``, default the model's
    own); None or ``dtype``: stored in ``dtype``. ``devices``: ``{"text_encoder" | "vae": (execution device, offload
    device)}`` for T5 and the VAE when they run or wait elsewhere than the transformer (ComfyUI's launch flags).
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    device, offload_device = torch.device(device), torch.device(offload_device)
    if not os.path.isdir(folder):
        raise _missing(folder, "CogVideoX model folder", [folder])

    def sub(name):
        return os.path.join(folder, name)

    try:
        if transformer_file:
            base_config = CogVideoXTransformer3DModel.load_config(sub("transformer"))
            transformer = load_transformer_file(transformer_file, dtype=dtype, base_config=base_config)
        else:
            transformer = CogVideoXTransformer3DModel.from_pretrained(sub("transformer"), torch_dtype=dtype)
        vae = AutoencoderKLCogVideoX.from_pretrained(sub("vae"), torch_dtype=vae_dtype or dtype)
        text_encoder = tokenizer = None
        if os.path.isdir(sub("text_encoder")):
            text_encoder = T5EncoderModel.from_pretrained(sub("text_encoder"), dtype=text_encoder_dtype or dtype)
            tokenizer = AutoTokenizer.from_pretrained(sub("tokenizer"))
        with open(os.path.join(sub("scheduler"), "scheduler_config.json")) as f:
            scheduler_config = json.load(f)
    except (OSError, EnvironmentError) as e:
        raise ModelFolderError(f"Could not load CogVideoX from {folder!r}: {e}") from e

    for m in (transformer, vae, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    if weight_dtype is not None and weight_dtype != dtype:
        from .block_runner import block_runner
        from .speed import apply_weight_storage

        block_runner(transformer)  # the runner's hooks first (every diffusers hook wraps them)
        apply_weight_storage(transformer, weight_dtype, dtype, weight_skip_patterns)  # before placement: only the
        # stored bytes move
    parts = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 scheduler_config=scheduler_config, dtype=dtype)
    bundle = placed_bundle(parts, device=device, offload=offload, offload_device=offload_device, manager=manager,
                           devices=devices, name=os.path.basename(os.path.normpath(folder)))
    mode = bundle.offload
    logger.info("Loaded %s from %s (%s%s, offload=%s%s)", bundle.variant, folder, dtype,
                "" if weight_dtype in (None, dtype) else f" computed, weights stored in {weight_dtype}", mode,
                "" if text_encoder is not None else ", no text_encoder/: prompts need a T5-XXL CLIP")
    return bundle


def placed_bundle(parts: dict, *, device, offload: str, offload_device="cpu", manager=None, devices: dict | None = None,
                  name: str = "") -> CogVideoXBundle:
    """A bundle of loaded components (``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler_config``,
    ``dtype``) on its own placement: ``offload`` resolved (``auto``) and the placement built with the host's
    ``manager`` and per-component ``devices``, as :func:`load_cogvideox` does."""
    device, offload_device = torch.device(device), torch.device(offload_device)
    mode = resolve_offload(offload, device, types.SimpleNamespace(**parts), manager, devices)
    return CogVideoXBundle(**parts, device=device, offload=mode, offload_device=offload_device, name=name,
                           placement=Placement(device, offload_device, mode, manager, devices))


# ------------------------------------------------------------------ single-file transformer

_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def _strip_prefix(state_dict: dict) -> dict:
    for prefix in _STRIP_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


# Config fields the weights cannot reveal (RoPE grid base size, interpolation scales).
_NON_SHAPE_FIELDS = ("sample_height", "sample_width", "sample_frames", "spatial_interpolation_scale",
                     "temporal_interpolation_scale", "max_text_seq_length", "temporal_compression_ratio")


def detect_transformer_config(state_dict: dict, base_config: dict | None = None) -> dict:
    """Build a ``CogVideoXTransformer3DModel`` config from the weights' names and shapes.

    Works for 2B/5B, T2V/I2V, 1.0/1.5 and for any (e.g. tiny) width and depth. Fields that the
    weights cannot reveal come from ``base_config`` (the model folder's transformer config) when
    it is of the same version, else from the official defaults of that version.
    """
    if "patch_embed.proj.weight" not in state_dict or "patch_embed.text_proj.weight" not in state_dict:
        some = ", ".join(list(state_dict)[:5])
        raise WeightsFileError(
            "This file is not a CogVideoX transformer in diffusers/ComfyUI key format (no "
            f"'patch_embed.proj.weight'/'patch_embed.text_proj.weight'; first keys: {some}). "
            "Use a diffusers-format CogVideoX transformer checkpoint.")
    proj = state_dict["patch_embed.proj.weight"]
    inner = proj.shape[0]
    head_dim = 64 if inner % 64 == 0 else inner // 2
    out_w = state_dict["proj_out.weight"]
    config = {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")),
        "text_embed_dim": state_dict["patch_embed.text_proj.weight"].shape[1],
        "time_embed_dim": state_dict["time_embedding.linear_1.weight"].shape[0],
        "patch_bias": "patch_embed.proj.bias" in state_dict,
    }
    if proj.ndim == 2:  # CogVideoX 1.5: Linear over (p_t, p, p, C) patches
        p, p_t = 2, 2
        in_channels = proj.shape[1] // (p * p * p_t)
        config.update(patch_size=p, patch_size_t=p_t, sample_height=300, sample_width=300, sample_frames=81)
        config["out_channels"] = out_w.shape[0] // (p * p * p_t)
    else:
        p = proj.shape[-1]
        in_channels = proj.shape[1]
        config.update(patch_size=p, sample_height=60, sample_width=90, sample_frames=49)
        config["out_channels"] = out_w.shape[0] // (p * p)
    config["in_channels"] = in_channels
    if "ofs_embedding.linear_1.weight" in state_dict:
        config["ofs_embed_dim"] = state_dict["ofs_embedding.linear_1.weight"].shape[1]
    if "patch_embed.pos_embedding" in state_dict:
        config["use_learned_positional_embeddings"] = True
    # CogVideoX-2B uses sinusoidal absolute positions; every 5B and 1.5 model uses 3D RoPE.
    config["use_rotary_positional_embeddings"] = inner != 1920
    if base_config and (base_config.get("patch_size_t") is None) == (config.get("patch_size_t") is None):
        config.update({k: base_config[k] for k in _NON_SHAPE_FIELDS if k in base_config})
    return config


def load_transformer_file(path: str, *, dtype: torch.dtype = torch.bfloat16, base_config: dict | None = None):
    """Load a single-file CogVideoX transformer (``diffusion_models/*.safetensors``).

    ``base_config``: the companion folder's transformer config, for the fields weights cannot reveal.
    """
    from diffusers import CogVideoXTransformer3DModel

    if path.endswith(".safetensors"):
        state_dict, _ = read_safetensors(path)
    else:
        state_dict = read_torch_pickle(path)
        state_dict = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    state_dict = _strip_prefix(state_dict)
    config = detect_transformer_config(state_dict, base_config)
    from accelerate import init_empty_weights

    # Parameters on the meta device (no 2x memory), buffers such as position tables built for real.
    with init_empty_weights(include_buffers=False):
        model = CogVideoXTransformer3DModel.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise WeightsFileError(
            f"{path!r} does not match the detected {variant_of(model.config)} layout: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
    logger.info("Detected %s in %s", variant_of(model.config), path)
    return model.to(dtype)
