"""
A private PostgreSQL primary with a streaming standby (pg_basebackup -R),
for the tests of what mailgate does as administrators deploy it for high
availability: each server on 127.0.0.1 on a free port, in a directory of
its own under /tmp, never the suite's shared cluster.  Stopped, and its
files removed, by L{ReplicatedCluster.stop}.

initdb, the slow part (about two seconds), runs once per process: each
cluster starts from a copy of that one.
"""

import atexit
import os
import shutil
import subprocess
import tempfile
import time

import psycopg

from pgserver import asPostgres, freePort, serverAccount, serverBinaries

ROLE = "mailgate"
PASSWORD = "mailgate"
DATABASE = "mail"
DEADLINE = 30

_template = None


def _run(command):
    result = subprocess.run(asPostgres(command), capture_output=True, text=True, timeout=DEADLINE)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()}")
    return result


def _own(path):
    if os.getuid() == 0:
        shutil.chown(path, serverAccount())


def _scratch(prefix):
    """
    A directory of our own, in memory (/dev/shm) where there is room for a
    few clusters (copying and streaming their files takes seconds on a
    busy disk), else under /tmp.
    """
    where = None
    try:
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize > 1 << 30 and os.access("/dev/shm", os.W_OK):
            where = "/dev/shm"
    except OSError:
        pass
    directory = tempfile.mkdtemp(prefix=prefix, dir=where)
    _own(directory)
    return directory


def _templateDirectory(binaries):
    """
    A data directory made by initdb (trust for local and loopback
    connections, replication included: initdb's own pg_hba.conf; WAL in
    segments of 1 MB, not 16, for less to copy), with the role, the
    database and mailgate's schema in it, shared by the clusters this
    process makes, which copy it.
    """
    from mailgate.testing import memoryStore

    global _template
    if _template is None:
        directory = _scratch("mailgate-pgtemplate-")
        atexit.register(shutil.rmtree, directory, True)
        data = os.path.join(directory, "data")
        _run([
            os.path.join(binaries, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
            "--wal-segsize=1",
        ])
        server = _Server(binaries, data, directory)
        try:
            with psycopg.connect(server.url(user="postgres", dbname="postgres"), autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
                conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE} STRATEGY FILE_COPY")
            memoryStore(server.url()).close()
        finally:
            server.stop("fast")
        _template = data
    return _template


class _Server:
    def __init__(self, binaries, data, directory):
        self.data = data
        self.port = freePort()
        self._pgctl = os.path.join(binaries, "pg_ctl")
        self._log = os.path.join(directory, os.path.basename(data) + ".log")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {directory} -c fsync=off -c full_page_writes=off"
        )
        _run([self._pgctl, "-D", data, "-l", self._log, "-o", options, "-w", "-t", str(DEADLINE), "start"])

    def stop(self, mode="immediate"):
        subprocess.run(
            asPostgres([self._pgctl, "-D", self.data, "-m", mode, "-w", "stop"]),
            capture_output=True, timeout=DEADLINE,
        )

    def url(self, user=ROLE, dbname=DATABASE):
        return f"postgresql://{user}:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"


class ReplicatedCluster:
    """
    A primary (C{primary}) with a database C{mail} owned by the role
    C{mailgate}, mailgate's schema in it, and a hot standby of it (C{standby}) streaming from it,
    synchronously (C{synchronous_standby_names}): a commit is answered
    once the standby has it, so a failover loses nothing committed, as
    README's recipe sets it up.

    Used as a context manager, everything is stopped on the way out.
    """

    def __init__(self):
        binaries = serverBinaries()
        self._binaries = binaries
        self.directory = _scratch("mailgate-pgha-")
        self.primary = self.standby = None
        try:
            primary = os.path.join(self.directory, "primary")
            _run(["cp", "-a", _templateDirectory(binaries), primary])
            self.primary = _Server(binaries, primary, self.directory)
            standby = os.path.join(self.directory, "standby")
            _run([
                os.path.join(binaries, "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
                "-U", "postgres", "-D", standby, "-R", "-c", "fast", "--no-sync",
            ])
            self.standby = _Server(binaries, standby, self.directory)
            with psycopg.connect(self.primary.url(user="postgres", dbname="postgres"), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
        except BaseException:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def url(self, *servers):
        """
        A URL naming C{servers} in that order (libpq tries them so).
        """
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in servers)
        return f"postgresql://{ROLE}:{PASSWORD}@{hosts}/{DATABASE}"

    def caughtUp(self):
        """
        Wait until the standby has replayed everything the primary wrote
        so far.
        """
        with psycopg.connect(self.primary.url(), autocommit=True) as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + DEADLINE
        with psycopg.connect(self.standby.url(), autocommit=True) as conn:
            while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the standby did not catch up")
                time.sleep(0.02)

    def promote(self):
        """
        Make the standby a primary (as a failover does), once it is.
        """
        _run([os.path.join(self._binaries, "pg_ctl"), "-D", self.standby.data, "-w", "-t", str(DEADLINE), "promote"])

    def stop(self):
        for server in (self.standby, self.primary):
            if server is not None:
                server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class BlackHole:
    """
    An address on 127.0.0.1 that takes no connection and refuses none, as
    a server whose machine is gone (a failover's old primary): a listener
    whose queue of connections not yet accepted is full, so the kernel
    drops every new SYN unanswered (with the default
    C{tcp_abort_on_overflow} = 0).

    @ivar port: its port.
    """

    def __init__(self):
        import socket

        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(filler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sock in self._fillers + [self._listener]:
            sock.close()
