import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from augment import backends
from augment.backends import pixel_unet as models
from augment.config import BaseModelConfig, ClassifierConfig, DataConfig, GenerationConfig, LoRAConfig
from augment.data import load_images, split
from augment.diffusion import training
from augment.errors import ModelError
from augment.finetune import finetune
from augment.generate import generate, load_candidates, per_class_counts, plan
from conftest import crash_at

CPU = torch.device("cpu")
TINY_BASE = dict(block_out_channels=[8, 16], attention_levels=[False, True], norm_num_groups=4,
                 pretrain_batch_size=8)


@pytest.fixture(scope="module")
def splits():
    cfg = DataConfig(shots_per_class=3, max_pool_size=60, test_fraction=0.2, val_fraction=0.05)
    return split(load_images(cfg), cfg)


def _tiny_unconditional(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(tmp_path / "ckpt" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "ckpt" / "scheduler")
    return unet


def test_pretrained_checkpoint_gets_a_neutral_class_embedding(tmp_path):
    unet = _tiny_unconditional(tmp_path)
    cfg = BaseModelConfig(pretrained=str(tmp_path / "ckpt"))
    backend = backends.create(cfg, ["a", "b", "c"], 8, 1, CPU)
    assert backend.kind == "pixel"
    info = backend.prepare(None, None)
    cond = backend.load(info)
    scheduler = backend.scheduler
    assert cond.class_embedding.num_embeddings == 4 and scheduler.config.num_train_timesteps == 100
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 90, 10])
    with torch.no_grad():
        ref = unet(x, t).sample
        out = cond(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample
    assert torch.allclose(ref, out, atol=1e-5)  # zero rows: starts out as the unconditional model


def test_bad_checkpoints_are_explained(tmp_path):
    _tiny_unconditional(tmp_path)
    info = models.prepare_base(BaseModelConfig(pretrained=str(tmp_path / "ckpt")), None, None, CPU)
    with pytest.raises(ModelError, match="1-channel 8px.*3-channel 8px"):
        models.load_base(info, 3, 8, 3)
    info = models.prepare_base(BaseModelConfig(pretrained=str(tmp_path / "nothing")), None, None, CPU)
    with pytest.raises(ModelError, match="cannot load a UNet2DModel"):
        models.load_base(info, 3, 8, 1)


def test_builtin_pretraining_is_cached_and_resumes_identically(tmp_path, splits, monkeypatch):
    cfg = BaseModelConfig(**TINY_BASE, pretrain_steps=6, cache_dir=str(tmp_path / "a"))
    full = models.prepare_base(cfg, splits.train, splits.pool, CPU, log=lambda m: None)
    again = models.prepare_base(cfg, splits.train, splits.pool, CPU, log=lambda m: None)
    assert again.path == full.path and again.fingerprint == full.fingerprint
    # Interrupted after a checkpoint at step 4, then resumed, must give the same weights.
    real_pretrain = models.pretrain
    real_loss = training.diffusion_loss
    monkeypatch.setattr(models, "diffusion_loss", crash_at(5, real_loss))
    monkeypatch.setattr(models, "pretrain", lambda *a, **k: real_pretrain(*a, **{**k, "checkpoint_every": 4}))
    cfg_b = cfg.model_copy(update={"cache_dir": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        models.prepare_base(cfg_b, splits.train, splits.pool, CPU, log=lambda m: None)
    monkeypatch.setattr(models, "diffusion_loss", real_loss)
    resumed = models.prepare_base(cfg_b, splits.train, splits.pool, CPU, log=lambda m: None)
    a = UNet2DModel.from_pretrained(full.path, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed.path, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, splits):
    cfg = BaseModelConfig(**TINY_BASE, pretrain_steps=10, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return backends.create(cfg, splits.class_names, 8, 1, CPU)


@pytest.fixture(scope="module")
def base(backend, splits):
    return backend.prepare(splits.train, splits.pool, log=lambda m: None)


def test_lora_finetune_saves_adapter_and_resumes_identically(tmp_path, splits, backend, base, monkeypatch):
    import augment.backends.common as finetune_mod  # where the fine-tuning loss is called

    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=6, train_batch_size=4, checkpointing_steps=3)
    full = finetune(cfg, backend, base, splits.train, tmp_path / "full", log=lambda m: None)
    files = {p.name for p in (tmp_path / "full" / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json"} <= files
    real_loss = finetune_mod.diffusion_loss
    monkeypatch.setattr(finetune_mod, "diffusion_loss", crash_at(5, real_loss))
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, backend, base, splits.train, tmp_path / "resumed", log=lambda m: None)
    assert (tmp_path / "resumed" / "finetune-checkpoint" / "state.pt").exists()
    assert not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(finetune_mod, "diffusion_loss", real_loss)
    resumed = finetune(cfg, backend, base, splits.train, tmp_path / "resumed", log=lambda m: None)
    assert resumed.adapter_hash == full.adapter_hash


def test_generation_is_reproducible_per_sample_and_per_shard(tmp_path, splits, backend, base):
    lcfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=2, train_batch_size=4)
    adapter = finetune(lcfg, backend, base, splits.train, tmp_path, log=lambda m: None)
    unet = backend.load(base, adapter=adapter.path)
    gcfg = GenerationConfig(num_per_class=3, num_inference_steps=3, strengths=[0.5, 1.0], shard_size=7,
                            batch_size=4, guidance_scale=2.0)
    out = generate(gcfg, backend, unet, splits.train, tmp_path / "cands", log=lambda m: None)
    first = load_candidates(out)
    assert len(first) == 30 and set(first.meta["strength"]) == {0.5, 1.0}
    assert (first.meta.loc[first.meta["strength"] < 1, "source_index"] >= 0).all()
    (out / "shard-00001.npz").unlink()  # a shard lost with a killed run is regenerated exactly
    generate(gcfg, backend, unet, splits.train, out, log=lambda m: None)
    assert np.array_equal(load_candidates(out).images, first.images)
    # A shard left by another plan (another generation seed: two runs sharing a folder) is regenerated, not mixed in.
    other = generate(gcfg.model_copy(update={"seed": 5}), backend, unet, splits.train, tmp_path / "other",
                     log=lambda m: None)
    (out / "shard-00002.npz").write_bytes((other / "shard-00002.npz").read_bytes())
    generate(gcfg, backend, unet, splits.train, out, log=lambda m: None)
    assert np.array_equal(load_candidates(out).images, first.images)
    # A single sample, regenerated alone from its seed, matches its batched original.
    row = first.meta[first.meta["strength"] == 1.0].iloc[0]
    alone = backend.sample(unet, np.array([row["label"]]), [row["seed"]], gcfg)
    assert np.abs(alone[0].astype(int) - first.images[row.name].astype(int)).max() <= 1


def test_generation_samples_on_one_thread_in_any_process(tmp_path, splits, backend, base, monkeypatch):
    """Reductions split over threads round differently (with AVX2 kernels a pixel in ~2,000 differed between a
    1- and a 2-thread process): a shard samples on one thread wherever it runs, and the process keeps its count."""
    torch = pytest.importorskip("torch")
    unet = backend.load(base)
    seen, real = [], backend.sample

    def sample(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(backend, "sample", sample)
    gcfg = GenerationConfig(num_per_class=1, num_inference_steps=2, shard_size=4, batch_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate(gcfg, backend, unet, splits.train, tmp_path / "cands", log=lambda m: None)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_plan_counts_and_balance(splits):
    assert per_class_counts(GenerationConfig(balance="max", num_per_class=None), [3, 5, 1]) == [2, 0, 4]
    assert per_class_counts(GenerationConfig(balance="target", balance_target=4), [3, 5, 1]) == [1, 0, 3]
    a = plan(GenerationConfig(num_per_class=4, strengths=[0.25, 1.0]), splits.train)
    b = plan(GenerationConfig(num_per_class=4, strengths=[0.25, 1.0]), splits.train)
    assert a.equals(b) and a["seed"].is_unique
    assert a["label"].iloc[:10].tolist() == list(range(10))  # classes interleaved across shards


def _planted_checkpoint(path, target):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": 3, "payload": Evil()}))


def test_a_planted_checkpoint_never_runs_code_and_training_starts_over(tmp_path, splits, backend, base):
    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=4, train_batch_size=4, checkpointing_steps=2)
    clean = finetune(cfg, backend, base, splits.train, tmp_path / "clean", log=lambda m: None)
    pwned = tmp_path / "pwned"
    _planted_checkpoint(tmp_path / "run" / "finetune-checkpoint" / "state.pt", pwned)
    said = []
    info = finetune(cfg, backend, base, splits.train, tmp_path / "run", log=said.append)
    assert not pwned.exists()
    assert any("ignoring checkpoint" in m for m in said)
    assert info.adapter_hash == clean.adapter_hash  # started over: the same adapter as an untouched run


def test_resume_state_past_warmup_loads_with_weights_only(tmp_path):
    """The LR schedule's state after warmup held a numpy scalar: the checkpoint then failed weights_only loading
    and every resume silently started over."""
    from augment.diffusion import lr_lambda
    from augment.runfolder import load_state

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(20, 2))
    for _ in range(6):
        opt.step(); sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": 6,
                "rng": np.random.default_rng(0).bit_generator.state}, tmp_path / "state.pt")
    said = []
    state = load_state(tmp_path / "state.pt", log=said.append)
    assert state is not None and state["step"] == 6, said


def test_stochastic_ddim_draws_step_noise_from_each_samples_own_generator(tmp_path, splits, backend, base):
    unet = backend.load(base)
    cfg = GenerationConfig(scheduler="ddim", eta=1.0, num_inference_steps=4, guidance_scale=2.0)
    batch = backend.sample(unet, np.array([0, 1, 2]), [11, 12, 13], cfg)
    alone = backend.sample(unet, np.array([1]), [12], cfg)
    assert np.abs(alone[0].astype(int) - batch[1].astype(int)).max() <= 1
    still = backend.sample(unet, np.array([0, 1, 2]), [11, 12, 13], cfg.model_copy(update={"eta": 0.0}))
    assert not np.array_equal(still, batch)  # the step noise is really there
    with pytest.raises(ValueError, match="needs generation.scheduler: ddim"):
        GenerationConfig(eta=0.5)


def test_ddim_does_not_clip_the_guided_prediction(backend, base):
    """The builtin base's DDPM config says clip_sample; DDIM inherited it and clipping the guided x_0 prediction
    derailed sampling (3% class consistency at guidance 4 on digits)."""
    from augment.diffusion import make_sampler

    backend.load(base)
    assert backend.scheduler.config.clip_sample is True  # what the sampler inherits from
    assert make_sampler(backend.scheduler, "ddim").config.clip_sample is False


def test_ema_forgets_the_random_initialization():
    """With a constant decay of 0.999 the average still held 22% of the random init after 1,500 steps; with
    diffusers' warmup (decay min(0.999, (1 + t) / (10 + t))) the init's weight is gone within the first steps."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = training.EMA([p], 0.999)  # shadow starts at the init, 0
    with torch.no_grad():
        p.fill_(1.0)
    for step in range(1, 1501):
        ema.update(step)
    init_weight = 1.0 - ema.shadow[0][0].item()  # what is left of the init (0) in an average of ones
    assert init_weight < 1e-3, init_weight
    # a constant decay would have left 0.999 ** 1500 = 22% of it
    ema.copy_to()
    assert torch.allclose(p, torch.ones(3)) and p.requires_grad


@pytest.mark.parametrize("size, widths, attention", [
    (8, [32, 64], [False, True]), (16, [16, 32, 64], [False, False, True]),
    (28, [16, 32, 64], [False, False, True]), (32, [16, 16, 32, 64], [False, False, False, True]),
])
def test_auto_unet_layout_adds_a_narrow_level_per_halving(size, widths, attention):
    cfg = BaseModelConfig()
    assert models.unet_layout(cfg, size) == (widths, attention)
    unet = models.build_unet(cfg, size, 1, 1)  # builds, and maps an image to its own shape
    with torch.no_grad():
        assert unet(torch.zeros(1, 1, size, size), 10, class_labels=torch.zeros(1, dtype=torch.long)).sample.shape \
            == (1, 1, size, size)
    explicit = BaseModelConfig(block_out_channels=[8, 16], norm_num_groups=4)
    assert models.unet_layout(explicit, size) == ([8, 16], [False, True])


def test_feedback_guided_sampling_is_reproducible_and_differs_from_plain(splits, backend, base):
    from augment.classifier import train_classifier

    unet = backend.load(base)
    K = len(splits.class_names)
    clf = train_classifier(ClassifierConfig(steps=5, width=8),
                           splits.train.images, splits.train.labels, K, 0).model
    for p in clf.parameters():
        p.requires_grad_(False)
        p.grad = None
    clf.head.weight *= 30  # as confident as a trained classifier
    labels, seeds = np.arange(4) % K, [11, 12, 13, 14]
    plain_cfg = GenerationConfig(num_inference_steps=3, guidance_scale=2.0)
    fb_cfg = plain_cfg.model_copy(update={"feedback_scale": 20.0})
    plain = backend.sample(unet, labels, seeds, plain_cfg)
    assert np.array_equal(backend.sample(unet, labels, seeds, plain_cfg.model_copy(update={"feedback_scale": 0.0}),
                                         feedback=clf), plain)
    guided = backend.sample(unet, labels, seeds, fb_cfg, feedback=clf)
    assert np.array_equal(backend.sample(unet, labels, seeds, fb_cfg, feedback=clf), guided)
    # In model space (this barely trained base saturates most uint8 pixels either way) the samples move.
    from augment.diffusion import classifier_free, feedback_guided, sample

    def draw(guide):
        return sample(lambda x_t, t, y: backend.denoise(unet, x_t, t, y), backend.scheduler,
                      torch.tensor(labels), seeds, backend.null_label, backend.latent_shape, num_inference_steps=3,
                      guide=guide)

    plain_x = draw(classifier_free(2.0))
    guided_x = draw(feedback_guided(classifier_free(2.0), clf, 20.0, "entropy", backend.scheduler.alphas_cumprod))
    assert (guided_x - plain_x).abs().max() > 0.05
    assert not any(p.grad is not None for p in clf.parameters())


def test_feedback_guidance_is_refused_for_latent_backends(tiny_cfg, monkeypatch):
    from augment import backends, pipeline
    from augment.config import ConfigError

    monkeypatch.setattr(backends, "check_base", lambda cfg: "stable_diffusion")
    cfg = tiny_cfg.model_copy(update={"generation": tiny_cfg.generation.model_copy(update={"feedback_scale": 1.0})})
    with pytest.raises(ConfigError, match="needs the pixel backend"):
        pipeline.preflight(cfg)


@pytest.mark.parametrize("image_size", [None, 16, 4])
def test_the_feedback_classifier_reads_model_space_images_and_passes_gradients(splits, monkeypatch, image_size):
    """It trains on the recipe's images (here: the pseudo-labeled pool is in the recipe) and takes [-1, 1] images
    at the data's size, resized inside the module when the classifier works at another size."""
    from augment.config import RunConfig
    from augment.data import ImageSet
    from augment.results import Choice, Selection
    from augment.stages import generator

    seen = {}
    pool = ImageSet(splits.pool.images[:6], np.arange(6) % len(splits.class_names), splits.class_names)
    picked = Selection(recipe=Choice(chosen="real"), pseudo=Choice(chosen="real+pseudo"))
    monkeypatch.setattr(generator, "load_selection", lambda cfg: picked)
    monkeypatch.setattr(generator, "load_pseudo", lambda cfg, s: (pool, None))
    import augment.classifier as classifier

    original = classifier.train_classifier

    def spy(cfg, images, labels, *a, **k):
        seen.update(n=len(images), augment=k.get("augment"))
        return original(cfg, images, labels, *a, **k)

    monkeypatch.setattr(classifier, "train_classifier", spy)
    cfg = RunConfig.model_validate({"generation": {"feedback_scale": 1.0},
                                    "pseudo": {"classifier": {"steps": 3, "width": 8, "image_size": image_size}}})
    assert generator.feedback_classifier(cfg.model_copy(update={"generation": GenerationConfig()}), splits) is None
    net = generator.feedback_classifier(cfg, splits)
    assert seen == {"n": len(splits.train) + 6, "augment": False}
    x = torch.zeros(3, 1, 8, 8, requires_grad=True)
    logits = net(x)
    assert logits.shape == (3, len(splits.class_names))
    logits.sum().backward()
    assert x.grad is not None and not any(p.requires_grad for p in net.parameters())


def test_a_pixel_dora_adapter_trains_saves_and_samples(tmp_path, splits, backend, base):
    """lora.use_dora on the pixel backend: magnitude vectors train, save in peft's format and load back."""
    from safetensors.torch import load_file

    cfg = LoRAConfig(rank=2, lora_alpha=2, max_train_steps=3, train_batch_size=4, use_dora=True)
    finetune(cfg, backend, base, splits.train, tmp_path / "dora", log=lambda m: None)
    weights = load_file(str(tmp_path / "dora" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in weights)
    tuned = backend.load(base, adapter=tmp_path / "dora" / "adapter")
    plain = backend.load(base)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), plain.state_dict().values()))
