"""Build driver: setuptools hands the native extension to CMake.

All build logic lives in CMakeLists.txt; this file only chooses the build type,
forwards ``CMAKE_ARGS`` and uses Ninja when it is installed.

pip builds in a temporary environment (its own cmake, ninja and pybind11) that
it deletes afterwards, while ``build/`` stays in the checkout. A CMake cache
left there names programs and paths that no longer exist, so every build
records the tools it configured with and starts from a clean cache when they
changed (the next ``pip install .`` in the same checkout then just works).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        assert isinstance(ext, CMakeExtension)
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        debug = int(os.environ.get("DEBUG", 0)) if self.debug is None else self.debug
        cfg = "Debug" if debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split(" ") if item]
        if os.environ.get("FASTFACE_CUDA", "").lower() in {"0", "off", "no", "false"}:
            cmake_args.append("-DFASTFACE_CUDA=OFF")
        ninja = shutil.which("ninja")
        if ninja:
            cmake_args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        fresh_cache(build_temp, cmake_args)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(
            ["cmake", "--build", ".", "--config", cfg, "--parallel", jobs],
            cwd=build_temp,
            check=True,
        )
        if getattr(self, "editable_mode", False) or self.inplace:
            # CMake also builds fastface._cuda and fastface._cuda_emu beside _C; setuptools
            # puts only the declared _C into the sources of an editable install
            suffix = sysconfig.get_config_var("EXT_SUFFIX")
            for name in ("_cuda", "_cuda_emu"):
                module = extdir / f"{name}{suffix}"
                if module.exists():
                    shutil.copy2(module, ROOT / "src" / "fastface" / module.name)


def fresh_cache(build_temp: Path, cmake_args: list[str]) -> None:
    """Drop the CMake cache in ``build_temp`` unless it was made with the same tools."""
    key = json.dumps({"cmake": shutil.which("cmake"), "args": cmake_args}, sort_keys=True)
    stamp = build_temp / "fastface-build-key.json"
    if stamp.exists() and stamp.read_text() == key:
        return
    for stale in ("CMakeCache.txt", "CMakeFiles", "build.ninja", ".ninja_deps", ".ninja_log"):
        target = build_temp / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    stamp.write_text(key)


setup(
    ext_modules=[CMakeExtension("fastface._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
)
