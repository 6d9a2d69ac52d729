"""``cuneiform-stack``: start, inspect and stop the embedded local stack."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from cuneiform_core.settings import STACK_ENV_FILE

from cuneiform_stack.errors import StackError
from cuneiform_stack.stack import LocalStack, StackStatus

DEFAULT_DATA_DIR = Path(".cuneiform/stack")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stack = LocalStack(args.data_dir, args.env_file, progress=_say)
    try:
        code: int = args.command(stack, args)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; `{_invocation('down', args)}` stops whatever did start", file=sys.stderr)
        return 130
    return code


def _up(stack: LocalStack, args: argparse.Namespace) -> int:
    print(f"starting the local stack in {stack.data_dir}")
    stack.start()
    status = stack.status()
    print()
    _print_servers(status)
    if not status.healthy:
        print(f"not every server is healthy; logs are in {stack.log_dir}", file=sys.stderr)
        return 1
    print(f"connection settings written to {status.env_file}")
    print(f'  services and tools read it; `eval "$({_invocation("env", args)})"` exports it to a shell')
    print(f"logs: {stack.log_dir}")
    print(f"stop with: {_invocation('down', args)}")
    return 0


def _down(stack: LocalStack, args: argparse.Namespace) -> int:
    if not any(server.pid for server in stack.status().servers):
        print(f"the local stack in {stack.data_dir} is not running")
        return 0
    stack.stop()
    print(f"stopped the local stack in {stack.data_dir}; its data stays there for the next `up`")
    return 0


def _status(stack: LocalStack, args: argparse.Namespace) -> int:
    status = stack.status()
    _print_servers(status)
    if status.env_file is not None:
        print(f"env file: {status.env_file}")
    if not status.healthy:
        print(f"start it with: {_invocation('up', args)}", file=sys.stderr)
        return 1
    return 0


def _env(stack: LocalStack, args: argparse.Namespace) -> int:
    endpoints = stack.status().endpoints
    if endpoints is None:
        hint = _invocation("up", args)
        print(f"the local stack in {stack.data_dir} is not running; start it with: {hint}", file=sys.stderr)
        return 1
    for key, value in endpoints.as_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _print_servers(status: StackStatus) -> None:
    for server in status.servers:
        state = "healthy" if server.healthy else "DOWN" if server.pid is None else "UNHEALTHY"
        detail = f"  ({server.detail})" if server.detail else ""
        print(f"  {server.name:<9} {state:<9} {server.url}{detail}")


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _invocation(command: str, args: argparse.Namespace) -> str:
    """The command line that repeats the user's choice of directories."""
    words = ["cuneiform-stack", command]
    if args.data_dir != DEFAULT_DATA_DIR:
        words += ["--data-dir", str(args.data_dir)]
    if args.env_file is not None:
        words += ["--env-file", str(args.env_file)]
    return shlex.join(words)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuneiform-stack",
        description="The embedded local stack: nats-server (JetStream), PostgreSQL and an S3 endpoint (moto) "
        "on free loopback ports, with their data in one directory.",
    )
    _add_common_options(parser, defaults=True)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for name, handler, help_text in [
        ("up", _up, "start the servers in the background and write the env file"),
        ("down", _down, "stop the servers (their data stays)"),
        ("status", _status, "show each server and whether it answers; exit 1 if any does not"),
        ("env", _env, 'print `export` lines for a shell: eval "$(cuneiform-stack env)"'),
    ]:
        command = commands.add_parser(name, help=help_text, description=help_text)
        _add_common_options(command, defaults=False)
        command.set_defaults(command=handler)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before and after the command; a subcommand's copy only overrides when given.
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR if defaults else argparse.SUPPRESS,
        help=f"where the servers keep their data, logs and state (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None if defaults else argparse.SUPPRESS,
        help=f"where `up` writes the connection settings (default: $CUNEIFORM_ENV_FILE or {STACK_ENV_FILE})",
    )
