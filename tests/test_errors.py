"""Bad input is one clear line naming the culprit, before anything is written."""

import numpy as np
import pytest
from PIL import Image

from augment.cli import main
from pathlib import Path

from conftest import NO_CANDIDATES_PROVENANCE, ROOT, no_candidates, write_imagefolder

TINY = str(ROOT / "configs" / "tiny.yaml")


def _folder(u: Path, per_class: int = 12, classes=("cat", "dog", "fox")) -> str:
    write_imagefolder(u / "imgs", classes=classes, per_class=per_class)
    return str(u / "imgs")


def _manifest(u: Path, rows: list[tuple[str, str]] | None = None, columns=("path", "label")) -> str:
    import pandas as pd

    src = Path(_folder(u))
    rows = rows if rows is not None else [(str(p.relative_to(src)), p.parent.name) for p in sorted(src.rglob("*.png"))]
    pd.DataFrame(rows, columns=list(columns)).to_csv(src / "labels.csv", index=False)
    return str(src / "labels.csv")


def _corrupt(u: Path) -> str:
    src = _folder(u)
    (Path(src) / "dog" / "3.png").write_bytes(b"not a png")
    return src


def _duplicate_label(u: Path) -> str:
    src = _folder(u)
    (Path(src) / "fox" / "dup.png").write_bytes((Path(src) / "cat" / "0.png").read_bytes())
    return src


def _escaping_symlink(u: Path) -> str:
    src = _folder(u)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(u / "secret.png")
    (Path(src) / "cat" / "link.png").symlink_to(u / "secret.png")
    return src


def _split_mismatch(u: Path) -> str:
    write_imagefolder(u / "sp" / "train", classes=("cat", "dog"), per_class=12)
    write_imagefolder(u / "sp" / "test", classes=("cat", "cow"), per_class=3)
    return str(u / "sp")


def _config_file(u: Path, text: str) -> str:
    (u / "job.yaml").write_text(text)
    return str(u / "job.yaml")


# Every bad input a user has sent us: (setup(U) -> data.source or None, extra arguments, what the one line names).
# `{src}` in an argument is the setup's return value; `{U}` the user's folder.
BAD_INPUTS = {
    "empty source": (None, ["--set", "data.source="], "data.source"),
    "missing source": (None, ["--set", "data.source=/no/such/folder/"], "/no/such/folder/"),
    "yaml error in --set": (None, ["--set", "generation.strengths=[0.5"], "generation.strengths=[0.5"),
    "out of bounds": (None, ["--set", "lora.rank=0"], "lora.rank"),
    "image size bound": (None, ["--set", "data.image_size=3"], "data.image_size"),
    "unknown arm": (None, ["--set", "evaluation.arms=[real, real+jitter]"], "real+jitter"),
    "not a section": (None, ["--set", "name.first=x"], "name is not a section"),
    "unknown key": (None, ["--set", "generation.guidance=3"], "generation.guidance"),
    "wrong type": (None, ["--set", "generation.num_per_class=many"], "generation.num_per_class"),
    "missing base": (None, ["--set", "base.pretrained=/no/such/checkpoint"], "/no/such/checkpoint: no such folder"),
    "sd without base": (None, ["--set", "base.kind=stable_diffusion"], "base.kind=stable_diffusion needs"),
    "sd not a pipeline": (None, ["--set", "base.kind=stable_diffusion", "--set", f"base.pretrained={ROOT / 'configs'}"],
                          "no model_index.json"),
    "prompt template": (None, ["--set", "base.prompt_template=a {label}"], "base.prompt_template"),
    "config not found": (None, ["CONFIG={U}/nope.yaml"], "nope.yaml"),
    "config yaml syntax": (lambda u: _config_file(u, "data: [unclosed\n"), ["CONFIG={src}"], "job.yaml"),
    "config not a mapping": (lambda u: _config_file(u, "- a\n- b\n"), ["CONFIG={src}"], "job.yaml"),
    "corrupt image": (_corrupt, [], "dog/3.png"),
    "too few images": (lambda u: _folder(u, per_class=3), [], "class 'cat' has only 3 images"),
    "one shot, cross-validated": (None, ["--set", "data.shots_per_class=1"],
                                  "selection.rule=cross_validation needs at least 2 labeled train images per class"),
    "one class": (lambda u: _folder(u, classes=("cat",)), [], "need at least 2 classes"),
    "empty class folder": (lambda u: (Path(_folder(u)) / "emu").mkdir() or str(u / "imgs"), [], "emu"),
    "no class folders": (lambda u: (u / "flat").mkdir() or str(u / "flat"), [], "has no class subfolders"),
    "same image two labels": (_duplicate_label, [], "different labels"),
    "symlink out of the data": (_escaping_symlink, [], "link.png"),
    "manifest without label column": (lambda u: _manifest(u, columns=("path", "class")), [], "no column 'label'"),
    "manifest missing file": (lambda u: _manifest(u, [("cat/0.png", "cat"), ("cat/99.png", "cat")]), [],
                              "row 3: image file not found"),
    "manifest path outside": (lambda u: _manifest(u, [("../../etc/hostname.png", "cat")] * 2), [], "row 2"),
    "manifest missing label": (lambda u: _manifest(u, [("cat/0.png", "cat"), ("cat/1.png", None)] * 12), [],
                               "missing label"),
    "split class mismatch": (_split_mismatch, [], "the class folders must match"),
    "output inside data": (_folder, ["--output-dir", "{src}/cat/out"], "lies inside data.source"),
    "output contains data": (_folder, ["--output-dir", "{U}"], "contains data.source"),
    "output is a file": (_folder, ["--output-dir", "{src}/../notes.txt"], "is a file"),
    "foreign non-empty output": (lambda u: (u / "mine").mkdir() or (u / "mine" / "a.txt").write_text("x") and None,
                                 ["--output-dir", "{U}/mine"], "not empty and was not created by augment"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_culprit_and_changes_nothing(tmp_path, capsys, case):
    setup, extra, culprit = BAD_INPUTS[case]
    u = tmp_path / "U"
    u.mkdir()
    (u / "notes.txt").write_text("the user's own file")
    src = setup(u) if setup else None
    before = _snapshot(u)
    fill = lambda a: a.replace("{src}", str(src)).replace("{U}", str(u))  # noqa: E731
    config = next((fill(a)[7:] for a in extra if a.startswith("CONFIG=")), TINY)
    args = ["run", config, "--set", f"base.cache_dir={tmp_path / 'cache'}"]
    if src is not None and not case.startswith("config"):
        args += ["--set", f"data.source={src}"]
    if "--output-dir" not in extra:
        args += ["--output-dir", str(tmp_path / "out")]
    args += [fill(a) for a in extra if not a.startswith("CONFIG=")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and culprit in err[0], err
    assert _snapshot(u) == before  # no user file changed
    assert not (tmp_path / "out").exists()  # and no run folder was made


def test_the_bad_input_table_is_long_enough():
    assert len(BAD_INPUTS) >= 25


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


def test_debug_adds_the_traceback(tmp_path, capsys):
    args = ["run", TINY, "--output-dir", str(tmp_path / "out"), "--set", "data.source=/no/such/folder/"]
    assert main(args + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_progress_bar_shows_rate_and_time_left():
    import io

    from augment.progress import terminal_bar

    out = io.StringIO()
    bar = terminal_bar("fine-tuning", "step", file=out)
    for step in range(1, 101):
        bar(step, 100)
    text = out.getvalue()
    assert "fine-tuning" in text and "100/100" in text and "step/s" in text and "<" in text  # elapsed<left


def test_quiet_run_prints_only_the_result(tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "augment.cli", "run", TINY, "--quiet", "--output-dir", str(tmp_path / "out"),
           "--set", f"base.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("dataset: ") and lines[3].startswith("wall time: "), lines
    assert "INFO" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
