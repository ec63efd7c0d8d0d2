"""The transformers and PEFT ranges pyproject declares (the `hf` extra) are the ones the
tests run with: CI installs the newest inside them (Makefile DEPS), the reference machine
the oldest."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")


def declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["hf"]
    return {r.name: r for r in map(requirements.Requirement, extra)}


@pytest.mark.parametrize("name", ["transformers", "peft"])
def test_installed_version_is_in_the_declared_range(name):
    import importlib

    req = declared()[name]
    assert str(req.specifier), f"pyproject declares no range for {name}"
    version = importlib.import_module(name).__version__
    assert req.specifier.contains(version, prereleases=True), f"{name} {version} is outside {req.specifier}"


def test_makefile_installs_the_declared_ranges():
    with open(os.path.join(ROOT, "Makefile")) as f:
        deps = re.search(r"^DEPS\s*:=(.*)$", f.read(), re.M).group(1)
    items = [quoted or bare for quoted, bare in re.findall(r'"([^"]+)"|(\S+)', deps)]
    installed = {r.name: r for r in map(requirements.Requirement, items)}
    for name in ("transformers", "peft"):
        assert installed[name].specifier == declared()[name].specifier, (name, deps)
