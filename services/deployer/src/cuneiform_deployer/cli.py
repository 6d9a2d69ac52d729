"""``cuneiform-deployer``: run the deployer, or steer it (every verb is ``cmd.deployer.<verb>``).

    cuneiform-deployer                       run the service (same as `serve`)
    cuneiform-deployer register PATH|URL --name demo-policy --version v7 --why "hand-tuned"
    cuneiform-deployer deploy demo-policy v7 --strategy canary --percent 10 --why "try v7"
    cuneiform-deployer deploy demo-policy v7 v8 --strategy ab --why "two candidates"
    cuneiform-deployer promote demo-policy [v7] --why "looks good"
    cuneiform-deployer rollback demo-policy [--to v5] --why "complaints"
    cuneiform-deployer pin demo-policy agent-17 v5 --why "debugging"   (no version: unpin)
    cuneiform-deployer status [demo-policy] | models [demo-policy [v7]] | history [demo-policy]

``register`` uploads the file (or what the URL serves) to the object store under
``models/<name>/manual/<version>/artifact`` and asks the deployer to register it; the deployer reads it
back and checks its sha256 first. Results are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from cuneiform_core.ask import ask
from cuneiform_core.cli import run_command
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuneiform-deployer",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the deployer service")

    def verb(name: str, text: str, *, reason: bool = True) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=text)
        if reason:
            command.add_argument("--why", required=True, help="the reason, kept in the deployment history")
            command.add_argument("--who", default=getpass.getuser(), help="who asks (default: your user name)")
        command.add_argument("--timeout", type=float, default=30.0)
        return command

    register = verb("register", "upload a model artifact and register it as a version")
    register.add_argument("source", help="a file path, or an http(s) URL to download")
    register.add_argument("--name", required=True, help="model name (e.g. demo-policy)")
    register.add_argument("--version", required=True, help="version to register it as (e.g. v7)")
    register.add_argument("--base-model", help="what it was trained from")

    deploy = verb("deploy", "route agents to a version: immediate, canary or A/B against the champion")
    deploy.add_argument("model_name")
    deploy.add_argument("versions", nargs="+")
    deploy.add_argument("--strategy", choices=["immediate", "canary", "ab"], default="immediate")
    deploy.add_argument("--percent", type=float, help="canary: share of the agents (default: the setting)")
    deploy.add_argument("--weights", type=float, nargs="+", help="ab: one per challenger, then the champion's")

    promote = verb("promote", "send every agent to the challenger (or a named version)")
    promote.add_argument("model_name")
    promote.add_argument("version", nargs="?")

    rollback = verb("rollback", "back to the champion of the running experiment, the previous version, or --to")
    rollback.add_argument("model_name")
    rollback.add_argument("--to", dest="to_version")

    pin = verb("pin", "pin one agent to a version (no version: unpin)")
    pin.add_argument("model_name")
    pin.add_argument("agent_id")
    pin.add_argument("version", nargs="?")

    status = verb("status", "routing, running experiments and their verdicts, reward by version", reason=False)
    status.add_argument("model_name", nargs="?")
    models = verb("models", "the registry (with a version: its lineage, trajectory ids included)", reason=False)
    models.add_argument("model_name", nargs="?")
    models.add_argument("version", nargs="?")
    history = verb("history", "every routing change, newest first", reason=False)
    history.add_argument("model_name", nargs="?")
    history.add_argument("--limit", type=int, default=50)
    return parser


async def _upload(args: argparse.Namespace, connection: ConnectionSettings) -> dict[str, Any]:
    body = await asyncio.to_thread(_read, str(args.source))
    key = f"models/{args.name}/manual/{args.version}/artifact"
    store = ObjectStore.from_settings(connection)
    print(f"uploading {len(body):,} bytes to s3://{store.bucket}/{key} …", file=sys.stderr)
    await store.put_bytes(key, body)
    return {
        "model_name": args.name,
        "version": args.version,
        "artifact_key": key,
        "sha256": hashlib.sha256(body).hexdigest(),
        "base_model": args.base_model,
        "who": args.who,
        "why": args.why,
    }


def _read(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        print(f"downloading {source} …", file=sys.stderr)
        with urllib.request.urlopen(source, timeout=120) as response:
            body: bytes = response.read()
        return body
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}: give a path to the artifact or an http(s) URL")
    return path.read_bytes()


def _request(args: argparse.Namespace) -> dict[str, Any]:
    fields = vars(args).copy()
    for name in ("command", "timeout"):
        fields.pop(name, None)
    return {k: v for k, v in fields.items() if v is not None}


async def _run(args: argparse.Namespace) -> int:
    connection = ConnectionSettings()
    body = await _upload(args, connection) if args.command == "register" else _request(args)
    answer = await ask("deployer", args.command, body, args.timeout)
    if not answer.get("ok"):
        print(f"cuneiform-deployer {args.command}: {answer.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(answer.get("result"), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in (None, "serve"):
        from .main import main as serve

        serve()
        return
    run_command("cuneiform-deployer", args.command, _run(args))
