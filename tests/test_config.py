import pytest

from augment.config import ConfigError, RunConfig

from augment.configfile import load_config, parse_config
from conftest import ROOT


def test_shipped_configs_load():
    for name in ("digits", "tiny", "sd-tiny", "sd15-lora"):
        assert isinstance(load_config(ROOT / "configs" / f"{name}.yaml"), RunConfig)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generation:\n  guidance_scal: 3\n")
    with pytest.raises(ConfigError, match=r"generation\.guidance_scal: unknown key"):
        load_config(p)


def test_out_of_range_value_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rank: 0\n")
    with pytest.raises(ConfigError, match=r"lora\.rank.*greater than or equal to 1.*got 0"):
        load_config(p)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="balance_target is required"):
        parse_config({"generation": {"balance": "target"}})
    with pytest.raises(ConfigError, match=r"strengths must lie in \(0, 1\]"):
        parse_config({"generation": {"strengths": [0.5, 1.5]}})
    with pytest.raises(ConfigError, match="attention_levels"):
        parse_config({"base": {"block_out_channels": [8, 16, 32], "attention_levels": [False, True]}})
    with pytest.raises(ConfigError, match="must divide every width"):
        parse_config({"base": {"block_out_channels": [12, 16], "norm_num_groups": 8}})


def test_overrides_and_bad_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n")
    cfg = load_config(p, ["generation.guidance_scale=3.5", "filter.min_confidence=1/K"])
    assert cfg.generation.guidance_scale == 3.5 and cfg.filter.min_confidence == "1/K"
    # YAML reads a bare `no` as False: a precision still takes it, in a file and in an override
    p.write_text("generation: {mixed_precision: no}\nlora: {mixed_precision: no}\n")
    cfg = load_config(p, ["evaluation.model.mixed_precision=no", "base.mixed_precision=no"])
    assert (cfg.generation.mixed_precision, cfg.lora.mixed_precision, cfg.evaluation.model.mixed_precision,
            cfg.base.mixed_precision) == ("no", "no", "no", "no")
    p.write_text("name: x\n")
    with pytest.raises(ConfigError, match="must look like"):
        load_config(p, ["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_fingerprint_tracks_sections():
    a, b = RunConfig(), RunConfig()
    b.evaluation.seeds = 3
    assert a.fingerprint("lora") == b.fingerprint("lora")
    assert a.fingerprint("evaluation") != b.fingerprint("evaluation")


def test_docs_reference_is_current():
    from augment.configfile import reference_markdown

    assert reference_markdown() in (ROOT / "docs" / "reference.md").read_text(), \
        "docs/reference.md is stale: replace its table with the output of `python -m augment.configfile`"


def test_overrides_and_partial_configs_merge_and_bad_values_name_the_override():
    from augment.config import ConfigError
    from augment.configfile import apply_overrides, deep_merge

    base = {"generation": {"seed": 1, "num_per_class": 5}, "name": "job"}
    merged = deep_merge(base, {"generation": {"num_per_class": 9}})
    assert merged == {"generation": {"seed": 1, "num_per_class": 9}, "name": "job"}
    assert apply_overrides(merged, ["generation.seed=3"])["generation"] == {"seed": 3, "num_per_class": 9}
    assert base == {"generation": {"seed": 1, "num_per_class": 5}, "name": "job"}  # inputs untouched
    with pytest.raises(ConfigError, match=r"generation.strengths=\[0.5.*not valid YAML"):
        apply_overrides(base, ["generation.strengths=[0.5"])
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides(base, ["name.first=x"])


def test_config_hash_ignores_where_and_how_many():
    a = RunConfig()
    b = parse_config({"publish": {"output_dir": "/elsewhere"}, "base": {"cache_dir": "/cache2"},
                      "evaluation": {"workers": 1}})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint("base", "evaluation") == b.fingerprint("base",
                                                                                                       "evaluation")
    assert a.publish.output_dir != b.publish.output_dir  # the config itself still holds them
