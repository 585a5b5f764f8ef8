"""MagicMirror nodes: face encoder loader, face encode, apply (CAN-injected sampling)."""

from __future__ import annotations

import logging
import os

import torch

from ..models.id_encoder import load_photomaker_id_encoder
from ..models.magicmirror import MagicMirrorPatch, load_magicmirror
from ..models.speed import store_adapter_like
from . import host
from .cogvideox import MENU, MODEL

CATEGORY = f"{MENU}/MagicMirror"

logger = logging.getLogger(__name__)
FACE_ENCODER = "MAGICMIRROR_FACE_ENCODER"
FACE_EMBEDS = "FACE_EMBEDS"
PROVIDERS = {"CPU": ["CPUExecutionProvider"], "CUDA": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "ROCm": ["ROCMExecutionProvider", "CPUExecutionProvider"],
             "CoreML": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
             "DirectML": ["DmlExecutionProvider", "CPUExecutionProvider"]}


def insightface_packs() -> list[str]:
    """Pack names found in <insightface root>/models/ (antelopev2, buffalo_l, ...)."""
    names = set()
    for root in host.model_roots("insightface"):
        sub = os.path.join(root, "models")
        if os.path.isdir(sub):
            names.update(n for n in os.listdir(sub) if os.path.isdir(os.path.join(sub, n)))
    return sorted(names)


def insightface_root(pack: str) -> str:
    from ..models.cogvideox import ModelFolderError

    tried = [os.path.join(r, "models", pack) for r in host.model_roots("insightface")]
    for root, path in zip(host.model_roots("insightface"), tried):
        if os.path.isdir(path):
            return root
    raise ModelFolderError(f"insightface pack {pack!r} not found. Paths searched:\n  " + "\n  ".join(tried) +
                           "\nPut antelopev2 (or buffalo_l) in ComfyUI/models/insightface/models/<name>/.")


class MagicMirrorFaceEncoderLoader:
    DESCRIPTION = ("Loads MagicMirror's face encoder: insightface (detection, alignment, ArcFace) and the "
                   "PhotoMaker-V2 ID encoder (CLIP ViT-L/14 + ID perceiver).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "insightface": (insightface_packs() or ["antelopev2"], {
                "tooltip": "Face analysis pack in models/insightface/models/ (antelopev2 recommended, or buffalo_l)."}),
            "provider": (list(PROVIDERS), {"default": "CPU", "tooltip": "ONNX Runtime device for face detection. "
                         "CUDA needs onnxruntime-gpu (see README); the log says which provider was actually used."}),
            "photomaker": (host.list_model_files("photomaker") or ["photomaker-v2.bin"], {
                "tooltip": "PhotoMaker-V2 checkpoint (photomaker-v2.bin) in models/photomaker/."}),
            "precision": (["fp16", "bf16", "fp32"], {"default": "fp16",
                          "tooltip": "dtype of the CLIP tower and ID perceiver (fp32 on the CPU)."}),
        }}

    RETURN_TYPES = (FACE_ENCODER,)
    RETURN_NAMES = ("face_encoder",)
    OUTPUT_TOOLTIPS = ("Connect to MagicMirror Face Encode.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, insightface, provider, photomaker, precision):
        from ..models.cogvideox import DTYPES
        from ..models.face_analysis import FaceAnalyzer
        from ..models.face_encoder import FaceEncoder

        analyzer = FaceAnalyzer(insightface_root(insightface), name=insightface, providers=PROVIDERS[provider])
        id_encoder = load_photomaker_id_encoder(host.resolve_model_file("photomaker", photomaker))
        placement = host.placement()  # where ComfyUI runs its own CLIP vision (the CPU under --lowvram / --novram)
        dtype = torch.float32 if placement.device.type == "cpu" else DTYPES[precision]
        encoder = FaceEncoder(analyzer, id_encoder, device=placement.device, dtype=dtype, placement=placement)
        logger.info("MagicMirror face encoder: %s", encoder.describe())
        return (encoder,)


class MagicMirrorFaceEncode:
    DESCRIPTION = ("Encodes 1..N reference photos of one person (IMAGE batch) into face embeddings. Uses the "
                   "largest face of each photo; several photos are averaged (ID) and stacked (face tokens).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_encoder": (FACE_ENCODER, {"tooltip": "From MagicMirror Face Encoder Loader."}),
            "images": ("IMAGE", {"tooltip": "Reference photo(s) of the person; batch several with a Batch node."}),
        }}

    RETURN_TYPES = (FACE_EMBEDS, "IMAGE")
    RETURN_NAMES = ("face_embeds", "aligned_faces")
    OUTPUT_TOOLTIPS = ("Connect to MagicMirror Apply.", "The aligned face crops that were encoded (preview).")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, face_encoder, images):
        host.check_interrupt()
        embeds = face_encoder.encode(images)
        return (embeds, embeds.crops)


class MagicMirrorApply:
    DESCRIPTION = ("Adds MagicMirror identity adapters (CAN, face tokens, decoupled cross-attention, ID fusion) "
                   "to a CogVideoX model for sampling. Write the trigger word after the class word in the prompt: "
                   "'a man img is walking'. Returns a new model; the input model is unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "The CogVideoX the adapter was trained on (recorded in the file; another "
                              "variant - 1.0/1.5, T2V/I2V, size - is refused)."}),
            "adapter": (host.list_model_files("magicmirror") or ["magicmirror.safetensors"], {
                "tooltip": "MagicMirror adapter in models/magicmirror/ (exported by training.train_magicmirror)."}),
            "face_embeds": (FACE_EMBEDS, {"tooltip": "From MagicMirror Face Encode."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "Identity strength: 0 = the base model exactly, and small values stay "
                                   "close to it (it scales CAN, the cross-attention, the ID fusion and how much every "
                                   "token attends to the face tokens). Values other than 0 and 1 need the native "
                                   "attention backend (Speed node)."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with MagicMirror recorded; connect to the Sampler.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, adapter, face_embeds, strength):
        mm = load_magicmirror(host.resolve_model_file("magicmirror", adapter)).to(model.dtype)  # waits on the CPU
        store_adapter_like(mm, model.transformer)  # fp8 weight storage of the model: the adapter's too
        mm.check_compatible(model.transformer)
        return (model.with_patch(MagicMirrorPatch(mm, face_embeds, strength, name=f"magicmirror:{adapter}")),)


NODE_CLASS_MAPPINGS = {
    "MMV_MagicMirrorFaceEncoderLoader": MagicMirrorFaceEncoderLoader,
    "MMV_MagicMirrorFaceEncode": MagicMirrorFaceEncode,
    "MMV_MagicMirrorApply": MagicMirrorApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMV_MagicMirrorFaceEncoderLoader": "MagicMirror Face Encoder Loader",
    "MMV_MagicMirrorFaceEncode": "MagicMirror Face Encode",
    "MMV_MagicMirrorApply": "MagicMirror Apply",
}
