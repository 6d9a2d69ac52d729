"""``cuneiform-archiver``: the service, and the operator's commands on the archive and datasets.

    cuneiform-archiver                      run the service (same as ``serve``)
    cuneiform-archiver segments [--verify]  what the archive holds
    cuneiform-archiver rebuild --dsn DSN [--since T] [--until T] [--compare DSN]
    cuneiform-archiver republish [--since T] [--until T] [--prefix P]
    cuneiform-archiver retention [--older-than-days N] [--apply]
    cuneiform-archiver export [filters…]    build a dataset now (see --help)

Connection settings come from the environment / ``.cuneiform/stack.env`` like every service.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cuneiform_core.cli import run_command
from cuneiform_core.db import create_pool
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import TRAJECTORIES, Topology

from .settings import ArchiverSettings


def _when(text: str) -> datetime:
    """ISO time (UTC if no zone), or a relative one: ``2h``, ``3d``, ``30m`` ago."""
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(**{units[text[-1]]: float(text[:-1])})
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _progress(label: str) -> Callable[[int, int], None]:
    """A one-line progress display on stderr (a line per step when not a terminal)."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        text = f"{label}: {done}/{total}"
        if tty:
            print(f"\r{text}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(text, file=sys.stderr, flush=True)

    return show


def _print(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode())


async def _segments(args: argparse.Namespace, connection: ConnectionSettings) -> int:
    from .replay import load_manifests
    from .retention import ArchiveVerifier
    from .segments import ArchiveIndex, stream_prefix

    store = ObjectStore.from_settings(connection)
    stream = Topology.of(connection).stream(TRAJECTORIES)
    index = ArchiveIndex.from_keys(stream, await store.list_keys(stream_prefix(stream)))
    manifests = await load_manifests(store, index)
    summary: dict[str, Any] = {
        "bucket": store.bucket,
        "prefix": stream_prefix(stream),
        "segments": len(index.segments),
        "events": sum(m["count"] for m in manifests.values()),
        "bytes": sum(m["bytes"] for m in manifests.values()),
        "raw_bytes": sum(m["raw_bytes"] for m in manifests.values()),
        "first_seq": index.segments[0].first_seq if index.segments else None,
        "last_seq": index.resume_after or None,
        "first_time": min((m["first_time"] for m in manifests.values()), default=None),
        "last_time": max((m["last_time"] for m in manifests.values()), default=None),
        "chain_breaks": index.chain_breaks(),
        "interrupted_writes": index.orphans,
    }
    if args.verify:
        proof = await ArchiveVerifier(store, stream).prove()
        summary["verified_through_seq"] = proof.through
        summary["verified_segments"] = proof.segments
        summary["unverified"] = proof.unverified
    _print(summary)
    return 0 if not summary["chain_breaks"] and not summary.get("unverified") else 1


async def _rebuild(args: argparse.Namespace, connection: ConnectionSettings) -> int:
    from .replay import rebuild, table_checksums

    store = ObjectStore.from_settings(connection)
    stream = Topology.of(connection).stream(TRAJECTORIES)
    report = await rebuild(
        store,
        stream,
        args.dsn,
        since=args.since,
        until=args.until,
        allow_nonempty=args.allow_nonempty,
        progress=_progress("segments replayed"),
    )
    result: dict[str, Any] = {"rebuild": report.as_dict(), "checksums": await table_checksums(args.dsn)}
    status = 0
    if args.compare:
        original = await table_checksums(args.compare)
        differ = [t for t in original if original[t] != result["checksums"][t]]
        result["compared_with"] = args.compare.rsplit("@", 1)[-1]
        result["identical"] = not differ
        result["differing_tables"] = differ
        status = 0 if not differ else 1
    _print(result)
    return status


async def _republish(args: argparse.Namespace, connection: ConnectionSettings) -> int:
    import nats

    from .replay import republish

    store = ObjectStore.from_settings(connection)
    stream = Topology.of(connection).stream(TRAJECTORIES)
    nc = await nats.connect(connection.nats_url)
    try:
        sent = await republish(
            store,
            stream,
            nc,
            target_prefix=args.prefix,
            since=args.since,
            until=args.until,
            progress=_progress("segments republished"),
        )
    finally:
        await nc.close()
    _print({"republished": sent})
    return 0


async def _retention(args: argparse.Namespace, connection: ConnectionSettings) -> int:
    from .retention import ArchiveVerifier, apply_retention

    settings = ArchiverSettings()
    days = args.older_than_days if args.older_than_days is not None else settings.retention_days
    if days <= 0:
        print("give --older-than-days N (or set CUNEIFORM_ARCHIVER_RETENTION_DAYS)", file=sys.stderr)
        return 2
    store = ObjectStore.from_settings(connection)
    stream = Topology.of(connection).stream(TRAJECTORIES)
    pool = await create_pool(connection.pg_dsn, "archiver", max_size=2)
    try:
        verifier = ArchiveVerifier(store, stream)
        report = await apply_retention(pool, verifier, timedelta(days=days), dry_run=not args.apply)
    finally:
        await pool.close()
    _print(report.as_dict())
    if not args.apply:
        print("dry run: nothing deleted; add --apply to delete", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuneiform-archiver", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the archiver service (the default)")
    seg = sub.add_parser("segments", help="summarize the raw archive")
    seg.add_argument("--verify", action="store_true", help="read back every segment's size and sha256")
    reb = sub.add_parser("rebuild", help="rebuild the recorder's tables in an empty database from the archive")
    reb.add_argument("--dsn", required=True, help="PostgreSQL DSN of the (empty) target database")
    reb.add_argument("--since", type=_when, help="ISO time or relative (2h, 3d)")
    reb.add_argument("--until", type=_when)
    reb.add_argument("--compare", metavar="DSN", help="compare the rebuilt tables with this database's")
    reb.add_argument("--allow-nonempty", action="store_true", help="add to a database that has events already")
    rep = sub.add_parser("republish", help="publish archived events onto the TRAJECTORIES stream again")
    rep.add_argument("--since", type=_when)
    rep.add_argument("--until", type=_when)
    rep.add_argument("--prefix", help="target namespace (nats_prefix); default: the subjects as archived")
    ret = sub.add_parser("retention", help="delete old, archived trajectories from PostgreSQL (dry run by default)")
    ret.add_argument("--older-than-days", type=float)
    ret.add_argument("--apply", action="store_true", help="really delete")
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub: Any) -> None:
    exp = sub.add_parser(
        "export",
        help="build a dataset now from filtered trajectories (ART + OpenAI chat JSONL + manifest)",
        description="Select trajectories from the recorder's tables and write datasets/<dataset_id>/ to the bucket.",
    )
    exp.add_argument("--since", type=_when, help="finalized at or after (ISO time, or 2h / 3d ago)")
    exp.add_argument("--until", type=_when, help="finalized at or before")
    exp.add_argument("--agent", action="append", default=[], help="agent id (repeatable)")
    exp.add_argument("--scenario", action="append", default=[], help="scenario id (repeatable)")
    exp.add_argument("--status", action="append", default=[], help="trajectory status (default: completed)")
    exp.add_argument("--min-reward", type=float, help="only trajectories with at least this reward")
    exp.add_argument("--model-version", help="only trajectories produced by this model version")
    exp.add_argument("--limit", type=int, help="at most this many trajectories (most recent first)")
    exp.add_argument("--publish", action="store_true", help="also publish pipeline.dataset.exported")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in (None, "serve"):
        from .main import main as serve

        serve()
        return
    connection = ConnectionSettings()
    commands = {
        "segments": _segments,
        "rebuild": _rebuild,
        "republish": _republish,
        "retention": _retention,
        "export": _export,
    }
    run_command("cuneiform-archiver", args.command, commands[args.command](args, connection))


async def _export(args: argparse.Namespace, connection: ConnectionSettings) -> int:
    from .datasets import run_cli_export

    code: int = await run_cli_export(args, connection, ArchiverSettings(), progress=_progress("trajectories exported"))
    return code
