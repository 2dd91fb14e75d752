"""The layout, read from the code's imports: each package imports only the packages below it, no module
takes part in an import circle (function-local imports included), the probe's path stays in small
functions, and every import names Quorum the one way it is installed (``quorum.<package>``)."""

from __future__ import annotations

import ast
import itertools
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# From the ground floor up: a package may import those before it, never one after it.
LAYERS = ("schemas", "core", "broker", "accountability", "workers", "gallery", "evaluation", "review", "cli")
SMALL = ("workers", "broker")  # the probe's path: functions of at most 60 lines, files of at most 600
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 600
OUTSIDE = ("tests", "bench", "scripts")  # import Quorum as a user does: quorum.<package>
ABSOLUTE_INSIDE = {"accountability/migrations/env.py"}  # alembic loads it by file path, outside the package


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYERS:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(path: Path) -> Iterator[ast.ImportFrom | ast.Import]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _target(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The module an import names, as a dotted name under the repository root (``workers.stages``)."""
    if node.level == 0:
        name = node.module or ""
        return name.removeprefix("quorum.") if name.startswith("quorum.") else None
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        for node in _imports(path):
            if not isinstance(node, ast.ImportFrom) or (tgt := _target(mod, path, node)) is None:
                continue
            for cand in (tgt, *(f"{tgt}.{a.name}" for a in node.names)):
                if cand in mods and cand != mod:
                    edges[mod].add(cand)
    return edges


def test_each_package_imports_only_the_packages_below_it() -> None:
    upward = sorted(
        (a, b)
        for a, targets in _graph().items()
        for b in targets
        if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])
    )
    assert upward == [], f"imports that run back up: {upward}"


def test_no_module_is_in_an_import_circle() -> None:
    edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                circles.append(sorted([v, *comp]))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_the_probes_path_is_written_in_small_functions_and_files() -> None:
    long_functions, long_files = [], []
    for pkg in SMALL:
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = str(path.relative_to(REPO))
            if len(text.splitlines()) > MAX_FILE_LINES:
                long_files.append((rel, len(text.splitlines())))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if lines > MAX_FUNCTION_LINES:
                        long_functions.append((rel, node.name, lines))
    assert long_functions == [], f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
    assert long_files == [], f"files over {MAX_FILE_LINES} lines: {long_files}"


def test_quorum_is_imported_one_way_everywhere() -> None:
    """Never a bare ``workers``/``core``/... (installed, those names do not exist); inside the package,
    relative imports; outside it, ``quorum.<package>``."""
    bare, absolute_inside = [], []
    files = [p for d in (*LAYERS, *OUTSIDE) for p in (REPO / d).rglob("*.py")]
    for path in files:
        rel = str(path.relative_to(REPO))
        inside = rel.split("/")[0] in LAYERS
        for node in _imports(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if getattr(node, "level", 0):
                    continue
                top = name.split(".")[0]
                if top in LAYERS:
                    bare.append((rel, name))
                elif top == "quorum" and inside and rel not in ABSOLUTE_INSIDE:
                    absolute_inside.append((rel, name))
    assert bare == [], f"imports of a name Quorum does not install: {bare}"
    assert absolute_inside == [], f"absolute imports inside the package (use relative ones): {absolute_inside}"


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by their basename (rootdir-relative, no package in tests/unit or
    tests/integration), so two files of one name stop the whole collection with "import file mismatch"."""
    seen: dict[str, list[str]] = defaultdict(list)
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        seen[path.name].append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_shared_stack_modules_enrol_disjoint_rows() -> None:
    """Modules that enrol into the shared session stack take disjoint rows of the ci split (an engine keeps
    one template per subject and image, so a row enrolled twice is "already held" the second time), and
    every module that enrols into ``disk_stack`` takes its rows from ``tests/integration/slices.py``."""
    from tests.integration import slices

    for table, role in ((slices.GALLERY, "gallery"), (slices.DISTRACTORS, "distractor_gallery")):
        spans = sorted((start, stop, module) for module, (start, stop) in table.items())
        for (_, stop, first), (start, _, second) in itertools.pairwise(spans):
            assert stop <= start, f"{first} and {second} overlap in the {role} rows"
        assert all(0 <= a < b <= slices.SPLIT_SIZES[role] for a, b, _ in spans), spans
    enrolling = []
    for path in sorted((REPO / "tests" / "integration").glob("test_*.py")):
        text = path.read_text()
        if "disk_stack" in text and re.search(r"\benrol\(|\"enroll\"", text):
            enrolling.append(path.stem.removeprefix("test_"))
    assert sorted(m for m in enrolling if m not in slices.GALLERY) == []
