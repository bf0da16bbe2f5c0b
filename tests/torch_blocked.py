"""Run Python with the `torch` extra (torch, torchvision, open_clip, safetensors, onnx) unimportable: what the base install
(no `torch` extra) sees, inside the full test environment (docs/edge.md).

    python tests/torch_blocked.py -m ttd tag ...      # a module, as `python -m`
    python tests/torch_blocked.py -c "import ttd..."  # a command
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED = ("torch", "torchvision", "open_clip", "safetensors", "onnx", "onnxscript")  # the `torch` extra


class BlockTorch(importlib.abc.MetaPathFinder):
    """Makes `import torch` (and its kin) fail as it does where the package is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests/torch_blocked.py)", name=name)
        return None


def install() -> None:
    sys.meta_path.insert(0, BlockTorch())


if __name__ == "__main__":
    install()
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    elif len(sys.argv) >= 3 and sys.argv[1] == "-c":
        code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.exit("usage: torch_blocked.py -m MODULE [ARGS...] | -c CODE [ARGS...]")
