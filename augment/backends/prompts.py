"""Prompt variants for the `none` adaptation (lora.adaptations): the pretrained model's samples vary in what their
prompts say (base.prompt_templates beside base.prompt_template; ALIA, "Diversify, Don't Fine-Tune"). A backend
with text conditioning mixes this in; it provides `cfg`, `class_names`, `conditions`, `_condition(class_prompts)`,
`_conditioning()`, `use_adaptation` and `adaptation_prompts`, and `extra_rows`: how many rows its conditioning
table holds after the K classes' (the null class, and the negative prompt where the family has one).

The j-th sample of class k takes template j mod T. Template 0 is the class's own row; template t > 0 is row
K + extra_rows + (t - 1) K + k of the `none` adaptation's table, appended once the classes' own are embedded.
"""

from __future__ import annotations

import torch


class PromptVariants:
    extra_rows = 2  # the null class and the negative prompt, after the K classes

    def templates(self, adaptation: str) -> list[str]:
        """The templates an adaptation's samples cycle through: base.prompt_template and, for `none`,
        base.prompt_templates."""
        return [self.cfg.prompt_template] + (list(self.cfg.prompt_templates) if adaptation == "none" else [])

    def row_prompt(self, adaptation: str, label: int, j: int) -> tuple[tuple[str, str], int]:
        own = self.adaptation_prompts(adaptation)[label]
        templates, name = self.templates(adaptation), self.class_names[label]
        t = j % len(templates)
        if t == 0 or name in self.cfg.class_prompts:
            return own, label
        K = len(self.class_names)
        return (templates[t].format(name=name.replace("_", " ")), self.cfg.negative_prompt), \
            K + self.extra_rows + (t - 1) * K + label

    def condition_variants(self, adaptation: str) -> None:
        """Embed the adaptation's extra templates, once, as rows after its table (see the module's docstring)."""
        templates = self.templates(adaptation)
        if len(templates) == 1 or adaptation in self.conditions:
            return
        base = self.conditions["base"]
        parts = {name: [value] for name, value in base.items()}
        K = len(self.class_names)
        self._onload_text()
        for template in templates[1:]:
            with torch.no_grad():
                self._condition([template.format(name=n.replace("_", " ")) for n in self.class_names])
            for name, value in self._conditioning().items():
                parts[name].append(value[:K])
        self.conditions[adaptation] = {name: torch.cat(values) for name, values in parts.items()}
        self.use_adaptation("base")
        self._offload_text()
