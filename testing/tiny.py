"""Tiny random CogVideoX models, built offline, for tests, the demo and benchmarks.

Everything is made locally: the T5 tokenizer is trained by the ``tokenizers`` library on a
small built-in corpus, and all weights are random. The folders have exactly the diffusers
layout real models use (``transformer/ vae/ text_encoder/ tokenizer/ scheduler/``), so they
load through the same code as real weights.
"""

from __future__ import annotations

import json
import os

import torch

# A small corpus that covers the words used by the pack's prompts, tests and workflows.
CORPUS = """
a man img is walking on the beach at sunset
a woman img is smiling in a garden with flowers
a dog * runs across a green field
a cat sits on a red sofa and looks at the camera
a person img waves at the camera in a city street
a girl img and a boy walk through a forest in autumn
a panda eats bamboo in a sunny bamboo forest
an old man img plays the guitar on a stage
a car drives along a mountain road with snow
waves crash on the rocks under a cloudy sky
a young woman img is dancing in the rain at night
a bird flies over a lake in the morning light
a teddy bear is sitting on a wooden table
a child img rides a bicycle in the park
close up of a face, cinematic lighting, high quality, detailed
blurry, low quality, distorted, ugly, watermark, text
the camera slowly zooms in while the person turns the head
a photo of a man img, a photo of a woman img
""".strip()


def build_tokenizer(vocab_size: int = 600):
    """A T5-style (Unigram, ``</s>``-terminated) fast tokenizer trained on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(r"\s+", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.9)
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def transformer_config(*, i2v: bool = False, version: str = "1.0", num_layers: int = 2, heads: int = 2,
                       head_dim: int = 16, text_dim: int = 32, latent_channels: int = 4) -> dict:
    """A small ``CogVideoXTransformer3DModel`` config mirroring the real 5B variants' options."""
    cfg = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels * (2 if i2v else 1),
               out_channels=latent_channels, time_embed_dim=8, text_embed_dim=text_dim, num_layers=num_layers,
               sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
               max_text_seq_length=226, use_rotary_positional_embeddings=True)
    if version == "1.5":
        cfg.update(patch_size_t=2, patch_bias=False, ofs_embed_dim=8 if i2v else None)
    return cfg


def vae_config(latent_channels: int = 4, *, i2v: bool = False, version: str = "1.0") -> dict:
    """A small ``AutoencoderKLCogVideoX`` config. CogVideoX 1.5 I2V's VAE sets ``invert_scale_latents`` (as the real
    CogVideoX1.5-5B-I2V does): its image condition is divided by the scaling factor instead of multiplied."""
    return dict(in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 4,
                up_block_types=["CogVideoXUpBlock3D"] * 4, block_out_channels=[8, 8, 8, 8],
                latent_channels=latent_channels, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
                scaling_factor=0.7, use_quant_conv=False, use_post_quant_conv=False,
                invert_scale_latents=i2v and version == "1.5")


def t5_config(vocab_size: int, d_model: int = 32):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def build_components(*, i2v: bool = False, version: str = "1.0", seed: int = 0, **transformer_kwargs) -> dict:
    """Random ``{transformer, vae, text_encoder, tokenizer, scheduler}`` (float32, CPU)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    tcfg = transformer_config(i2v=i2v, version=version, **transformer_kwargs)
    transformer = CogVideoXTransformer3DModel(**tcfg)
    vae = AutoencoderKLCogVideoX(**vae_config(tcfg["out_channels"], i2v=i2v, version=version))
    text_encoder = T5EncoderModel(t5_config(len(tokenizer), d_model=tcfg["text_embed_dim"]))
    scheduler = CogVideoXDDIMScheduler.from_config(SCHEDULER_CONFIG)
    for m in (transformer, vae, text_encoder):
        m.eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_model_folder(path: str, components: dict, *, i2v: bool = False) -> str:
    """Write ``components`` as a diffusers CogVideoX folder (what ``models/CogVideo/<name>/`` holds)."""
    os.makedirs(path, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        components[name].save_pretrained(os.path.join(path, name))
    index = {"_class_name": "CogVideoXImageToVideoPipeline" if i2v else "CogVideoXPipeline",
             "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return path


def build_model_folder(path: str, *, i2v: bool = False, version: str = "1.0", seed: int = 0, **kwargs) -> str:
    """Build random components and save them as a diffusers folder at ``path``."""
    return save_model_folder(path, build_components(i2v=i2v, version=version, seed=seed, **kwargs), i2v=i2v)


def build_photomaker_checkpoint(path: str, *, clip_dim: int = 64, clip_layers: int = 2, id_width: int = 256,
                                depth: int = 1, seed: int = 0) -> str:
    """A tiny random checkpoint in PhotoMaker-V2's exact format (``photomaker-v2.bin`` layout).

    ``{"id_encoder": {vision_model.*, visual_projection*, qformer_perceiver.*, fuse_module.*},
    "lora_weights": {...}}`` saved with ``torch.save``, including the CLIP ``position_ids`` buffer
    that real files carry.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..models.id_encoder import IDPerceiver, IDPerceiverConfig

    torch.manual_seed(seed)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=clip_dim, intermediate_size=clip_dim * 4, num_attention_heads=max(1, clip_dim // 64),
        num_hidden_layers=clip_layers, patch_size=14, image_size=56, projection_dim=32))
    perceiver = IDPerceiver(IDPerceiverConfig(dim=id_width, clip_dim=clip_dim, depth=depth, dim_head=128))
    for p in perceiver.parameters():  # LayerNorms start at 1/0; perturb so the test checks every weight
        p.data.add_(torch.randn_like(p) * 0.02)
    sd = {k: v for k, v in clip.state_dict().items()}
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    sd["visual_projection_2.weight"] = torch.randn(48, clip_dim)
    sd.update({f"qformer_perceiver.{k}": v for k, v in perceiver.state_dict().items()})
    sd["fuse_module.layer_norm.weight"] = torch.ones(id_width)
    lora = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}
    torch.save({"id_encoder": sd, "lora_weights": lora}, path)
    return path


def build_magicmirror_adapter(path: str, transformer, *, seed: int = 0, scale: float = 0.05) -> str:
    """A random (non-zero) MagicMirror adapter for ``transformer``, sized for the tiny PhotoMaker-V2
    checkpoint of :func:`build_photomaker_checkpoint` (x_id width 256, CLIP width 64)."""
    from ..models.magicmirror import MagicMirrorAdapter, MagicMirrorConfig, save_magicmirror

    config = MagicMirrorConfig.for_transformer(transformer, id_dim=256, clip_dim=64, qformer_dim=32, qformer_depth=1,
                                               qformer_dim_head=16, cond_dim=32, fuse_hidden=32)
    torch.manual_seed(seed)
    adapter = MagicMirrorAdapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * scale)
    save_magicmirror(path, adapter, {"note": "tiny random test adapter"})
    return path


def build_clip_vision_checkpoint(path: str, *, projection_dim: int = 16, seed: int = 0) -> str:
    """A tiny random CLIP vision tower with projection, saved with transformers' key names."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                           num_hidden_layers=2, patch_size=14, image_size=56,
                                                           projection_dim=projection_dim, hidden_act="gelu"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def write_gt_pairs(root, n: int = 2, frames: int = 5, size: int = 32, loser: bool = True,
                   caption: str = "a car drives along a mountain road with snow") -> str:
    """A GT-Pair manifest (``pairs.jsonl`` rows {winner, loser, first_frame, caption}) of ``n`` synthetic clips under
    ``root``: a square moving right (winner), a noisier copy (loser), the winner's first frame; returns its path."""
    from PIL import Image

    from ..models.video_io import write_video

    os.makedirs(root, exist_ok=True)
    rows = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        win = torch.rand(1, 1, 1, 3, generator=g).expand(frames, size, size, 3).clone()
        for t in range(frames):
            win[t, 8:20, 2 + t:14 + t] = torch.rand(3, generator=g)
        lose = (win + 0.3 * torch.rand(win.shape, generator=g)).clamp(0, 1)
        write_video(os.path.join(root, f"w{k}.mp4"), win, fps=16)
        write_video(os.path.join(root, f"l{k}.mp4"), lose, fps=16)
        Image.fromarray((win[0] * 255).round().byte().numpy()).save(os.path.join(root, f"f{k}.png"))
        row = {"winner": f"w{k}.mp4", "first_frame": f"f{k}.png", "caption": caption}
        rows.append({**row, "loser": f"l{k}.mp4"} if loser else row)
    path = os.path.join(root, "pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path
