"""The Stable Diffusion backend, offline: a tiny random SD checkpoint written by the test (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel and a CLIPTokenizer from a vocabulary written here), one test per protocol method,
the whole flow on a few RGB images, and the adapter loaded by a plain diffusers pipeline."""

from pathlib import Path

import numpy as np
import pytest
import torch

from augment import backends
from augment.backends.stable_diffusion import write_tiny_checkpoint
from augment.config import BaseModelConfig, GenerationConfig, LoRAConfig
from augment.configfile import load_config
from augment.errors import ModelError
from safetensors.torch import load_file
from conftest import ROOT, crash_at, write_imagefolder

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "red_fox"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def backend(checkpoint, tmp_path_factory):
    cfg = BaseModelConfig(pretrained=str(checkpoint), cache_dir=str(tmp_path_factory.mktemp("cache")),
                          class_prompts={"dog": "a photo of a good dog"}, negative_prompt="blurry")
    return backends.create(cfg, CLASSES, 32, 3, CPU)


@pytest.fixture(scope="module")
def info(backend):
    return backend.prepare(None, None, log=lambda m: None)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_auto_detects_stable_diffusion_from_model_index(checkpoint, tmp_path):
    assert backends.detect_kind(BaseModelConfig(pretrained=str(checkpoint))) == "stable_diffusion"
    assert backends.detect_kind(BaseModelConfig()) == "pixel"
    with pytest.raises(ValueError, match="needs base.pretrained"):
        BaseModelConfig(kind="stable_diffusion")
    with pytest.raises(ModelError, match="data.channels: 3"):
        backends.create(BaseModelConfig(pretrained=str(checkpoint)), CLASSES, 32, 1, CPU)


def test_prepare_fingerprints_the_checkpoint_and_refuses_a_folder_that_is_not_one(backend, info, tmp_path):
    assert info.kind == "stable_diffusion" and info.reference == info.path
    assert backend.prepare(None, None, log=lambda m: None).fingerprint == info.fingerprint
    (tmp_path / "empty").mkdir()
    bad = backends.create(BaseModelConfig(kind="stable_diffusion", pretrained=str(tmp_path / "empty")), CLASSES,
                          32, 3, CPU)
    with pytest.raises(ModelError, match="no model_index.json"):
        bad.prepare(None, None)


def test_load_gives_the_unet_and_the_latent_shape(backend, info):
    unet = backend.load(info)
    assert backend.latent_shape == (4, 16, 16)
    assert backend.embeddings.shape[0] == len(CLASSES) + 2  # class prompts, "" and the negative prompt
    assert backend.scheduler.config.num_train_timesteps == 1000
    assert unet.config.cross_attention_dim == 32


def test_encode_decode_are_the_vae(backend, info):
    backend.load(info)
    images = _images(3)
    z = backend.encode(images)
    assert z.shape == (3, 4, 16, 16)
    out = backend.decode(z)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    cached = backend.encode_dataset(images)
    assert torch.allclose(cached, z) and len(list(Path(backend.cfg.cache_dir).rglob("*.safetensors"))) == 1
    assert torch.allclose(backend.encode_dataset(images), z)  # read back from the cache


def test_prompts_come_from_the_template_and_the_overrides(backend):
    assert backend.prompt(0) == ("a photo of a cat", "blurry")
    assert backend.prompt(1)[0] == "a photo of a good dog"
    assert backend.prompt(2)[0] == "a photo of a red fox"
    assert backend.uncond_label == len(CLASSES) + 1  # guidance steers away from the negative prompt


def test_denoise_conditions_on_the_class_prompt(backend, info):
    unet = backend.load(info)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        a = backend.denoise(unet, x, t, torch.tensor([0, 0]))
        b = backend.denoise(unet, x, t, torch.tensor([1, 1]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_lora_goes_on_the_attention_projections_and_saves_in_diffusers_format(backend, info, tmp_path):
    unet = backend.load(info)
    model, groups = backend.add_lora(unet, LoRAConfig(rank=2, lora_alpha=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} <= {"to_q", "to_k", "to_v", "0"}
    assert sum(len(g["params"]) for g in groups) == len(names)
    weights = backend.save_adapter(model, tmp_path / "adapter")
    assert weights.name == "pytorch_lora_weights.safetensors" and weights.exists()
    with pytest.raises(ModelError, match="matched no module"):
        backend.add_lora(backend.load(info), LoRAConfig(target_modules=["nothing_here"]))


def test_sample_is_per_seed_and_image_to_image_starts_from_the_source(backend, info):
    unet = backend.load(info)
    cfg = GenerationConfig(num_inference_steps=2, guidance_scale=2.0)
    a = backend.sample(unet, np.array([0, 1]), [7, 8], cfg)
    b = backend.sample(unet, np.array([1]), [8], cfg)
    assert a.shape == (2, 32, 32, 3) and np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1
    src = _images(1, seed=3)
    low = backend.sample(unet, np.array([0]), [7], cfg, strength=0.3, init_images=src)
    assert not np.array_equal(low, a[:1])


def test_finetune_with_gradient_checkpointing_and_bf16_resumes_identically(backend, info, tmp_path, monkeypatch):
    import augment.backends.common as finetune_mod  # where the fine-tuning loss is called
    from augment.data import ImageSet
    from augment.finetune import finetune

    train = ImageSet(_images(6, seed=1), np.array([0, 1, 2, 0, 1, 2]), CLASSES, [f"r{i}" for i in range(6)])
    backend.cfg = backend.cfg.model_copy(update={"gradient_checkpointing": True})
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=4, train_batch_size=2, checkpointing_steps=2,
                     mixed_precision="bf16", augment_flip=True)
    full = finetune(cfg, backend, info, train, tmp_path / "full", log=lambda m: None)
    assert full.steps == 4 and np.isfinite(full.final_loss)
    real_loss = finetune_mod.diffusion_loss
    monkeypatch.setattr(finetune_mod, "diffusion_loss", crash_at(3, real_loss))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, backend, info, train, tmp_path / "resumed", log=lambda m: None)
    monkeypatch.setattr(finetune_mod, "diffusion_loss", real_loss)
    said = []
    finetune(cfg, backend, info, train, tmp_path / "resumed", log=said.append)
    assert "finetune: resumed at step 2" in said
    # Equal up to float rounding: CPU kernels round differently with buffer alignment, so bit equality across
    # processes and allocations is not promised here; a lost optimizer or RNG state would differ by far more.
    a, b = (load_file(str(tmp_path / d / "adapter" / "pytorch_lora_weights.safetensors")) for d in ("full", "resumed"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    finetune(cfg.model_copy(update={"seed": 1}), backend, info, train, tmp_path / "other", log=lambda m: None)
    c = load_file(str(tmp_path / "other" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


@pytest.fixture(scope="module")
def sd_run(checkpoint, tmp_path_factory, prefect_harness):
    from flows.augment_flow import augment_flow

    tmp = tmp_path_factory.mktemp("sdflow")
    data = write_imagefolder(tmp / "photos", classes=("cat", "dog", "fox"), per_class=10, size=32)
    cfg = load_config(ROOT / "configs" / "sd-tiny.yaml", [
        f"base.pretrained={checkpoint}", f"data.source={data}", f"publish.output_dir={tmp / 'run'}",
        f"base.cache_dir={tmp / 'cache'}", "filter.min_confidence=0.0",
        "filter.order=[memorization, near_duplicates]",
    ])
    metrics = augment_flow(config=cfg)
    return cfg, metrics, Path(cfg.publish.output_dir)


def test_the_whole_flow_runs_on_the_stable_diffusion_backend(sd_run):
    import datasets

    cfg, metrics, run = sd_run
    for name in ("report.html", "report.md", "metrics.json", "finetune/adapter/pytorch_lora_weights.safetensors"):
        assert (run / name).exists(), name
    train = datasets.load_from_disk(str(run / "dataset"))["train"]
    syn = train.filter(lambda r: r["is_synthetic"])
    assert len(syn) == metrics.generation.kept > 0
    assert syn[0]["image"].size == (32, 32) and syn[0]["image"].mode == "RGB"
    names = train.features["label"].names
    assert all(p == f"a photo of a {names[k]}" for p, k in zip(syn["prompt"], syn["label"]))
    assert all(b == str(cfg.base.pretrained) for b in syn["base_model"])
    assert set(train.filter(lambda r: not r["is_synthetic"])["prompt"]) == {""}


def test_the_adapter_loads_in_a_plain_diffusers_pipeline_and_reproduces_a_sample(sd_run, checkpoint):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from augment.generate import load_candidates

    cfg, _, run = sd_run
    cands = load_candidates(run / "candidates")
    row = cands.meta[cands.meta["strength"] == 1.0].iloc[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None)
    pipe.load_lora_weights(str(run / "finetune" / "adapter"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    out = pipe(row["prompt"], negative_prompt=row["negative_prompt"] or None, height=32, width=32,
               num_inference_steps=int(row["num_inference_steps"]), guidance_scale=float(row["guidance_scale"]),
               generator=torch.Generator().manual_seed(int(row["seed"])), output_type="np").images[0]
    mine = cands.images[row.name].astype(int)
    theirs = np.round(out * 255).astype(int)
    diff = np.abs(mine - theirs)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    # the file holds a trained update (LoRA's B factors start at zero)
    weights = load_file(str(run / "finetune" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora.up.weight") or "lora_B" in k for k in weights)
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora.up" in k or "lora_B" in k) > 0
    # and generation samples with the update fused into the UNet's weights
    backend = backends.create(cfg.base, ["0", "1", "2"], 32, 3, CPU)
    base = backend.prepare(None, None, log=lambda m: None)
    plain, tuned = backend.load(base).state_dict(), backend.load(base, adapter=run / "finetune" / "adapter").state_dict()
    assert set(plain) == set(tuned)  # no LoRA layers left behind
    changed = [k for k in plain if not torch.equal(plain[k], tuned[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)


def test_export_writes_a_pipeline_with_the_lora_fused(sd_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from augment.export import export_model

    cfg, _, run = sd_run
    out = export_model(run, tmp_path / "exported")
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    backend = backends.create(cfg.base, ["cat", "dog", "fox"], 32, 3, CPU)
    tuned = backend.load(backend.prepare(None, None, log=lambda m: None), adapter=run / "finetune" / "adapter")
    a, b = pipe.unet.state_dict(), tuned.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "StableDiffusionPipeline.from_pretrained" in (out / "README.md").read_text()
