"""Context parallelism — one sample's token sequence split over several processes — through diffusers' own:
``ContextParallelConfig`` (Ulysses) and ``ModelMixin.enable_parallelism``, whose hooks split a transformer's inputs
along the sequence, run every attention as Ulysses attention (an all-to-all to whole sequences of a share of the
heads and back) and all-gather the output.

* **Wan** (``WanTransformer3DModel``): diffusers' own plan (``_cp_plan``): the video tokens and their RoPE rows (and
  TI2V's per-token timesteps) are split; the text (and Wan 2.1 I2V's CLIP tokens) are the cross-attention's keys and
  stay whole on every rank.
* **CogVideoX** (``CogVideoXTransformer3DModel``, no plan in diffusers): :data:`COGVIDEOX_PLAN`, the layout
  finetrainers and diffusers' joint-attention models (Flux) use: both halves of the joint sequence are split —
  the 226 text tokens and the video tokens at the first block, the output gathered after ``proj_out``. The
  attention is a permutation-invariant softmax without a mask, so each rank holding ``[text share; video share]``
  and Ulysses gathering those shares in rank order computes the full joint attention exactly. The RoPE rows are
  split with the video by the block runner (after the methods' extensions set them). CogVideoX's own attention
  processor calls SDPA directly and never sees the parallel config (it would silently attend within the local share
  only), so :func:`enable_context_parallel` first installs :class:`~.speed.CogVideoXDispatchAttnProcessor`, the
  same processor with its attention routed through diffusers' dispatcher.

  The block runner's token streams (:mod:`.block_runner`): a stream that joins the joint attention (MagicMirror's
  two-way face tokens, the subject-reference frames) is **split** like the video — each rank carries its share,
  padded with masked tokens when its length does not divide (the reference tokens left after a random token drop);
  a stream that only queries the joint attention (MagicMirror's one-way face tokens) is **replicated** — every rank
  carries it whole and merges its attention over the ranks' key shares (log-sum-exp over the group,
  :func:`gather`). Keys and values an extension brings from outside the sequence (MagicMirror's decoupled
  cross-attention) are whole on every rank; DualReal's adapters act per token and its StageBlender's max over
  ``[text; video]`` is taken over the group.

Gradients: the output all-gather sends each rank the gradient of its own share, so each rank's parameter gradients
are its share's part of the whole-sequence gradient and the whole gradient is their sum over the group (checked in
tests/test_context_parallel.py). The trainer multiplies the loss by the CP degree before its data-parallel mean over
all processes, which makes that mean a sum over each CP group and a mean over the data-parallel groups.

Ulysses needs the heads and every split length divisible by the CP degree (:func:`unsplittable`); ring attention
needs an attention backend that returns the log-sum-exp (flash, cuDNN, ... on GPUs; the native SDPA backend the CPU
runs does not), so this module uses Ulysses only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import torch

# CogVideoXTransformer3DModel: the joint sequence's two halves split at the first block, the output gathered after the
# output projection (the RoPE rows are split by the block runner, see the module docstring)
COGVIDEOX_PLAN_SPEC = {
    "transformer_blocks.0": {"hidden_states": (1, 3), "encoder_hidden_states": (1, 3)},
    "proj_out": (1, 3),
}


def cogvideox_plan() -> dict:
    """diffusers' context-parallel plan for ``CogVideoXTransformer3DModel`` (see the module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan = {}
    for module, spec in COGVIDEOX_PLAN_SPEC.items():
        if isinstance(spec, dict):
            plan[module] = {name: ContextParallelInput(split_dim=dim, expected_dims=dims)
                            for name, (dim, dims) in spec.items()}
        else:
            plan[module] = ContextParallelOutput(gather_dim=spec[0], expected_dims=spec[1])
    return plan


@dataclasses.dataclass(frozen=True)
class ContextParallelGroup:
    """The context-parallel group a transformer's forward runs in: its ``degree``, this process's ``rank`` in it and
    the ``group`` (a torch process group)."""

    degree: int
    rank: int
    group: object

    def chunk(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of ``x`` along ``dim`` (as diffusers' equipartition sharder: contiguous equal chunks)."""
        return x.chunk(self.degree, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` stacked: [degree, *x.shape], differentiable: the gradient of each share is the sum of
        every rank's gradient of it (torch's all-gather with a reduce-scatter backward), as replicated results that
        each rank uses for its own tokens need."""
        import torch.distributed._functional_collectives as funcol

        out = funcol.all_gather_single(x.contiguous()[None], 0, self.group)
        return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out

    @torch.no_grad()
    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``x`` over the group (not differentiable)."""
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x


def context_parallel_group(transformer) -> ContextParallelGroup | None:
    """The context-parallel group of a transformer with diffusers' context parallelism enabled, else None."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or cp._flattened_mesh is None:
        return None
    import torch.distributed as dist

    group = cp._flattened_mesh.get_group()
    return ContextParallelGroup(cp.ring_degree * cp.ulysses_degree, dist.get_rank(group), group)


def unsplittable(degree: int, heads: int, lengths: dict) -> tuple[str, int] | None:
    """Why Ulysses attention over ``degree`` ranks cannot split a model with ``heads`` attention heads and the split
    sequences ``lengths`` ({what: tokens}), and the count that ``degree`` must divide; None when it can."""
    if heads % degree:
        return (f"the model's {heads} attention heads do not divide into {degree} (each rank attends with a share)",
                heads)
    for what, n in lengths.items():
        if n % degree:
            return f"the {n} {what} do not divide into {degree} equal shares", n
    return None


def device_mesh(device_type: str, world_size: int, degree: int):
    """The process mesh ``(dp, ring, ulysses)`` = (world / degree, 1, degree): consecutive ranks form one CP group
    (the fastest links), ranks ``r, r + degree, ...`` one data-parallel group. Every process must call it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // degree, 1, degree), mesh_dim_names=("dp", "ring", "ulysses"))


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42 places the parallel config on ``rank % torch.accelerator.device_count()``, which is a division by
    zero without an accelerator; on the CPU (gloo) it may see one device for that call."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch("torch.accelerator.device_count", return_value=1):
        yield


def enable_context_parallel(transformer, mesh) -> None:
    """diffusers' Ulysses context parallelism over ``mesh`` (:func:`device_mesh`) on a Wan or CogVideoX transformer
    (for CogVideoX with :func:`cogvideox_plan` and the dispatcher attention processor)."""
    from diffusers import ContextParallelConfig

    plan = None
    if type(transformer).__name__ == "CogVideoXTransformer3DModel":
        from diffusers.models.attention_processor import Attention

        from .speed import CogVideoXDispatchAttnProcessor

        for module in transformer.modules():
            if isinstance(module, Attention):
                module.set_processor(CogVideoXDispatchAttnProcessor())
        plan = cogvideox_plan()
    degree = mesh["ulysses"].size()
    with _cpu_device_count():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh), cp_plan=plan)


@contextlib.contextmanager
def context_parallel_suspended(transformers):
    """The transformers without their context parallelism for the block (e.g. validation sampling on one process):
    diffusers' split/gather hooks removed and the attention processors' parallel config cleared; restored after."""
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    saved = []
    for t in transformers:
        config = getattr(t, "_parallel_config", None)
        if config is None or config.context_parallel_config is None:
            continue
        plan = cogvideox_plan() if type(t).__name__ == "CogVideoXTransformer3DModel" else t._cp_plan
        processors = [m.processor for m in t.modules() if getattr(getattr(m, "processor", None), "_parallel_config",
                                                                  None) is config]
        remove_context_parallel(t, plan)
        for p in processors:
            p._parallel_config = None
        t._parallel_config = None
        saved.append((t, config, plan, processors))
    try:
        yield
    finally:
        for t, config, plan, processors in saved:
            t._parallel_config = config
            for p in processors:
                p._parallel_config = config
            apply_context_parallel(t, config.context_parallel_config, plan)
