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


def test_readme_python_api_example_runs(monkeypatch, tmp_path):
    """The README's Python API block, run as a newcomer pastes it; only the lines that need files
    the reader has (a pytorch_GAN_zoo checkpoint, archives, Inception weights) are left out."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    needs_files = ("load_pytorch_gan_zoo(", "compute_fid(", "run_tstr(")
    kept = [line for line in block.splitlines() if not any(k in line for k in needs_files)]
    assert len(kept) < len(block.splitlines()) and any("bootstrap_auroc(" in line for line in kept)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    namespace: dict = {}
    exec(compile("\n".join(kept), "README.md (Python API)", "exec"), namespace)
    assert tuple(namespace["img"].shape) == (8, 1, 64, 64)
    assert namespace["y"].shape == namespace["x"].shape and namespace["lo"] <= namespace["hi"]
