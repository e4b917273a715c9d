"""Publishing the augmented dataset: a `datasets.DatasetDict` users load with `load_from_disk` or `load_dataset`.

One folder holds both forms: `save_to_disk` output (dataset_dict.json + arrow files per split) and parquet
shards under data/ with a dataset card README.md whose YAML header maps the shards to splits. It is written to a
temporary folder and renamed into place, so readers never see a half-written dataset.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from augment import results
from augment.data import ImageSet, Splits
from augment.imagefiles import to_pil
from augment.results import PublishRecord
from augment.run import DatasetFolder

PROVENANCE = {
    "sample_id": "string", "source_id": "string", "is_pseudo_labeled": "bool", "pseudo_confidence": "float32",
    "seed": "int64", "strength": "float32",
    "guidance_scale": "float32", "num_inference_steps": "int32", "scheduler": "string",
    "prompt": "string", "negative_prompt": "string", "quality_score": "float32", "nn_similarity": "float32", "base_model": "string", "adapter_hash": "string",
    "config_hash": "string",
}


# No None anywhere: a torch DataLoader cannot collate it, and a None in an int column turned `seed` into float32
# (2968811710 became 2968811776). Missing values are "" (strings), -1 (ints) and NaN (floats).
MISSING = {"string": "", "int64": -1, "int32": -1, "float32": float("nan"), "bool": False}


def _missing(column: str, n: int) -> list:
    return [MISSING[PROVENANCE[column]]] * n


def _png(img: np.ndarray) -> dict:
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def features(class_names: list[str]):
    import datasets

    return datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=class_names),
        "is_synthetic": datasets.Value("bool"), **{k: datasets.Value(v) for k, v in PROVENANCE.items()},
    })


def _real_rows(s: ImageSet, pseudo_confidence: np.ndarray | None = None) -> dict:
    """Real rows; with `pseudo_confidence`, pool images whose labels came from the pseudo-labeler."""
    n = len(s)
    pseudo = pseudo_confidence is not None
    return {"image": [_png(i) for i in s.images], "label": s.labels.tolist(), "is_synthetic": [False] * n,
            "sample_id": [f"{'pseudo' if pseudo else 'real'}:{i}" for i in s.ids], "source_id": list(s.ids),
            "is_pseudo_labeled": [pseudo] * n,
            "pseudo_confidence": pseudo_confidence.astype(float).tolist() if pseudo else _missing("pseudo_confidence", n),
            **{k: _missing(k, n) for k in PROVENANCE if k not in ("sample_id", "source_id", "is_pseudo_labeled",
                                                                   "pseudo_confidence")}}


def _synthetic_rows(images: np.ndarray, table: pd.DataFrame, base_model: str, adapter_hash: str,
                    config_hash: str) -> dict:
    n = len(table)
    return {
        "image": [_png(i) for i in images], "label": table["label"].astype(int).tolist(),
        "is_synthetic": [True] * n, "sample_id": table["sample_id"].tolist(),
        "is_pseudo_labeled": [False] * n, "pseudo_confidence": _missing("pseudo_confidence", n),
        "source_id": [str(s) for s in table["source_id"]], "seed": table["seed"].astype("int64").tolist(),
        "strength": table["strength"].tolist(), "guidance_scale": table["guidance_scale"].tolist(),
        "num_inference_steps": table["num_inference_steps"].astype(int).tolist(),
        "scheduler": table["scheduler"].tolist(), "quality_score": table["p_intended"].tolist(),
        # the backend's class prompt ("" for a backend without text)
        **{c: [str(v) for v in table[c]] if c in table else _missing(c, n) for c in ("prompt", "negative_prompt")},
        "nn_similarity": table["nn_similarity"].tolist(), "base_model": [base_model] * n,
        "adapter_hash": [adapter_hash] * n, "config_hash": [config_hash] * n,
    }


def _write_parquet(dd, folder: Path, max_shard_rows: int) -> str:
    """Write `<split>-<version>-<i>-of-<n>.parquet` shards; the version is a hash of their bytes.

    The version must be in the file names: `datasets.load_dataset(folder)` caches a folder whose card declares
    data_files by the patterns alone, so a re-published folder with unchanged names would load stale rows."""
    names = []
    for split, ds in dd.items():
        n = max(1, -(-len(ds) // max_shard_rows))
        for i in range(n):
            names.append(f"{split}-{i:05d}-of-{n:05d}.parquet")
            ds.shard(n, i, contiguous=True).to_parquet(str(folder / names[-1]))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    version = h.hexdigest()[:12]
    for name in names:
        split, rest = name.split("-", 1)
        (folder / name).rename(folder / f"{split}-{version}-{rest}")
    return version


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def _card(name: str, splits_info: dict, class_names: list[str], provenance: dict, splits: list[str],
          version: str, about: dict | None = None) -> str:
    import yaml

    about = about or {}
    missing = [s for s in ("validation", "test") if s not in splits]
    absent = f" (here: {', '.join(f'`{s}`' for s in missing)})" if missing else ""
    header = {
        "pretty_name": name,
        "license": about.get("license", "unknown"),
        "tags": ["synthetic", "data-augmentation", "augment"],
        "size_categories": [_size_category(sum(v["rows"] for v in splits_info.values()))],
        "source_datasets": ["original"],
        "task_categories": ["image-classification"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"data/{s}-{version}-*.parquet"} for s in splits]}],
    }
    rows = "\n".join(f"| {s} | {v['rows']} | {v['synthetic']} | {v.get('pseudo_labeled', 0)} | "
                     f"{v['rows'] - v['synthetic'] - v.get('pseudo_labeled', 0)} |" for s, v in splits_info.items())
    prov = "\n".join(f"- {k}: `{v}`" for k, v in {**provenance, "dataset_version": version}.items())
    return f"""---
{yaml.safe_dump(header, sort_keys=False)}---
# {name}

Augmented image-classification dataset produced by **augment**: the real labeled training images plus
synthetic images from a class-conditional diffusion model fine-tuned with LoRA on them, kept only if they passed
the quality filters. `validation` and `test` are real images only; `test` was never seen by fine-tuning,
filtering or model selection. A split the job left empty is not published{absent}.

| split | rows | synthetic | pseudo-labeled real | real (labeled) |
|---|---|---|---|---|
{rows}

Classes ({len(class_names)}): {", ".join(class_names)}

Missing values are never null (a torch DataLoader could not collate them): `""` in string columns, `-1` in
integer columns (`seed`, `num_inference_steps` of real rows), `NaN` in float columns. Every row has `is_synthetic`
and `is_pseudo_labeled`: pseudo-labeled rows are real images from the unlabeled pool
whose label comes from a classifier trained on the labeled images (`pseudo_confidence`; published only when
they helped on validation). Synthetic rows carry their provenance: `seed` (regenerates the sample exactly),
`strength` (image-to-image strength; 1.0 = from noise), `source_id` (the real image it started from, if any),
`guidance_scale`, `prompt` and `negative_prompt` (Stable Diffusion; empty for the pixel backend),
`quality_score` (the quality classifier's p(intended class)), `nn_similarity` (to the nearest real training
image), `base_model` (with its revision when pinned), `adapter_hash`, `config_hash`.

## How it was made
{about.get("how", "")}

## Evidence
{about.get("evidence", "See the run's report.")}

## Provenance
{prov}

## Loading
```python
import datasets
ds = datasets.load_from_disk("<this folder>")   # or: datasets.load_dataset("<this folder>")
```
"""


def publish(splits: Splits, kept_images: np.ndarray, kept_table: pd.DataFrame, output_dir: str | Path,
            name: str, provenance: dict, max_shard_rows: int = 5000,
            pseudo: tuple[ImageSet, np.ndarray] | None = None, key: str = "",
            about: dict | None = None) -> PublishRecord:
    """Write the DatasetDict; returns its record (row counts per split, provenance, version). `pseudo`:
    pseudo-labeled pool images and their confidences, published in train after the real rows. `key`: the identity
    of the inputs, recorded in augment_publish.json so that an unchanged re-run can keep this dataset."""
    import datasets

    out = Path(output_dir)
    old = out.with_name(out.name + ".old")
    if not out.exists() and old.exists():  # a crash between the two renames below: the last dataset comes back
        old.rename(out)
    feats = features(splits.class_names)
    train_rows = _real_rows(splits.train)
    parts = [_real_rows(*pseudo)] if pseudo is not None and len(pseudo[0]) else []
    parts.append(_synthetic_rows(kept_images, kept_table, provenance["base_model"], provenance["adapter_hash"],
                                 provenance["config_hash"]))
    for part in parts:
        for k in train_rows:
            train_rows[k] = train_rows[k] + part[k]
    # An empty split is left out of the DatasetDict and the card: `datasets` 5 cannot load a 0-row split from
    # either form (load_from_disk: IndexError in concat_tables; load_dataset: "corresponds to no data"), and
    # the default job holds out no validation images (data.val_fraction: 0).
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(train_rows, features=feats), **{
        name: datasets.Dataset.from_dict(_real_rows(part), features=feats)
        for name, part in (("validation", splits.validation), ("test", splits.test)) if len(part)}})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # six tqdm bars per publish tell a user nothing; restored afterwards
        datasets.disable_progress_bars()
    try:
        dd.save_to_disk(str(tmp))
        version = _write_parquet(dd, DatasetFolder(tmp).parquet, max_shard_rows)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    info = {s: {"rows": len(ds), "synthetic": int(sum(ds["is_synthetic"])),
                "pseudo_labeled": int(sum(ds["is_pseudo_labeled"]))} for s, ds in dd.items()}
    DatasetFolder(tmp).card.write_text(_card(name, info, splits.class_names, provenance, list(dd), version, about))
    record = PublishRecord.model_validate({"splits": info, "provenance": provenance, "version": version, "key": key})
    results.save(DatasetFolder(tmp).record, record)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return record


PUSHED = (DatasetFolder.CARD, f"{DatasetFolder.PARQUET}/*.parquet")  # the card and the parquet shards: the arrow copy stays local


def push(dataset_dir: str | Path, repo_id: str, local_target: str | Path | None = None, private: bool = False,
         token: str | None = None) -> list[str]:
    """Upload a published dataset's card and parquet shards to the Hub dataset repo `repo_id` (created if needed),
    or copy exactly those files into `local_target` (no network needed). Returns the files sent."""
    ds = DatasetFolder(dataset_dir)
    folder = ds.path
    if not ds.card.exists() or not list(ds.parquet.glob("*.parquet")):
        raise FileNotFoundError(f"{folder} is not a published augment dataset (no {' or '.join(PUSHED)})")
    files = [DatasetFolder.CARD] + sorted(f"{DatasetFolder.PARQUET}/{p.name}" for p in ds.parquet.glob("*.parquet"))
    if local_target is not None:
        target = DatasetFolder(local_target)
        target.parquet.mkdir(parents=True, exist_ok=True)
        for old in target.parquet.glob("*.parquet"):  # a re-push replaces the previous version's shards
            old.unlink()
        for f in files:
            shutil.copyfile(folder / f, target.path / f)
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset", allow_patterns=list(PUSHED),
                      delete_patterns=[PUSHED[1]], commit_message="augment: publish dataset")
    return files
