"""Training configuration: documented dataclass fields, loaded from YAML/TOML and the command line.

Every trainer declares a dataclass that extends :class:`TrainConfig`; each field carries its help
text in ``metadata["help"]``. The command line is generated from the fields::

    python -m training.train_magicmirror --config my.yaml --learning_rate 2e-5 --no-gradient_checkpointing

Precedence: dataclass defaults < preset < ``--config`` file < command-line flags.
``python -m training.<trainer> --help`` lists every field with its help and default, and
``--print_config`` prints the resolved configuration as YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field


def doc(default, help: str, **kwargs):  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Fields shared by every trainer of the pack."""

    # --- model and data
    model_path: str = doc("", "Diffusers CogVideoX folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/).")
    data: str = doc("", "Training data: a metadata.jsonl file, or a folder with metadata.jsonl or prompts.txt + "
                        "videos.txt/images.txt.")
    output_dir: str = doc("runs/train", "Where checkpoints, logs, validation videos and the exported file go.")
    height: int = doc(480, "Training height in pixels (multiple of 16).")
    width: int = doc(720, "Training width in pixels (multiple of 16).")
    num_frames: int = doc(49, "Frames per video sample (4k+1). Images always use 1.")
    frame_sampling: str = doc("uniform", "How frames are picked from longer videos: uniform | start | random.",
                              choices=("uniform", "start", "random"))
    # --- optimisation
    seed: int = doc(42, "Seed for data order, noise and timesteps (every step is reproducible).")
    max_steps: int = doc(1000, "Optimizer steps to train for.")
    batch_size: int = doc(1, "Samples per device per micro-step.")
    gradient_accumulation_steps: int = doc(1, "Micro-steps per optimizer step (effective batch = batch_size x "
                                              "accumulation x processes).")
    learning_rate: float = doc(1e-5, "Peak learning rate.")
    lr_scheduler: str = doc("cosine", "constant | constant_with_warmup | linear | cosine | cosine_with_restarts.",
                            choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"))
    lr_warmup_steps: int = doc(0, "Linear warm-up steps.")
    lr_num_cycles: int = doc(1, "Cycles for cosine_with_restarts.")
    adam_beta1: float = doc(0.9, "AdamW beta1.")
    adam_beta2: float = doc(0.95, "AdamW beta2.")
    adam_weight_decay: float = doc(1e-4, "AdamW weight decay.")
    adam_epsilon: float = doc(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = doc(False, "8-bit AdamW from bitsandbytes (pip install bitsandbytes; CUDA only).")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm (0 = off).")
    mixed_precision: str = doc("bf16", "no | bf16 | fp16. Frozen weights are stored in this dtype; trainable "
                                       "weights stay in fp32.", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = doc(True, "Recompute transformer blocks in backward (much less memory).")
    # --- precompute cache
    precompute_cache: bool = doc(False, "Encode all videos (VAE) and prompts (T5) once into a cache, then free "
                                        "the VAE and text encoder during training.")
    cache_dir: str = doc("", "Cache folder (default: <output_dir>/cache). Entries are keyed by content hash, "
                             "resolution and model, so a cache can be shared between runs.")
    # --- checkpoints, logging, validation
    checkpointing_steps: int = doc(500, "Save a resumable checkpoint every N steps (written atomically).")
    checkpoints_total_limit: int = doc(3, "Keep at most this many checkpoints (0 = keep all).")
    resume_from: str = doc("", "'latest', a step number, or empty for a fresh run.")
    logging_steps: int = doc(1, "Log losses every N steps.")
    report_to: str = doc("tensorboard", "tensorboard | none.", choices=("tensorboard", "none"))
    validation_steps: int = doc(0, "Generate validation videos every N steps (0 = only at the end if prompts are set).")
    validation_prompts: list = doc([], "Prompts for validation videos.")
    validation_num_frames: int = doc(9, "Frames of validation videos (4k+1).")
    validation_steps_sampling: int = doc(25, "Denoising steps for validation videos.")


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def read_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    return data


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML or TOML file with field: value pairs.")
    parser.add_argument("--print_config", action="store_true", help="Print the resolved config as YAML and exit.")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                help=f"{meta.get('help', '')} (default: {default})")
            parser.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        elif kind is list:
            parser.add_argument(f"--{f.name}", nargs="*", default=argparse.SUPPRESS,
                                help=f"{meta.get('help', '')} (default: {default})")
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, choices=meta.get("choices"),
                                help=f"{meta.get('help', '')} (default: {default!r})")
    return parser


def load_config(cls, argv=None, presets: dict | None = None, description: str = ""):
    """Resolve a ``cls`` config from defaults, ``--preset``, ``--config`` and flags."""
    parser = build_parser(cls, description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="A named set of defaults.")
    args = vars(parser.parse_args(argv))
    values: dict = {}
    preset = args.pop("preset", None)
    if preset:
        values.update(presets[preset])
    config_file = args.pop("config", None)
    print_config = args.pop("print_config", False)
    if config_file:
        values.update(read_config_file(config_file))
    values.update(args)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"unknown config field(s): {', '.join(unknown)} (see --help for the fields)")
    config = cls(**values)
    if print_config:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        raise SystemExit(0)
    return config


def config_help_markdown(cls) -> str:
    """A Markdown table of the fields (README / docs generation)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
