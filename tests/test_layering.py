"""DESIGN §2: the library under ttd/ never imports export/; only the CLI (ttd/cli.py) does, lazily,
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
    offenders = {str(p.relative_to(PACKAGE)): lines for p in files if p.name != "cli.py"
                 for lines in [export_imports(p)] if lines}
    assert offenders == {}
    cli_imports = export_imports(PACKAGE / "cli.py")
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
