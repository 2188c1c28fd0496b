"""The build scripts: architecture parsing, and that README and CI run the same test command."""
import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_module():
    import setuptools

    spec = importlib.util.spec_from_file_location("xrayforge_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: None  # load the helpers without running a build
    try:
        spec.loader.exec_module(mod)
    finally:
        setuptools.setup = real_setup
    return mod


def test_cuda_arch_list_parsing():
    mod = _setup_module()
    assert mod.cmake_archs("8.0;9.0") == "80;90"
    assert mod.cmake_archs("9.0+PTX") == "90"
    assert mod.cmake_archs("8.6 9.0") == "86;90"
    with pytest.raises(ValueError, match="names no architecture"):
        mod.cmake_archs(" ; ")


def test_readme_starts_with_the_demo_and_the_command_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '# tests$' README.md" in ci
    commands = [line for line in readme[:6] if line and not line.startswith(("#", "`"))]
    assert "xrayforge demo" in commands[0] and commands[0].startswith("pip install")
    assert commands[1].rstrip().endswith("# tests")
    assert re.search(r"pip install torch==2\.13\.0 .*pytest", commands[1])


def test_ci_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)
