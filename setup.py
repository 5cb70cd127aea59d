"""Build hook: compiles csrc/ into safeckpt._sckpt with cffi (API mode).

Set SAFECKPT_NO_EXT=1 to install without the C core (the pure-Python backend is used).
"""

import os

from setuptools import setup

cffi_modules = [] if os.environ.get("SAFECKPT_NO_EXT") == "1" else ["csrc/build.py:ffibuilder"]
setup(cffi_modules=cffi_modules)
