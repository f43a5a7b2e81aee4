"""The optional C extension (neuromerge_cli/_kernels.c); everything else is in pyproject.toml.

Where it cannot be built (no C compiler) the package still installs, and kernels.py falls back to
torch operations that give the same tensors."""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
setup(ext_modules=[Extension("neuromerge_cli._kernels", ["neuromerge_cli/_kernels.c"],
                             extra_compile_args=flags, optional=True)])
