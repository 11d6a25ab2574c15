from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.services_fixtures", "tests.raw_websocket"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their sources: an extension module is
    imported before the .py beside it, so an edit would silently not be under test."""
    root = Path(__file__).resolve().parent.parent
    for library in (root / "proxy").glob("_native__mypyc.*.so"):
        built = library.stat().st_mtime
        stale = [
            str(source.relative_to(root))
            for package in ("proxy", "adapters", "flags")
            for shim in (root / package).glob("*.so")
            if (source := shim.with_name(shim.name.split(".")[0] + ".py")).exists()
            and source.stat().st_mtime > built
        ]
        if stale:
            raise pytest.UsageError(
                f"compiled modules are older than {', '.join(stale)}: run `make native`"
            )
