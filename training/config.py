"""Training configuration: documented dataclass fields, loaded from YAML/TOML and the command line.

Every trainer declares a dataclass that extends :class:`TrainConfig`; each field carries its help
text in ``metadata["help"]``. The command line is generated from the fields::

    python -m training.train_magicmirror --config my.yaml --learning_rate 2e-5 --no-gradient_checkpointing

Precedence, for every field: the trainer's dataclass defaults < ``--preset`` < ``--config`` file <
command-line flags. Nothing rewrites a value afterwards: a trainer whose defaults differ from the
shared ones overrides the field default in its own dataclass, and a combination that makes no sense
is an error, never silently replaced (``--preset tiny`` generates its own model and data paths, so it
refuses paths set in a file or on the command line). ``python -m training.<trainer> --help`` lists
every field with the trainer's own default, and ``--print_config`` prints the resolved configuration
as YAML.

Bad input (an unknown field, a value of the wrong type, an invalid combination) raises
:class:`InputError`: one line saying what, where and how to fix it; the command line prints it and
exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field


class InputError(ValueError):
    """Bad input found before training (config, data, media, model paths): the message is one line
    saying what, where and how to fix it. ``cli_main`` prints it and exits with status 2."""


def doc(default, help: str, **kwargs):  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Fields shared by every trainer of the pack."""

    # --- model and data
    model_path: str = doc("", "Diffusers model folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/): "
                              "CogVideoX, or Wan 2.1/2.2 for the trainers that support it.")
    data: str = doc("", "Training data: a metadata.jsonl file, or a folder with metadata.jsonl or prompts.txt + "
                        "videos.txt/images.txt.")
    output_dir: str = doc("runs/train", "Where checkpoints, logs, validation videos and the exported file go.")
    height: int = doc(480, "Training height in pixels (multiple of 16).")
    width: int = doc(720, "Training width in pixels (multiple of 16).")
    num_frames: int = doc(49, "Frames per video sample (4k+1). Images always use 1.")
    frame_sampling: str = doc("uniform", "How frames are picked from longer videos: uniform | start | random.",
                              choices=("uniform", "start", "random"))
    buckets: list = doc([], "Training shapes FRAMESxHEIGHTxWIDTH, e.g. 49x480x720 49x720x480 17x480x720, or auto "
                            "(derived from the data: each sample's aspect ratio at about height x width pixels and "
                            "its frames up to num_frames). Each sample trains at its nearest bucket (the most frames "
                            "it has enough for, then the nearest aspect ratio; resized with the aspect kept and "
                            "centre-cropped) and a batch holds one bucket; samples shorter than every bucket are left "
                            "out. Empty: every sample at num_frames x height x width (height and width also size the "
                            "validation videos).")
    # --- optimisation
    seed: int = doc(42, "Seed for data order, noise and timesteps (every step is reproducible).")
    max_steps: int = doc(1000, "Optimizer steps to train for.")
    gradient_accumulation_steps: int = doc(1, "Micro-steps per optimizer step (effective batch = the batch size "
                                              "x accumulation x processes).")
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
    cp_degree: int = doc(1, "Context parallelism: split each sample's token sequence over this many processes "
                            "(diffusers' Ulysses attention; processes = data-parallel groups x cp_degree; it must "
                            "divide the process count, the attention heads and the token counts). 1 = off.")
    # --- flow-matching bases (Wan); CogVideoX refuses values other than the defaults
    flow_shift: float = doc(0.0, "Wan: shift of the sigma draw, sigma = s*u / (1 + (s-1)*u) (0 = the model's scheduler "
                                 "config: 3.0 for Wan 2.1 and 2.2 A14B, 5.0 for TI2V-5B).")
    flow_sigma_density: str = doc("uniform", "Wan: density of u before the shift: uniform | logit_normal "
                                             "(sigmoid of N(flow_logit_mean, flow_logit_std)).",
                                  choices=("uniform", "logit_normal"))
    flow_logit_mean: float = doc(0.0, "Wan: mean of the logit-normal density.")
    flow_logit_std: float = doc(1.0, "Wan: standard deviation of the logit-normal density.")
    experts: str = doc("all", "Wan 2.2 A14B: the experts trained: all (each sample goes to the expert of its sigma; one "
                              "file per expert) | high_noise | low_noise (sigma drawn from that expert's range only).",
                       choices=("all", "high_noise", "low_noise"))
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
    validation_protocol: str = doc("magicmirror", "Evaluation protocol of the validation metrics (frames scored, "
                                                  "detector size and retry, clamping, faceless videos, references; "
                                                  "see python -m training.evaluate --help): magicmirror | consisid | "
                                                  "opens2v.", choices=("magicmirror", "consisid", "opens2v"))


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def read_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict."""
    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path} (pass an existing .yaml/.yml/.toml file to --config)")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                return tomllib.load(f)
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError / UnicodeDecodeError
        raise InputError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'YAML'} "
                         f"({' '.join(str(e).split())}); fix the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def coerce(kind, value, name: str, source: str):
    """``value`` (from a preset or a config file) as the field's type; YAML reads ``1e-5`` as a string,
    so numbers in strings are accepted. Raises :class:`InputError` naming the field and its source."""
    def bad():
        return InputError(f"{source}: {name}={value!r} is not a valid {kind.__name__}; write e.g. "
                          f"{name}: {_EXAMPLES.get(kind, '...')}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        try:
            return _parse_bool(str(value))
        except argparse.ArgumentTypeError:
            raise bad() from None
    if kind is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if kind is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad()
    if kind is int and isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        raise bad() from None
    if kind is float:
        return number
    if not number.is_integer():
        raise bad()
    return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(number)


_EXAMPLES = {bool: "true", int: "100", float: "0.0001", str: "some-text"}


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
    """Resolve a ``cls`` config: defaults < ``--preset`` < ``--config`` file < flags, for every field."""
    parser = build_parser(cls, description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="A named set of defaults.")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None)
    config_file = args.pop("config", None)
    print_config = args.pop("print_config", False)
    layers = [(f"--preset {preset}", presets[preset])] if preset else []
    if config_file:
        layers.append((config_file, read_config_file(config_file)))
    layers.append(("the command line", args))
    config = resolve_config(cls, layers)
    if print_config:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        raise SystemExit(0)
    return config


def resolve_config(cls, layers: list[tuple[str, dict]]):
    """Build ``cls`` from ``(source, values)`` layers, later ones winning; every value is checked
    (known field, type, choices) with its source named in the error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict = {}
    for source, layer in layers:
        for name, value in layer.items():
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                raise InputError(f"{source}: unknown config field {name!r}"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; see --help for the fields")
            value = coerce(hints[name], value, name, source)
            choices = fields[name].metadata.get("choices")
            if choices and value not in choices:
                raise InputError(f"{source}: {name}={value!r} is not one of {', '.join(map(str, choices))}")
            values[name] = value
    config = cls(**values)
    check_generated_fields(config, layers)
    return config


def check_generated_fields(config, layers: list[tuple[str, dict]]) -> None:
    """A switch whose field lists ``generates`` in its metadata (``tiny_demo``: the paths the ``--preset tiny``
    builder fills with generated models and data) is refused together with a value set for one of those fields:
    the builder would replace it, and nothing may silently rewrite a value the user set."""
    def last_source(name):
        return next((source for source, layer in reversed(layers) if name in layer), "the defaults")

    for f in dataclasses.fields(config):
        generated = f.metadata.get("generates", ())
        if not generated or not getattr(config, f.name):
            continue
        defaults = {g.name: g.default for g in dataclasses.fields(config) if g.name in generated}
        clashing = [name for name in generated if getattr(config, name) != defaults[name]]
        if not clashing:
            continue
        switch = last_source(f.name)
        switch = switch if switch.startswith("--preset") else \
            f"--{f.name}" if switch == "the command line" else f"{f.name}: true in {switch}"
        given = ", ".join(f"--{name}" if last_source(name) == "the command line" else f"{name} (in {last_source(name)})"
                          for name in clashing)
        listed = f"{', '.join(generated[:-1])} and {generated[-1]}" if len(generated) > 1 else generated[0]
        raise InputError(f"{switch} generates {listed} itself, "
                         f"but {given} {'is' if len(clashing) == 1 else 'are'} set too; drop "
                         f"{'it' if len(clashing) == 1 else 'them'} to run the demo, or add --no-{f.name} to train "
                         "on your own files with the preset's other settings")


def config_help_markdown(cls, base=None) -> str:
    """A Markdown table of the fields (README / docs generation). With ``base`` (e.g. :class:`TrainConfig`),
    only the fields ``cls`` adds or whose default it changes."""
    def default_of(f):
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    inherited = {f.name: default_of(f) for f in dataclasses.fields(base)} if base else {}
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = default_of(f)
        if f.name not in inherited or inherited[f.name] != default:
            rows.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
