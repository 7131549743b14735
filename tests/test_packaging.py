"""A plain (non-editable) install ships modlora, modlora.kernels and the embedded assets, and no
top-level ``kernels`` package (that name belongs to another project on PyPI)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_modlora_and_its_kernels(tmp_path):
    env = {**os.environ, "MODLORA_BUILD_EXT": "0"}  # the C++ build is CI's own step; keep this fast
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("modlora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "modlora/kernels/__init__.py" in names
    assert "modlora/assets/qwen2.5-tokenizer.json.gz" in names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = ("import modlora, modlora.kernels, modlora.tokenizer as t; "
             "print(modlora.__file__); print(modlora.kernels.__file__); print(t.Tokenizer.default().vocab_size)")
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out[:2]), out
    assert int(out[2]) > 150000
