"""The built wheel carries every subpackage, the callbacks as lit_gcpo.callbacks, and the
embedded model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    return next(out.glob("lit_gcpo-*.whl"))


def test_wheel_contains_every_module_and_the_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "lit_gcpo").rglob("*.py")]
    expected = (
        {s for s in sources}
        | {"lit_gcpo/assets/tiny-arith/" + p.name for p in (ROOT / "lit_gcpo/assets/tiny-arith").iterdir()}
        | {"lit_gcpo/assets/" + p.name for p in (ROOT / "lit_gcpo/assets").glob("*.json")}  # gpu_check's architecture
    )
    assert expected <= names, sorted(expected - names)
    assert "lit_gcpo/callbacks/uncertainty.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lit-gcpo = lit_gcpo.running.cli:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_imports_callbacks_and_finds_the_model(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import lit_gcpo.callbacks, pathlib\n"
        "from lit_gcpo.callbacks import UncertaintyCallback\n"
        "from lit_gcpo.assets.tiny_model import TINY_MODEL_PATH\n"
        "print(lit_gcpo.callbacks.__file__)\n"
        "print((pathlib.Path(TINY_MODEL_PATH) / 'model.safetensors').is_file())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(tmp_path)) and out[1] == "True"
