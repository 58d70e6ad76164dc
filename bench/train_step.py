"""Where does a Pr-VIPE training step spend its time, how close is it to the machine, and how fast does a
trained model embed poses?

    python bench/train_step.py [--config vipe_ray/configs/default.yaml] [--steps 20] [--set key=value ...]
                               [--baseline REV | --baseline none] [--threads N]

Prints, all measured in this run:

* ``train step: N ms`` and one ``NAME  N ms  P% of the step`` line per phase (views, forward, mining, loss,
  backward);
* the step of the code at ``--baseline`` (default: the revision before the speed work), timed interleaved
  with the current step on the same batches, and the speed-up;
* the step's matmul FLOPs (counted analytically: ``2 m n k`` per Linear forward, twice that backward, plus
  the mining kernel's product), the achieved FLOP/s and its share of the machine's matmul peak, measured
  here as the best of large square products on all threads (fp32, and bf16 when the step runs in bf16);
* the embedding throughput (poses/s) relative to the training throughput (poses/s) of the same model.

The baseline is ``git archive``-d into a temporary directory and imported as ``vipe_ray`` with the current
package's modules set aside; its functions keep their own module globals, so both versions live in one
process. Both get the same config object, batches and seeds.

On a shared 2-core machine, another busy process makes 2 intra-op threads collapse (each parallel region waits
for the descheduled thread: 20-40x slower steps, old and new code alike); ``--threads 1`` measures there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's package, not whichever one is installed

from vipe_ray.prvipe.cameras import sample_orbits  # noqa: E402
from vipe_ray.cli import _overrides  # noqa: E402
from vipe_ray.config import TrainConfig, load_config  # noqa: E402
from vipe_ray.data import WindowSampler, load_table  # noqa: E402
from vipe_ray.prvipe.keypoints import pose_features  # noqa: E402
from vipe_ray.training.checkpoint import build_model
from vipe_ray.training.step import train_step  # noqa: E402
from vipe_ray.training.optim import build_optimizer
from vipe_ray.platform.tracking import PoseEmbedder  # noqa: E402
from vipe_ray.prvipe.views import rendered_view  # noqa: E402

BASELINE = "b4f9a53"  # the last commit before the speed work (issue 8)


def import_revision(rev: str, into: Path) -> ModuleType:
    """``vipe_ray.training.loop`` of git revision ``rev``, imported beside the current package (which stays imported)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "vipe_ray"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    current = {k: v for k, v in sys.modules.items() if k == "vipe_ray" or k.startswith("vipe_ray.")}
    for k in current:
        del sys.modules[k]
    sys.path.insert(0, str(into))
    try:
        import vipe_ray.training.loop as old_train  # noqa: PLC0415 -- the revision's package, under the same name
    finally:
        sys.path.remove(str(into))
        for k in [k for k in sys.modules if k == "vipe_ray" or k.startswith("vipe_ray.")]:
            del sys.modules[k]
        sys.modules.update(current)
    return old_train


def step_flops(model: torch.nn.Module, features: torch.Tensor, config: TrainConfig) -> float:
    """Matmul FLOPs of one training step on ``features`` ``[2 batch, frames, 39]``.

    Per Linear with ``rows`` inputs: forward ``2 rows in out``; backward the same for the weight gradient and
    again for the input gradient, except where the input needs none (the first layer reads the data). Plus
    the mining kernel's product of ``batch x rank_k`` samples by as many (``2 x (b k)^2 x D``).
    """
    total = [0.0]

    def hook(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        forward = 2.0 * (inputs[0].numel() // module.in_features) * module.in_features * module.out_features
        total[0] += 2.0 * forward + (forward if inputs[0].requires_grad else 0.0)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        model.train()
        model(features)  # with autograd on, so that requires_grad tells the first layer apart
    finally:
        for h in handles:
            h.remove()
    b = features.shape[0] // 2
    k = config.model.samples if config.model.probabilistic else 1
    rank_k = config.mining.samples or k
    return total[0] + 2.0 * (b * rank_k) ** 2 * config.model.embedding_dim


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of ``n x n`` products on all threads (the machine's practical matmul peak)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to time side by side ('none': skip)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, _overrides(args.set))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    sampler = WindowSampler(table, config.temporal.window, config.temporal.stride)
    batch = config.optim.batch_size

    tmp = tempfile.TemporaryDirectory(prefix="vipe-baseline-")
    old = None if args.baseline == "none" else import_revision(args.baseline, Path(tmp.name))
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(config.seed)
    if old is not None:
        torch.manual_seed(config.seed)
        old_model = old.build_model(config)
        old_optimizer, _ = old.build_optimizer(config, old_model)
        old_generator = torch.Generator().manual_seed(config.seed)

    phases: dict[str, float] = {}
    last = [0.0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now

    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    new_times: list[float] = []
    old_times: list[float] = []
    data = torch.Generator().manual_seed(config.seed + 1)
    for i in range(args.warmup + args.steps):
        joints = sampler.sample(batch, data)
        if i == args.warmup:
            phases.clear()
        # Alternate which version goes first, so neither always runs on a warmer cache.
        order = [0, 1] if i % 2 == 0 else [1, 0]
        for who in order:
            if who == 0:
                last[0] = time.perf_counter()
                seconds = timed(lambda: train_step(model, optimizer, joints, config, generator, timer=mark))
                if i >= args.warmup:
                    new_times.append(seconds)
            elif old is not None:
                seconds = timed(lambda: old.train_step(old_model, old_optimizer, joints, config, old_generator))
                if i >= args.warmup:
                    old_times.append(seconds)
    step_time = sum(phases.values()) / args.steps
    print(f"config: width {config.model.width}, batch {batch}, K {config.model.samples}, "
          f"mining {config.mining.mode} (samples {config.mining.samples or 'all'}), "
          f"frames {config.temporal.window}, precision {config.optim.precision}, threads {torch.get_num_threads()}")
    print(f"train step: {step_time * 1000:.1f} ms ({args.steps} steps)")
    for name, seconds in phases.items():
        print(f"  {name:<9} {seconds / args.steps * 1000:8.1f} ms  {seconds / sum(phases.values()):6.1%} of the step")
    if old_times:
        ratios = sorted(o / n for o, n in zip(old_times, new_times))
        old_mean, new_mean = sum(old_times) / len(old_times), sum(new_times) / len(new_times)
        print(f"baseline {args.baseline}: {old_mean * 1000:.1f} ms per step, this code {new_mean * 1000:.1f} ms, "
              f"interleaved on the same batches: speed-up {old_mean / new_mean:.2f}x "
              f"(median of per-step ratios {ratios[len(ratios) // 2]:.2f}x)")

    # Achieved FLOP/s against the matmul peak measured now.
    probe = torch.cat([pose_features(torch.zeros(batch, config.temporal.window, 13, 2),
                                     torch.ones(batch, config.temporal.window, 13, dtype=torch.bool))] * 2)
    flops = step_flops(build_model(config), probe, config)
    achieved = flops / step_time
    peak32 = matmul_peak(torch.float32)
    line = (f"FLOPs: {flops / 1e9:.2f} GFLOP per step (matmuls), achieved {achieved / 1e9:.0f} GFLOP/s; "
            f"fp32 matmul peak {peak32 / 1e9:.0f} GFLOP/s: {achieved / peak32:.0%} of peak")
    if config.optim.precision == "bf16":
        peak16 = matmul_peak(torch.bfloat16)
        line += f"; bf16 matmul peak {peak16 / 1e9:.0f} GFLOP/s: {achieved / peak16:.0%} of peak"
    print(line)
    if old_times:
        old_achieved = flops / old_mean
        print(f"baseline {args.baseline}: the same matmuls at {old_achieved / 1e9:.0f} GFLOP/s "
              f"({old_achieved / peak32:.0%} of the fp32 peak)")

    # Embedding throughput of the deployed model (raw pixels in, its own normalization), vs training poses/s.
    joints = sampler.sample(4096, generator)
    pixels = rendered_view(joints, sample_orbits(4096, config.cameras.ranges(), generator)).float()
    if config.temporal.window == 1:
        pixels = pixels[:, 0]
    embedder = PoseEmbedder(model).eval()
    with torch.no_grad():
        embedder(pixels[:512])
        start = time.perf_counter()
        for _ in range(3):
            for s in range(0, 4096, 1024):
                embedder(pixels[s:s + 1024])
        embed_rate = 3 * 4096 / (time.perf_counter() - start)
    train_rate = 2 * batch / step_time  # anchor and positive views per step
    print(f"embedding: {embed_rate:,.0f} poses/s; training: {train_rate:,.0f} poses/s; "
          f"ratio embed/train = {embed_rate / train_rate:.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
