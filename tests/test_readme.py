"""The README's code runs: every Python block of "Load the result", "Use the dataset elsewhere" and "Use the model
elsewhere", on a run that `augment run` (the command, with one evaluation seed) just finished. The README stays a
newcomer's guide (at most 300 lines; reference material lives in docs/), and its links and the docs' links work."""

import re

import pytest

from flows.cli import main
from conftest import ROOT

SECTIONS = ("## Load the result", "## Use the dataset elsewhere", "## Use the model elsewhere")


def _blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text[text.index(section) + len(section):]
    body = body[:body.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_each_section_has_code():
    assert all(_blocks(s) for s in SECTIONS)


MAX_README_LINES = 300


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= MAX_README_LINES, \
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move reference material to docs/ and link it"


def _relative_links(path):
    """Targets of the Markdown links in `path` that point at files: no scheme (http:, mailto:), not a pure #anchor;
    the #anchor of a file link is dropped. Links inside code blocks and code spans are not links."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def test_relative_links_point_at_files():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/*.md is missing"
    broken = [f"{page.relative_to(ROOT)}: ({target})" for page in [ROOT / "README.md", *docs]
              for target in _relative_links(page) if not (page.parent / target).exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


@pytest.fixture(scope="module")
def published(tmp_path_factory, prefect_harness):
    tmp = tmp_path_factory.mktemp("readme")
    out = tmp / "outputs" / "digits"
    # the command a user types, with one evaluation seed (allowed: no intervals, the report still renders)
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(out), "--quiet",
                 "--set", f"base.cache_dir={tmp / 'cache'}", "--set", "evaluation.seeds=1",
                 "--set", "generation.num_per_class=8", "--set", "filter.min_confidence=0.0",
                 "--set", "filter.order=[memorization, near_duplicates]"]) == 0
    return tmp


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_code_runs_on_a_published_dataset(published, section, monkeypatch, capsys):
    import json

    monkeypatch.chdir(published)  # the README's paths are relative: outputs/digits/...
    scope: dict = {}
    for code in _blocks(section):
        exec(compile(code, f"README.md {section}", "exec"), scope)
    m = json.loads((published / "outputs" / "digits" / "metrics.json").read_text())
    assert m["run"]["evaluation_seeds"] == [m["run"]["evaluation_seeds"][0]]  # one seed, end to end
    if section == "## Use the dataset elsewhere":
        synthetic = sum(scope["ds"]["train"]["is_synthetic"])
        assert synthetic > 0 and scope["batch"]["pixel_values"].shape[1:] == (1, 8, 8)
        assert 0.0 <= scope["accuracy"] <= 1.0 and len(scope["df"]) == len(scope["ds"]["train"])
        written = list((published / "augmented-digits").rglob("*.png"))
        assert len(written) == len(scope["ds"]["train"]) and any(p.name.startswith("syn-") for p in written)
    elif section == "## Use the model elsewhere":
        assert len(scope["more"]) == 50 and len(list((published / "more-threes" / "3").glob("*.png"))) == 50
        assert tuple(scope["images"].shape) == (16, 1, 8, 8) and scope["images"].float().std() > 0
    else:
        assert next(iter(scope["loader"]))["label"].dtype.is_floating_point is False


def _install_commands() -> str:
    text = (ROOT / "README.md").read_text()
    body = text[text.index("## The two commands"):text.index("## Tests")]
    return re.findall(r"```bash\n(.*?)```", body, re.S)[0]


def test_ci_installs_from_the_lock_and_runs_exactly_the_readmes_test_commands():
    """The README's install command uses the lock; .ci/run does too, in fresh environments, and runs the README's
    test commands (each, verbatim) in the locked one and the default suite in the newest one."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    tests = re.findall(r"```bash\n(.*?)```", readme[readme.index("## Tests"):], re.S)[0].strip().splitlines()
    assert "-r requirements/lock.txt" in _install_commands()
    assert "python -m venv" in _install_commands()
    locked, newest = ci.split('section "newest environment')
    assert "-r requirements/lock.txt" in locked and "python -m venv" in ci
    assert "--upgrade -e" in newest and "requirements/lock.txt -e" not in newest
    for command in tests:
        assert command in locked, f".ci/run does not run the README's test command {command!r}"
    assert tests[0] in newest


def test_the_lock_satisfies_pyprojects_ranges_and_bounds_every_major_version():
    """requirements/lock.txt was made from pyproject.toml's current ranges (requirements/refresh): every direct
    dependency is pinned inside its range, and every range has an upper bound."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements" / "lock.txt").read_text(), re.M))
    pins = {canonicalize_name(k): v for k, v in pins.items()}
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/lock.txt: run requirements/refresh"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements/lock.txt pins {req.name}=={pins[name]} outside pyproject's {req.specifier}"
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req} has no upper bound"
    assert pins["torch"].endswith("+cpu"), "the lock is resolved against torch's CPU build"
