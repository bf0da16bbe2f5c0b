"""docs/architecture.md §2: the library under ttd/ never imports export/; only the CLI (ttd/cli/__init__.py) does, lazily,
inside the commands that need it."""

import ast
import subprocess
import sys
from pathlib import Path

import ttd

PACKAGE = Path(ttd.__file__).parent


def export_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, at module level) of every `import export...` / `from export... import` in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "export" or name.startswith("export.") for name in names):
            found.append((node.lineno, id(node) in module_level))
    return found


def test_only_the_cli_imports_export_and_only_lazily():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    offenders = {str(p.relative_to(PACKAGE)): lines for p in files if p.parent.name != "cli"
                 for lines in [export_imports(p)] if lines}
    assert offenders == {}
    cli_imports = [found for p in (PACKAGE / "cli").glob("*.py") for found in export_imports(p)]
    assert cli_imports, "the CLI's export and triton commands import export/ (lazily)"
    assert not any(module_level for _, module_level in cli_imports), cli_imports


def test_importing_the_whole_library_and_the_cli_loads_no_export_module():
    code = (
        "import importlib, pkgutil, sys, ttd\n"
        "for info in pkgutil.walk_packages(ttd.__path__, 'ttd.'):\n"
        "    importlib.import_module(info.name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'export' or m.startswith('export.'))\n"
        "print('LOADED', loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout, result.stdout


# docs/architecture.md: each package (or public top-level module) imports only from those after it
LAYERS = ("cli", "serve", "train", "evaluation", "jobs", "api", "options", "segment", "data", "runtime", "model",
          "errors")
ENTRY_POINTS = {"__init__.py", "__main__.py"}  # at the top of ttd/, besides the layers that are modules


PROJECT_PACKAGES = ("ttd.", "export.", "triton_repo.")


PROJECT_ROOTS = tuple(name.rstrip(".") for name in PROJECT_PACKAGES)


def _is_module(name: str) -> bool:
    """Whether a dotted name is a module or a package of the project (a file or a folder)."""
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def ttd_imports(path: Path, source: str | None = None) -> set[str]:
    """The project modules (ttd, export, triton_repo) a file imports, lazily or not: absolute
    imports, `from ttd import cli` (a package's submodule named as an attribute) and relative
    imports (`from .. import cli`, `from .runner import x`), resolved against the file's package."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]  # the package a module (or a package's __init__) sits in
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PROJECT_PACKAGES))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.` is the file's own package, each further dot one up
                base = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else ()
                module = ".".join((*base, *(node.module.split(".") if node.module else ())))
            else:
                module = node.module or ""
            if not (module in PROJECT_ROOTS or module.startswith(PROJECT_PACKAGES)):
                continue
            if module not in PROJECT_ROOTS:
                found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}"))
    return found


def test_the_import_finder_resolves_package_attributes_and_relative_imports():
    """`from ttd import cli` and `from .. import cli` inside ttd/jobs both import ttd.cli (the
    finder missed both, so an upward import written that way passed)."""
    inside = PACKAGE / "jobs" / "example.py"
    assert ttd_imports(inside, "from ttd import cli\n") == {"ttd.cli"}
    assert ttd_imports(inside, "from .. import cli\n") == {"ttd.cli"}
    assert ttd_imports(inside, "from ..cli import common\n") == {"ttd.cli", "ttd.cli.common"}
    # as for absolute imports, `from PACKAGE import x` counts PACKAGE (its __init__) too
    assert ttd_imports(inside, "from .runner import run_job\nfrom . import report\n") == {
        "ttd.jobs.runner", "ttd.jobs", "ttd.jobs.report"}
    assert ttd_imports(PACKAGE / "jobs" / "__init__.py", "from . import runner\n") == {"ttd.jobs", "ttd.jobs.runner"}
    assert ttd_imports(inside, "import ttd.model.tags\nfrom ttd.model.tags import words\n") == {"ttd.model.tags"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_packages_import_only_downward_and_no_module_sits_at_the_top():
    top_level = [p.stem for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS]
    packages = [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert sorted(top_level + packages) == sorted(LAYERS)
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name in ENTRY_POINTS:
            continue
        layer = LAYERS.index(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
        for imported in ttd_imports(path):
            if not imported.startswith("ttd."):
                continue
            other = imported.split(".")[1]
            if other in LAYERS and LAYERS.index(other) < layer:
                upward.append(f"{module_name(path)} imports {imported}")
    assert upward == []


def test_no_import_cycle_between_modules():
    """In the library, the export toolchain and the Triton templates, lazy imports included."""
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "export").rglob("*.py"), *(PACKAGE.parent / "triton_repo").rglob("*.py")]
    graph = {module_name(p): {m for m in ttd_imports(p)} for p in files}
    modules = set(graph)
    graph = {m: {i for i in deps if i in modules and i != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodules is not a cycle of logic
    cycles = [c for c in cycles if not any(m.count(".") == 1 and c[-1].startswith(m + ".") for m in c[:-1])]
    assert cycles == []
