"""Pretrained image encoders as classifiers (classifier kind `encoder`): a transformers vision model (the vision tower
of CLIP or SigLIP, DINOv2, ViT, ConvNeXt, ResNet; a Hub id or a local folder with its image processor) read by a
linear probe on its frozen features (`head: linear`), or tuned with peft's LoRA beside its head (`head: lora`); the
heads are augment/probes.py.

Frozen features are computed once per image, backbone and view, and cached on disk by content
(`<base.cache_dir>/features/<backbone key>/<view>/*.npz`; the key hashes the backbone's files, so a changed checkpoint
is a new key), so the evaluation's many small trainings each cost a probe, not a forward pass. Classic augmentation
on frozen features draws from `augment_views` jittered copies of each image, each copy drawn from the image's own
hash: every training, in any process, reads the same cached copies.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from augment.classifier import classic_augment, device_of
from augment.config import ClassifierConfig
from augment.diffusion import autocast, to_tensor, to_uint8
from augment.errors import ModelError
from augment.parallel import worker_state

FEATURES_VERSION = "1"  # part of every cache key: bump it when the pooling below changes
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
_KEYS: dict = {}  # (folder, files' sizes and times) -> content key: a pure function's memo
_LOADED = worker_state()  # (folder, device) -> (model, processor): per process, per batch of units
_SHARDS = worker_state()  # cache folder -> the shards read and their rows: per process, per batch of units
_HASHES = worker_state()  # id(array) -> (weak reference to it, its image hashes): per process, per batch of units


# 1. The backbone: its folder, its content key, the model and its image processor.
@functools.lru_cache(maxsize=16)
def backbone_folder(name: str) -> Path:
    """A local folder as given, or a Hub id's snapshot (the configs, processor and safetensors weights; .bin only
    where a repository has no safetensors), asked of the Hub once per process."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"classifier backbone {name!r} is not a folder (config.json, the weights and "
                         "preprocessor_config.json) nor a Hub id")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.txt"]))
    except Exception as e:  # offline, unknown id, no access: one line, not the Hub client's traceback
        raise ModelError(f"classifier backbone {name!r}: not a local folder, and the Hub could not provide it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a folder with "
                         "config.json, the weights and preprocessor_config.json") from None
    return folder


def backbone_key(folder: Path) -> str:
    """A hash of the backbone's configs and weights (their bytes, read once per process and version of them)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"))
    sig = (str(folder), tuple((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if sig not in _KEYS:
        h = hashlib.sha256(f"features v{FEATURES_VERSION}".encode())
        for f in files:
            h.update(str(f.relative_to(folder)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        _KEYS[sig] = h.hexdigest()[:20]
    return _KEYS[sig]


def load_backbone(folder: Path, device: torch.device):
    """(model, image processor, model type): a vision model without its task head, frozen, in eval mode."""
    import transformers
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # a run's log is augment's lines, not a bar per classifier
    hf_logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        tower = VISION_TOWERS.get(config.model_type)
        cls = getattr(transformers, tower, None) if tower else transformers.AutoModel
        if cls is None:  # a vision tower this transformers does not have (Siglip2 before 4.49)
            raise ValueError(f"this transformers {transformers.__version__} has no {tower}")
        model = cls.from_pretrained(folder)
        # The PIL processors: the reference implementation, and the only one beside a torch without torchvision.
        pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
        processor = transformers.AutoImageProcessor.from_pretrained(folder, **pil)
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as e:
        raise ModelError(f"classifier backbone {folder}: cannot load it as a transformers vision model with its image "
                         f"processor ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False).eval()
    return model.to(device), processor, config.model_type


def check_backbone(name: str, field: str) -> None:
    """Before any stage runs: the backbone is there, and transformers reads its config and its image processor's."""
    import transformers

    try:
        folder = backbone_folder(name)
        transformers.AutoConfig.from_pretrained(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise ModelError(f"{folder} has no preprocessor_config.json (its image processor)")
    except ModelError as e:
        raise ModelError(f"{field}: {e}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{field}: {name} is not a transformers vision model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _backbone(cfg: ClassifierConfig, device: torch.device):
    folder = backbone_folder(cfg.backbone)
    key = (str(folder), str(device))
    if key not in _LOADED:
        _LOADED.clear()  # one backbone per process at a time
        _LOADED[key] = load_backbone(folder, device)
    return _LOADED[key]


def pooled(out, model_type: str) -> torch.Tensor:
    """The image's feature vector: the model's pooled output (CLIP/SigLIP's projected-free pooled token, DINOv2's
    normed class token, ConvNeXt's and ResNet's pooled map), ViT's class token (its pooler is an untrained layer in
    most checkpoints), or the mean of a feature map."""
    if model_type != "vit" and getattr(out, "pooler_output", None) is not None:
        return out.pooler_output.flatten(1)
    h = out.last_hidden_state
    return h[:, 0] if h.dim() == 3 else h.mean(dim=(2, 3))


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    """The processor's input tensor for uint8 (N, H, W, C) images (grey ones as RGB)."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return processor(images=list(images), return_tensors="pt", input_data_format="channels_last")["pixel_values"]


def forward(model, processor, model_type: str, images: np.ndarray, device: torch.device, mixed: str) -> torch.Tensor:
    with autocast(device, mixed):
        return pooled(model(pixel_values=pixel_values(processor, images).to(device)), model_type).float()


# 2. The feature cache: per backbone and view, shards of (image hash, feature) rows.
def image_hashes(images: np.ndarray) -> list[str]:
    """Each image's content hash. An array is hashed once per process and batch, however many trainings read it
    (each downstream training scores the same test array: at 512 px, 0.8 MB an image to hash, each time); arrays
    are never changed in place here."""
    entry = _HASHES.get(id(images))
    if entry is not None and entry[0]() is images:
        return entry[1]
    hashes = [hashlib.sha1(np.ascontiguousarray(im).tobytes() + str(im.shape).encode()).hexdigest()[:20]
              for im in images]
    key = id(images)
    _HASHES[key] = (weakref.ref(images, lambda _: _HASHES.pop(key, None)), hashes)
    return hashes


def _index(folder: Path) -> dict[str, np.ndarray]:
    """image hash -> feature of every shard in `folder`; a shard read once per process and batch (they never
    change: a new row is a new shard)."""
    seen = _SHARDS.setdefault(str(folder), {"names": set(), "rows": {}})
    for shard in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        if shard.name not in seen["names"]:
            with np.load(shard) as z:
                seen["rows"].update(zip(z["hashes"].tolist(), z["features"]))
            seen["names"].add(shard.name)
    return seen["rows"]


def _save(folder: Path, hashes: list[str], feats: np.ndarray) -> str:
    """A new shard, written under a temporary name and renamed: a reader never sees half of one, and two processes
    that computed the same rows write the same file."""
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1("".join(hashes).encode()).hexdigest()[:20] + ".npz"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, hashes=np.array(hashes), features=feats.astype(np.float32))
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return name


def view_images(images: np.ndarray, hashes: list[str], view: int, flip: bool) -> np.ndarray:
    """View 0 is the image; view j > 0 its j-th jittered copy (classic augmentation), drawn from its hash."""
    if view == 0:
        return images
    out = []
    for im, h in zip(images, hashes):
        gen = torch.Generator().manual_seed(int(h[:12], 16) * 64 + view)
        out.append(to_uint8(classic_augment(to_tensor(im[None]), gen, flip))[0])
    return np.stack(out)


def features(cfg: ClassifierConfig, images: np.ndarray, view: int = 0, flip: bool = False,
             hashes: list[str] | None = None, batch_size: int | None = None) -> np.ndarray:
    """(N, D) frozen features of `images` (their `view`; `hashes` their image_hashes when known), from the cache
    where it holds them, computed and added where it does not. The cache is per backbone, view, device type and
    precision: bf16 on a GPU and fp32 on the CPU give other numbers, and a run must not read the other's."""
    from augment import base_encoder

    device = device_of(cfg)
    mixed = precision(cfg, device)
    own_base = base_encoder.uses_base(cfg)
    key = base_encoder.cache_key(cfg) if own_base else backbone_key(backbone_folder(cfg.backbone))
    name = (f"jitter{'-flip' if flip else ''}-{view}" if view else "image") + f"-{device.type}-{mixed}"
    where = Path(cfg.cache_dir) / "features" / key / name
    hashes = image_hashes(images) if hashes is None else hashes
    cached = _index(where)
    missing = sorted({h: i for i, h in enumerate(hashes) if h not in cached}.values())
    if missing:
        todo = view_images(images[missing], [hashes[i] for i in missing], view, flip)
        step = batch_size or (256 if device.type == "cuda" else 64)
        if own_base:  # the noise of each image drawn from its own hash, every view alike
            new = base_encoder.compute(cfg, todo, [hashes[i] for i in missing], device, step)
        else:
            model, processor, model_type = _backbone(cfg, device)
            with torch.no_grad():
                new = torch.cat([forward(model, processor, model_type, todo[i:i + step], device, mixed)
                                 for i in range(0, len(todo), step)]).cpu().numpy()
        _SHARDS[str(where)]["names"].add(_save(where, [hashes[i] for i in missing], new))
        cached.update(zip((hashes[i] for i in missing), new))
    if not hashes:
        return np.zeros((0, next(iter(cached.values())).shape[0] if cached else 0), np.float32)
    return np.stack([cached[h] for h in hashes])


def warm(cfg: ClassifierConfig, plain: list[np.ndarray], jittered: list[np.ndarray] = ()) -> None:
    """Compute here, once, the features a stage's trainings will read (`plain` images, and the jittered views of
    the `jittered` ones, at the classifier's image_size as the trainings see them): the units that run after it, on
    other processes or workers, load no backbone."""
    if cfg.kind != "encoder" or cfg.head != "linear":
        return
    from augment.classifier import resize

    plain, jittered = [resize(x, cfg.image_size) for x in plain if len(x)], [resize(x, cfg.image_size)
                                                                               for x in jittered if len(x)]
    if plain:
        features(cfg, np.concatenate(plain))
    if jittered:
        images = np.concatenate(jittered)
        hashes = image_hashes(images)
        for view in range(1, cfg.augment_views + 1):
            features(cfg, images, view, hashes=hashes)


def precision(cfg: ClassifierConfig, device: torch.device) -> str:
    """`auto`: bf16 on a CUDA GPU, fp32 elsewhere (a probe reads features that a CPU's bf16 would round); the
    run's own base computes its features in fp32 (a small UNet: nothing to gain)."""
    if cfg.backbone == "base":
        return "no"
    return cfg.mixed_precision if cfg.mixed_precision != "auto" else "bf16" if device.type == "cuda" else "no"


# 3. Tiny random backbones, for tests and smoke runs (no download): `python -m augment.encoders DIR clip|dinov2`.
def write_tiny_backbone(folder: str | Path, kind: str = "dinov2", seed: int = 0) -> Path:
    """A random CLIP vision tower or DINOv2 at 16 px (4 px patches, width 32, 2 layers), with its image processor,
    in the transformers layout that `backbone:` reads."""
    import transformers

    def pil(name):  # transformers 5 names its PIL processors apart; 4.x has only these
        return getattr(transformers, name + "Pil", None) or getattr(transformers, name)

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                 patch_size=4)
    processor_size = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**shape))
        processor = pil("CLIPImageProcessor")(**processor_size)
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**shape))
        processor = pil("BitImageProcessor")(**processor_size, image_mean=[0.485, 0.456, 0.406],
                                                   image_std=[0.229, 0.224, 0.225])
    else:
        raise ValueError(f"tiny backbone kind {kind!r}: clip or dinov2")
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(write_tiny_backbone(sys.argv[1], *(sys.argv[2:3] or ["dinov2"])))
