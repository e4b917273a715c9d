"""The generator's config sections: the data, the base model, LoRA fine-tuning and generation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from augment.config.common import BACKEND_NAMES, AutoPrecision, Precision, Section, UserPath, seed_field
from augment.registry import DATA_SOURCES, FEEDBACK_CRITERIA, SAMPLERS


class DataConfig(Section):
    source: UserPath = Field(
        "sklearn-digits", min_length=1,
        description="`sklearn-digits` (built in, no download), an image folder `<root>/<class>/*`, a CSV/parquet "
        "manifest with `path,label` columns, a `datasets` dataset saved to disk, or a hub dataset id.",
    )
    kind: Literal[("auto",) + DATA_SOURCES.names] = Field(
        "auto", description="How to read `source`; `auto` infers it from what `source` points at."
    )
    image_column: str = Field("image", min_length=1, description="Image column of a `datasets` source.")
    label_column: str = Field("label", min_length=1, description="Label column of a `datasets` or manifest source.")
    hf_split: str = Field("train", min_length=1, description="Split of a `datasets` source to draw from.")
    image_size: int = Field(8, ge=4, le=1024, description="Images are resized to image_size x image_size (SDXL "
                            "and FLUX.1 are trained at 1024, SD 1.x at 512, SD 2.x at 768).")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB; images are converted.")
    resize: Literal["stretch", "center_crop"] = Field(
        "stretch", description="How a non-square image becomes image_size x image_size: `stretch` resizes it whole "
        "(its aspect changes), `center_crop` scales its short side to image_size and keeps the middle square (no "
        "distortion, as diffusers' training scripts' --center_crop; the photo configs use it). Square images are "
        "the same either way.",
    )
    test_fraction: float = Field(0.3, gt=0.0, lt=0.9, description="Stratified share of images held out as test.")
    val_fraction: float = Field(
        0.0, ge=0.0, lt=0.9, description="Stratified share held out as validation. 0: every labeled image trains, "
        "and choices are cross-validated (selection.rule); a validation split then only adds scores to the report.")
    shots_per_class: int | None = Field(
        10, ge=1, le=1_000_000,
        description="Labeled train images per class (the small labeled set); None = all the rest."
    )
    use_unlabeled_pool: bool = Field(
        True, description="Images not used as labeled train/val/test form an unlabeled pool (labels dropped) "
        "that the built-in base model pretrains on."
    )
    max_pool_size: int | None = Field(None, ge=1, le=100_000_000, description="Cap on the unlabeled pool size.")
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
    seed: int = seed_field("Seed for the splits and few-shot sampling.")

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.test_fraction + self.val_fraction >= 0.95:
            raise ValueError("data.test_fraction + data.val_fraction must be < 0.95")
        return self


class BaseModelConfig(Section):
    kind: Literal[("auto",) + BACKEND_NAMES] = Field(
        "auto", description="Generator backend. `auto`: what `pretrained`'s model_index.json names: "
        "`stable_diffusion` (SD 1.x/2.x), `sdxl`, `sd3` (SD 3/3.5) or `flux` (FLUX.1) for those diffusers "
        "pipelines, else `pixel`.",
    )
    pretrained: UserPath = Field(
        "builtin", min_length=1,
        description="`builtin` pretrains a pixel-space UNet on the unlabeled pool (cached); otherwise a diffusers "
        "checkpoint, a local folder or a hub id: a UNet2DModel (e.g. google/ddpm-cifar10-32) for the pixel backend, "
        "a Stable Diffusion 1.x/2.x pipeline (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) for "
        "`stable_diffusion`, an SDXL pipeline (stabilityai/stable-diffusion-xl-base-1.0) for `sdxl`, an SD 3.5 "
        "pipeline (stabilityai/stable-diffusion-3.5-medium) for `sd3`, a FLUX.1 pipeline "
        "(black-forest-labs/FLUX.1-dev) for `flux`.",
    )
    revision: str | None = Field(None, min_length=1, description="Hub revision (branch, tag or commit) of "
                                 "`pretrained`, pinned in every published row.")
    subfolder: str | None = Field(None, description="Subfolder of the checkpoint holding the UNet (e.g. `unet`).")
    prompt_template: str = Field(
        "a photo of a {name}", min_length=1,
        description="Stable Diffusion: the prompt of a class; `{name}` is the class name.",
    )
    prompt_templates: list[Annotated[str, Field(min_length=1)]] = Field(
        [], max_length=64,
        description="More templates for the `none` adaptation (lora.adaptations), beside prompt_template: its j-th "
        "sample of a class takes template j mod their number, so the pretrained model's samples vary in what the "
        "prompts say (ALIA, 'Diversify, Don't Fine-Tune'); e.g. ['a close-up photo of a {name}', 'a {name} "
        "outdoors']. A class in class_prompts keeps its own prompt.",
    )
    class_prompts: dict[str, str] = Field(
        {}, description="Stable Diffusion: per-class prompts that replace the template, by class name.",
    )
    negative_prompt: str = Field("", description="Stable Diffusion: the prompt guidance steers away from.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Diffusers pipelines: recompute the denoiser's activations in the backward pass (less "
        "memory, about a third slower; the same result). `auto`: off on the CPU; on a GPU, on when a probe step "
        "without it runs out of memory or peaks above 90% of the GPU's memory.",
    )
    channels_last: bool = Field(
        False, description="Diffusers pipelines: the denoiser and VAE in channels_last memory format (faster "
        "convolutions on recent GPUs, as diffusers' docs advise).",
    )
    compile: bool = Field(
        False, description="Diffusers pipelines: torch.compile the denoiser for generation (the first batch of each "
        "process pays the compilation; fine-tuning stays eager, as diffusers' LoRA scripts train).",
    )
    weights_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Diffusers pipelines (stable_diffusion, sdxl, sd3, flux): dtype of the frozen text "
        "encoders and denoiser (the VAE stays fp32); the LoRA factors always train in fp32, as diffusers' scripts "
        "keep them, and fp16 weights train with loss scaling. `auto`: bf16 on a CUDA GPU with bf16 (FLUX.1's 12B "
        "transformer needs it to fit one 80 GB GPU), fp16 on one without (V100, T4) for SD 1.x/2.x and SDXL, else "
        "fp32. fp16 is refused for SD 3.x and FLUX.1: their T5 encoder overflows in it.",
    )
    block_out_channels: Literal["auto"] | list[Annotated[int, Field(ge=1, le=2048)]] = Field(
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
    snr_gamma: float | None = Field(5.0, gt=0, le=1000, description="Min-SNR loss weighting gamma; None = plain MSE.")
    mixed_precision: Precision = Field("no", description="bf16 autocast (CPU AMX or GPU).")
    cache_dir: UserPath = Field("outputs/.cache", description="Where pretrained builtin bases are cached.")
    seed: int = seed_field("Seed of initialization and noise draws.")

    @model_validator(mode="after")
    def _shapes(self) -> "BaseModelConfig":
        if self.kind not in ("auto", "pixel") and self.pretrained == "builtin":
            raise ValueError(f"base.kind={self.kind} needs base.pretrained: a diffusers pipeline checkpoint folder "
                             "or hub id of that family (there is no builtin one)")
        for key, template in [("prompt_template", self.prompt_template)] + [
                (f"prompt_templates[{i}]", t) for i, t in enumerate(self.prompt_templates)]:
            try:
                template.format(name="x")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"base.{key} {template!r} must use only {{name}}: {err}") from None
        if "auto" not in (self.attention_levels, self.block_out_channels) and \
                len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("base.attention_levels must have one entry per base.block_out_channels entry")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups] \
            if self.block_out_channels != "auto" else []
        if bad:
            raise ValueError(f"base.norm_num_groups={self.norm_num_groups} must divide every width; not {bad}")
        return self


class LoRAConfig(Section):
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    lora_alpha: float = Field(8.0, gt=0, le=1024, description="LoRA scaling alpha (update scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    use_dora: bool = Field(
        False, description="DoRA (weight-decomposed LoRA, peft's use_dora): a trained magnitude per output beside "
        "the low-rank direction update; saved in diffusers' format, which load_lora_weights reads.",
    )
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1,
        description="Module name suffixes that get LoRA; None = the backend's: attention projections and resnet "
        "convolutions (pixel), the denoiser's attention projections to_q/to_k/to_v/to_out.0 (the UNet of SD "
        "1.x/2.x and SDXL, the transformer of SD 3.x and FLUX.1).",
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
    snr_gamma: float | None = Field(
        None, gt=0, le=1000, description="Min-SNR loss weighting gamma of fine-tuning (diffusers' scripts "
        "recommend 5.0); None = plain MSE. Noise-prediction backends only: the flow-matching families (SD 3.x, "
        "FLUX.1) weight their timesteps by their sampling density instead.",
    )
    adaptations: list[Literal["lora", "textual_inversion", "lora+ti", "none"]] = Field(
        ["lora"], min_length=1, max_length=4,
        description="How the generator is adapted to the team's classes, as candidates the choose stage scores on "
        "the labeled images the generator never saw (as it scores the synthetic share): `lora` (fine-tuned on the "
        "labeled images), `textual_inversion` (a new token per class learned in the text encoders, the rest "
        "frozen: DA-Fusion), `lora+ti` (both at once: pivotal tuning), `none` (the pretrained text-to-image model "
        "with the class prompts alone: ALIA, 'Diversify, Don't Fine-Tune'). Every listed one is generated with the "
        "same seeds; the product takes the best one's samples, and the report compares them. Without a choice "
        "(selection.rule=validation, listed arms) the first listed is used. `none` needs a text-to-image base "
        "(stable_diffusion, sdxl, sd3, flux); the textual-inversion ones an all-CLIP one (stable_diffusion, sdxl).",
    )
    ti_learning_rate: float = Field(
        5e-3, gt=0, le=1.0, description="Learning rate of the textual-inversion token embeddings (textual_inversion, "
        "lora+ti).",
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained weights; None = off.")
    checkpointing_steps: int = Field(200, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps.")
    augment_flip: bool = Field(False, description="Random horizontal flips of the labeled images while training.")
    use_pseudo_labeled: bool = Field(
        True, description="Semi-supervised fine-tuning (DPT-style): also train on the pool images that the `pseudo` "
        "stage labeled confidently. No effect without an unlabeled pool or with pseudo.enabled=false.",
    )
    labeled_share: float = Field(
        0.5, gt=0, le=1, description="With pseudo-labeled images: expected share of every batch drawn from the "
        "labeled images (they are weighted up; the rest comes from the pseudo-labeled ones).",
    )
    seed: int = seed_field("Seed of the LoRA init, batches and noise.")

    @model_validator(mode="after")
    def _adaptations(self) -> "LoRAConfig":
        if len(set(self.adaptations)) != len(self.adaptations):
            raise ValueError(f"lora.adaptations={self.adaptations} lists one twice")
        if "lora" not in self.adaptations:
            raise ValueError(f"lora.adaptations={self.adaptations} must include lora (the other adaptations are "
                             "compared against it: list [lora, none] and the choose stage picks)")
        return self


class GenerationConfig(Section):
    num_per_class: int | None = Field(
        200, ge=1, le=1_000_000, description="Candidates generated per class (used when balance is `none`)."
    )
    balance: Literal["none", "max", "target"] = Field(
        "none", description="`max`: fill every class up to the largest class; `target`: up to balance_target."
    )
    balance_target: int | None = Field(None, ge=1, le=1_000_000,
                                       description="Per-class target count for balance=target.")
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
    shard_size: int = Field(500, ge=1, le=1_000_000, description="Samples per shard file on disk.")
    mixed_precision: AutoPrecision = Field(
        "auto", description="bf16 autocast while sampling. `auto`: bf16 where the device computes it natively (a "
        "GPU with bf16, a CPU with AVX-512 bf16/AMX), else fp32.",
    )
    seed: int = seed_field("Base seed; every sample's own seed derives from it.")

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
