"""Publishing the augmented dataset: a `datasets.DatasetDict` users load with `load_from_disk` or `load_dataset`.

One folder holds both forms: `save_to_disk` output (dataset_dict.json + arrow files per split) and parquet
shards under data/ with a dataset card README.md whose YAML header maps the shards to splits. It is written to a
temporary folder and renamed into place, so readers never see a half-written dataset.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from augment import results
from augment.data import ImageSet, Splits
from augment.imagefiles import to_pil
from augment.results import PublishRecord
from augment.runfolder import DatasetFolder, RunFolderError, check_writable_dir

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
# A shard as `_write_parquet` names it: what a push target may hold besides our card (and, on the Hub, the
# .gitattributes every new repo starts with). Anything else there is someone else's: push refuses to touch it.
SHARD = re.compile(r"[A-Za-z0-9_.]+-[0-9a-f]{12}-[0-9]{5}-of-[0-9]{5}\.parquet")
HUB_OWN = (".gitattributes",)


def is_augment_card(text: str) -> bool:
    """Whether `text` is a dataset card `_card` wrote: a YAML header whose tags include "augment"."""
    import yaml

    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    header, sep, _ = text[4:].partition("\n---\n") if text.startswith("---\n") else ("", "", "")
    try:
        meta = yaml.safe_load(header) if sep else None
    except yaml.YAMLError:
        return False
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return isinstance(tags, list) and "augment" in tags


def _pushed_name(path: str, card) -> bool:
    """Whether `path` (relative, with /) is a file augment push writes: our card (`card()` reads it) or a shard."""
    if path == DatasetFolder.CARD:
        return is_augment_card(card())
    folder, _, name = path.partition("/")
    return folder == DatasetFolder.PARQUET and SHARD.fullmatch(name) is not None


def _foreign_in_folder(target: Path) -> list[str]:
    """What `target` holds that augment push did not write; links count as foreign (a copy would write through)."""
    def ours(p: Path) -> bool:
        rel = p.relative_to(target).as_posix()
        if p.is_symlink():
            return False
        if rel == DatasetFolder.PARQUET:
            return p.is_dir()
        return p.is_file() and _pushed_name(rel, lambda: p.read_text(errors="replace"))

    return [p.relative_to(target).as_posix() for p in sorted(target.rglob("*")) if not ours(p)]


def _refuse(target: str, foreign: list[str], instead: str) -> None:
    shown = ", ".join(repr(f) for f in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise RunFolderError(f"{target} holds files augment push did not write ({shown}); nothing was changed: push "
                         f"into {instead}")


def _push_to_folder(folder: Path, files: list[str], local_target: str | Path) -> None:
    """Copy `files` into `local_target`, which must be new, empty or an earlier push's copy (its old shards go)."""
    target = check_writable_dir(local_target, "--to-folder")
    if target == folder.resolve():
        raise RunFolderError(f"--to-folder {local_target} is the dataset being pushed: choose another folder")
    foreign = _foreign_in_folder(target) if target.is_dir() else []
    if foreign:
        _refuse(f"--to-folder {local_target}", foreign, "a new or empty folder, or one augment push wrote before")
    parquet = DatasetFolder(target).parquet
    old = [p for p in parquet.glob("*.parquet") if f"{DatasetFolder.PARQUET}/{p.name}" not in files]
    parquet.mkdir(parents=True, exist_ok=True)
    # the card last and the old shards after it: the card names its version's shards, so a reader meanwhile loads
    # the old dataset or the new one
    for f in files[1:] + files[:1]:
        shutil.copyfile(folder / f, target / f)
    for p in old:
        p.unlink()


def _push_to_hub(folder: Path, files: list[str], repo_id: str, private: bool, token: str | None) -> None:
    """One commit that adds `files` and deletes the earlier push's shards, by name, in a repo holding nothing else."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    present = api.list_repo_files(repo_id, repo_type="dataset")

    def card() -> str:
        return Path(api.hf_hub_download(repo_id, DatasetFolder.CARD, repo_type="dataset")).read_text(errors="replace")

    foreign = [f for f in present if f not in HUB_OWN and not _pushed_name(f, card)]
    if foreign:
        _refuse(f"Hub dataset repo {repo_id}", foreign, "a new dataset repo, or one augment push wrote before")
    old = [f for f in present if f.startswith(f"{DatasetFolder.PARQUET}/") and f not in files]
    api.create_commit(repo_id, repo_type="dataset", commit_message="augment: publish dataset", operations=[
        *(CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files),
        *(CommitOperationDelete(path_in_repo=f) for f in old)])


def push(dataset_dir: str | Path, repo_id: str, local_target: str | Path | None = None, private: bool = False,
         token: str | None = None) -> list[str]:
    """Upload a published dataset's card and parquet shards to the Hub dataset repo `repo_id` (created if needed),
    or copy exactly those files into `local_target` (no network needed). Returns the files sent. The target must
    be new, empty or hold only what an earlier push wrote (whose shards this push replaces): anything else is
    refused with RunFolderError before anything changes."""
    ds = DatasetFolder(dataset_dir)
    folder = ds.path
    if not ds.card.is_file() or not list(ds.parquet.glob("*.parquet")):
        raise FileNotFoundError(f"{folder} is not a published augment dataset (no {' or '.join(PUSHED)})")
    files = [DatasetFolder.CARD] + sorted(f"{DatasetFolder.PARQUET}/{p.name}" for p in ds.parquet.glob("*.parquet"))
    if local_target is not None:
        _push_to_folder(folder, files, local_target)
    else:
        _push_to_hub(folder, files, repo_id, private, token)
    return files
