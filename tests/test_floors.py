"""The floors of requirements.txt hold: a second environment with exactly the lowest allowed
version of every requirement runs tests/floors_smoke.py. Slow tier: the environment is built once
(about 3.5 GB from PyPI, a few minutes) under ~/.cache/cifar-vit-vs-cnn/, then reused; the smoke
takes about 5 minutes on 2 cores."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def floor_pins(requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """'name==lowest' for every 'name>=lowest' line (comments dropped)."""
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line)
        assert m, f"requirements.txt: {line!r} has no '>=' floor to test"
        pins.append(f"{m.group(1)}=={m.group(2)}")
    return pins


def test_every_requirement_has_a_floor_that_the_floors_test_installs():
    pins = floor_pins()
    names = {p.split("==")[0] for p in pins}
    assert {"torch", "torchvision", "timm", "pandas", "matplotlib"} <= names, pins


def floors_python(pins: list[str]) -> Path:
    key = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "cifar-vit-vs-cnn" / f"floors-{key}"
    python = folder / "bin" / "python"
    if not (folder / "complete").is_file():
        venv.create(folder, with_pip=True, clear=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", *pins],
                           capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, f"installing the floors {pins} failed:\n{r.stderr[-3000:]}"
        (folder / "complete").write_text("\n".join(pins))
    return python


def test_the_lowest_allowed_versions_run_the_floors_smoke():
    python = floors_python(floor_pins())
    r = subprocess.run([str(python), "tests/floors_smoke.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "floors smoke:" in r.stdout and not re.search(r"^FAIL", r.stdout, re.M), r.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-q"]))
