"""pip's way in: `python3 -m pip install .` (in a virtual environment; Debian's python3 is
externally managed) builds the Python module moe_cpp with CMake and installs it. No network:
CMake, the compiler and the libraries are the system's (scripts/install-deps.sh --test).

MOE_CPP_BUILD_DIR=build/release takes the module from a build that has it already (the tests do);
otherwise it configures and builds the module alone in build/pip (about ten minutes on 2 cores).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = os.environ.get("MOE_CPP_BUILD_DIR")
        if build:
            build = os.path.abspath(build)
        else:
            build = os.path.join(HERE, "build", "pip")
            subprocess.check_call(["cmake", "-S", HERE, "-B", build, "-G", "Ninja",
                                   "-DCMAKE_BUILD_TYPE=Release", "-DMOE_BUILD_TESTS=OFF",
                                   f"-DPYTHON_EXECUTABLE={sys.executable}",
                                   f"-DPython3_EXECUTABLE={sys.executable}"])
            subprocess.check_call(["cmake", "--build", build, "--target", "moe_cpp_core"])
        found = glob.glob(os.path.join(build, "python", "moe_cpp", "_core*.so"))
        if not found:
            sys.exit(f"no moe_cpp/_core*.so in {build}/python: was pybind11 found when it was "
                     "configured? (scripts/install-deps.sh --test installs pybind11-dev)")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(found[0], dest)


setup(
    name="moe_cpp",
    version="0.1.0",
    description="moe.cpp's Mixture-of-Experts engine from Python: the MoE layer as a PyTorch "
                "module, checkpoints, generation, routing traces, training",
    packages=["moe_cpp"],
    package_dir={"": "python"},
    ext_modules=[Extension("moe_cpp._core", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
)
