"""Subject-reference nodes: the subject LoRA (branch-scoped) and the reference image tokens."""

from __future__ import annotations

from ..models.lora import LoraPatch, load_lora_file, resolve_lora_targets
from ..models.subject import NORM_LORA_MODULES, SubjectReferencePatch, encode_reference
from . import host
from .cogvideox import MENU, MODEL

CATEGORY = f"{MENU}/Subject Reference"

SCOPES = ("auto", "reference", "all")
LORA_ALPHA = 64.0  # the subject method's LoRA alpha (rank 128, alpha 64: the released v1 checkpoint ran at 0.5)


def lora_scope(metadata: dict, requested: str) -> str:
    """'reference' for files this pack trained (recorded in metadata), 'all' for others (e.g. the
    released v1 checkpoint, whose code applied the norm LoRA to every token). A recorded scope that is neither is
    refused (a mistyped value would silently run the other scope)."""
    recorded = metadata.get("subject_lora_scope")
    if recorded is not None and recorded not in SCOPES[1:]:
        raise ValueError(f"the LoRA records subject_lora_scope={recorded!r}, which is neither 'reference' nor 'all'; "
                         "fix the file's metadata, or re-export it with the subject-replay trainer.")
    if requested != "auto":
        return requested
    return recorded or "all"


class SubjectReferenceLoraLoader:
    DESCRIPTION = ("Loads a subject-reference LoRA. Its norm1/norm2 LoRA acts on the reference tokens only "
                   "('reference' scope, recorded by the pack's trainer) or on all tokens ('all', as the released "
                   "v1 checkpoint was run). Files that record no alpha (such as the v1 checkpoint) get scale "
                   "alpha / rank with the alpha input (64, the method's), as their authors ran them. Use with "
                   "Subject Reference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "A CogVideoX-5B model from the loader."}),
            "lora_name": (host.list_model_files("loras") or ["subject_lora.safetensors"], {
                "tooltip": "The subject-reference LoRA in models/loras/."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01,
                                   "tooltip": "LoRA strength (1 = as trained)."}),
            "norm_scope": (list(SCOPES), {"default": "auto", "tooltip": "auto: from the file's metadata (pack-"
                           "trained files: reference; others: all). reference: norm LoRA on reference tokens only. "
                           "all: on every token."}),
        }, "optional": {
            "alpha": ("FLOAT", {"default": LORA_ALPHA, "min": 0.0, "max": 4096.0, "step": 1.0,
                                "tooltip": "LoRA alpha for files that record none (no alpha keys or adapter "
                                "metadata, e.g. the released v1 checkpoint: r=128 trained with alpha 64, so scale "
                                "0.5). Pack-trained files and files with alpha metadata ignore it."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the subject LoRA recorded; connect to Subject Reference.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, lora_name, strength, norm_scope="auto", alpha=LORA_ALPHA):
        lora = load_lora_file(host.resolve_model_file("loras", lora_name), alpha=alpha)
        resolve_lora_targets(lora, model.transformer)  # fail now if it does not fit
        scope = lora_scope(lora.metadata, norm_scope)
        patch = LoraPatch(lora, strength, reference_only=NORM_LORA_MODULES if scope == "reference" else ())
        return (model.with_patch(patch),)


class SubjectReference:
    DESCRIPTION = ("Adds reference-image tokens (the subject) to the model: the image is VAE-encoded with the "
                   "model's own VAE and patch-embedded into the sequence [text; reference; video] at frame 0. "
                   "Write prompts starting with <cls>, e.g. '<cls> a teddy bear sits on a beach'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "Usually after Subject Reference LoRA Loader."}),
            "image": ("IMAGE", {"tooltip": "The subject (object, pet, person) on a plain background works best; "
                                "several images (a batch) are all used as references."}),
            "max_side": ("INT", {"default": 720, "min": 64, "max": 2048, "step": 16,
                                 "tooltip": "The reference keeps its aspect ratio, longer side at most this (on "
                                 "CogVideoX 1.5 at most its RoPE grid, 2400 px on the 5B models)."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model carrying the reference; connect to the Sampler (CFG keeps it in both passes).",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, image, max_side):
        host.check_interrupt()
        latents = encode_reference(model, image, max_side=max_side)
        return (model.with_patch(SubjectReferencePatch(latents, vae_scale=model.vae_scale_factor_spatial)),)


NODE_CLASS_MAPPINGS = {
    "MMV_SubjectReferenceLoraLoader": SubjectReferenceLoraLoader,
    "MMV_SubjectReference": SubjectReference,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMV_SubjectReferenceLoraLoader": "Subject Reference LoRA Loader",
    "MMV_SubjectReference": "Subject Reference",
}
