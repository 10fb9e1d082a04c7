"""callbacks/ ships as lightning_megatron.callbacks in both wheel and editable installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import lightning_megatron.callbacks as callbacks

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_callbacks_under_the_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("lightning_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_megatron/callbacks/__init__.py" in names
    assert "lightning_megatron/callbacks/throughput.py" in names
    assert "lightning_megatron/data/corpus.txt" in names
    assert "lightning_megatron/data/self_cognition.jsonl" in names
    assert "lightning_megatron/hf/convert.py" in names and "lightning_megatron/hf/families.py" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "lightning-megatron = lightning_megatron.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(name.startswith(("callbacks/", "tests/")) for name in names)


def test_editable_install_maps_callbacks_to_the_source_folder():
    # The test environment installs the project with `pip install -e .` (noxfile.py).
    assert Path(callbacks.__file__).resolve() == ROOT / "callbacks" / "__init__.py"
    assert callbacks.ThroughputMonitor.__module__ == "lightning_megatron.callbacks.throughput"
