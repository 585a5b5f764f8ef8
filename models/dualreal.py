"""DualReal: identity and motion adapters blended per denoising stage by the StageBlender (ICCV 2025).

Per block (all blocks) four bottleneck adapters act on the modulated joint ``[text; video]``
tokens — ``id_attn_adapter``/``motion_attn_adapter`` after ``norm1``, ``id_ff_adapter``/
``motion_ff_adapter`` after ``norm2``. Each computes ``x + up(GELU(down(x + λ·W_cond·c)))``
(``up`` zero-initialised; only the motion adapters take the condition ``c``, a 1024-d CLIP
ViT-H/14 image embedding of a reference image). Their outputs, weighted by the blend, are added to
the attention / feed-forward outputs before the gates::

    attn += α_g · id_attn(x) + (0.2 − α_g) · motion_attn(x)

The StageBlender (``controller``) predicts α per group of blocks from the timestep embedding and
the max-pooled patch-embedded ``[text; video]`` tokens: AdaLN (shift/scale/gate from the timestep)
on a 3072→512 projection, a gated 512→2048→512 MLP, then 512→128→n_groups with a sigmoid ×0.2.
Block i belongs to group ``i // (num_layers // n_groups)`` (7 groups of 6 for the 42-layer 5B).
"Direct fusion" fixes α instead.

Initialisation, as in the official code: ``up`` is zero, so a fresh adapter returns its input and
the blend adds the documented skip term ``α·x + (0.2 − α)·x = 0.2·x`` (tested); the controller's
last layer is zero, so α starts at 0.2·sigmoid(0) = 0.1.

Weights: the pack's ``.safetensors`` (config in metadata) or the official ``adapter.pth`` (a torch
pickle ``{name: tensor}``, read with ``weights_only=True``) — same key names.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .block_runner import BlockExtension, block_runner
from .cogvideox import (
    BASE_MODEL_KEY,
    WeightsFileError,
    base_model_of,
    check_base_model,
    check_positive,
    config_from_metadata,
    read_safetensors,
    read_torch_pickle,
    unrecorded_base_note,
    write_safetensors,
)
from .patches import in_dtype, run_context
from .speed import SpeedConflictError

logger = logging.getLogger(__name__)

METHOD = "dualreal"
BLEND_SCALE = 0.2


def check_groups(num_layers: int, n_groups: int) -> None:
    """StageBlender groups must split the blocks evenly (block i is in group i // (num_layers // n_groups))."""
    if not 1 <= n_groups <= num_layers or num_layers % n_groups:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(f"n_groups={n_groups} does not divide the model's {num_layers} transformer blocks into equal "
                         f"groups; use one of {', '.join(map(str, divisors))}")


def default_groups(num_layers: int) -> int:
    """Groups of 6 blocks as the official 5B adapter (42 -> 7); otherwise the largest divisor of
    ``num_layers`` not above ``num_layers // 6`` (at least 1)."""
    return max(d for d in range(1, max(1, num_layers // 6) + 1) if num_layers % d == 0)


@dataclasses.dataclass(frozen=True)
class DualRealConfig:
    width: int = 3072
    num_layers: int = 42
    time_embed_dim: int = 512
    hidden_dim: int = 64
    condition_dim: int = 1024
    n_groups: int = 7
    controller_hidden: int = 128
    condition_lambda: float = 1.0
    # the base model the adapters are made for, as its variant names it ("CogVideoX-5B T2V"); None: not recorded
    base_model: str | None = None

    def __post_init__(self):
        check_positive(self, ("width", "num_layers", "time_embed_dim", "hidden_dim", "condition_dim",
                              "controller_hidden"))  # (n_groups: check_groups below)
        if not math.isfinite(self.condition_lambda):
            raise ValueError(f"condition_lambda must be a finite number, got {self.condition_lambda}")
        check_groups(self.num_layers, self.n_groups)

    def group_of(self, block: int) -> int:
        return block // (self.num_layers // self.n_groups)

    @classmethod
    def for_transformer(cls, transformer, **kwargs) -> "DualRealConfig":
        c = transformer.config
        n_groups = kwargs.pop("n_groups", None) or default_groups(c.num_layers)
        return cls(width=c.num_attention_heads * c.attention_head_dim, num_layers=c.num_layers,
                   time_embed_dim=c.time_embed_dim, n_groups=n_groups, base_model=base_model_of(transformer), **kwargs)


class Adapter(nn.Module):
    """``x + up(GELU(down(x + λ·condition_linear(c))))`` on [B, L, width] tokens."""

    def __init__(self, width: int, hidden: int, condition_dim: int | None = None):
        super().__init__()
        self.down_linear = nn.Linear(width, hidden)
        self.up_linear = nn.Linear(hidden, width)
        self.condition_linear = nn.Linear(condition_dim, width) if condition_dim else None
        nn.init.zeros_(self.up_linear.weight)
        nn.init.zeros_(self.up_linear.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
        h = x
        if self.condition_linear is not None and condition is not None:
            h = h + lam * self.condition_linear(condition)  # condition [B or 1, 1, C] broadcasts over tokens
        return self.up_linear(F.gelu(self.down_linear(h))) + x


class BlockAdapters(nn.Module):
    def __init__(self, config: DualRealConfig):
        super().__init__()
        w, hd, cd = config.width, config.hidden_dim, config.condition_dim
        self.id_attn_adapter = Adapter(w, hd)
        self.id_ff_adapter = Adapter(w, hd)
        self.motion_attn_adapter = Adapter(w, hd, cd)
        self.motion_ff_adapter = Adapter(w, hd, cd)


class StageBlender(nn.Module):
    """The controller: (timestep embedding [B, te], patch tokens [B, L, width]) -> α [B, n_groups] in (0, 0.2)."""

    def __init__(self, config: DualRealConfig):
        super().__init__()
        te, w = config.time_embed_dim, config.width
        self.timestep_encoder = nn.Sequential(nn.SiLU(), nn.Linear(te, 3 * te))
        self.channel_encoder = nn.Sequential(nn.Linear(w, te))
        self.norm = nn.LayerNorm(te, eps=1e-5)
        self.fuse_proj = nn.Linear(te, 4 * te)
        self.fuse_proj_down = nn.Linear(4 * te, te)
        self.fusion_net = nn.Sequential(nn.ReLU(), nn.Linear(te, config.controller_hidden), nn.ReLU(),
                                        nn.Linear(config.controller_hidden, config.n_groups), nn.Sigmoid())
        nn.init.zeros_(self.fusion_net[3].weight)
        nn.init.zeros_(self.fusion_net[3].bias)

    def forward(self, temb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.timestep_encoder(temb).chunk(3, dim=1)
        c = self.channel_encoder(tokens.max(dim=1)[0])  # [B, te]
        h = self.norm(c) * (1 + scale) + shift
        h = self.fuse_proj_down(F.gelu(self.fuse_proj(h), approximate="tanh")) + gate * c
        return self.fusion_net(h) * BLEND_SCALE


class DualRealAdapters(nn.Module):
    """All DualReal weights; parameter names equal the official ``adapter.pth`` keys."""

    def __init__(self, config: DualRealConfig):
        super().__init__()
        self.config = config
        self.transformer_blocks = nn.ModuleList(BlockAdapters(config) for _ in range(config.num_layers))
        self.controller = StageBlender(config)

    def parameters_of(self, kind: str):
        """Parameters of the ``"id"`` or ``"motion"`` adapters (for per-task gradient masking)."""
        return [p for n, p in self.named_parameters() if f".{kind}_" in n]

    def check_compatible(self, transformer) -> None:
        """Raise ValueError naming both models if these adapters do not fit: their layer sizes, then the base model
        they record (1.0 / 1.5, T2V / I2V)."""
        mine, theirs = self.config, DualRealConfig.for_transformer(transformer)
        if (mine.width, mine.num_layers, mine.time_embed_dim) != (theirs.width, theirs.num_layers, theirs.time_embed_dim):
            raise ValueError(f"This DualReal adapter was made for {mine.base_model or 'another model'} (width "
                             f"{mine.width}, {mine.num_layers} layers) but the loaded model is {theirs.base_model} "
                             f"(width {theirs.width}, {theirs.num_layers} layers).")
        check_base_model(mine.base_model, transformer, "This DualReal adapter")


# ------------------------------------------------------------------------------- injection


class DualRealExtension(BlockExtension):
    """DualReal in the block runner (:mod:`.block_runner`): the StageBlender reads block 0's inputs, the
    four adapters add their blended outputs to every block's attention and feed-forward outputs.

    ``alpha`` holds α [B, n_groups] of the current forward; with ``record`` the α of the positive row of
    every forward is kept in ``history`` (one entry per denoising step).
    """

    name = "dualreal"

    def __init__(self, adapters: DualRealAdapters, condition: torch.Tensor | None, *, fixed_alpha: float | None = None,
                 record: bool = True):
        if fixed_alpha is not None and not 0.0 <= fixed_alpha <= BLEND_SCALE:
            raise ValueError(f"fixed alpha must be within [0, {BLEND_SCALE}] (identity x alpha, motion x "
                             f"({BLEND_SCALE} - alpha)), got {fixed_alpha}")
        self.adapters, self.condition, self.fixed_alpha, self.record = adapters, condition, fixed_alpha, record
        self.alpha: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []
        self._record_row = None

    def begin(self, state, kwargs):
        positive = [i for i, role in enumerate(state.roles) if role == "positive"]
        self._record_row = positive[-1] if self.record and positive else None

    def before_block(self, state, index, video, text, temb):
        if index != 0:
            return
        if self.fixed_alpha is None:
            tokens = torch.cat([text, video], dim=1)  # patch-embedded [text; video]
            if state.cp is not None:  # this rank's share: the controller's max over tokens is the max of the shares'
                tokens = torch.cat(list(state.cp.gather(tokens.amax(dim=1, keepdim=True)).unbind(0)), dim=1)
            self.alpha = self.adapters.controller(temb, tokens)
        else:
            self.alpha = temb.new_full((temb.shape[0], self.adapters.config.n_groups), self.fixed_alpha)
        if self._record_row is not None and not self.alpha.is_meta:  # (FLOP counting runs on the meta device)
            self.history.append(self.alpha[self._record_row].detach().float().cpu())

    def _residual(self, index, kind, norm_text, norm_video, out_text, out_video):
        """``α·id(x) + (0.2 − α)·motion(x, c)`` on ``x = [text; video]``, added to the outputs. The two adapters run
        as one: their down projections stacked (x read once), the blend weights folded into the stacked up
        projection, and their skip terms summed to ``0.2·x``: the same as the official sum of the two adapters'
        outputs (x + up(GELU(down(x + λ·W_c·c)))), to rounding (tested)."""
        ident = getattr(self.adapters.transformer_blocks[index], f"id_{kind}_adapter")
        motion = getattr(self.adapters.transformer_blocks[index], f"motion_{kind}_adapter")
        x = torch.cat([norm_text, norm_video], dim=1)  # [B, S, W]
        alpha = self.alpha[:, self.adapters.config.group_of(index)].to(x.dtype).view(-1, 1, 1)  # [B, 1, 1]
        beta = BLEND_SCALE - alpha
        # the weights are read here, not through their layers' forwards: on x's device (copies of the ones a host
        # left on the CPU, e.g. ComfyUI under --novram; a no-op otherwise)
        down = [a.down_linear.weight.to(x.device) for a in (ident, motion)]
        up = [a.up_linear.weight.to(x.device) for a in (ident, motion)]
        up_bias = [a.up_linear.bias.to(x.device) for a in (ident, motion)]
        hidden = F.linear(x, torch.cat(down), torch.cat([a.down_linear.bias.to(x.device) for a in (ident, motion)]))
        width = ident.down_linear.out_features  # hidden [B, S, 2h]
        if self.condition is not None and motion.condition_linear is not None:  # down(x + λ·W_c·c), linear in c
            c = self.adapters.config.condition_lambda * motion.condition_linear(self.condition.to(x.dtype))
            hidden = hidden + F.pad(F.linear(c, down[1]), (width, 0))  # [B or 1, 1, 2h]
        hidden = F.gelu(hidden)
        hidden = torch.cat([hidden[..., :width] * alpha, hidden[..., width:] * beta], dim=-1)
        add = F.linear(hidden, torch.cat(up, dim=1))
        add = add + (alpha * up_bias[0] + beta * up_bias[1]) + BLEND_SCALE * x
        n = norm_text.shape[1]
        return out_text + add[:, :n], out_video + add[:, n:]

    def attention_residual(self, state, index, norm_text, norm_video, out_text, out_video):
        return self._residual(index, "attn", norm_text, norm_video, out_text, out_video)

    def ff_residual(self, state, index, norm_text, norm_video, out_text, out_video):
        return self._residual(index, "ff", norm_text, norm_video, out_text, out_video)

    def outputs(self) -> dict:
        return {"dualreal_alpha": torch.stack(self.history)} if self.history else {}  # [steps, groups]


def inject_dualreal(transformer, adapters: DualRealAdapters, condition: torch.Tensor | None, *,
                    fixed_alpha: float | None = None, record: bool = True) -> tuple:
    """Install DualReal until the returned undo is called; returns ``(undo, extension)``."""
    adapters.check_compatible(transformer)
    extension = DualRealExtension(adapters, condition, fixed_alpha=fixed_alpha, record=record)
    return block_runner(transformer).add(extension), extension


@dataclasses.dataclass(frozen=True, eq=False)
class DualRealPatch:
    """Patch for sampling; :meth:`outputs` gives α [steps, n_groups] of the last run (positive row)."""

    adapters: DualRealAdapters
    condition: torch.Tensor | None  # [1, 1, condition_dim] CLIP image embedding of the reference
    fixed_alpha: float | None = None
    name: str = "dualreal"
    method: str = "DualReal"
    _last: list = dataclasses.field(default_factory=list, repr=False)  # the extension of the last run
    compilable = False  # per-block adapters picked by index: torch.compile would compile one graph per block

    def cache_notes(self, kind) -> list[str]:
        """What a cache (:class:`~.speed.CacheKind`) skips of DualReal: nothing of the blend when block 0 runs every
        step; a cache whose cached steps skip block 0 (where the StageBlender blends) is refused."""
        if kind.skips_block_zero:
            raise SpeedConflictError(
                f"{kind.name} cannot act with DualReal: it skips block 0 on cached steps, where DualReal's "
                "StageBlender computes the blend of each step, so the blend would not follow the denoising stage. Use "
                "first_block_cache (block 0 always runs), taylorseer, pyramid_attention_broadcast or faster_cache.")
        if kind.skips_blocks:
            return [f"{kind.name} with DualReal: block 0 always runs, so the StageBlender blends and records alpha "
                    "every step; skipped blocks reuse the adapters' output of the computed step"]
        return []

    def apply(self, transformer, context=None):
        context = run_context(transformer, context)
        device, dtype = context.device, context.dtype  # the placement brought the adapters (models()) to device
        adapters = in_dtype(self.adapters, dtype)
        cond = None if self.condition is None else self.condition.to(device, dtype)
        undo, extension = inject_dualreal(transformer, adapters, cond, fixed_alpha=self.fixed_alpha)
        self._last[:] = [extension]
        return undo

    def models(self) -> list:
        return [self.adapters]

    def outputs(self) -> dict:
        return self._last[0].outputs() if self._last else {}


# ------------------------------------------------------------------------------ checkpoints

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def config_from_state_dict(state_dict: dict, base_model: str | None = None) -> DualRealConfig:
    """Read a DualRealConfig off the weights (official adapter.pth has no config)."""
    try:
        down = state_dict["transformer_blocks.0.id_attn_adapter.down_linear.weight"]
        cond = state_dict["transformer_blocks.0.motion_attn_adapter.condition_linear.weight"]
        te = state_dict["controller.timestep_encoder.1.weight"].shape[1]
        last = state_dict["controller.fusion_net.3.weight"]
    except KeyError as e:
        raise WeightsFileError(f"not a DualReal adapter: missing {e.args[0]!r} (expected keys like "
                               "transformer_blocks.0.id_attn_adapter.down_linear.weight and controller.*)") from e
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k)))
    return DualRealConfig(width=down.shape[1], num_layers=layers, time_embed_dim=te, hidden_dim=down.shape[0],
                          condition_dim=cond.shape[1], n_groups=last.shape[0], controller_hidden=last.shape[1],
                          base_model=base_model)


# The official code (github.com/wenc-k/DualReal) trains on THUDM/CogVideoX-5b only, so an official adapter.pth (which
# records nothing) of that model's layout (width 3072, 42 blocks) is taken as made for it.
OFFICIAL_BASE_MODEL = "CogVideoX-5B T2V"
OFFICIAL_LAYOUT = (3072, 42)


def load_dualreal(path: str) -> DualRealAdapters:
    """Load the pack's ``.safetensors`` or the official ``adapter.pth`` (weights_only pickle). The base model is the
    file's record; an official ``adapter.pth`` of the 5B layout is CogVideoX-5B T2V (the official code's only base);
    other files without the record load with a logged note."""
    name = os.path.basename(path)
    if path.endswith((".safetensors", ".sft")):
        tensors, metadata = read_safetensors(path)
        base = metadata.get(BASE_MODEL_KEY)
    else:
        tensors, metadata = read_torch_pickle(path), {}
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise WeightsFileError(f"{path!r}: expected a {{name: tensor}} DualReal adapter checkpoint")
        base = None
    try:
        if "config" in metadata:
            config = config_from_metadata(DualRealConfig, metadata["config"], path, "DualReal", base_model=base)
        else:
            config = config_from_state_dict(tensors, base)
            if base is None and not path.endswith((".safetensors", ".sft")) and \
                    (config.width, config.num_layers) == OFFICIAL_LAYOUT:
                config = dataclasses.replace(config, base_model=OFFICIAL_BASE_MODEL)
                logger.info("DualReal adapter %r: an official adapter.pth (no base model recorded), taken as made for "
                            "%s as the official code trains on THUDM/CogVideoX-5b", name, OFFICIAL_BASE_MODEL)
    except WeightsFileError:
        raise
    except ValueError as e:  # e.g. a controller whose group count does not split the blocks
        raise WeightsFileError(f"{path!r} is not a usable DualReal adapter: {e}") from None
    if config.base_model is None:
        logger.warning(unrecorded_base_note(f"DualReal adapter {name!r}"))
    adapters = DualRealAdapters(config)
    missing, unexpected = adapters.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise WeightsFileError(f"{path!r}: DualReal weights do not match (missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]})")
    return adapters.eval().requires_grad_(False)


def save_dualreal(path: str, adapters: DualRealAdapters, extra_metadata: dict | None = None) -> None:
    """Write the adapters as .safetensors (config in metadata, official key names, and the base model they are made
    for under :data:`~.cogvideox.BASE_MODEL_KEY`), atomically."""
    base = {BASE_MODEL_KEY: adapters.config.base_model} if adapters.config.base_model else {}
    write_safetensors(path, adapters.state_dict(), {"method": METHOD, "config": dataclasses.asdict(adapters.config),
                                                    **base, **(extra_metadata or {})})
