"""The optional C extension (neuromerge_cli/_kernels.c); everything else is in pyproject.toml.

Where it cannot be built (no C compiler) the package still installs, and kernels.py falls back to
torch operations that give the same tensors."""

import sys

from setuptools import Extension, setup

# -fno-wrapv undoes the -fwrapv of CPython's own flags (the kernels never overflow a signed integer): with it, gcc
# could not count the iterations of the `i + LANES <= n` loops and laid out the float16 histogram loop 4x slower.
flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-wrapv"]
setup(ext_modules=[Extension("neuromerge_cli._kernels", ["neuromerge_cli/_kernels.c"],
                             extra_compile_args=flags, optional=True)])
