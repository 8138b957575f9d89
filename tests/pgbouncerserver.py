"""
A private PgBouncer (Debian's package, tests/sysdeps.sh) in front of the
suite's PostgreSQL server, for the tests of what mailgate does behind a
connection pooler: listening on 127.0.0.1 on a free port, in the pool mode
asked for, stopped when the test ends.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pgserver import serverAccount


def pgbouncerBinary():
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer",) if os.access(path, os.X_OK)), None
    )


class PrivatePgBouncer:
    """
    PgBouncer relaying to the server of C{url} (a C{postgresql://} URL
    with a user and a password, TCP), its database under the same name.
    The C{search_path} C{url}'s C{options} give is set on each backend
    PgBouncer opens (PgBouncer takes no C{options} from its clients), and
    kept there: no C{server_reset_query} (C{DISCARD ALL}) between clients.

    @ivar url: C{url} with PgBouncer's address in place of the server's.
    @ivar server: C{url}.
    """

    def __init__(self, url, poolMode, binary=None):
        self.server = url
        parts = urlsplit(url)
        database = parts.path.strip("/")
        options = dict(parse_qsl(parts.query)).get("options", "")
        searchPath = options.split("search_path=", 1)[1].split()[0] if "search_path=" in options else None
        connectQuery = f" connect_query='SET search_path = {searchPath}'" if searchPath else ""
        # Of its own under /tmp: PgBouncer runs as the server's account
        # where the suite runs as root, and pytest's directories are the
        # suite's user's alone.
        directory = self._directory = tempfile.mkdtemp(prefix="mailgate-pgbouncer-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ini = os.path.join(directory, "pgbouncer.ini")
        users = os.path.join(directory, "users.txt")
        self._log = os.path.join(directory, "pgbouncer.log")
        with open(users, "w") as f:
            f.write(f'"{parts.username}" "{parts.password}"\n')
        with open(ini, "w") as f:
            f.write(
                f"[databases]\n{database} = host={parts.hostname} port={parts.port} dbname={database}{connectQuery}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = plain\nauth_file = {users}\npool_mode = {poolMode}\n"
                f"logfile = {self._log}\nignore_startup_parameters = extra_float_digits\nserver_reset_query =\n"
            )
        command = [binary or pgbouncerBinary(), ini]
        if os.getuid() == 0:
            # PgBouncer refuses to run as root.
            account = serverAccount()
            for path in (directory, ini, users):
                shutil.chown(path, account)
            command[1:1] = ["-u", account]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    said = self._process.stderr.read()[-2000:] if self._process.poll() is not None else b""
                    self.stop()
                    raise RuntimeError(f"PgBouncer did not start: {said!r}")
                time.sleep(0.05)
        self.url = urlunsplit(
            parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}", query="")
        )

    def stop(self):
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process.stderr.close()
        shutil.rmtree(self._directory, ignore_errors=True)
