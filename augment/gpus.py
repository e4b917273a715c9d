"""Where a run's units go when its device is an accelerator: one copy of each model per GPU.

- The local pool (runner.local_workers) runs a stage's units in the run's own process when they train on the GPU
  (`local_workers`); units whose models stay on the CPU (scikit-learn models, linear probes on cached features)
  keep every core.
- A task runner with several workers on one GPU is refused before any stage runs (`runner_workers`).
- Several GPUs: a local Dask cluster of one worker per GPU, each started with CUDA_VISIBLE_DEVICES set to its own
  (`pinned_devices`; the cluster is flows' `pinned_cluster`). Indices are this process's, as it sees the GPUs: a
  job started with CUDA_VISIBLE_DEVICES=2,3 pins its workers to GPUs 2 and 3.
"""

from __future__ import annotations

import os

from augment.config import ClassifierConfig, ConfigError, RunConfig

PINNED = "AUGMENT_PINNED_GPU"  # set in a pinned worker's environment: its `cuda` must exist, never the CPU


def on_device(clf: ClassifierConfig) -> bool:
    """Whether a classifier's trainings run on the run's device (a CNN, an encoder tuned with LoRA), rather than
    on the CPU (scikit-learn models; linear probes, whose features are computed beforehand in the run's process)."""
    return clf.kind == "cnn" or (clf.kind == "encoder" and clf.head == "lora")


def accelerated(cfg: RunConfig) -> bool:
    from augment.backends import resolve_device

    return resolve_device(cfg.device).type != "cpu"


def local_workers(cfg: RunConfig, *classifiers: ClassifierConfig) -> int:
    """Processes of the local pool for units that train `classifiers` (runner.local_workers): 1, this process, when
    one of them trains on the run's GPU."""
    if any(on_device(c) for c in classifiers) and accelerated(cfg):
        return 1
    return cfg.runner.local_workers


def _visible() -> list[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def pinned_devices(cfg: RunConfig) -> list[str]:
    """The GPUs (as CUDA_VISIBLE_DEVICES entries) a local Dask cluster pins one worker to each of: runner.devices,
    or every GPU this process sees when the run's device is `auto` or `cuda` and it sees more than one; none for a
    processes runner, a scheduler address, or one GPU."""
    r = cfg.runner
    if r.kind != "dask" or r.address:
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = _visible()
    if r.devices:
        if cfg.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"runner.devices pins each worker to its GPU, which it sees as `cuda`: set device to "
                              f"auto or cuda, not {cfg.device}")
        if cfg.device == "cpu" or not count:  # no GPU here to check against (a CPU run keeps them as given)
            return list(r.devices)
        out = []
        for d in r.devices:
            if d.isdigit():
                if int(d) >= count:
                    raise ConfigError(f"runner.devices lists GPU {d}, but this process sees {count} GPU(s)"
                                      + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                                         if visible is not None else ""))
                d = visible[int(d)] if visible else d
            out.append(d)
        return out
    if cfg.device not in ("auto", "cuda") or count < 2:
        return []
    return visible[:count] if visible else [str(i) for i in range(count)]


def runner_workers(cfg: RunConfig) -> int:
    """Workers of the processes or local Dask runner: runner.workers; by default one per GPU on a GPU, one per
    core on the CPU. Several on one GPU are refused: each would hold its own copy of every model there."""
    from augment.cpus import fair_share

    r = cfg.runner
    if r.kind == "local" or r.address:
        return r.workers or fair_share()
    devices = pinned_devices(cfg)
    if devices:
        return len(devices)
    on_gpu = accelerated(cfg)
    n = r.workers or (1 if on_gpu else fair_share())
    if on_gpu and n > 1:
        from augment.backends import device_name

        raise ConfigError(f"runner.kind={r.kind} with {n} workers would put {n} copies of every model on "
                          f"{device_name(cfg.device)}: use runner.kind=dask with one worker per GPU "
                          "(runner.devices), or runner.workers=1")
    return n
