from __future__ import annotations

import pytest

pytest_plugins: list[str] = []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
