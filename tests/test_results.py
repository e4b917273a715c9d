"""What the stages record is typed (augment.results): every stage returns a model, a record keeps exactly the fields
its stage set, and a record that another version wrote (or someone edited) is one line naming the field."""

import json
import shutil
import typing

import pytest

from augment import results
from augment.results import (BaseModelInfo, Choice, FilterSummary, Interval, Record, RecordError, Selection)


def test_every_stage_returns_a_typed_record():
    """Every stage returns its record; the report returns the Metrics it validated once (metrics.json, typed)."""
    from augment.pipeline import STAGES
    from augment.report.schema import Metrics

    for s in STAGES:
        returns = typing.get_type_hints(s.fn)["return"]
        assert isinstance(returns, type) and issubclass(returns, Metrics if s.name == "report" else Record), \
            (s.name, returns)


def test_a_record_keeps_exactly_the_fields_its_stage_set(tmp_path):
    skipped = Choice(skipped="no synthetic sample was kept")
    results.save(tmp_path / "c.json", skipped)
    assert json.loads((tmp_path / "c.json").read_text()) == {"skipped": "no synthetic sample was kept"}
    assert results.load(tmp_path / "c.json", Choice) == skipped
    # a nested default the stage did set is kept; one it did not set is not written
    d = Choice(chosen="real", difference=Interval(mean=0.1, ci_low=0.0, ci_high=0.2))
    assert d.to_json() == {"chosen": "real", "difference": {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2}}
    assert d.difference.confidence == 0.95
    # the evaluation adds the synthetic choice to the pseudo stage's
    both = Selection(recipe=d).with_(synthetic=skipped)
    assert both.to_json() == {"recipe": d.to_json(), "synthetic": skipped.to_json()}
    # what later stages are handed is recorded whole in run.json, defaults included
    base = BaseModelInfo(path="p", description="d", fingerprint="f")
    assert base.to_json()["kind"] == "pixel" and base.name == "d"
    assert results.load(tmp_path / "missing.json", Choice, Choice()) == Choice()


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["per_class"][0].update(kept="many"), "per_class.0.kept"),
    (lambda r: r.update(new_score=1.0), "new_score"),
    (lambda r: r.pop("order"), "order"),
])
def test_a_record_that_does_not_fit_is_one_message_naming_its_field(tmp_path, edit, field):
    raw = {"generated": 2, "kept": 1, "order": ["alia"],
           "per_class": [{"class": "a", "generated": 2, "kept": 1, "rejected": {"low_confidence": 1}}]}
    assert FilterSummary.model_validate(raw).per_class[0].class_ == "a"
    edit(raw)
    (tmp_path / "d.json").write_text(json.dumps(raw))
    with pytest.raises(RecordError) as err:
        results.load(tmp_path / "d.json", FilterSummary)
    assert str(err.value).startswith(f"{tmp_path / 'd.json'}: {field}: ") and "\n" not in str(err.value)
    assert "augment.results.FilterSummary" in str(err.value)


def test_augment_report_on_an_edited_record_is_one_error_line(tiny_cfg, tmp_path, capsys):
    """A finished run whose filter record was edited: `augment report` says which file and field, exit 2, and
    leaves the report it had."""
    from augment import pipeline
    from flows.cli import main
    from augment.runfolder import RunFolder

    pipeline.run(tiny_cfg, log=lambda m: None)
    run = RunFolder(tiny_cfg.publish.output_dir)
    capsys.readouterr()
    assert main(["report", str(run.root)]) == 0
    before = run.report_html.read_bytes()
    raw = json.loads(run.filter.decisions.read_text())
    raw["kept"] = "all of them"
    run.filter.decisions.write_text(json.dumps(raw))
    assert main(["report", str(run.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and str(run.filter.decisions) in err and ": kept: " in err
    assert run.report_html.read_bytes() == before
    shutil.rmtree(run.root)
