"""This pack and kijai's ComfyUI-CogVideoXWrapper side by side in one real ComfyUI: each sampler plain and with its
FasterCache from step 3, on the mid config (bench/sampler.py's: 4 layers, width 256; text width 768, the width of the
random T5 file ComfyUI's Load CLIP reads), 49 frames 128x128, 10 DDIM steps, CFG 6, fp32, ComfyUI --cpu.

    python bench/kijai.py --comfyui /path/to/ComfyUI --python /path/to/ComfyUI/.venv/bin/python \\
        --wrapper /path/to/ComfyUI-CogVideoXWrapper [--rounds 9]

Nothing of the wrapper is part of this pack: pass a checkout of it; it is linked into the temporary ComfyUI's
custom_nodes beside this pack, with the random mid model at models/CogVideo/CogVideoX-5b (where its loader looks).
Both samplers get the same prompt embeddings: this pack's Text Encode on the same Load CLIP, turned into the tensor the
wrapper's sampler takes by a small bridge node written to the temporary custom_nodes (the wrapper's own encode node
needs a T5-XXL file, 9.5 GB). The wrapper's FasterCache: start_step 3, hf_step 6, lf_step 8 (its defaults 15/30/40 of
50 steps, scaled to 10), all 4 blocks cached; the pack's: faster_cache with start_step 3. Each round runs the four
prompts in turn; a prompt re-runs only its sampler and a SaveLatent (the seed changes), timed by ComfyUI's own
execution_start -> execution_success stamps. Round 0 (loads, encodes) is not counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(Path(ROOT) / "tests"))
import comfy_host  # noqa: E402
from test_host_workflows import COMFY_T5, _build_comfy_t5  # noqa: E402

from magicmirror_video.testing import tiny  # noqa: E402

BRIDGE = '''
class MMVEmbedsToKijai:
    """Timing scaffolding: MagicMirror Video's prompt embeddings as the CONDITIONING tensor kijai's sampler takes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("COGVIDEOX_CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "convert"
    CATEGORY = "testing"

    def convert(self, conditioning):
        return (conditioning.embeds.clone(),)


NODE_CLASS_MAPPINGS = {"MMVEmbedsToKijai": MMVEmbedsToKijai}
'''
PROMPT = "a golden retriever runs across a sunlit meadow"
MODEL = "CogVideoX-5b"  # the folder name the wrapper's loader reads for THUDM/CogVideoX-5b (here: the mid model)


def encodes() -> dict:
    """Load CLIP and this pack's loader + Text Encode (positive "10", negative "11")."""
    loader = {"model": MODEL, "precision": "fp32", "offload": "none", "transformer_file": "none"}
    return {
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": COMFY_T5, "type": "sd3", "device": "default"}},
        "9": {"class_type": "MMV_CogVideoXModelLoader", "inputs": loader},
        "10": {"class_type": "MMV_CogVideoXTextEncode", "inputs": {"model": ["9", 0], "text": PROMPT,
                                                                   "trigger_word": "", "clip": ["2", 0]}},
        "11": {"class_type": "MMV_CogVideoXTextEncode", "inputs": {"model": ["9", 0], "text": "", "trigger_word": "",
                                                                   "clip": ["2", 0]}},
    }


def pack_prompt(seed: int, cache: bool) -> dict:
    api = encodes()
    api["5"] = {"class_type": "MMV_CogVideoXSampler", "inputs": {
        "model": ["6", 0] if cache else ["9", 0], "positive": ["10", 0], "negative": ["11", 0], "width": 128,
        "height": 128, "num_frames": 49, "steps": 10, "cfg": 6.0, "seed": seed, "scheduler": "DDIM"}}
    api["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "pack"}}
    if cache:
        api["6"] = {"class_type": "MMV_CogVideoXSpeed", "inputs": {
            "model": ["9", 0], "cache": "faster_cache", "threshold": -1.0, "interval": -1, "start_step": 3,
            "end_step": -1, "compile": False, "attention": "native", "mag_ratios": ""}}
    return api


def kijai_prompt(seed: int, cache: bool) -> dict:
    api = encodes()
    api.update({
        "1": {"class_type": "DownloadAndLoadCogVideoModel", "inputs": {"model": f"THUDM/{MODEL}", "precision": "fp32"}},
        "3": {"class_type": "MMVEmbedsToKijai", "inputs": {"conditioning": ["10", 0]}},
        "4": {"class_type": "MMVEmbedsToKijai", "inputs": {"conditioning": ["11", 0]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "CogVideoSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "num_frames": 49, "steps": 10, "cfg": 6.0,
            "seed": seed, "scheduler": "CogVideoXDDIM", "samples": ["8", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "kijai"}},
    })
    if cache:
        api["6"] = {"class_type": "CogVideoXFasterCache", "inputs": {
            "start_step": 3, "hf_step": 6, "lf_step": 8, "cache_device": "main_device", "num_blocks_to_cache": 4}}
        api["5"]["inputs"]["fastercache"] = ["6", 0]
    return api


def seconds(entry: dict) -> float:
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def run_rounds(srv, rounds: int) -> dict:
    runs = {"kijai plain": lambda s: kijai_prompt(s, False),
            "kijai FasterCache from step 3": lambda s: kijai_prompt(s, True),
            "pack plain": lambda s: pack_prompt(s, False),
            "pack faster_cache from step 3": lambda s: pack_prompt(s, True)}
    times = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, make in runs.items():
            entry = srv.run_prompt(make(1000 + r), timeout=1200)
            if r:
                times[name].append(seconds(entry))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    ap.add_argument("--python", required=True, help="the python of ComfyUI's venv (with this pack's requirements)")
    ap.add_argument("--wrapper", required=True, help="a checkout of kijai/ComfyUI-CogVideoXWrapper")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmv_kijai_"))
    try:
        models = tmp / "models"
        (models / "CogVideo").mkdir(parents=True)
        _build_comfy_t5(models, models / "CogVideo" / "unused")  # text_encoders/<random T5, 768 wide>
        shutil.rmtree(models / "CogVideo" / "unused")
        tiny.build_model_folder(str(models / "CogVideo" / MODEL), num_layers=4, heads=4, head_dim=64, text_dim=768,
                                latent_channels=16)
        srv = comfy_host.ComfyServer(args.comfyui, args.python, pack_dir=ROOT, model_root=models,
                                     tmp_dir=tmp / "comfy")
        custom = srv.base_dir / "custom_nodes"
        custom.mkdir(parents=True)
        (custom / "ComfyUI-CogVideoXWrapper").symlink_to(Path(args.wrapper).resolve(), target_is_directory=True)
        (custom / "mmv_bridge").mkdir()
        (custom / "mmv_bridge" / "__init__.py").write_text(BRIDGE, encoding="utf-8")
        with srv:
            times = run_rounds(srv, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one ComfyUI (--cpu), mid config, 49 frames 128x128, 10 DDIM steps, CFG 6, fp32, {args.rounds} rounds")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<32} median {v:.3f} s  (min {min(times[k]):.3f}, max {max(times[k]):.3f}, n={len(times[k])})")
    kijai, pack = "kijai FasterCache from step 3", "pack faster_cache from step 3"
    print(f"kijai: FasterCache x{med['kijai plain'] / med[kijai]:.2f} faster than its plain sampler")
    print(f"pack:  faster_cache x{med['pack plain'] / med[pack]:.2f} faster than its plain sampler")
    print(f"pack / kijai: plain {med['pack plain'] / med['kijai plain']:.3f}, FasterCache {med[pack] / med[kijai]:.3f}")
    print(json.dumps(times))


if __name__ == "__main__":
    main()
