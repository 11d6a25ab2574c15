"""Build of strangler: the modules on the per-request path compiled with mypyc.

The metadata lives in pyproject.toml. This file only adds the compiled modules: the
same typed Python sources, turned into C extension modules by mypyc (part of mypy),
which takes a third of the CPU time off every relayed exchange. The sources stay the
package's reference: with ``STRANGLER_NO_EXTENSIONS=1`` in the environment, or where no
C compiler is found, the wheel is pure Python and behaves the same, only slower.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The per-request path: the listener, the upstream pool, the relays and what they call
# on every exchange, and the pure core that reads, normalises and compares events.
COMPILED = [
    "proxy/server.py",
    "proxy/context.py",
    "proxy/dispatch.py",
    "proxy/upstream.py",
    "proxy/http_relay.py",
    "proxy/websocket_direct.py",
    "proxy/websocket_relay.py",
    "proxy/headers.py",
    "proxy/routing.py",
    "proxy/metrics.py",
    "proxy/experiment.py",
    "proxy/observation.py",
    "proxy/shadow.py",
    "proxy/turns.py",
    "flags/file.py",
    "flags/evaluation.py",
    "adapters/events.py",
    "adapters/framing.py",
    "adapters/ndjson.py",
    "adapters/sse.py",
    "adapters/json_body.py",
    "adapters/websocket.py",
    "adapters/normalise.py",
    "adapters/compare.py",
    "adapters/contract.py",
    "adapters/isolation.py",
]


# Compiling takes a minute; only the commands that build need it (not the metadata).
_BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


class OptionalBuildExt(build_ext):
    """Falls back to the pure-Python package when the C compiler fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # any compiler failure means: pure Python
            _warn(f"compiling failed ({error}); building the pure-Python package")
            self.extensions = []


def _warn(message: str) -> None:
    print(f"strangler build: {message}", file=sys.stderr)


def _extensions() -> list[object]:
    if os.environ.get("STRANGLER_NO_EXTENSIONS") or not _BUILDS.intersection(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc (mypy) is not installed; building the pure-Python package")
        return []
    # One shared library, named inside the proxy package so that the wheel holds only
    # the three packages.
    try:
        return mypycify(COMPILED, opt_level="3", group_name="proxy._native")
    except (Exception, SystemExit) as error:  # mypyc exits on a type error
        _warn(f"mypyc cannot compile the modules ({error}); building the pure-Python package")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
