"""Build sae_fast's compiled modules with CMake. Switches, read once from the environment:

    SAE_FAST_NATIVE=1|0        -march=native for the CPU kernels (0 for wheels that travel)
    SAE_FAST_WERROR=0|1        compile with -Wall -Wextra -Werror (CI)
    SAE_FAST_BUILD_TYPE=Release
    SAE_FAST_JOBS=<n>          parallel compile jobs
The C++ core needs no torch to build: kernels take raw pointers and sizes.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ENV = {
    "native": os.environ.get("SAE_FAST_NATIVE", "1"),
    "werror": os.environ.get("SAE_FAST_WERROR", "0"),
    "build_type": os.environ.get("SAE_FAST_BUILD_TYPE", "Release"),
    "jobs": os.environ.get("SAE_FAST_JOBS", str(os.cpu_count() or 1)),
}


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_BUILD_TYPE={ENV['build_type']}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSAE_FAST_OUTPUT_DIR={out_dir}",
            f"-DSAE_FAST_NATIVE={'ON' if ENV['native'] == '1' else 'OFF'}",
            f"-DSAE_FAST_WERROR={'ON' if ENV['werror'] == '1' else 'OFF'}",
        ]
        try:
            import ninja  # noqa: F401
            cfg.append("-GNinja")
        except ImportError:
            pass
        subprocess.run(["cmake", str(ROOT), *cfg], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", ENV["jobs"]], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("sae_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
