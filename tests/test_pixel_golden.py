"""The pixel backend produces the same samples as before the backend seam existed.

tests/data/pixel_golden.npz holds the tiny job's candidates, text-to-image and image-to-image, written with
`AUGMENT_WRITE_GOLDEN=1`. The pre-seam code (commit d5f86d8) wrote the first version and the seam reproduced it;
it was written again when the base's pretraining changed on purpose (the EMA's decay warmup, PRETRAIN_RECIPE 2).
Sampling runs in fp32 here (bf16 rounds differently from one CPU to another). Compared with a tolerance of a
couple of grey levels on a small share of pixels, because float sums may round differently on another CPU.
"""

import os
from pathlib import Path

import numpy as np

from augment import pipeline
from augment.stages import choices, core, generator
from augment.generate import load_candidates

GOLDEN = Path(__file__).parent / "data" / "pixel_golden.npz"


def _run_tiny(tiny_cfg):
    # the golden samples' generator was fine-tuned on the pseudo-labels of the validation rule
    cfg = tiny_cfg.model_copy(update={"generation": tiny_cfg.generation.model_copy(
        update={"strengths": [0.5, 1.0], "num_per_class": 4, "mixed_precision": "no"}),
        "selection": tiny_cfg.selection.model_copy(update={"rule": "validation"})})
    log = lambda m: None  # noqa: E731
    with pipeline.started(cfg):
        generator.prepare_data(cfg)
        base = generator.base_model(cfg, log=log)
        choices.pseudo_stage(cfg, log=log)
        adapter = generator.finetune_stage(cfg, base, log=log)
        generator.generate_stage(cfg, base, adapter, log=log)
    return load_candidates(core.output_dir(cfg) / "candidates")


def test_pixel_backend_reproduces_the_pre_seam_samples(tiny_cfg):
    cands = _run_tiny(tiny_cfg)
    if os.environ.get("AUGMENT_WRITE_GOLDEN") == "1":
        np.savez_compressed(GOLDEN, images=cands.images, seed=cands.meta["seed"].to_numpy(),
                            strength=cands.meta["strength"].to_numpy(), label=cands.meta["label"].to_numpy())
    ref = np.load(GOLDEN)
    assert np.array_equal(cands.meta["seed"].to_numpy(), ref["seed"])
    assert np.array_equal(cands.meta["label"].to_numpy(), ref["label"])
    assert np.array_equal(cands.meta["strength"].to_numpy(), ref["strength"])
    assert set(np.unique(ref["strength"])) == {0.5, 1.0}  # both paths are covered
    diff = np.abs(cands.images.astype(int) - ref["images"].astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
