"""Context parallelism (``--cp_degree``): two gloo CPU processes with diffusers' Ulysses attention, one CP group, compute
the loss and every gradient of one process on the whole sequence, for each trainer and base: Reg-DPO on Wan (2.1 I2V:
the CLIP image tokens and mask channels) and on CogVideoX, MagicMirror with its face-token stream (two-way: split
with the video; one-way: replicated, its attention merged over the group), subject replay with its reference stream
(image steps; a video-replay step whose dropped reference tokens leave an odd count, padded and masked) and DualReal
(identity and motion steps; the StageBlender's max over the group).

The reference is the same trainer module with its context parallelism suspended, on the batch and generator a
single-process run draws for that step; the CP run goes through the trainer's own code: ``enable_context_parallel``,
its accelerator's DDP over both processes, ``next_batch`` and the step generator keyed by the data-parallel rank, and
``Trainer.backward`` (loss x CP degree). Each rank's own gradients are only its share's part (checked: they differ
from the reference and their sum equals it). The trainable weights are random (zero-initialised output layers would
hide the streams) and everything runs in float64, so rounding cannot hide a wrong share: gradients agree to 1e-8 of
the largest (measured: 1e-15 or less; MagicMirror's one-way stream 6e-10, its attention is computed in float32), the
losses (which end in float32) to 1e-6. Ring attention needs a backend that returns the log-sum-exp (flash, cuDNN on
GPUs), which the CPU's SDPA does not: only Ulysses runs here. LoRA dropout draws its masks per token from the global
generator, which a rank holding half of the tokens cannot reproduce: the subject-replay run sets it to 0.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from test_training_fsdp import tiny_config

CP_RUN = r"""
import dataclasses, sys, types, torch, torch.distributed as dist
from magicmirror_video.training import train_dualreal, train_magicmirror, train_regdpo, train_subject_replay
from magicmirror_video.training.config import load_config
from magicmirror_video.training.trainer import step_generator
dist.init_process_group("gloo")
name, out, cases = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
module_of, trainer_class = {"dualreal": (train_dualreal, train_dualreal.DualRealTrainer),
                            "regdpo": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_wan": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "magicmirror": (train_magicmirror, train_magicmirror.MagicMirrorTrainer),
                            "subject_replay": (train_subject_replay, train_subject_replay.SubjectReplayTrainer)}[name]
argv = ["--preset", "tiny", "--output_dir", out, "--tiny_demo", "false", "--mixed_precision", "no",
        "--config", out + "/resolved.yaml", "--cp_degree", "2"]
if name == "subject_replay":
    argv += ["--lora_dropout", "0"]
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
owners = [module, *spec.transformers, spec.vae, spec.text_encoder, getattr(getattr(spec, "model", None), "image_encoder",
                                                                           None)]
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
prepared = acc.prepare(module)  # DDP over both processes, as the trainer runs
for kind, (step, ref_loss, ref, own, summed) in results.items():
    if name == "magicmirror":
        case(kind)
    loss, grads = run(prepared, step, trainer.backward)
    assert set(grads) == set(ref), sorted(set(grads) ^ set(ref))
    d_loss = (loss - ref_loss).abs().item()
    d_grad = max((grads[n] - g).abs().max().item() for n, g in ref.items())
    d_sum = max((summed[n] - g).abs().max().item() for n, g in ref.items())
    d_own = max((own[n] - g).abs().max().item() for n, g in ref.items())
    scale = max(g.abs().max().item() for g in ref.values())
    assert d_loss <= 1e-6 * max(1.0, abs(ref_loss.item())), (kind, d_loss, ref_loss)  # (losses end in float32)
    assert d_grad <= 1e-8 * scale and d_sum <= 1e-8 * scale, (kind, d_grad, d_sum, scale)
    assert d_own > 1e-4 * scale, (kind, d_own)  # a rank's own gradients are a part only
    print(f"rank {dist.get_rank()} {name} {kind} (step {step}) equal: loss {ref_loss.item():.6f} |dloss| {d_loss:.2e}, {len(ref)} "
          f"gradients max |dgrad| {d_grad:.2e} (largest {scale:.2e}); one rank's own vs whole {d_own:.2e}, "
          f"summed over ranks {d_sum:.2e}", flush=True)
dist.destroy_process_group()
"""

CASES = {"regdpo": ["-"], "regdpo_wan": ["-"], "magicmirror": ["two-way", "one-way"],
         "subject_replay": ["image", "video"], "dualreal": ["identity", "motion"]}


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_over_two_cpu_processes_equals_one_process(name, tmp_path):
    import yaml

    config, _ = tiny_config(name, tmp_path)  # the tiny assets, built once, then read by both ranks
    fields = ("model_path", "data", "identity_data", "clip_vision", "pairs", "arcface_path", "num_frames")
    resolved = {k: v for k, v in dataclasses.asdict(config).items() if k in fields}
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    script = tmp_path / "cp_run.py"
    script.write_text(CP_RUN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), name, str(tmp_path), ",".join(CASES[name])], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" equal: ") == 2 * len(CASES[name]), proc.stdout
    print(proc.stdout)
