"""Class-conditional LoRA fine-tuning of the base model on the labeled train split, for every backend.

The backend says which modules get LoRA, moves the images into model space (once: pixels, or cached VAE latents)
and turns class indices into conditioning; the loop itself (checkpoint, resume, EMA, LR schedule) is
augment.diffusion.train_loop. Labels are dropped to the null class with probability `label_dropout` so that the
same model serves the unconditional half of classifier-free guidance. The adapter is saved in the backend's
portable format, with the config that made it and the ids of the images it learned from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from augment import results
from augment.backends import Backend, BaseModelInfo
from augment.config import LoRAConfig
from augment.data import ImageSet
from augment.diffusion import LoopSpec, train_loop
from augment.results import AdapterInfo
from augment.runfolder import AdapterFolder, FinetuneFolder


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def files_hash(paths: list[Path]) -> str:
    """The adapter's identity: its weights file's hash (file_hash), or of several files (textual inversion's, one
    per class) their contents in order."""
    if len(paths) == 1:
        return file_hash(paths[0])
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def needs_checkpointing(step, device, peak_share: float = 0.9) -> bool:
    """base.gradient_checkpointing `auto` on a GPU: run one training `step` (forward and backward) without it; True
    when it runs out of memory or its peak passes `peak_share` of the GPU's memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return True
    peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    return peak > peak_share * total


def adapter_damage(adapter: AdapterFolder) -> str | None:
    """What of a finished adapter no longer reads (None when it is whole): the weights must still hash to the
    recorded adapter_hash, and every safetensors file in it (the pixel backend's base copy too) must load."""
    from safetensors import SafetensorError, safe_open

    info = results.load(adapter.info, AdapterInfo)
    if info is None:
        return f"{adapter.info} is missing or unreadable"
    if not any(file_hash(p) == info.adapter_hash for p in adapter.path.glob("*.safetensors")):
        return f"the adapter's weights in {adapter.path} changed since training (hash {info.adapter_hash})"
    for path in sorted(adapter.path.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            return f"{path} cannot be read ({err})"
    return None


def finetune(
    cfg: LoRAConfig,
    backend: Backend,
    base: BaseModelInfo,
    train: ImageSet,
    output_dir: str | Path,
    run_config: dict | None = None,
    log=print,
    pseudo: ImageSet | None = None,
    progress=None,
    adaptation: str = "lora",
) -> AdapterInfo:
    """Fine-tune on the labeled `train` images, plus `pseudo` (pseudo-labeled pool images) when given and
    `cfg.use_pseudo_labeled`: then each batch draws a `cfg.labeled_share` share from the labeled images.
    `adaptation` (lora.adaptations): `lora`, `textual_inversion` (a token per class learned in the text encoders,
    the denoiser frozen) or `lora+ti` (both, trained together)."""
    out = FinetuneFolder(output_dir)
    final = out.adapter.path
    if out.adapter.info.exists():
        log(f"finetune: reusing adapter {final}")
        return results.load(out.adapter.info, AdapterInfo)

    # 1. The base, wrapped with LoRA on the backend's targets, and/or new class tokens in its text encoders.
    K, n, device = len(train.class_names), len(train), backend.device
    unet = backend.load(base)
    torch.manual_seed(cfg.seed)
    lora, ti = adaptation in ("lora", "lora+ti"), adaptation in ("textual_inversion", "lora+ti")
    if lora:
        model, groups = backend.add_lora(unet, cfg)
    else:
        model, groups = unet.requires_grad_(False), []
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if ti:
        rows = backend.add_ti(adaptation)
        groups.append({"params": rows, "lr": cfg.ti_learning_rate, "weight_decay": 0.0})
        params += rows
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)

    # 2. The training images in model space, once (flipped copies too when flips are on).
    use_pseudo = pseudo is not None and len(pseudo) > 0 and cfg.use_pseudo_labeled
    seen = train if not use_pseudo else ImageSet(np.concatenate([train.images, pseudo.images]),
                                                 np.concatenate([train.labels, pseudo.labels]),
                                                 train.class_names, train.ids + pseudo.ids)
    with torch.no_grad():
        x_all = backend.encode_dataset(seen.images)
        x_flip = backend.encode_dataset(seen.images[:, :, ::-1]) if cfg.augment_flip else None
    y_all = torch.from_numpy(seen.labels).to(device)
    n_pseudo = len(seen) - n

    def step_loss(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        idx = rng.integers(0, n, cfg.train_batch_size)
        if n_pseudo:  # labeled images weighted up: a labeled_share of the batch, the rest pseudo-labeled
            from_pseudo = rng.random(cfg.train_batch_size) >= cfg.labeled_share
            idx = np.where(from_pseudo, n + rng.integers(0, n_pseudo, cfg.train_batch_size), idx)
        idx = torch.from_numpy(idx)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.from_numpy(rng.random(len(idx)) < cfg.label_dropout).to(device)] = backend.null_label
        if x_flip is not None:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x_flip[idx], x0)
        return backend.loss(model, x0, y, gen, cfg.snr_gamma)

    # 3. Train (resumes from finetune-checkpoint/ after a crash).
    t0 = time.time()
    model.train()
    if getattr(backend.cfg, "gradient_checkpointing", False) == "auto" and device.type == "cuda":
        probe = (np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed))  # not the loop's streams
        if needs_checkpointing(lambda: step_loss(*probe).backward(), device):
            log("finetune: gradient checkpointing on (a step without it does not fit this GPU)")
            model.enable_gradient_checkpointing()
        opt.zero_grad(set_to_none=True)
    spec = LoopSpec("finetune", cfg.max_train_steps, min(50, cfg.max_train_steps // 10 + 1), cfg.seed,
                    cfg.checkpointing_steps, ema_decay=cfg.ema_decay,
                    mixed_precision=backend.precision(cfg.mixed_precision),
                    loss_scaling=getattr(backend, "dtype", torch.float32) == torch.float16)
    ckpt_dir = out.checkpoint
    steps, final_loss = train_loop(params, opt, step_loss, spec, ckpt_dir, device, log=log, progress=progress)

    # 4. Save the adapter atomically, with the config that made it.
    tmp = out.adapter_tmp.path
    shutil.rmtree(tmp, ignore_errors=True)
    weights = [backend.save_adapter(model, tmp, final=final)] if lora else []
    if ti:
        weights += backend.finish_ti(adaptation, tmp)
        (tmp / "README.md").write_text(backend.ti_card(adaptation, with_lora=lora))
    prompts = backend.adaptation_prompts(adaptation) if ti else [backend.prompt(k) for k in range(K)]
    out.adapter_tmp.training_config.write_text(json.dumps(
        {"lora": cfg.model_dump(mode="json"), "base": base.to_json(), "backend": backend.kind, "num_classes": K,
         "adaptation": adaptation, "class_names": train.class_names, "prompts": prompts,
         "run_config": run_config,
         # provenance: exactly which images the generator learned from
         "trained_on": {"labeled_ids": train.ids, "pseudo_labeled_ids": seen.ids[n:],
                        "pseudo_labels": seen.labels[n:].tolist(), "labeled_share": cfg.labeled_share if n_pseudo
                        else 1.0}}, indent=2))
    info = AdapterInfo(path=str(final), adapter_hash=files_hash(weights), train_seconds=time.time() - t0,
                       final_loss=final_loss, steps=steps, labeled_images=n, pseudo_labeled_images=n_pseudo)
    results.save(out.adapter_tmp.info, info)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return info
