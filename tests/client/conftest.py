"""Fixtures of the worker client tests.

Async tests run on asyncio and on trio, both in virtual time: when every task
waits, time jumps to the next timer (trio's ``MockClock(autojump_threshold=0)``
and :class:`tests.client.helpers.VirtualClockEventLoop`), so heartbeat
schedules over minutes run in milliseconds and always the same way. Tests
that talk to a real server process override ``anyio_backend`` with real time.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing

from tests.client.helpers import VirtualClockEventLoop


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "asyncio":
        return ("asyncio", {"loop_factory": VirtualClockEventLoop})
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
