"""SDXL and FLUX.1 beside SD 1.x, offline: tiny random pipelines in diffusers' own test configurations, written by
the test; `augment run configs/sd-tiny.yaml --set base.kind=auto --set base.pretrained=DIR` to the end for each;
the adapter loaded by that family's plain diffusers pipeline reproduces a published candidate from its provenance
columns; and the flow-matching objective and sampler checked against an oracle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from augment import backends
from augment.backends import flux, sd3, sdxl, stable_diffusion
from augment.config import BaseModelConfig, GenerationConfig
from augment.errors import ModelError
from conftest import ROOT

CPU = torch.device("cpu")
WRITERS = {"stable_diffusion": stable_diffusion.write_tiny_checkpoint, "sdxl": sdxl.write_tiny_checkpoint,
           "flux": flux.write_tiny_checkpoint, "sd3": sd3.write_tiny_checkpoint}
PIPELINE = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
TRANSFORMER = ("flux", "sd3")  # the families whose denoiser is pipe.transformer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: write(root / kind) for kind, write in WRITERS.items()}


def test_auto_detects_each_family_and_a_wrong_kind_is_refused(checkpoints, tmp_path):
    for kind, path in checkpoints.items():
        assert backends.detect_kind(BaseModelConfig(pretrained=str(path))) == kind
        assert backends.check_base(BaseModelConfig(pretrained=str(path))) == kind
    with pytest.raises(ModelError, match="which the flux backend loads, not sdxl: set base.kind to flux"):
        backends.check_base(BaseModelConfig(kind="sdxl", pretrained=str(checkpoints["flux"])))
    (tmp_path / "bare").mkdir()
    with pytest.raises(ModelError, match="no model_index.json.*transformer"):
        backends.check_base(BaseModelConfig(kind="flux", pretrained=str(tmp_path / "bare")))


def test_flux_refuses_a_noise_prediction_weighting_before_any_stage(checkpoints, tmp_path, capsys):
    from flows.cli import main

    args = ["run", str(ROOT / "configs" / "sd-tiny.yaml"), "--set", f"base.pretrained={checkpoints['flux']}",
            "--set", "base.kind=auto", "--set", "lora.snr_gamma=5", "--set", f"base.cache_dir={tmp_path / 'cache'}",
            "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.snr_gamma=5.0" in err[0] and "flow matching" in err[0], err
    assert not (tmp_path / "out").exists()


def _backend(path, tmp_path, **kw):
    cfg = BaseModelConfig(pretrained=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    backend = backends.create(cfg, ["cat", "dog"], 32, 3, CPU)
    return backend, backend.prepare(None, None, log=lambda m: None)


def test_sdxl_conditions_on_both_encoders_pooled_and_time_ids(checkpoints, tmp_path):
    backend, info = _backend(checkpoints["sdxl"], tmp_path, negative_prompt="blurry")
    unet = backend.load(info)
    assert backend.embeddings.shape[-1] == 64 == unet.config.cross_attention_dim  # two 32-wide encoders, concatenated
    assert backend.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    # the null class is zeros (force_zeros_for_empty_prompt), the negative prompt is encoded
    assert backend.embeddings[2].abs().max() == 0 and backend.pooled[2].abs().max() == 0
    assert backend.embeddings[3].abs().max() > 0 and backend.uncond_label == 3
    x, t = torch.randn(2, *backend.latent_shape), torch.tensor([500, 500])
    with torch.no_grad():
        a = backend.denoise(unet, x, t, torch.tensor([0, 0]))
        b = backend.denoise(unet, x, t, torch.tensor([1, 1]))
    assert a.shape == x.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_flow_matching_training_and_sampling_are_rectified_flow(kind, checkpoints, tmp_path, monkeypatch):
    """With the exact velocity of a one-point data set (every image is z), the training loss is zero and FlowMatch
    Euler lands on z from any noise, at any strength, under guidance too: the sigmas, the sign of the velocity, the
    preconditioning (SD 3.x) and the image-to-image start agree with each other."""
    backend, info = _backend(checkpoints[kind], tmp_path)
    model = backend.load(info)
    z = torch.randn(1, *backend.latent_shape)
    sigma_of = {float(t): float(s) for t, s in zip(backend.scheduler.timesteps, backend.scheduler.sigmas)}

    def oracle(model, x_t, t, labels, guidance=None):  # v = eps - z with x_t = (1 - s) z + s eps
        s = torch.tensor([sigma_of.get(float(v), float(v) / 1000) for v in t.reshape(-1).expand(len(x_t))])
        return (x_t - z) / s.view(-1, 1, 1, 1)

    monkeypatch.setattr(backend, "velocity", oracle)
    loss = backend.loss(model, z.expand(4, -1, -1, -1), torch.zeros(4, dtype=torch.long),
                        torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8
    monkeypatch.setattr(backend, "decode", lambda x: x)
    cfg = GenerationConfig(num_inference_steps=4, mixed_precision="no", guidance_scale=3.0)
    out = backend.sample(model, np.array([0, 1]), [1, 2], cfg)
    assert torch.allclose(out, z.expand(2, -1, -1, -1), atol=1e-4)
    monkeypatch.setattr(backend, "encode", lambda images: torch.randn(len(images), *backend.latent_shape))
    out = backend.sample(model, np.array([0]), [3], cfg, strength=0.5, init_images=np.zeros((1, 32, 32, 3)))
    assert torch.allclose(out, z, atol=1e-4)
    assert backend.sampler_name(cfg) == "flow_match_euler"


def test_sd3_conditions_on_three_encoders_and_guides_against_the_empty_prompt(checkpoints, tmp_path):
    backend, info = _backend(checkpoints["sd3"], tmp_path, negative_prompt="blurry")
    model = backend.load(info)
    assert backend.embeddings.shape[-1] == 64 == model.config.joint_attention_dim  # CLIPs padded to T5's width
    assert backend.embeddings.shape[1] == 16 + 32  # CLIP tokens (both, side by side in width), then T5 tokens
    assert backend.pooled.shape[-1] == 64 == model.config.pooled_projection_dim  # both CLIPs' pooled, concatenated
    assert backend.uncond_label == 3 and backend.embeddings[2].abs().max() > 0  # "" is encoded, not zeros
    x, t = torch.randn(2, *backend.latent_shape), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        a, b = (backend.denoise(model, x, t, torch.tensor([k, k])) for k in (0, 1))
    assert a.shape == x.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("kind,dtype", [(k, "bf16") for k in WRITERS] + [("stable_diffusion", "fp16"),
                                                                         ("sdxl", "fp16")])
def test_frozen_weights_in_half_precision_train_fp32_lora_factors_and_sample(kind, dtype, checkpoints, tmp_path):
    """base.weights_dtype bf16 (what `auto` picks on a GPU with bf16) or fp16 (on one without: loss scaling): text
    encoders and denoiser in that dtype, the LoRA factors in fp32, and fine-tuning and sampling run with finite
    losses and images."""
    from augment.config import LoRAConfig
    from augment.data import ImageSet
    from augment.finetune import finetune

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    backend, info = _backend(checkpoints[kind], tmp_path, weights_dtype=dtype)
    train = ImageSet(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1]),
                     ["cat", "dog"], [f"r{i}" for i in range(4)])
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=2, train_batch_size=2)
    done = finetune(cfg, backend, info, train, tmp_path / "ft", log=lambda m: None)
    assert np.isfinite(done.final_loss)
    assert {p.dtype for enc in backend.text_encoders() for p in enc.parameters()} == {half}
    model = backend.load(info)
    lora, trained = backend.add_lora(model, cfg)
    dtypes = {n: p.dtype for n, p in lora.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {half}
    tuned = backend.load(info, adapter=tmp_path / "ft" / "adapter")
    images = backend.sample(tuned, np.array([0, 1]), [1, 2], GenerationConfig(num_inference_steps=2))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0


def test_fp16_weights_train_with_loss_scaling_and_resume_identically(checkpoints, tmp_path, monkeypatch):
    """fp16 frozen weights: the loop scales the loss (GradScaler), and its state survives a crash like the rest."""
    import augment.backends.common as where_the_loss_is
    import augment.diffusion.training as training
    from augment.config import LoRAConfig
    from augment.data import ImageSet
    from augment.finetune import finetune
    from conftest import crash_at

    scalers = []
    real_scaler = torch.amp.GradScaler

    def recorded(*a, **kw):
        scalers.append(real_scaler(*a, **kw))
        return scalers[-1]

    monkeypatch.setattr(training.torch.amp, "GradScaler", recorded)
    backend, info = _backend(checkpoints["stable_diffusion"], tmp_path, weights_dtype="fp16")
    train = ImageSet(np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1]),
                     ["cat", "dog"], [f"r{i}" for i in range(4)])
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=4, train_batch_size=2, checkpointing_steps=2)
    finetune(cfg, backend, info, train, tmp_path / "full", log=lambda m: None)
    assert scalers[-1].is_enabled() and scalers[-1].get_scale() > 1
    real_loss = where_the_loss_is.diffusion_loss
    monkeypatch.setattr(where_the_loss_is, "diffusion_loss", crash_at(3, real_loss))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, backend, info, train, tmp_path / "resumed", log=lambda m: None)
    monkeypatch.setattr(where_the_loss_is, "diffusion_loss", real_loss)
    finetune(cfg, backend, info, train, tmp_path / "resumed", log=lambda m: None)
    a, b = (load_file(str(tmp_path / d / "adapter" / "pytorch_lora_weights.safetensors")) for d in ("full", "resumed"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert scalers[-1].get_scale() == scalers[0].get_scale()


def test_fp16_is_refused_for_the_t5_families_before_any_stage(checkpoints, tmp_path, capsys):
    from flows.cli import main

    args = ["run", str(ROOT / "configs" / "sd-tiny.yaml"), "--set", f"base.pretrained={checkpoints['sd3']}",
            "--set", "base.kind=auto", "--set", "base.weights_dtype=fp16", "--set", f"base.cache_dir={tmp_path / 'c'}",
            "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base.weights_dtype=fp16" in err[0] and "T5" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_dora_adapter_fuses_in_the_plain_pipeline_as_augment_fuses_it(kind, checkpoints, tmp_path):
    """lora.use_dora: the magnitude vectors are saved in diffusers' format, and the family's plain pipeline,
    load_lora_weights then fuse_lora, gives the denoiser weights that generation samples with."""
    import diffusers

    from augment.config import LoRAConfig
    from augment.data import ImageSet
    from augment.finetune import finetune

    backend, info = _backend(checkpoints[kind], tmp_path)
    train = ImageSet(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1]),
                     ["cat", "dog"], [f"r{i}" for i in range(4)])
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=3, train_batch_size=2, use_dora=True, learning_rate=0.05)
    finetune(cfg, backend, info, train, tmp_path / "ft", log=lambda m: None)
    weights = load_file(str(tmp_path / "ft" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any("lora_magnitude_vector" in k for k in weights)
    ours = backend.load(info, adapter=tmp_path / "ft" / "adapter").state_dict()
    pipe = getattr(diffusers, PIPELINE.get(kind, "StableDiffusionPipeline")).from_pretrained(str(checkpoints[kind]))
    pipe.load_lora_weights(str(tmp_path / "ft" / "adapter"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    theirs = (pipe.transformer if kind in TRANSFORMER else pipe.unet).state_dict()
    plain = backend.load(info).state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], plain[k])]
    assert changed and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


# FLUX.1 in the default suite; SDXL and SD 3.x (the same code paths as SD 1.x and FLUX.1, 30 s more) in the slow one
@pytest.fixture(scope="module", params=[pytest.param("sdxl", marks=pytest.mark.slow), "flux",
                                        pytest.param("sd3", marks=pytest.mark.slow)])
def family_run(request, checkpoints, tmp_path_factory, prefect_harness):
    """The command the README gives, for a tiny checkpoint of each family."""
    from flows.cli import main

    kind = request.param
    out = tmp_path_factory.mktemp(f"{kind}-run")
    args = ["run", str(ROOT / "configs" / "sd-tiny.yaml"), "--set", "base.kind=auto",
            "--set", f"base.pretrained={checkpoints[kind]}", "--set", f"publish.output_dir={out / 'run'}",
            "--set", f"base.cache_dir={out / 'cache'}", "--set", "generation.mixed_precision=no",
            "--set", "lora.mixed_precision=no",
            # keep the tiny model's noise through the filter, so that published rows can be checked
            "--set", "filter.min_confidence=0.0", "--set", "filter.order=[memorization, near_duplicates]"]
    assert main(args) == 0
    return kind, checkpoints[kind], out / "run"


def test_each_family_runs_to_the_end_and_its_adapter_reproduces_a_row_in_the_plain_pipeline(family_run):
    import datasets
    import diffusers

    from augment.generate import load_candidates

    kind, checkpoint, run = family_run
    assert f"({kind} backend)" in (run / "report.md").read_text()
    train = datasets.load_from_disk(str(run / "dataset"))["train"]
    syn = train.filter(lambda r: r["is_synthetic"])
    assert len(syn) > 0 and all(b == str(checkpoint) for b in syn["base_model"])
    cands = load_candidates(run / "candidates")
    assert len(cands.meta) == 3 * len(train.features["label"].names)  # generation.num_per_class: 3
    assert set(cands.meta["scheduler"]) == {"flow_match_euler" if kind in TRANSFORMER else "dpmsolver++"}
    weights = load_file(str(run / "finetune" / "adapter" / "pytorch_lora_weights.safetensors"))
    prefix = "transformer." if kind in TRANSFORMER else "unet."
    assert weights and all(k.startswith(prefix) for k in weights)
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k or "lora.up" in k) > 0

    from augment.export import generate_more

    assert set(generate_more(run, train.features["label"].names[0], 1)["scheduler"]) == set(cands.meta["scheduler"])

    pipe = getattr(diffusers, PIPELINE[kind]).from_pretrained(str(checkpoint))
    pipe.load_lora_weights(str(run / "finetune" / "adapter"))
    kw = {"max_sequence_length": 32} if kind in TRANSFORMER else {}
    if kind != "flux":
        kw["negative_prompt"] = None
    if kind == "sdxl":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    for _, row in cands.meta[cands.meta["strength"] == 1.0].head(2).iterrows():
        out = pipe(row["prompt"], height=32, width=32, num_inference_steps=int(row["num_inference_steps"]),
                   guidance_scale=float(row["guidance_scale"]),
                   generator=torch.Generator().manual_seed(int(row["seed"])), output_type="np", **kw).images[0]
        diff = np.abs(cands.images[row.name].astype(int) - np.round(out * 255).astype(int))
        assert diff.max() <= 1, (kind, diff.max(), diff.mean())


def test_generation_samples_with_the_adapter_fused_and_no_lora_layers_left(family_run, tmp_path):
    kind, checkpoint, run = family_run
    backend, info = _backend(checkpoint, tmp_path)
    plain = backend.load(info).state_dict()
    tuned = backend.load(info, adapter=run / "finetune" / "adapter").state_dict()
    assert set(plain) == set(tuned)
    changed = [k for k in plain if not torch.equal(plain[k], tuned[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)


def test_export_writes_the_family_pipeline_with_the_lora_fused(family_run, tmp_path):
    import diffusers

    from augment.export import export_model

    kind, checkpoint, run = family_run
    out = export_model(run, tmp_path / "exported")
    pipe = getattr(diffusers, PIPELINE[kind]).from_pretrained(str(out))
    denoiser = pipe.transformer if kind in TRANSFORMER else pipe.unet
    backend, info = _backend(checkpoint, tmp_path)
    tuned = backend.load(info, adapter=run / "finetune" / "adapter").state_dict()
    assert all(torch.equal(denoiser.state_dict()[k], v) for k, v in tuned.items())
    assert f"{PIPELINE[kind]}.from_pretrained" in (Path(out) / "README.md").read_text()


ADAPTATIONS = ("lora", "textual_inversion", "lora+ti", "none")
ADAPTER = {"lora": "adapter", "textual_inversion": "textual_inversion/adapter", "lora+ti": "lora+ti/adapter"}


@pytest.fixture(scope="module")
def adaptations_run(checkpoints, tmp_path_factory, prefect_harness):
    """A tiny SD job that lists every adaptation: LoRA, textual inversion, both (pivotal), and the class prompts
    alone, which cycle through three templates."""
    from flows.cli import main

    out = tmp_path_factory.mktemp("adaptations")
    assert main(["run", str(ROOT / "configs" / "sd-tiny.yaml"),
                 "--set", f"base.pretrained={checkpoints['stable_diffusion']}",
                 "--set", f"publish.output_dir={out / 'run'}", "--set", f"base.cache_dir={out / 'cache'}",
                 "--set", f"lora.adaptations=[{', '.join(ADAPTATIONS)}]", "--set", "filter.min_confidence=0.0",
                 "--set", "base.prompt_templates=['a close-up photo of a {name}', 'a {name} outdoors']",
                 "--set", "filter.order=[memorization, near_duplicates]", "--set", "generation.mixed_precision=no",
                 "--set", "lora.mixed_precision=no"]) == 0
    return out / "run"


def test_the_choose_stage_compares_the_adaptations_and_the_product_takes_the_best(adaptations_run):
    import datasets
    import pandas as pd

    from augment import results
    from augment.generate import load_candidates
    from augment.results import Choice, FilterSummary

    run = adaptations_run
    cands = load_candidates(run / "candidates")
    rows = {a: cands.meta[cands.meta["adaptation"] == a] for a in ADAPTATIONS}
    for a in ADAPTATIONS[1:]:  # the same plan for each: same seeds, strengths and sources, paired
        assert len(rows[a]) == len(rows["lora"]) > 0
        for col in ("seed", "strength", "source_index", "label"):
            assert rows[a][col].tolist() == rows["lora"][col].tolist(), (a, col)
        assert not np.array_equal(cands.images[rows[a].index], cands.images[rows["lora"].index])
        assert rows[a]["sample_id"].str.startswith(f"syn-{a}-").all()
    assert rows["lora"]["sample_id"].str.match(r"syn-\d+-\d+$").all()
    templates = ["a photo of a {}", "a close-up photo of a {}", "a {} outdoors"]  # base.prompt_templates, for none
    j = rows["none"]["sample_id"].str.rsplit("-", n=1).str[1].astype(int)
    assert rows["none"]["prompt"].tolist() == [templates[i % 3].format(k) for i, k in zip(j, rows["none"]["label"])]
    assert ((rows["none"]["condition"] == rows["none"]["label"]) == (j % 3 == 0)).all()
    assert set(rows["textual_inversion"]["prompt"]) == {f"a photo of a <augment-ti-{k}>" for k in range(10)}
    assert set(rows["lora+ti"]["prompt"]) == {f"a photo of a <augment-pti-{k}>" for k in range(10)}

    choice = results.load(run / "choice" / "decision.json", Choice)
    assert choice.adaptation in ADAPTATIONS
    assert all(any(o.endswith(f"({a})") for o in choice.oof_accuracy) for a in ADAPTATIONS)
    table = pd.read_parquet(run / "filter" / "scores.parquet")
    by = {a: int(table.loc[cands.meta["adaptation"].to_numpy() == a, "kept"].sum()) for a in ADAPTATIONS}
    assert choice.samples_by_adaptation == by
    assert results.load(run / "filter" / "decisions.json", FilterSummary).kept == sum(by.values())

    # the best adaptation's kept samples, and only those, are published and trained on
    train = datasets.load_from_disk(str(run / "dataset"))["train"]
    syn = train.filter(lambda r: r["is_synthetic"])
    assert len(syn) == by[choice.adaptation] > 0
    chosen = rows[choice.adaptation]
    assert set(syn["sample_id"]) == set(chosen.loc[table["kept"].to_numpy()[chosen.index], "sample_id"])
    hashes = {a: json.loads((run / "finetune" / ADAPTER[a] / "info.json").read_text())["adapter_hash"]
              for a in ADAPTER}
    assert len(set(hashes.values())) == 3
    assert set(syn["adapter_hash"]) == {hashes.get(choice.adaptation, "")}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation"]["arms"]["real+synthetic"]["train_sizes"]["synthetic"] == by[choice.adaptation]
    assert set(metrics["run"]["adaptation_seconds"]) == {"textual_inversion", "lora+ti"}

    # `augment generate` draws from the generator the product used: the same samples from the same seeds
    from augment.export import generate_more, load_run

    row = rows[choice.adaptation][rows[choice.adaptation]["strength"] == 1.0].iloc[0]
    names = train.features["label"].names
    j = int(row["sample_id"].rsplit("-", 1)[1])
    more = generate_more(run, names[int(row["label"])], j + 1, seed=load_run(run).generation.seed)
    assert int(more["seed"].iloc[j]) == int(row["seed"]) and more["prompt"].iloc[j] == row["prompt"]
    assert np.abs(more["image"].iloc[j].astype(int) - cands.images[row.name].astype(int)).max() <= 2
    assert set(more["adapter_hash"]) == set(syn["adapter_hash"])

    report = (run / "report.md").read_text()
    assert "## How the generator was adapted" in report
    section = report.split("## How the generator was adapted")[1].split("\n## ")[0]
    assert all(f"| {a} | " in section for a in ADAPTATIONS) and "| none | 0.0 | " in section
    assert f"The best one, {choice.adaptation}," in section


@pytest.mark.parametrize("adaptation", ["textual_inversion", "lora+ti", "none"])
def test_each_adaptations_row_reproduces_in_the_plain_pipeline(adaptations_run, checkpoints, adaptation):
    """The learned tokens load with diffusers' load_textual_inversion (and the pivotal LoRA with
    load_lora_weights), and the pipeline draws the published candidate from its prompt and seed; `none`'s rows,
    from the base alone, with the template their row names."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from augment.generate import load_candidates

    run, folder = adaptations_run, adaptations_run / "finetune" / ADAPTER.get(adaptation, "")
    cands = load_candidates(run / "candidates")
    mine = cands.meta[(cands.meta["adaptation"] == adaptation) & (cands.meta["strength"] == 1.0)]
    if adaptation == "none":  # rows of the other templates
        mine = mine[mine["condition"] != mine["label"]]
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoints["stable_diffusion"]), safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    if adaptation == "lora+ti":
        pipe.load_lora_weights(str(folder))
    for k in range(10 if adaptation != "none" else 0):
        pipe.load_textual_inversion(str(folder / f"learned_embeds-{k:04d}.safetensors"))
    for _, row in mine.head(2).iterrows():
        out = pipe(row["prompt"], negative_prompt=row["negative_prompt"] or None, height=32, width=32,
                   num_inference_steps=int(row["num_inference_steps"]), guidance_scale=float(row["guidance_scale"]),
                   generator=torch.Generator().manual_seed(int(row["seed"])), output_type="np").images[0]
        diff = np.abs(cands.images[row.name].astype(int) - np.round(out * 255).astype(int))
        assert diff.max() <= 1, (adaptation, diff.max())
    if adaptation != "none":
        assert "load_textual_inversion" in (folder / "README.md").read_text()


def test_sdxl_textual_inversion_loads_per_encoder_in_the_plain_pipeline(checkpoints, tmp_path):
    """SDXL's tokens are learned in both text encoders and saved as clip_l / clip_g rows; the plain pipeline,
    loading each into its encoder, samples what augment samples."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file as load

    from augment.config import LoRAConfig
    from augment.data import ImageSet
    from augment.finetune import finetune

    backend, info = _backend(checkpoints["sdxl"], tmp_path)
    train = ImageSet(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1]),
                     ["cat", "dog"], [f"r{i}" for i in range(4)])
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=3, train_batch_size=2, ti_learning_rate=0.5)
    finetune(cfg, backend, info, train, tmp_path / "ti", adaptation="textual_inversion", log=lambda m: None)
    folder = tmp_path / "ti" / "adapter"
    rows = [load(str(folder / f"learned_embeds-{k:04d}.safetensors")) for k in range(2)]
    assert rows[0]["clip_l"].shape == (1, 32) and rows[0]["clip_g"].shape == (1, 32)
    model = backend.load(info)
    backend.use_adaptation("textual_inversion")
    gen = GenerationConfig(num_inference_steps=3, guidance_scale=3.0, mixed_precision="no")
    mine = backend.sample(model, np.array([1]), [7], gen)[0]
    backend.use_adaptation("base")
    assert not np.array_equal(mine, backend.sample(model, np.array([1]), [7], gen)[0])  # the tokens matter

    pipe = StableDiffusionXLPipeline.from_pretrained(str(checkpoints["sdxl"]))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    for k, token in enumerate(backend.ti_tokens("textual_inversion")):
        pipe.load_textual_inversion(rows[k]["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows[k]["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    prompt = backend.adaptation_prompts("textual_inversion")[1][0]
    out = pipe(prompt, negative_prompt=None, height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.abs(mine.astype(int) - np.round(out * 255).astype(int)).max() <= 1


def test_textual_inversion_is_refused_for_the_t5_families_before_any_stage(checkpoints, tmp_path, capsys):
    from flows.cli import main

    args = ["run", str(ROOT / "configs" / "sd-tiny.yaml"), "--set", f"base.pretrained={checkpoints['flux']}",
            "--set", "base.kind=auto", "--set", "lora.adaptations=[lora, lora+ti]",
            "--set", f"base.cache_dir={tmp_path / 'c'}", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.adaptations lists lora+ti" in err[0] and "flux" in err[0], err
    assert not (tmp_path / "out").exists()


def test_vae_calls_are_sized_by_free_gpu_memory():
    """A full-size VAE takes about 0.65 GB per 512 px image to encode and 1.1 GB to decode (fp32): a GPU with 8 GB
    free encodes 9 at a time at 512 px and 2 at 1024 px, decodes 1 at 1024 px even with less than that free; the
    CPU uses the fixed batch."""
    from augment.backends.memory import ENCODE_BATCH, vae_batch

    assert vae_batch(None, 1024, "decode") == ENCODE_BATCH
    assert vae_batch(8 * 10**9, 512, "encode") == 9 and vae_batch(8 * 10**9, 1024, "encode") == 2
    assert vae_batch(10**9, 1024, "decode") == 1 and vae_batch(10**12, 64, "decode") == ENCODE_BATCH


def test_gradient_checkpointing_auto_turns_on_when_a_probe_step_does_not_fit(monkeypatch):
    """base.gradient_checkpointing `auto` on a GPU: a probe step that runs out of memory, or peaks above 90% of the
    GPU's memory, turns it on; one that fits leaves it off (the GPU is faked: this machine has none)."""
    from types import SimpleNamespace

    from augment.finetune import needs_checkpointing

    peak = {"bytes": 0}
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=100))

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert needs_checkpointing(out_of_memory, "cuda:0")
    peak["bytes"] = 95
    assert needs_checkpointing(lambda: None, "cuda:0")
    peak["bytes"] = 60
    assert not needs_checkpointing(lambda: None, "cuda:0")


def test_channels_last_samples_what_the_default_layout_samples(checkpoints, tmp_path):
    """base.channels_last: the same samples (up to float rounding) from a denoiser and VAE in channels_last."""
    gen = GenerationConfig(num_inference_steps=3, guidance_scale=3.0, mixed_precision="no")
    images = []
    for last in (False, True):
        backend, info = _backend(checkpoints["stable_diffusion"], tmp_path / str(last), channels_last=last)
        model = backend.load(info)
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == last
        images.append(backend.sample(model, np.array([0, 1]), [3, 4], gen).astype(int))
    assert np.abs(images[0] - images[1]).max() <= 1


@pytest.mark.slow
def test_a_compiled_denoiser_generates_what_the_eager_one_generates(checkpoints, tmp_path):
    """base.compile: generation samples with torch.compile's denoiser, the same images up to float rounding."""
    gen = GenerationConfig(num_inference_steps=2, guidance_scale=3.0, mixed_precision="no")
    images = []
    for compiled in (False, True):
        backend, info = _backend(checkpoints["stable_diffusion"], tmp_path / str(compiled), compile=compiled)
        model = backend.for_sampling(backend.load(info))
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        images.append(backend.sample(model, np.array([0, 1]), [3, 4], gen).astype(int))
    assert np.abs(images[0] - images[1]).max() <= 1
