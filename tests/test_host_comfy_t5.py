"""ComfyUI's own T5 gives the pack's conditioning: the same prompts through the CogVideoX folder's T5
(transformers) and through a ComfyUI CLIP built on ``comfy.text_encoders.t5.T5`` — the class core's Load CLIP
uses for t5xxl_fp16.safetensors — with a tiny config and the same weights agree to 1e-5 (absolute + relative:
|a − b| ≤ 1e-5 + 1e-5·|b|; ComfyUI's T5 attention scales the keys instead of the scores, so float32 rounding
differs), with the same token ids and identity masks, also for prompts with ``<cls>`` and with parentheses (which
ComfyUI's own tokenizer would read as weights). Runs in ComfyUI's Python (``COMFYUI_PYTHON``); skipped without ``COMFYUI_PATH``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

PACK_DIR = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import importlib.util, json, sys
import torch

comfyui, pack, tokenizer_dir = sys.argv[1:4]
sys.path.insert(0, comfyui)
spec = importlib.util.spec_from_file_location("magicmirror_video", pack + "/__init__.py",
                                              submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["magicmirror_video"] = module
spec.loader.exec_module(module)

from comfy.cli_args import args
args.cpu = True  # as the host tests start ComfyUI (main.py --cpu)

import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from magicmirror_video.models.cogvideox import CogVideoXBundle
from magicmirror_video.models.text import encode_prompt
from magicmirror_video.nodes.host import ClipT5
from magicmirror_video.testing import tiny

torch.manual_seed(0)
c = tiny.build_components(text_dim=32)
tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir)
vocab = len(tokenizer) + 8  # spare rows, as T5-XXL's table has beyond its tokenizer (for <cls>)
config = dict(d_ff=64, d_kv=8, d_model=32, num_heads=4, num_layers=2, vocab_size=vocab)
t5 = T5EncoderModel(T5Config(**config, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                             use_cache=False, pad_token_id=0, eos_token_id=1)).eval()
bundle = CogVideoXBundle(transformer=c["transformer"], vae=c["vae"], text_encoder=t5, tokenizer=tokenizer,
                         scheduler_config=dict(c["scheduler"].config), dtype=torch.float32, device=torch.device("cpu"))

comfy_config = dict(config, dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type="t5")


class TinyT5(comfy.sd1_clip.SDClipModel):  # comfy.text_encoders.sd3_clip.T5XXLModel with a tiny config
    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, textmodel_json_config=dict(comfy_config), dtype=dtype,
                         special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                         model_options={**model_options, "model_name": "t5xxl"})


class TinyT5Tokenizer(comfy.sd1_clip.SDTokenizer):  # comfy.text_encoders.sd3_clip.T5XXLTokenizer, tiny vocabulary
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_dir, pad_with_end=False, embedding_size=32, embedding_key="t5xxl",
                         tokenizer_class=T5TokenizerFast, has_start_token=False, pad_to_max_length=False,
                         max_length=99999999, min_length=77, tokenizer_data=tokenizer_data)


class Target:
    params = {}

    @staticmethod
    def clip(**kwargs):
        return comfy.sd1_clip.SD1ClipModel(name="t5xxl", clip_model=TinyT5, **kwargs)

    @staticmethod
    def tokenizer(**kwargs):
        return comfy.sd1_clip.SD1Tokenizer(name="t5xxl", tokenizer=TinyT5Tokenizer, **kwargs)


clip = comfy.sd.CLIP(target=Target, model_options={"dtype": torch.float32})
missing, unexpected = clip.load_sd({k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
assert not missing, missing
results = []
for prompt, trigger in (("a man img is walking on the beach at sunset", "img"), ("<cls> a teddy bear sits", None),
                        ("a (happy) dog runs across a green field", None), ("", None)):
    ours = encode_prompt(bundle, prompt, trigger=trigger)
    theirs = encode_prompt(bundle, prompt, trigger=trigger, encoder=ClipT5(clip))
    naive = clip.tokenize(prompt)["t5xxl"][0]
    results.append({"prompt": prompt, "max_abs": (ours.embeds - theirs.embeds).abs().max().item(),
                    "scale": ours.embeds.abs().max().item(),
                    "close": torch.allclose(theirs.embeds, ours.embeds, rtol=1e-5, atol=1e-5),
                    "shape": list(theirs.embeds.shape), "same_ids": torch.equal(ours.input_ids, theirs.input_ids),
                    "same_mask": torch.equal(ours.identity_mask, theirs.identity_mask),
                    "identity_tokens": int(theirs.identity_mask.sum()),
                    "comfy_tokenizer_same_ids": [t[0] for t in naive][:226] == ours.input_ids[0].tolist()})
print("RESULT " + json.dumps(results))
'''


def test_host_comfy_t5_gives_the_same_conditioning_as_the_packs_t5(tmp_path):
    comfyui, python = comfy_host.require_comfyui()
    from magicmirror_video.testing import tiny

    tokenizer_dir = tmp_path / "tokenizer"
    tiny.build_tokenizer().save_pretrained(str(tokenizer_dir))
    script = tmp_path / "compare.py"
    script.write_text(SCRIPT, encoding="utf-8")
    proc = subprocess.run([python, str(script), comfyui, str(PACK_DIR), str(tokenizer_dir)], capture_output=True,
                          text=True, timeout=600, cwd=comfyui)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(results, indent=1))
    for r in results:
        assert r["shape"] == [1, 226, 32] and r["same_ids"] and r["same_mask"], r
        assert r["close"], r  # |a - b| <= 1e-5 + 1e-5·|b| (ComfyUI's attention scales k, not the scores)
    assert results[0]["identity_tokens"] > 0  # "man" is marked through the CLIP's tokenizer too
    assert not results[2]["comfy_tokenizer_same_ids"]  # ComfyUI's tokenizer reads "(happy)" as a weight
