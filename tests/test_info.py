"""ktrs.info() and `python -m ktrs info` against what the OS reports."""

import json
import subprocess
import sys

import ktrs


def cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_info_agrees_with_proc_cpuinfo():
    d = ktrs.info()
    flags = cpuinfo_flags()
    assert "scalar" in d["available_isas"]
    assert d["selected_isa"] in d["available_isas"]
    assert d["default_threads"] >= 1 and d["physical_cores"] >= 1
    if flags is not None:
        assert ("avx512_bf16" in flags) == ("avx512bf16" in d["features"])
        assert ("amx_tile" in flags) == ("amx-tile" in d["features"])
        if "avx512_bf16" in flags and "avx512bw" in flags and "avx512vl" in flags:
            assert "avx512" in d["available_isas"]
        assert ({"avx2", "fma", "f16c"} <= flags) == ("avx2" in d["available_isas"])
    # Every tier is listed, fastest first, with what it means for speed.
    assert list(d["isa_tiers"]) == ["amx", "avx512", "avx512f", "avx2", "scalar"]
    for name, t in d["isa_tiers"].items():
        assert (t["status"] == "available") == (name in d["available_isas"]) and t["speed"]


def test_forced_isa_and_unknown_isa():
    import os

    for isa in ktrs.info()["available_isas"]:
        env = dict(os.environ, KTRS_ISA=isa)
        r = subprocess.run([sys.executable, "-m", "ktrs", "info", "--json"], capture_output=True, text=True, check=True, env=env)
        assert json.loads(r.stdout)["selected_isa"] == isa
    env = dict(os.environ, KTRS_ISA="sse9")
    r = subprocess.run([sys.executable, "-m", "ktrs", "info", "--json"], capture_output=True, text=True, check=True, env=env)
    sel = json.loads(r.stdout)["selected_isa"]
    assert sel.startswith("error") and "avx2" in sel


def test_cli_info_text_and_json():
    r = subprocess.run([sys.executable, "-m", "ktrs", "info"], capture_output=True, text=True, check=True)
    assert "selected ISA" in r.stdout and ktrs.info()["selected_isa"] in r.stdout
    r = subprocess.run([sys.executable, "-m", "ktrs", "info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["available_isas"] == ktrs.info()["available_isas"]


def test_env_threads_default(monkeypatch):
    r = subprocess.run(
        [sys.executable, "-c", "import ktrs; print(ktrs.info()['default_threads'])"],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "KTRS_THREADS": "3"},
    )
    assert r.stdout.strip() == "3"


def test_info_lists_speed_knobs_and_environment_overrides():
    import os

    env = dict(os.environ, KTRS_NB="16")
    r = subprocess.run([sys.executable, "-m", "ktrs", "info", "--json"], capture_output=True, text=True, check=True, env=env)
    knobs = json.loads(r.stdout)["tuning"]
    assert knobs["KTRS_NB"] == 16
    assert set(knobs) == set(ktrs.tuning())
    r = subprocess.run([sys.executable, "-m", "ktrs", "info"], capture_output=True, text=True, check=True, env=env)
    assert "KTRS_NB=16" in r.stdout
