"""Does bf16 autocast keep the Pr-VIPE step accurate? Gradients of one step and a short loss curve, fp32 vs bf16.

    python bench/precision_check.py [--steps 300] [--every 25] [--set key=value ...]

Both runs start from the same weights and seeds and see the same batches. Prints the relative error of the
bf16 embedding and the cosine similarity of the embedder's bf16 gradient against fp32 (same inputs and dropout
masks), then the loss and triplet loss of both runs averaged over windows of ``--every`` steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package

from vipe_ray.cli import _overrides  # noqa: E402
from vipe_ray.config import load_config  # noqa: E402
from vipe_ray.data import WindowSampler, load_table  # noqa: E402
from vipe_ray.training.checkpoint import build_model
from vipe_ray.training.step import train_step  # noqa: E402
from vipe_ray.training.optim import build_optimizer
from vipe_ray.training.step import embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    base = load_config(args.config, _overrides(args.set))
    configs = {p: dataclasses.replace(base, optim=dataclasses.replace(base.optim, precision=p))
               for p in ("fp32", "bf16")}
    table = load_table(base.data.table_path()).select(base.data.train_subjects)
    sampler = WindowSampler(table, base.temporal.window, base.temporal.stride)
    torch.manual_seed(base.seed)
    model = build_model(base)

    # The embedder's gradients under a fixed random probe loss, same features and dropout masks. (A whole
    # step's gradient also moves with the mined triplets, a discrete choice that any rounding can flip.)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2 * base.optim.batch_size, base.temporal.window, 39, generator=g).squeeze(1)
    probe = torch.randn(2 * base.optim.batch_size, base.model.embedding_dim, generator=g)
    grads, means = {}, {}
    for precision in configs:
        m = copy.deepcopy(model)
        m.train()
        torch.manual_seed(7)
        mean, sigma = embed(m, features, precision)
        (mean * probe).sum().add(sigma.sum()).backward()
        means[precision] = mean.detach()
        grads[precision] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    g32, g16 = grads["fp32"], grads["bf16"]
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    relative = ((means["bf16"] - means["fp32"]).norm() / means["fp32"].norm()).item()
    print(f"embedding bf16 vs fp32: relative error {relative:.4f}; "
          f"gradient cosine {cosine:.5f}, relative error {(g16 - g32).norm() / g32.norm():.4f}")

    runs = {}
    for precision, config in configs.items():
        m = copy.deepcopy(model)
        optimizer, scheduler = build_optimizer(config, m)
        torch.manual_seed(base.seed)
        generator, data = torch.Generator().manual_seed(base.seed), torch.Generator().manual_seed(base.seed + 1)
        curve = []
        for _ in range(args.steps):
            metrics = train_step(m, optimizer, sampler.sample(config.optim.batch_size, data), config, generator)
            scheduler.step()
            curve.append((metrics["loss"], metrics["triplet_loss"]))
        runs[precision] = curve
    print(f"{'steps':>9}  {'loss fp32':>9}  {'loss bf16':>9}  {'triplet fp32':>12}  {'triplet bf16':>12}")
    for start in range(0, args.steps, args.every):
        row = []
        for precision in ("fp32", "bf16"):
            window = runs[precision][start:start + args.every]
            row.append((sum(x[0] for x in window) / len(window), sum(x[1] for x in window) / len(window)))
        print(f"{start:>4}-{start + args.every:<4}  {row[0][0]:9.4f}  {row[1][0]:9.4f}  {row[0][1]:12.4f}  "
              f"{row[1][1]:12.4f}")


if __name__ == "__main__":
    main()
