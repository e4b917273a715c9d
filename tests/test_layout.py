"""The code's plan holds: no import cycle across the repository's packages (augment/, flows/, any other), the
library imports none of the flows, and the run folder's layout spelled in one place."""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "augment"


def _packages() -> list[Path]:
    """Every package the project installs (pyproject's `packages.find.include`; augment/ is a namespace package,
    without an __init__.py): a package added there is covered here too."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({ROOT / pattern.rstrip("*") for pattern in include})


PACKAGES = _packages()


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for p in package.rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the repository's modules it imports anywhere in its source (top level, inside functions, and under
    TYPE_CHECKING alike: a cycle that only lazy imports keep alive is still a cycle in the design)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                if n and n != m and n not in {p.name for p in PACKAGES}:
                    graph[m].add(n)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_across_the_packages():
    assert {p.name for p in PACKAGES} >= {"augment", "flows"}
    graph = import_graph()
    assert len(graph) > 20 and "augment.pipeline" in graph["flows.augment_flow"]
    assert cycles(graph) == [], "import cycles (each a group of modules that import each other)"
    # the test sees a cycle that crosses packages: the one the CLI made when it lived in augment/
    graph["augment.errors"].add("flows.cli")
    assert cycles(graph) and any("flows.cli" in c and "augment.errors" in c for c in cycles(graph))


def test_the_library_imports_no_flow():
    """augment/ is a plain library: the flows, the server and the CLI import it, never the other way round."""
    found = {m: sorted(n for n in deps if n.split(".")[0] != "augment")
             for m, deps in import_graph().items() if m.split(".")[0] == "augment"}
    assert not {m: d for m, d in found.items() if d}, "augment modules importing other packages of the repo"


def _layout_names() -> set[str]:
    """Every file and folder name augment.runfolder's RunFolder gives a run folder (properties, methods, stage
    folders), from an object, not a list kept by hand."""
    from augment.runfolder import RunFolder, StageFolder

    root = RunFolder("/r")
    names = set()

    def walk(obj, depth=0):
        for attr in dir(type(obj)):
            if attr.startswith("_"):
                continue
            value = getattr(obj, attr)
            if callable(value):  # shard(i), rejected(reason), figure(name); RunFolder.stage(name) repeats folders
                if attr == "stage":
                    continue
                for arg in (0, "x"):
                    try:
                        value = value(arg)
                        break
                    except (TypeError, ValueError):
                        pass
            if isinstance(value, StageFolder):
                names.add(value.path.name)
                if depth < 3:
                    walk(value, depth + 1)
            elif isinstance(value, Path):
                names.add(value.name)

    walk(root)
    return names


# what the walk's example arguments make (shard 0, a figure or reason "x"), and README.md (also the card of an
# exported model and of a Hub repo: conventions not ours to rename); shard names are looked for as f-strings
_EXAMPLES = {"README.md", "0.png", "x", "shard-00000.npz", "shard-00000.tmp.npz"}


def test_no_module_but_runfolder_spells_a_run_folder_file_name():
    names = _layout_names()
    assert {"metrics.json", "scores.parquet", "stage.json", "results.json", "splits.npz", "info.json"} <= names
    # Names with a suffix and the distinctive folders; plain words like "data" or "filter" are also config keys.
    spelled = sorted(n for n in names if ("." in n or "-" in n or "_" in n) and n not in _EXAMPLES)
    pattern = re.compile("|".join(re.escape(f'"{n}"') + "|" + re.escape(f"'{n}'") + "|" + re.escape(f"/{n}")
                                  for n in spelled) + r"|shard-\{")
    found = []
    for p in list(PACKAGE.rglob("*.py")) + list((ROOT / "flows").glob("*.py")):
        if p == PACKAGE / "runfolder.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "run-folder file names outside augment/runfolder.py (ask RunFolder for the path):\n" + \
        "\n".join(found)


def test_no_module_of_augment_is_over_400_lines():
    """A file that grows past ~400 lines is asking to be split along a seam (docs/pipeline.md, Code layout)."""
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_every_stage_is_declared_once_with_upstream_stages_that_run_before_it():
    """The one stage list: each stage's key covers its upstream stages, which come before it in STAGES."""
    from augment.pipeline import STAGES
    from augment.stages.core import SPECS

    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names) and set(names) == set(SPECS)
    for i, s in enumerate(STAGES):
        assert set(s.upstream) <= set(names[:i]), (s.name, s.upstream)


def test_a_stage_declares_what_it_reads_once_and_only_its_own_sections():
    """A stage's upstream is derived from what it reads (each output registered once with its writer); its sections
    are its own: none that an upstream stage's key already covers. Its function takes what it reads by name, and
    calls no registered loader itself (it asks the Read it was handed), so the declaration is the whole story."""
    import inspect

    from augment.pipeline import STAGES
    from augment.stages.core import ALL, OUTPUTS, SPECS, source

    loaders = {o.load.__name__ for o in OUTPUTS.values()}
    for s in STAGES:
        inherited = set().union(*(SPECS[u].covers for u in s.upstream))
        if s.sections != ALL:
            assert not set(s.sections) & inherited, (s.name, "repeats", set(s.sections) & inherited)
        params = list(inspect.signature(s.fn).parameters)
        assert params == ["cfg", *s.reads, "log", "progress", *(["units"] if s.distributed else [])], (s.name, params)
        for r in s.reads:
            source(r)  # a name nothing writes is an error
        calls = {n.func.id for n in ast.walk(ast.parse(inspect.getsource(s.fn).lstrip()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)} - set(s.reads)  # a Read is called
        own = {o.load.__name__ for o in OUTPUTS.values() if o.stage == s.name}  # a reused stage reads its own
        assert not calls & (loaders - own), (s.name, "loads itself", calls & (loaders - own))
    # the published dataset depends on the whole config, the evaluation on every section but publish's
    assert SPECS["publish"].covers == ALL
    assert set(SPECS["evaluate"].covers) == {"data", "base", "pseudo", "selection", "lora", "generation", "filter",
                                             "evaluation"}
    assert SPECS["generate"].upstream == ("data", "base", "finetune", "pseudo")


def test_an_output_built_from_another_shares_its_load(monkeypatch):
    """A stage that reads the splits and the pseudo-labeled pool (built from the splits) loads the splits once; a
    stage that never asks loads nothing."""
    from augment.stages.core import OUTPUTS, Output, Stage

    loads = []
    monkeypatch.setitem(OUTPUTS, "splits", Output("splits", "data", lambda cfg: loads.append("splits") or "S"))
    monkeypatch.setitem(OUTPUTS, "pseudo", Output("pseudo", "pseudo", lambda cfg, s: loads.append("pseudo") or s + "P",
                                                  needs=("splits",)))
    probe = Stage("probe", "probe", "", lambda cfg, splits, pseudo, log, progress: None, reads=("splits", "pseudo"))
    reads = probe.inputs(None, {})
    assert loads == []
    assert reads["pseudo"]() == "SP" and reads["splits"]() == "S" and reads["pseudo"]() == "SP"
    assert loads == ["splits", "pseudo"]
    only = Stage("only", "probe", "", lambda cfg, pseudo, log, progress: None, reads=("pseudo",)).inputs(None, {})
    assert only["pseudo"]() == "SP" and loads[2:] == ["splits", "pseudo"]
