"""Typed configuration for every stage, loaded from YAML (augment.configfile): the run's config and the sections
it holds (generator.py: data, base, lora, generation; choices.py: classifiers, pseudo, selection, filter,
evaluation; here: publish, runner).

Every field has a type, bounds and a description; unknown keys are errors. The same `RunConfig` is the Prefect
flow's parameter, so Prefect renders it as a form. Field names follow the Hugging Face libraries
(`num_inference_steps`, `guidance_scale`, `rank`, `lora_alpha`, `target_modules`, `seed`, `output_dir`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from augment.config.choices import (ClassifierConfig, EvaluationConfig, FilterConfig, PseudoConfig,
                                    SelectionConfig)
from augment.config.common import BACKEND_NAMES, MAX_SEED, ConfigError, Section, UserPath, slug
from augment.config.generator import BaseModelConfig, DataConfig, GenerationConfig, LoRAConfig

__all__ = ["BACKEND_NAMES", "MAX_SEED", "BaseModelConfig", "ClassifierConfig", "ConfigError", "DataConfig",
           "EvaluationConfig", "FilterConfig", "GenerationConfig", "LoRAConfig", "PseudoConfig", "PublishConfig",
           "RunConfig", "RunnerConfig", "SelectionConfig", "slug"]

class PublishConfig(Section):
    output_dir: UserPath = Field("outputs/digits", description="Run folder: dataset, report, intermediate files.")
    dataset_name: str = Field("augmented-digits", min_length=1, description="Name in the dataset card.")
    license: str = Field("unknown", min_length=1, description="License in the dataset card (a Hub license id such "
                         "as cc-by-4.0; your images' license decides it).")
    max_shard_rows: int = Field(5000, ge=100, le=10_000_000, description="Rows per parquet shard.")


class RunnerConfig(Section):
    """Where the flow's independent units run: downstream trainings (arm x seed) as Prefect tasks on a task runner.
    Results do not depend on it (tested)."""

    kind: Literal["local", "processes", "dask"] = Field(
        "local", description="`local`: augment's own process pool (`local_workers`), no task per unit; "
        "`processes`: Prefect's ProcessPoolTaskRunner; `dask`: prefect-dask's DaskTaskRunner on a local cluster, "
        "or on the scheduler at `address` (pip install augment[dask]). No thread runner: torch's random state is "
        "per process, so trainings in threads of one process would not be reproducible.",
    )
    workers: int = Field(0, ge=0, le=1024, description="Workers of a processes/local-dask runner; 0 = one per CPU "
                         "core. Each training uses one torch thread.")
    local_workers: int = Field(
        0, ge=0, le=256, description="Parallel processes (one torch thread each) for the CPU-bound units that run "
        "outside the task runner (all of them under kind=local): downstream and cross-validation trainings, the "
        "filter's classifiers and generation shards on the CPU; 0 = this job's share of the CPU cores, 1 = in this "
        "process. Results do not depend on it.",
    )
    address: str | None = Field(None, description="dask: an existing scheduler, e.g. tcp://10.0.0.5:8786 (its "
                                "workers must see the run folder's path); None = a local cluster.")
    devices: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9:/_-]{1,96}$")]] = Field(
        [], description="dask, local cluster: one worker per entry, pinned to that GPU with CUDA_VISIBLE_DEVICES (an "
        "index or a GPU UUID; each worker sees its GPU as `cuda`), so that generation shards and downstream trainings "
        "spread over the GPUs with one copy of each model per GPU. Empty: one worker per GPU this job sees (through its "
        "own CUDA_VISIBLE_DEVICES) when the run's device is `auto` or `cuda` and it sees several, else `workers`.",
    )

    @model_validator(mode="after")
    def _address(self) -> "RunnerConfig":
        if self.address and self.kind != "dask":
            raise ValueError(f"runner.address is for runner.kind=dask, not {self.kind}")
        if self.devices and (self.kind != "dask" or self.address):
            raise ValueError("runner.devices pins the workers of a local Dask cluster: it needs runner.kind=dask "
                             "and no runner.address")
        if self.devices and self.workers:
            raise ValueError("runner.devices starts one worker per GPU it lists: leave runner.workers at 0")
        if len(set(self.devices)) < len(self.devices):
            raise ValueError(f"runner.devices lists a GPU twice: {self.devices} (one worker per GPU)")
        return self


# The run's classifier sections, as (section, field): each is handed the run's device and cache folder.
CLASSIFIER_SECTIONS = (("pseudo", "classifier"), ("selection", "model"), ("filter", "quality_classifier"),
                       ("evaluation", "model"))


class RunConfig(Section):
    name: str = Field("digits", min_length=1, description="Name of the job.")
    data: DataConfig = Field(default_factory=DataConfig)
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Where the flow's units run.")
    device: str = Field(
        "auto", description="Torch device of every stage (fine-tuning, generation, the classifiers and encoders, "
        "every downstream training): `auto` (the process's first CUDA GPU, else the CPU), `cpu`, `cuda`, `cuda:N` "
        "or `mps` (Apple's GPU: named, never chosen by `auto`). A worker pinned to one GPU (runner.devices) sees it "
        "as `cuda`.",
    )

    # Where things are written and how many processes do the work change no result: not part of any hash.
    UNHASHED: ClassVar[tuple] = (("publish", "output_dir"), ("base", "cache_dir"), ("runner", None))
    # Keys added after run folders and published rows were keyed: left out of every hash while they hold the value
    # that behaves as before their time, so that an existing run folder keeps its stage keys and config_hash.
    # Values added to a key after run folders were keyed, hashed as the value that behaves as they do: `auto`
    # gradient checkpointing decides per GPU what the old default decided off, and changes no result either way.
    RENAMED_VALUES: ClassVar[tuple] = (("base", "gradient_checkpointing", "auto", False),)
    ADDED: ClassVar[tuple] = (("lora", "snr_gamma", None), ("lora", "adaptations", ["lora"]),
                              ("lora", "use_dora", False), ("lora", "ti_learning_rate", 5e-3),
                              ("base", "weights_dtype", "auto"),
                              ("base", "prompt_templates", []), ("base", "channels_last", False),
                              ("base", "compile", False), ("data", "resize", "stretch"),
                              *((section, f"{key}.{field}", before) for section, key in CLASSIFIER_SECTIONS
                                for field, before in (("backbone", None), ("head", "linear"), ("lora_rank", 8),
                                                      ("augment_views", 4))))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d{1,3}|mps", v):
            raise ValueError(f"{v!r} is not a device: auto, cpu, cuda, cuda:N (N a GPU index) or mps")
        return v

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all when none; `section.key` names one field), for cache keys and
        provenance."""
        dump = self.model_dump(mode="json")
        for section, key in self.UNHASHED:
            if key is None:
                dump.pop(section, None)
            else:
                dump[section].pop(key, None)
        for section, key, before in self.ADDED:
            *inner, key = key.split(".")
            where = dump[section]
            for k in inner:
                where = where[k]
            if where.get(key, before) == before:
                where.pop(key, None)
        for section, key, now, before in self.RENAMED_VALUES:
            if dump[section].get(key) == now:
                dump[section][key] = before
        picked = {s: dump[s.split(".")[0]][s.split(".")[1]] if "." in s else dump[s] for s in sections} \
            if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    @model_validator(mode="after")
    def _hand_down(self) -> "RunConfig":
        """Every classifier section works on the run's device and caches its features under base.cache_dir. Each
        gets its own copy of the section that holds it: a section shared with another config (a shallow copy, one
        object passed to two configs) is never changed under that config."""
        for section, key in CLASSIFIER_SECTIONS:
            outer = getattr(self, section).model_copy()
            clf = getattr(outer, key).model_copy()
            clf._device, clf._cache_dir = self.device, self.base.cache_dir
            outer.__dict__[key] = clf  # no validation: the values are the validated ones
            self.__dict__[section] = outer
        return self

    def model_copy(self, *, update: dict | None = None, deep: bool = False) -> "RunConfig":
        """pydantic's copy (no validation), with the device and cache folder handed down again: a copy that
        updates `device` or `base` must not leave its classifiers on the old ones."""
        return super().model_copy(update=update, deep=deep)._hand_down()

    @model_validator(mode="after")
    def _unet_fits_the_images(self) -> "RunConfig":
        """A builtin UNet with its levels given halves the image side at every level but the last: a side that does
        not halve evenly failed when pretraining started (augment.backends.pixel_unet.build_unet), not here. The
        `auto` layout stops halving where the side is odd, so it always fits."""
        b, size = self.base, self.data.image_size
        given = b.block_out_channels if b.block_out_channels != "auto" else b.attention_levels
        if b.pretrained != "builtin" or b.kind not in ("auto", "pixel") or given == "auto":
            return self
        if size % 2 ** (len(given) - 1):
            raise ValueError(f"data.image_size={size} does not fit the builtin UNet's {len(given)} levels "
                             f"(base.block_out_channels / base.attention_levels): it must be divisible by "
                             f"{2 ** (len(given) - 1)}; change data.image_size or give fewer levels")
        return self
