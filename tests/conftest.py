from __future__ import annotations

import pytest

pytest_plugins = ["tests.services_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
