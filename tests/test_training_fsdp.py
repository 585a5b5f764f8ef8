"""FSDP: the trainers' modules with the frozen transformer inside, wrapped by torch's FSDP with one unit per
CogVideoXBlock (what the shipped accelerate fsdp.yaml asks for), compute the same loss and gradients as the plain
modules, in a one-process gloo group (FSDP then keeps the parameters whole: NO_SHARD). Torch's FSDP runs on the CPU;
accelerate's FSDP plugin does not ("There are currently no available devices found, must be one of 'XPU', 'CUDA',
..." from FullyShardedDataParallelPlugin), so `accelerate launch --use_fsdp` itself needs GPUs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from magicmirror_video.training.config import load_config


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["dualreal", "regdpo"])
def test_fsdp_wrapped_module_with_the_frozen_transformer_matches_the_plain_one(name, process_group, tmp_path):
    from accelerate import Accelerator
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from magicmirror_video.training import presets, train_dualreal, train_regdpo

    module_of, trainer_class, build = {
        "dualreal": (train_dualreal, train_dualreal.DualRealTrainer, presets.build_tiny_dualreal),
        "regdpo": (train_regdpo, train_regdpo.RegDPOTrainer, presets.build_tiny_regdpo)}[name]
    config = build(load_config(trainer_class.config_class, ["--preset", "tiny", "--output_dir", str(tmp_path)],
                               module_of.PRESETS))
    trainer = trainer_class(dataclasses.replace(config, mixed_precision="no"))
    trainer.accelerator = Accelerator(cpu=True)
    module = trainer.build()
    data = trainer.dataset()
    batch = trainer.next_batch(data, 1, 0) if name == "dualreal" else trainer.collate([data[0]])

    def loss_and_grads(m):
        m.zero_grad()
        loss, _ = m(batch, torch.Generator().manual_seed(3))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(module)
    module.transformer = trainer.spec.transformer  # what Trainer.shard_frozen_model does under FSDP
    wrapped = FSDP(module, auto_wrap_policy=ModuleWrapPolicy({CogVideoXBlock}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    assert len(units) == 1 + len(trainer.spec.transformer.transformer_blocks)  # the root + one per block
    frozen = [p for p in wrapped.parameters() if not p.requires_grad]
    assert frozen and sum(p.numel() for p in frozen) == sum(p.numel() for p in trainer.spec.transformer.parameters())
    loss, grads = loss_and_grads(wrapped)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    clean = {n.replace("_fsdp_wrapped_module.", ""): g for n, g in grads.items()}
    assert set(plain_grads) <= set(clean)
    for n, g in plain_grads.items():
        torch.testing.assert_close(clean[n], g, atol=1e-5, rtol=1e-4)

