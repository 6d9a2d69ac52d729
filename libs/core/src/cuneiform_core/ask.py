"""``cuneiform-ask <service> <verb> [JSON]``: ask a running service over NATS (``cmd.<service>.<verb>``).

    cuneiform-ask readiness status
    cuneiform-ask readiness trigger '{"force": true, "who": "alice", "why": "new reward"}'
    cuneiform-ask archiver status

Prints the result as JSON and exits 0, or prints the service's error and exits 1. Connection settings
come from the environment / ``.cuneiform/stack.env`` like every service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import nats
import nats.errors

from .settings import ConnectionSettings
from .topology import Topology, command_subject


async def ask(service: str, verb: str, body: dict[str, object], timeout: float) -> dict[str, object]:
    connection = ConnectionSettings()
    nc = await nats.connect(connection.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        subject = Topology.of(connection).subject(command_subject(service, verb))
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    finally:
        await nc.close()
    answer: dict[str, object] = json.loads(reply.data)
    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cuneiform-ask", description=__doc__.split("\n")[0])
    parser.add_argument("service")
    parser.add_argument("verb")
    parser.add_argument("body", nargs="?", default="{}", help="JSON object (default: {})")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        body = json.loads(args.body)
    except json.JSONDecodeError as error:
        parser.error(f"the body is not JSON: {error}")
    try:
        answer = asyncio.run(ask(args.service, args.verb, body, args.timeout))
    except nats.errors.NoRespondersError:
        print(f"no {args.service} service answers cmd.{args.service}.{args.verb}: is it running?", file=sys.stderr)
        sys.exit(1)
    except (OSError, nats.errors.Error) as error:
        print(f"cannot reach NATS ({error!r}): is the stack running? (`cuneiform-stack status`)", file=sys.stderr)
        sys.exit(1)
    if answer.get("ok"):
        print(json.dumps(answer.get("result"), indent=2, default=str))
        return
    print(f"{args.service} {args.verb}: {answer.get('error')}", file=sys.stderr)
    sys.exit(1)
