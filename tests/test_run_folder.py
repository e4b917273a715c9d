"""The run folder is ours or refused: nothing a user owns is ever deleted or overwritten (augment.runfolder)."""

import hashlib
import json
from pathlib import Path

import pytest

from augment import pipeline
from augment.stages import core
from augment import runfolder
from flows.cli import main
from conftest import ROOT, write_imagefolder

TINY = str(ROOT / "configs" / "tiny.yaml")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(tmp_path: Path) -> Path:
    u = tmp_path / "U"
    write_imagefolder(u / "dataset", per_class=4)
    (u / "notes.txt").write_text("my notes")
    for stage in ("finetune", "candidates", "filter", "evaluation"):  # names augment uses for its stage folders
        (u / stage).mkdir()
        (u / stage / "keep.txt").write_text(stage)
    return u


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_output_dir_that_holds_the_data_is_refused_and_untouched(tmp_path, capsys):
    """The reported case: `--output-dir U` with the data in U/dataset deleted 66 user files and exited 0."""
    u = user_folder(tmp_path)
    before = snapshot(u)
    code = main(["run", TINY, "--set", f"data.source={u / 'dataset'}", "--set", f"base.cache_dir={tmp_path / 'c'}",
                 "--output-dir", str(u)])
    assert code == 2
    assert "contains data.source" in one_error_line(capsys)
    assert snapshot(u) == before


def test_non_empty_folder_not_made_by_augment_is_refused_and_untouched(tmp_path, capsys):
    u = user_folder(tmp_path)
    (u / "run.json").write_text('["not ours"]')  # a run.json of another shape must not matter either
    before = snapshot(u)
    assert main(["run", TINY, "--set", f"base.cache_dir={tmp_path / 'c'}", "--output-dir", str(u)]) == 2
    line = one_error_line(capsys)
    assert str(u) in line and "not empty and was not created by augment" in line
    assert snapshot(u) == before


@pytest.mark.parametrize("where", ["inside_source", "is_a_file"])
def test_other_unusable_output_dirs_are_refused(tmp_path, capsys, where):
    data = write_imagefolder(tmp_path / "data", per_class=4)
    out = data / "cat" / "run" if where == "inside_source" else tmp_path / "file.txt"
    if where == "is_a_file":
        out.write_text("x")
    before = snapshot(tmp_path)
    assert main(["run", TINY, "--set", f"data.source={data}", "--output-dir", str(out)]) == 2
    assert ("lies inside data.source" if where == "inside_source" else "is a file") in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_claim_accepts_a_new_or_empty_folder_and_then_its_own(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new" / "nested", empty):
        out = runfolder.claim(folder, "sklearn-digits", "job")
        assert runfolder.is_ours(out)
        (out / "report.html").write_text("a finished run's file")
        assert runfolder.claim(folder, "sklearn-digits", "job") == out  # re-running in it is fine


def test_stage_never_clears_a_folder_without_the_marker(tiny_cfg, tmp_path):
    """Defence in depth: even called without `started`, a stage does not delete a user's folder."""
    out = Path(tiny_cfg.publish.output_dir)
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "mine.txt").write_text("user data")
    st = core.StageRun(tiny_cfg, "finetune")
    with pytest.raises(runfolder.RunFolderError, match="refusing to delete"):
        st.fresh()
    assert (out / "finetune" / "mine.txt").read_text() == "user data"


def test_torn_or_foreign_state_files_are_rebuilt(tiny_cfg):
    with pipeline.started(tiny_cfg) as out:
        (out / "run.json").write_text('{"stages": ')  # torn by a crash of an older version
        core.record(tiny_cfg, "data", seconds=1.0)
        assert json.loads((out / "run.json").read_text()) == {"stages": {"data": {"seconds": 1.0}}}
        (out / "run.json").write_text('["another shape"]')
        core.record(tiny_cfg, None, total_seconds=2.0)
        assert json.loads((out / "run.json").read_text())["total_seconds"] == 2.0


HOLDER = """
import sys, time
from augment import runfolder as run
with run.lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    open(sys.argv[1] + "/done-holding", "w").close()
"""


def _hold(folder: Path, seconds: float):
    """Another process holding the run folder's lock for `seconds` (returned once it holds it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_folder_in_use_is_refused_or_waits(tiny_cfg, tmp_path, capsys):
    out = runfolder.claim(tiny_cfg.publish.output_dir)
    holder = _hold(out, 60)
    try:
        with pytest.raises(runfolder.RunFolderError, match="in use by pid"):
            with pipeline.started(tiny_cfg):
                pass
        # the commands: one line, exit 2, before Prefect starts
        for args in (["run", TINY, "--output-dir", str(out), "--set", f"base.cache_dir={tmp_path / 'c'}"],
                     ["report", str(out)], ["export", str(out), str(tmp_path / "exp")],
                     ["generate", str(out), "--class", "1", "-n", "2", "--out", str(tmp_path / "more")]):
            assert main(args) == 2, args
            assert "is in use by pid" in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    with pipeline.started(tiny_cfg):  # the kernel released it when the holder died (no stale lock)
        with pipeline.started(tiny_cfg):  # and it is re-entrant within one process (the CLI, then the flow)
            pass
    holder = _hold(out, 2)
    with runfolder.lock(out, wait=True):  # --wait: blocks until the holder has finished
        assert (out / "done-holding").exists()
    holder.wait()
    assert runfolder.is_ours(out)


def test_commands_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    assert main(["report", str(tmp_path / "mine")]) == 2
    assert "is not an augment run folder" in one_error_line(capsys)
    assert not any((tmp_path / "mine").iterdir())  # not even a lock file
