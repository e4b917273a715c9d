import re

import pytest

from augment.config import ConfigError, RunConfig

from augment.configfile import load_config, parse_config
from conftest import ROOT


def test_shipped_configs_load():
    for name in ("digits", "tiny", "sd-tiny", "sd15-lora", "sdxl-lora", "sd35-lora", "flux-lora"):
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
                      "runner": {"local_workers": 1}})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint("base", "evaluation") == b.fingerprint("base",
                                                                                                       "evaluation")
    assert a.publish.output_dir != b.publish.output_dir  # the config itself still holds them


def test_slug_is_a_valid_prefect_key_for_any_name():
    import re

    from augment.config import slug

    assert slug("café") == "cafe" and slug("Ünïcödé  Name!") == "unicode-name" and slug("--a__b--") == "a-b"
    for name in ("日本", "!!!", "", "ß", "İstanbul", "a/b\\c", "x" * 300):
        assert re.fullmatch(r"[a-z0-9-]+", slug(name)), (name, slug(name))  # Prefect's rule for artifact keys
    assert slug("日本") != slug("中国")  # nothing ASCII left: a hash of the name, still one key per name


def test_artifact_keys_of_any_job_name_are_valid():
    """`--set name=café` passed validate, then the run failed at its first artifact: Prefect refused
    `augment-café-selection`."""
    import re

    from flows.augment_flow import _key

    for name in ("café", "日本", "Ünïcödé  Name!", "digits"):
        assert re.fullmatch(r"[a-z0-9-]+", _key(RunConfig(name=name)) + "-report"), name
    assert _key(RunConfig(name="café")) == "augment-cafe"


def _numeric_fields(model=RunConfig, prefix=()):
    """(path, annotation) of every int or float field of every section (a list of them too)."""
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_fields(ann, prefix + (name,))
        elif any(t in str(ann) for t in ("int", "float")) and "bool" not in str(ann):
            yield prefix + (name,), str(ann)


def _nested(path, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


@pytest.mark.parametrize("field", list(_numeric_fields()), ids=lambda f: ".".join(f[0]))
def test_every_number_is_bounded_and_finite(field):
    """A NaN min_confidence switched the filter off, an infinite lora_alpha trained to NaN, a seed of 2**64 failed
    after the generator had run: every number of every section has a lower and an upper bound, and no float may be
    NaN or infinite. Each refusal names the field."""
    path, ann = field
    name = ".".join(path)
    values = [10**30, -10**30] + ([float("nan"), float("inf"), float("-inf"), "nan"] if "float" in ann else [])
    for v in values:
        with pytest.raises(ConfigError, match=re.escape(name)):
            parse_config(_nested(path, [v] if ann.startswith("list") else v))


def test_seeds_fit_every_generator_they_reach():
    """numpy, torch and scikit-learn (random_state < 2**32) take every seed, with the offsets the stages add
    (evaluation seeds are seed .. seed+99)."""
    from augment.config import MAX_SEED

    seeded = [p for p, _ in _numeric_fields() if p[-1] == "seed"]
    assert len(seeded) == 8
    for path in seeded:
        assert parse_config(_nested(path, MAX_SEED))
        with pytest.raises(ConfigError, match=re.escape(".".join(path))):
            parse_config(_nested(path, MAX_SEED + 1))
    assert MAX_SEED + 100 < 2**32


def test_a_value_that_fits_no_form_of_a_union_is_one_line():
    for key, value in (("base.block_out_channels", "wide"), ("evaluation.arms", 5), ("filter.min_confidence", 7)):
        with pytest.raises(ConfigError) as err:
            parse_config(_nested(key.split("."), value))
        assert len(str(err.value).splitlines()) == 1 and f"{key}: " in str(err.value), str(err.value)


def test_unknown_keys_suggest_the_near_miss():
    with pytest.raises(ConfigError, match=r"lora\.lora_alhpa: unknown key \(did you mean lora_alpha\?\)"):
        parse_config({"lora": {"lora_alhpa": 4}})
    with pytest.raises(ConfigError, match=r"Data: unknown key \(did you mean data\?\)"):
        parse_config({"Data": {}})
    with pytest.raises(ConfigError, match=r"lora\.banana: unknown key$"):
        parse_config({"lora": {"banana": 4}})


def test_blank_paths_and_names_are_refused():
    """An empty cache_dir wrote the cache into the working directory."""
    for key in ("base.cache_dir", "publish.output_dir", "data.source", "base.pretrained", "name",
                "publish.dataset_name", "data.label_column"):
        for blank in ("", ) + ((" ",) if key.endswith(("_dir", "source", "pretrained")) else ()):
            with pytest.raises(ConfigError, match=re.escape(key)):
                parse_config(_nested(key.split("."), blank))


def test_a_moved_key_is_refused_in_a_users_config_and_moved_in_a_run_folders_own(tmp_path):
    """evaluation.workers moved to runner.local_workers: a config a user writes gets the one-line hint; a run
    folder's config.yaml, written whole by an earlier version, is read with the key in its new place."""
    import yaml

    from augment.configfile import load_config, saved_config

    path = tmp_path / "config.yaml"
    data = RunConfig().model_dump(mode="json")
    data["runner"].pop("local_workers")
    data["evaluation"]["workers"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"evaluation.workers: unknown key \(it moved: write runner.local_workers"):
        load_config(path)
    assert load_config(path, saved=True).runner.local_workers == 3
    assert "workers" not in saved_config(data)["evaluation"] and data["evaluation"]["workers"] == 3  # a copy
    given = {"evaluation": {"workers": 2}, "runner": {"local_workers": 1}}
    assert saved_config(given)["runner"] == {"local_workers": 1}  # a key set in its new place wins


def test_a_key_added_later_stays_out_of_the_hashes_at_its_old_behaviour():
    """Keys that came after run folders were keyed (RunConfig.ADDED: lora.snr_gamma, lora.adaptations,
    lora.use_dora, base.weights_dtype, ...): left at what behaves as before they change no stage key and no
    published config_hash; set, they do."""
    import hashlib
    import json

    from augment.configfile import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    # `auto` gradient checkpointing hashes as the old default (off): it changes no result
    assert cfg.base.gradient_checkpointing == "auto"
    assert load_config(ROOT / "configs" / "tiny.yaml", ["base.gradient_checkpointing=false"]).fingerprint() == \
        cfg.fingerprint()
    dump = cfg.model_dump(mode="json")
    dump["base"]["gradient_checkpointing"] = False
    for section, key, before in RunConfig.ADDED:  # `model.backbone`: a key of a nested section
        *inner, key = key.split(".")
        where = dump[section]
        for k in inner:
            where = where[k]
        assert where.pop(key) == before
    for section in ("lora", "base"):
        picked = {section: {k: v for k, v in dump[section].items() if k != "cache_dir"}}
        assert cfg.fingerprint(section) == hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
    for changed in ("lora.snr_gamma=5", "lora.adaptations=[lora, none]", "lora.use_dora=true",
                    "base.weights_dtype=bf16"):
        section = changed.split(".")[0]
        assert load_config(ROOT / "configs" / "tiny.yaml", [changed]).fingerprint(section) != cfg.fingerprint(section)
    encoder = "filter.quality_classifier={kind: encoder, backbone: b"
    linear = load_config(ROOT / "configs" / "tiny.yaml", [encoder + "}"]).fingerprint("filter")
    for changed in (", head: lora}", ", augment_views: 2}"):
        assert load_config(ROOT / "configs" / "tiny.yaml", [encoder + changed]).fingerprint("filter") != linear
