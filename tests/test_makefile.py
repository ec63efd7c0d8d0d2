"""The Makefile's set-up stamp follows DEPS: an existing .venv installs what a changed
DEPS adds (CI's fresh clone installs everything anyway)."""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_setup_reruns_when_deps_change():
    if not glob.glob(os.path.join(ROOT, ".venv", ".ktrs-deps-*")):
        pytest.skip("no .venv set up by `make setup` in this checkout")
    dry = lambda *a: subprocess.run(["make", "-n", "setup", *a], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "pip install" not in dry()  # set up for the current DEPS: nothing to do
    assert "pip install" in dry("DEPS=torch numpy pytest hypothesis an-added-package")
