"""Ray Train data path: per-worker memory and training throughput on the bundled table and on one 20x larger.

    python bench/data_scaling.py [--steps 150] [--scale 20] [--workers 2] [--cpus-per-worker 0.5] [--buffer-rows 16384]

Writes a table ``--scale`` times the bundled one to a temporary directory (every clip replicated under a new
name, joints jittered by 2 mm so that no two rows are equal; deleted at the end), starts one local Ray
cluster (``num_cpus=2``, no dashboard) and runs :func:`vipe_ray.training.ray_train.fit` on both tables, each with
the streamed buffer (``data.buffer_rows``, the default) and with every worker holding its whole shard
(``data.buffer_rows: 0``). A :class:`~vipe_ray.training.ray_train.WorkerCallback` records every worker's memory at
its last report, from ``/proc/self/status``:

* ``peak RSS``: the worker process's resident high-water mark (``VmHWM``, as ``getrusage``'s ``ru_maxrss``);
  it includes the pages of Ray's shared object store that the worker mapped while reading its blocks;
* ``private``: its anonymous memory at the report (``RssAnon``: heap, numpy and torch buffers; the buffer or
  the held shard lives here).

Throughput is the loop's own ``samples_per_s`` (poses trained by all workers per second of rank 0's training
loop, start-up and the initial buffer fill excluded). The host's load is printed with every run: other
processes on a small machine skew every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vipe_ray.config import load_config, merge
from vipe_ray.training.ray_train import WorkerCallback, WorkerInfo

#: The model of bench/ray_train_scaling.py: a step takes tens of ms on one thread.
BENCH = {
    "model": {"width": 256, "blocks": 2, "samples": 8},
    "mining": {"samples": 4},
    "optim": {"batch_size": 128},
    "data": {"val_subjects": []},
}


class MemoryLog(WorkerCallback):
    """Each rank writes its report and its ``/proc/self/status`` memory lines (kB) to ``rank{r}.json``."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_report(self, worker: WorkerInfo, step: int, metrics: dict[str, float]) -> None:
        status = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0])
        Path(self.directory, f"rank{worker.rank}.json").write_text(json.dumps({**metrics, **status}))


def write_scaled(source: Path, scale: int, out: Path) -> int:
    """The bundled table ``scale`` times (clips renamed ``clip~k``, joints + N(0, 2 mm)); returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    flat = table["joints3d"].combine_chunks().flatten().flatten().to_numpy()
    rng = np.random.default_rng(0)
    parts = []
    for k in range(scale):
        joints = (flat + rng.normal(0.0, 0.002, flat.shape)).astype(np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(joints), 3), 17)
        clip = pa.array([f"{c}~{k}" for c in table["clip"].to_pylist()])
        parts.append(pa.table({"subject": table["subject"], "clip": clip, "frame": table["frame"], "joints3d": column}))
    scaled = pa.concat_tables(parts).sort_by([("subject", "ascending"), ("clip", "ascending"), ("frame", "ascending")])
    pq.write_table(scaled.replace_schema_metadata(table.schema.metadata), out)
    return scaled.num_rows


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--buffer-rows", type=int, default=load_config().data.buffer_rows)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from vipe_ray.training.ray_train import Scaling, fit

    bundled = load_config().data.table_path()
    rows: dict[str, int] = {}
    results = []
    with tempfile.TemporaryDirectory(prefix="vipe-ray-data-bench-") as tmp:
        scaled = Path(tmp) / f"x{args.scale}.parquet"
        started = time.perf_counter()
        rows[f"{args.scale}x"] = write_scaled(bundled, args.scale, scaled)
        rows["bundled"] = rows[f"{args.scale}x"] // args.scale
        print(f"wrote the {args.scale}x table ({rows[f'{args.scale}x']} rows, "
              f"{scaled.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            for name, path in (("bundled", bundled), (f"{args.scale}x", scaled)):
                for mode, buffer_rows in (("stream", args.buffer_rows), ("whole shard", 0)):
                    logs = Path(tmp) / f"logs-{name}-{buffer_rows}"
                    logs.mkdir()
                    config = load_config(overrides=merge(BENCH, {
                        "optim": {"steps": args.steps}, "checkpoint_every": args.steps,
                        "data": {"table": str(path), "buffer_rows": buffer_rows}}))
                    started = time.perf_counter()
                    result = fit(config, Scaling(num_workers=args.workers, cpus_per_worker=args.cpus_per_worker),
                                 f"data-{name}-{buffer_rows}", Path(tmp) / "runs", max_failures=0,
                                 extra={"callbacks": [MemoryLog(str(logs))]})
                    wall = time.perf_counter() - started
                    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(args.workers)]
                    row = {"table": name, "rows": rows[name], "mode": mode, "buffer_rows": buffer_rows,
                           "samples_per_s": result.metrics["samples_per_s"], "wall_s": wall,
                           "held": [r["data_buffer_rows"] for r in ranks],
                           "epochs": [r["data_epochs"] for r in ranks],
                           "peak_rss_mb": [r["VmHWM"] / 1024 for r in ranks],
                           "private_mb": [r["RssAnon"] / 1024 for r in ranks]}
                    results.append(row)
                    print(f"  {name:>7} {mode:<11}: {row['samples_per_s']:7.1f} samples/s, poses held per worker "
                          f"{[int(h) for h in row['held']]}, peak RSS {[round(m) for m in row['peak_rss_mb']]} MB, "
                          f"private {[round(m) for m in row['private_mb']]} MB (fit {wall:.0f} s; host load "
                          f"{_load()})", flush=True)
        finally:
            ray.shutdown()
    print(f"\nRay Train data path, {args.workers} workers x {args.cpus_per_worker} CPU, {args.steps} steps of "
          f"{BENCH['optim']['batch_size']} poses per worker (per-worker memory: max over the workers):")
    print(f"| table | rows | data path | poses held per worker | samples/s | peak RSS MB | private MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mode = f"streamed buffer ({r['buffer_rows']})" if r["buffer_rows"] else "whole shard"
        print(f"| {r['table']} | {r['rows']} | {mode} | {int(max(r['held']))} | {r['samples_per_s']:.1f} | "
              f"{max(r['peak_rss_mb']):.0f} | {max(r['private_mb']):.0f} |")


if __name__ == "__main__":
    main()
