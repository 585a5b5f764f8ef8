"""MagicMirror: identity adapters for diffusers' ``CogVideoXTransformer3DModel``.

What is added to the base model (paper: ICCV 2025, arXiv 2501.03931):

* **Face branch** — a Q-Former (:class:`~.perceiver.PerceiverResampler` with 32 learned queries)
  over the CLIP *penultimate* hidden states gives ``x_face`` [N, 32, width]. The face tokens form
  an extra stream that travels with the text tokens through the transformer and is updated only in
  the adapted (even-index) blocks, with their own AdaLN ``φ_face(t, l)``.
* **CAN** — ``φ_cond(t, l, μ1_vid, x_id)`` predicts residual modulation for video and text: the 12
  shift/scale/gate factors of ``norm1``/``norm2`` in every adapted block (one module shared by all
  blocks, conditioned on a learned layer embedding).
* **Attention** — face tokens are queries over the joint ``[text; video; face]`` keys; text and video
  read the face tokens through a decoupled cross-attention ``T_CA(W_q x, Ŵ_kv x_face)`` with new
  K/V projections, added to the attention result before the shared output projection (as
  IP-Adapter does). The base softmax over ``[text; video]`` is left untouched, so that
* **Zero init** — with every new output layer at zero (a fresh adapter), the patched model computes
  exactly what the base model computes (tests hold this bit for bit).
* **ID fusion** — ``x̂_txt = m·MLP_fuse(x_id, x_txt) + (1−m)·x_txt`` on the identity tokens
  ``m`` (the class word before the trigger word, see :mod:`.text`), in the positive prompt only.

Several reference images: the ID vectors are **averaged**, the face tokens are **stacked**
(N·32 tokens). With CFG, the identity conditioning acts on the positive rows only; the
negative rows run the base model.

Injection works without forking diffusers: for one sampling run the patch swaps the
``transformer_blocks`` for thin wrapper modules (the original blocks inside) and adds a forward
pre-hook for the text fusion; both are undone afterwards.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from .cogvideox import WeightsFileError, read_safetensors, variant_of, write_safetensors
from .patches import replace_blocks
from .perceiver import PerceiverResampler

METHOD = "magicmirror"


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
    base_model: str = "CogVideoX-5B"

    @property
    def adapted_blocks(self) -> list[int]:
        return list(range(0, self.num_layers, 2))

    @classmethod
    def for_transformer(cls, transformer, **kwargs) -> "MagicMirrorConfig":
        c = transformer.config
        return cls(width=c.num_attention_heads * c.attention_head_dim, heads=c.num_attention_heads,
                   num_layers=c.num_layers, time_embed_dim=c.time_embed_dim, text_dim=c.text_embed_dim,
                   base_model=str(variant_of(c)).rsplit(" ", 1)[0], **kwargs)


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
        h = condition + self.mu_proj(mu_vid) + self.layer_embedding.weight[layer]
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
        q = self.face_queries.expand(clip_penultimate.shape[0], -1, -1).to(clip_penultimate.dtype)
        return self.face_qformer(q, clip_penultimate).reshape(1, -1, self.config.width)

    @staticmethod
    def id_vector(x_id: torch.Tensor) -> torch.Tensor:
        """x_id [N, T, id_dim] -> averaged over references and flattened [1, T * id_dim]."""
        return x_id.mean(dim=0).reshape(1, -1)

    def check_compatible(self, transformer) -> None:
        """Raise :class:`AdapterMismatchError` naming both models if this adapter does not fit."""
        mine = self.config
        theirs = MagicMirrorConfig.for_transformer(transformer)
        fields = ("width", "num_layers", "time_embed_dim", "text_dim", "heads")
        if any(getattr(mine, f) != getattr(theirs, f) for f in fields):
            raise AdapterMismatchError(
                f"This MagicMirror adapter was made for {mine.base_model} (width {mine.width}, {mine.num_layers} "
                f"layers, text dim {mine.text_dim}) but the loaded model is {theirs.base_model} (width "
                f"{theirs.width}, {theirs.num_layers} layers, text dim {theirs.text_dim}). Load the base model the "
                "adapter was trained on.")


# ------------------------------------------------------------------------------- injection


@dataclasses.dataclass
class RunState:
    """Per-forward identity inputs, set by the transformer pre-hook, read by the block wrappers."""

    face_tokens: torch.Tensor  # [1, F, width]
    id_vec: torch.Tensor  # [1, T * id_dim]
    strength: float = 1.0
    id_on: torch.Tensor | None = None  # [B] bool (CPU): rows that get the identity; the others run the base model
    id_rows: torch.Tensor | None = None  # [R] long (CPU): id_on.nonzero(), computed once per forward
    condition_cache: tuple | None = None  # (temb, CAN condition) of the current forward (inference only)

    @property
    def num_face(self) -> int:
        return self.face_tokens.shape[1]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def joint_attention(attn, adapter: FaceBlockAdapter, norm_h, norm_t, norm_f, rotary, id_rows, strength):
    """CogVideoX joint attention (op for op as diffusers' processor) plus the face paths.

    ``id_rows``: batch rows that get the identity (the others compute exactly the base model).
    Returns (video out, text out, face out).
    """
    from diffusers.models.embeddings import apply_rotary_emb

    text_len = norm_t.size(1)
    x = torch.cat([norm_t, norm_h], dim=1)
    query, key, value = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # Decoupled cross-attention: [text; video] queries (before RoPE: face keys carry no position)
    # over new K/V of the face tokens, for the identity rows only.
    ca_k = adapter.ca_norm_k(_heads(adapter.ca_k(norm_f[id_rows]), attn.heads))
    ca_v = _heads(adapter.ca_v(norm_f[id_rows]), attn.heads)
    ca = F.scaled_dot_product_attention(query[id_rows], ca_k, ca_v)
    if rotary is not None:
        query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary)
        key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.index_add(0, id_rows, ca, alpha=strength)  # IP-Adapter style: added before the shared to_out
    out = attn.to_out[1](attn.to_out[0](_merge(out)))
    out_t, out_h = out.split([text_len, out.size(1) - text_len], dim=1)

    # Face tokens: queries over [text; video; face]. Few queries, so the softmax over the two key
    # sets is written out instead of concatenating (copying) the long text+video K/V.
    fq, fk, fv = (_heads(proj(norm_f), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        fq, fk = attn.norm_q(fq), attn.norm_k(fk)
    scale = fq.shape[-1] ** -0.5
    scores = torch.cat([fq @ key.transpose(-2, -1), fq @ fk.transpose(-2, -1)], dim=-1) * scale
    probs = scores.float().softmax(dim=-1).to(fv.dtype)  # [B, H, F, S + F]
    seq = key.shape[2]
    face = probs[..., :seq] @ value + probs[..., seq:] @ fv
    out_f = attn.to_out[1](attn.to_out[0](_merge(face)))
    return out_h, out_t, out_f


class MagicMirrorBlock(nn.Module):
    """Wraps one ``CogVideoXBlock``: carries the face stream; adapts even-index blocks."""

    def __init__(self, block, index: int, adapter: MagicMirrorAdapter, state: RunState):
        super().__init__()
        self.wrapped, self.index = block, index
        self.adapter = adapter
        self.state = state
        self.first, self.last = index == 0, index == adapter.config.num_layers - 1
        self.layer = adapter.config.adapted_blocks.index(index) if index in adapter.config.adapted_blocks else None

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        state = self.state
        if self.first:
            text = encoder_hidden_states
            face = state.face_tokens.to(text.dtype).expand(text.shape[0], -1, -1)
        else:
            text, face = encoder_hidden_states.split(
                [encoder_hidden_states.size(1) - state.num_face, state.num_face], dim=1)
        if self.layer is None:
            hidden_states, text = self.wrapped(hidden_states, text, temb, image_rotary_emb, attention_kwargs)
        else:
            hidden_states, text, face = self._adapted(hidden_states, text, face, temb, image_rotary_emb)
        if self.last:
            return hidden_states, text
        return hidden_states, torch.cat([text, face], dim=1)

    def _adapted(self, h, text, face, temb, rotary):
        blk, ad, state = self.wrapped, self.adapter.blocks[str(self.index)], self.state
        width = self.adapter.config.width
        id_on = (state.id_on.to(h.device, h.dtype) * state.strength)[:, None]  # [B, 1]
        m1 = blk.norm1.linear(blk.norm1.silu(temb))  # [B, 6W]: shift, scale, gate (video), same (text)
        m2 = blk.norm2.linear(blk.norm2.silu(temb))
        if torch.is_grad_enabled() or state.condition_cache is None or state.condition_cache[0] is not temb:
            state.condition_cache = (temb, self.adapter.can.condition(temb, state.id_vec.expand(h.shape[0], -1)))
        delta = self.adapter.can(state.condition_cache[1], self.layer, m1[:, :width]) * id_on
        m1, m2 = m1 + delta[:, : 6 * width], m2 + delta[:, 6 * width:]
        fm = ad.face_modulation(F.silu(temb)).chunk(6, dim=1)  # face shift/scale/gate x2

        shift, scale, gate, e_shift, e_scale, e_gate = m1.chunk(6, dim=1)
        norm_h = blk.norm1.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        norm_t = blk.norm1.norm(text) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
        norm_f = ad.face_norm1(face) * (1 + fm[1])[:, None, :] + fm[0][:, None, :]
        id_rows = state.id_rows.to(h.device)
        out_h, out_t, out_f = joint_attention(blk.attn1, ad, norm_h, norm_t, norm_f, rotary, id_rows, state.strength)
        h = h + gate[:, None, :] * out_h
        text = text + e_gate[:, None, :] * out_t
        face = face + fm[2][:, None, :] * out_f

        shift, scale, gate, e_shift, e_scale, e_gate = m2.chunk(6, dim=1)
        norm_h = blk.norm2.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        norm_t = blk.norm2.norm(text) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
        ff = blk.ff(torch.cat([norm_t, norm_h], dim=1))
        text_len = text.size(1)
        h = h + gate[:, None, :] * ff[:, text_len:]
        text = text + e_gate[:, None, :] * ff[:, :text_len]
        norm_f = ad.face_norm2(face) * (1 + fm[4])[:, None, :] + fm[3][:, None, :]
        face = face + fm[5][:, None, :] * blk.ff(norm_f)
        return h, text, face


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

    def apply(self, transformer, context=None):
        self.adapter.check_compatible(transformer)
        cfg = self.adapter.config
        if self.faces.x_id.shape[-1] != cfg.id_dim or self.faces.clip_penultimate.shape[-1] != cfg.clip_dim:
            raise AdapterMismatchError(
                f"Face embeddings (x_id width {self.faces.x_id.shape[-1]}, CLIP width "
                f"{self.faces.clip_penultimate.shape[-1]}) do not fit this adapter (x_id {cfg.id_dim}, CLIP "
                f"{cfg.clip_dim}): encode the faces with the face encoder the adapter was trained with.")
        param = next(transformer.parameters())
        adapter = self.adapter.to(param.device) if self.adapter.training else self.adapter.to(param.device, param.dtype)
        return inject_magicmirror(
            transformer, adapter, face_tokens=self.face_tokens(adapter, param.device, param.dtype),
            id_vec=adapter.id_vector(self.faces.x_id.to(param.device, param.dtype)),
            identity_mask=getattr(getattr(context, "positive", None), "identity_mask", None),
            batch_roles=getattr(context, "batch_roles", None), strength=self.strength)


def inject_magicmirror(transformer, adapter: MagicMirrorAdapter, *, face_tokens: torch.Tensor, id_vec: torch.Tensor,
                       identity_mask: torch.Tensor | None = None, batch_roles=None, strength: float = 1.0):
    """Install MagicMirror into ``transformer`` until the returned undo is called.

    ``face_tokens`` [1 or B, F, width] and ``id_vec`` [1 or B, T * id_dim] are shared by the batch
    (sampling) or given per sample (training). ``identity_mask`` [1 or B, L] marks the identity
    tokens of the prompt(s); ``batch_roles`` names the rows (rows other than "positive" run the base
    model); without roles every row gets the identity.
    """
    state = RunState(face_tokens=face_tokens, id_vec=id_vec, strength=strength)
    cache = {}  # the prompt embeddings are the same tensor at every sampling step: fuse them once

    def pre_hook(module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        b = text.shape[0]
        # Row/column indices are known on the host: no device sync, works on any device.
        if batch_roles is not None and len(batch_roles) == b:
            state.id_on = torch.tensor([r == "positive" for r in batch_roles])
        else:
            state.id_on = torch.ones(b, dtype=torch.bool)
        state.id_rows = state.id_on.nonzero()[:, 0]
        if identity_mask is None or strength == 0:
            return args, kwargs
        if cache.get("source") is text and not torch.is_grad_enabled():
            kwargs["encoder_hidden_states"] = cache["fused"]
            return args, kwargs
        mask = identity_mask.cpu().expand(b, -1) & state.id_on[:, None]  # [B, L]
        rows, cols = (i.to(text.device) for i in mask.nonzero(as_tuple=True))
        if rows.numel() == 0:
            return args, kwargs
        tokens = text[rows, cols][:, None]  # [K, 1, text_dim]: only the identity tokens are fused
        ids = id_vec.expand(b, -1)[rows]
        fused = adapter.fusion(tokens, ids)[:, 0]
        if strength != 1:
            fused = tokens[:, 0] + (fused - tokens[:, 0]) * strength
        out = text.index_put((rows, cols), fused.to(text.dtype))
        cache.update(source=text, fused=out)
        kwargs["encoder_hidden_states"] = out
        return args, kwargs

    return replace_blocks(transformer, lambda i, block: MagicMirrorBlock(block, i, adapter, state), pre_hook)


# ------------------------------------------------------------------------------ checkpoint


def save_magicmirror(path: str, adapter: MagicMirrorAdapter, extra_metadata: dict | None = None) -> None:
    """Write the adapter as .safetensors (config in metadata), atomically."""
    write_safetensors(path, adapter.state_dict(), {"method": METHOD, "config": dataclasses.asdict(adapter.config),
                                                   **(extra_metadata or {})})


def load_magicmirror(path: str) -> MagicMirrorAdapter:
    tensors, metadata = read_safetensors(path)
    if metadata.get("method") != METHOD or "config" not in metadata:
        raise WeightsFileError(f"{path!r} is not a MagicMirror adapter (metadata method={metadata.get('method')!r}); "
                               "use a file exported by `python -m training.train_magicmirror`.")
    config = MagicMirrorConfig(**json.loads(metadata["config"]))
    adapter = MagicMirrorAdapter(config)
    missing, unexpected = adapter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise WeightsFileError(f"{path!r}: adapter weights do not match its config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}).")
    return adapter.eval().requires_grad_(False)
