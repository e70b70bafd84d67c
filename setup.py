"""Optional native accelerators; everything else is configured in pyproject.toml.

Both extensions are optional: without a C compiler the install still succeeds and the
pure-Python paths (which compute the same results) are used instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("routing._chainhash", ["routing/_chainhash.c"], libraries=["dl"], optional=True),
        Extension("kvcluster.core._radixwalk", ["kvcluster/core/_radixwalk.c"], optional=True),
    ]
)
