"""What a sweep's (or a study's) trials ask of the Ray cluster and whether the cluster can give it: the
resources of one trial, the cluster's size now and what its autoscaler can grow it to, and the stores
(MLflow, results) that every node of a multi-node cluster must reach."""

from __future__ import annotations

import math
import sys

from vipe_ray import log
from vipe_ray.config import ConfigError
from vipe_ray.platform.sweep_spec import SweepConfig
from vipe_ray.platform.tracking import is_node_local_store
from vipe_ray.storage import Location

#: Ray Data's file-listing task always asks for one whole CPU (ray 2.60 offers no knob for it), so running
#: trials must leave one CPU free or their data never loads.
DATA_LISTING_CPUS = 1.0


#: Custom Ray resource that marks the nodes where trial drivers (the Tune function that starts a trial's
#: Ray Train run, 0.01 CPU) may run. Where the cluster offers it (deploy/raycluster.yaml puts it on the CPU
#: worker group only), every trial asks for one unit, so trial drivers never hold a GPU node or keep the
#: autoscaler from removing one; elsewhere (a local Ray, a cluster without it) they ask for CPU only.
TRIAL_DRIVER_RESOURCE = "trial_driver"


def autoscaler_limits() -> dict[str, float]:
    """The most of each resource the cluster's autoscaler may provide, or {} when unknown.

    Read from the cluster config that Ray's autoscaler v2 publishes in the GCS (what Ray Train and Ray Data
    consult for the same question; a private API in ray 2.60, hence the broad guard). A local Ray, or a
    cluster with the v1 autoscaler (KubeRay's default), publishes none: pass ``cluster_max`` /
    ``--cluster-max`` there. An unbounded group counts as infinite.
    """
    try:
        from ray._private.state import state  # inside the guard: a private module that may move or break

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a missing or changed private API means "unknown", never a failure
        return {}
    return {k: (math.inf if v >= sys.maxsize else float(v)) for k, v in limits.items()}


def cluster_limits(sweep: SweepConfig, cli: dict[str, float] | None = None) -> dict[str, float]:
    """What the cluster can grow to: the autoscaler's limits, overridden per resource by the sweep's
    ``cluster_max``, overridden by ``--cluster-max``."""
    return {**autoscaler_limits(), **sweep.cluster_max, **(cli or {})}


def check_resources(sweep: SweepConfig, cluster: dict[str, float], limits: dict[str, float] | None = None) -> int:
    """Fail before any trial if one trial can never run on this cluster; return the usable concurrency.

    ``cluster``: the resources now (``ray.cluster_resources()``); ``limits``: what the cluster can grow to
    (:func:`cluster_limits`; a resource it omits counts as it is now). A sweep that fits only once the
    cluster grows goes ahead with a warning: Ray queues its trials and the autoscaler adds nodes.
    """
    limits = limits or {}
    capacity = {k: max(cluster.get(k, 0.0), limits.get(k, 0.0)) for k in {*cluster, *limits}}

    def has(key: str) -> str:
        now, most = cluster.get(key, 0.0), capacity.get(key, 0.0)
        return f"{now} {key}s" if most <= now else f"{now} {key}s now and can grow to {most}"

    r = sweep.resources
    cpus = capacity.get("CPU", 0.0)
    need = r.cpus_per_trial + 0.01
    if need + DATA_LISTING_CPUS > cpus + 1e-9:
        raise ConfigError(f"{sweep.path}: resources: a trial needs {max(r.num_workers, 1)} worker(s) x "
                          f"{r.cpus_per_worker} CPU = {r.cpus_per_trial} CPUs (+0.01 for the trial, +1 free for "
                          f"Ray Data's file listing), but the cluster has {has('CPU')}; lower num_workers or "
                          f"cpus_per_worker, or give the cluster's size with cluster_max / --cluster-max")
    gpus = r.num_workers * r.gpus
    if r.use_gpu and capacity.get("GPU", 0.0) + 1e-9 < gpus:
        raise ConfigError(f"{sweep.path}: resources.use_gpu: {r.num_workers} GPU worker(s) x {r.gpus} GPU per "
                          f"trial but the cluster has {has('GPU')}; give the cluster's size with cluster_max / "
                          f"--cluster-max")
    now_cpus, now_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need + DATA_LISTING_CPUS > now_cpus + 1e-9 or (r.use_gpu and now_gpus + 1e-9 < gpus):
        log(f"[sweep] warning: a trial does not fit the cluster as it is now ({now_cpus} CPUs, {now_gpus} GPUs); "
            f"it can grow to {cpus} CPUs, {capacity.get('GPU', 0.0)} GPUs: trials wait for the autoscaler")
    if math.isinf(cpus):
        return sweep.concurrency
    fits = max(1, int((cpus - DATA_LISTING_CPUS + 1e-9) // need))
    if r.use_gpu:
        fits = max(1, min(fits, int((capacity.get("GPU", 0.0) + 1e-9) // gpus)))
    if sweep.concurrency > fits:
        per_trial = f"{need:.2f} CPUs" + (f" and {gpus:g} GPUs" if r.use_gpu else "")
        have = f"{cpus} CPUs" + (f" and {capacity.get('GPU', 0.0):g} GPUs" if r.use_gpu else "")
        log(f"[sweep] note: concurrency {sweep.concurrency} x {per_trial} per trial (+1 CPU for data loading) "
            f"exceeds the cluster's {have}; running {fits} trial(s) at a time")
        return fits
    return sweep.concurrency


def trial_resources(sweep: SweepConfig, capacity: dict[str, float]) -> dict[str, float]:
    """What a trial's driver asks Tune for: its CPUs (the training itself in local mode, else 0.01 beside
    its Ray Train workers) and, where the cluster offers it, one :data:`TRIAL_DRIVER_RESOURCE`."""
    r = sweep.resources
    resources = {"cpu": r.cpus_per_worker if r.num_workers == 0 else 0.01}
    if capacity.get(TRIAL_DRIVER_RESOURCE, 0.0) >= 1:
        resources[TRIAL_DRIVER_RESOURCE] = 1.0
    return resources


def check_cluster_stores(tracking_uri: str, results: Location, nodes: int, grows: bool) -> None:
    """On a cluster the sweep joined: refuse an MLflow store that is a file on one node when trials can run on
    other nodes (each would log into its own copy), warn when the cluster is a single node; warn when the
    results folder is a local path on a multi-node cluster (it must then be a shared mount)."""
    if is_node_local_store(tracking_uri):
        where = (f"MLflow store {tracking_uri} is a file on the driver's node (under `ray job submit "
                 f"--working-dir`, the default ./mlflow.db is inside Ray's unpacked copy of the upload, which "
                 f"Ray deletes)")
        fix = ("set MLFLOW_TRACKING_URI or --tracking-uri to an MLflow server (http://...) or a database "
               "every node reaches (postgresql+psycopg2://...)")
        if nodes > 1 or grows:
            size = f"{nodes} nodes" if nodes > 1 else "1 node that can grow"
            raise ConfigError(f"--tracking-uri: {where}, but this Ray cluster has {size} and trials on the other "
                              f"nodes cannot log to it; {fix}")
        log(f"[sweep] warning: {where}; {fix} to keep the runs")
    if results.is_local and nodes > 1:
        log(f"[sweep] warning: --storage {results} is a local folder on a {nodes}-node cluster: it must be a "
            f"shared mount at the same path on every node; an object store (s3://BUCKET/PREFIX) needs none")
