"""
End-to-end helpers: a real C{twistd mailgate} process and the real
C{mailgate} admin command, both from the environment the tests run in
(the scripts next to C{sys.executable}, i.e. what a non-editable install
put there); only L{AdminCommand.addUser} runs the command in-process, to
hash the password cheaply.

Nothing here has test functions.  Test modules import the fixtures they use:

    from e2e import mailgate_server, mailgate_cli  # noqa: F401 (fixtures)

Every wait is bounded by L{DEADLINE}; when one runs out, the test fails
with what the process wrote so far.
"""

import contextlib
import io
import os
import poplib
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
MAILGATE = os.path.join(BIN, "mailgate")

# Seconds any single wait (start-up, a CLI run, shutdown, a socket read) may take.
DEADLINE = 20.0
# Seconds given to a server to stop after SIGTERM before it is killed.
STOP_GRACE = 10.0

HOSTNAME = "mailgate.test"

# Pin a test using L{mailgate_server} to one backend (the fixture otherwise
# runs it on both): it overrides the parameters of conftest's databaseURL.
sqliteOnly = pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
postgresOnly = pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
_LISTENING = re.compile(r"\b(POP3S|POP3|SMTP|LMTP|QUOTA-STATUS|METRICS) listening on (\S+?)(?::(\d+))? \(")
_LISTENER_OPTIONS = {
    "--pop3": "POP3", "--pop3s": "POP3S", "--smtp": "SMTP", "--lmtp": "LMTP", "--quota-status": "QUOTA-STATUS",
    "--metrics": "METRICS",
}
_LOGGED_ERROR = re.compile(r"Traceback \(most recent call last\)|Unhandled Error|\[-\] Unhandled")


def databaseURL(path):
    """
    The C{sqlite:////absolute/path} URL of a database file.
    """
    return "sqlite:///" + os.path.abspath(str(path))


def childEnvironment():
    """
    The environment for child processes: unbuffered output, and no
    C{MAILGATE_DATABASE} (or systemd's variables) leaking in from the
    developer's shell.
    """
    env = dict(os.environ)
    env.pop("MAILGATE_DATABASE", None)
    # Nor the service manager's variables, should the suite run under one.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Drain(threading.Thread):
    """
    Read a pipe to its end, line by line, so that the child never blocks
    on a full pipe and the test can look at everything it wrote.

    L{catchUp} reads, in the caller's thread, whatever the pipe holds at
    that moment, so that a line the child wrote before it answered a
    client is in L{lines} once the test has the answer, however late
    this thread is scheduled on a loaded machine (which it was: checks of
    a line right after a reply failed now and then with the suite on
    parallel workers).  Reads happen under a lock, on a non-blocking
    descriptor that only L{close} closes.
    """

    def __init__(self, pipe, onLine):
        super().__init__(daemon=True)
        self._pipe = pipe
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self._onLine = onLine
        self._lock = threading.Lock()
        self._partial = b""
        self._ended = False
        self.lines = []

    def run(self):
        try:
            while not self._ended:
                try:
                    select.select([self._fd], [], [], 0.5)
                except (OSError, ValueError):
                    # Closed (L{close}): the loop's test ends it.
                    time.sleep(0.05)
                    continue
                self.catchUp()
        finally:
            self._onLine(None)

    def catchUp(self):
        """
        Add to L{lines} every complete line the pipe holds now (and, at its
        end, the last one even without a newline).
        """
        with self._lock:
            if self._ended:
                return
            added = []
            while True:
                try:
                    chunk = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    if self._partial:
                        added.append(self._partial)
                        self._partial = b""
                    self._ended = True
                    break
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                added.extend(raw + b"\n" for raw in complete)
            decoded = [raw.decode("utf-8", "replace") for raw in added]
            self.lines.extend(decoded)
        for line in decoded:
            self._onLine(line)

    def close(self):
        """
        Stop reading and close the pipe.
        """
        with self._lock:
            self._ended = True
            self._pipe.close()


class ServerProcess:
    """
    One C{twistd -n mailgate} process listening for POP3 on an ephemeral
    port of 127.0.0.1.

    @ivar port: the POP3 port, once L{start} returned.
    @ivar ports: every listener's port (or Unix socket path) by protocol:
        C{{"POP3": [...], "SMTP": [...], ...}} in the order they started.
    @ivar database: the database URL it serves.
    @cvar command: how the server is started, before its options.
    """

    command = (TWISTD, "-n", "--pidfile=", "mailgate")

    def __init__(self, database, options=(), cwd=None, listen=True, expect=None, env=None):
        self.database = database
        # Variables added to the child's environment.
        self.env = dict(env or {})
        self.options = list(options)
        self.cwd = cwd
        self.listen = listen
        # Listeners to wait for beyond those on the command line (set in a
        # configuration file): {"SMTP": 1, ...}.
        self.expect = dict(expect or {})
        self.port = None
        self.ports = {}
        self.process = None
        self._changed = threading.Condition()
        self._ended = 0

    #: descriptors the child inherits (socket activation)
    passFds = ()

    @property
    def argv(self):
        argv = [*self.command, "--database", self.database]
        if self.listen:
            argv += ["--pop3", "tcp:0:interface=127.0.0.1"]
        if "--hostname" not in self.options:
            argv += ["--hostname", HOSTNAME]
        return argv + self.options

    def _line(self, line):
        with self._changed:
            if line is None:
                self._ended += 1
            self._changed.notify_all()

    @property
    def stdout(self):
        self._out.catchUp()
        return "".join(self._out.lines)

    @property
    def stderr(self):
        self._err.catchUp()
        return "".join(self._err.lines)

    def log(self):
        """
        Everything the process wrote so far, for failure messages.
        """
        status = self.process.poll() if self.process is not None else None
        return (
            f"argv: {self.argv}\nexit status: {status}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )

    def spawn(self):
        """
        Start the process, reading its output in the background; do not
        wait for anything.
        """
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env={**childEnvironment(), **self.env},
            start_new_session=True,
            pass_fds=self.passFds,
        )
        self._out = _Drain(self.process.stdout, self._line)
        self._err = _Drain(self.process.stderr, self._line)
        self._out.start()
        self._err.start()

    def start(self):
        """
        Start the process and wait until it listens; return the port.
        """
        self.spawn()
        return self.waitUntilListening()

    def waitUntilListening(self):
        """
        Wait until the spawned process logged every listener; return the
        POP3 port.
        """
        deadline = time.monotonic() + DEADLINE
        expected = self._expectedListeners()
        with self._changed:
            while True:
                ports = {}
                for match in _LISTENING.finditer(self.stdout):
                    name, host, port = match.groups()
                    ports.setdefault(name, []).append(int(port) if port else host)
                if all(len(ports.get(name, ())) >= n for name, n in expected.items()):
                    self.ports = ports
                    self.port = ports.get("POP3", [None])[0]
                    return self.port
                if self.process.poll() is not None and self._ended == 2:
                    pytest.fail(f"twistd mailgate exited before listening\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    pytest.fail(
                        f"twistd mailgate did not log all of {expected} 'listening on' "
                        f"lines within {DEADLINE} s\n{self.log()}"
                    )
                self._changed.wait(min(left, 0.5))

    def _expectedListeners(self):
        expected = dict(self.expect)
        argv = self.argv
        for i, arg in enumerate(argv):
            name = _LISTENER_OPTIONS.get(arg.split("=", 1)[0])
            if name:
                expected[name] = expected.get(name, 0) + 1
        return expected

    def portOf(self, name, index=0):
        """
        The port (or Unix socket path) of the C{index}th listener of a
        protocol, e.g. C{portOf("SMTP")}.
        """
        return self.ports[name][index]

    def running(self):
        return self.process is not None and self.process.poll() is None

    def stop(self):
        """
        SIGTERM, then SIGKILL if it does not end within L{STOP_GRACE}
        seconds.  Returns the exit status.  Safe to call twice.
        """
        if self.process is None:
            return None
        self.terminate()
        for drain in (self._out, self._err):
            drain.join(STOP_GRACE)
            drain.close()
        return self.process.returncode

    def terminate(self):
        """
        SIGTERM to the running process, then SIGKILL if it does not end
        within L{STOP_GRACE} seconds; nothing once it has ended.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_GRACE)

    def wait(self, timeout=DEADLINE):
        """
        Wait for the process to end on its own (start-up failures); kill it
        and fail if it does not within C{timeout} seconds.
        """
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"twistd mailgate did not exit within {timeout} s\n{self.log()}")
        for drain in (self._out, self._err):
            drain.join(STOP_GRACE)
        return self.process.returncode


class ServerStarter:
    """
    What the L{mailgate_server} fixture yields: starts servers on a test's
    database (or another one) and stops them all when the test ends.

    @ivar database: the URL of the test's database: C{tmp_path/mail.sqlite3}
        or a fresh PostgreSQL schema.
    @ivar backend: C{"sqlite"} or C{"postgres"}.
    @ivar dbpath: the SQLite file (its path even when the test runs on
        PostgreSQL, where nothing creates it).
    """

    def __init__(self, tmp_path, database=None):
        self.tmp_path = tmp_path
        self.dbpath = tmp_path / "mail.sqlite3"
        self.database = database or databaseURL(self.dbpath)
        self.backend = "postgres" if self.database.startswith(("postgresql:", "postgres:")) else "sqlite"
        self.servers = []

    def __call__(self, *options, database=None, expect=None):
        """
        Start C{twistd mailgate [options]} and wait until it listens (on
        what the options name, and on the listeners C{expect} counts by
        protocol, C{{"SMTP": 1}}, set elsewhere).
        @return: the L{ServerProcess}, with its C{port}.
        """
        server = ServerProcess(database or self.database, options, cwd=self.tmp_path, expect=expect)
        self.servers.append(server)
        server.start()
        return server

    def spawn(self, *options, database=None, listen=True):
        """
        Start C{twistd mailgate [options]} without waiting for it to
        listen (for start-up failures: call its C{wait()}).
        """
        server = ServerProcess(database or self.database, options, cwd=self.tmp_path, listen=listen)
        self.servers.append(server)
        server.spawn()
        return server

    def stopAll(self):
        for server in reversed(self.servers):
            server.stop()


@pytest.fixture
def mailgate_server(tmp_path, databaseURL):
    """
    Start real C{twistd mailgate} processes on the test's database; all of
    them are stopped when the test ends, whatever happened.

    Through C{databaseURL} (tests/conftest.py) every test using this
    fixture runs twice: on C{tmp_path/mail.sqlite3} and on a fresh
    PostgreSQL schema.  A test about one backend pins it with
    L{sqliteOnly} or L{postgresOnly}.
    """
    starter = ServerStarter(tmp_path, databaseURL)
    try:
        yield starter
    finally:
        starter.stopAll()
    # An error the server only logged is still an error: an operator sees it.
    for server in starter.servers:
        if server.process is not None and _LOGGED_ERROR.search(server.stdout + server.stderr):
            pytest.fail(f"the server logged an error\n{server.log()}")


def runHere(argv, input=b"", cwd=None):
    """
    C{mailgate argv...} run in this process (L{AdminCommand}): (exit
    status, stdout, stderr) as text, as L{runCommand} gives them.
    """
    from mailgate.cli import run

    if isinstance(input, str):
        input = input.encode("utf-8")
    # As the interpreter opens a process's standard streams under a UTF-8
    # locale: an octet that is no UTF-8 read as a lone surrogate and
    # written back as that octet.
    stdin = io.TextIOWrapper(io.BytesIO(input), encoding="utf-8", errors="surrogateescape", newline="")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape", newline="", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="", write_through=True)
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        code = run(argv, stdin=stdin, stdout=out, stderr=err, environ=childEnvironment())
    return (
        code,
        out.buffer.getvalue().decode("utf-8", "replace"),
        err.buffer.getvalue().decode("utf-8", "replace"),
    )


def mailgateHere(url, *argv, stdin=""):
    """
    The C{mailgate} command run in this process on the database at C{url}
    (L{runHere}); return (exit status, stdout, stderr) as text.
    """
    return runHere(["--database", url, *argv], stdin)


def runCommand(argv, input=b"", timeout=DEADLINE, cwd=None):
    """
    Run a command; return (exit status, stdout, stderr) as text.
    """
    if isinstance(input, str):
        input = input.encode("utf-8")
    try:
        done = subprocess.run(
            argv,
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=timeout,
            cwd=cwd,
            env=childEnvironment(),
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{argv} did not finish within {timeout} s\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}"
        )
    return (
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


class AdminCommand:
    """
    The C{mailgate} admin command on one database, run in this process:
    the command's own code (L{mailgate.cli.run}, which the installed
    script's C{main} calls with the process's streams) with the same
    arguments, standard input and output (UTF-8, undecodable octets kept
    as the interpreter keeps them), environment (L{childEnvironment}),
    working directory and exit status, but no interpreter to start, which
    costs 0.3-0.4 s of CPU a run: about 900 runs of the suite spent 390
    core-seconds starting, a fifth of the whole suite.  What only a
    process shows (the console script and its C{main}, a reader of
    standard output gone, a closed standard error, signals, the audit
    line's process id) is tested with L{InstalledCommand}.
    """

    def __init__(self, database, cwd=None):
        self.database = database
        self.cwd = cwd

    def __call__(self, *args, input=b""):
        """
        C{mailgate --database URL args...} with C{input} on stdin; returns
        (exit status, stdout, stderr) as text.
        """
        return runHere(["--database", self.database, *args], input, cwd=self.cwd)

    def check(self, *args, input=b""):
        """
        Like calling it, but the command must succeed; returns its stdout.
        """
        code, out, err = self(*args, input=input)
        assert code == 0, f"mailgate {' '.join(args)} exited {code}\nstdout: {out}\nstderr: {err}"
        return out

    def addUser(self, address, password, apop=False):
        """
        C{mailgate user add ADDRESS --password-stdin [--apop]}, run in this
        process with the password hashed at the suite's cheap scrypt cost
        (L{mailgate.testing.TEST_HASH_COST}); returns its output.  The
        production cost is 0.1 s of scrypt, and the server's as much again
        on the user's first login, for every user of every end-to-end test;
        a test of what C{user add} stores runs it at that cost
        (C{check("user", "add", ...)}).
        """
        import functools

        from mailgate.auth.passwords import makeCredentials
        from mailgate.cli import users
        from mailgate.testing import TEST_HASH_COST

        argv = ["--database", self.database, "user", "add", address, "--password-stdin"] + (["--apop"] if apop else [])
        production = users.makeCredentials
        users.makeCredentials = functools.partial(makeCredentials, logN=TEST_HASH_COST)
        try:
            code, out, err = runHere(argv, password + "\n")
        finally:
            users.makeCredentials = production
        assert code == 0, f"user add {address} exited {code}\nstdout: {out}\nstderr: {err}"
        return out

    def deliver(self, address, message):
        """
        Deliver C{message} (bytes) to C{address}; return its unique id as
        the command reports it.
        """
        out = self.check("deliver", address, input=message)
        match = re.search(r"delivered to \S+ as (\S+)", out)
        assert match, out
        return match.group(1)

    def mailbox(self, address):
        """
        C{mailgate mailbox list ADDRESS} as a list of (number, octets,
        unique id).
        """
        out = self.check("mailbox", "list", address)
        lines = out.splitlines()
        assert lines and lines[0].split()[:3] == ["NUMBER", "OCTETS", "UNIQUE-ID"], out
        rows = []
        for line in lines[1:]:
            if not line.strip():
                break  # the summary of use and quota follows
            number, octets, uid = line.split()[:3]
            rows.append((int(number), int(octets), uid))
        return rows

    def users(self):
        """
        C{mailgate user list} as {address: (messages, octets, apop)}.
        """
        out = self.check("user", "list")
        lines = out.splitlines()
        assert lines and lines[0].split()[:4] == ["ADDRESS", "MESSAGES", "OCTETS", "APOP"], out
        users = {}
        for line in lines[1:]:
            address, messages, octets, apop = line.split()[:4]
            users[address] = (int(messages), int(octets), apop)
        return users


@pytest.fixture
def mailgate_cli(mailgate_server):
    """
    The admin command on the same database as L{mailgate_server}.
    """
    return AdminCommand(mailgate_server.database, cwd=mailgate_server.tmp_path)


class InstalledCommand(AdminCommand):
    """
    L{AdminCommand} as the installed C{mailgate} script in a process of its
    own: for tests of what only a process shows (see L{AdminCommand}).
    """

    def __call__(self, *args, input=b""):
        return runCommand([MAILGATE, "--database", self.database, *args], input, cwd=self.cwd)


# -- sockets -------------------------------------------------------------


def pop(server, timeout=DEADLINE):
    """
    A poplib client connected to C{server}'s POP3 listener.
    """
    return poplib.POP3("127.0.0.1", server.port, timeout=timeout)


def popLogin(server, address, password):
    """
    A poplib client logged in to C{server} with USER and PASS.
    """
    client = pop(server)
    client.user(address)
    client.pass_(password)
    return client


def retrieve(client, number):
    """
    Message C{number} as the octets the server holds (CRLF line ends, dots
    un-stuffed by poplib), checked against the size the server announced.
    """
    status, lines, _ = client.retr(number)
    data = b"".join(line + b"\r\n" for line in lines)
    match = re.match(rb"\+OK (\d+) octets", status)
    assert match and int(match.group(1)) == len(data), (status, len(data))
    return data


class BoundPOP3(poplib.POP3):
    """
    poplib's client, connecting from a given loopback address (all of
    127.0.0.0/8 is loopback: several client addresses on one machine).
    """

    def __init__(self, port, source):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=DEADLINE)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def connect(port, timeout=DEADLINE):
    """
    A TCP connection to 127.0.0.1:port with a timeout on every operation.
    """
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


class LineReader:
    """
    POP3 responses from a raw socket: lines and multi-line blocks, each
    read bounded by the socket's timeout.
    """

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unread: {self.buffer[:200]!r}")
        self.buffer += data

    def line(self):
        """
        One line, CRLF included.
        """
        while b"\r\n" not in self.buffer:
            self._fill()
        end = self.buffer.index(b"\r\n") + 2
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def until(self, terminator):
        """
        Everything up to and including the first C{terminator}.
        """
        while terminator not in self.buffer:
            self._fill()
        end = self.buffer.index(terminator) + len(terminator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def multiline(self):
        """
        A multi-line response's body as raw (still dot-stuffed) octets,
        terminator included; the status line must have been read.
        """
        if self.buffer.startswith(b".\r\n"):
            self.buffer = self.buffer[3:]
            return b".\r\n"
        return self.until(b"\r\n.\r\n")

    def closed(self):
        """
        True once the peer closed the connection and everything was read.
        """
        if self.buffer:
            return False
        return self.sock.recv(1) == b""


def dotStuffed(message):
    """
    A CRLF message as RFC 1939 sends it in a multi-line response: every
    line starting with "." gets another one, and ".CRLF" ends it.
    """
    assert message.endswith(b"\r\n") or not message
    lines = message.split(b"\r\n")[:-1]
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines) + b".\r\n"


def waitFor(predicate, what, timeout=DEADLINE, interval=0.05):
    """
    Call C{predicate} until it returns something true (returned) or
    C{timeout} seconds passed (the test fails, showing its last value).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout} s; last: {value!r}")
        time.sleep(interval)
