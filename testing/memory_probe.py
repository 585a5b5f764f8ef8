"""Measuring the memory a forward / backward holds, on any device (the CPU in tests), with torch's own hooks.

* :func:`saved_tensor_bytes`: the bytes autograd keeps for backward while ``fn`` runs, through
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the parameters, buffers and inputs passed as
  ``exclude`` are not activations and are left out).
* :class:`LiveTensorBytes`: a ``TorchDispatchMode`` that counts the bytes of every storage an op creates until it is
  freed (a weak reference per storage), so ``live`` and ``peak`` follow the allocations of a forward, a no-grad
  forward and a backward — also inside gradient checkpointing, whose saved tensors a saved-tensors hook never sees.

``models/memory.py``'s Wan training formulas were fitted and are tested against these (``bench/memory.py
--calibrate``, ``tests/test_wan_memory.py``).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def saved_tensor_bytes(fn, exclude=()):
    """``(bytes, fn())``: the distinct storages autograd saved for backward while ``fn`` ran, minus ``exclude``."""
    skip, saved = _storage_ptrs(exclude), {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(exclude) as m:`` — ``m.live``: bytes of the storages created inside and still alive;
    ``m.peak``: their maximum (``m.reset_peak()`` starts a new one). Storages of ``exclude`` (weights, inputs made
    outside) are never counted, nor are views of them."""

    def __init__(self, exclude=()):
        super().__init__()
        self.skip = _storage_ptrs(exclude)
        self.live = self.peak = 0
        self._alive = set()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)  # torch keeps one Python object per live storage
            if key in self._alive or storage.data_ptr() in self.skip:
                continue
            self._alive.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, key, storage.nbytes())
            self.peak = max(self.peak, self.live)
        return out


def wan_regdpo_step(transformer, lora, *, frames: int, height: int, width: int, text_tokens: int,
                    pair_parallel: bool = True, seed: int = 0, frozen_copy=None) -> dict:
    """Run one Reg-DPO step of a Wan ``transformer`` (its LoRA ``lora`` applied, weights frozen; or, with ``lora``
    None, every weight trainable and the reference the frozen copy ``frozen_copy``: ``--train full``) on random
    latents of ``frames × height × width`` (latent units) as ``training/train_regdpo.py`` does — the winner and loser
    with gradient (one batch-2 forward, or two), the reference with the LoRA off (or the copy) under ``no_grad``, the
    Reg-DPO loss, one backward — and measure it: ``saved`` (bytes autograd kept for the loss, a saved-tensors hook;
    meaningless under gradient checkpointing, whose saved tensors the hook never sees) and, in a second run,
    ``graph`` (live bytes after the forwards with gradient), ``reference`` (the peak during the reference forwards),
    ``backward`` (the peak during the backward) and ``peak``; full-parameter: also ``gradients`` (the weights' gradients' bytes, within
    ``backward`` and ``peak``)."""
    from ..training.losses import per_sample_mse, regdpo_loss

    cfg = transformer.config
    dtype = transformer.proj_out.weight.dtype  # (some tables stay float32)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    noisy = {k: rand(1, cfg.in_channels, frames, height, width) for k in ("w", "l")}
    target = {k: rand(1, cfg.out_channels, frames, height, width) for k in ("w", "l")}
    text = rand(1, text_tokens, cfg.text_dim)
    image = rand(1, 257, cfg.image_dim) if cfg.image_dim else None
    t = torch.full((1,), 500.0)

    def predict(*xs, model=transformer):
        n = len(xs)
        out = model(torch.cat(xs), torch.cat([t] * n), torch.cat([text] * n),
                    encoder_hidden_states_image=None if image is None else torch.cat([image] * n),
                    return_dict=False)[0]
        return out.chunk(n)

    def pair(model=transformer):
        if pair_parallel:
            return predict(noisy["w"], noisy["l"], model=model)
        return predict(noisy["w"], model=model) + predict(noisy["l"], model=model)

    def errors(pred):
        return per_sample_mse(pred[0], target["w"]), per_sample_mse(pred[1], target["l"])

    def reference():
        if lora is None:
            with torch.no_grad():
                return errors(pair(frozen_copy))
        with torch.no_grad(), lora.disabled():
            return errors(pair())

    weights = [*lora.parameters()] if lora is not None else [*frozen_copy.parameters(), *frozen_copy.buffers()]
    exclude = [*transformer.parameters(), *transformer.buffers(), *weights, *noisy.values(), *target.values(), text,
               t] + ([image] if image is not None else [])
    ref = reference()
    saved, _ = saved_tensor_bytes(lambda: regdpo_loss(*errors(pair()), *ref, beta=500.0)[0], exclude)
    out = {"saved": saved}
    with LiveTensorBytes(exclude) as live:
        pred = pair()
        out["graph"] = live.live
        live.reset_peak()
        ref = reference()
        out["reference"] = live.peak
        loss = regdpo_loss(*errors(pred), *ref, beta=500.0)[0]
        del pred
        live.reset_peak()
        loss.backward()
        out["backward"] = live.peak
        if lora is None:  # the weights' gradients (bf16, all of them at the end): not activations
            out["gradients"] = sum(p.grad.untyped_storage().nbytes() for p in transformer.parameters()
                                   if p.grad is not None)
    out["peak"] = max(out["graph"], out["reference"], out["backward"])
    return out


def wan_full_transformer(config: dict, folder: str, *, gradient_checkpointing: bool = False, seed: int = 0):
    """``(transformer, frozen_copy)``: a random ``WanTransformer3DModel`` of ``config`` saved and loaded back in
    bfloat16 (as :func:`wan_lora_transformer`), every weight trainable — the bf16 weights FSDP gathers for a
    full-parameter step — and a frozen copy of it (the reference)."""
    import copy

    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    WanTransformer3DModel(**config).save_pretrained(folder)
    transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).requires_grad_(True)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, copy.deepcopy(transformer).requires_grad_(False)


def wan_lora_transformer(config: dict, folder: str, *, lora_rank: int = 4, gradient_checkpointing: bool = False,
                         lora_targets=("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"), seed: int = 0):
    """``(transformer, lora)``: a random ``WanTransformer3DModel`` of ``config`` saved to ``folder`` and loaded back
    with ``torch_dtype=bfloat16`` as the trainers load it (diffusers keeps its ``_keep_in_fp32_modules`` — the
    rotary tables, modulation tables, time embedder, affine norms — in float32), frozen, with a trainable LoRA of
    ``lora_rank`` on ``lora_targets`` applied (the Reg-DPO trainer's default targets)."""
    from diffusers import WanTransformer3DModel

    from ..models.lora import TrainableLora, find_lora_targets

    torch.manual_seed(seed)
    WanTransformer3DModel(**config).save_pretrained(folder)
    transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).requires_grad_(False)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora = TrainableLora(transformer, find_lora_targets(transformer, list(lora_targets)), lora_rank, 2.0 * lora_rank)
    lora.apply(transformer)
    return transformer, lora
