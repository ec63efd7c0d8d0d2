"""Runs the hypothesis fuzz suite (tests/fuzz_machine.py) in a child process: a crash
(abort, segfault) there fails this test with the last case the child started, instead
of killing the test run. `KTRS_FUZZ_EXAMPLES` sets the budget (CI: the default, well
under 3 minutes: ~30 s here); `KTRS_FUZZ_RANDOM=1` explores new cases instead of the fixed seed."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("hypothesis")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_fuzz_api_in_a_child_process(tmp_path):
    log = tmp_path / "cases.log"
    env = {**os.environ, "KTRS_FUZZ_LOG": str(log), "KTRS_THREADS": ""}
    env.setdefault("KTRS_FUZZ_EXAMPLES", "40")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(HERE, "fuzz_machine.py"), "-q", "-x", "-p", "no:cacheprovider", "--hypothesis-show-statistics"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=170,
    )
    last = log.read_text().splitlines()[-15:] if log.exists() else []
    assert r.returncode == 0, (
        f"fuzz child exited {r.returncode} (negative: killed by signal {-r.returncode})\n"
        + "last cases:\n  " + "\n  ".join(last) + "\n" + r.stdout[-6000:] + r.stderr[-3000:]
    )
    assert "2 passed" in r.stdout, r.stdout[-2000:]
