"""Foundation nodes: load CogVideoX, encode prompts, add LoRAs, sample, decode."""

from __future__ import annotations

from ..models.cogvideox import DTYPES, find_model_folder, load_cogvideox
from ..models.lora import LoraPatch, load_lora_file, resolve_lora_targets
from ..models.memory import transformer_activation_bytes
from ..models.placement import OFFLOAD_MODES
from ..models.sampler import SamplingInputError, check_activation_memory, check_video_size, decode_latents, sample_video
from ..models.speed import (
    ATTENTION_BACKENDS,
    CACHE_METHODS,
    WEIGHT_STORAGE,
    SpeedOptions,
    parse_ratios,
    storage_skip_patterns,
)
from ..models.text import DEFAULT_TRIGGER, encode_prompt
from . import host

MENU = "MagicMirror Video"  # the pack's node menu; one sub-category per method
CATEGORY = f"{MENU}/CogVideoX"
MODEL = "COGVIDEOX"
COND = "COGVIDEOX_CONDITIONING"
NONE = "none"
# The leanest transformers of the family, for a bound that holds before the model is known: CogVideoX-2B (width 1920)
# and CogVideoX 1.5 (width 3072, two frames a token)
LEANEST = ({"patch_size": 2, "num_attention_heads": 30, "attention_head_dim": 64},
           {"patch_size": 2, "patch_size_t": 2, "num_attention_heads": 48, "attention_head_dim": 64})


class CogVideoXModelLoader:
    DESCRIPTION = ("Loads a CogVideoX model (T2V or I2V, 1.0 or 1.5) from a diffusers folder in "
                   "models/CogVideo/<name>/ (transformer, vae, scheduler, and text_encoder + tokenizer unless a "
                   "T5-XXL CLIP feeds Text Encode). ComfyUI's model manager loads and unloads its parts.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (host.list_model_folders("CogVideo", marker="transformer") or ["CogVideoX-5b"], {
                    "tooltip": "A diffusers CogVideoX folder under models/CogVideo/ (e.g. CogVideoX-5b, CogVideoX-5b-I2V)."}),
                "precision": (list(DTYPES), {"default": "bf16", "tooltip": "Weight dtype. bf16 for Ampere+ GPUs, "
                                              "fp16 for older GPUs, fp32 on the CPU or for exact comparisons."}),
                "offload": (list(OFFLOAD_MODES), {"default": "auto", "tooltip": "Where the weights wait between "
                            "stages. Peak GPU memory for CogVideoX-5B at 49x480x720, bf16: none: transformer + T5 + "
                            "VAE stay on the GPU (~23.5 GiB, 32 GB cards). model: each component on the GPU only "
                            "while it runs (~13-14 GiB while sampling). sequential: weights stream layer by layer "
                            "(~4 GiB, slowest). block: the transformer streams block by block (~4 GiB as well, fewer "
                            "and larger transfers than sequential). auto: picked from the free VRAM and the model's size "
                            "(none, model, block or sequential; sequential under --novram). ComfyUI's launch flags "
                            "apply on top: --lowvram/--novram run T5 on the CPU, --novram loads nothing whole, "
                            "--highvram keeps the transformer on the GPU, --gpu-only everything."}),
            },
            "optional": {
                "transformer_file": ([NONE] + host.list_model_files("diffusion_models"), {
                    "default": NONE, "tooltip": "Optional single-file transformer from models/diffusion_models/ that "
                    "replaces the folder's transformer; its variant (2B/5B, T2V/I2V, 1.0/1.5) is read from the weights."}),
                "weight_storage": (["precision"] + list(WEIGHT_STORAGE), {
                    "default": "precision", "tooltip": "How the transformer's weights are stored; they are computed "
                    "in 'precision', each layer upcast while it runs (diffusers' layerwise casting; slightly different "
                    "video). fp8_e4m3fn / fp8_e5m2: CogVideoX-5B transformer 10.4 -> 5.9 GiB (patch embedding, "
                    "AdaLN modulation and output layer stay in 'precision', diffusers' default); fp8_*_all: the "
                    "modulation in fp8 too, 5.2 GiB (as kijai's wrapper for CogVideoX 1.0). A MagicMirror adapter "
                    "applied to this model is stored the same way. precision: stored as computed."}),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The CogVideoX bundle: connect to Text Encode, patch nodes and the Sampler.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, precision, offload, transformer_file=NONE, weight_storage="precision"):
        folder = find_model_folder(model, host.model_roots("CogVideo"))
        tfile = None if transformer_file in (None, NONE) else host.resolve_model_file("diffusion_models", transformer_file)
        storage = None if weight_storage == "precision" else WEIGHT_STORAGE[weight_storage]
        bundle = load_cogvideox(folder, dtype=DTYPES[precision], device=host.torch_device(), offload=offload,
                                offload_device=host.offload_device(), transformer_file=tfile, weight_dtype=storage,
                                weight_skip_patterns=storage_skip_patterns(weight_storage),
                                manager=host.model_manager(), devices=host.component_devices())
        return (bundle,)


class CogVideoXTextEncode:
    DESCRIPTION = ("Encodes a prompt with the model's T5, or with a T5-XXL CLIP from core's Load CLIP (at most 226 "
                   "tokens, as CogVideoX was trained). Cached. For identity adapters write the trigger word after "
                   "the class word: 'a man img is walking'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From CogVideoX Model Loader."}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt. Long, descriptive "
                                    "prompts work best; text past 226 T5 tokens is cut (a warning is logged)."}),
            },
            "optional": {
                "trigger_word": ("STRING", {"default": DEFAULT_TRIGGER, "tooltip": "Identity trigger (MagicMirror): "
                                 "removed from the prompt; the word before it ('man' in 'a man img') becomes the "
                                 "identity token. Empty = encode the prompt verbatim."}),
                "clip": ("CLIP", {"tooltip": "Optional T5-XXL from core's Load CLIP (type sd3, t5xxl_fp16 or "
                         "t5xxl_fp8_e4m3fn from models/text_encoders/): encodes instead of the model folder's "
                         "text_encoder/, which may then be left out (~9.5 GB)."}),
            },
        }

    RETURN_TYPES = (COND,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("T5 embeddings and token ids; connect to the Sampler's positive or negative input.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, text, trigger_word=DEFAULT_TRIGGER, clip=None):
        encoder = None if clip is None else host.ClipT5(clip)
        return (encode_prompt(model, text, trigger=trigger_word.strip() or None, encoder=encoder),)


class CogVideoXLoraLoader:
    DESCRIPTION = ("Adds a CogVideoX LoRA (diffusers/PEFT, kohya or ComfyUI keys) from models/loras/. "
                   "Returns a new model; the input model is left unchanged. Chain several to stack them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From the loader or another patch node."}),
            "lora_name": (host.list_model_files("loras") or ["none.safetensors"], {
                "tooltip": "A CogVideoX LoRA file under models/loras/."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplier of the LoRA's effect (0 = off, 1 = as trained)."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA recorded; it is applied only while sampling.",)
    FUNCTION = "load_lora"
    CATEGORY = CATEGORY

    def load_lora(self, model, lora_name, strength):
        patch = LoraPatch(load_lora_file(host.resolve_model_file("loras", lora_name)), strength)
        resolve_lora_targets(patch.lora, model.transformer)  # fail now (wrong model, no matching keys), not mid-run
        return (model.with_patch(patch),)


class CogVideoXSpeed:
    DESCRIPTION = ("Speed options for the sampler, all from diffusers: a cache that reuses work between steps, "
                   "torch.compile of the transformer blocks and the attention backend. Returns a new model; the input "
                   "model is left unchanged. One Speed node per model: a model that already passed a Speed node is "
                   "refused (set every option in one node). Settings that cannot act are refused with one line: "
                   "combinations with the model's patches, weight storage or offload, and an attention backend its "
                   "device or precision cannot run here; a step range or mag_ratios that do not fit the sampler's "
                   "steps at the sampler, before it starts.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From the loader or a patch node (before or after this node), not "
                          "from another Speed node: one Speed node per model (a second one is refused)."}),
                "cache": (list(CACHE_METHODS), {"default": "none", "tooltip": "Reuse work between denoising steps "
                          "(diffusers' caches): first_block_cache skips blocks 1..N while block 0's change stays under "
                          "threshold; pyramid_attention_broadcast / faster_cache reuse attention every other step "
                          "(faster_cache also approximates the negative prompt); taylorseer predicts attention and "
                          "feed-forward between full steps; mag_cache skips whole steps (needs mag_ratios). Not with "
                          "MagicMirror two-way: pyramid_attention_broadcast, faster_cache; not with DualReal: "
                          "mag_cache."}),
                "threshold": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.01, "tooltip":
                              "first_block_cache / mag_cache: larger = more skipped, faster, further from the "
                              "uncached video (0 = nothing skipped by first_block_cache). -1: diffusers' default "
                              "(0.05 / 0.06)."}),
                "interval": ("INT", {"default": -1, "min": -1, "max": 100, "tooltip": "pyramid_attention_broadcast "
                             "/ faster_cache: attention computed every interval-th step; taylorseer: a full step "
                             "every interval steps; mag_cache: at most interval skipped steps in a row. -1: diffusers' "
                             "default (2, 2, 5, 3)."}),
                "start_step": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip": "First step that may "
                               "reuse a cache (earlier steps are computed in full). -1: diffusers' default (pyramid: "
                               "timesteps below 800, faster_cache: below 681, taylorseer: step 3, mag_cache: the "
                               "first 20% of the steps in full). first_block_cache ignores it. Must be below "
                               "end_step and below the sampler's steps (else nothing is cached: refused)."}),
                "end_step": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip": "Steps from this one on are "
                             "computed in full. -1: diffusers' default (pyramid: timesteps above 100, the others to "
                             "the last step). first_block_cache and mag_cache ignore it. Must be above start_step "
                             "(an empty range is refused)."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the transformer blocks "
                            "(diffusers' regional compile): the first run compiles (minutes), later runs are faster. "
                            "Needs a working compiler toolchain (Triton on GPUs). Not with MagicMirror, DualReal or "
                            "the subject reference, not with fp8 weight storage, not with offload sequential (each "
                            "cuts the compiled blocks into one graph per layer); offload block works."}),
                "attention": (list(ATTENTION_BACKENDS), {"default": "native", "tooltip": "Attention kernel "
                              "(diffusers' attention dispatcher): native = PyTorch SDPA (any device and precision); "
                              "flash = flash-attn (CUDA or ROCm GPU, Ampere or newer, bf16/fp16); sage = "
                              "sageattention (NVIDIA GPU, Ampere or newer, bf16/fp16); xformers = xformers (CUDA "
                              "GPU). Each needs its package installed; a model they cannot run is refused here."}),
            },
            "optional": {
                "mag_ratios": ("STRING", {"default": "", "tooltip": "mag_cache only: the model's per-step magnitude "
                               "ratios, comma-separated, one per sampler step (another count is refused at the "
                               "sampler). Empty: this run calibrates (computes every block) and logs the ratios to "
                               "paste here."}),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the speed options recorded; they act only while sampling.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, cache, threshold, interval, start_step, end_step, compile, attention, mag_ratios=""):
        options = SpeedOptions(cache=cache, threshold=None if threshold < 0 else threshold,
                               interval=None if interval < 0 else interval,
                               start_step=None if start_step < 0 else start_step,
                               end_step=None if end_step < 0 else end_step,
                               mag_ratios=parse_ratios(mag_ratios or ""), compile=compile, attention=attention)
        return (model.with_speed(options),)


class CogVideoXSampler:
    DESCRIPTION = ("Generates a video latent with CogVideoX (the same loop as diffusers' pipelines). "
                   "Applies every patch recorded on the model for this run only. A size whose activations cannot fit "
                   "on the GPU is refused before sampling, naming the largest size that fits; Cancel stops it within "
                   "one transformer block.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From the loader or a patch node (LoRA, MagicMirror, ...)."}),
                "positive": (COND, {"tooltip": "Prompt from CogVideoX Text Encode."}),
                "negative": (COND, {"tooltip": "Negative prompt (an empty prompt is the usual choice)."}),
                "width": ("INT", {"default": 720, "min": 16, "max": 2048, "step": 16,
                                  "tooltip": "Multiple of 16. CogVideoX-5B: 720; 1.5: up to 1360."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 2048, "step": 16,
                                   "tooltip": "Multiple of 16. CogVideoX-5B: 480; 1.5: up to 768."}),
                "num_frames": ("INT", {"default": 49, "min": 1, "max": 1025, "step": 4,
                                       "tooltip": "4k+1 frames (49 = 6 s at 8 fps for 1.0; 81 for 1.5)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 or less disables the negative pass."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed (CPU generator: same seed, same video on any device)."}),
                "scheduler": (["DDIM", "DPM"], {"default": "DDIM", "tooltip": "CogVideoX DDIM or DPM-Solver++ "
                                                 "(CogVideoXDDIMScheduler / CogVideoXDPMScheduler)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "First frame for image-to-video models (resized to width x height)."}),
                "dynamic_cfg": ("BOOLEAN", {"default": False, "tooltip": "Cosine-ramped CFG, as diffusers' "
                                            "use_dynamic_cfg (recommended with DPM)."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Video latent {'samples': [B, C, T, H, W]}; connect to CogVideoX Decode.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, num_frames=None):
        """Before the prompt runs (a value that arrives through a link is None here and checked at run time): the
        ranges (ComfyUI leaves the inputs named here to this check), the sampler's own size rules, and a size no
        CogVideoX can run on this GPU: even the leanest transformer's activations (batch 1, bf16) exceed its memory.
        The model's own estimate against the memory it can get is checked when the Sampler starts."""
        required = cls.INPUT_TYPES()["required"]
        for name, value in (("width", width), ("height", height), ("num_frames", num_frames)):
            low, high = required[name][1]["min"], required[name][1]["max"]
            if value is not None and not low <= value <= high:
                return f"{name}={value} is outside {low}..{high}."
        if None in (width, height, num_frames):
            return True
        try:
            check_video_size(num_frames, height, width)
            total = host.device_total_memory()
            check_activation_memory(host.torch_device(), [(
                "even the leanest CogVideoX transformer (2B, or 1.5 at two frames a token; batch 1, bf16)",
                None if total is None else (total, 0),
                lambda f, h, w: min(transformer_activation_bytes(c, f, h, w, batch=1) for c in LEANEST))],
                num_frames, height, width, capacity_is="in all")
        except SamplingInputError as e:
            return str(e)
        return True

    def sample(self, model, positive, negative, width, height, num_frames, steps, cfg, seed, scheduler,
               image=None, dynamic_cfg=False):
        bar = host.ProgressBar(steps)

        def on_step(info):
            bar.update_absolute(info.step, info.total)

        host.check_interrupt()
        reports = {}  # what the patches report about the run (e.g. a blend history), carried in the LATENT
        samples = sample_video(model, positive, negative, num_frames=num_frames, height=height, width=width,
                               steps=steps, cfg=cfg, seed=seed, scheduler=scheduler.lower(),
                               use_dynamic_cfg=dynamic_cfg, image=image, callback=on_step,
                               interrupt=host.check_interrupt, outputs=reports)
        return ({"samples": samples.float().cpu(), **reports},)


class CogVideoXDecode:
    DESCRIPTION = ("Decodes a CogVideoX latent to frames (IMAGE [T, H, W, C]) for CreateVideo / SaveVideo. A decode "
                   "that cannot fit on the GPU is refused before it starts (turn tiling on); Cancel stops it between "
                   "the decoder's frame batches.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "The model whose VAE decodes the latent."}),
            "samples": ("LATENT", {"tooltip": "From CogVideoX Sampler."}),
            "tiling": ("BOOLEAN", {"default": True, "tooltip": "Decode in spatial tiles: much less VRAM, "
                                   "nearly identical frames."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("Frames [T, H, W, C] float 0..1; connect to CreateVideo (core) then SaveVideo.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, model, samples, tiling):
        host.check_interrupt()
        frames = decode_latents(model, samples["samples"], tiling=tiling, slicing=True,
                                interrupt=host.check_interrupt)  # [B, F, H, W, 3]
        return (frames.reshape(-1, *frames.shape[2:]),)


NODE_CLASS_MAPPINGS = {
    "MMV_CogVideoXModelLoader": CogVideoXModelLoader,
    "MMV_CogVideoXTextEncode": CogVideoXTextEncode,
    "MMV_CogVideoXLoraLoader": CogVideoXLoraLoader,
    "MMV_CogVideoXSampler": CogVideoXSampler,
    "MMV_CogVideoXDecode": CogVideoXDecode,
    "MMV_CogVideoXSpeed": CogVideoXSpeed,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMV_CogVideoXModelLoader": "CogVideoX Model Loader (MMV)",
    "MMV_CogVideoXTextEncode": "CogVideoX Text Encode (MMV)",
    "MMV_CogVideoXLoraLoader": "CogVideoX LoRA Loader (MMV)",
    "MMV_CogVideoXSampler": "CogVideoX Sampler (MMV)",
    "MMV_CogVideoXDecode": "CogVideoX Decode (MMV)",
    "MMV_CogVideoXSpeed": "CogVideoX Speed (MMV)",
}
