"""Build hook: compiles csrc/ into safeckpt._sckpt with cffi (API mode), a stable-ABI extension.

The extension uses only Python's limited API (cffi's default), so one wheel tagged ``cp39-abi3``
serves CPython 3.9 and every later version. Without a working C compiler the install still
succeeds, with a warning, and safeckpt runs on its pure-Python backend (``safeckpt.backend ==
"python"``). Environment variables read at build time:

``SAFECKPT_NO_EXT=1``
    do not build the C core (the pure-Python backend is used).
``SAFECKPT_REQUIRE_EXT=1``
    the C core must build: a compiler error fails the install instead of falling back (release
    wheels and CI set it, so that a broken build cannot ship a slow package unnoticed).

Example:
    SAFECKPT_REQUIRE_EXT=1 python -m build     # sdist and an abi3 wheel (.ci/wheel repairs it)
"""

import os

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1; pyproject wants 77
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

# the oldest CPython whose stable ABI the wheel targets: pyproject.toml's requires-python
LIMITED_API_TAG = "cp39"
NO_EXT = os.environ.get("SAFECKPT_NO_EXT") == "1"
REQUIRE_EXT = os.environ.get("SAFECKPT_REQUIRE_EXT") == "1"
if NO_EXT and REQUIRE_EXT:
    raise SystemExit("SAFECKPT_NO_EXT=1 and SAFECKPT_REQUIRE_EXT=1 contradict each other: "
                     "unset one")


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python backend when the C core cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError) as exc:
            if REQUIRE_EXT:
                raise
            # pip caches the wheel built here: the hint says how to rebuild past that cache
            self.warn(
                f"safeckpt: the C core could not be built ({exc}); installing the pure-Python "
                "backend, whose checksums are far slower (numpy, not hardware CRC32C). For the "
                "C core, install a C compiler (gcc or clang), then `pip install "
                "--force-reinstall --no-cache-dir safeckpt`; SAFECKPT_REQUIRE_EXT=1 makes this "
                "an error.")


class AbiWheel(bdist_wheel):
    """bdist_wheel that tags the wheel cp39-abi3 when every extension uses the limited API."""

    def finalize_options(self) -> None:
        # cffi sets py_limited_api on its extension unless the interpreter cannot use it (a debug
        # or free-threaded build): the tag follows what is actually compiled
        extensions = self.distribution.ext_modules or []
        if extensions and all(getattr(ext, "py_limited_api", False) for ext in extensions):
            self.py_limited_api = self.py_limited_api or LIMITED_API_TAG
        super().finalize_options()


setup(
    cffi_modules=[] if NO_EXT else ["csrc/build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt, "bdist_wheel": AbiWheel},
)
