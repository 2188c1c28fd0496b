"""Build: pure Python + Triton everywhere; the CUDA extension xrayforge._C where nvcc exists.

Environment:
  XRAYFORGE_BUILD_CUDA=1    build the extension and fail if it cannot be built
  XRAYFORGE_BUILD_CUDA=0    never build it
  (unset)                   build it when nvcc, CMake and pybind11 are present; else say why
  TORCH_CUDA_ARCH_LIST      architectures, e.g. "8.0;9.0" (default), "9.0+PTX"
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

DEFAULT_ARCHS = "8.0;9.0"


def _find_nvcc():
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cmake_archs(spec):
    """'8.0;9.0+PTX' or '8.0 9.0' -> '80;90' (CMake's CUDA_ARCHITECTURES)."""
    archs = []
    for item in re.split(r"[;\s,]+", spec.strip()):
        if item:
            archs.append(item.replace("+PTX", "").replace(".", ""))
    if not archs:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={spec!r} names no architecture")
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds csrc/ with CMake, or skips it (saying why) unless XRAYFORGE_BUILD_CUDA=1."""

    def _skip_reason(self):
        mode = os.environ.get("XRAYFORGE_BUILD_CUDA", "")
        if mode == "0":
            return "XRAYFORGE_BUILD_CUDA=0"
        if shutil.which("cmake") is None:
            return "cmake was not found on PATH"
        if _find_nvcc() is None:
            return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
        try:
            import pybind11  # noqa: F401
        except ImportError:
            return "pybind11 is not installed"
        return None

    def run(self):
        reason = self._skip_reason()
        if reason is not None:
            if os.environ.get("XRAYFORGE_BUILD_CUDA") == "1":
                raise RuntimeError(f"XRAYFORGE_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
            print(f"xrayforge: not building the CUDA extension: {reason}; the Triton and torch "
                  "backends still work", file=sys.stderr)
            self.extensions = []
        super().run()

    def build_extension(self, ext):
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        archs = cmake_archs(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
        configure = ["cmake", "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir,
                     f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}", f"-DXRAYFORGE_CUDA_ARCHS={archs}",
                     f"-DXRAYFORGE_OUTPUT_DIR={out_dir}", f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        try:
            subprocess.run(configure, check=True)
            subprocess.run(["cmake", "--build", build_dir, "--parallel", str(os.cpu_count() or 2)], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            if os.environ.get("XRAYFORGE_BUILD_CUDA") == "1":
                raise
            print(f"xrayforge: the CUDA extension failed to build ({exc}); continuing without it",
                  file=sys.stderr)


setup(
    name="xrayforge",
    version="0.1.0",
    description="Progressive GANs for chest radiographs, latent class optimisation and fast exact FID",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["xrayforge", "xrayforge.*"]),
    ext_modules=[CMakeExtension("xrayforge._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "pydicom>=3.0",  # pydicom.pixels (3.0) reads the pixel data
        "pillow>=9.0",
        "tqdm>=4.60",
        "matplotlib>=3.5",
    ],
    extras_require={
        "nvtx": ["nvtx>=0.2"],
        "test": ["pytest>=7", "pytest-xdist>=3", "pytest-benchmark>=4", "scipy>=1.10", "selenium>=4.10", "prdc>=0.2"],
    },
    entry_points={"console_scripts": ["xrayforge = xrayforge.cli:main"]},
)
