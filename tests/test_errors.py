"""Bad input is one clear line naming the culprit, before anything is written."""

import numpy as np
import pytest
from PIL import Image

from augment.cli import main
from conftest import NO_CANDIDATES_PROVENANCE, ROOT, no_candidates

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("overrides, culprit", [
    (["data.source="], "data.source"),                                  # empty: used to train on the cwd
    (["data.source=/no/such/folder/"], "/no/such/folder/"),
    (["generation.strengths=[0.5"], "generation.strengths=[0.5"),       # YAML error inside --set
    (["lora.rank=0"], "lora.rank"),
    (["evaluation.arms=[real, real+jitter]"], "real+jitter"),
    (["name.first=x"], "name is not a section"),
    (["base.pretrained=/no/such/checkpoint"], "base.pretrained=/no/such/checkpoint: no such folder"),
    (["base.kind=stable_diffusion"], "base.kind=stable_diffusion needs base.pretrained"),
    (["base.kind=stable_diffusion", f"base.pretrained={ROOT / 'configs'}"], "no model_index.json"),
    (["base.prompt_template=a {label}"], "base.prompt_template"),
])
def test_bad_values_are_one_line_naming_the_culprit(tmp_path, capsys, overrides, culprit):
    args = ["run", TINY, "--output-dir", str(tmp_path / "out")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    from augment.config import DataConfig
    from augment.data import DataError, load_images

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / c / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 64x64 image is now "too large" (> 2x the limit)
    with pytest.raises(DataError, match=r"cannot read image .*0.png"):
        load_images(DataConfig(source=str(tmp_path)))


def test_class_names_with_dollar_signs_render(tmp_path):
    from augment import plots

    names = ["$\\foo$", "a_b$"]
    assert plots.per_class_plot({"real": {"per_class_accuracy": [0.5, 0.7]}}, names, ["real"])
    assert plots.confusion_plot({"real": [[1, 0], [0, 1]]}, names)
    assert plots.image_grid([(names[0], np.zeros((2, 8, 8, 1), np.uint8), ["$x", "y$"])])


def test_a_crash_between_publish_renames_loses_no_dataset(tmp_path):
    import datasets

    from augment.config import DataConfig
    from augment.data import load_images, split
    from augment.publish import publish

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    empty, prov = no_candidates(), NO_CANDIDATES_PROVENANCE
    out = tmp_path / "dataset"
    publish(splits, splits.train.images[:0], empty, out, "t", prov)
    out.rename(tmp_path / "dataset.old")  # the state a crash between the two renames leaves
    publish(splits, splits.train.images[:0], empty, out, "t", prov)
    assert len(datasets.load_from_disk(str(out))["train"]) == 20 and not (tmp_path / "dataset.old").exists()


def test_cli_starts_without_torch_and_has_a_version():
    import subprocess
    import sys

    code = "import sys, augment.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # `augment --help` / `validate` stay fast
    v = subprocess.run([sys.executable, "-m", "augment.cli", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("augment ")


def test_sigterm_stops_a_run_which_then_resumes(tmp_path):
    """`kill` (SIGTERM) stops `augment run` within seconds, like Ctrl-C; the same command then finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "augment.cli", "run", TINY, "--output-dir", str(out),
           "--set", f"base.cache_dir={tmp_path / 'cache'}", "--set", "lora.max_train_steps=3000"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "finetune").exists():  # well inside the flow: fine-tuning has started
        assert proc.poll() is None and time.time() - t0 < 180, "the run ended before fine-tuning"
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    t1 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t1 < 30 and proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "run the same command again to resume" in err
    done = subprocess.run(cmd[:-2] + ["--set", "lora.max_train_steps=10"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "dataset").exists()
