"""Shared helpers for the benchmarks: pack import, timing with median/spread, peak memory."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_runs(fns: dict, repeats: int, device="cpu", warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them so drift hits all equally."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def summary(times: list[float]) -> str:
    med = statistics.median(times)
    spread = (max(times) - min(times)) / med * 100
    return f"median {med:.3f} s  (min {min(times):.3f}, max {max(times):.3f}, spread {spread:.1f}%, n={len(times)})"


def peak_gib(device) -> float:
    """Peak CUDA memory since the last reset, or on the CPU the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def load_reference_config(name: str) -> dict:
    """A CogVideoX-5B config shipped in ``magicmirror_video/testing/reference/cogvideox/``."""
    from magicmirror_video.testing import reference_json

    return {k: v for k, v in reference_json(f"cogvideox/{name}").items() if not k.startswith("_")}


def load_wan_reference_config(name: str) -> dict:
    """A Wan 2.1 / 2.2 config shipped in ``magicmirror_video/testing/reference/wan/`` (the diffusers configs of the
    Wan-AI folders: transformers, VAEs)."""
    from magicmirror_video.testing import reference_json

    return {k: v for k, v in reference_json(f"wan/{name}").items() if not k.startswith("_")}


def flops_5b(make_patches, context=None) -> tuple[float, float]:
    """FLOPs of one CFG forward (batch 2) of the CogVideoX-5B transformer at 49x480x720, without and
    with the patches ``make_patches(transformer)`` returns; everything on the meta device."""
    import dataclasses

    from diffusers import CogVideoXTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from magicmirror_video.models.patches import SamplingContext, applied_patches
    from magicmirror_video.models.sampler import rotary_embeddings

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(load_reference_config("transformer_config_5b.json"))
        x, text, timestep = torch.randn(2, 13, 16, 60, 90), torch.randn(2, 226, 4096), torch.tensor([500, 500])
        patches = make_patches(transformer)
    rope = tuple(r.to("meta") for r in rotary_embeddings(transformer, 480, 720, 13, 8, "cpu"))
    context = dataclasses.replace(context or SamplingContext(), device=torch.device("meta"), dtype=torch.float32)

    def forward():
        transformer(hidden_states=x, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rope,
                    return_dict=False)

    with torch.no_grad():
        with FlopCounterMode(display=False) as base:
            forward()
        with applied_patches(transformer, patches, context), FlopCounterMode(display=False) as patched:
            forward()
    return base.get_total_flops(), patched.get_total_flops()


def time_steps(step, repeats: int, device) -> dict:
    """Run ``step()`` once to warm up, then ``repeats`` timed times; median/min/max seconds and peak GiB."""
    step()
    reset_peak(device)
    times = []
    for _ in range(repeats):
        times.append(timed(step, device))
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "peak_gib": peak_gib(device)}


def run_configs_in_processes(script: str, names: list[str], repeats: int) -> dict[str, dict]:
    """Run ``script --one i --repeats N`` for every configuration in its own process (so each peak
    memory is its own) and collect the JSON line each prints."""
    import subprocess

    results = {}
    for i, name in enumerate(names):
        out = subprocess.run([sys.executable, script, "--one", str(i), "--repeats", str(repeats)],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results
