"""
Start a PostgreSQL server for the test suite and print, as shell
assignments, how to reach and control it:

    eval "$(python tests/pgserver.py)"

sets MAILGATE_TEST_POSTGRES (a postgresql:// URL to an empty database the
tests may create schemas in), and MAILGATE_TEST_POSTGRES_STOP /
MAILGATE_TEST_POSTGRES_START (commands that stop and start that server, for
the tests of a database that goes away).

Where Debian's cluster tools exist, the machine's cluster is started with
pg_ctlcluster (as root) and given a "mailgate" role and a "mailgate_test"
database.  Elsewhere, a private cluster is created with initdb in
.pgtest/ under the working directory.  On a machine with no PostgreSQL
server binaries at all nothing is printed and the PostgreSQL tests skip,
saying why; if the binaries exist but no server can be started, this
exits non-zero so the suite does not silently run without PostgreSQL.
"""

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

ROLE = "mailgate"
PASSWORD = "mailgate"
DATABASE = "mailgate_test"
DEADLINE = 60


def log(message):
    sys.stderr.write(f"pgserver: {message}\n")


def run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def serverBinaries():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return os.path.dirname(found[-1])
    postgres = shutil.which("postgres")
    return os.path.dirname(postgres) if postgres else None


def waitUntilReady(host, port):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2):
                pass
        except OSError:
            time.sleep(0.3)
            continue
        ready = shutil.which("pg_isready")
        if ready is None or run([ready, "-h", host, "-p", str(port)]).returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit(f"pgserver: PostgreSQL on {host}:{port} did not become ready")


def serverAccount():
    """
    The account a PostgreSQL server runs as when we are root (it refuses to
    run as root): "postgres" where it exists, else "nobody".
    """
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise SystemExit("pgserver: no account to run PostgreSQL as")


def asPostgres(command):
    if os.geteuid() == 0:
        return ["runuser", "-u", serverAccount(), "--"] + command
    return command


def ensureRoleAndDatabase(psqlArgs):
    def psql(sql):
        result = run(asPostgres(["psql", "-v", "ON_ERROR_STOP=1", "-tAc", sql] + psqlArgs))
        if result.returncode != 0:
            raise SystemExit(f"pgserver: psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    if psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'") != "1":
        psql(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
        psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")


def debianCluster():
    if not (shutil.which("pg_lsclusters") and shutil.which("pg_ctlcluster")) or os.geteuid() != 0:
        return None
    lines = run(["pg_lsclusters", "--no-header"]).stdout.strip().splitlines()
    if not lines:
        return None
    version, name, port, status = lines[0].split()[:4]
    control = ["pg_ctlcluster", version, name]
    if status != "online":
        result = run(control + ["start"])
        if result.returncode != 0:
            log(f"pg_ctlcluster start failed: {result.stderr.strip()}")
            return None
    waitUntilReady("127.0.0.1", int(port))
    ensureRoleAndDatabase(["-p", port])
    url = f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"
    stop = " ".join(control + ["stop", "-m", "fast"])
    start = " ".join(control + ["start"])
    return url, stop, start


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def privateCluster(binaries):
    base = os.path.abspath(".pgtest")
    data = os.path.join(base, "data")
    logfile = os.path.join(base, "server.log")
    portFile = os.path.join(base, "port")
    os.makedirs(base, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(base, serverAccount())
    initdb = os.path.join(binaries, "initdb")
    pgctl = os.path.join(binaries, "pg_ctl")
    if not os.path.exists(os.path.join(data, "PG_VERSION")):
        result = run(asPostgres([initdb, "-D", data, "-U", "postgres", "--auth=trust"]))
        if result.returncode != 0:
            raise SystemExit(f"pgserver: initdb failed: {result.stderr.strip()}")
    if os.path.exists(portFile):
        port = int(open(portFile).read())
    else:
        port = freePort()
        with open(portFile, "w") as f:
            f.write(str(port))
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base}"
    control = asPostgres([pgctl, "-D", data, "-l", logfile, "-o", options])
    if run(asPostgres([pgctl, "-D", data, "status"])).returncode != 0:
        result = run(control + ["-w", "start"])
        if result.returncode != 0:
            raise SystemExit(f"pgserver: pg_ctl start failed: {result.stderr.strip()}")
    waitUntilReady("127.0.0.1", port)
    ensureRoleAndDatabase(["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"])
    url = f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"
    stop = " ".join(shlex.quote(a) for a in control + ["-w", "-m", "fast", "stop"])
    start = " ".join(shlex.quote(a) for a in control + ["-w", "start"])
    return url, stop, start


def main():
    binaries = serverBinaries()
    if binaries is None:
        log("no PostgreSQL server binaries; the PostgreSQL tests will be skipped")
        return
    # MAILGATE_PG_PRIVATE=1 skips the machine's cluster (to try the other way).
    found = (None if os.environ.get("MAILGATE_PG_PRIVATE") else debianCluster()) or privateCluster(binaries)
    url, stop, start = found
    for name, value in (
        ("MAILGATE_TEST_POSTGRES", url),
        ("MAILGATE_TEST_POSTGRES_STOP", stop),
        ("MAILGATE_TEST_POSTGRES_START", start),
    ):
        print(f"export {name}={shlex.quote(value)}")
    log(f"PostgreSQL ready at {url}")


if __name__ == "__main__":
    main()
