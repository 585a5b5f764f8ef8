"""Context parallelism on the CPU: a Reg-DPO training step with ``--cp_degree 2`` over two gloo processes against the
plain step of one process on the whole sequence, timed interleaved in one run.

The model is a small Wan 2.1 T2V (random weights; ``--layers`` blocks, ``--heads`` x 32 head dimensions) trained by the
Reg-DPO trainer itself (``training/train_regdpo.py``: its LoRA, its loss, its reference forward with the LoRA off) on
synthetic GT-Pairs of ``--frames`` x ``--size`` x ``--size`` with the precompute cache on (the step is the
transformer's: the VAE and UMT5 ran once before timing). Both processes run the trainer's ``enable_context_parallel``
(diffusers' Ulysses); per round, in this order:

* ``plain, 1 thread``: rank 0 alone runs the step with the context parallelism suspended (``Trainer.single_process``)
  on one thread while rank 1 waits;
* ``CP=2, 2 x 1 thread``: both ranks run the step on their half of the video tokens, one thread each, and all-reduce
  the LoRA gradients over the pair (what DDP does after the backward); its time is the slower rank's.

Every process computes on one thread: a CP rank has one core, the plain step one (a second thread in one process
was no fair baseline on a shared 2-core machine: OpenMP's spinning threads slowed it 5-15x under load).
A step is ``loss`` + ``backward`` (no optimizer step: every round computes the same thing). One warm-up round, then
``--repeats`` (>= 7) timed rounds; the ratio is printed per round and as the median. On a 2-core CPU the all-to-alls
run over loopback TCP (gloo), so this measures CP's overhead and its split of the compute, not a GPU's NVLink numbers.

    PYTHONPATH=<parent of the pack> python bench/context_parallel.py [--repeats 7] [--frames 17] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("plain, 1 thread", "CP=2, 2 x 1 thread")


def build_assets(root: str, args) -> tuple[str, str]:
    """A tiny Wan 2.1 T2V folder and a GT-Pair manifest of ``args.frames`` x ``args.size``² clips under ``root``."""
    from magicmirror_video.testing import tiny, tiny_wan

    model = tiny_wan.build_model_folder(os.path.join(root, "wan"), "wan2.1-t2v", heads=args.heads, head_dim=32,
                                        num_layers=args.layers, text_dim=64)
    pairs = tiny.write_gt_pairs(os.path.join(root, "pairs"), n=2, frames=args.frames, size=args.size)
    return model, pairs


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from magicmirror_video.training import train_regdpo
    from magicmirror_video.training.config import load_config
    from magicmirror_video.training.trainer import step_generator

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    argv = ["--preset", "tiny", "--tiny_demo", "false", "--model_path", args.model, "--data", args.pairs,
            "--output_dir", args.out, "--num_frames", str(args.frames), "--height", str(args.size), "--width",
            str(args.size), "--mixed_precision", "no", "--precompute_cache", "true", "--cp_degree", "2"]
    config = load_config(train_regdpo.RegDPOTrainConfig, argv, train_regdpo.PRESETS)
    trainer = train_regdpo.RegDPOTrainer(config)
    _ = trainer.inputs  # validated before anything loads (the --cp_degree checks among them)
    trainer.accelerator = trainer._make_accelerator()
    torch.manual_seed(config.seed)
    trainer.module = module = trainer.build()
    trainer.enable_context_parallel(module)
    trainer.fill_cache()
    batch = trainer.next_batch(trainer.dataset(), 1, 0)
    trainable = [p for p in module.parameters() if p.requires_grad]

    def step(reduce: bool) -> None:
        module.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(module, batch, step_generator(config.seed, 1, 0))
        loss.backward()
        if reduce:
            for p in trainable:
                if p.grad is not None:
                    dist.all_reduce(p.grad)

    store, rounds = dist.distributed_c10d._get_default_store(), iter(range(10**6))

    def plain() -> float:
        # rank 1 waits on the launcher's TCP store (a blocking socket read), not in a gloo barrier, which polls and
        # would keep one of the two cores busy
        dist.barrier()
        key, elapsed = f"plain-{next(rounds)}", 0.0
        if rank == 0:
            with trainer.single_process():
                started = time.perf_counter()
                step(False)
                elapsed = time.perf_counter() - started
            store.set(key, "done")
        else:
            store.wait([key])
        return elapsed

    def context_parallel() -> float:
        dist.barrier()
        started = time.perf_counter()
        step(True)
        elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    runs = {VARIANTS[0]: plain, VARIANTS[1]: context_parallel}
    for fn in runs.values():  # warm-up round
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    if rank == 0:
        tokens = ((args.frames - 1) // 4 + 1) * (args.size // 16) ** 2
        print(f"Reg-DPO step (loss + backward) of a Wan 2.1 T2V with {args.layers} blocks, {args.heads} heads x 32, "
              f"LoRA rank {config.lora_rank}; {args.frames}x{args.size}x{args.size}: {tokens} video tokens "
              f"(CP=2: {tokens // 2} per rank); torch {torch.__version__}, {os.cpu_count()} CPUs")
        for name, t in times.items():
            print(f"{name:>20}: median {statistics.median(t):.3f} s  [" + " ".join(f"{x:.3f}" for x in t) + "]")
        ratios = [c / p for p, c in zip(*times.values())]
        print(f"CP step / plain step: median {statistics.median(ratios):.2f}  (per round: "
              + " ".join(f"{r:.2f}" for r in ratios) + f"; n={len(ratios)} interleaved rounds)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (at least 7)")
    ap.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1)")
    ap.add_argument("--size", type=int, default=256, help="height and width (a multiple of 32: CP=2 splits the rows)")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (even: Ulysses gives each rank half)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "PAIRS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 7:
        ap.error("--repeats must be at least 7")
    if args.worker:
        args.model, args.pairs, args.out = args.worker
        worker(args)
        return
    with tempfile.TemporaryDirectory() as root:
        model, pairs = build_assets(root, args)
        argv = [f"--{k}={getattr(args, k)}" for k in ("repeats", "frames", "size", "layers", "heads")]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.abspath(__file__), *argv, "--worker", model, pairs, os.path.join(root, "out")],
                              check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
