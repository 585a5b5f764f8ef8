"""ComfyUI's launch flags x the offload modes x the method stacks, with ComfyUI core's REAL memory manager.

``testing/comfy_sim.py`` runs in ComfyUI's Python (``COMFYUI_PYTHON``; skipped without ``COMFYUI_PATH``): core's
``comfy.model_management`` starts with the launch flag on a simulated card (``testing/fake_cuda.py``: tensors compute
on the CPU while those on the card say ``cuda:0``, mixing devices raises CUDA's error, the card counts its bytes and
runs out of memory), and every module the pack hands to core goes through core's own ``load_models_gpu`` /
``free_memory`` / ``ModelPatcher`` code. Per flag (``--novram``, ``--lowvram``, none, ``--highvram``,
``--gpu-only``) x offload mode (auto, none, model, sequential, block) x stack (base; MagicMirror; MagicMirror +
subject reference + DualReal + LoRA):

* tiny models, the real stages (through the loader node and the nodes' placements): every stage runs with its
  modules on the device core's policy gives that kind of model under the flag (``FLAG_DEVICES``, read off core:
  ``text_encoder_device()``, ``vae_device()``, ``unet_offload_device()`` ...; the simulated card raises if a module
  is elsewhere), loaded whole, partly, streamed by core (``--novram``: nothing whole) or by the placement as the mode
  says, nothing of a running stage is unloaded by core, the decode runs, the video equals the same run headless bit
  for bit, and between stages the card holds what the flag keeps there (``--highvram``: the transformer and its
  adapters; ``--gpu-only``: everything);
* CogVideoX-5B's real sizes (meta device), each stage entered without computing, with the stage's activation
  estimate allocated on the card: no simulated out-of-memory on a 12 GiB card under --novram / --lowvram / none,
  nothing of a running stage unloaded (the MagicMirror adapter used to be: 1422 -> 1333 MiB), and the
  ``memory_required`` the pack asks core for equal to ``bench/memory.py``'s estimates (activations per stage and
  method, plus what the streamed modes hold); on an 80 GiB card the weights core put on the card per stage equal
  bench/memory.py's weights column.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host

PACK_DIR = Path(__file__).resolve().parent.parent
SIM = PACK_DIR / "testing" / "comfy_sim.py"
GIB = 2**30
FLAGS = ("novram", "lowvram", "normal", "highvram", "gpu-only")
MODES = ("auto", "none", "model", "sequential", "block")
CUDA, CPU = "cuda:0", "cpu"
# (execution device, offload device) per kind of model, as core places its own under each flag (an NVIDIA card):
# text encoders and CLIP vision: text_encoder_device() / text_encoder_offload_device(); the VAE: vae_device() /
# vae_offload_device(); diffusion models and their patches' models: get_torch_device() / unet_offload_device()
FLAG_DEVICES = {
    "novram": {"text": (CPU, CPU), "vae": (CUDA, CPU), "unet": (CUDA, CPU)},
    "lowvram": {"text": (CPU, CPU), "vae": (CUDA, CPU), "unet": (CUDA, CPU)},
    "normal": {"text": (CUDA, CPU), "vae": (CUDA, CPU), "unet": (CUDA, CPU)},
    "highvram": {"text": (CUDA, CPU), "vae": (CUDA, CPU), "unet": (CUDA, CUDA)},
    "gpu-only": {"text": (CUDA, CUDA), "vae": (CUDA, CUDA), "unet": (CUDA, CUDA)},
}
KIND = {"T5EncoderModel": "text", "IDEncoder": "text", "CLIPVisionModelWithProjection": "text",
        "AutoencoderKLCogVideoX": "vae"}  # the transformer and the adapters: "unet"
STAGE_MODULES = {"base": {"CogVideoXTransformer3DModel"},
                 "magicmirror": {"CogVideoXTransformer3DModel", "MagicMirrorAdapter"},
                 "all": {"CogVideoXTransformer3DModel", "MagicMirrorAdapter", "DualRealAdapters", "LoraModule"}}


@cache
def simulate(flag: str, *options: str) -> dict:
    comfyui, python = comfy_host.require_comfyui()
    proc = subprocess.run([python, str(SIM), comfyui, flag, *options], capture_output=True, text=True, timeout=1800,
                          cwd=comfyui, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def check_devices_and_holding(row: dict, tiny: bool) -> None:
    """Every stage's modules on their kind's devices under the flag; how each is held follows the mode and the
    flag; the forwards ran on those devices (tiny runs compute)."""
    flag, mode = row["flag"], row["resolved"]
    streamed = mode in ("sequential", "block")
    for stage, s in row["stages"].items():
        for name, m in s["modules"].items():
            device, offload = FLAG_DEVICES[flag][KIND.get(name, "unet")]
            where = (name, stage, row["mode"], row["stack"], m)
            assert m["device"] == device, where
            pack_streams = streamed and device == CUDA and name in ("CogVideoXTransformer3DModel", "T5EncoderModel")
            if pack_streams:
                assert m["held"] == "streamed" and m["offload"] == CPU, where  # streams wait in CPU memory
                continue
            assert m["held"] != "streamed" and m["offload"] == offload, where
            if flag == "novram" and device == CUDA:
                assert m["held"] == "cast", where  # core loads nothing whole: every layer comes in per forward
            elif tiny:
                assert m["held"] == "whole", where  # (tiny models fit anywhere)
        if tiny:
            kinds = {KIND.get(name, "unet") for name in s["modules"]}
            assert s["ran_on"] == sorted({FLAG_DEVICES[flag][k][0] for k in kinds}), (stage, row["mode"], s)


@pytest.mark.parametrize("flag", FLAGS)
def test_host_tiny_runs_under_every_launch_flag(flag):
    result = simulate(flag, "--tiny", "--card", "12")
    rows = result["rows"]
    assert len(rows) == 15 and {(r["mode"], r["stack"]) for r in rows} == {(m, s) for m in MODES
                                                                          for s in STAGE_MODULES}
    for row in rows:
        where = (flag, row["mode"], row["stack"])
        assert "error" not in row, (where, row.get("error"))
        assert row["same_video"], where  # decode ran; the video is the headless run's, bit for bit
        assert row["evictions"] == [], (where, row["evictions"])
        assert row["resolved"] == (row["mode"] if row["mode"] != "auto" else "sequential" if flag == "novram"
                                   else "none"), where  # auto: no VRAM to count under --novram; tiny fits else
        assert set(row["stages"]) == {"t5", "sampling", "decode"} | (
            {"face encoder"} if row["stack"] != "base" else set()) | (
            {"reference encode", "CLIP vision"} if row["stack"] == "all" else set()), where
        assert set(row["stages"]["sampling"]["modules"]) == STAGE_MODULES[row["stack"]], where
        check_devices_and_holding(row, tiny=True)
        assert row["card_cleared"] == 0, where  # nothing left behind once core unloaded the run's models
    # between stages the card holds what the flag keeps there: the decode stage's start in model mode, MagicMirror
    on_card = {r["mode"]: r["stages"]["decode"]["on_card"] for r in rows if r["stack"] == "magicmirror"}
    vae = ["AutoencoderKLCogVideoX"]
    expected = {"novram": [], "lowvram": vae, "normal": vae,  # --novram: the VAE comes in layer by layer
                "highvram": sorted(vae + ["CogVideoXTransformer3DModel", "MagicMirrorAdapter"]),
                "gpu-only": sorted(vae + ["CogVideoXTransformer3DModel", "MagicMirrorAdapter", "IDEncoder",
                                          "T5EncoderModel"])}[flag]
    assert on_card["model"] == expected, on_card


def bench_sampling(bench: dict, stack: str) -> int:
    """bench/memory.py's sampling activations for the stack; the full stack: MagicMirror's batch 1 with its face
    tokens and the subject reference's tokens (bench's own inputs for those two methods)."""
    from magicmirror_video.models.memory import transformer_activation_bytes, video_tokens
    from magicmirror_video.testing import reference_json

    acts = bench["activations"]["sampling"]
    if stack != "all":
        return acts[stack]
    config = {k: v for k, v in reference_json("cogvideox/transformer_config_5b.json").items()}
    reference = video_tokens(config, 1, 480, 720)
    return transformer_activation_bytes(config, 49, 480, 720, batch=1,
                                        extra_tokens=bench["face_queries"] + reference)


def check_asked(row: dict, bench: dict) -> None:
    """The memory_required the pack gave core per stage: the stage's activation estimate (bench/memory.py's), plus
    what a streamed component holds; freeing (no whole module to load) only for a stage that streams all its
    modules."""
    acts, stream = bench["activations"], bench["stream"].get(row["resolved"], {})
    t5_here = FLAG_DEVICES[row["flag"]]["text"][0] == CUDA
    t5_held = stream.get("t5", 0) if t5_here else 0
    expected = {"t5": [("free" if t5_held else "load", acts["t5"] + t5_held)] * 2,
                "sampling": [("load", bench_sampling(bench, row["stack"]) + stream.get("transformer", 0))]
                if row["stack"] != "base" or not stream else [("free", acts["sampling"]["base"]
                                                                + stream["transformer"])],
                "decode": [("load", acts["decode"])]}
    if row["stack"] == "all":
        expected["reference encode"] = [("load", acts["prep"]["subject"])]
    for stage, asked in expected.items():
        assert [tuple(a) for a in row["stages"][stage]["asked"]] == asked, (stage, row["mode"], row["stack"])


@pytest.mark.parametrize("flag, card", [("novram", 12), ("lowvram", 12), ("normal", 12), ("normal", 80),
                                        ("highvram", 80), ("gpu-only", 80)])
def test_host_5b_sizes_under_every_launch_flag(flag, card):
    result = simulate(flag, "--card", str(card))
    rows, bench = result["rows"], result["bench"]
    assert len(rows) == 15
    for row in rows:
        where = (flag, card, row["mode"], row["stack"])
        assert "error" not in row, (where, row.get("error"))  # e.g. a simulated CUDA out of memory
        assert row["evictions"] == [], (where, row["evictions"])
        check_devices_and_holding(row, tiny=False)
        check_asked(row, bench)
        assert row["card_peak"] <= card * GIB, where
    auto = {r["stack"]: r["resolved"] for r in rows if r["mode"] == "auto"}
    # auto: --novram counts no VRAM; 12 GiB: the 5B transformer's stage (10.4 + 2.85 GiB + 2 spare) does not fit, it
    # does streaming block by block; 80 GiB: everything, an untiled decode included
    assert set(auto.values()) == {"sequential" if flag == "novram" else "block" if card == 12 else "none"}, auto
    if (flag, card) == ("normal", 80):  # nothing partial: the card holds the weights bench/memory.py counts
        for row in (r for r in rows if r["mode"] in ("model", "sequential", "block") and r["stack"] != "all"):
            method = row["stack"]
            for stage in ("t5", "sampling", "decode"):
                weights = bench["weights"][f"{row['mode']}/{method}/{stage}"]
                streamed = {"t5": "t5", "sampling": "transformer"}.get(stage) if row["mode"] != "model" else None
                held = bench["stream"][row["mode"]][streamed] if streamed else 0  # (streamed weights come per layer)
                assert row["stages"][stage]["card"] == weights - held, (row["mode"], method, stage)
    if card == 12 and flag != "novram":  # a card too small for the 5B transformer's stage: core loads it partly
        held = {r["mode"]: r["stages"]["sampling"]["modules"]["CogVideoXTransformer3DModel"]["held"] for r in rows
                if r["stack"] == "base"}
        assert held["model"].startswith("part") and held["none"].startswith("part"), held
