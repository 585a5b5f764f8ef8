"""FSDP: the trainers' modules with the frozen transformers inside, wrapped by torch's FSDP with one unit per block
(CogVideoXBlock, or WanTransformerBlock for Reg-DPO on Wan: what the shipped fsdp.yaml / fsdp_wan.yaml ask for),
compute the same loss and gradients as the plain modules: in one process (FSDP then keeps the parameters whole, NO_SHARD) and sharded (FULL_SHARD) over two CPU
processes (gloo, torch.distributed.run), where the reference is data parallelism written out: each rank's plain
module's gradients on that rank's batch, averaged over the ranks with an explicit all_reduce (every rank takes its own
slice of the data; the tiny MagicMirror and subject datasets hold several samples, so their ranks' gradients differ),
and one SGD step also ends with the same weights. Torch's FSDP runs on the
CPU; accelerate's FSDP plugin does not ("There are currently no available devices found, must be one of 'XPU',
'CUDA', ..." from FullyShardedDataParallelPlugin), so `accelerate launch --use_fsdp` itself needs GPUs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from magicmirror_video.training.config import load_config


WAN_VARIANTS = {"regdpo_wan": "wan2.1-i2v", "regdpo_wan_ti2v": "wan2.2-ti2v", "regdpo_wan_a14b": "wan2.2-i2v-a14b"}


def tiny_config(name: str, tmp_path):
    """A trainer's tiny preset with its assets built under ``tmp_path``: (config, trainer class). ``regdpo_wan``: the
    Reg-DPO preset on a tiny Wan 2.1 I2V (the CLIP branch, the mask channels) with synthetic GT-Pairs (``_ti2v``,
    ``_a14b``: Wan 2.2 TI2V-5B, I2V A14B); ``regdpo_cogvideox15_i2v``: the same on a tiny CogVideoX 1.5 I2V;
    ``regdpo_full``: the Reg-DPO preset with ``--train full`` (the transformer trained, the reference a frozen copy)."""
    from magicmirror_video.training import presets, train_dualreal, train_magicmirror, train_regdpo, train_subject_replay

    if name in WAN_VARIANTS:
        from magicmirror_video.testing import tiny, tiny_wan

        folder = tiny_wan.build_model_folder(str(tmp_path / "wan"), WAN_VARIANTS[name])
        argv = ["--preset", "tiny", "--output_dir", str(tmp_path), "--tiny_demo", "false", "--model_path", folder,
                "--data", tiny.write_gt_pairs(str(tmp_path / "pairs")), "--num_frames", "5"]
        return load_config(train_regdpo.RegDPOTrainConfig, argv, train_regdpo.PRESETS), train_regdpo.RegDPOTrainer

    if name == "regdpo_cogvideox15_i2v":  # CogVideoX 1.5 I2V: two frames a token, the first frame in the channels
        from magicmirror_video.testing import tiny

        folder = tiny.build_model_folder(str(tmp_path / "cog15"), i2v=True, version="1.5")
        argv = ["--preset", "tiny", "--output_dir", str(tmp_path), "--tiny_demo", "false", "--model_path", folder,
                "--data", tiny.write_gt_pairs(str(tmp_path / "pairs"), frames=9), "--num_frames", "9"]
        return load_config(train_regdpo.RegDPOTrainConfig, argv, train_regdpo.PRESETS), train_regdpo.RegDPOTrainer

    if name == "regdpo_full":
        config = presets.build_tiny_regdpo(load_config(train_regdpo.RegDPOTrainConfig, [
            "--preset", "tiny", "--output_dir", str(tmp_path), "--train", "full"], train_regdpo.PRESETS))
        return config, train_regdpo.RegDPOTrainer
    module_of, trainer_class, build = {
        "magicmirror": (train_magicmirror, train_magicmirror.MagicMirrorTrainer, presets.build_tiny_magicmirror),
        "subject_replay": (train_subject_replay, train_subject_replay.SubjectReplayTrainer, presets.build_tiny_subject),
        "dualreal": (train_dualreal, train_dualreal.DualRealTrainer, presets.build_tiny_dualreal),
        "regdpo": (train_regdpo, train_regdpo.RegDPOTrainer, presets.build_tiny_regdpo)}[name]
    return build(load_config(trainer_class.config_class, ["--preset", "tiny", "--output_dir", str(tmp_path)],
                             module_of.PRESETS)), trainer_class


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


TRAINERS = ["magicmirror", "subject_replay", "dualreal", "regdpo", "regdpo_wan", "regdpo_full"]


@pytest.mark.parametrize("name", TRAINERS)
def test_fsdp_wrapped_module_with_the_frozen_transformer_matches_the_plain_one(name, process_group, tmp_path):
    from accelerate import Accelerator
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    config, trainer_class = tiny_config(name, tmp_path)
    trainer = trainer_class(dataclasses.replace(config, mixed_precision="no"))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    data = trainer.dataset()
    batch = trainer.next_batch(data, 1, 0)

    def loss_and_grads(m):
        m.zero_grad()
        torch.manual_seed(5)  # the same dropout masks for both runs
        loss, _ = m(batch, torch.Generator().manual_seed(3))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(module)
    module.transformers = torch.nn.ModuleList(trainer.spec.transformers)  # what Trainer.shard_frozen_model does
    copies = module.frozen.get("reference", [])  # --train full: the reference copies (RegDPOTrainer's override)
    if copies:
        module.reference_copies = torch.nn.ModuleList(copies)
    block = trainer.spec.block_class
    wrapped = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({block}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    blocks = sum(isinstance(m, block) for t in [*trainer.spec.transformers, *copies] for m in t.modules())
    assert blocks >= 2 and len(units) == 1 + blocks  # the root + one per block
    frozen = [p for p in wrapped.parameters() if not p.requires_grad]
    assert frozen and sum(p.numel() for p in frozen) == sum(p.numel() for t in trainer.spec.transformers
                                                           for p in t.parameters())  # the copies, or the base
    loss, grads = loss_and_grads(wrapped)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    clean = {n.replace("_fsdp_wrapped_module.", ""): g for n, g in grads.items()}
    assert set(plain_grads) <= set(clean)
    for n, g in plain_grads.items():
        torch.testing.assert_close(clean[n], g, atol=1e-5, rtol=1e-4)



SHARDED = r"""
import dataclasses, sys, torch, torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from magicmirror_video.training import train_dualreal, train_magicmirror, train_regdpo, train_subject_replay
from magicmirror_video.training.config import load_config
dist.init_process_group("gloo")
name, out = sys.argv[1], sys.argv[2]
module_of, trainer_class = {"dualreal": (train_dualreal, train_dualreal.DualRealTrainer),
                            "regdpo": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_wan": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "regdpo_full": (train_regdpo, train_regdpo.RegDPOTrainer),
                            "magicmirror": (train_magicmirror, train_magicmirror.MagicMirrorTrainer),
                            "subject_replay": (train_subject_replay, train_subject_replay.SubjectReplayTrainer)}[name]
config = load_config(trainer_class.config_class, ["--preset", "tiny", "--output_dir", out, "--tiny_demo", "false",
                                                  "--mixed_precision", "no", "--config", out + "/resolved.yaml"],
                     module_of.PRESETS)
trainer = trainer_class(config)
trainer.accelerator = Accelerator(cpu=True)
torch.manual_seed(config.seed)  # as Trainer.train(): every rank initialises the trainable parts alike
module = trainer.build()
data = trainer.dataset()
batch = trainer.next_batch(data, 1, 0)
def step(m):
    m.zero_grad()
    torch.manual_seed(5)  # the same dropout masks for both runs
    loss, _ = m(batch, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach()
plain = step(module)
grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
for g in grads.values():  # data parallelism written out: every rank's gradients, averaged
    dist.all_reduce(g)
    g /= dist.get_world_size()
after = {n: p.detach() - grads[n] for n, p in module.named_parameters() if n in grads}  # one SGD step, lr 1
module.transformers = torch.nn.ModuleList(trainer.spec.transformers)  # what Trainer.shard_frozen_model does
if module.frozen.get("reference"):  # --train full: the reference copies are sharded too (RegDPOTrainer's override)
    module.reference_copies = torch.nn.ModuleList(module.frozen["reference"])
wrapped = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({trainer.spec.block_class}), use_orig_params=True,
               device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD)
local = sum(p.numel() for p in wrapped.parameters())
torch.testing.assert_close(step(wrapped), plain, atol=1e-5, rtol=1e-5)
clean = lambda n: n.replace("_fsdp_wrapped_module.", "")
with FSDP.summon_full_params(wrapped, with_grads=True):
    full = sum(p.numel() for p in wrapped.parameters())
    sharded = {clean(n): p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
for n, g in grads.items():
    torch.testing.assert_close(sharded[n], g, atol=1e-5, rtol=1e-4)
torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0).step()
with FSDP.summon_full_params(wrapped):
    stepped = {clean(n): p.detach().clone() for n, p in wrapped.named_parameters()}
for n, w in after.items():
    torch.testing.assert_close(stepped[n], w, atol=1e-5, rtol=1e-4)
assert local < 0.6 * full, (local, full)  # each rank holds about half of every weight, the frozen ones too
print(f"rank {dist.get_rank()} ok: loss {plain.item():.6f}, {len(grads)} gradients and weights equal, "
      f"{local} of {full} values local", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("name", TRAINERS)
def test_fsdp_full_shard_over_two_cpu_processes(name, tmp_path):
    import subprocess
    import sys

    import yaml

    config, _ = tiny_config(name, tmp_path)  # the tiny assets, built once, then read by both ranks
    fields = ("model_path", "data", "identity_data", "clip_vision", "pairs", "arcface_path", "num_frames", "train")
    resolved = {k: v for k, v in dataclasses.asdict(config).items() if k in fields}
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), name, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("gradients and weights equal") == 2, proc.stdout
