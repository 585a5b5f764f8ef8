"""MagicMirror: identity adapters for diffusers' ``CogVideoXTransformer3DModel``.

What is added to the base model (paper: ICCV 2025, arXiv 2501.03931):

* **Face branch** — a Q-Former (:class:`~.perceiver.PerceiverResampler` with 32 learned queries)
  over the CLIP *penultimate* hidden states gives ``x_face`` [N, 32, width]. The face tokens are a
  token stream of the block runner (:mod:`.block_runner`), computed only in the adapted (even-index)
  blocks, with their own LayerNorm and AdaLN ``φ_face(t, l)``.
* **CAN** — ``φ_cond(t, l, μ1_vid, x_id)`` predicts residual modulation for video and text: the 12
  shift/scale/gate factors of ``norm1``/``norm2`` in every adapted block (one module shared by all
  blocks, conditioned on a learned layer embedding).
* **Attention** — the paper feeds ``x_face`` to the full-attention and the cross-attention layers:
  in the default **two-way** form the face tokens join CogVideoX's joint attention (every token sees
  them, they see every token); in addition text and video read the face tokens through a decoupled
  cross-attention ``T_CA(W_q x, Ŵ_kv x_face)`` with new K/V projections, added to the attention result
  before the shared output projection (as IP-Adapter does). The **one-way** form (adapter config
  ``face_attention``, recorded in the file) keeps the face keys out of the text/video softmax: only the
  face queries see ``[text; video; face]``, and a fresh one-way adapter equals the base model bit for
  bit (every new output layer starts at zero).
* **ID fusion** — ``x̂_txt = m·MLP_fuse(x_id, x_txt) + (1−m)·x_txt`` on the identity tokens
  ``m`` (the class word before the trigger word, see :mod:`.text`), in the positive prompt only.

Strength scales everything MagicMirror adds — CAN, cross-attention, ID fusion — and in the two-way form the face keys'
softmax weight (a bias of log(strength) on their scores): 0 is the base model, small strengths stay close to it.

Several reference images: the ID vectors are **averaged**, the face tokens are **stacked**
(N·32 tokens). With CFG, the identity conditioning acts on the positive rows only; the
negative rows run the base model (in the two-way form as a forward of their own).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .block_runner import BlockExtension, TokenStream, block_runner
from .cogvideox import (
    BASE_MODEL_KEY,
    WeightsFileError,
    base_model_of,
    check_base_model,
    check_positive,
    config_from_metadata,
    read_safetensors,
    unrecorded_base_note,
    write_safetensors,
)
from .patches import in_dtype, run_context
from .perceiver import PerceiverResampler
from .speed import token_stream_notes

logger = logging.getLogger(__name__)

METHOD = "magicmirror"
FACE_ATTENTION = ("two-way", "one-way")


class AdapterMismatchError(ValueError):
    """An adapter file made for another base model or face encoder."""


@dataclasses.dataclass(frozen=True)
class MagicMirrorConfig:
    width: int = 3072  # transformer inner dim (heads * head_dim)
    heads: int = 48
    num_layers: int = 42
    time_embed_dim: int = 512
    text_dim: int = 4096  # T5 width
    id_dim: int = 2048  # x_id token width (PhotoMaker-V2)
    id_tokens: int = 2
    clip_dim: int = 1024  # CLIP ViT-L/14 hidden width
    face_queries: int = 32
    qformer_dim: int = 1024
    qformer_depth: int = 4
    qformer_dim_head: int = 64
    cond_dim: int = 1024  # CAN hidden width
    fuse_hidden: int = 4096
    # the base model the adapter is made for, as its variant names it ("CogVideoX-5B T2V"); None: not recorded
    base_model: str | None = None
    # "two-way": the face tokens join the joint attention (text and video see them too, as the paper feeds
    # x_face to the full-attention layers); "one-way": only the face tokens' queries see everything and text
    # and video read the faces through the decoupled cross-attention alone (a fresh adapter then equals the
    # base model exactly). Adapter files made before this option existed are one-way.
    face_attention: str = "two-way"

    def __post_init__(self):
        if self.face_attention not in FACE_ATTENTION:
            raise ValueError(f"face_attention must be one of {', '.join(map(repr, FACE_ATTENTION))}, got "
                             f"{self.face_attention!r}")
        check_positive(self, ("width", "heads", "num_layers", "time_embed_dim", "text_dim", "id_dim", "id_tokens",
                              "clip_dim", "face_queries", "qformer_dim", "qformer_depth", "qformer_dim_head",
                              "cond_dim", "fuse_hidden"))
        for name, divisor in (("width", "heads"), ("qformer_dim", "qformer_dim_head")):
            if getattr(self, name) % getattr(self, divisor):
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {divisor} "
                                 f"({getattr(self, divisor)})")

    @property
    def adapted_blocks(self) -> list[int]:
        return list(range(0, self.num_layers, 2))

    @classmethod
    def for_transformer(cls, transformer, **kwargs) -> "MagicMirrorConfig":
        c = transformer.config
        return cls(width=c.num_attention_heads * c.attention_head_dim, heads=c.num_attention_heads,
                   num_layers=c.num_layers, time_embed_dim=c.time_embed_dim, text_dim=c.text_embed_dim,
                   base_model=base_model_of(transformer), **kwargs)


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class IdentityFusion(nn.Module):
    """``MLP_fuse(x_id, x_txt) = x_txt + MLP([x_txt; x_id])`` (output layer zero-initialised)."""

    def __init__(self, text_dim: int, id_width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim + id_width)
        self.fc1 = nn.Linear(text_dim + id_width, hidden)
        self.fc2 = _zero(nn.Linear(hidden, text_dim))

    def forward(self, text: torch.Tensor, id_vec: torch.Tensor) -> torch.Tensor:
        # text [B, L, text_dim], id_vec [B, id_width] -> [B, L, text_dim]
        x = torch.cat([text, id_vec[:, None].expand(-1, text.shape[1], -1).to(text.dtype)], dim=-1)
        return text + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ConditionedAdaptiveNorm(nn.Module):
    """φ_cond(t, l, μ1_vid, x_id) -> residual modulation [B, 12 * width] (zero at init)."""

    def __init__(self, config: MagicMirrorConfig):
        super().__init__()
        c = config
        self.time_proj = nn.Linear(c.time_embed_dim, c.cond_dim)
        self.layer_embedding = nn.Embedding(len(c.adapted_blocks), c.cond_dim)
        self.mu_proj = nn.Linear(c.width, c.cond_dim)
        self.id_proj = nn.Linear(c.id_dim * c.id_tokens, c.cond_dim)
        self.out = _zero(nn.Linear(c.cond_dim, 12 * c.width))

    def condition(self, temb, id_vec):
        """The block-independent part of the conditioning: [B, cond_dim]."""
        return self.time_proj(F.silu(temb)) + self.id_proj(id_vec.to(temb.dtype))

    def forward(self, condition, layer: int, mu_vid):
        # condition [B, cond_dim] from `condition`, mu_vid [B, width] -> [B, 12 * width]
        h = condition + self.mu_proj(mu_vid) + self.layer_embedding(torch.tensor(layer, device=condition.device))
        return self.out(F.silu(h))


class FaceBlockAdapter(nn.Module):
    """Per adapted block: φ_face AdaLN for face tokens and the decoupled cross-attention K/V
    (the value projection is zero-initialised: a fresh adapter adds exactly nothing)."""

    def __init__(self, config: MagicMirrorConfig):
        super().__init__()
        w, head_dim = config.width, config.width // config.heads
        self.face_modulation = _zero(nn.Linear(config.time_embed_dim, 6 * w))
        self.face_norm1 = nn.LayerNorm(w, eps=1e-5)
        self.face_norm2 = nn.LayerNorm(w, eps=1e-5)
        self.ca_k = nn.Linear(w, w)
        self.ca_v = _zero(nn.Linear(w, w))
        self.ca_norm_k = nn.LayerNorm(head_dim, eps=1e-6)


class MagicMirrorAdapter(nn.Module):
    """All trainable MagicMirror parameters (Q-Former, fusion, CAN, per-block face adapters)."""

    # the modulation layers (face AdaLN, CAN): kept in the compute dtype under fp8 storage unless the transformer's
    # own modulation is stored in fp8 too (:func:`~.speed.store_adapter_like`), as diffusers keeps CogVideoX's "norm"
    _skip_layerwise_casting_patterns = ("face_modulation", r"^can\.")

    def __init__(self, config: MagicMirrorConfig):
        super().__init__()
        self.config = config
        c = config
        self.face_queries = nn.Parameter(torch.randn(1, c.face_queries, c.qformer_dim) / c.qformer_dim**0.5)
        self.face_qformer = PerceiverResampler(dim=c.qformer_dim, depth=c.qformer_depth, dim_head=c.qformer_dim_head,
                                               heads=c.qformer_dim // c.qformer_dim_head, embedding_dim=c.clip_dim,
                                               output_dim=c.width)
        self.fusion = IdentityFusion(c.text_dim, c.id_dim * c.id_tokens, c.fuse_hidden)
        self.can = ConditionedAdaptiveNorm(c)
        self.blocks = nn.ModuleDict({str(i): FaceBlockAdapter(c) for i in c.adapted_blocks})

    def face_tokens(self, clip_penultimate: torch.Tensor) -> torch.Tensor:
        """CLIP penultimate [N, S, clip_dim] -> stacked face tokens [1, N * 32, width]."""
        q = self.face_queries.expand(clip_penultimate.shape[0], -1, -1).to(clip_penultimate.device,
                                                                            clip_penultimate.dtype)
        return self.face_qformer(q, clip_penultimate).reshape(1, -1, self.config.width)

    @staticmethod
    def id_vector(x_id: torch.Tensor) -> torch.Tensor:
        """x_id [N, T, id_dim] -> averaged over references and flattened [1, T * id_dim]."""
        return x_id.mean(dim=0).reshape(1, -1)

    def check_compatible(self, transformer) -> None:
        """Raise :class:`AdapterMismatchError` naming both models if this adapter does not fit: its layer sizes, then
        the base model it records (1.0 / 1.5, T2V / I2V)."""
        mine = self.config
        theirs = MagicMirrorConfig.for_transformer(transformer)
        fields = ("width", "num_layers", "time_embed_dim", "text_dim", "heads")
        if any(getattr(mine, f) != getattr(theirs, f) for f in fields):
            raise AdapterMismatchError(
                f"This MagicMirror adapter was made for {mine.base_model or 'another model'} (width {mine.width}, "
                f"{mine.num_layers} layers, text dim {mine.text_dim}) but the loaded model is {theirs.base_model} "
                f"(width {theirs.width}, {theirs.num_layers} layers, text dim {theirs.text_dim}). Load the base model "
                "the adapter was trained on.")
        try:
            check_base_model(mine.base_model, transformer, "This MagicMirror adapter")
        except ValueError as e:
            raise AdapterMismatchError(str(e)) from None


# ------------------------------------------------------------------------------- injection


class MagicMirrorExtension(BlockExtension):
    """MagicMirror in the block runner (:mod:`.block_runner`).

    ``face_tokens`` [1 or B, F, width] and ``id_vec`` [1 or B, T * id_dim] are shared by the batch
    (sampling) or given per sample (training); ``identity_mask`` [1 or B, L] marks the identity tokens of
    the prompt(s). Only rows whose role is "positive" get the identity (all rows in training); in the
    one-way form the other rows compute exactly the base model in the same batch, in the two-way form
    (their text and video would see the face keys) the sampler runs them as a forward of their own.
    """

    name = "magicmirror"

    def __init__(self, adapter: MagicMirrorAdapter, face_tokens: torch.Tensor, id_vec: torch.Tensor,
                 identity_mask: torch.Tensor | None = None, strength: float = 1.0):
        self.adapter, self.face_tokens, self.id_vec = adapter, face_tokens, id_vec
        self.identity_mask, self.strength = identity_mask, strength
        self.two_way = adapter.config.face_attention == "two-way"
        self.conditional_only = self.two_way
        self.layer_of = {block: layer for layer, block in enumerate(adapter.config.adapted_blocks)}
        self.on = None  # [B] bool (CPU): rows that get the identity in the current forward
        self._fused = {}  # the prompt embeddings are the same tensor at every sampling step: fuse them once
        self._condition = None  # (temb, CAN condition) of the current forward (inference only)

    def begin(self, state, kwargs):
        self.on = state.rows("positive")
        self.id_rows = self.on.nonzero()[:, 0]
        if not self.on.any():
            return
        if self.two_way and not self.on.all():
            raise RuntimeError("MagicMirror's two-way face attention cannot leave CFG's negative rows exact in the "
                               "same forward; run them as a forward of their own (the sampler does)")
        kwargs["encoder_hidden_states"] = self._fuse(kwargs["encoder_hidden_states"])
        text = kwargs["encoder_hidden_states"]
        # two-way: every token's softmax term of the face keys is weighted by the strength, so the face tokens fade
        # out of the attention continuously as it goes to 0 (1: plain joint tokens)
        self._stream = TokenStream("face", self.face_tokens.to(text.dtype), self._modulate_face,
                                   active=self.layer_of.__contains__, joint=self.two_way,
                                   key_weight=self.strength if self.two_way else 1.0)
        state.add_stream(self._stream)

    def _fuse(self, text: torch.Tensor) -> torch.Tensor:
        """``x̂_txt = m·MLP_fuse(x_id, x_txt) + (1 − m)·x_txt`` on the identity tokens of the identity rows."""
        if self.identity_mask is None or self.strength == 0:
            return text
        if self._fused.get("source") is text and not torch.is_grad_enabled():
            return self._fused["fused"]
        b = text.shape[0]
        mask = self.identity_mask.cpu().expand(b, -1) & self.on[:, None]  # [B, L]; host-side indices, no sync
        rows, cols = (i.to(text.device) for i in mask.nonzero(as_tuple=True))
        if rows.numel() == 0:
            return text
        tokens = text[rows, cols][:, None]  # [K, 1, text_dim]: only the identity tokens are fused
        fused = self.adapter.fusion(tokens, self.id_vec.expand(b, -1)[rows])[:, 0]
        if self.strength != 1:
            fused = tokens[:, 0] + (fused - tokens[:, 0]) * self.strength
        out = text.index_put((rows, cols), fused.to(text.dtype))
        self._fused = {"source": text, "fused": out}
        return out

    def _modulate_face(self, block, index, which, x, temb):
        """φ_face: the face tokens' own LayerNorm and AdaLN (shift/scale/gate before attention and FF)."""
        ad = self.adapter.blocks[str(index)]
        if which == 1:
            self._face_mod = ad.face_modulation(F.silu(temb)).chunk(6, dim=1)
        shift, scale, gate = self._face_mod[:3] if which == 1 else self._face_mod[3:]
        normed = (ad.face_norm1 if which == 1 else ad.face_norm2)(x) * (1 + scale)[:, None, :] + shift[:, None, :]
        if which == 1:
            self._face_normed = normed  # keys/values of the decoupled cross-attention
        return normed, gate[:, None, :]

    def modulation(self, state, index, which, temb, m):
        """CAN: residual modulation ``φ_cond(t, l, μ1_vid, x_id)`` of text and video in adapted blocks."""
        layer = self.layer_of.get(index)
        if layer is None or not self.on.any():
            return m
        if which == 2:
            return m + self._delta[:, m.shape[1]:]
        can = self.adapter.can
        if torch.is_grad_enabled() or self._condition is None or self._condition[0] is not temb:
            self._condition = (temb, can.condition(temb, self.id_vec.expand(temb.shape[0], -1)))
        id_on = (self.on.to(m.device, m.dtype) * self.strength)[:, None]  # [B, 1]
        self._delta = can(self._condition[1], layer, m[:, : self.adapter.config.width]) * id_on  # [B, 12W]
        return m + self._delta[:, : m.shape[1]]

    def needs_query(self, index: int) -> bool:
        return index in self.layer_of and bool(self.on.any())

    def attention_extra(self, state, index, attn, query):
        """Decoupled cross-attention ``T_CA(W_q x, Ŵ_kv x_face)`` of the identity rows' text and video."""
        ad = self.adapter.blocks[str(index)]
        rows = self.id_rows.to(query.device)
        face = state.full_stream(self._stream, self._face_normed)[rows]  # (context parallelism: every rank's share)
        key = ad.ca_norm_k(_heads(ad.ca_k(face), attn.heads))
        value = _heads(ad.ca_v(face), attn.heads)
        return rows, F.scaled_dot_product_attention(query[rows], key, value) * self.strength


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]


@dataclasses.dataclass(frozen=True, eq=False)
class FaceEmbeds:
    """Output of the face encoder for 1..N reference images (FACE_EMBEDS in ComfyUI)."""

    arcface: torch.Tensor  # [N, 512]
    x_id: torch.Tensor  # [N, T, id_dim]  PhotoMaker-V2 ID perceiver output
    clip_penultimate: torch.Tensor  # [N, S, clip_dim]
    crops: torch.Tensor | None = None  # [N, H, W, 3] aligned face crops (preview)

    def __len__(self) -> int:
        return self.arcface.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class MagicMirrorPatch:
    """Patch injecting a MagicMirror adapter with given face embeddings (see :mod:`.patches`)."""

    adapter: MagicMirrorAdapter
    faces: FaceEmbeds
    strength: float = 1.0
    name: str = "magicmirror"
    method: str = "MagicMirror"
    _face_tokens: dict = dataclasses.field(default_factory=dict, repr=False)  # (device, dtype) -> tokens

    def face_tokens(self, adapter: MagicMirrorAdapter, device, dtype) -> torch.Tensor:
        """The Q-Former's face tokens; computed once per patch in inference (weights are frozen)."""
        if adapter.training and torch.is_grad_enabled():
            return adapter.face_tokens(self.faces.clip_penultimate.to(device, dtype))
        key = (str(device), dtype)
        if key not in self._face_tokens:
            with torch.no_grad():
                self._face_tokens[key] = adapter.face_tokens(self.faces.clip_penultimate.to(device, dtype))
        return self._face_tokens[key]

    compilable = False  # per-block adapters and a token stream: torch.compile would compile one graph per block

    @property
    def conditional_only(self) -> bool:
        return self.adapter.config.face_attention == "two-way" and self.strength != 0

    @property
    def attention_bias(self) -> str:
        """What needs a bias on the joint attention's scores ("" if nothing): the two-way face tokens' weight at a
        strength other than 0 and 1."""
        if self.adapter.config.face_attention == "two-way" and self.strength not in (0, 1):
            return f"two-way MagicMirror at strength {self.strength:g} (the face tokens' weight in the joint attention)"
        return ""

    def cache_notes(self, kind) -> list[str]:
        """What a cache (:class:`~.speed.CacheKind`) skips of MagicMirror: its face tokens ride with the others."""
        return token_stream_notes(kind, self.method, "MagicMirror's face tokens")

    def extra_tokens(self, config) -> int:
        """Face tokens the patch adds to the transformer's sequence (one Q-Former output per reference)."""
        return 0 if self.strength == 0 else self.adapter.config.face_queries * len(self.faces)

    def apply(self, transformer, context=None):
        """Strength scales the CAN modulation, the cross-attention and the ID fusion, and in the two-way form the face
        keys' weight in every token's softmax (:attr:`~.block_runner.TokenStream.key_weight`), so the output moves
        continuously from the base model; 0 turns MagicMirror off (the base model bit for bit, CFG batched)."""
        if self.strength == 0:
            return lambda: None
        self.adapter.check_compatible(transformer)
        cfg = self.adapter.config
        if self.faces.x_id.shape[-1] != cfg.id_dim or self.faces.clip_penultimate.shape[-1] != cfg.clip_dim:
            raise AdapterMismatchError(
                f"Face embeddings (x_id width {self.faces.x_id.shape[-1]}, CLIP width "
                f"{self.faces.clip_penultimate.shape[-1]}) do not fit this adapter (x_id {cfg.id_dim}, CLIP "
                f"{cfg.clip_dim}): encode the faces with the face encoder the adapter was trained with.")
        context = run_context(transformer, context)
        device, dtype = context.device, context.dtype  # the placement brought the adapter (models()) to device
        adapter = self.adapter if self.adapter.training else in_dtype(self.adapter, dtype)
        return inject_magicmirror(
            transformer, adapter, face_tokens=self.face_tokens(adapter, device, dtype),
            id_vec=adapter.id_vector(self.faces.x_id.to(device, dtype)),
            identity_mask=getattr(context.positive, "identity_mask", None), strength=self.strength)

    def models(self) -> list:
        return [self.adapter]


def inject_magicmirror(transformer, adapter: MagicMirrorAdapter, *, face_tokens: torch.Tensor, id_vec: torch.Tensor,
                       identity_mask: torch.Tensor | None = None, strength: float = 1.0):
    """Install MagicMirror into ``transformer`` until the returned undo is called (see
    :class:`MagicMirrorExtension`; which rows get the identity follows the runner's row roles)."""
    return block_runner(transformer).add(MagicMirrorExtension(adapter, face_tokens, id_vec, identity_mask, strength))


# ------------------------------------------------------------------------------ checkpoint


def save_magicmirror(path: str, adapter: MagicMirrorAdapter, extra_metadata: dict | None = None) -> None:
    """Write the adapter as .safetensors (config in metadata, and the base model it is made for under
    :data:`~.cogvideox.BASE_MODEL_KEY`), atomically."""
    base = {BASE_MODEL_KEY: adapter.config.base_model} if adapter.config.base_model else {}
    write_safetensors(path, adapter.state_dict(), {"method": METHOD, "config": dataclasses.asdict(adapter.config),
                                                   **base, **(extra_metadata or {})})


def load_magicmirror(path: str) -> MagicMirrorAdapter:
    """Read an adapter file; its config is checked field by field (one line naming the file for a value that does not
    fit), its base model is the file's record (a file without it loads with a logged note)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("method") != METHOD or "config" not in metadata:
        raise WeightsFileError(f"{path!r} is not a MagicMirror adapter (metadata method={metadata.get('method')!r}); "
                               "use a file exported by `python -m training.train_magicmirror`.")
    base = metadata.get(BASE_MODEL_KEY)  # (the config of files from before the record named the size only)
    if base is None:
        logger.warning(unrecorded_base_note(f"MagicMirror adapter {os.path.basename(path)!r}"))
    # files written before the face_attention option were all one-way
    config = config_from_metadata(MagicMirrorConfig, metadata["config"], path, "MagicMirror",
                                  defaults={"face_attention": "one-way"}, base_model=base)
    adapter = MagicMirrorAdapter(config)
    missing, unexpected = adapter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise WeightsFileError(f"{path!r}: adapter weights do not match its config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}).")
    return adapter.eval().requires_grad_(False)
