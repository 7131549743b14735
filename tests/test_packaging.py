"""A plain (non-editable) install ships modlora, modlora.kernels and the embedded assets, and no
top-level ``kernels`` package (that name belongs to another project on PyPI). Built where no C++
compiler can be found, it installs without modlora._C and says so in one log line."""

import importlib.util
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_modlora_and_its_kernels(tmp_path):
    # No compiler on PATH (only Python's own bin directory) and none named by CXX.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "CXX": "no-such-c++"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(tmp_path / "dist"), str(ROOT)], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    assert "no C++ compiler found: building without modlora._C" in build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("modlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "modlora/kernels/__init__.py" in names
    assert "modlora/adapters/controller.py" in names  # every subpackage, not only the top one
    assert "modlora/assets/qwen2.5-tokenizer.json.gz" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any(n.startswith("modlora/_C") for n in names), "the in-tree build of _C leaked into the wheel"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = ("import modlora, modlora.kernels, modlora.adapters, modlora.tokenizer as t, modlora.cpu as e; "
             "print(modlora.__file__); print(modlora.kernels.__file__); print(t.Tokenizer.default().vocab_size); "
             "print(e.HAVE_C)")
    # -S: no .pth files run, so an editable install of modlora (CI's) cannot answer for the wheel.
    path = os.pathsep.join([str(target), *site.getsitepackages()])
    run = subprocess.run([sys.executable, "-S", "-c", probe], env={**env, "PYTHONPATH": path}, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    out = run.stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out[:2]), out
    assert int(out[2]) > 150000
    assert out[3] == "False"
    log = [line for line in run.stderr.splitlines() if "modlora._C" in line]
    assert len(log) == 1 and "uses the torch path" in log[0], run.stderr


def test_the_source_tree_does_not_shadow_another_kernels_package():
    """transformers >= 5.25 imports Hugging Face's `kernels`: under `python -m pytest` from the
    repository root, the root's kernels/ folder (modlora.kernels) answered for it and every test
    that loads transformers failed (tests/conftest.py keeps the root off sys.path)."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not Path(spec.origin).resolve().is_relative_to(ROOT / "kernels")
