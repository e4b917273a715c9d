"""A finished run's generator used outside the flow: more samples with provenance, and an exported checkpoint that
plain diffusers loads and that reproduces the run's candidates."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from augment import pipeline
from augment.stages import core
from augment.cli import main
from augment.generate import load_candidates, sampling_precision


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from augment.configfile import load_config
    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"publish.output_dir={tmp / 'run'}",
                                                      f"base.cache_dir={tmp / 'cache'}"])
    pipeline.run(cfg, log=lambda m: None)
    return cfg, tmp


def test_the_library_run_walks_the_one_stage_list(finished):
    """pipeline.run walks pipeline.STAGES, as the flow does (tests/test_flow.py)."""
    import json

    cfg, _ = finished
    info = json.loads((core.run_dir(cfg) / "run.json").read_text())
    assert list(info["stages"]) == [s.name for s in pipeline.STAGES if s.timed]
    assert info["total_seconds"] > 0 and {"base", "adapter"} <= set(info)


def test_generate_more_reproduces_the_runs_candidates_and_writes_provenance(finished, capsys):
    cfg, tmp = finished
    run = core.run_dir(cfg)
    assert main(["generate", str(run), "--class", "3", "-n", "4", "--seed", str(cfg.generation.seed),
                 "--out", str(tmp / "more")]) == 0
    assert "4 samples of '3'" in capsys.readouterr().out
    prov = pd.read_parquet(tmp / "more" / "provenance.parquet")
    assert len(list((tmp / "more" / "3").glob("*.png"))) == 4 and prov["seed"].dtype == np.int64
    cands = load_candidates(run / "candidates")
    mine = cands.meta[(cands.meta["label"] == 3)].iloc[:4]
    assert prov["seed"].tolist() == mine["seed"].tolist()  # the same seeds as the run's plan
    from augment.export import generate_more

    again = generate_more(run, "3", 4, seed=cfg.generation.seed)
    diff = np.abs(np.stack(again["image"]).astype(int) - cands.images[mine.index].astype(int))
    assert diff.max() <= 1
    assert {"prompt", "base_model", "adapter_hash", "config_hash"} <= set(prov.columns)
    assert main(["generate", str(run), "--class", "nope", "-n", "1", "--out", str(tmp / "x")]) == 2
    assert "not one of this run's classes" in capsys.readouterr().err


def test_export_loads_in_plain_diffusers_and_reproduces_a_sample(finished, capsys):
    from diffusers import DDPMScheduler, UNet2DModel

    from augment.diffusion import classifier_free, sample, to_uint8

    cfg, tmp = finished
    run, out = core.run_dir(cfg), tmp / "exported"
    assert main(["export", str(run), str(out)]) == 0
    unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "Evidence and limits" in card and "adapter hash" in card
    cands = load_candidates(run / "candidates")
    row = cands.meta[cands.meta["strength"] == 1.0].iloc[0]
    K = unet.config.num_class_embeds - 1
    g = cfg.generation

    def denoise(x, t, y):
        return unet(x, t, class_labels=y).sample

    precision = sampling_precision(run, cfg)  # the card says which; the run sampled in it
    assert f"{precision} (a sample is reproduced exactly" in card
    x = sample(denoise, scheduler, torch.tensor([int(row["label"])]), [int(row["seed"])], K, (1, 8, 8),
               scheduler=g.scheduler, num_inference_steps=g.num_inference_steps, guide=classifier_free(g.guidance_scale),
               mixed_precision="bf16" if precision == "bf16" else "no")
    assert np.abs(to_uint8(x)[0].astype(int) - cands.images[row.name].astype(int)).max() <= 1
    assert main(["export", str(run), str(out)]) == 2  # not into a non-empty folder
    assert "not empty" in capsys.readouterr().err


def test_adapter_loads_with_plain_peft_and_the_run_folder_travels(finished, tmp_path, capsys, monkeypatch):
    """The adapter names and carries its base: plain diffusers + peft load it, and a run folder copied elsewhere
    (no base cache there) still samples."""
    import shutil

    from diffusers import UNet2DModel
    from peft import PeftModel

    cfg, tmp = finished
    adapter = core.run_dir(cfg) / "finetune" / "adapter"
    # the base the adapter names loads from any working directory, as peft users load it
    from peft import PeftConfig

    named = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    assert named == str((adapter / "base").resolve()) and Path(named).is_absolute()
    monkeypatch.chdir(tmp_path)
    UNet2DModel.from_pretrained(named)
    card = (adapter / "README.md").read_text()
    assert "More Information Needed" not in card and "PeftModel.from_pretrained" in card
    unet = PeftModel.from_pretrained(UNet2DModel.from_pretrained(adapter / "base"), str(adapter)).merge_and_unload()
    from augment.export import _model, load_run

    ours = _model(load_run(core.run_dir(cfg)))[2]  # what augment generates with
    theirs = dict(unet.state_dict())
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    moved = tmp_path / "moved"
    shutil.copytree(core.run_dir(cfg), moved)
    cache = tmp / "cache"
    shutil.move(cache, tmp_path / "cache-away")  # the machine it moved to has no base cache
    try:
        assert main(["generate", str(moved), "--class", "3", "-n", "4", "--seed", str(cfg.generation.seed),
                     "--out", str(tmp_path / "more")]) == 0
    finally:
        shutil.move(tmp_path / "cache-away", cache)
    before = pd.read_parquet(tmp / "more" / "provenance.parquet") if (tmp / "more").exists() else None
    after = pd.read_parquet(tmp_path / "more" / "provenance.parquet")
    assert len(after) == 4 and (before is None or after["seed"].tolist() == before["seed"].tolist())
    capsys.readouterr()


def test_dataset_card_and_push_to_a_local_target(finished, capsys):
    import datasets
    import yaml

    cfg, tmp = finished
    run = core.run_dir(cfg)
    card = (run / "dataset" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "unknown" and "synthetic" in header["tags"]
    assert header["size_categories"] == ["n<1K"] and header["source_datasets"] == ["original"]
    assert "## How it was made" in card and "generated" in card and "## Evidence" in card
    assert main(["push", str(run), "me/tiny", "--to-folder", str(tmp / "hub")]) == 0
    sent = sorted(str(p.relative_to(tmp / "hub")) for p in (tmp / "hub").rglob("*") if p.is_file())
    assert sent[0] == "README.md" and all(s.startswith("data/") and s.endswith(".parquet") for s in sent[1:])
    loaded = datasets.load_dataset(str(tmp / "hub"))
    assert set(loaded) == {"train", "validation", "test"}
    assert len(loaded["train"]) == len(datasets.load_from_disk(str(run / "dataset"))["train"])
