"""The Stable Diffusion backend: any diffusers Stable Diffusion 1.x/2.x checkpoint, a local folder or a hub id.

Model space is the VAE's latent space (`scaling_factor`-scaled posterior means); a class is a prompt (the
template, or a per-class override) whose CLIP text embedding conditions the UNet, and the null class is the
empty prompt, as in the text-to-image pipeline. LoRA (peft, through diffusers' `add_adapter`) goes on the UNet's
attention projections and is saved in diffusers' LoRA format, so that

    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    pipe.load_lora_weights(RUN_DIR / "finetune" / "adapter")

works outside this tool and reproduces a published sample from its `prompt`, `seed`, `guidance_scale`,
`num_inference_steps` and sampler (pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)).
Training latents are encoded once and cached under base.cache_dir by a hash of the images and the base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from augment.backends import BaseModelInfo, check_base
from augment.backends.common import DiffusionBackend, no_lora_target
from augment.backends.memory import vae_batch, weights_dtype
from augment.backends.prompts import PromptVariants
from augment.backends.textual_inversion import TextualInversion
from augment.backends.tiny import tiny_clip_config, tiny_clip_tokenizer
from augment.config import BaseModelConfig, LoRAConfig
from augment.data import ImageSet
from augment.diffusion import to_tensor, to_uint8
from augment.errors import ModelError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class StableDiffusionBackend(PromptVariants, TextualInversion, DiffusionBackend):
    """SD 1.x/2.x, and through its hooks every latent diffusers pipeline augment loads (sdxl.py, flux.py): a
    family brings its text conditioning (`_load_text`, `_condition`, `denoise`), its denoiser class and folder,
    and its pipeline class; VAE latents, their cache, LoRA through peft, the adapter in diffusers' format, fusing
    and export are shared."""

    kind = "stable_diffusion"
    family = "Stable Diffusion"  # for messages and cards
    pipeline_name = "StableDiffusionPipeline"  # the diffusers class that loads the base and the adapter
    denoiser_name = "unet"  # the pipeline's component (and folder) that LoRA goes on
    denoiser_class = "UNet2DConditionModel"

    def __init__(self, cfg: BaseModelConfig, class_names: list[str], image_size: int, channels: int,
                 device: torch.device):
        super().__init__(cfg, class_names, image_size, channels, device)
        if channels != 3:
            raise ModelError(f"{self.family} makes RGB images but data.channels is {channels}; set data.channels: 3")
        self.info: BaseModelInfo | None = None
        self.dtype = weights_dtype(cfg.weights_dtype, device, self.fp16_ok)  # the frozen text encoders' and denoiser's
        self.vae = self.text_encoder = self.tokenizer = None
        self.embeddings: torch.Tensor | None = None  # (K + 2, L, D): class prompts, "" (null), negative prompt
        self.pooled: torch.Tensor | None = None  # (K + 2, P) where the family pools its prompts
        self.conditions: dict[str, dict] = {}  # the conditioning tensors of each adaptation ("base": the prompts')
        self.live: list[str] | None = None  # while textual inversion trains: the prompts, encoded at every step

    # -- base ---------------------------------------------------------------------------------------------------

    def prepare(self, train: ImageSet, pool: ImageSet, log=print, progress=None) -> BaseModelInfo:
        """Nothing to pretrain: check that the checkpoint is this family's pipeline and fingerprint it."""
        check_base(self.cfg)
        ref, rev = self.cfg.pretrained, self.cfg.revision
        local = Path(ref)
        h = hashlib.sha256(f"{ref}:{rev}".encode())
        if local.exists():  # check_base refused a folder without model_index.json
            for f in sorted(local.rglob("*")):  # a local folder changes in place: its files are its identity
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.relative_to(local)}:{st.st_size}:{int(st.st_mtime)}".encode())
        name = ref + (f"@{rev}" if rev else "")
        log(f"base: {self.family} checkpoint {name}")
        return BaseModelInfo(path=ref, description=f"{self.family} {name}", fingerprint=h.hexdigest()[:16],
                             kind=self.kind, revision=rev, reference=name)

    def _components(self, info: BaseModelInfo) -> None:
        """VAE, text encoders, tokenizers, scheduler and the class conditioning, loaded once per backend."""
        if self.info is not None and self.info.fingerprint == info.fingerprint:
            return
        from diffusers import AutoencoderKL

        ref, kw = info.path, {"revision": info.revision}
        try:
            self.vae = AutoencoderKL.from_pretrained(ref, subfolder="vae", **kw).to(self.device).eval()
            self._load_text(ref, kw)
            self.scheduler = self._load_scheduler(ref, kw)
        except Exception as err:
            where = "" if Path(ref).exists() else " (not a local folder, so it was tried as a hub id)"
            raise ModelError(f"cannot load {self.family} components from {ref!r}{where}: {err}") from None
        self.vae.requires_grad_(False)
        if self.cfg.channels_last:
            self.vae = self.vae.to(memory_format=torch.channels_last)
        for encoder in self.text_encoders():
            encoder.requires_grad_(False)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale * self.latent_multiple
        if self.image_size % multiple:
            raise ModelError(f"data.image_size={self.image_size} must be a multiple of {multiple} for this "
                             f"{self.family} checkpoint (its VAE's factor {self.vae_scale}"
                             + (f" times {self.latent_multiple}" if self.latent_multiple > 1 else "") + ")")
        side = self.image_size // self.vae_scale
        self.latent_shape = (self.vae.config.latent_channels, side, side)
        self.info = info
        try:
            with torch.no_grad():
                self._condition()
        except Exception:
            self.info = None
            raise
        self.conditions = {"base": self._conditioning()}
        self._offload_text()

    def _offload_text(self) -> None:
        """The prompts are embedded once: on a GPU the text encoders leave it."""
        if self.device.type == "cuda":
            for encoder in self.text_encoders():
                encoder.to("cpu")
            torch.cuda.empty_cache()

    def _conditioning(self) -> dict:
        return {name: getattr(self, name) for name in ("embeddings", "pooled") if getattr(self, name) is not None}

    def use_adaptation(self, adaptation: str) -> None:
        """Condition on `adaptation`'s prompts from now on (a textual-inversion adaptation's learned tokens; the
        others share the class prompts)."""
        for name, value in (self.conditions.get(adaptation) or self.conditions.get("base", {})).items():
            setattr(self, name, value)

    def _batch_conditioning(self, labels: torch.Tensor) -> dict:
        """The conditioning of a batch of class indices: rows of the embedded prompts, or while textual inversion
        trains the prompts encoded now (with gradients to the new tokens)."""
        if self.live is not None:
            return self._encode_live([self.live[int(y)] for y in labels.tolist()], labels)
        i = labels.to(self.embeddings.device)
        return {name: value[i] for name, value in self._conditioning().items()}

    def _encode_live(self, prompts: list[str], labels: torch.Tensor) -> dict:
        return {"embeddings": self._embed(prompts)}

    latent_multiple = 1  # the latent side must be a multiple of this (FLUX packs 2x2 patches)
    fp16_ok = True  # whether the family's weights work in fp16 (a T5 encoder overflows in it)

    def _load_text(self, ref: str, kw: dict) -> None:
        """The family's text encoders and tokenizers (SD 1.x/2.x: one CLIP)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        self.text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", **kw, **self.load_dtype())
        self.text_encoder = self.text_encoder.to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)

    def load_dtype(self) -> dict:
        """transformers' from_pretrained keyword for the weights' dtype (`dtype` from 5.0, `torch_dtype` before)."""
        import transformers

        return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": self.dtype}

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def _load_scheduler(self, ref: str, kw: dict):
        """The training noise schedule. Latents are not bounded: never clip the predicted x_0 (DDPM/DDIM default to
        clipping to [-1, 1])."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(ref, subfolder="scheduler", clip_sample=False, **kw)

    def class_prompts(self) -> list[str]:
        return [self.prompt(k)[0] for k in range(len(self.class_names))]

    def _condition(self, class_prompts: list[str] | None = None) -> None:
        """Embed every class prompt (`class_prompts`, default the classes' own), the empty prompt (the null class)
        and the negative prompt, once."""
        self.embeddings = self._embed((class_prompts or self.class_prompts()) + ["", self.cfg.negative_prompt])

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings exactly as StableDiffusionPipeline.encode_prompt computes them (no clip skip)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def load(self, info: BaseModelInfo, adapter: str | Path | None = None) -> torch.nn.Module:
        import diffusers

        self._components(info)
        try:
            model = getattr(diffusers, self.denoiser_class).from_pretrained(
                info.path, subfolder=self.denoiser_name, revision=info.revision, torch_dtype=self.dtype)
        except Exception as err:
            raise ModelError(f"cannot load the {self.denoiser_name} of {info.path!r}: {err}") from None
        self._check_denoiser(model)
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if adapter is None:
            if self.cfg.gradient_checkpointing is True:  # `auto`: fine-tuning decides (augment.finetune)
                model.enable_gradient_checkpointing()
            return model
        pipe = self.pipeline(model)
        pipe.load_lora_weights(str(adapter))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return model.eval()

    def _check_denoiser(self, unet: torch.nn.Module) -> None:
        """Refuse a latent size the UNet cannot halve down its levels."""
        levels = 2 ** (len(unet.config.block_out_channels) - 1)
        if self.latent_shape[1] % levels:
            raise ModelError(f"data.image_size={self.image_size} gives {self.latent_shape[1]}px latents, which the "
                             f"UNet cannot halve {len(unet.config.block_out_channels) - 1} times; use a multiple of "
                             f"{self.vae_scale * levels}")

    def pipeline(self, denoiser: torch.nn.Module | None):
        """The family's plain diffusers pipeline over these components (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=denoiser, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    # -- model space and conditioning ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """VAE posterior means, shifted and scaled as the family's pipeline does (deterministic, so they can be
        cached)."""
        out, step = [], vae_batch(self._free_bytes(), self.image_size, "encode")
        for i in range(0, len(images), step):
            x = to_tensor(images[i:i + step], self.device)
            mean = self.vae.encode(x).latent_dist.mean
            shift = getattr(self.vae.config, "shift_factor", None)  # FLUX's VAE: (z - shift) * scale
            out.append((mean - shift if shift else mean) * self.vae.config.scaling_factor)
        # contiguous: the cached copy is, and the UNet's convolutions round differently on another memory layout
        return torch.cat(out).contiguous() if out else torch.zeros((0, *self.latent_shape), device=self.device)

    def encode_dataset(self, images: np.ndarray) -> torch.Tensor:
        """`encode`, cached on disk under base.cache_dir by a hash of the images and the base."""
        from safetensors.torch import load_file, save_file

        h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        h.update(f"{images.shape}:{self.info.fingerprint}".encode())
        path = Path(self.cfg.cache_dir) / "latents" / f"{h.hexdigest()[:20]}.safetensors"
        if path.exists():
            try:
                return load_file(str(path), device=str(self.device))["latents"]
            except Exception:  # a torn cache entry: encode again
                pass
        latents = self.encode(images)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)
        return latents

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        step = vae_batch(self._free_bytes(), self.image_size, "decode")
        out = [self.vae.decode(self._unscale(x[i:i + step].float(), shift)).sample for i in range(0, len(x), step)]
        return to_uint8(torch.cat(out)) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    def _free_bytes(self) -> int | None:
        """Free memory of the GPU this backend runs on (None on the CPU)."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None

    def _unscale(self, z: torch.Tensor, shift: float) -> torch.Tensor:
        z = z / self.vae.config.scaling_factor
        return z + shift if shift else z

    @property
    def uncond_label(self) -> int:
        """Guidance's other half: the negative prompt's row when there is one, else the empty prompt's (row K)."""
        return self.null_label + 1 if self.cfg.negative_prompt else self.null_label

    def denoise(self, model, x_t, t, labels):
        e = self._batch_conditioning(labels)["embeddings"]
        return model(x_t.to(self.dtype), t, encoder_hidden_states=e.to(self.dtype)).sample

    def prompt(self, label: int) -> tuple[str, str]:
        name = self.class_names[label]
        text = self.cfg.class_prompts.get(name) or self.cfg.prompt_template.format(name=name.replace("_", " "))
        return text, self.cfg.negative_prompt
    # -- LoRA -----------------------------------------------------------------------------------------------------

    def add_lora(self, model: torch.nn.Module, cfg: LoRAConfig) -> tuple[torch.nn.Module, list[dict]]:
        from peft import LoraConfig

        model.requires_grad_(False)
        try:
            model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                         use_dora=cfg.use_dora,
                                         target_modules=list(cfg.target_modules or LORA_TARGETS),
                                         init_lora_weights=True))
        except ValueError as err:  # peft's NoMatchingPeftModuleError
            raise no_lora_target(cfg, err) from None
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise no_lora_target(cfg)
        for p in params:  # the factors train in fp32 over frozen bf16 weights (diffusers' cast_training_params)
            p.data = p.data.float()
        return model, [{"params": params, "lr": cfg.learning_rate}]

    def save_adapter(self, model: torch.nn.Module, folder: Path, final: Path | None = None) -> Path:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        layers = {k: v.detach().cpu().contiguous() for k, v in layers.items()}
        name, metadata = self.denoiser_name, model.peft_config["default"].to_dict()
        getattr(diffusers, self.pipeline_name).save_lora_weights(
            str(folder), safe_serialization=True,
            **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata})
        (Path(folder) / "README.md").write_text(_adapter_card(self))
        return Path(folder) / "pytorch_lora_weights.safetensors"

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        self.pipeline(model).save_pretrained(str(folder))

    def usage(self) -> str:
        return f"""```python
from diffusers import {self.pipeline_name}
pipe = {self.pipeline_name}.from_pretrained("THIS_FOLDER")     # the LoRA is fused into the {self.denoiser_name}
image = pipe("a photo of a <class>").images[0]
```"""


def _adapter_card(backend: StableDiffusionBackend) -> str:
    prompts = "\n".join(f"- {n}: `{backend.prompt(k)[0]}`" for k, n in enumerate(backend.class_names))
    negative = f" (guidance's negative prompt: `{backend.cfg.negative_prompt}`)" if backend.cfg.negative_prompt else ""
    return f"""# LoRA adapter for {backend.info.reference}

Fine-tuned by augment on a small labeled image set ({backend.family}), one prompt per class{negative}:

{prompts}

```python
from diffusers import {backend.pipeline_name}
pipe = {backend.pipeline_name}.from_pretrained({backend.info.path!r})
pipe.load_lora_weights("path/to/this/folder")
```
`training_config.json` holds the configuration and the ids of the images it learned from.
"""

def write_tiny_checkpoint(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny, randomly initialised Stable Diffusion pipeline (UNet, VAE, CLIP text encoder and a tokenizer built
    from a vocabulary written here), saved with save_pretrained: for tests and offline smoke runs of the SD path.
    Its samples are noise; everything around them (LoRA, caching, sampling, loading) is the real code."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer)))
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=image_size)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4)
    # SD 1.5's scheduler config: PNDM with a scaled-linear schedule (sampling swaps in DPM-Solver++ or DDIM)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return Path(path)


if __name__ == "__main__":  # python -m augment.backends.stable_diffusion DIR: write a tiny checkpoint for smoke runs
    import sys

    print(write_tiny_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "outputs/sd-tiny-checkpoint"))
