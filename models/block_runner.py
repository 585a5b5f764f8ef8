"""One CogVideoX block runner with extension points that every method registers into.

diffusers' ``CogVideoXBlock.forward`` is computed here, once, op for op (with nothing registered the
runner is bit-identical to the unmodified transformer), with named places where a method adds its part:

* **token streams** (:class:`TokenStream`) — extra tokens carried beside the video tokens through the
  blocks (MagicMirror's face tokens, subject-reference tokens), each with its own normalisation and
  modulation, its own RoPE rows, the blocks it takes part in, and whether it joins the joint attention
  (every token sees it, with a weight: its keys' softmax terms times ``key_weight``) or only queries it (its
  queries see all keys, no other token sees its keys);
* **modulation** — a change of the ``norm1``/``norm2`` modulation of text and video (MagicMirror's CAN);
* **extra attention** — text and video queries over extra keys/values, added before the attention's
  output projection (MagicMirror's decoupled cross-attention);
* **residuals** — additions to the attention and feed-forward outputs before the gates (DualReal);
* **before_block** — per-block work on the block's inputs (the StageBlender reads block 0's tokens);
* **per-forward state** and **outputs** (α history) — :class:`BlockExtension`.

The runner is installed on each ``transformer_blocks[i]`` as the innermost diffusers hook (a
``ModelHook`` with ``new_forward``), so the blocks stay the units diffusers' own hooks attach to: group
offloading onloads per block, layerwise casting per leaf layer, caches per block, and they wrap the
runner. Its per-forward start (:meth:`BlockRunner._begin`) is likewise the innermost diffusers hook on the
transformer itself, so transformer-level hooks (FasterCache's denoiser hook, which may drop CFG's negative rows;
block-level group offloading, which onloads the embeddings) run before it and it sees the batch the blocks get.
Every leaf module (``norm1.linear``, ``attn1``, ``ff`` ...) is called as a module, so their hooks
(LoRA, casting, offloading) fire, and the attention goes through the model's own attention processor.

A sampling run may pass an interrupt check (:meth:`BlockRunner.interrupts`): a forward pre-hook on every block calls
it before the block's own diffusers hooks, so a cancel lands within one block's time and a block it stops was neither
onloaded nor started by a cache.

Streams ride inside ``hidden_states``: a forward hook on ``patch_embed`` puts them there
(``[lead streams; video; trailing streams]``) and a pre-hook on ``norm_final`` takes them out, so every
block receives and returns tensors of one shape. The per-forward state travels with the blocks' own
``attention_kwargs`` (key :data:`STATE_KEY`), so gradient checkpointing recomputes a block with the
state of the forward that ran it.

Under context parallelism (:mod:`.context_parallel`) the blocks see this rank's share of the sequence: the text and
video shares diffusers' hooks split at the first block, and of each stream its share (a stream in the joint
attention, padded to a multiple of the degree with tokens whose keys are masked) or all of it (a query-only stream,
whose attention is merged over the group). ``hidden_states`` is then laid out as one group of ``[lead streams;
video; trailing streams]`` shares per rank, so diffusers' equal split hands every rank its own group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

STATE_KEY = "_mmv_forward"
HOOK_NAME = "magicmirror_video.block_runner"
FORWARD_HOOK_NAME = "magicmirror_video.block_runner.forward"
ROLES = ("positive", "negative")
# attention processors that add the ``attention_mask`` they are given to the attention scores (a joint stream with a
# key weight other than 1 needs one); the dispatcher copy only with the native backend (flash and sage take no mask)
BIAS_PROCESSORS = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0", "CogVideoXDispatchAttnProcessor")


@dataclasses.dataclass(eq=False)
class TokenStream:
    """Extra tokens carried through the blocks beside the video tokens.

    ``modulate(block, index, which, x, temb) -> (normed [B, n, D], gate [B, 1, D])`` normalises and
    modulates the stream before the attention (``which`` = 1) and the feed-forward (``which`` = 2).
    """

    name: str
    tokens: torch.Tensor  # [B, n, D] as the stream enters the first block
    modulate: Callable
    lead: bool = False  # True: before the video tokens (reference frames); False: after them
    rotary: tuple | None = None  # (cos, sin) [n, head_dim] RoPE rows; None: no rotation (identity rows)
    active: Callable[[int], bool] = lambda index: True  # blocks that compute it; elsewhere it passes through
    joint: bool = True  # in the joint attention; False: its queries see every key, nobody sees its keys
    # joint streams: every query's softmax term of these keys is multiplied by it (log(key_weight) added to their
    # scores); 1: plain tokens; towards 0 the stream fades out of the other tokens' attention continuously
    key_weight: float = 1.0

    @property
    def count(self) -> int:
        return self.tokens.shape[1]


class BlockExtension:
    """A method's additions to the blocks for one sampling run or training step (every hook optional).

    ``conditional_only``: the method must not act on CFG's negative rows and cannot leave them exact
    when batched with the positive rows; the sampler then runs the negative prompt as its own forward.
    """

    name = "extension"
    conditional_only = False

    def begin(self, state: "ForwardState", kwargs: dict) -> None:
        """Once per transformer forward, before the patch embedding: add streams, edit the forward's
        keyword arguments (prompt embeddings, RoPE)."""

    def before_block(self, state: "ForwardState", index: int, video, text, temb) -> None:
        """Before block ``index`` with its inputs (video [B, N, D] and text [B, L, D] tokens)."""

    def modulation(self, state: "ForwardState", index: int, which: int, temb, m):
        """``norm{which}.linear(silu(temb))`` [B, 6D] of text and video -> the modulation to use."""
        return m

    def attention_extra(self, state: "ForwardState", index: int, attn, query):
        """Extra attention of the text and video queries (``query`` [B, H, L + N, d], normalised, before
        RoPE): ``(rows, out [R, H, L + N, d])`` to add before the output projection, or None."""
        return None

    def attention_residual(self, state: "ForwardState", index: int, norm_text, norm_video, out_text, out_video):
        """Attention outputs of text [B, L, D] and video [B, N, D] -> the ones to gate and add."""
        return out_text, out_video

    def ff_residual(self, state: "ForwardState", index: int, norm_text, norm_video, out_text, out_video):
        """Feed-forward outputs of text and video -> the ones to gate and add."""
        return out_text, out_video

    def needs_query(self, index: int) -> bool:
        """Whether :meth:`attention_extra` wants block ``index``'s queries."""
        return False

    def outputs(self) -> dict:
        """Results of the run for the sampler's LATENT (e.g. the blend history)."""
        return {}


@dataclasses.dataclass(eq=False)
class ForwardState:
    """What one transformer forward knows beyond the diffusers inputs."""

    roles: tuple  # role of each batch row: "positive" (the prompt, training samples) or "negative" (CFG)
    extensions: list
    streams: list = dataclasses.field(default_factory=list)
    video_tokens: int = 0
    rotary: tuple | None = None  # the video tokens' RoPE rows (this rank's share under context parallelism)
    cp: object = None  # the context-parallel group (.context_parallel.ContextParallelGroup) or None
    _rotary_cache: dict = dataclasses.field(default_factory=dict)
    _key_mask_cache: dict = dataclasses.field(default_factory=dict)

    def add_stream(self, stream: TokenStream) -> None:
        if stream.tokens.shape[0] not in (1, len(self.roles)):
            raise ValueError(f"stream {stream.name!r}: {stream.tokens.shape[0]} rows for a batch of {len(self.roles)}")
        if stream.tokens.shape[0] != len(self.roles):
            stream = dataclasses.replace(stream, tokens=stream.tokens.expand(len(self.roles), -1, -1))
        self.streams.append(stream)

    def rows(self, role: str = "positive") -> torch.Tensor:
        """Bool [B] (CPU): the rows with ``role``."""
        return torch.tensor([r == role for r in self.roles])

    @property
    def ordered(self) -> list:
        """Streams in the order they sit in ``hidden_states``: lead streams, (video), trailing streams."""
        return [s for s in self.streams if s.lead] + [None] + [s for s in self.streams if not s.lead]

    def padded(self, stream: TokenStream) -> int:
        """A joint stream's length rounded up to a multiple of the CP degree (its own length without CP)."""
        degree = self.cp.degree if self.cp is not None else 1
        return -(-stream.count // degree) * degree if stream.joint else stream.count

    def local_count(self, stream: TokenStream | None) -> int:
        """Tokens of ``stream`` (None: the video) in this rank's ``hidden_states``: its share under context
        parallelism (a query-only stream: all of it), else all of it."""
        if self.cp is None:
            return self.video_tokens if stream is None else stream.count
        if stream is None:
            return self.video_tokens // self.cp.degree
        return self.padded(stream) // self.cp.degree if stream.joint else stream.count

    def share(self, stream: TokenStream, x: torch.Tensor, dim: int = 1, pad: float = 0.0) -> torch.Tensor:
        """This rank's share of a joint stream's ``x`` (length along ``dim``), padded with ``pad`` first."""
        extra = self.padded(stream) - x.shape[dim]
        if extra:
            shape = list(x.shape)
            shape[dim] = extra
            x = torch.cat([x, x.new_full(shape, pad)], dim=dim)
        return self.cp.chunk(x, dim)

    def full_stream(self, stream: TokenStream, x: torch.Tensor) -> torch.Tensor:
        """A stream's per-token values [B, n, ...] as a whole from this rank's share (a joint stream under context
        parallelism: gathered over the group, pads dropped; otherwise ``x`` itself)."""
        if self.cp is None or not stream.joint:
            return x
        gathered = self.cp.gather(x)  # [degree, B, n / degree, ...]
        return torch.cat(list(gathered.unbind(0)), dim=1)[:, :stream.count]

    def key_mask(self, text_len: int, joint: tuple, device) -> torch.Tensor | None:
        """Under context parallelism with padded joint streams: bool [S] over this rank's attention sequence
        ``[text; joint parts]`` (False: a pad, whose key nobody may see); None when no stream is padded (then no
        rank passes a mask). Built once per forward and joint set (every block asks)."""
        if self.cp is None or all(self.padded(s) == s.count for s in self.streams if s.joint):
            return None
        key = (text_len, tuple(id(s) for s in joint), str(device))
        if key not in self._key_mask_cache:
            parts = [torch.ones(text_len, dtype=torch.bool)]
            for s in [s for s in joint if s.lead] + [None] + [s for s in joint if not s.lead]:
                if s is None:
                    parts.append(torch.ones(self.local_count(None), dtype=torch.bool))
                else:
                    parts.append(self.share(s, torch.ones(1, s.count, dtype=torch.bool), pad=False)[0])
            self._key_mask_cache[key] = torch.cat(parts).to(device)
        return self._key_mask_cache[key]

    def rotary_for(self, joint: tuple) -> tuple | None:
        """RoPE rows of the attention's ``hidden_states`` = the video tokens and the ``joint`` streams."""
        if self.rotary is None or not joint:
            return self.rotary
        key = tuple(id(s) for s in joint)
        if key not in self._rotary_cache:
            cos, sin = self.rotary
            parts_cos, parts_sin = [], []
            for s in [s for s in joint if s.lead] + [None] + [s for s in joint if not s.lead]:
                if s is None:
                    parts_cos.append(cos), parts_sin.append(sin)
                elif s.rotary is not None:
                    c, n = s.rotary[0].to(cos), s.rotary[1].to(sin)
                    if self.cp is not None:  # this rank's rows (pads: identity rows)
                        c, n = self.share(s, c, dim=0, pad=1.0), self.share(s, n, dim=0)
                    parts_cos.append(c), parts_sin.append(n)
                else:  # cos 1, sin 0: RoPE leaves these tokens exactly as they are
                    parts_cos.append(cos.new_ones(self.local_count(s), cos.shape[1]))
                    parts_sin.append(sin.new_zeros(self.local_count(s), sin.shape[1]))
            self._rotary_cache[key] = (torch.cat(parts_cos), torch.cat(parts_sin))
        return self._rotary_cache[key]


_HOOK_CLASSES: dict = {}


def _hook_classes() -> tuple:
    """The runner's two diffusers ``ModelHook`` classes, made once (diffusers is imported on first use): one class for
    every block, so ``torch.compile`` of the blocks (regional compile) shares one graph between them."""
    if not _HOOK_CLASSES:
        from diffusers.hooks import ModelHook

        class BlockRunnerHook(ModelHook):
            """Replaces block ``index``'s forward by the runner (state in attributes, so a deep copy of the transformer
            gets hooks bound to its own runner)."""

            def __init__(self, runner, index):
                super().__init__()
                self.runner, self.index = runner, index

            def new_forward(self, module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                            attention_kwargs=None):
                return self.runner.run_block(module, self.index, hidden_states, encoder_hidden_states, temb,
                                             image_rotary_emb, attention_kwargs)

        class BlockRunnerForwardHook(ModelHook):
            """On the transformer itself: starts each forward's state (with extensions registered)."""

            def __init__(self, runner):
                super().__init__()
                self.runner = runner

            def pre_forward(self, module, *args, **kwargs):
                return self.runner._begin(module, args, kwargs)

            def post_forward(self, module, output):
                return self.runner._end(module, (), output)

        _HOOK_CLASSES.update(block=BlockRunnerHook, forward=BlockRunnerForwardHook)
    return _HOOK_CLASSES["block"], _HOOK_CLASSES["forward"]


class _AttentionTaps:
    """Hooks on one attention module for the duration of its processor's call.

    * ``values``: the outputs of ``to_q``, ``to_v`` and of ``norm_k`` (``to_k`` without qk-norm), after any LoRA.
      diffusers' CogVideoX processor applies RoPE to the key *in place*, so after the call the kept key holds
      the rotated keys the softmax used (checked by :meth:`BlockRunner._rotated_keys`).
    * ``before_out``: a function of the attention output ``[B, text + hidden, D]`` applied just before the
      output projection ``to_out[0]`` (a forward pre-hook), where the extra attentions are added as
      IP-Adapter adds its cross-attention: ``to_out(attn + extra)``. ``out_called`` says whether it ran,
      ``projected`` whether a query/key/value projection ran (the processor computed the attention; an attention
      cache that reuses its output calls neither).
    """

    def __init__(self, attn, names, before_out=None):
        self.values, self.handles = {}, []
        self.out_called = self.projected = False
        for name in names:
            module = getattr(attn, name) if name != "key" else (attn.norm_k or attn.to_k)
            self.handles.append(module.register_forward_hook(self._keep(name)))
        if before_out is not None:
            for name in ("to_q", "to_k", "to_v", "to_qkv", "to_kv"):
                if isinstance(getattr(attn, name, None), torch.nn.Module):
                    self.handles.append(getattr(attn, name).register_forward_hook(self._projection))
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self._out(before_out)))

    def _keep(self, name):
        def hook(module, args, output):
            self.values[name] = output
        return hook

    def _projection(self, module, args, output):
        self.projected = True

    def _out(self, before_out):
        def hook(module, args):
            self.out_called = True
            return (before_out(args[0]),) + tuple(args[1:])
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class BlockRunner:
    """Runs every block of one ``CogVideoXTransformer3DModel`` and holds the registered extensions."""

    def __init__(self, transformer):
        from diffusers.hooks import HookRegistry

        self.transformer = transformer
        self.extensions: list[BlockExtension] = []
        self.call_roles: tuple | None = None
        self.current: ForwardState | None = None
        self._handles: list = []
        for index, module in [("", transformer)] + list(enumerate(transformer.transformer_blocks)):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.hooks:
                where = "the transformer" if index == "" else f"transformer block {index}"
                raise RuntimeError(
                    f"{where} already has diffusers hooks ({', '.join(registry.hooks)}): the block runner must be "
                    "installed first (load the model through load_cogvideox / CogVideoXBundle).")
        block_hook, forward_hook = _hook_classes()
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(forward_hook(self), FORWARD_HOOK_NAME)
        for index, block in enumerate(transformer.transformer_blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(block_hook(self, index), HOOK_NAME)

    # ------------------------------------------------------------------ registration
    def add(self, extension: BlockExtension) -> Callable[[], None]:
        """Register ``extension`` until the returned undo is called. A second extension of one method (same
        ``name``) is refused: both would act (twice the method, one α history overwriting the other)."""
        twin = next((e for e in self.extensions if e.name == extension.name), None)
        if twin is not None:
            raise RuntimeError(f"{extension.name} is already installed in this transformer's blocks; a second one "
                               "would apply the method twice: undo the first before adding another.")
        if not self.extensions:
            t = self.transformer
            self._handles = [t.patch_embed.register_forward_hook(self._insert_streams),
                             t.norm_final.register_forward_pre_hook(self._remove_streams)]
        self.extensions.append(extension)

        def undo() -> None:
            if extension in self.extensions:
                self.extensions.remove(extension)
            if not self.extensions:
                for h in self._handles:
                    h.remove()
                self._handles, self.current = [], None

        return undo

    def interrupts(self, check: Callable[[], None] | None):
        """Call ``check`` before every block of the transformer calls inside the ``with`` block (it raises to stop a
        run: a cancel lands within one block's time). See :func:`checked_calls`."""
        return checked_calls(self.transformer.transformer_blocks, check)

    @contextlib.contextmanager
    def roles(self, roles: tuple):
        """The role of each batch row for the transformer calls inside the block (default: all positive)."""
        previous, self.call_roles = self.call_roles, tuple(roles)
        try:
            yield
        finally:
            self.call_roles = previous

    # ------------------------------------------------------------------ transformer-level hooks
    def _begin(self, module, args, kwargs):
        from .context_parallel import context_parallel_group

        cp = context_parallel_group(module)
        if not self.extensions:
            if cp is not None:
                self._split_rotary(cp, kwargs)
            return args, kwargs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = hidden.shape[0]
        roles = self.call_roles if self.call_roles is not None and len(self.call_roles) == batch else ("positive",) * batch
        state = ForwardState(roles=roles, extensions=list(self.extensions), cp=cp)
        for ext in state.extensions:
            ext.begin(state, kwargs)
        if cp is not None:  # after the extensions, which may set the RoPE rows (the subject reference does)
            self._split_rotary(cp, kwargs)
        state.rotary = kwargs.get("image_rotary_emb")
        cfg = module.config
        p, p_t = cfg.patch_size, cfg.patch_size_t or 1
        state.video_tokens = (hidden.shape[1] + p_t - 1) // p_t * (hidden.shape[3] // p) * (hidden.shape[4] // p)
        kwargs["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), STATE_KEY: state}
        self.current = state
        return args, kwargs

    @staticmethod
    def _split_rotary(cp, kwargs) -> None:
        """Context parallelism: this rank's share of the video tokens' RoPE rows (as diffusers splits the video)."""
        rotary = kwargs.get("image_rotary_emb")
        if rotary is not None:
            kwargs["image_rotary_emb"] = tuple(cp.chunk(r, 0) for r in rotary)

    def _end(self, module, args, output):
        self.current = None
        return output

    def _insert_streams(self, module, args, output):
        state = self.current
        if state is None or not state.streams:
            return output
        text_len = output.shape[1] - state.video_tokens  # patch_embed returns [text; video]
        parts = [output[:, :text_len]]
        for rank in range(state.cp.degree if state.cp is not None else 1):  # one group of shares per rank
            for s in state.ordered:
                if s is None:
                    video = output[:, text_len:]
                    parts.append(video if state.cp is None else video.chunk(state.cp.degree, dim=1)[rank])
                elif state.cp is None or not s.joint:  # no CP, or a query-only stream: whole on every rank
                    parts.append(s.tokens.to(output.dtype))
                else:
                    tokens = s.tokens.to(output.dtype)
                    tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], state.padded(s) - s.count,
                                                                 tokens.shape[2])], dim=1)
                    parts.append(tokens.chunk(state.cp.degree, dim=1)[rank])
        return torch.cat(parts, dim=1)

    def _remove_streams(self, module, args):
        state = self.current
        if state is None or not state.streams:
            return None
        hidden = args[0]
        lead = sum(state.local_count(s) for s in state.streams if s.lead)
        return (hidden[:, lead:lead + state.local_count(None)],) + tuple(args[1:])

    # ------------------------------------------------------------------ the block
    def run_block(self, block, index, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                  attention_kwargs=None):
        """diffusers' ``CogVideoXBlock.forward`` with the extension points (see the module docstring)."""
        attention_kwargs = dict(attention_kwargs or {})
        state: ForwardState | None = attention_kwargs.pop(STATE_KEY, None)
        exts = state.extensions if state is not None else ()
        text = encoder_hidden_states
        text_len = text.size(1)

        # split hidden_states into [lead streams; video; trailing streams]
        parts: list = []  # [stream or None (video), tokens, position] (keys are positions: compile-friendly)
        if state is not None and state.streams:
            start = 0
            for s in state.ordered:
                n = state.local_count(s)
                parts.append([s, hidden_states[:, start:start + n], len(parts)])
                start += n
        else:
            parts.append([None, hidden_states, 0])
        # (no comprehension over ``index`` without streams or extensions: torch.compile would guard on the block
        # index it captures and compile one graph per block)
        active = parts if len(parts) == 1 else [p for p in parts if p[0] is None or p[0].active(index)]
        video_part = next(p for p in parts if p[0] is None)
        for ext in exts:
            ext.before_block(state, index, video_part[1], text, temb)

        # norm & modulate, attention
        norm_text, norm_video, gates = self._modulate(block, 1, index, state, exts, active, text, temb)
        joint = [p for p in active if p[0] is None or p[0].joint]
        query_only = [p for p in active if p[0] is not None and not p[0].joint]
        attn_in = torch.cat([gates[p[2]][0] for p in joint], dim=1) if len(joint) > 1 else norm_video
        rotary = image_rotary_emb if state is None else state.rotary_for(tuple(p[0] for p in joint if p[0] is not None))
        bias = self._key_bias(joint, text_len, attn_in) if len(joint) > 1 else None
        if bias is not None:
            _check_takes_bias(block.attn1, index, [p[0] for p in joint if p[0] is not None and p[0].key_weight != 1])
        key_mask = None if state is None else state.key_mask(text_len, tuple(p[0] for p in joint if p[0] is not None),
                                                             text.device)
        if key_mask is not None:  # pads of split streams (context parallelism) are no one's keys: -inf in the bias
            bias = attn_in.new_zeros(key_mask.shape[0]) if bias is None else bias
            bias = bias.masked_fill(~key_mask, -math.inf)
            # [B, 1, 1, S]: 4-d, so the dispatcher processor passes it as is and Ulysses gathers it along the keys
            attention_kwargs["attention_mask"] = bias.expand(attn_in.shape[0], -1)[:, None, None]
        elif bias is not None:
            attention_kwargs["attention_mask"] = bias.expand(attn_in.shape[0], 1, -1)  # [B, 1, text + hidden]
        want_query = bool(exts) and any(ext.needs_query(index) for ext in exts)
        taps = None
        if want_query or query_only:
            video_at = text_len + sum(p[1].shape[1] for p in joint[:joint.index(video_part)])
            n_video = video_part[1].shape[1]

            def before_out(x):  # [B, text + hidden, D]: add the extensions' extra attention of text and video
                if x.shape[1] != text_len + attn_in.shape[1]:
                    raise RuntimeError(f"the attention processor {type(block.attn1.processor).__name__} does not feed "
                                       "its output projection with [text; video] tokens; extra attention cannot attach")
                q_lin = taps.values.get("to_q")
                if q_lin is None:  # (a processor with fused projections: the queries computed here)
                    q_lin = block.attn1.to_q(torch.cat([norm_text, attn_in], dim=1))
                extra = self._extra_attention(block.attn1, index, state, exts, q_lin, text_len, video_at, n_video)
                return x if extra is None else extra(x)

            taps = _AttentionTaps(block.attn1, ("to_q",) + (("key", "to_v") if query_only else ()),
                                  before_out if want_query else None)
        try:
            attn_hidden, attn_text = block.attn1(hidden_states=attn_in, encoder_hidden_states=norm_text,
                                                 image_rotary_emb=rotary, **attention_kwargs)
        finally:
            if taps is not None:
                taps.close()
        if want_query:
            _check_output_projection_ran(block.attn1, index, taps, [ext.name for ext in exts if ext.needs_query(index)])
        outs = {}
        start = 0
        for p in joint:
            n = p[1].shape[1]
            outs[p[2]] = attn_hidden[:, start:start + n] if len(joint) > 1 else attn_hidden
            start += n
        if query_only:  # (an attention cache that returned a cached output ran no processor: no taps, recompute)
            key = self._rotated_keys(block.attn1, taps.values, norm_text, attn_in, rotary)
            value = taps.values.get("to_v")
            if value is None:
                value = block.attn1.to_v(torch.cat([norm_text, attn_in], dim=1))
            for p in query_only:
                outs[p[2]] = self._query_only_attention(block.attn1, gates[p[2]][0], key, value, bias, state.cp)
        text = self._add_gated(state, index, exts, "attention_residual", active, gates, outs, video_part,
                               norm_text, norm_video, attn_text, text)

        # norm & modulate, feed-forward
        norm_text, norm_video, gates = self._modulate(block, 2, index, state, exts, active, text, temb)
        ff_in = [norm_text] + [gates[p[2]][0] for p in active]
        ff = block.ff(torch.cat(ff_in, dim=1))
        start, outs = text_len, {}
        for p in active:
            n = p[1].shape[1]
            outs[p[2]] = ff[:, start:start + n]
            start += n
        text = self._add_gated(state, index, exts, "ff_residual", active, gates, outs, video_part,
                               norm_text, norm_video, ff[:, :text_len], text)
        hidden = torch.cat([p[1] for p in parts], dim=1) if len(parts) > 1 else parts[0][1]
        return hidden, text

    @staticmethod
    def _add_gated(state, index, exts, residual, active, gates, outs, video_part, norm_text, norm_video, out_text,
                   text):
        """The extensions' residuals (``attention_residual`` / ``ff_residual``) on the text and video outputs, then
        every active part plus its gate times its output (diffusers' ``x + gate * out``); returns the new text."""
        out_video = outs[video_part[2]]
        for ext in exts:
            out_text, out_video = getattr(ext, residual)(state, index, norm_text, norm_video, out_text, out_video)
        outs[video_part[2]] = out_video
        for p in active:
            p[1] = p[1] + gates[p[2]][1] * outs[p[2]]
        return text + gates["text"] * out_text

    @staticmethod
    def _modulate(block, which, index, state, exts, active, text, temb):
        """diffusers' ``CogVideoXLayerNormZero`` for text and video (with the modulation extensions) and
        each active stream's own normalisation. Returns (norm text, norm video, {part: (normed, gate)})."""
        norm = block.norm1 if which == 1 else block.norm2
        m = norm.linear(norm.silu(temb))
        for ext in exts:
            m = ext.modulation(state, index, which, temb, m)
        shift, scale, gate, enc_shift, enc_scale, enc_gate = m.chunk(6, dim=1)
        gates = {"text": enc_gate[:, None, :]}
        norm_video = None
        for p in active:
            if p[0] is None:
                norm_video = norm.norm(p[1]) * (1 + scale)[:, None, :] + shift[:, None, :]
                gates[p[2]] = (norm_video, gate[:, None, :])
            else:
                gates[p[2]] = p[0].modulate(block, index, which, p[1], temb)
        norm_text = norm.norm(text) * (1 + enc_scale)[:, None, :] + enc_shift[:, None, :]
        return norm_text, norm_video, gates

    @staticmethod
    def _rotated_keys(attn, taps, norm_text, attn_in, rotary):
        """The keys [B, H, S, d] the joint attention's softmax used: the kept ``norm_k`` output, which the
        processor rotated in place, checked on one video token against RoPE computed here; recomputed in full
        (normalised and rotated here) for a processor that does not rotate in place, or that did not run (an
        attention cache returned its cached output)."""
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = norm_text.shape[1]
        if "key" in taps:
            key = taps["key"] if attn.norm_k is not None else _heads(taps["key"], attn.heads)  # [B, H, S, d]
            if rotary is None:
                return key
            probe = _heads(attn.to_k(attn_in[:, :1]), attn.heads)  # the first token after the text
            if attn.norm_k is not None:
                probe = attn.norm_k(probe)
            probe = apply_rotary_emb(probe, (rotary[0][:1], rotary[1][:1]))
            if torch.allclose(probe, key[:, :, text_len:text_len + 1], rtol=1e-3, atol=1e-4):
                return key
        key = _heads(attn.to_k(torch.cat([norm_text, attn_in], dim=1)), attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary is None:
            return key
        return torch.cat([key[:, :, :text_len], apply_rotary_emb(key[:, :, text_len:], rotary)], dim=2)

    @staticmethod
    def _key_bias(joint, text_len, like):
        """The scores' bias [text + hidden] of the joint attention: log(key_weight) on the keys of each joint stream
        whose key weight is not 1, 0 elsewhere; None when every weight is 1."""
        if all(p[0] is None or p[0].key_weight == 1 for p in joint):
            return None
        sizes = [p[1].shape[1] for p in joint]
        bias = like.new_zeros(text_len + sum(sizes))
        start = text_len
        for p, n in zip(joint, sizes):
            if p[0] is not None and p[0].key_weight != 1:
                bias[start:start + n] = math.log(p[0].key_weight) if p[0].key_weight > 0 else -math.inf
            start += n
        return bias

    @staticmethod
    def _query_only_attention(attn, normed, key, value_lin, bias=None, cp=None):
        """A stream whose queries see every key of the joint attention and its own, while no other token
        sees its keys: softmax over the two key sets written out (few queries; no copy of the long K/V).
        ``bias`` [S]: the joint keys' score bias (weighted joint streams; -inf at the pads of split streams).
        Under context parallelism (``cp``) ``key`` and ``value_lin`` are this rank's share of the joint sequence
        and the stream is whole on every rank: the softmax's numerator and denominator are summed over the group
        (with one shared maximum), its own keys added once."""
        value = _heads(value_lin, attn.heads)
        q, k, v = (_heads(proj(normed), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        scores = torch.cat([q @ key.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + F.pad(bias.to(scores.dtype), (0, k.shape[2]))
        seq = key.shape[2]
        if cp is None:
            probs = scores.float().softmax(dim=-1).to(v.dtype)  # [B, H, n, S + n]
            out = probs[..., :seq] @ value + probs[..., seq:] @ v
            return attn.to_out[1](attn.to_out[0](_merge(out)))
        scores = scores.float()
        top = cp.max(scores.detach().amax(dim=-1, keepdim=True))  # [B, H, n, 1], the same on every rank
        weights = (scores - top).exp()
        shares = cp.gather(torch.cat([weights[..., :seq] @ value.float(), weights[..., :seq].sum(-1, keepdim=True)],
                                     dim=-1)).sum(0)  # [B, H, n, d + 1]: numerator and denominator over the group
        own = torch.cat([weights[..., seq:] @ v.float(), weights[..., seq:].sum(-1, keepdim=True)], dim=-1)
        total = shares + own
        out = (total[..., :-1] / total[..., -1:]).to(v.dtype)
        return attn.to_out[1](attn.to_out[0](_merge(out)))

    @staticmethod
    def _extra_attention(attn, index, state, exts, q_lin, text_len, video_at, n_video):
        """The extensions' extra attention of the text and video queries (normalised, before RoPE), as a function
        adding it to the attention output before the output projection; None if no extension adds any."""
        query = _heads(q_lin, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        whole = query.shape[2] == text_len + n_video  # no joint stream: text and video are the whole sequence
        if not whole:  # keep the text and video queries only (not the streams')
            query = torch.cat([query[:, :, :text_len], query[:, :, video_at:video_at + n_video]], dim=2)
        extras = [e for e in (ext.attention_extra(state, index, attn, query) for ext in exts if ext.needs_query(index))
                  if e is not None]
        if not extras:
            return None

        positions = torch.cat([torch.arange(text_len), torch.arange(video_at, video_at + n_video)]).to(query.device)

        def add(x):  # x [B, text + hidden, D]
            if whole and len(extras) == 1:  # (the common case without a zero-filled delta or a gather: the same sums)
                rows, out = extras[0]
                out = _merge(out).to(x.dtype)
                return x + out if out.shape[0] == x.shape[0] else x.index_add(0, rows, out)
            delta = None
            for rows, out in extras:
                if delta is None and out.shape[0] == query.shape[0]:
                    delta = out.to(query.dtype)  # every row (rows are 0..B-1 in order)
                else:
                    delta = (query.new_zeros(query.shape) if delta is None else delta).index_add(0, rows,
                                                                                                 out.to(query.dtype))
            return x.index_add(1, positions, _merge(delta).to(x.dtype))

        return add


def _has_diffusers_hooks(module) -> bool:
    """Whether diffusers hooks wrap ``module``'s forward (an attention cache may then return a reused output without
    running the processor)."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(registry is not None and registry.hooks)


def _check_output_projection_ran(attn, index: int, taps: _AttentionTaps, names) -> None:
    """Raise if ``attn``'s processor computed the attention (a projection ran, or no diffusers hook could have reused
    its output) without calling ``to_out[0]`` as a module: the extra attention added before it would be lost. (Under
    torch.compile the pre-hook does not run either; compile is refused with the methods that add extra attention.)"""
    if taps.out_called or not (taps.projected or not _has_diffusers_hooks(attn)):
        return
    raise RuntimeError(
        f"The attention processor {type(attn.processor).__name__} of transformer block {index} does not call its "
        f"output projection to_out[0] as a module, so {' and '.join(names)}'s cross-attention (added just before that "
        "projection) would be dropped: use CogVideoX's own processor (CogVideoXAttnProcessor2_0) or one that calls "
        "attn.to_out[0](...).")


def _check_takes_bias(attn, index: int, streams) -> None:
    """Raise if ``attn``'s processor would not add the attention mask (the weighted streams' score bias)."""
    processor = attn.processor
    backend = getattr(processor, "_attention_backend", None)
    backend = getattr(backend, "value", backend) or "native"
    if type(processor).__name__ in BIAS_PROCESSORS and backend == "native":
        return
    names = " and ".join(f"{s.name} tokens (key weight {s.key_weight:g})" for s in streams)
    raise RuntimeError(
        f"The {names} in transformer block {index} need an attention that adds a bias to the scores, which "
        f"{type(processor).__name__}" + (f" with the {backend} backend" if backend != "native" else "") +
        " does not take: use CogVideoX's own processor with the native attention backend.")


@contextlib.contextmanager
def checked_calls(modules, check: Callable[[], None] | None):
    """Call ``check`` before each call of each of ``modules`` inside the ``with`` block (``check`` raises to stop, e.g.
    ComfyUI's interrupt; None: nothing is checked). A forward pre-hook, so it runs before the module's diffusers hooks:
    a block that is not run was neither onloaded by group offloading nor started by a cache. Removed on exit. Outside
    ``torch.compile``'s graphs (a compiled block breaks its graph there: the check reads host state)."""
    if check is None:
        yield
        return

    @torch.compiler.disable
    def hook(module, args):
        check()

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_runner(transformer) -> BlockRunner:
    """The transformer's block runner, installed on first use (before any other diffusers hook)."""
    runner = transformer.__dict__.get("_mmv_block_runner")
    if runner is None:
        runner = BlockRunner(transformer)
        transformer.__dict__["_mmv_block_runner"] = runner
    return runner
