"""What every operator command does around its work: JSON on stdout, warnings only on stderr, and one
line saying what to check instead of a traceback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import nats.errors

from .logging import configure_logging

SERVERS_HINT = (
    "are the servers reachable? (`cuneiform-stack status`, or `make stack-up`; the CUNEIFORM_* settings "
    "or .cuneiform/stack.env say where they are)"
)


def run_command(program: str, command: str, work: Coroutine[Any, Any, int]) -> None:
    """Run ``work`` (returns the exit status) and exit with it; failures become one readable line."""
    configure_logging(f"{program}-cli", "WARNING", False)
    try:
        code = asyncio.run(work)
    except KeyboardInterrupt:
        code = 130
    except nats.errors.NoRespondersError:
        service = program.removeprefix("cuneiform-")
        print(f"no {service} service answers: is it running? (`{program}`, or `make up`)", file=sys.stderr)
        code = 1
    except Exception as error:  # an operator gets one line and what to check, not a traceback
        print(f"{program} {command}: {type(error).__name__}: {error}", file=sys.stderr)
        print(SERVERS_HINT, file=sys.stderr)
        code = 1
    sys.exit(code)
