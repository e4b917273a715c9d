"""Typed configuration for every stage, loaded from YAML.

Every field has a type, bounds and a description; unknown keys are errors. The same `RunConfig` is the Prefect
flow's parameter, so Prefect renders it as a form. Field names follow the Hugging Face libraries
(`num_inference_steps`, `guidance_scale`, `rank`, `lora_alpha`, `target_modules`, `seed`, `output_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator,
                      model_validator)

from augment.arms import ARM_PARTS, Arm
from augment.registry import BACKENDS, CLASSIFIERS, DATA_SOURCES, FEEDBACK_CRITERIA, FILTERS, SAMPLERS

BACKEND_NAMES: tuple[str, ...] = BACKENDS.names


def _no_is_no(value):
    """YAML reads a bare `no` (in a file or a --set override) as False; for a precision it means "no"."""
    return "no" if value is False else value


Precision = Annotated[Literal["no", "bf16"], BeforeValidator(_no_is_no)]
AutoPrecision = Annotated[Literal["auto", "no", "bf16"], BeforeValidator(_no_is_no)]
# A path as a shell would read it: `~/data` is the home folder's data, not a folder named `~` in the working one.
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]


class ConfigError(ValueError):
    """A configuration file or value the user must fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: UserPath = Field(
        "sklearn-digits", min_length=1,
        description="`sklearn-digits` (built in, no download), an image folder `<root>/<class>/*`, a CSV/parquet "
        "manifest with `path,label` columns, a `datasets` dataset saved to disk, or a hub dataset id.",
    )
    kind: Literal[("auto",) + DATA_SOURCES.names] = Field(
        "auto", description="How to read `source`; `auto` infers it from what `source` points at."
    )
    image_column: str = Field("image", description="Image column of a `datasets` source.")
    label_column: str = Field("label", description="Label column of a `datasets` or manifest source.")
    hf_split: str = Field("train", description="Split of a `datasets` source to draw from.")
    image_size: int = Field(8, ge=4, le=512, description="Images are resized to image_size x image_size.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB; images are converted.")
    test_fraction: float = Field(0.3, gt=0.0, lt=0.9, description="Stratified share of images held out as test.")
    val_fraction: float = Field(
        0.0, ge=0.0, lt=0.9, description="Stratified share held out as validation. 0: every labeled image trains, "
        "and choices are cross-validated (selection.rule); a validation split then only adds scores to the report.")
    shots_per_class: int | None = Field(
        10, ge=1, description="Labeled train images per class (the small labeled set); None = all the rest."
    )
    use_unlabeled_pool: bool = Field(
        True, description="Images not used as labeled train/val/test form an unlabeled pool (labels dropped) "
        "that the built-in base model pretrains on."
    )
    max_pool_size: int | None = Field(None, ge=1, description="Cap on the unlabeled pool size.")
    allow_outside_paths: bool = Field(
        False, description="Allow manifest paths and image-folder symlinks that resolve outside the data folder "
        "(the manifest's folder or the image folder's root).",
    )
    cross_split_duplicates: Literal["report", "drop"] = Field(
        "report", description="An image in train, validation or the pool identical to one in a more protected split "
        "(test, then validation) can only come from your own train/test folders (a random split keeps copies "
        "together). `report`: named in the report, which then warns that test accuracy may be inflated; `drop`: "
        "removed from the less protected split.",
    )
    seed: int = Field(0, ge=0, description="Seed for the splits and few-shot sampling.")

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.test_fraction + self.val_fraction >= 0.95:
            raise ValueError("data.test_fraction + data.val_fraction must be < 0.95")
        return self


class BaseModelConfig(_Section):
    kind: Literal[("auto",) + BACKEND_NAMES] = Field(
        "auto", description="Generator backend. `auto`: `stable_diffusion` when `pretrained` is a diffusers Stable "
        "Diffusion pipeline (its model_index.json says so), else `pixel`.",
    )
    pretrained: UserPath = Field(
        "builtin",
        description="`builtin` pretrains a pixel-space UNet on the unlabeled pool (cached); otherwise a diffusers "
        "checkpoint, a local folder or a hub id: a UNet2DModel (e.g. google/ddpm-cifar10-32) for the pixel backend, "
        "a Stable Diffusion 1.x/2.x pipeline (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) for "
        "`stable_diffusion`.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `pretrained`, pinned "
                                 "in every published row.")
    subfolder: str | None = Field(None, description="Subfolder of the checkpoint holding the UNet (e.g. `unet`).")
    prompt_template: str = Field(
        "a photo of a {name}", min_length=1,
        description="Stable Diffusion: the prompt of a class; `{name}` is the class name.",
    )
    class_prompts: dict[str, str] = Field(
        {}, description="Stable Diffusion: per-class prompts that replace the template, by class name.",
    )
    negative_prompt: str = Field("", description="Stable Diffusion: the prompt guidance steers away from.")
    gradient_checkpointing: bool = Field(
        False, description="Stable Diffusion: recompute UNet activations in the backward pass (less memory).",
    )
    block_out_channels: Literal["auto"] | list[int] = Field(
        "auto", min_length=1, max_length=4,
        description="Builtin UNet widths, one per level. `auto`: one level per halving of the image side down to "
        "4-7 px (8 px: 2 levels, 16 and 28 px: 3, 32 px and up: 4), 64 channels at the bottom, halved per level "
        "above (at least 16): [32, 64] at 8 px, [16, 32, 64] at 16 and 28 px, so a step costs about the same "
        "per image at every size.",
    )
    attention_levels: Literal["auto"] | list[bool] = Field(
        "auto", min_length=1, max_length=4,
        description="Which levels of the builtin UNet have attention. `auto`: the bottom level only.",
    )
    layers_per_block: int = Field(1, ge=1, le=4, description="Resnet layers per UNet level.")
    norm_num_groups: int = Field(8, ge=1, le=64, description="GroupNorm groups (must divide every width).")
    prediction_type: Literal["epsilon", "v_prediction"] = Field("epsilon", description="What the UNet predicts.")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "squaredcos_cap_v2", description="Noise schedule of the builtin base (a checkpoint brings its own)."
    )
    num_train_timesteps: int = Field(1000, ge=10, le=4000, description="Diffusion timesteps.")
    pretrain_steps: int = Field(750, ge=0, le=1_000_000, description="Optimizer steps of builtin pretraining.")
    pretrain_batch_size: int = Field(64, ge=1, le=4096, description="Batch size of builtin pretraining.")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate of builtin pretraining.")
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="EMA of the base weights; None = off.")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR loss weighting gamma; None = plain MSE.")
    mixed_precision: Precision = Field("no", description="bf16 autocast (CPU AMX or GPU).")
    cache_dir: UserPath = Field("outputs/.cache", description="Where pretrained builtin bases are cached.")
    seed: int = Field(0, ge=0, description="Seed of initialization and noise draws.")

    @model_validator(mode="after")
    def _shapes(self) -> "BaseModelConfig":
        if self.kind == "stable_diffusion" and self.pretrained == "builtin":
            raise ValueError("base.kind=stable_diffusion needs base.pretrained: a diffusers Stable Diffusion "
                             "checkpoint folder or hub id (there is no builtin one)")
        try:
            self.prompt_template.format(name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"base.prompt_template {self.prompt_template!r} must use only {{name}}: {err}") from None
        if "auto" not in (self.attention_levels, self.block_out_channels) and \
                len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("base.attention_levels must have one entry per base.block_out_channels entry")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups] \
            if self.block_out_channels != "auto" else []
        if bad:
            raise ValueError(f"base.norm_num_groups={self.norm_num_groups} must divide every width; not {bad}")
        return self


class LoRAConfig(_Section):
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(
        None, min_length=1,
        description="Module name suffixes that get LoRA; None = the backend's: attention projections and resnet "
        "convolutions (pixel), the UNet's attention projections (Stable Diffusion).",
    )
    train_class_embedding: bool = Field(
        True, description="Pixel backend: train the class embedding in full (peft modules_to_save)."
    )
    mixed_precision: Precision = Field("no", description="bf16 autocast while fine-tuning.")
    max_train_steps: int = Field(800, ge=0, le=1_000_000, description="Fine-tuning optimizer steps.")
    train_batch_size: int = Field(32, ge=1, le=4096, description="Fine-tuning batch size.")
    learning_rate: float = Field(5e-3, gt=0, le=1.0, description="Fine-tuning learning rate of the LoRA factors.")
    class_embedding_learning_rate: float = Field(
        1e-1, gt=0, le=10.0, description="Learning rate of the fully trained class embedding."
    )
    label_dropout: float = Field(0.1, ge=0, lt=1, description="Share of labels replaced by the null class.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained weights; None = off.")
    checkpointing_steps: int = Field(200, ge=1, description="Save a resumable checkpoint every N steps.")
    augment_flip: bool = Field(False, description="Random horizontal flips of the labeled images while training.")
    use_pseudo_labeled: bool = Field(
        True, description="Semi-supervised fine-tuning (DPT-style): also train on the pool images that the `pseudo` "
        "stage labeled confidently. No effect without an unlabeled pool or with pseudo.enabled=false.",
    )
    labeled_share: float = Field(
        0.5, gt=0, le=1, description="With pseudo-labeled images: expected share of every batch drawn from the "
        "labeled images (they are weighted up; the rest comes from the pseudo-labeled ones).",
    )
    seed: int = Field(0, ge=0, description="Seed of the LoRA init, batches and noise.")


class GenerationConfig(_Section):
    num_per_class: int | None = Field(
        200, ge=1, description="Candidates generated per class (used when balance is `none`)."
    )
    balance: Literal["none", "max", "target"] = Field(
        "none", description="`max`: fill every class up to the largest class; `target`: up to balance_target."
    )
    balance_target: int | None = Field(None, ge=1, description="Per-class target count for balance=target.")
    scheduler: Literal[SAMPLERS.names] = Field("dpmsolver++", description="Sampler.")
    num_inference_steps: int = Field(20, ge=1, le=1000, description="Sampling steps.")
    eta: float = Field(
        0.0, ge=0.0, le=1.0, description="DDIM eta: 0 = deterministic; > 0 adds fresh noise every step, drawn from "
        "each sample's own generator (a sample still regenerates alone from its seed). Needs scheduler: ddim.",
    )
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0, description="Classifier-free guidance scale (1 = off).")
    feedback_scale: float = Field(
        0.0, ge=0.0, le=1000.0, description="Feedback-guided sampling (Askari-Hemmat et al., TMLR 2024): every "
        "sampling step also climbs `feedback_criterion` of a classifier (trained as `pseudo.classifier`, a CNN, on the "
        "recipe's images: the labeled ones, plus the pseudo-labeled pool when it is in the recipe) on the predicted "
        "clean image, steering samples toward what that classifier has not learned yet. 0 = off. Pixel backend "
        "only.",
    )
    feedback_criterion: Literal[FEEDBACK_CRITERIA.names] = Field(
        "entropy", description="What feedback-guided sampling climbs: `entropy` of the classifier's prediction "
        "(ambiguous samples) or `loss`, the cross-entropy of the intended class (hard samples of the class).",
    )
    strengths: list[float] = Field(
        [1.0],
        min_length=1,
        description="Image-to-image strengths, drawn per sample; 1.0 = from pure noise, <1 starts from a real "
        "training image of the class (DA-Fusion uses 0.25, 0.5, 0.75, 1.0).",
    )
    batch_size: int = Field(256, ge=1, le=65536, description="Samples per UNet batch.")
    shard_size: int = Field(500, ge=1, description="Samples per shard file on disk.")
    mixed_precision: AutoPrecision = Field(
        "auto", description="bf16 autocast while sampling. `auto`: bf16 where the device computes it natively (a "
        "GPU with bf16, a CPU with AVX-512 bf16/AMX), else fp32.",
    )
    seed: int = Field(0, ge=0, description="Base seed; every sample's own seed derives from it.")

    @model_validator(mode="after")
    def _balance(self) -> "GenerationConfig":
        if self.balance == "target" and self.balance_target is None:
            raise ValueError("generation.balance_target is required when generation.balance is 'target'")
        if self.balance == "none" and self.num_per_class is None:
            raise ValueError("generation.num_per_class is required when generation.balance is 'none'")
        if self.eta > 0 and self.scheduler != "ddim":
            raise ValueError(f"generation.eta={self.eta} needs generation.scheduler: ddim (DPM-Solver++ is "
                             "deterministic here)")
        bad = [s for s in self.strengths if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"generation.strengths must lie in (0, 1]; got {bad}")
        return self


class ClassifierConfig(_Section):
    """A small CNN (the quality judge and the default downstream model) or a scikit-learn estimator on pixels."""

    kind: Literal[CLASSIFIERS.names] = Field("cnn", description="Model family.")
    width: int = Field(32, ge=4, le=512, description="CNN base width.")
    steps: int = Field(600, ge=1, le=1_000_000, description="CNN optimizer steps.")
    batch_size: int = Field(64, ge=1, le=4096, description="CNN batch size.")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="CNN AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="CNN AdamW weight decay.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the CNN head.")
    augment: bool = Field(True, description="Ordinary augmentation (small affine jitter) while training the CNN.")
    image_size: int | None = Field(
        None, ge=4, le=1024, description="Train and predict on images resized to this size (e.g. 64 for 512 px "
        "photos, so that CPU training stays practical); None = the data's size.",
    )
    mixed_precision: AutoPrecision = Field(
        "auto", description="CNN precision. `auto`: bf16 autocast for images of 16 px and more where the CPU "
        "computes bf16 natively, fp32 below. Measured on 2 cores (10 seeds, real+classic on digits): 16 px 1.31x "
        "faster, accuracy -0.11 pts (95% CI +-0.24); 8 px only 1.09x, so it stays fp32. Weights and the optimizer "
        "stay fp32.",
    )


class PseudoConfig(_Section):
    """Pseudo-labels for the unlabeled pool, from a classifier trained on the labeled train split only; how many is
    chosen out of fold (`per_class`) or by a precision target on validation (`thresholds`), per selection.rule."""

    enabled: bool = Field(True, description="Pseudo-label the unlabeled pool (when the job has one).")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="The pseudo-labeler.")
    thresholds: list[float] = Field(
        [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99], min_length=1,
        description="selection.rule=validation: candidate confidence thresholds; the lowest one that meets "
        "`min_precision` on validation wins.",
    )
    min_precision: float = Field(
        0.98, gt=0, le=1, description="selection.rule=validation: required accuracy of the confident predictions on "
        "the validation split.",
    )
    min_support: int = Field(
        10, ge=1, description="selection.rule=validation: a threshold counts only if at least this many validation "
        "images pass it.",
    )
    per_class: list[int] = Field(
        [25, 100, 400], min_length=1, description="selection.rule=cross_validation: candidate numbers of pool "
        "images per class (each class's most confident predictions, class-balanced); the best out of fold wins.",
    )
    seed: int = Field(0, ge=0, description="Seed of the pseudo-labeler.")

    @model_validator(mode="after")
    def _grid(self) -> "PseudoConfig":
        if any(m < 1 for m in self.per_class):
            raise ValueError(f"pseudo.per_class must hold positive counts; got {self.per_class}")
        bad = [t for t in self.thresholds if not 0.0 <= t < 1.0]
        if bad:
            raise ValueError(f"pseudo.thresholds must lie in [0, 1); got {bad}")
        return self


class SelectionConfig(_Section):
    """How the run's choices (classic augmentation or not, the pseudo-labeled pool) are made, on labeled data only."""

    rule: Literal["cross_validation", "validation"] = Field(
        "cross_validation", description="`cross_validation`: on out-of-fold scores of every labeled train image "
        "(a choice the data cannot decide falls to the simpler option); `validation`: on the validation split "
        "(`data.val_fraction` > 0 or a validation/ folder; the pseudo rule is then `pseudo.thresholds`).",
    )
    folds: int = Field(5, ge=2, le=20, description="Stratified folds (fewer when a class has fewer images).")
    repeats: int = Field(1, ge=1, le=10, description="Repeats of the k-fold split with other seeds.")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples (over images) of a choice's "
                           "paired out-of-fold difference.")
    confidence: float = Field(
        0.8, ge=0.5, lt=1.0, description="Level of the interval a choice reads: the richer option wins when the "
        "interval lies above 0 (0.8: 90% one-sided). Lower than the report's 95% for claims: a choice needs a "
        "lean, a claim needs proof.",
    )
    model: ClassifierConfig = Field(
        default_factory=lambda: ClassifierConfig(augment=False, steps=400),
        description="The classifier trained on each fold (keep it equal to evaluation.model).",
    )
    synthetic_holdout: float = Field(
        0.2, ge=0.0, le=0.5, description="Share of each class's labeled images kept from everything the generator "
        "learns from (base pretraining, fine-tuning, img2img sources, the feedback classifier), on which the choose "
        "stage judges whether the synthetic data goes into the product (at least one image per class stays with "
        "the generator). 0 = no such choice: the product always takes the synthetic data. Folds over images the "
        "generator saw would judge its copies of them (augment.selection).",
    )
    synthetic_seeds: int = Field(3, ge=1, le=20, description="Paired training seeds of each option of the "
                                 "synthetic choice.")
    seed: int = Field(0, ge=0, description="Seed of the folds, the fold classifiers, the holdout and the bootstrap.")


class FilterConfig(_Section):
    order: list[Literal[FILTERS.names]] = Field(
        ["class_consistency", "alia", "memorization", "near_duplicates"],
        description="Filters to apply, in order; drop one to switch it off, add `quota` to cap or balance classes.",
    )
    quality_classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    min_confidence: float | Literal["1/K"] = Field(
        0.5, description="Class consistency: keep if p(intended class) > this; `1/K` = chance level."
    )
    alia_folds: int = Field(5, ge=2, le=20, description="Folds for the out-of-fold ALIA thresholds.")
    alia_reject: list[Literal["too_easy", "mislabeled"]] = Field(
        ["mislabeled"], description="Which ALIA outcomes reject a sample."
    )
    memorization_space: Literal["features", "pixels"] = Field("pixels", description="Space for near-copy checks.")
    max_similarity: float = Field(0.99, gt=0, le=1.0, description="Reject candidates this similar to a train image.")
    duplicate_similarity: float = Field(0.995, gt=0, le=1.0, description="Candidates this similar are duplicates.")
    max_per_class: int | None = Field(None, ge=1, description="Quota: keep at most this many per class.")
    balance_classes: bool = Field(True, description="Quota: keep the same count for every class (the minimum).")
    seed: int = Field(0, ge=0, description="Seed of the quality classifier.")




class EvaluationConfig(_Section):
    arms: Literal["auto"] | list[str] = Field(
        "auto",
        description="Downstream training sets. `auto` = the protocol: real, real+classic, the recipe + pseudo "
        "(with a pool), the recipe + synthetic for both recipes, the recipe + pseudo + synthetic, unfiltered "
        "synthetic and synthetic only. Or a list of names joined with `+` from: " + ", ".join(ARM_PARTS) + ".",
    )
    recipe: Literal["auto", "classic", "none"] = Field(
        "auto", description="The team's own training recipe that synthetic data is added to: `classic` "
        "augmentation or `none`; `auto` chooses between real and real+classic by `selection.rule`.",
    )
    seeds: int = Field(10, ge=1, le=100, description="Training seeds per arm (paired across arms).")
    diagnostic_seeds: int | None = Field(
        5, ge=1, le=100, description="Seeds of the diagnostic arms (unfiltered synthetic, synthetic only, each "
        "filter alone): the first N of `seeds`; the verdict's arms always get all of them. None = all.",
    )
    model: ClassifierConfig = Field(
        default_factory=lambda: ClassifierConfig(augment=False, steps=400),
        description="Downstream classifier; `augment` is ignored (arms with `classic` switch augmentation on). "
        "It trains 400 steps by default (the filter's and the pseudo-labeler's CNNs 600; docs/speed.md).",
    )
    synthetic_prob: list[float] = Field(
        [0.25, 0.5], min_length=1, max_length=8,
        description="Mixing: each training example is synthetic with this probability (DA-Fusion-style), whatever "
        "the sizes of the real and synthetic sets. The candidates: under selection.rule=cross_validation (with "
        "`arms: auto` and selection.synthetic_holdout > 0) the choose stage picks one of them on labeled images "
        "the generator never saw, or leaves synthetic data out of the product when none beats the recipe alone; "
        "otherwise the first. One number is a list of one. Each in (0, 1].",
    )
    split: Literal["test", "validation"] = Field(
        "test", description="Split the arms are scored on. `validation` is for choosing settings (benchmarks); "
        "the report of a product run uses `test`, which nothing else touches. Choices made inside the run "
        "(recipe, pseudo-labels) follow `selection.rule` and never read test.",
    )
    filter_ablation: bool = Field(
        True, description="Also train on the synthetic sets that each filter alone would keep (with the recipe).",
    )
    diagnostic_arms: bool = Field(
        True, description="Also train on unfiltered synthetic data (what the filter is worth), on synthetic "
        "data only (the Classification Accuracy Score) and the plain pair that is not the recipe's (real+synthetic "
        "when the recipe is real+classic, and the reverse), on `diagnostic_seeds` seeds.",
    )
    workers: int = Field(
        0, ge=0, le=256, description="Parallel processes (one torch thread each) for the CPU-bound units of a local "
        "run: downstream and cross-validation trainings, the filter's classifiers and generation shards on the CPU; "
        "0 = one per CPU core, 1 = in this process. Results do not depend on it.",
    )
    seed: int = Field(0, ge=0, description="First training seed; seeds are seed, seed+1, ...")

    @field_validator("synthetic_prob", mode="before")
    @classmethod
    def _one_prob(cls, v):
        return [v] if isinstance(v, (int, float, str)) and not isinstance(v, bool) else v

    @field_validator("synthetic_prob")
    @classmethod
    def _probs(cls, v):
        bad = [p for p in v if not 0 < p <= 1]
        if bad:
            raise ValueError(f"every mixing probability must lie in (0, 1]; got {bad}")
        return v

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms):
        """Each arm valid, and named in the canonical order of its parts (`classic+real` is `real+classic`)."""
        return arms if arms == "auto" else [Arm.of(a).name for a in arms]


class PublishConfig(_Section):
    output_dir: UserPath = Field("outputs/digits", description="Run folder: dataset, report, intermediate files.")
    dataset_name: str = Field("augmented-digits", description="Name in the dataset card.")
    license: str = Field("unknown", min_length=1, description="License in the dataset card (a Hub license id such "
                         "as cc-by-4.0; your images' license decides it).")
    max_shard_rows: int = Field(5000, ge=100, description="Rows per parquet shard.")


class RunnerConfig(_Section):
    """Where the flow's independent units run: downstream trainings (arm x seed) as Prefect tasks on a task runner.
    Results do not depend on it (tested)."""

    kind: Literal["local", "processes", "dask"] = Field(
        "local", description="`local`: the evaluation's own process pool (evaluation.workers), no task per unit; "
        "`processes`: Prefect's ProcessPoolTaskRunner; `dask`: prefect-dask's DaskTaskRunner on a local cluster, "
        "or on the scheduler at `address` (pip install augment[dask]). No thread runner: torch's random state is "
        "per process, so trainings in threads of one process would not be reproducible.",
    )
    workers: int = Field(0, ge=0, le=1024, description="Workers of a processes/local-dask runner; 0 = one per CPU "
                         "core. Each training uses one torch thread.")
    address: str | None = Field(None, description="dask: an existing scheduler, e.g. tcp://10.0.0.5:8786 (its "
                                "workers must see the run folder's path); None = a local cluster.")

    @model_validator(mode="after")
    def _address(self) -> "RunnerConfig":
        if self.address and self.kind != "dask":
            raise ValueError(f"runner.address is for runner.kind=dask, not {self.kind}")
        return self


class RunConfig(_Section):
    name: str = Field("digits", description="Name of the job.")
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device; auto = cuda if available.")

    # Where things are written and how many processes do the work change no result: not part of any hash.
    UNHASHED: ClassVar[tuple] = (("publish", "output_dir"), ("base", "cache_dir"), ("evaluation", "workers"),
                                 ("runner", None))

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections (all when none; `section.key` names one field), for cache keys and
        provenance."""
        dump = self.model_dump(mode="json")
        for section, key in self.UNHASHED:
            if key is None:
                dump.pop(section, None)
            else:
                dump[section].pop(key, None)
        picked = {s: dump[s.split(".")[0]][s.split(".")[1]] if "." in s else dump[s] for s in sections} \
            if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
