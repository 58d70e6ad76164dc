"""Where does a Pr-VIPE training step spend its time, and how fast does a trained model embed poses?

    python bench/train_step.py [--config vipe_ray/configs/default.yaml] [--steps 20] [--set key=value ...]

Prints the step's time split (views, mining, forward, backward) as shares of one step, measured in this run,
and the embedding throughput (poses/s) relative to the training throughput (poses/s) of the same model.
"""

from __future__ import annotations

import argparse
import time

import torch

from vipe_ray.cli import _overrides
from vipe_ray.config import load_config
from vipe_ray.data import WindowSampler, load_table
from vipe_ray.model import pose_features
from vipe_ray.train import build_model, build_optimizer, train_step
from vipe_ray.cameras import sample_orbits
from vipe_ray.views import normalized_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, _overrides(args.set))
    table = load_table(config.data.table_path()).select(config.data.train_subjects)
    sampler = WindowSampler(table, config.temporal.window, config.temporal.stride)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config)
    optimizer, _ = build_optimizer(config, model)
    batch = config.optim.batch_size

    phases: dict[str, float] = {}
    last = [0.0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now

    for i in range(args.warmup + args.steps):
        joints = sampler.sample(batch, generator)
        if i == args.warmup:
            phases.clear()
        last[0] = time.perf_counter()
        train_step(model, optimizer, joints, config, generator, timer=mark)
    step_time = sum(phases.values()) / args.steps
    print(f"config: width {config.model.width}, batch {batch}, K {config.model.samples}, "
          f"frames {config.temporal.window}, threads {torch.get_num_threads()}")
    print(f"train step: {step_time * 1000:.1f} ms ({args.steps} steps)")
    for name, seconds in phases.items():
        print(f"  {name:<9} {seconds / args.steps * 1000:8.1f} ms  {seconds / sum(phases.values()):6.1%} of the step")

    # Embedding throughput: inference (eval mode, no grad) on rendered poses, vs training poses/s.
    joints = sampler.sample(4096, generator)
    keypoints = normalized_view(joints, sample_orbits(4096, config.cameras.ranges(), generator))
    feats = pose_features(keypoints, torch.ones(keypoints.shape[:-1], dtype=torch.bool))
    model.eval()
    with torch.no_grad():
        model(feats[:512])
        start = time.perf_counter()
        for _ in range(3):
            for s in range(0, 4096, 1024):
                model(feats[s:s + 1024])
        embed_rate = 3 * 4096 / (time.perf_counter() - start)
    train_rate = 2 * batch / step_time  # anchor and positive views per step
    print(f"embedding: {embed_rate:,.0f} poses/s; training: {train_rate:,.0f} poses/s; "
          f"ratio embed/train = {embed_rate / train_rate:.1f}x")


if __name__ == "__main__":
    main()
