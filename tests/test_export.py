"""A finished run's generator used outside the flow: more samples with provenance, and an exported checkpoint that
plain diffusers loads and that reproduces the run's candidates."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from augment import pipeline
from augment.stages import core
from flows.cli import main
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
    info = json.loads((core.output_dir(cfg) / "run.json").read_text())
    assert list(info["stages"]) == [s.name for s in pipeline.STAGES if s.timed]
    assert info["total_seconds"] > 0 and {"base", "adapter"} <= set(info)


def test_generate_more_reproduces_the_runs_candidates_and_writes_provenance(finished, capsys):
    cfg, tmp = finished
    run = core.output_dir(cfg)
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
    run, out = core.output_dir(cfg), tmp / "exported"
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
    adapter = core.output_dir(cfg) / "finetune" / "adapter"
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

    ours = _model(load_run(core.output_dir(cfg)))[2]  # what augment generates with
    theirs = dict(unet.state_dict())
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    moved = tmp_path / "moved"
    shutil.copytree(core.output_dir(cfg), moved)
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
    run = core.output_dir(cfg)
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


# User faults around generate, export and push: each is a success or one `error: ...` line, exit code 2, and not a
# byte changed on disk ----------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict:
    """Every path under `roots` with its bytes (None for a folder): what a refused command must leave as it was."""
    seen = {}
    for root in map(Path, roots):
        paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
        for p in paths:
            seen[str(p)] = None if p.is_dir() else p.read_bytes() if p.exists() else "absent"
    return seen


def refused(capsys, argv: list[str], culprit: str, *roots: Path) -> str:
    """Run `augment argv`; assert one error line naming `culprit`, exit code 2, and `roots` unchanged."""
    capsys.readouterr()
    before = snapshot(*roots)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and culprit in err[0], err
    assert snapshot(*roots) == before
    return err[0]


def _file(path: Path, data: bytes = b"mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _claimed(folder: Path) -> Path:
    """A run folder `claim` made and `lock` locked, stopped before its config was written."""
    _file(folder / ".augment-run.json", b'{"created_by": "augment"}')
    return _file(folder / ".augment-run.lock", b"").parent


def _copy_run(cfg, to: Path) -> Path:
    import shutil

    shutil.copytree(core.output_dir(cfg), to)
    return to


GENERATE_FAULTS = {
    # name: (setup(run, tmp) -> (extra argv, out), culprit(out))
    "out-holds-a-provenance-table": (lambda run, tmp: ([], _file(tmp / "o" / "provenance.parquet").parent), str),
    "out-holds-anything": (lambda run, tmp: ([], _file(tmp / "o" / "notes.txt").parent), str),
    "out-is-a-file": (lambda run, tmp: ([], _file(tmp / "o")), str),
    "out-under-a-file": (lambda run, tmp: ([], _file(tmp / "f") / "o"), str),
    "out-is-the-run-folder": (lambda run, tmp: ([], run), str),
    "out-inside-the-run-folder": (lambda run, tmp: ([], run / "more"), str),
    "n-zero": (lambda run, tmp: (["-n", "0"], tmp / "o"), lambda out: "-n"),
    "n-negative": (lambda run, tmp: (["-n", "-3"], tmp / "o"), lambda out: "-n"),
    "n-huge": (lambda run, tmp: (["-n", str(10 ** 12)], tmp / "o"), lambda out: "-n"),
    "seed-negative": (lambda run, tmp: (["--seed", "-1"], tmp / "o"), lambda out: "--seed"),
    "unknown-class": (lambda run, tmp: (["--class", "nope"], tmp / "o"), lambda out: "'nope'"),
}


@pytest.mark.parametrize("fault", GENERATE_FAULTS)
def test_generate_refuses_a_bad_request_and_writes_nothing(finished, tmp_path, capsys, fault):
    """generate writes only into a new or empty --out outside the run folder (which augment rewrites and deletes
    in); a bad -n, --seed or class is refused before the model loads."""
    cfg, _ = finished
    run = core.output_dir(cfg)
    setup, culprit = GENERATE_FAULTS[fault]
    extra, out = setup(run, tmp_path)
    argv = ["generate", str(run), "--class", "3", "-n", "2", "--out", str(out), *extra]
    refused(capsys, argv, culprit(out), run, tmp_path)


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-the-data-source", "out-inside-the-data-source"])
def test_generate_never_writes_into_the_runs_data_source(finished, tmp_path, capsys, inside):
    """Synthetic PNGs dropped into the real class folders would be read as real images by the next run."""
    from conftest import write_imagefolder

    cfg, _ = finished
    source = write_imagefolder(tmp_path / "source", classes=("3", "4"), per_class=2, size=8)
    run = _copy_run(cfg, tmp_path / "run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("source: sklearn-digits", f"source: {source}"))
    out = source / "3" if inside else source
    refused(capsys, ["generate", str(run), "--class", "3", "-n", "2", "--out", str(out)], str(out), tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a 0o500 folder")
def test_generate_refuses_an_out_it_may_not_write(finished, tmp_path, capsys):
    cfg, _ = finished
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(capsys, ["generate", str(core.output_dir(cfg)), "--class", "3", "-n", "2", "--out",
                         str(locked / "o")], str(locked / "o"), tmp_path)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("name, folder", [
    ("../x", "%2E.%2Fx"), ("ABS", "ABS"), (".", "%2E"), ("..", "%2E."), (".hidden", "%2Ehidden"), ("a\\b", "a%5Cb"),
    ("", "%"), ("nul\0x", "nul%00x"), ("ok name", "ok name"), ("100%", "100%")])
def test_generate_keeps_every_class_name_inside_out(finished, tmp_path, capsys, monkeypatch, name, folder):
    """A class name from a manifest or a `datasets` label can be anything: its folder is one path component under
    --out (percent-encoded when the name is not one), and provenance.parquet keeps the true name."""
    from urllib.parse import quote

    from augment.stages import outputs

    cfg, _ = finished
    if name == "ABS":  # an absolute path, under tmp_path so that the old code's escape stayed in the sandbox
        name = str(tmp_path / "abs" / "dir")
        folder = quote(name, safe="")
    real = outputs.load_splits

    def renamed(c):
        splits = real(c)
        splits.train.class_names = [name if n == "3" else n for n in splits.class_names]
        return splits

    monkeypatch.setattr(outputs, "load_splits", renamed)
    out = tmp_path / "out"
    assert main(["generate", str(core.output_dir(cfg)), "--class", name, "-n", "2", "--out", str(out)]) == 0
    assert f"in {out / folder} " in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing beside it, no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == sorted([folder, "provenance.parquet"])
    assert len(list((out / folder).glob("*.png"))) == 2
    assert pd.read_parquet(out / "provenance.parquet")["class"].tolist() == [name, name]


def test_generate_into_an_existing_empty_folder(finished, tmp_path, capsys):
    cfg, _ = finished
    (tmp_path / "o").mkdir()
    assert main(["generate", str(core.output_dir(cfg)), "--class", "3", "-n", "2", "--out", str(tmp_path / "o")]) == 0
    assert "samples of '3'" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["3", "provenance.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_generate_that_fails_while_writing_leaves_nothing(finished, tmp_path, capsys, monkeypatch):
    """The images go to a temporary folder renamed into place: Ctrl-C (or a full disk) halfway through writing
    them leaves no partial --out."""
    import augment.imagefiles

    cfg, _ = finished
    real, calls = augment.imagefiles.to_pil, []

    def interrupted(img):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(img)

    monkeypatch.setattr(augment.imagefiles, "to_pil", interrupted)
    assert main(["generate", str(core.output_dir(cfg)), "--class", "3", "-n", "3", "--out", str(tmp_path / "o")]) == 130
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
    capsys.readouterr()


EXPORT_FAULTS = {
    "out-is-not-empty": lambda run, tmp: _file(tmp / "o" / "README.md").parent,
    "out-is-a-file": lambda run, tmp: _file(tmp / "o"),
    "out-under-a-file": lambda run, tmp: _file(tmp / "f") / "o",
    "out-inside-the-run-folder": lambda run, tmp: run / "exported",
}


@pytest.mark.parametrize("fault", EXPORT_FAULTS)
def test_export_refuses_an_out_it_must_not_write(finished, tmp_path, capsys, fault):
    cfg, _ = finished
    run = core.output_dir(cfg)
    out = EXPORT_FAULTS[fault](run, tmp_path)
    refused(capsys, ["export", str(run), str(out)], str(out), run, tmp_path)


@pytest.mark.parametrize("what", ["no-adapter", "only-the-marker", "not-a-run-folder"])
def test_export_and_generate_refuse_a_run_that_has_not_finished(finished, tmp_path, capsys, what):
    import shutil

    cfg, _ = finished
    run = tmp_path / "run"
    if what == "no-adapter":  # stopped before fine-tuning finished
        _copy_run(cfg, run)
        shutil.rmtree(run / "finetune")
        culprit = "no fine-tuned adapter"
    elif what == "only-the-marker":  # claimed, then stopped before writing its config
        _claimed(run)
        culprit = "not an augment run folder"
    else:
        _file(run / "notes.txt")
        culprit = "not an augment run folder"
    refused(capsys, ["export", str(run), str(tmp_path / "o")], culprit, tmp_path)
    refused(capsys, ["generate", str(run), "--class", "3", "-n", "1", "--out", str(tmp_path / "o")], culprit,
            tmp_path)


AUGMENT_CARD = b"---\npretty_name: old\ntags:\n- synthetic\n- augment\n---\n# old\n"
OLD_SHARD = "data/train-0123456789ab-00000-of-00001.parquet"
PUSH_FAULTS = {
    # name: (the files already in the target, the culprit its error names)
    "their-readme-and-shard": ({"README.md": b"# my dataset\n", "data/mine.parquet": b"x"}, "'README.md'"),
    "their-shard": ({"data/mine.parquet": b"x"}, "'data/mine.parquet'"),
    "their-other-file": ({"notes.txt": b"x"}, "'notes.txt'"),
    "a-card-of-another-tool": ({"README.md": b"---\ntags: [synthetic]\n---\n# mine\n"}, "'README.md'"),
    "a-card-with-broken-yaml": ({"README.md": b"---\ntags: [augment\n---\n"}, "'README.md'"),
    "a-binary-readme": ({"README.md": bytes(range(256))}, "'README.md'"),
    "our-card-beside-their-file": ({"README.md": AUGMENT_CARD, OLD_SHARD: b"x", "data/sub/x.parquet": b"x"},
                                   "data/sub"),
}


@pytest.mark.parametrize("fault", PUSH_FAULTS)
def test_push_to_a_folder_refuses_files_it_did_not_write(finished, tmp_path, capsys, fault):
    """A re-push replaces what an earlier push wrote; a folder holding anything else is someone's: refused."""
    cfg, _ = finished
    run = core.output_dir(cfg)
    files, culprit = PUSH_FAULTS[fault]
    for name, data in files.items():
        _file(tmp_path / "u" / name, data)
    err = refused(capsys, ["push", str(run), "me/tiny", "--to-folder", str(tmp_path / "u")], culprit, run, tmp_path)
    assert str(tmp_path / "u") in err and "empty folder" in err


@pytest.mark.parametrize("fault", ["target-is-a-file", "target-is-the-dataset", "target-is-the-run-folder",
                                   "not-a-run-folder", "run-without-a-dataset"])
def test_push_refuses_a_source_or_target_that_is_not_one(finished, tmp_path, capsys, fault):
    cfg, _ = finished
    run, target = core.output_dir(cfg), tmp_path / "u"
    if fault == "target-is-a-file":
        _file(target)
    elif fault == "target-is-the-dataset":  # the old code deleted the dataset's own shards, then crashed
        target = run / "dataset"
    elif fault == "target-is-the-run-folder":
        target = run
    elif fault == "not-a-run-folder":
        run = _file(tmp_path / "r" / "notes.txt").parent
    else:
        run = _claimed(tmp_path / "r")
    culprit = str(target) if fault.startswith("target") else str(run)
    refused(capsys, ["push", str(run), "me/tiny", "--to-folder", str(target)], culprit, core.output_dir(cfg), tmp_path)


def test_push_again_to_a_folder_replaces_only_its_own_old_shards(finished, tmp_path, capsys):
    cfg, _ = finished
    run, target = core.output_dir(cfg), tmp_path / "u"
    assert main(["push", str(run), "me/tiny", "--to-folder", str(target)]) == 0
    first = snapshot(target)
    _file(target / OLD_SHARD)  # an earlier version's shard
    assert main(["push", str(run), "me/tiny", "--to-folder", str(target)]) == 0
    assert snapshot(target) == first
    capsys.readouterr()


class FakeHub:
    """HfApi's calls that push makes, on an in-memory dataset repo: no network."""

    repos: dict = {}
    commits: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        assert repo_type == "dataset" and (exist_ok or repo_id not in self.repos)
        self.repos.setdefault(repo_id, {".gitattributes": b"*.parquet filter=lfs\n"})

    def list_repo_files(self, repo_id, repo_type=None):
        return sorted(self.repos[repo_id])

    def hf_hub_download(self, repo_id, filename, repo_type=None, **kw):
        import tempfile

        path = Path(tempfile.mkdtemp()) / filename
        path.write_bytes(self.repos[repo_id][filename])
        return str(path)

    def create_commit(self, repo_id, operations, commit_message="", repo_type=None, **kw):
        from huggingface_hub import CommitOperationAdd

        self.commits.append([(type(op).__name__, op.path_in_repo) for op in operations])
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                self.repos[repo_id][op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            else:
                del self.repos[repo_id][op.path_in_repo]

    def __getattr__(self, name):  # any other call (upload_folder with a delete glob) is not what push may do
        raise AssertionError(f"push called HfApi.{name}")


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(FakeHub, "repos", {})
    monkeypatch.setattr(FakeHub, "commits", [])
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_push_to_the_hub_creates_replaces_its_own_shards_by_name_and_refuses_others(finished, hub, capsys):
    cfg, _ = finished
    run = core.output_dir(cfg)
    sent = sorted(["README.md"] + [f"data/{p.name}" for p in (run / "dataset" / "data").glob("*.parquet")])
    assert main(["push", str(run), "me/new"]) == 0  # a new repo
    assert sorted(hub.repos["me/new"]) == sorted([".gitattributes", *sent])
    assert all(op == "CommitOperationAdd" for op, _ in hub.commits[-1])
    hub.repos["me/new"][OLD_SHARD] = b"x"  # an earlier push's version
    assert main(["push", str(run), "me/new"]) == 0
    assert [p for op, p in hub.commits[-1] if op == "CommitOperationDelete"] == [OLD_SHARD]  # by name, no glob
    assert sorted(hub.repos["me/new"]) == sorted([".gitattributes", *sent])
    capsys.readouterr()


@pytest.mark.parametrize("fault", PUSH_FAULTS)
def test_push_to_the_hub_refuses_a_repo_holding_files_it_did_not_write(finished, hub, capsys, fault):
    cfg, _ = finished
    files, culprit = PUSH_FAULTS[fault]
    hub.repos["me/theirs"] = {".gitattributes": b"", **files}
    before = dict(hub.repos["me/theirs"])
    err = refused(capsys, ["push", str(core.output_dir(cfg)), "me/theirs"], culprit, core.output_dir(cfg))
    assert "me/theirs" in err and "new dataset repo" in err
    assert hub.repos["me/theirs"] == before and hub.commits == []
