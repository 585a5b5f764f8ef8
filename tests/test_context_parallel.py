"""Context parallelism (``--cp_degree``): two gloo CPU processes with diffusers' Ulysses attention, one CP group,
compute the loss and every gradient of one process on the whole sequence, for each trainer and base: Reg-DPO on Wan
(2.1 I2V: the CLIP image tokens and mask channels; 2.2 TI2V: per-token timesteps; 2.2 I2V A14B: two experts) and on
CogVideoX (1.0 T2V; 1.5 I2V: two frames a token) (also ``--train full``: the whole transformer
trained, its frozen reference copy split too), MagicMirror with its face-token stream (two-way:
split with the video; one-way: replicated, its attention merged over the group), subject replay with its reference
stream (image steps; a video-replay step whose dropped reference tokens leave an odd count, padded and masked) and
DualReal (identity and motion steps; the StageBlender's max over the group).

The reference is the same trainer module with its context parallelism suspended, on the batch and generator a
single-process run draws for that step; the CP run goes through the trainer's own code: ``enable_context_parallel``, its
accelerator's DDP over both processes (and, for every case, torch's FSDP, FULL_SHARD over both processes with
one unit per block, as ``shard_frozen_model`` lays it out: FSDP composes with CP), ``next_batch`` and the step generator
keyed by the data-parallel rank, and ``Trainer.backward`` (loss x CP degree). Each rank's own gradients are only its
share's part (checked: they differ from the reference and their sum equals it). The trainable weights are random
(zero-initialised output layers would hide the streams) and everything runs in float64, so rounding cannot hide a wrong
share: gradients agree to 1e-8 of the largest (measured: 2e-15 or less; MagicMirror's one-way stream 6e-10, its
attention is computed in float32), the losses (which end in float32) to 1e-6. Ring attention needs a backend that
returns the log-sum-exp (flash, cuDNN on GPUs), which the CPU's SDPA does not: only Ulysses runs here. LoRA dropout
draws its masks per token from the global generator, which a rank holding half of the tokens cannot reproduce: the
subject-replay run sets it to 0.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from test_training_fsdp import tiny_config
from test_training_inputs import MODULES, TRAINERS, inputs, replace, valid_args  # noqa: F401 - the inputs fixture

from magicmirror_video.training.config import load_config

CP_RUN = r"""
import dataclasses, sys, types, torch, torch.distributed as dist
from magicmirror_video.training import train_dualreal, train_magicmirror, train_regdpo, train_subject_replay
from magicmirror_video.training.config import load_config
from magicmirror_video.training.trainer import step_generator
dist.init_process_group("gloo")
name, out, cases, wrap = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
module_of, trainer_class = {"dualreal": (train_dualreal, train_dualreal.DualRealTrainer),
                            "regdpo": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_wan": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_wan_ti2v": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_wan_a14b": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_cogvideox15_i2v": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_full": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "magicmirror": (train_magicmirror, train_magicmirror.MagicMirrorTrainer),
                            "subject_replay": (train_subject_replay, train_subject_replay.SubjectReplayTrainer)}[name]
argv = ["--preset", "tiny", "--output_dir", out, "--tiny_demo", "false", "--mixed_precision", "no",
        "--config", out + "/resolved.yaml", "--cp_degree", "2"]
if name == "subject_replay":
    argv += ["--lora_dropout", "0"]
if name == "regdpo_full":  # the transformer trained, the reference its frozen copy (context-parallel too)
    argv += ["--train", "full"]
config = load_config(trainer_class.config_class, argv, module_of.PRESETS)
trainer = trainer_class(config)
trainer.inputs  # the input checks with --cp_degree 2 over the two processes pass
trainer.accelerator = acc = trainer._make_accelerator()  # the trainer's own (DDP finds unused parameters)
assert (trainer.data_parallel_size, trainer.data_parallel_rank) == (1, 0)
torch.manual_seed(config.seed)  # as Trainer.train(): every rank initialises the trainable parts alike
trainer.module = module = trainer.build()
# float64 everywhere, so rounding (float32: ~1e-5 of a gradient after a few blocks) cannot hide a wrong share
torch.set_default_dtype(torch.float64)
spec = trainer.spec
spec.dtype = torch.float64
image_encoder = getattr(getattr(spec, "model", None), "image_encoder", None)
owners = [module, *spec.transformers, spec.vae, spec.text_encoder, image_encoder]
for m in owners + [x for v in module.frozen.values() for x in (v if isinstance(v, list) else [v])]:
    if isinstance(m, torch.nn.Module):
        m.double()
with torch.no_grad():  # random trainable weights: zero-initialised output layers would hide the streams' effect
    for p in module.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
trainer.enable_context_parallel(module)
data = trainer.dataset()
single = trainer_class(dataclasses.replace(config, cp_degree=1))  # what one process draws for a step
single.accelerator = types.SimpleNamespace(num_processes=1, process_index=0)
flat = lambda b: [v for k in sorted(b) for v in (b[k] if isinstance(b[k], list) else [b[k]])]

from magicmirror_video.models import block_runner
masked = []  # the block runner's key masks: the forward padded a split stream
key_mask = block_runner.ForwardState.key_mask
block_runner.ForwardState.key_mask = lambda self, *a: masked.append(key_mask(self, *a)) or masked[-1]

def pads(step):
    masked.clear()
    with torch.no_grad():
        trainer.loss(module, trainer.next_batch(data, step, 0), step_generator(config.seed, step, 0))
    return any(m is not None for m in masked)

def case(kind):
    if name == "magicmirror":
        module.adapter.config = dataclasses.replace(module.adapter.config, face_attention=kind)
        return 1
    steps = [s for s in range(1, 200) if kind == "-" or trainer.task_of(s) == kind]
    if name == "subject_replay" and kind == "video":  # a step whose dropped reference tokens leave an odd count
        return next(s for s in steps if pads(s))
    return steps[0]

def run(m, step, backward):
    m.zero_grad()
    batch = trainer.next_batch(data, step, 0)
    expected = single.next_batch(data, step, 0)
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat(batch), flat(expected)))
    generator = step_generator(config.seed, step, 0 * trainer.data_parallel_size + trainer.data_parallel_rank)
    loss, _ = trainer.loss(m, batch, generator)
    backward(loss)
    return loss.detach(), {n.replace("module.", "", 1): p.grad.clone() for n, p in m.named_parameters()
                           if p.grad is not None}

results = {}
for kind in cases:
    step = case(kind)
    with trainer.single_process():  # one process on the whole sequence
        ref_loss, ref = run(module, step, lambda loss: loss.backward())
    _, own = run(module, step, lambda loss: loss.backward())  # this rank alone: its share's part of the gradients
    summed = {n: g.clone() for n, g in own.items()}
    for g in summed.values():
        dist.all_reduce(g)
    results[kind] = (step, ref_loss, ref, own, summed)
if wrap == "ddp":
    prepared = acc.prepare(module)  # DDP over both processes, as the trainer runs
else:  # torch's FSDP over both processes, one unit per block, the frozen transformers inside (shard_frozen_model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    module.transformers = torch.nn.ModuleList(trainer.spec.transformers)
    prepared = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({trainer.spec.block_class}), use_orig_params=True,
                    device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD)
    full = lambda m, step, backward: gathered(run(m, step, backward)[0], m)
    def gathered(loss, m):
        with FSDP.summon_full_params(m, with_grads=True):
            return loss, {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in m.named_parameters()
                          if p.grad is not None and p.requires_grad}
for kind, (step, ref_loss, ref, own, summed) in results.items():
    if name == "magicmirror":
        case(kind)
    loss, grads = (run if wrap == "ddp" else full)(prepared, step, trainer.backward)
    # (FSDP's flat parameters give the parameters a step leaves unused, e.g. DualReal's motion adapter in an identity
    # step, zero gradients where the plain module has none)
    unused = [n for n in set(grads) - set(ref) if wrap == "fsdp" and not grads[n].any()]
    assert set(grads) - set(unused) == set(ref), sorted((set(grads) - set(unused)) ^ set(ref))
    d_loss = (loss - ref_loss).abs().item()
    d_grad = max((grads[n] - g).abs().max().item() for n, g in ref.items())
    d_sum = max((summed[n] - g).abs().max().item() for n, g in ref.items())
    d_own = max((own[n] - g).abs().max().item() for n, g in ref.items())
    scale = max(g.abs().max().item() for g in ref.values())
    assert d_loss <= 1e-6 * max(1.0, abs(ref_loss.item())), (kind, d_loss, ref_loss)  # (losses end in float32)
    assert d_grad <= 1e-8 * scale and d_sum <= 1e-8 * scale, (kind, d_grad, d_sum, scale)
    assert d_own > 1e-4 * scale, (kind, d_own)  # a rank's own gradients are a part only
    print(f"rank {dist.get_rank()} {name} {kind} (step {step}, {wrap}) equal: loss {ref_loss.item():.6f} "
          f"|dloss| {d_loss:.2e}, {len(ref)} gradients max |dgrad| {d_grad:.2e} (largest {scale:.2e}); "
          f"one rank's own vs whole {d_own:.2e}, summed over ranks {d_sum:.2e}", flush=True)
dist.destroy_process_group()
"""

CASES = {"regdpo": ["-"], "regdpo_wan": ["-"], "regdpo_wan_ti2v": ["-"], "regdpo_wan_a14b": ["-"],
         "regdpo_cogvideox15_i2v": ["-"], "regdpo_full": ["-"], "magicmirror": ["two-way", "one-way"],
         "subject_replay": ["image", "video"], "dualreal": ["identity", "motion"]}
FSDP = tuple(CASES)  # every case also under FSDP (FULL_SHARD over both processes)


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_over_two_cpu_processes_equals_one_process(name, tmp_path):
    import yaml

    config, _ = tiny_config(name, tmp_path)  # the tiny assets, built once, then read by both ranks
    fields = ("model_path", "data", "identity_data", "clip_vision", "pairs", "arcface_path", "num_frames")
    resolved = {k: v for k, v in dataclasses.asdict(config).items() if k in fields}
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    script = tmp_path / "cp_run.py"
    script.write_text(CP_RUN)
    for wrap in ("ddp", "fsdp") if name in FSDP else ("ddp",):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), name, str(tmp_path), ",".join(CASES[name]), wrap], capture_output=True,
                              text=True, timeout=400, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert proc.stdout.count(" equal: ") == 2 * len(CASES[name]), proc.stdout
        print(proc.stdout)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing loaded


def with_heads(model: str, heads: int, tmp_path) -> str:
    """A copy of a config-only model folder whose transformer has ``heads`` attention heads."""
    import json
    import shutil

    folder = tmp_path / f"model-{heads}-heads"
    shutil.copytree(model, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "num_attention_heads": heads}))
    return str(folder)


def test_cp_degree_checks_pass_on_splittable_inputs(inputs, tmp_path, monkeypatch, no_model_loads):
    """The control: with 2 or 4 processes, --cp_degree 2 splits every trainer's sequences (226 text tokens, the
    video tokens of 9 frames at 32x32: 3 x 2 x 2; the single frames: 2 x 2)."""
    for processes in ("2", "4"):
        monkeypatch.setenv("WORLD_SIZE", processes)
        for trainer in MODULES:
            config = load_config(TRAINERS[trainer].config_class,
                                 [*valid_args(trainer, inputs, tmp_path / "out"), "--cp_degree", "2"])
            TRAINERS[trainer](config).validate_inputs()
    assert not (tmp_path / "out").exists()


def test_bad_cp_degree_exits_2_with_one_line_before_any_model_loads(inputs, tmp_path, capsys, monkeypatch,
                                                                    no_model_loads):
    from magicmirror_video.testing import tiny_wan

    wan = tiny_wan.build_model_folder(str(tmp_path / "wan"), "wan2.1-t2v")  # 2 heads
    capsys.readouterr()
    out = tmp_path / "out"
    regdpo, subject = valid_args("regdpo", inputs, out), valid_args("subject_replay", inputs, out)
    cases = [  # (processes, trainer, argv, what the line says)
        ("2", "regdpo", [*regdpo, "--cp_degree", "3"], ["--cp_degree 3 does not divide the 2 training processes"]),
        ("1", "magicmirror", [*valid_args("magicmirror", inputs, out), "--cp_degree", "2"],
         ["does not divide the 1 training processes"]),
        ("2", "dualreal", [*valid_args("dualreal", inputs, out), "--cp_degree", "0"], ["--cp_degree 0", "at least 1"]),
        ("2", "regdpo", [*replace(regdpo, "--model_path", with_heads(inputs["model"], 3, tmp_path)),
                         "--cp_degree", "2"], ["3 attention heads do not divide into 2",
                                               "divides 3 and the 2 processes (1)"]),
        ("4", "regdpo", [*replace(regdpo, "--model_path", with_heads(inputs["model"], 4, tmp_path)),
                         "--cp_degree", "4"], ["226 text tokens (CogVideoX's T5 prompt) do not divide into 4",
                                               "divides 226 and the 4 processes (1, 2)"]),
        ("2", "regdpo", [*regdpo, "--height", "48", "--width", "48", "--cp_degree", "2"],
         ["27 video tokens of a 9x48x48 clip do not divide into 2"]),
        ("2", "subject_replay", [*subject, "--pair_height", "48", "--pair_width", "48", "--cp_degree", "2"],
         ["9 video tokens of a 1x48x48 clip"]),
        ("2", "regdpo", [*replace(regdpo, "--model_path", wan), "--height", "48", "--width", "48", "--cp_degree", "2"],
         ["27 video tokens of a 9x48x48 clip do not divide into 2"]),
        ("2", "regdpo", [*regdpo, "--buckets", "9x32x32", "9x48x48", "--cp_degree", "2"],  # 32x32 splits, 48x48 not
         ["--buckets (the samples of --data): --cp_degree 2:", "27 video tokens of a 9x48x48 clip do not divide",
          "or another --buckets entry"]),
    ]
    printed = []
    for processes, trainer, argv, expected in cases:
        monkeypatch.setenv("WORLD_SIZE", processes)
        assert MODULES[trainer].main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        for text in expected:
            assert text in lines[0], (text, lines[0])
        assert not out.exists() and captured.out == ""
        printed.append(lines[0])
    print("\n".join(printed))


def test_readme_launch_commands_use_shipped_configs_and_split_the_real_models(tmp_path):
    """README's launch block: every command names a shipped accelerate config and a trainer that parses its
    arguments; FSDP wraps the blocks of the base the command is for; each --cp_degree divides the processes and, by
    the trainer's own check, splits the real model at its usual size (token counts written out here: CogVideoX-5B at
    49x480x720 has 13x30x45 = 17550 video tokens, 226 text tokens, 48 heads; Wan2.1-14B at 81x720x1280 has
    21x45x80 = 75600 video tokens, 40 heads), while CogVideoX refuses 4 (226 = 2 x 113)."""
    import os
    import shlex

    import yaml

    from magicmirror_video.testing import reference_json
    from magicmirror_video.training.config import InputError
    from magicmirror_video.training.parallel import check_context_parallel
    from magicmirror_video.training.spec import CogVideoXSpec
    from magicmirror_video.training.spec_wan import WanSpec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    block = readme.split("### Launching: 1 GPU, N GPUs, N GPUs with context parallelism", 1)[1]
    block = block.split("```bash\n", 1)[1].split("```", 1)[0]
    (tmp_path / "run.yaml").write_text("{}\n")
    models = {"CogVideoX": (CogVideoXSpec, {"transformer_config": reference_json(
                  "cogvideox/transformer_config_5b.json")}, (49, 480, 720), "CogVideoXBlock"),
              "Wan": (WanSpec, {"transformer_config": reference_json("wan/transformer_config_wan2.1_t2v_14b.json"),
                                "spatial_multiple": 16}, (81, 720, 1280), "WanTransformerBlock")}
    assert sorted(CogVideoXSpec.split_lengths(models["CogVideoX"][1], 49, 480, 720).values()) == [226, 13 * 30 * 45]
    assert list(WanSpec.split_lengths(models["Wan"][1], 81, 720, 1280).values()) == [21 * 45 * 80]
    assert (models["CogVideoX"][1]["transformer_config"]["num_attention_heads"],
            models["Wan"][1]["transformer_config"]["num_attention_heads"]) == (48, 40)
    seen, commands = set(), 0
    for line in block.splitlines():
        if line.startswith("# "):
            base = "Wan" if "on Wan" in line else "CogVideoX"
            continue
        argv = shlex.split(line)
        assert argv[:3] == ["accelerate", "launch", "--config_file"], line
        seen.add(argv[3])
        with open(os.path.join(root, argv[3])) as f:
            config = yaml.safe_load(f)
        trainer = argv[argv.index("-m") + 1].removeprefix("training.train_")
        assert trainer in MODULES, line
        args = [a if a != "run.yaml" else str(tmp_path / "run.yaml") for a in argv[argv.index("-m") + 2:]]
        parsed = load_config(TRAINERS[trainer].config_class, args)
        processes = int(argv[argv.index("--num_processes") + 1]) if "--num_processes" in argv else \
            config["num_processes"]
        assert processes == (1 if config["distributed_type"] == "NO" else 8), line
        if config["distributed_type"] == "FSDP":
            assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == models[base][3], line
        spec, info, size, _ = models[base]
        check_context_parallel(parsed.cp_degree, spec, info, [size], processes)
        commands += 1
    assert commands == 20 and seen == {f"training/accelerate_configs/{n}.yaml"
                                       for n in ("single_gpu", "ddp", "fsdp", "fsdp_wan")}
    with pytest.raises(InputError, match="226 text tokens .* do not divide into 4"):
        check_context_parallel(4, CogVideoXSpec, models["CogVideoX"][1], [(49, 480, 720)], 8)
    check_context_parallel(8, WanSpec, models["Wan"][1], [(81, 720, 1280)], 8)
