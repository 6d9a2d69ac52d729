"""Which failures the consumer runtime retries (a dependency is down) and which it isolates (bad input)."""

from __future__ import annotations

import asyncpg
from cuneiform_core.runtime import TransientError, is_transient


def test_dead_connections_are_transient_and_programming_errors_are_not() -> None:
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TransientError("down"))
    assert is_transient(asyncpg.InterfaceError("cannot perform operation: connection is closed"))
    # The server went away mid-operation; asyncpg refuses the next call on that connection.
    assert is_transient(asyncpg.InterfaceError("cannot perform operation: another operation is in progress"))
    assert not is_transient(asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed"))
    assert not is_transient(ValueError("bad input"))
