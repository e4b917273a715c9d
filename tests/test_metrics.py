"""metrics.json's schema (augment.report.schema.Metrics): a real run's file validates and loses nothing when read
typed; a wrong or unknown field is one message that names it."""

import copy
import json
from pathlib import Path

import pytest

from augment.report.schema import Metrics, MetricsError, read_metrics, validate_metrics

GOLDEN = Path(__file__).parent / "data" / "tiny_run_golden.json"


@pytest.fixture
def metrics() -> dict:
    """The golden tiny run's metrics.json, with the machine-dependent fields it was saved without put back."""
    m = json.loads(GOLDEN.read_text())["metrics"]
    m["run"].update(stage_seconds={"data": 0.1, "evaluate": None}, total_seconds=12.5, versions={"torch": "2.13.0"},
                    cpu="AVX2", output_dir="outputs/tiny")
    m["run"]["base_model"].update(path="outputs/.cache/base", pretrain_seconds=1.5)
    m["run"]["adapter"].update(path="outputs/tiny/finetune/adapter", train_seconds=0.5)
    m["dataset"]["path"] = "outputs/tiny/dataset"
    return m


def test_a_real_metrics_file_validates_and_reads_back_unchanged(metrics):
    m = validate_metrics(metrics)
    assert m.evaluation.arms["real"].accuracy.n == len(m.run.evaluation_seeds)
    assert m.generation.per_class[0].class_ == metrics["generation"]["per_class"][0]["class"]
    assert m.model_dump(mode="json", by_alias=True, exclude_unset=True) == metrics


@pytest.mark.parametrize("where, value, message", [
    (("evaluation", "arms", "real", "accuracy", "mean"), "high", "evaluation.arms.real.accuracy.mean"),
    (("gain_over_best_baseline", "verdict"), "probably better", "gain_over_best_baseline.verdict"),
    (("schema_version",), 2, "schema_version"),
    (("data", "train_size"), None, "data.train_size"),
])
def test_a_wrong_value_is_one_message_naming_its_field(metrics, where, value, message):
    node = metrics
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(MetricsError, match=message.replace(".", r"\.")):
        validate_metrics(metrics, "metrics.json")


def test_an_undeclared_field_is_refused(metrics):
    """A stage that writes a new number declares it in the schema first."""
    bad = copy.deepcopy(metrics)
    bad["filter"]["new_score"] = 0.5
    with pytest.raises(MetricsError, match=r"filter\.new_score: Extra inputs are not permitted"):
        validate_metrics(bad)
    del bad["filter"]["new_score"], bad["evaluation"]["arms"]
    with pytest.raises(MetricsError, match=r"evaluation\.arms: Field required"):
        validate_metrics(bad)


def test_read_metrics_reads_a_file_typed_and_none_when_there_is_none(metrics, tmp_path):
    path = tmp_path / "metrics.json"
    assert read_metrics(path) is None
    path.write_text("{not json")
    assert read_metrics(path) is None
    path.write_text(json.dumps(metrics))
    assert isinstance(read_metrics(path), Metrics)
    path.write_text(json.dumps({**metrics, "run": {}}))
    with pytest.raises(MetricsError, match=str(path)):
        read_metrics(path)
