"""Context parallelism in the trainers (``--cp_degree N``): the process layout, the input checks and the setup.

``accelerate launch`` starts ``P`` processes; with ``--cp_degree N`` they form ``P / N`` data-parallel groups of ``N``
consecutive ranks. The ``N`` ranks of a CP group hold the same samples and draw the same noise (the data slice and
the step generators are keyed by the data-parallel rank, ``Trainer.data_parallel_rank``) and split each sample's
token sequence inside the transformer with diffusers' context parallelism (``models/context_parallel.py``: Wan with
diffusers' own plan, CogVideoX with the pack's plan and per-stream layout). DDP / FSDP keep running over all ``P``
processes (FSDP shards every weight over all of them); the trainer multiplies each loss by ``N`` before the backward,
so their mean over the ``P`` processes is the sum over each CP group (whose ranks hold their shares' parts of the
gradient) averaged over the data-parallel groups.

accelerate 1.15's own ``ParallelismConfig(cp_size=...)`` is torch's experimental ``context_parallel`` (ring attention
patched into ``scaled_dot_product_attention`` over sharded buffers, FSDP2 only); it does not see diffusers' attention
processors and cannot split the joint text/video sequence or the block runner's streams, so the trainers use
diffusers' (Ulysses) and keep accelerate for DDP / FSDP.
"""

from __future__ import annotations

from .config import InputError

WORLD_SIZE_VARIABLES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]  # as PartialState


def process_count() -> int:
    """The number of training processes the launcher started (read from the environment, as accelerate's
    ``PartialState`` reads it; nothing is initialised)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(WORLD_SIZE_VARIABLES, 1)


def check_context_parallel(degree: int, spec_class, folder_info: dict, shapes, processes: int | None = None, *,
                           sizes_from: str = "--num_frames/--height/--width") -> None:
    """``--cp_degree`` must divide the process count and every sequence it splits (one :class:`InputError` line).
    ``shapes``: the (frames, height, width) of the clips the trainer trains on; ``sizes_from``: the options that set
    them (the line's other fix)."""
    from ..models.context_parallel import unsplittable

    processes = process_count() if processes is None else processes
    if degree < 1:
        raise InputError(f"--cp_degree {degree}: must be at least 1 (1 = no context parallelism)")
    if degree == 1:
        return
    if processes % degree:
        raise InputError(f"--cp_degree {degree} does not divide the {processes} training processes (data-parallel "
                         f"groups x CP groups); launch a multiple of {degree} processes (accelerate launch "
                         f"--num_processes) or pass a --cp_degree that divides {processes}")
    heads = folder_info["transformer_config"]["num_attention_heads"]
    for frames, height, width in dict.fromkeys(shapes):
        lengths = spec_class.split_lengths(folder_info, frames, height, width)
        found = unsplittable(degree, heads, lengths)
        if found:
            why, count = found
            fits = [d for d in range(2, count + 1) if count % d == 0 and processes % d == 0
                    and unsplittable(d, heads, lengths) is None][:4]
            other = "" if count == heads or "text" in why else f" or another {sizes_from}"
            raise InputError(f"--cp_degree {degree}: Ulysses context parallelism cannot split this model's sequence: "
                             f"{why}; pass a --cp_degree that divides {count} and the {processes} processes "
                             f"({', '.join(map(str, [1] + fits))}){other}")


def enable_context_parallel(transformers, degree: int, device_type: str, world_size: int) -> None:
    """diffusers' Ulysses context parallelism of ``degree`` on every transformer (one process mesh for all)."""
    from ..models.context_parallel import device_mesh
    from ..models.context_parallel import enable_context_parallel as enable

    mesh = device_mesh(device_type, world_size, degree)
    for transformer in transformers:
        enable(transformer, mesh)
