"""Class-conditional LoRA fine-tuning (peft) of the base UNet on the labeled train split.

LoRA on the attention projections and resnet convolutions; the class embedding is trained in full
(`modules_to_save`); labels are dropped to the null class with probability `label_dropout` so that the same
model serves the unconditional half of classifier-free guidance. Checkpoints every `checkpointing_steps` and
resumes from the last one. The adapter is saved as safetensors with its peft config and the config that made it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from augment.config import LoRAConfig
from augment.data import ImageSet
from augment.run import load_state
from augment.diffusion import EMA, diffusion_loss, lr_lambda, to_tensor
from augment.models import BaseModelInfo, load_base


@dataclass
class AdapterInfo:
    path: str
    adapter_hash: str
    train_seconds: float
    final_loss: float | None
    steps: int
    labeled_images: int = 0
    pseudo_labeled_images: int = 0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "AdapterInfo":
        return cls(**json.loads(path.read_text()))


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def lora_config(cfg: LoRAConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=["class_embedding"] if cfg.train_class_embedding else None,
        init_lora_weights=True,
    )


def finetune(
    cfg: LoRAConfig,
    base: BaseModelInfo,
    train: ImageSet,
    output_dir: str | Path,
    device: torch.device,
    run_config: dict | None = None,
    log=print,
    pseudo: ImageSet | None = None,
) -> AdapterInfo:
    """Fine-tune on the labeled `train` images, plus `pseudo` (pseudo-labeled pool images) when given and
    `cfg.use_pseudo_labeled`: then each batch draws a `cfg.labeled_share` share from the labeled images."""
    output_dir = Path(output_dir)
    final = output_dir / "adapter"
    if (final / "info.json").exists():
        log(f"finetune: reusing adapter {final}")
        return AdapterInfo.load(final / "info.json")

    # 1. Base with K + 1 class rows, wrapped with LoRA.
    K = len(train.class_names)
    n, h, w, c = train.images.shape
    unet, scheduler = load_base(base, K, h, c)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(unet, lora_config(cfg)).to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # The class embedding starts equal to the null row and must move far to condition the model: its own,
    # larger learning rate (the LoRA factors keep theirs).
    emb = [p for n, p in named if "class_embedding" in n]
    rest = [p for n, p in named if "class_embedding" not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": cfg.learning_rate},
                             {"params": emb, "lr": cfg.class_embedding_learning_rate, "weight_decay": 0.0}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.max_train_steps, min(50, cfg.max_train_steps // 10 + 1)))
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    use_pseudo = pseudo is not None and len(pseudo) > 0 and cfg.use_pseudo_labeled
    seen = train if not use_pseudo else ImageSet(np.concatenate([train.images, pseudo.images]),
                                                 np.concatenate([train.labels, pseudo.labels]),
                                                 train.class_names, train.ids + pseudo.ids)
    x_all = to_tensor(seen.images, device)
    y_all = torch.from_numpy(seen.labels).to(device)
    n_pseudo = len(seen) - n
    step, losses, t0 = 0, [], time.time()

    # 2. Resume.
    ckpt_dir = output_dir / "finetune-checkpoint"
    ckpt = ckpt_dir / "state.pt"
    state = load_state(ckpt, map_location=device, log=log)
    if state is not None:
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        if ema: ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"]); rng.bit_generator.state = state["rng"]; step = state["step"]
        losses = state["losses"]
        log(f"finetune: resumed at step {step}")

    # 3. Train.
    model.train()
    while step < cfg.max_train_steps:
        idx = rng.integers(0, n, cfg.train_batch_size)
        if n_pseudo:  # labeled images weighted up: a labeled_share of the batch, the rest pseudo-labeled
            from_pseudo = rng.random(cfg.train_batch_size) >= cfg.labeled_share
            idx = np.where(from_pseudo, n + rng.integers(0, n_pseudo, cfg.train_batch_size), idx)
        idx = torch.from_numpy(idx)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.from_numpy(rng.random(len(idx)) < cfg.label_dropout).to(device)] = K  # null label for CFG
        if cfg.augment_flip:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        loss = diffusion_loss(model, scheduler, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); step += 1
        if ema: ema.update()
        losses.append(loss.item())
        if step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"params": [p.detach().cpu() for p in params], "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "ema": ema.state_dict() if ema else None,
                        "gen": gen.get_state(), "rng": rng.bit_generator.state, "step": step,
                        "losses": losses}, ckpt_dir / "state.tmp")
            (ckpt_dir / "state.tmp").replace(ckpt)
            log(f"finetune: step {step}/{cfg.max_train_steps} loss {np.mean(losses[-50:]):.4f}")
    if ema:
        ema.copy_to()

    # 4. Save the adapter atomically, with the config that made it.
    tmp = output_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp)
    (tmp / "training_config.json").write_text(json.dumps(
        {"lora": cfg.model_dump(mode="json"), "base": asdict(base), "num_classes": K,
         "class_names": train.class_names, "run_config": run_config,
         # provenance: exactly which images the generator learned from
         "trained_on": {"labeled_ids": train.ids, "pseudo_labeled_ids": seen.ids[n:],
                        "pseudo_labels": seen.labels[n:].tolist(), "labeled_share": cfg.labeled_share if n_pseudo
                        else 1.0}}, indent=2))
    info = AdapterInfo(str(final), file_hash(tmp / "adapter_model.safetensors"), time.time() - t0,
                       float(np.mean(losses[-50:])) if losses else None, step, n, n_pseudo)
    info.save(tmp / "info.json")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return info


def load_finetuned(base: BaseModelInfo, adapter_dir: str | Path, num_classes: int, image_size: int,
                   channels: int, device: torch.device):
    """Base + adapter, merged into plain UNet weights for fast sampling."""
    unet, scheduler = load_base(base, num_classes, image_size, channels)
    model = PeftModel.from_pretrained(unet, str(adapter_dir))
    unet = model.merge_and_unload().to(device).eval()
    return unet, scheduler
