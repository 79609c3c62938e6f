"""Builds the one native piece: the container's PID 1 (reconciler/launcher/pid1.c), a static executable.

Everything else is in pyproject.toml. Static because it runs inside a container's root filesystem,
where the host's dynamic loader and libc are not; see pid1.c for why it exists. setuptools' build_ext
does the compiling (it knows the C compiler and runs for `pip install .` and `pip install -e .`
alike); only the file name and the static link differ from an extension module.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class StaticExecutable(Extension):
    """A program, not an importable module: linked statically, with no suffix in its file name."""


class BuildExt(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        if isinstance(self.ext_map.get(fullname), StaticExecutable):
            return os.path.join(*fullname.split("."))
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, StaticExecutable):
            super().build_extension(ext)
            return
        target = self.get_ext_fullpath(ext.name)
        objects = self.compiler.compile(ext.sources, output_dir=self.build_temp,
                                        extra_postargs=["-O2", "-Wall", "-Werror"])
        self.compiler.link_executable(objects, os.path.basename(target), output_dir=os.path.dirname(target) or ".",
                                      extra_preargs=["-static", "-s"])


setup(
    ext_modules=[StaticExecutable("reconciler.launcher.pid1", ["reconciler/launcher/pid1.c"])],
    cmdclass={"build_ext": BuildExt},
)
