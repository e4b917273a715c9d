"""Where units go on GPUs (augment/gpus.py, flows' task_runner): one copy of each model per GPU, workers pinned to
the GPUs this process sees, refusals before any stage. No GPU here: torch's view of one is faked."""

import pytest
import torch


@pytest.fixture
def gpus(monkeypatch):
    """This process sees `n` CUDA GPUs (set by calling the fixture's value)."""
    def see(n: int, visible: str | None = None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return see


def _cfg(tiny_cfg, **runner):
    from augment.config import RunnerConfig

    return tiny_cfg.model_copy(update={"runner": RunnerConfig(**runner), "device": "auto"})


def test_several_workers_on_one_gpu_are_refused_and_one_is_the_default(tiny_cfg, gpus):
    from augment.config import ConfigError
    from augment.gpus import runner_workers
    from flows.augment_flow import task_runner

    gpus(1)
    for kind in ("processes", "dask"):
        with pytest.raises(ConfigError, match=r"would put 2 copies of every model on cuda \(Fake GPU\)"):
            runner_workers(_cfg(tiny_cfg, kind=kind, workers=2))
    assert task_runner(_cfg(tiny_cfg, kind="processes"))._max_workers == 1
    assert runner_workers(_cfg(tiny_cfg, kind="dask", address="tcp://10.0.0.5:8786", workers=4)) == 4


def test_workers_are_pinned_to_the_gpus_this_process_sees(tiny_cfg, gpus):
    from augment.config import ConfigError
    from augment.gpus import pinned_devices, runner_workers
    from flows.augment_flow import task_runner

    gpus(2)
    assert pinned_devices(_cfg(tiny_cfg, kind="dask")) == ["0", "1"]
    runner = task_runner(_cfg(tiny_cfg, kind="dask"))
    assert runner.cluster_kwargs == {"devices": ["0", "1"], "strict": True}
    gpus(2, visible="2,3")  # a job given GPUs 2 and 3 (SLURM, a shared machine) pins its workers to those
    assert pinned_devices(_cfg(tiny_cfg, kind="dask")) == ["2", "3"]
    assert pinned_devices(_cfg(tiny_cfg, kind="dask", devices=["1"])) == ["3"]
    assert runner_workers(_cfg(tiny_cfg, kind="dask", devices=["0", "1"])) == 2
    with pytest.raises(ConfigError, match=r"lists GPU 5, but this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=2,3"):
        pinned_devices(_cfg(tiny_cfg, kind="dask", devices=["5"]))
    with pytest.raises(ConfigError, match="which it sees as `cuda`"):
        pinned_devices(_cfg(tiny_cfg, kind="dask", devices=["0", "1"]).model_copy(update={"device": "cuda:1"}))
    assert pinned_devices(_cfg(tiny_cfg, kind="dask").model_copy(update={"device": "cuda:1"})) == []
    gpus(1)
    assert pinned_devices(_cfg(tiny_cfg, kind="dask")) == []  # one GPU: one worker, no pinning needed


def test_the_local_pool_keeps_its_cores_unless_a_model_trains_on_the_gpu(tiny_cfg, gpus):
    from augment.config import ClassifierConfig
    from augment.gpus import local_workers

    cfg = _cfg(tiny_cfg, local_workers=4)
    probe = ClassifierConfig(kind="encoder", backbone="b")
    tuned = ClassifierConfig(kind="encoder", backbone="b", head="lora")
    gpus(0)
    assert local_workers(cfg, cfg.evaluation.model) == 4
    gpus(1)
    assert local_workers(cfg, cfg.evaluation.model) == 1  # a CNN: on the GPU, in this process
    assert local_workers(cfg, tuned) == 1
    assert local_workers(cfg, probe) == 4 and local_workers(cfg, ClassifierConfig(kind="logistic")) == 4


def test_a_pinned_worker_without_its_gpu_fails_rather_than_training_on_the_cpu(gpus, monkeypatch):
    from augment.backends import resolve_device
    from augment.errors import ModelError

    gpus(0)
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setenv("AUGMENT_PINNED_GPU", "1")
    with pytest.raises(ModelError, match="requested but this process sees 0 CUDA GPU"):
        resolve_device("auto")


def test_a_gpu_run_is_refused_before_any_stage(tiny_cfg, gpus, tmp_path):
    from augment import pipeline
    from augment.config import ConfigError

    gpus(1)
    cfg = _cfg(tiny_cfg, kind="processes", workers=2)
    with pytest.raises(ConfigError, match="would put 2 copies"):
        pipeline.preflight(cfg)
    assert not (tmp_path / "run").exists()
