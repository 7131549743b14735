"""The layering the docs promise: the model is a leaf, no module hides a cycle behind a
function-local import, and the public API resolves from ``modlora`` itself."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import modlora

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "modlora").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))


def test_importing_the_model_loads_no_adapters_and_no_loading():
    code = "import sys, modlora.model; print(' '.join(sorted(m for m in sys.modules if m.startswith('modlora'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "modlora.model" in loaded  # the probe ran
    assert not [m for m in loaded if m.startswith(("modlora.adapters", "modlora.loading", "modlora.pool"))], loaded


# docs/design.md, "Layers": each line imports only from the lines below it; LEAVES anything may use.
LAYERS = [("cli",), ("pipeline",), ("full",), ("evaluate", "train"), ("generation", "pool"), ("adapters", "loading"),
          ("model",), ("adapted",), ("ops",), ("dispatch", "cuda_decode"), ("cpu",), ("kernels",)]
LEAVES = {"config", "tokenizer", "prompt", "data", "fileio", "console", "hub", "figures", "paper", "distributed",
          "validate", "checkpoint", "memory", "_C"}


def _imported(path: Path) -> set[str]:
    """Top-level modlora modules (``adapters`` for ``modlora.adapters.format``) that ``path`` imports."""
    package = ["modlora", *path.relative_to(ROOT / "modlora").parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package[:len(package) - node.level + 1] if node.level else []
        for alias in node.names:
            full = base + (node.module.split(".") if node.module else [alias.name])
            if full[0] == "modlora" and len(full) > 1:
                found.add(full[1] if node.module or node.level else alias.name)
            elif full == ["modlora"]:
                found.add(alias.name)
    return found


def test_layers_import_only_downwards():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    wrong = []
    for path in sorted((ROOT / "modlora").rglob("*.py")):
        own = path.relative_to(ROOT / "modlora").with_suffix("").parts[0]
        if own in ("__init__", "__main__") or own in LEAVES:
            continue
        for dep in _imported(path):
            if dep != own and dep not in LEAVES and rank[dep] <= rank[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert wrong == []


def _local_imports(path: Path) -> list[str]:
    """modlora imports inside functions; a package's lazy ``__getattr__`` is exempt (it exists to import on use)."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name == "__getattr__":
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("modlora")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("modlora") for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_function_local_imports_of_modlora_modules():
    assert SOURCES and [hit for path in SOURCES for hit in _local_imports(path)] == []


def test_the_check_finds_a_local_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .model import Qwen2ForCausalLM\n    return Qwen2ForCausalLM\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules[__name__], "ROOT", tmp_path)
        assert _local_imports(probe) == ["probe.py:2"]


@pytest.mark.parametrize("name", modlora.__all__)
def test_public_names_resolve(name):
    assert getattr(modlora, name) is not None
    assert name in dir(modlora)


def test_unknown_public_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        modlora.nope  # noqa: B018
