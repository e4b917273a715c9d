"""Textual inversion for the all-CLIP families (SD 1.x/2.x, SDXL): a new token per class learned in the text
encoders with everything else frozen (lora.adaptations: `textual_inversion`, DA-Fusion) or beside a LoRA
(`lora+ti`, pivotal tuning). The backend mixes this in; it provides `tokenizer`/`text_encoder` (and `_tokenizers`
for several encoders), `_condition(class_prompts)` and `_conditioning()`.

While a token trains, the text encoders look the new ids up in a small trainable table (TokenRows) and the
conditioning is encoded at every step (`live`); when it is done the rows go into the embedding matrices exactly as
diffusers' `load_textual_inversion` puts them, so the plain pipeline reproduces a published row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from augment.errors import ModelError


def ti_file(k: int) -> str:
    """The file of class k's learned token in a textual-inversion adapter folder."""
    return f"learned_embeds-{k:04d}.safetensors"


class TokenRows(torch.nn.Module):
    """A text encoder's token table with trainable rows for the ids from `first` on (textual inversion's new
    tokens, `rows` (K, D), kept in fp32); the rest of the table stays frozen and is never copied."""

    def __init__(self, base: torch.nn.Embedding, first: int, init: torch.Tensor):
        super().__init__()
        self.base, self.first = base, first
        self.rows = torch.nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        picked = self.rows[(ids - self.first).clamp(0, len(self.rows) - 1)].to(out.dtype)
        return torch.where(new[..., None], picked, out)


class TextualInversion:
    """The textual-inversion methods of a CLIP-conditioned backend."""

    TI_TAGS = {"textual_inversion": "ti", "lora+ti": "pti"}

    def ti_tokens(self, adaptation: str) -> list[str]:
        """One new token per class for a textual-inversion adaptation, distinct per adaptation."""
        return [f"<augment-{self.TI_TAGS[adaptation]}-{k}>" for k in range(len(self.class_names))]

    def adaptation_prompts(self, adaptation: str) -> list[tuple[str, str]]:
        """(prompt, negative prompt) per class under `adaptation`: a textual-inversion adaptation names the class by
        its learned token in base.prompt_template (DA-Fusion's "a photo of a <token>"), the others by its prompt."""
        if adaptation not in self.TI_TAGS:
            return [self.prompt(k) for k in range(len(self.class_names))]
        return [(self.cfg.prompt_template.format(name=t), self.cfg.negative_prompt) for t in self.ti_tokens(adaptation)]

    def _tokenizers(self) -> list[tuple]:
        """(tokenizer, text encoder) pairs that textual inversion adds tokens to."""
        return [(self.tokenizer, self.text_encoder)]

    def add_ti(self, adaptation: str) -> list[torch.nn.Parameter]:
        """Start training a textual-inversion adaptation: its tokens join every tokenizer, each text encoder looks
        them up in a trainable (K, D) table initialised to the mean embedding of the class name's own tokens, and
        the conditioning is computed from the prompts at every step. Returns the trainable tables."""
        tokens, params = self.ti_tokens(adaptation), []
        self._onload_text()
        for tokenizer, encoder in self._tokenizers():
            table = encoder.get_input_embeddings()
            tokenizer.add_tokens(tokens)  # none added when an earlier training in this process added them
            ids = tokenizer.convert_tokens_to_ids(tokens)
            first = ids[0]
            if ids != list(range(first, first + len(tokens))):
                raise ModelError(f"the tokenizer gave the new tokens {tokens} ids {ids}, not consecutive ones")
            with torch.no_grad():
                init = torch.stack([table(torch.tensor(tokenizer(n.replace("_", " "), add_special_tokens=False)
                                                       .input_ids or [0], device=table.weight.device)).mean(0)
                                    for n in self.class_names]).float()
            rows = TokenRows(table, first, init)
            encoder.set_input_embeddings(rows)
            params.append(rows.rows)
        self.live = [p for p, _ in self.adaptation_prompts(adaptation)] + ["", self.cfg.negative_prompt]
        return params

    def finish_ti(self, adaptation: str, folder: Path) -> list[Path]:
        """End training: the learned rows go into each text encoder's embedding matrix (as diffusers'
        load_textual_inversion puts them), one file per class token is saved in diffusers' format, and the
        adaptation's conditioning is computed."""
        tokens, learned = self.ti_tokens(adaptation), []
        for tokenizer, encoder in self._tokenizers():
            rows = encoder.get_input_embeddings()
            encoder.set_input_embeddings(rows.base)
            learned.append(rows.rows.detach().float().cpu())
        self.live = None
        self._install_ti(tokens, learned, added=True)
        self._condition_adaptation(adaptation)
        return self._save_ti(tokens, learned, Path(folder))

    def _condition_adaptation(self, adaptation: str) -> None:
        """Embed `adaptation`'s prompts (its learned tokens in place) as its conditioning."""
        self._onload_text()
        with torch.no_grad():
            self._condition([p for p, _ in self.adaptation_prompts(adaptation)])
        self.conditions[adaptation] = self._conditioning()
        self.use_adaptation("base")
        self._offload_text()

    def _onload_text(self) -> None:
        for encoder in self.text_encoders():
            encoder.to(self.device)

    def _install_ti(self, tokens: list[str], learned: list[torch.Tensor], added: bool = False) -> None:
        for (tokenizer, encoder), rows in zip(self._tokenizers(), learned):
            if not added:
                tokenizer.add_tokens(tokens)
            try:  # the new rows are set below: no need for transformers' mean-resizing draw
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            except TypeError:  # transformers before 4.46
                encoder.resize_token_embeddings(len(tokenizer))
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token, row in zip(tokens, rows):
                    weight[tokenizer.convert_tokens_to_ids(token)] = row.to(weight.dtype)

    def _save_ti(self, tokens: list[str], learned: list[torch.Tensor], folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, token in enumerate(tokens):
            path = folder / ti_file(k)
            save_file({token: learned[0][k].contiguous()}, str(path))
            paths.append(path)
        return paths

    def load_ti(self, adaptation: str, folder: Path) -> None:
        """The adaptation's learned tokens (saved by finish_ti) into the tokenizers and text encoders, and its
        conditioning; for generation in another process."""
        from safetensors.torch import load_file

        tokens = self.ti_tokens(adaptation)
        if adaptation in self.conditions:
            return
        files = [load_file(str(Path(folder) / ti_file(k))) for k in range(len(tokens))]
        self._install_ti(tokens, self._rows_of(tokens, files))
        self._condition_adaptation(adaptation)

    def _rows_of(self, tokens, files) -> list[torch.Tensor]:
        return [torch.stack([f[t] for t, f in zip(tokens, files)])]

    def ti_card(self, adaptation: str, with_lora: bool) -> str:
        """The adapter folder's README for a textual-inversion adaptation."""
        tokens = self.ti_tokens(adaptation)
        classes = "\n".join(f"- {n}: `{t}` (prompt `{p}`)" for n, t, (p, _) in
                             zip(self.class_names, tokens, self.adaptation_prompts(adaptation)))
        lora = "pipe.load_lora_weights(\"path/to/this/folder\")\n" if with_lora else ""
        encoders = "text encoders" if len(self._tokenizers()) > 1 else "text encoder"
        return f"""# Textual inversion{' and LoRA (pivotal tuning)' if with_lora else ''} for {self.info.reference}

Learned by augment on a small labeled image set: one token per class, in the {encoders}
{'and a LoRA on the ' + self.denoiser_name + ', trained together' if with_lora else '(everything else frozen)'}.

{classes}

```python
from diffusers import {self.pipeline_name}
pipe = {self.pipeline_name}.from_pretrained({self.info.path!r})
{lora}tokens = {tokens!r}
{self.ti_usage()}
image = pipe("a photo of a " + tokens[0]).images[0]
```
"""

    def ti_usage(self) -> str:
        return ("for k, token in enumerate(tokens):\n"
                "    pipe.load_textual_inversion(f\"path/to/this/folder/learned_embeds-{k:04d}.safetensors\")")
