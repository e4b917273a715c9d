"""Bad input is one clear line naming the culprit, before anything is written."""

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from pathlib import Path

from conftest import NO_CANDIDATES_PROVENANCE, ROOT, descendants, no_candidates, still_alive_after, write_imagefolder

TINY = str(ROOT / "configs" / "tiny.yaml")


def _folder(u: Path, per_class: int = 12, classes=("cat", "dog", "fox")) -> str:
    write_imagefolder(u / "imgs", classes=classes, per_class=per_class)
    return str(u / "imgs")


def _manifest(u: Path, rows: list[tuple[str, str]] | None = None, columns=("path", "label")) -> str:
    import pandas as pd

    src = Path(_folder(u))
    rows = rows if rows is not None else [(str(p.relative_to(src)), p.parent.name) for p in sorted(src.rglob("*.png"))]
    pd.DataFrame(rows, columns=list(columns)).to_csv(src / "labels.csv", index=False)
    return str(src / "labels.csv")


def _corrupt(u: Path) -> str:
    src = _folder(u)
    (Path(src) / "dog" / "3.png").write_bytes(b"not a png")
    return src


def _duplicate_label(u: Path) -> str:
    src = _folder(u)
    (Path(src) / "fox" / "dup.png").write_bytes((Path(src) / "cat" / "0.png").read_bytes())
    return src


def _escaping_symlink(u: Path) -> str:
    src = _folder(u)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(u / "secret.png")
    (Path(src) / "cat" / "link.png").symlink_to(u / "secret.png")
    return src


def _split_mismatch(u: Path) -> str:
    write_imagefolder(u / "sp" / "train", classes=("cat", "dog"), per_class=12)
    write_imagefolder(u / "sp" / "test", classes=("cat", "cow"), per_class=3)
    return str(u / "sp")


def _config_file(u: Path, text: str | bytes) -> str:
    (u / "job.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(u / "job.yaml")


# eleven lines that expand to 9^10 values: PyYAML builds them as shared references in milliseconds, and everything
# that walks the result (validation, merging, error messages) would then take forever
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join(['*a' if i == 0 else f'*l{i - 1}'] * 9)}]\n" for i in range(9)) + "name: *l8\n"


def _with_file(u: Path, name: str, data: bytes) -> str:
    """An image folder with one more file, `name` (relative to it), holding `data`."""
    src = Path(_folder(u))
    (src / name).write_bytes(data)
    return str(src)


def _truncated_jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:200]


def _broken_link(u: Path) -> str:
    src = _folder(u)
    (Path(src) / "cat" / "gone.png").symlink_to("deleted.png")  # a renamed or deleted file
    return src


def _same_image_many_copies(u: Path) -> str:
    """Seven copies of one image in cat, one in fox: the message named only the first six files, all cat's."""
    src = Path(_folder(u))
    for i in range(6):
        (src / "cat" / f"c{i}.png").write_bytes((src / "cat" / "0.png").read_bytes())
    (src / "fox" / "dup.png").write_bytes((src / "cat" / "0.png").read_bytes())
    return str(src)


def _skipped_only_class(u: Path) -> str:
    """A class folder whose every file is skipped (a Mac copy, a thumbnail cache): a class with no images."""
    src = Path(_folder(u))
    for name in ("Thumbs.db", ".DS_Store", "._0.png"):
        (src / "emu" / name).parent.mkdir(exist_ok=True)
        (src / "emu" / name).write_bytes(b"x")
    return str(src)


def _parquet(u: Path, paths: list, labels: list) -> str:
    """A parquet manifest beside the images of _folder (3 classes x 12)."""
    import pandas as pd

    src = Path(_folder(u))
    pd.DataFrame({"path": paths, "label": labels}).to_parquet(src / "labels.parquet")
    return str(src / "labels.parquet")


def _hf(u: Path, labels: list, feature=None) -> str:
    """A `datasets` dataset saved to disk, one distinct 10x10 image per label; `feature` types the label column."""
    import datasets

    ds = datasets.Dataset.from_dict({"image": [_img(100 + i) for i in range(len(labels))], "label": labels})
    ds = ds.cast_column("label", feature) if feature is not None else ds
    ds.save_to_disk(str(u / "hf"))
    return str(u / "hf")


def _pipeline(u: Path, class_name: str) -> None:
    """A diffusers checkpoint folder as its model_index.json names it (the preflight reads nothing else)."""
    import json

    (u / "ckpt" / "unet").mkdir(parents=True)
    (u / "ckpt" / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.36",
                                                             "unet": ["diffusers", "UNet2DConditionModel"]}))


def _class_label(*names: str):
    import datasets

    return datasets.ClassLabel(names=list(names))


# Every bad input a user has sent us: (setup(U) -> data.source or None, extra arguments, what the one line names).
# `{src}` in an argument is the setup's return value; `{U}` the user's folder.
BAD_INPUTS = {
    "empty source": (None, ["--set", "data.source="], "data.source"),
    "missing source": (None, ["--set", "data.source=/no/such/folder/"], "/no/such/folder/"),
    "yaml error in --set": (None, ["--set", "generation.strengths=[0.5"], "generation.strengths=[0.5"),
    "out of bounds": (None, ["--set", "lora.rank=0"], "lora.rank"),
    "image size bound": (None, ["--set", "data.image_size=3"], "data.image_size"),
    "unknown arm": (None, ["--set", "evaluation.arms=[real, real+jitter]"], "real+jitter"),
    "not a section": (None, ["--set", "name.first=x"], "name is not a section"),
    "unknown key": (None, ["--set", "generation.guidance=3"], "generation.guidance"),
    "wrong type": (None, ["--set", "generation.num_per_class=many"], "generation.num_per_class"),
    "missing base": (None, ["--set", "base.pretrained=/no/such/checkpoint"], "/no/such/checkpoint: no such folder"),
    "sd without base": (None, ["--set", "base.kind=stable_diffusion"], "base.kind=stable_diffusion needs"),
    "flux without base": (None, ["--set", "base.kind=flux"], "base.kind=flux needs base.pretrained"),
    "no fine-tuning at all": (None, ["--set", "lora.adaptations=[none]"],
                              "lora.adaptations=['none'] must include lora"),
    "an adaptation twice": (None, ["--set", "lora.adaptations=[lora, lora]"], "lists one twice"),
    "prompts alone on pixels": (None, ["--set", "lora.adaptations=[lora, none]"],
                                "`none` samples the pretrained model from its class prompts"),
    "encoder backbone missing": (None, ["--set", "filter.quality_classifier={kind: encoder, backbone: /no/such/dir}"],
                                 "filter.quality_classifier.backbone: classifier backbone '/no/such/dir' is not a "
                                 "folder"),
    "a GPU that is not there": (None, ["--set", "device=cuda:3"], "device 'cuda:3' requested but this process sees"),
    "not a device": (None, ["--set", "device=gpu"], "device"),
    "feedback without a CNN": (None, ["--set", "generation.feedback_scale=1", "--set", "pseudo.classifier.kind=svm"],
                               "pseudo.classifier.kind is 'svm'"),
    "sd not a pipeline": (None, ["--set", "base.kind=stable_diffusion", "--set", f"base.pretrained={ROOT / 'configs'}"],
                          "no model_index.json"),
    "prompt template": (None, ["--set", "base.prompt_template=a {label}"], "base.prompt_template"),
    "config not found": (None, ["CONFIG={U}/nope.yaml"], "nope.yaml"),
    "config yaml syntax": (lambda u: _config_file(u, "data: [unclosed\n"), ["CONFIG={src}"], "job.yaml"),
    "config not a mapping": (lambda u: _config_file(u, "- a\n- b\n"), ["CONFIG={src}"], "job.yaml"),
    "corrupt image": (_corrupt, [], "dog/3.png"),
    "too few images": (lambda u: _folder(u, per_class=3), [], "class 'cat' has only 3 images"),
    "one shot, cross-validated": (None, ["--set", "data.shots_per_class=1"],
                                  "selection.rule=cross_validation needs at least 2 labeled train images per class"),
    "one class": (lambda u: _folder(u, classes=("cat",)), [], "need at least 2 classes"),
    "empty class folder": (lambda u: (Path(_folder(u)) / "emu").mkdir() or str(u / "imgs"), [], "emu"),
    "no class folders": (lambda u: (u / "flat").mkdir() or str(u / "flat"), [], "has no class subfolders"),
    "same image two labels": (_duplicate_label, [], "different labels"),
    "symlink out of the data": (_escaping_symlink, [], "link.png"),
    "manifest without label column": (lambda u: _manifest(u, columns=("path", "class")), [], "no column 'label'"),
    "manifest missing file": (lambda u: _manifest(u, [("cat/0.png", "cat"), ("cat/99.png", "cat")]), [],
                              "row 3: image file not found"),
    "manifest path outside": (lambda u: _manifest(u, [("../../etc/hostname.png", "cat")] * 2), [], "row 2"),
    "manifest missing label": (lambda u: _manifest(u, [("cat/0.png", "cat"), ("cat/1.png", None)] * 12), [],
                               "missing label"),
    "split class mismatch": (_split_mismatch, [], "the class folders must match"),
    "output inside data": (_folder, ["--output-dir", "{src}/cat/out"], "lies inside data.source"),
    "output contains data": (_folder, ["--output-dir", "{U}"], "contains data.source"),
    "output is a file": (_folder, ["--output-dir", "{src}/../notes.txt"], "is a file"),
    "output under a file": (_folder, ["--output-dir", "{U}/notes.txt/out"], "notes.txt is a file"),
    "foreign non-empty output": (lambda u: (u / "mine").mkdir() or (u / "mine" / "a.txt").write_text("x") and None,
                                 ["--output-dir", "{U}/mine"], "not empty and was not created by augment"),
    # issue 22: a user's inputs that hung or ended in a traceback
    "config billion laughs": (lambda u: _config_file(u, LAUGHS), ["CONFIG={src}"],
                              "job.yaml, line 4: its aliases expand to more than 10000 values"),
    "recursive alias in --set": (None, ["--set", "name=&a [*a]"], "override 'name=&a [*a]', line 1: an alias"),
    "config in latin-1": (lambda u: _config_file(u, "name: café\n".encode("latin-1")), ["CONFIG={src}"],
                          "job.yaml is not UTF-8 text: byte 0xe9 at line 1"),
    "cache dir is a file": (None, ["--set", "base.cache_dir={U}/notes.txt"], "base.cache_dir"),
    "cache dir under a file": (None, ["--set", "base.cache_dir={U}/notes.txt/cache"], "notes.txt is a file"),
    "cache dir inside data": (_folder, ["--set", "base.cache_dir={src}/.cache"], "base.cache_dir"),
    # more of what real folders and configs hold
    "config key twice": (lambda u: _config_file(u, "lora: {rank: 4}\nname: x\nlora: {rank: 8}\n"), ["CONFIG={src}"],
                         "key 'lora' appears twice"),
    "config nested too deeply": (lambda u: _config_file(u, "name: " + "[" * 20000 + "]" * 20000), ["CONFIG={src}"],
                                 "job.yaml: nested too deeply"),
    "config python tag": (lambda u: _config_file(u, "name: !!python/object/apply:os.system [ls]\n"),
                          ["CONFIG={src}"], "could not determine a constructor"),
    "config in UTF-16": (lambda u: _config_file(u, "name: x\n".encode("utf-16")), ["CONFIG={src}"], "not UTF-8"),
    "config is a folder": (None, ["CONFIG={U}"], "is a folder"),
    "zero-byte image": (lambda u: _with_file(u, "cat/empty.png", b""), [], "cat/empty.png: the file is empty"),
    "truncated jpeg": (lambda u: _with_file(u, "dog/cut.jpg", _truncated_jpeg()), [], "dog/cut.jpg"),
    "text under an image name": (lambda u: _with_file(u, "fox/notes.png", b"hello"), [], "fox/notes.png: not an image"),
    "broken symlink": (_broken_link, [], "gone.png: a broken symlink"),
    "source is a text file": (lambda u: str(u / "notes.txt"), [], "notes.txt is a file, but neither a manifest"),
    "source is a zip": (lambda u: (u / "imgs.zip").write_bytes(b"PK\x03\x04") and str(u / "imgs.zip"), [],
                        "unpack the archive"),
    "imagefolder kind on a file": (_manifest, ["--set", "data.kind=imagefolder"], "labels.csv is not a folder"),
    "relative source that is nowhere": (lambda u: "my_images/cats", [], "no such local file or folder"),
    "manifest in latin-1": (lambda u: _with_file(u, "labels.csv", "path,label\ncat/0.png,chât\n".encode("latin-1")) +
                            "/labels.csv", [], "labels.csv is not UTF-8 text"),
    "manifest of URLs": (lambda u: _manifest(u, [("https://example.com/0.png", "cat")] * 2), [], "is a URL"),
    "manifest: one file, two labels": (lambda u: _manifest(u, [(f"{c}/{i}.png", c) for c in ("cat", "dog", "fox")
                                                           for i in range(12)] + [("cat/0.png", "dog")]), [],
                                       "cat/0.png (cat), cat/0.png (dog)"),
    "manifest: empty file": (lambda u: _with_file(u, "labels.csv", b"") + "/labels.csv", [], "labels.csv is empty"),
    # issue: a user-fault battery (numbers without bounds, labels `datasets` leaves empty, blank paths)
    "min_confidence NaN": (None, ["--set", "filter.min_confidence=nan"],
                           "filter.min_confidence: must be a probability"),
    "min_confidence below 0": (None, ["--set", "filter.min_confidence=-3"], "filter.min_confidence"),
    "min_confidence above 1": (None, ["--set", "filter.min_confidence=7"], "filter.min_confidence"),
    "infinite lora_alpha": (None, ["--set", "lora.lora_alpha=inf"], "lora.lora_alpha: Input should be a finite"),
    "huge lora_alpha": (None, ["--set", "lora.lora_alpha=1e300"], "lora.lora_alpha"),
    "seed 2**64": (None, ["--set", f"evaluation.seed={2**64}"], "evaluation.seed"),
    "seed past scikit-learn": (None, ["--set", f"data.seed={2**32}"], "data.seed"),
    "guidance NaN": (None, ["--set", "generation.guidance_scale=.nan"], "generation.guidance_scale"),
    "infinite snr_gamma": (None, ["--set", "base.snr_gamma=.inf"], "base.snr_gamma"),
    "zero learning rate": (None, ["--set", "lora.learning_rate=0"], "lora.learning_rate"),
    "NaN strength": (None, ["--set", "generation.strengths=[.nan]"], "generation.strengths"),
    "NaN threshold": (None, ["--set", "pseudo.thresholds=[0.5, .nan]"], "pseudo.thresholds[1]"),
    "zero UNet width": (None, ["--set", "base.block_out_channels=[0, 8]"], "base.block_out_channels"),
    "huge num_per_class": (None, ["--set", f"generation.num_per_class={10**12}"], "generation.num_per_class"),
    "image size the UNet cannot halve": (None, ["--set", "data.image_size=13"], "data.image_size=13 does not fit"),
    "empty cache_dir": (None, ["--set", "base.cache_dir=''"], "base.cache_dir: must be a path"),
    "blank output_dir": (None, ["--output-dir", "' '"], "publish.output_dir: must be a path"),
    "empty name": (None, ["--set", "name=''"], "name: String should have at least 1 character"),
    "empty target module": (None, ["--set", "lora.target_modules=['']"], "lora.target_modules[0]"),
    "union value, one line": (None, ["--set", "base.block_out_channels=wide"], "base.block_out_channels: Input"),
    "the same arm twice": (None, ["--set", "evaluation.arms=[real+classic, classic+real]"],
                           "lists the arm real+classic twice"),
    "near-miss key": (None, ["--set", "lora.lora_alhpa=4"], "lora.lora_alhpa: unknown key (did you mean lora_alpha?)"),
    "moved key": (None, ["--set", "evaluation.workers=2"],
                  "evaluation.workers: unknown key (it moved: write runner.local_workers"),
    "override without =": (None, ["--set", "lora.rank"], "override 'lora.rank' must look like section.key=value"),
    "section given a number": (None, ["--set", "data=5"], "data: Input should be a valid dictionary"),
    "config is a scalar": (lambda u: _config_file(u, "hello\n"), ["CONFIG={src}"], "must hold a mapping of sections"),
    "same image, many copies, two labels": (_same_image_many_copies, [], "fox/dup.png (fox)"),
    "class of skipped files only": (_skipped_only_class, [], "imgs/emu holds no images"),
    "class folders differ by case": (lambda u: _folder(u, classes=("cat", "Cat", "dog")), [],
                                     "class folders 'Cat' and 'cat' differ only in case"),
    "manifest path is a folder": (lambda u: _manifest(u, [("cat", "cat"), ("dog/0.png", "dog")]), [],
                                  "imgs/cat is a folder, not an image file"),
    "manifest: bytes paths not UTF-8": (lambda u: _parquet(u, [b"\xff\xfe.png"] * 4, ["cat"] * 4), [],
                                        "path column holds bytes that are not UTF-8"),
    "manifest: a path that is a number": (lambda u: _parquet(u, [7] * 4, ["cat"] * 4), [], "path 7 is a int"),
    "manifest: fractional labels": (lambda u: _parquet(u, [f"{c}/{i}.png" for c in CATS for i in range(12)],
                                                       [1.0, 2.5, 3.0] * 12), [],
                                    "label 2.5 in column 'label' is not a whole number"),
    "datasets: no labels at all": (lambda u: _hf(u, [None] * 12, _class_label("cat", "dog")), [],
                                   "column 'label' has no labels: all 12 rows"),
    "datasets: fractional labels": (lambda u: _hf(u, [0.5, 1.0, 2.0] * 12), [], "label 0.5 in column 'label'"),
    "datasets: list labels": (lambda u: _hf(u, [[0], [1], [2]] * 12), [], "column 'label' holds list values"),
    "datasets: a class with no rows": (lambda u: _hf(u, [0, 1, 2] * 12, _class_label("cat", "dog", "fox", "emu")),
                                       [], "class 'emu' of column 'label' has no labeled rows"),
}


def _img(seed: int, size=(10, 10)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), np.uint8))


def _png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    _img(seed).save(buf, "PNG")
    return buf.getvalue()


def _junk(u: Path, files: dict[str, bytes], per_class: int = 4) -> str:
    """An image folder (3 classes x per_class PNGs) with more entries: `name/` makes a folder, else a file."""
    src = Path(_folder(u, per_class=per_class))
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).mkdir() if name.endswith("/") else (src / name).write_bytes(data)
    return str(src)


def _mac_split_folders(u: Path) -> str:
    root = u / "sp"
    write_imagefolder(root / "train", per_class=6)
    write_imagefolder(root / "test", per_class=3, seed=1)
    write_imagefolder(root / "pool", classes=("any",), per_class=2, seed=2)
    for name in ("train/cat/._0.png", "test/dog/._1.png", "pool/any/._0.png", "__MACOSX/train/._x", "README.md",
                 "val/0.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\0\5\26\7 AppleDouble or notes")
    return str(root)


def _formats(u: Path) -> str:
    src = Path(_folder(u, per_class=4))
    _img(1).save(src / "cat" / "a.webp")
    _img(2).save(src / "cat" / "b.bmp")
    _img(3).save(src / "dog" / "c.tiff")
    frames = [_img(i).convert("P") for i in (4, 5, 6)]
    frames[0].save(src / "dog" / "moving.gif", save_all=True, append_images=frames[1:])  # the first frame is read
    _img(7).convert("CMYK").save(src / "fox" / "print.jpg")
    Image.new("RGB", (1, 1), "red").save(src / "fox" / "dot.png")
    _img(8).save(src / "fox" / "LOUD.PNG")
    _img(9).save(src / "fox" / "Photo.JPEG")
    return str(src)


def _odd_names(u: Path) -> str:
    src = Path(_folder(u, per_class=4))
    for k, name in enumerate(["with space.png", "ünïcødé 猫.png", "-starts-with-dash.png", "new\nline.png",
                              "x.png.png", "x.png/inside.png"]):  # the last: a folder named like an image
        (src / "cat" / name).parent.mkdir(exist_ok=True)
        _img(20 + k).save(src / "cat" / name, format="PNG")
    return str(src)


def _symlinked_tree(u: Path) -> str:
    """A class folder holding a link to a tree kept elsewhere inside the data root (a hidden store)."""
    src = Path(_folder(u, per_class=4))
    (src / ".store" / "more cats").mkdir(parents=True)
    for i in range(3):
        _img(30 + i).save(src / ".store" / "more cats" / f"{i}.png")
    (src / "cat" / "more").symlink_to(src / ".store" / "more cats")
    return str(src)


def _symlink_loops(u: Path) -> str:
    src = Path(_folder(u, per_class=4))
    (src / "cat" / "up").symlink_to(src)  # back to the root
    (src / "dog" / "me").symlink_to(src / "dog")  # to itself
    return str(src)


def _fifo(u: Path) -> str:
    import os

    src = Path(_folder(u, per_class=4))
    os.mkfifo(src / "cat" / "pipe.png")  # opening it would wait forever for a writer
    return str(src)


def _csv(u: Path, text: str, name: str = "labels.csv", rows=None) -> str:
    """A manifest beside the 3 x 4 images; `text` formats each (path, label) row, `{h}` the header."""
    src = Path(_folder(u, per_class=4))
    rows = rows or [(f"{c}/{i}.png", c) for c in ("cat", "dog", "fox") for i in range(4)]
    head, line = text.split("|")
    (src / name).write_bytes((head + "".join(line.format(p=p, l=lab, a=src / p, w=p.replace("/", "\\"), k=k)
                                              for k, (p, lab) in enumerate(rows))).encode())
    return str(src / name)


CATS = ["cat", "dog", "fox"]
HIDDEN = "hidden or __MACOSX"
# What real folders and manifests hold, that must simply work: (setup(U) -> data.source, images loaded (train,
# validation, test and pool together), class names, skipped entries by reason).
GOOD_INPUTS = {
    "Mac copy": (lambda u: _junk(u, {"__MACOSX/cat/._0.png": b"\0\5\26\7", "cat/._0.png": b"\0\5\26\7",
                                     ".DS_Store": b"x", "dog/.DS_Store": b"x"}), 12, CATS, {HIDDEN: 4}),
    "Windows and editor files": (lambda u: _junk(u, {"cat/Thumbs.db": b"x", "dog/desktop.ini": b"x",
                                                     "fox/README.txt": b"x", "labels.xlsx": b"x"}),
                                 12, CATS, {"not an image file": 3, "outside a class folder": 1}),
    "hidden folders": (lambda u: _junk(u, {".git/HEAD": b"x", "cat/.ipynb_checkpoints/0-checkpoint.png": b"x",
                                           "dog/.thumbnails/": b""}), 12, CATS, {HIDDEN: 3}),
    "split folders from a Mac": (_mac_split_folders, 18 + 9 + 2, CATS,
                                 {HIDDEN: 4, "outside train/, validation/, test/ and pool/": 2}),
    "formats, frames, modes, 1x1, upper-case suffixes": (_formats, 20, CATS, {}),
    "odd file names": (_odd_names, 18, CATS, {}),
    "numbered class folders": (lambda u: str(write_imagefolder(u / "n", classes=[str(i) for i in range(11)],
                                                               per_class=4)), 44, [str(i) for i in range(11)], {}),
    "nested folders in a class": (lambda u: _junk(u, {"cat/2024/jan/a.png": _png(40)}), 13, CATS, {}),
    "symlinked tree": (_symlinked_tree, 15, CATS, {HIDDEN: 1}),
    "symlink loops": (_symlink_loops, 12, CATS, {"symlink to a folder already read": 2}),
    "FIFO named .png": (_fifo, 12, CATS, {"not a regular file": 1}),
    "trailing slash": (lambda u: _folder(u, per_class=4) + "/", 12, CATS, {}),
    "~ in data.source": (lambda u: _folder(u, per_class=4) and "~/imgs", 12, CATS, {}),
    "manifest with extra columns": (lambda u: _csv(u, "id,path,label,annotator,score\n|{k},{p},{l},ann,0.9\n"),
                                    12, CATS, {}),
    "manifest with absolute paths": (lambda u: _csv(u, "path,label\n|{a},{l}\n"), 12, CATS, {}),
    "manifest with Windows paths": (lambda u: _csv(u, "path,label\r\n|{w},{l}\r\n"), 12, CATS, {}),
    "manifest with a BOM": (lambda u: _csv(u, "\ufeffpath,label\n|{p},{l}\n"), 12, CATS, {}),
    "manifest with duplicate rows": (lambda u: _csv(u, "path,label\n|{p},{l}\n{p},{l}\n"), 12, CATS,
                                     {"duplicate manifest row": 12}),
    "manifest with spaces": (lambda u: _csv(u, "path , label\n|{p}, {l} \n"), 12, CATS, {}),
    "manifest from Excel (;)": (lambda u: _csv(u, "path;label\n|{p};{l}\n"), 12, CATS, {}),
    "manifest as TSV, upper-case suffix": (lambda u: _csv(u, "path\tlabel\n|{p}\t{l}\n", "LABELS.CSV"), 12, CATS, {}),
    "manifest with numeric labels": (lambda u: _csv(u, "path,label\n|{p},{l}\n", rows=[
        (f"{c}/{i}.png", n) for c, n in (("cat", "10"), ("dog", "9"), ("fox", "2")) for i in range(4)]),
        12, ["2", "9", "10"], {}),
    "manifest with NA and None classes": (lambda u: _csv(u, "path,label\n|{p},{l}\n", rows=[
        (f"{c}/{i}.png", n) for c, n in (("cat", "NA"), ("dog", "None"), ("fox", "null")) for i in range(4)]),
        12, ["NA", "None", "null"], {}),
    # rows `datasets` leaves without a label are skipped and counted, never a class (None was a class "None", a
    # None in a ClassLabel a TypeError, and -1 rows vanished uncounted)
    "datasets: None in a text label column": (lambda u: _hf(u, CATS * 4 + [None, " "]), 12, CATS, {"no label": 2}),
    "datasets: None and -1 in a ClassLabel": (lambda u: _hf(u, [0, 1, 2] * 4 + [None, -1], _class_label(*CATS)),
                                              12, CATS, {"no label": 2}),
    "datasets: -1 and None in an integer column": (lambda u: _hf(u, [0, 1, 2] * 4 + [-1, None]), 12,
                                                   ["0", "1", "2"], {"no label": 2}),
    "datasets: whole-number float labels": (lambda u: _hf(u, [1.0, 2.0, 10.0] * 4 + [float("nan")]), 12,
                                            ["1", "2", "10"], {"no label": 1}),
    "parquet manifest with bytes paths": (lambda u: _parquet(u, [f"{c}/{i}.png".encode() for c in CATS
                                                                 for i in range(4)], [c for c in CATS for _ in
                                                                                      range(4)]), 12, CATS, {}),
    "parquet manifest with float class ids": (lambda u: _parquet(u, [f"{c}/{i}.png" for c in CATS for i in range(4)],
                                                                 [float(k) for k in (3, 1, 2) for _ in range(4)]),
                                              12, ["1", "2", "3"], {}),
    "manifest labels that differ only in case": (lambda u: _csv(u, "path,label\n|{p},{l}\n", rows=[
        (f"{c}/{i}.png", n) for c, n in (("cat", "cat"), ("dog", "Cat"), ("fox", "fox")) for i in range(4)]),
        12, ["Cat", "cat", "fox"], {}),
}


@pytest.mark.parametrize("case", list(GOOD_INPUTS))
def test_good_input_loads_and_counts_what_it_skipped(tmp_path, monkeypatch, case):
    from augment.config import DataConfig
    from augment.data import make_splits

    setup, n, names, skipped = GOOD_INPUTS[case]
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(source=setup(tmp_path), image_size=8, channels=3, shots_per_class=None, test_fraction=0.25)
    s = make_splits(cfg)
    assert sum(len(p) for p in (s.train, s.validation, s.test, s.pool)) == n
    assert s.class_names == names and s.train.images.shape[1:] == (8, 8, 3)
    assert s.summary()["skipped"]["reasons"] == skipped and s.summary()["skipped"]["count"] == sum(skipped.values())


def test_every_mode_pil_opens_loads_in_gray_and_rgb(tmp_path):
    """A Lab TIFF (issue 22: a traceback from PIL's convert) and every other mode a file can hold."""
    from augment.config import DataConfig
    from augment.data import load_images

    src = Path(_folder(tmp_path, per_class=4))
    modes = ["LAB", "CMYK", "YCbCr", "1", "L", "LA", "P", "RGBA", "RGBX", "I", "F", "I;16", "I;16B"]
    for k, mode in enumerate(modes):
        _img(50 + k).convert(mode).save(src / "cat" / f"{k}.tif")
    for channels in (1, 3):
        data = load_images(DataConfig(source=str(src), image_size=8, channels=channels))
        assert data.images.shape == (12 + len(modes), 8, 8, channels)


def test_transparency_is_white_and_exif_orientation_is_honored(tmp_path):
    from augment.config import DataConfig
    from augment.data import load_images

    src = Path(_folder(tmp_path, per_class=4))
    clear = np.zeros((8, 8, 4), np.uint8)  # black, fully transparent: a viewer shows the background
    Image.fromarray(clear).save(src / "cat" / "rgba.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(src / "dog" / "palette.png", transparency=0)
    photo = Image.new("RGB", (16, 8), "white")
    photo.paste((255, 0, 0), (0, 0, 8, 8))  # the left half red, as the sensor stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the red half is then on top
    photo.save(src / "fox" / "phone.jpg", exif=exif.tobytes(), quality=95)
    data = load_images(DataConfig(source=str(src), image_size=8, channels=3))
    img = dict(zip(data.ids, data.images))
    assert (img["cat/rgba.png"] == 255).all() and (img["dog/palette.png"] == 255).all()
    top, bottom = img["fox/phone.jpg"][:3].astype(int), img["fox/phone.jpg"][5:].astype(int)
    assert (top[..., 0] > 200).all() and (top[..., 1] < 60).all() and (bottom > 200).all()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root reads any file")
def test_unreadable_image_is_a_data_error(tmp_path):
    from augment.config import DataConfig
    from augment.data import DataError, load_images

    src = Path(_folder(tmp_path, per_class=4))
    (src / "cat" / "0.png").chmod(0)
    with pytest.raises(DataError, match=r"cat/0.png: Permission denied"):
        load_images(DataConfig(source=str(src)))


def test_validate_accepts_a_messy_folder_and_the_summary_counts_what_was_skipped(tmp_path, capsys):
    """End to end: `augment validate` on a Mac copy with a Lab TIFF; the data stage writes the skipped count."""
    import json

    from augment.stages import generator
    from augment.configfile import load_config

    src = Path(_junk(tmp_path, {"__MACOSX/cat/._0.png": b"\0\5", "cat/._1.png": b"\0\5", "dog/Thumbs.db": b"x"},
                     per_class=12))
    _img(60).convert("LAB").save(src / "fox" / "lab.tif")
    args = ["--set", f"data.source={src}", "--set", "data.channels=3", "--set", f"base.cache_dir={tmp_path / 'c'}",
            "--set", f"publish.output_dir={tmp_path / 'out'}"]
    assert main(["validate", TINY, *args]) == 0
    assert f"source: {src}" in capsys.readouterr().out and not (tmp_path / "out").exists()
    cfg = load_config(TINY, [a for a in args if a != "--set"])
    generator.prepare_data(cfg)
    summary = json.loads((tmp_path / "out" / "data" / "summary.json").read_text())
    assert summary["skipped"]["reasons"] == {HIDDEN: 2, "not an image file": 1}
    assert "__MACOSX/ (hidden or __MACOSX)" in summary["skipped"]["examples"]


# A diffusers pipeline no backend loads: one line before any stage, whatever base.kind says.
# (pipeline class in model_index.json, base.kind, what the line says)
PIPELINES = {
    "SDXL as stable_diffusion": ("StableDiffusionXLPipeline", "stable_diffusion",
                                 "is a StableDiffusionXLPipeline checkpoint, which the sdxl backend loads, not "
                                 "stable_diffusion: set base.kind to sdxl"),
    "FLUX as sdxl": ("FluxPipeline", "sdxl", "which the flux backend loads, not sdxl: set base.kind to flux"),
    "SD as flux": ("StableDiffusionPipeline", "flux", "which the stable_diffusion backend loads, not flux"),
    "Sana as auto": ("SanaPipeline", "auto", "SanaPipeline checkpoint (Sana, not supported yet)"),
    "SD 3.5 as flux": ("StableDiffusion3Pipeline", "flux",
                       "which the sd3 backend loads, not flux: set base.kind to sd3"),
    "Kandinsky as auto": ("KandinskyV22Pipeline", "auto", "KandinskyV22Pipeline checkpoint (Kandinsky"),
    "PixArt as stable_diffusion": ("PixArtSigmaPipeline", "stable_diffusion", "PixArtSigmaPipeline checkpoint"),
    "an unknown pipeline": ("WuerstchenCombinedPipeline", "auto", "augment loads these pipeline classes"),
    "SD as pixel": ("StableDiffusionPipeline", "pixel",
                    "which the stable_diffusion backend loads, not pixel: set base.kind to stable_diffusion"),
}
BAD_INPUTS.update({case: (lambda u, name=name: _pipeline(u, name),
                          ["--set", f"base.kind={kind}", "--set", "base.pretrained={U}/ckpt"], says)
                   for case, (name, kind, says) in PIPELINES.items()})

def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_culprit_and_changes_nothing(tmp_path, capsys, case):
    setup, extra, culprit = BAD_INPUTS[case]
    u = tmp_path / "U"
    u.mkdir()
    (u / "notes.txt").write_text("the user's own file")
    src = setup(u) if setup else None
    before = _snapshot(u)
    fill = lambda a: a.replace("{src}", str(src)).replace("{U}", str(u))  # noqa: E731
    config = next((fill(a)[7:] for a in extra if a.startswith("CONFIG=")), TINY)
    args = ["run", config, "--set", f"base.cache_dir={tmp_path / 'cache'}"]
    if src is not None and not case.startswith("config"):
        args += ["--set", f"data.source={src}"]
    if "--output-dir" not in extra:
        args += ["--output-dir", str(tmp_path / "out")]
    args += [fill(a) for a in extra if not a.startswith("CONFIG=")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and culprit in err[0], err
    assert _snapshot(u) == before  # no user file changed
    assert not (tmp_path / "out").exists()  # and no run folder was made


def test_the_bad_input_table_is_long_enough():
    assert len(BAD_INPUTS) >= 94 and len(GOOD_INPUTS) >= 30


@pytest.mark.timeout(30)
def test_yaml_bombs_fail_fast_in_files_and_overrides(tmp_path):
    """The check counts shared nodes once, so even 2^60 values are refused at once."""
    from augment.config import ConfigError
    from augment.configfile import load_config

    doubling = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 60))
    p = tmp_path / "c.yaml"
    for text in (LAUGHS, doubling, "name: &a {x: *a}\n"):
        p.write_text(text)
        with pytest.raises(ConfigError, match="c.yaml, line"):
            load_config(p)
    one_line = "[&a0 [x, x]" + "".join(f", &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 60)) + "]"
    p.write_text("name: x\n")
    with pytest.raises(ConfigError, match="override 'evaluation.arms=.*more than 10000 values"):
        load_config(p, ["evaluation.arms=" + one_line])


def test_anchors_and_merge_keys_within_the_budget_work(tmp_path):
    from augment.configfile import load_config

    p = tmp_path / "c.yaml"
    p.write_bytes("\ufeffselection:\r\n  model: &m {width: 8, steps: 15}\r\nevaluation:\r\n  model:\r\n    <<: *m\r\n"
                  "    width: 16\r\nfilter:\r\n  quality_classifier: *m\r\n".encode())  # BOM and CRLF too
    cfg = load_config(p)
    assert (cfg.selection.model.width, cfg.evaluation.model.width, cfg.evaluation.model.steps,
            cfg.filter.quality_classifier.width) == (8, 16, 15, 8)


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    from augment.config import DataConfig
    from augment.data import DataError, load_images

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / c / "0.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 64x64 image is now "too large" (> 2x the limit)
    with pytest.raises(DataError, match=r"cannot read image .*0.png"):
        load_images(DataConfig(source=str(tmp_path)))


def test_class_names_with_dollar_signs_render(tmp_path):
    from augment.report import plots

    names = ["$\\foo$", "a_b$"]
    assert plots.per_class_plot({"real": [0.5, 0.7]}, names)
    assert plots.confusion_plot({"real": [[1, 0], [0, 1]]}, names)
    assert plots.image_grid([(names[0], np.zeros((2, 8, 8, 1), np.uint8), ["$x", "y$"])])


def test_a_crash_between_publish_renames_loses_no_dataset(tmp_path):
    import datasets

    from augment.config import DataConfig
    from augment.data import load_images, split
    from augment.publish import publish

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    empty, prov = no_candidates(), NO_CANDIDATES_PROVENANCE
    out = tmp_path / "dataset"
    publish(splits, splits.train.images[:0], empty, out, "t", prov)
    out.rename(tmp_path / "dataset.old")  # the state a crash between the two renames leaves
    publish(splits, splits.train.images[:0], empty, out, "t", prov)
    assert len(datasets.load_from_disk(str(out))["train"]) == 20 and not (tmp_path / "dataset.old").exists()


def test_cli_starts_without_torch_and_has_a_version():
    import subprocess
    import sys

    code = "import sys, flows.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # `augment --help` / `validate` stay fast
    v = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("augment ")


@pytest.mark.slow
def test_sigterm_stops_a_run_which_then_resumes(tmp_path):
    """`kill` (SIGTERM) stops `augment run` within seconds, like Ctrl-C; the same command then finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flows.cli", "run", TINY, "--output-dir", str(out),
           "--set", f"base.cache_dir={tmp_path / 'cache'}", "--set", "lora.max_train_steps=3000"]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "finetune").exists():  # well inside the flow: fine-tuning has started
        assert proc.poll() is None and time.time() - t0 < 180, "the run ended before fine-tuning"
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    t1 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t1 < 30 and proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "run the same command again to resume" in err
    done = subprocess.run(cmd[:-2] + ["--set", "lora.max_train_steps=10"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "dataset").exists()


def test_debug_adds_the_traceback(tmp_path, capsys):
    args = ["run", TINY, "--output-dir", str(tmp_path / "out"), "--set", "data.source=/no/such/folder/"]
    assert main(args + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_progress_bar_shows_rate_and_time_left():
    import io

    from augment.progress import terminal_bar

    out = io.StringIO()
    bar = terminal_bar("fine-tuning", "step", file=out)
    for step in range(1, 101):
        bar(step, 100)
    text = out.getvalue()
    assert "fine-tuning" in text and "100/100" in text and "step/s" in text and "<" in text  # elapsed<left


def test_quiet_run_prints_only_the_result(tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "flows.cli", "run", TINY, "--quiet", "--output-dir", str(tmp_path / "out"),
           "--set", f"base.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("dataset: ") and lines[3].startswith("wall time: "), lines
    assert "INFO" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_run_in_seconds_with_one_line_and_leaves_no_process(tmp_path):
    """Ctrl-C sends SIGINT to the whole process group: augment, its worker processes and the temporary Prefect
    server. The server died first and the run retried its API calls for 2 minutes (~140 lines of tracebacks, exit
    1); SIGTERM waited for the trainings in flight (2 min 30 s at 32 px)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flows.cli", "run", TINY, "--output-dir", str(out),
           "--set", f"base.cache_dir={tmp_path / 'cache'}", "--set", "runner.local_workers=2",
           "--set", "evaluation.model.steps=20000"]  # evaluation units that would each run for minutes
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    t0 = time.time()
    while not (out / "choice").exists():  # the synthetic choice's long units are on the worker processes
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before the synthetic choice"
        time.sleep(0.5)
    time.sleep(3)
    below = descendants(proc.pid)
    assert below, "no worker processes or server to check"
    os.killpg(proc.pid, signal.SIGINT)
    t1 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t1 < 30 and proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "run the same command again to resume" in err and "Traceback" not in err, err[-3000:]

    left = still_alive_after(below, 15)
    assert not left, f"processes left behind: {left}"


def test_every_user_error_is_a_user_error_and_keeps_its_builtin_base():
    """One base for what a user must fix (augment.errors.UserError): the CLI prints it as one line and the flow does
    not retry it; each keeps the builtin it always was, so existing `except ValueError` / `except OSError` hold."""
    import errno

    from augment.config import ConfigError
    from augment.errors import USER_ERRORS, DataError, ModelError, StorageError, UserError, WorkerError
    from augment.report.schema import MetricsError
    from augment.results import RecordError
    from augment.runfolder import RunFolderError
    from flows.server import ServerError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (ModelError, ValueError),
                         (RecordError, ValueError), (MetricsError, ValueError), (RunFolderError, ValueError),
                         (WorkerError, RuntimeError), (ServerError, RuntimeError), (StorageError, OSError)):
        assert issubclass(cls, UserError) and issubclass(cls, builtin), cls
    assert isinstance(StorageError(errno.ENOSPC, "no space"), USER_ERRORS)
    assert not isinstance(KeyError("x"), USER_ERRORS) and isinstance(FileNotFoundError("f"), USER_ERRORS)


def test_a_stop_swallowed_by_a_finalizer_is_delivered_again(monkeypatch):
    """A stop raised while a `__del__` runs is swallowed by Python ("Exception ignored in"): the CLI's hook raises it
    once more in the main thread, Ctrl-C's as KeyboardInterrupt, a signal's through that signal's handler."""
    import signal
    import sys
    import time

    from flows.cli import _redeliver_stops

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", _redeliver_stops(seen.append))

    def busy(seconds=5.0):  # Python code running, as a training loop is (a sleep is not woken by it)
        end = time.time() + seconds
        while time.time() < end:
            pass

    class Stopping:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    with pytest.raises(KeyboardInterrupt):
        Stopping(KeyboardInterrupt())
        busy()  # the stop comes again within 0.1 s

    class Terminated(BaseException):  # as Prefect's TerminationSignal: a BaseException carrying its signal
        def __init__(self, signum):
            self.signal = signum

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Terminated):
            Stopping(Terminated(signal.SIGTERM))
            busy()
    finally:
        signal.signal(signal.SIGTERM, previous)
    Stopping(ValueError("a finalizer's own error"))
    assert [type(u.exc_value) for u in seen] == [ValueError]  # anything else goes to the hook before
