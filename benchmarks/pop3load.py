"""
A POP3 load generator on asyncio (standard library only).

N concurrent clients run sessions back to back for a fixed time.  Every
session is its own TCP connection (TCP_NODELAY on the client side): greeting,
login (USER/PASS, or APOP with the greeting's timestamp), the scenario's
commands, QUIT.  Users are taken round-robin; two sessions of this generator
never use the same maildrop at once (a POP3 server may lock a maildrop for
the length of a session), so with more clients than users the extra clients
wait for a free user and ``peak`` in the result says how many sessions
really ran at once.

Scenarios:
  stat      login, STAT, QUIT
  list      login, STAT, LIST, UIDL, QUIT
  top       login, STAT, TOP n 0 for every message, QUIT
  fetchall  login, UIDL, LIST, RETR every message, QUIT
  retr1     login, LIST 1, RETR 1, QUIT (a one-message session)
  newest    login, UIDL, LIST, RETR every message from the newest back, QUIT
            (a client fetching the newest first)
  pick      login, STAT, TOP n 0 for every message, then RETR every fifth
            message in a scattered order, QUIT (a client showing headers
            and fetching the ones its user opens)
  limit     login, UIDL, LIST, then every message in order: RETR if it is
            at most 50 KB, else TOP n 0, QUIT (a client with a download
            size limit)

With C{tls} (C{--tls}) every session is POP3 over implicit TLS (POP3S,
RFC 8314): the TLS handshake first, through asyncio's C{ssl=} with a
context that accepts TLS 1.3 only (L{tlsContext}); the server certificate
is verified against C{tlsCA} when given, else not at all (the benchmarks'
certificate is self-signed).  The result counts the protocol versions
negotiated (C{tlsVersions}).  Bytes received are counted after decryption.

Multi-line responses are parsed exactly: the terminating '.' line, dot-
unstuffing, and a line starting with '.' that was not stuffed is a protocol
error.  Each RETR's octet count (after unstuffing) must equal the message's
LIST size, and the number of LIST and UIDL lines must match STAT; a
mismatch, any -ERR, a malformed response, a timeout or a dropped connection
makes the session count as an error (and not as a completed session).
With C{expected} (from L{corpus.Corpus.digests}) every retrieved message is
also compared with the corpus, octet for octet (by SHA-1).

The server's CPU time is read from /proc/PID/stat (utime+stime, which cover
all threads; plus cutime+cstime, which hold the children the process has
reaped) for the whole process tree under each given PID, before and after
the run; that covers a forking server such as Dovecot, whose login and
mail processes come and go during the run.

As a library: C{result = asyncio.run(runLoad(LoadConfig(...)))}.  As a
command:

    python benchmarks/pop3load.py --port 1110 --scenario fetchall \\
        --concurrency 10 --duration 5 --users 20 --server-pid PID
"""

import argparse
import asyncio
import hashlib
import os
import re
import resource
import socket
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

SCENARIOS = ("stat", "list", "top", "fetchall", "retr1", "newest", "pick", "limit")

#: the limit scenario's download limit, octets
SIZE_LIMIT = 50 * 1024

# The longest status line accepted from a server (RFC 2449 says 512).
MAX_STATUS_LINE = 8192
_TIMESTAMP = re.compile(rb"<[^<>@\s]*@[^<>\s]*>")
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class POP3ProtocolError(Exception):
    """
    The server sent something that is not valid POP3.
    """


class POP3ServerError(Exception):
    """
    The server answered -ERR.
    """


class VerificationError(Exception):
    """
    A response was valid POP3 but wrong: a size or count mismatch, or a
    message that differs from the corpus.
    """


# -- parsing ----------------------------------------------------------------


class ResponseBuffer:
    """
    Incremental parser of POP3 responses.  Feed it octets as they arrive;
    L{status} and L{multiline} return a complete response, or C{None} when
    more octets are needed (and then resume where they stopped looking).
    """

    def __init__(self):
        self._buffer = bytearray()
        # Where to look on from, and whether a line of the multi-line
        # response under way starts with "."
        self._scan = 0
        self._stuffed = False
        self.received = 0

    def feed(self, data):
        self._buffer += data
        self.received += len(data)

    def __len__(self):
        return len(self._buffer)

    def status(self):
        """
        One status line: C{(True, text)} for +OK, C{(False, text)} for -ERR,
        C{None} if incomplete.

        @raise POP3ProtocolError: for anything else.
        """
        buf = self._buffer
        end = buf.find(b"\r\n", max(0, self._scan - 1))
        if end < 0:
            if len(buf) > MAX_STATUS_LINE:
                raise POP3ProtocolError(f"status line longer than {MAX_STATUS_LINE} octets")
            self._scan = len(buf)
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        self._scan = 0
        if line == b"+OK" or line.startswith(b"+OK "):
            return True, line[4:].decode("utf-8", "replace")
        if line == b"-ERR" or line.startswith(b"-ERR "):
            return False, line[5:].decode("utf-8", "replace")
        raise POP3ProtocolError(f"not a POP3 status line: {line[:80]!r}")

    def multiline(self):
        """
        The body of a multi-line response (after its +OK line), with the
        terminating line removed and dot-stuffing undone: the octets of the
        lines, each with its CRLF.  C{None} if incomplete.

        @raise POP3ProtocolError: for a line starting with a '.' that was
            not stuffed.
        """
        buf = self._buffer
        if len(buf) < 3:
            return None
        if buf[:3] == b".\r\n":
            del buf[:3]
            self._scan = 0
            return b""
        # The terminator is CRLF "." CRLF, the CRLF ending the last line.
        # One scan finds it and the lines starting with "." before it (a
        # stuffed line starts with ".."): most messages have none, and are
        # then returned as they came.
        position = self._scan
        while True:
            dot = buf.find(b"\r\n.", position)
            if dot < 0:
                self._scan = max(0, len(buf) - 2)
                return None
            after = buf[dot + 3 : dot + 5]
            if len(after) < 2:
                self._scan = dot
                return None
            if after == b"\r\n":
                break
            if after[:1] != b".":
                raise POP3ProtocolError("a line starts with an unstuffed '.'")
            self._stuffed = True
            position = dot + 3
        # One copy out of the buffer (a slice of it would be a second).
        with memoryview(buf) as view:
            raw = bytes(view[: dot + 2])
        del buf[: dot + 5]
        self._scan = 0
        stuffed, self._stuffed = self._stuffed, False
        if raw[:1] == b".":
            if raw[:2] != b"..":
                raise POP3ProtocolError("the first line starts with an unstuffed '.'")
            raw = raw[1:]
        if stuffed:
            # Every line after the first that starts with "." was seen to
            # start with "..".
            raw = raw.replace(b"\r\n..", b"\r\n.")
        return raw


def parseListing(body, what):
    """
    The lines of a LIST or UIDL listing: C{[(number, value), ...]}.
    """
    entries = []
    for line in body.split(b"\r\n")[:-1]:
        parts = line.split(b" ")
        if len(parts) != 2 or not parts[0].isdigit():
            raise POP3ProtocolError(f"malformed {what} line: {line[:80]!r}")
        entries.append((int(parts[0]), parts[1]))
    return entries


def apopDigest(greeting, password):
    """
    The APOP digest for a greeting's timestamp.

    @raise POP3ProtocolError: if the greeting has no timestamp.
    """
    match = _TIMESTAMP.search(greeting.encode("utf-8") if isinstance(greeting, str) else greeting)
    if match is None:
        raise POP3ProtocolError("APOP requested but the greeting has no timestamp")
    return hashlib.md5(match.group(0) + password.encode("utf-8")).hexdigest()


# -- the client ---------------------------------------------------------------


class BufferedClient(asyncio.Protocol):
    """
    A client connection that feeds what it receives to a parsing buffer
    (C{bufferClass}) and lets coroutines wait until the buffer can answer.
    """

    bufferClass = None

    def __init__(self):
        self.buffer = self.bufferClass()
        self.transport = None
        self._waiter = None
        self._lost = None
        self.tlsVersion = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sslObject = transport.get_extra_info("ssl_object")
        if sslObject is not None:
            self.tlsVersion = sslObject.version()

    def data_received(self, data):
        self.buffer.feed(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc):
        self._lost = exc or ConnectionResetError("connection closed by the server")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, parse):
        while True:
            result = parse()
            if result is not None:
                return result
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None


class POP3Client(BufferedClient):
    """
    One POP3 connection: send commands, await parsed responses.
    """

    bufferClass = ResponseBuffer

    def send(self, line):
        self.transport.write(line.encode("utf-8") + b"\r\n")

    async def status(self):
        ok, text = await self._wait(self.buffer.status)
        return ok, text

    async def command(self, line):
        """
        Send a command and return the text of its +OK.

        @raise POP3ServerError: on -ERR.
        """
        self.send(line)
        ok, text = await self.status()
        if not ok:
            raise POP3ServerError(f"{line.split(' ', 1)[0]}: -ERR {text}")
        return text

    async def multiline(self, line):
        """
        Send a command with a multi-line answer; return its unstuffed body.
        """
        await self.command(line)
        return await self._wait(self.buffer.multiline)

    def close(self):
        if self.transport is not None:
            self.transport.close()


def tlsContext(cafile=None):
    """
    A client context for the TLS mode: TLS 1.3 only; the server's
    certificate checked against C{cafile} (host name included), or not
    checked at all without one.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cafile:
        context.load_verify_locations(cafile)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def connect(host, port, timeout=30.0, tls=None):
    """
    A connected L{POP3Client}; with C{tls} (an C{ssl.SSLContext}), over
    TLS from the first octet.
    """
    loop = asyncio.get_running_loop()
    extra = {"ssl": tls, "server_hostname": host, "ssl_handshake_timeout": timeout} if tls is not None else {}
    _, client = await asyncio.wait_for(
        loop.create_connection(POP3Client, host, port, **extra), timeout
    )
    return client


async def login(client, user, password, apop=False):
    """
    Read the greeting and log in; return the greeting text.
    """
    ok, greeting = await client.status()
    if not ok:
        raise POP3ServerError(f"greeting: -ERR {greeting}")
    if apop:
        await client.command(f"APOP {user} {apopDigest(greeting, password)}")
    else:
        await client.command(f"USER {user}")
        await client.command(f"PASS {password}")
    return greeting


def _stat(text):
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise POP3ProtocolError(f"malformed STAT answer: {text[:80]!r}")
    return int(parts[0]), int(parts[1])


async def session(client, scenario, user, password, apop=False, expected=None):
    """
    Run one scenario on a connected client, QUIT included.

    @param expected: C{[(size, sha1 hex, header size), ...]} of the user's
        messages in order, to verify retrieved messages against; or C{None}.
    @return: the number of messages retrieved (RETR or TOP).
    @raise POP3ServerError, POP3ProtocolError, VerificationError,
        ConnectionError: the session failed.
    """
    await login(client, user, password, apop)
    fetched = 0
    if scenario in ("fetchall", "newest", "limit"):
        uidl = parseListing(await client.multiline("UIDL"), "UIDL")
        listing = parseListing(await client.multiline("LIST"), "LIST")
        if len(uidl) != len(listing):
            raise VerificationError(f"UIDL has {len(uidl)} lines, LIST {len(listing)}")
        if expected is not None and len(listing) != len(expected):
            raise VerificationError(f"{user}: {len(listing)} messages, expected {len(expected)}")
        if scenario == "newest":
            listing.reverse()
        for number, size in listing:
            if scenario == "limit" and int(size) > SIZE_LIMIT:
                await _header(client, number, expected)
            else:
                await _retrieve(client, number, int(size), user, expected)
            fetched += 1
    elif scenario == "retr1":
        listed = (await client.command("LIST 1")).split()
        if len(listed) < 2 or listed[0] != "1" or not listed[1].isdigit():
            raise POP3ProtocolError(f"malformed LIST 1 answer: {listed!r}")
        await _retrieve(client, 1, int(listed[1]), user, expected)
        fetched += 1
    else:
        count, octets = _stat(await client.command("STAT"))
        if expected is not None and count != len(expected):
            raise VerificationError(f"{user}: STAT {count} messages, expected {len(expected)}")
        if scenario == "list":
            listing = parseListing(await client.multiline("LIST"), "LIST")
            uidl = parseListing(await client.multiline("UIDL"), "UIDL")
            if len(listing) != count or len(uidl) != count:
                raise VerificationError(
                    f"STAT {count}, LIST {len(listing)} lines, UIDL {len(uidl)} lines"
                )
            if sum(int(size) for _, size in listing) != octets:
                raise VerificationError("LIST sizes do not add up to STAT's octets")
        elif scenario in ("top", "pick"):
            for number in range(1, count + 1):
                await _header(client, number, expected)
                fetched += 1
            if scenario == "pick":
                for number in picks(count):
                    size = int((await client.command(f"LIST {number}")).split()[1])
                    await _retrieve(client, number, size, user, expected)
                    fetched += 1
        elif scenario != "stat":
            raise ValueError(f"unknown scenario {scenario!r}")
    await client.command("QUIT")
    return fetched


def picks(count):
    """
    The messages the pick scenario fetches of C{count}: every fifth, from
    the third, in a scattered order (the odd places, then the even ones).
    """
    chosen = list(range(3, count + 1, 5))
    return chosen[::2] + chosen[1::2][::-1]


async def _retrieve(client, number, size, user, expected):
    """
    RETR message C{number}, checked against the C{size} LIST gave (and
    against the corpus with C{expected}).
    """
    body = await client.multiline(f"RETR {number}")
    if len(body) != size:
        raise VerificationError(f"RETR {number}: {len(body)} octets, LIST said {size}")
    if expected is not None:
        _verify(body, expected[number - 1], user, number)


async def _header(client, number, expected):
    """
    TOP C{number} 0, checked to be the message's header and the empty
    line after it (and its size against the corpus with C{expected}).
    """
    body = await client.multiline(f"TOP {number} 0")
    if not body.endswith(b"\r\n\r\n"):
        raise VerificationError(f"TOP {number} 0 does not end with the empty line after the header")
    if expected is not None:
        headerSize = expected[number - 1][2]
        if len(body) != headerSize:
            raise VerificationError(f"TOP {number} 0: {len(body)} octets, the header is {headerSize}")


def _verify(body, expected, user, number):
    size, digest = expected[:2]
    if len(body) != size or hashlib.sha1(body).hexdigest() != digest:
        raise VerificationError(
            f"{user} message {number}: {len(body)} octets differ from the corpus ({size} octets)"
        )


# -- CPU of the server --------------------------------------------------------


def _readStat(pid):
    """
    C{(ppid, utime+stime, cutime+cstime)} in clock ticks, or C{None} if the
    process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)); utime is field 14.
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def processTree(roots):
    """
    The PIDs of C{roots} and all their descendants now alive.
    """
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _readStat(name)
        if stat is not None:
            children.setdefault(stat[0], []).append(int(name))
    found = []
    pending = [r for r in roots if os.path.exists(f"/proc/{r}")]
    seen = set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def pinProcessTrees(roots, cpus):
    """
    Every thread of the process trees under C{roots} on C{cpus} (a set of
    CPU numbers); processes started later by them inherit it.  A thread
    that ends meanwhile is skipped.
    """
    for pid in processTree(roots):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def cpuSeconds(roots):
    """
    CPU seconds (user+system, all threads) used so far by the process trees
    under C{roots}: the live processes' own time plus the time of the
    children they have reaped, so that processes that came and went are
    counted too.
    """
    if not roots:
        return 0.0
    ticks = 0
    for pid in processTree(roots):
        stat = _readStat(pid)
        if stat is not None:
            ticks += stat[1] + stat[2]
    return ticks / _CLOCK_TICK


def systemBusySeconds():
    """
    CPU seconds all processors spent busy so far (user, nice, system, irq,
    softirq), from /proc/stat: with the server's and our own CPU taken
    out, what is left over a measurement is background load.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _CLOCK_TICK


def systemStealSeconds():
    """
    CPU seconds this virtual machine's processors wanted to run but the
    hypervisor ran something else (steal, /proc/stat; 0 on bare metal):
    on a shared host, what makes a slow spell, for every server at once.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / _CLOCK_TICK if len(fields) > 8 else 0.0


def _ownCpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resolvePids(pids):
    """
    A list of PIDs from a list, or from a callable returning one (to look
    the processes up when a measurement starts).
    """
    return list(pids() if callable(pids) else pids)


def cpuSnapshot(roots):
    """
    C{(cpuSeconds(roots), the roots alive)}: a measurement over an interval
    is only valid if the same roots were alive at both ends (a restarted
    server's time starts from zero again).
    """
    alive = frozenset(r for r in roots if os.path.exists(f"/proc/{r}"))
    return cpuSeconds(roots), alive


def cpuDelta(before, after, roots):
    """
    CPU seconds between two L{cpuSnapshot}s, or C{None} if a root process
    ended or was replaced in between.
    """
    if not (before[1] == after[1] == frozenset(roots)):
        return None
    return after[0] - before[0]


def rssBytes(pid):
    """
    The resident set size of a process, from /proc/PID/status.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def raiseFileLimit(wanted=None):
    """
    Raise the soft RLIMIT_NOFILE to C{wanted} (at most the hard limit;
    the hard limit itself without C{wanted}).  Returns the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(max(wanted, soft), hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = max(soft, 1 << 20)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# -- the load -----------------------------------------------------------------


@dataclass
class LoadConfig:
    """
    @ivar users: addresses to log in as, taken round-robin.
    @ivar expected: optional C{{address: [(size, sha1), ...]}} to verify
        retrieved messages against the corpus.
    @ivar serverPids: roots of the server's process trees, for CPU time.
    @ivar extraPids: roots of other process trees whose CPU is reported
        separately (e.g. the database server behind mailgate), or a
        callable returning them when the run starts; C{extraCpuSeconds} is
        C{None} if one of them ended during the run.
    @ivar sessions: stop after this many sessions instead of (or before)
        the end of C{duration}.
    @ivar tls: every session over implicit TLS (TLS 1.3 only).
    @ivar tlsCA: a CA file to verify the server's certificate against
        (with C{tls}); without it the certificate is not checked.
    """

    port: int
    users: list
    password: str
    scenario: str = "stat"
    concurrency: int = 1
    duration: float = 5.0
    host: str = "127.0.0.1"
    apop: bool = False
    expected: dict = None
    serverPids: list = field(default_factory=list)
    extraPids: list = field(default_factory=list)
    sessionTimeout: float = 60.0
    sessions: int = None
    shareUsers: bool = False
    settle: float = 0.2
    tls: bool = False
    tlsCA: str = None


class LatencyPercentiles:
    """
    p50 and p99 of a result's C{latencies} (seconds), in milliseconds.
    """

    def percentile(self, p):
        return percentile(self.latencies, p)

    @property
    def p50(self):
        return self.percentile(50)

    @property
    def p99(self):
        return self.percentile(99)


@dataclass
class LoadResult(LatencyPercentiles):
    scenario: str
    concurrency: int
    apop: bool
    elapsed: float
    sessions: int
    errors: int
    errorKinds: dict
    bytesReceived: int
    messages: int
    latencies: list
    cpuSeconds: float
    extraCpuSeconds: float
    peak: int
    users: int
    clientCpuSeconds: float = 0.0
    systemCpuSeconds: float = 0.0
    stealSeconds: float = 0.0
    tls: bool = False
    tlsVersions: dict = field(default_factory=dict)

    @property
    def backgroundCores(self):
        """
        Processor cores used on average during the run by processes other
        than the server(s), the extra processes and this load generator.
        """
        if not self.elapsed:
            return None
        if self.extraCpuSeconds is None:
            return None
        other = self.systemCpuSeconds - self.cpuSeconds - self.extraCpuSeconds - self.clientCpuSeconds
        return max(0.0, other) / self.elapsed

    @property
    def stealCores(self):
        """
        Processor cores taken by the hypervisor on average during the run
        (see L{systemStealSeconds}).
        """
        return self.stealSeconds / self.elapsed if self.elapsed else None

    @property
    def sessionsPerSecond(self):
        return self.sessions / self.elapsed if self.elapsed else 0.0

    @property
    def megabytesPerSecond(self):
        return self.bytesReceived / 1e6 / self.elapsed if self.elapsed else 0.0

    @property
    def cpuMsPerSession(self):
        return self.cpuSeconds * 1000 / self.sessions if self.sessions else None

    @property
    def extraCpuMsPerSession(self):
        if self.extraCpuSeconds is None or not self.sessions:
            return None
        return self.extraCpuSeconds * 1000 / self.sessions

    def asDict(self):
        return {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "apop": self.apop,
            "elapsed": round(self.elapsed, 3),
            "sessions": self.sessions,
            "errors": self.errors,
            "errorKinds": self.errorKinds,
            "bytesReceived": self.bytesReceived,
            "messages": self.messages,
            "sessionsPerSecond": round(self.sessionsPerSecond, 2),
            "megabytesPerSecond": round(self.megabytesPerSecond, 3),
            "p50ms": _round(self.p50),
            "p99ms": _round(self.p99),
            "cpuSeconds": round(self.cpuSeconds, 3),
            "cpuMsPerSession": _round(self.cpuMsPerSession),
            "extraCpuSeconds": _round(self.extraCpuSeconds),
            "extraCpuMsPerSession": _round(self.extraCpuMsPerSession),
            "peak": self.peak,
            "users": self.users,
            "clientCpuSeconds": round(self.clientCpuSeconds, 3),
            "clientCpuShare": round(self.clientCpuSeconds / self.elapsed, 3) if self.elapsed else None,
            "backgroundCores": _round(self.backgroundCores, 2),
            "stealCores": _round(self.stealCores, 2),
            "tls": self.tls,
            "tlsVersions": self.tlsVersions,
        }

    def summary(self):
        p50 = "-" if self.p50 is None else f"{self.p50:.2f}"
        p99 = "-" if self.p99 is None else f"{self.p99:.2f}"
        cpu = "-" if self.cpuMsPerSession is None else f"{self.cpuMsPerSession:.3f}"
        text = (
            f"{self.scenario} x{self.concurrency}{' APOP' if self.apop else ''}"
            f"{' TLS ' + '/'.join(sorted(self.tlsVersions)) if self.tls else ''}: "
            f"{self.sessions} sessions in {self.elapsed:.2f} s = "
            f"{self.sessionsPerSecond:.1f}/s, {self.megabytesPerSecond:.2f} MB/s, "
            f"p50 {p50} ms, p99 {p99} ms, server CPU {cpu} ms/session, "
            f"errors {self.errors}, client CPU {self.clientCpuSeconds / self.elapsed if self.elapsed else 0:.0%}, "
            f"background {self.backgroundCores or 0:.2f} cores, steal {self.stealCores or 0:.2f} cores"
        )
        if self.errorKinds:
            text += " " + repr(dict(self.errorKinds))
        return text


def percentile(latencies, p):
    """
    The C{p}th percentile of C{latencies} (seconds), in milliseconds
    (nearest rank), or C{None} if there are none.
    """
    if not latencies:
        return None
    ordered = sorted(latencies)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1] * 1000


def _round(value, digits=3):
    return None if value is None else round(value, digits)


class UserPool:
    """
    Hands out users round-robin, never one that is in use (unless sharing
    is allowed).
    """

    def __init__(self, users, share=False):
        self._users = list(users)
        self._next = 0
        self._busy = set()
        self._share = share
        self._free = asyncio.Condition()
        self.active = 0
        self.peak = 0

    async def acquire(self):
        async with self._free:
            while True:
                for _ in range(len(self._users)):
                    index = self._next
                    self._next = (self._next + 1) % len(self._users)
                    if self._share or index not in self._busy:
                        self._busy.add(index)
                        self.active += 1
                        self.peak = max(self.peak, self.active)
                        return index
                await self._free.wait()

    async def release(self, index):
        async with self._free:
            self._busy.discard(index)
            self.active -= 1
            self._free.notify()


def _describe(exc):
    if isinstance(exc, POP3ServerError):
        text = str(exc)
        match = re.search(r"-ERR (\[[A-Z/-]+\])?", text)
        return f"{text.split(':', 1)[0]} -ERR {match.group(1) or ''}".strip() if match else text
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, VerificationError):
        return "verification: " + str(exc)[:100]
    if isinstance(exc, POP3ProtocolError):
        return "protocol: " + str(exc)[:100]
    return f"{exc.__class__.__name__}: {exc}"[:120]


async def runLoad(config):
    """
    Run the load described by a L{LoadConfig}; return a L{LoadResult}.
    """
    if config.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {config.scenario!r}; use one of {SCENARIOS}")
    raiseFileLimit(config.concurrency * 2 + 64)
    pool = UserPool(config.users, config.shareUsers)
    latencies = []
    errors = Counter()
    tlsVersions = Counter()
    totals = {"bytes": 0, "messages": 0, "sessions": 0, "started": 0}
    loop = asyncio.get_running_loop()
    context = tlsContext(config.tlsCA) if config.tls else None

    if config.settle:
        await asyncio.sleep(config.settle)
    extraRoots = resolvePids(config.extraPids)
    cpuBefore = cpuSeconds(config.serverPids)
    extraBefore = cpuSnapshot(extraRoots)
    clientBefore = _ownCpu()
    systemBefore = systemBusySeconds()
    stealBefore = systemStealSeconds()
    start = loop.time()
    deadline = start + config.duration

    async def one(index):
        user = config.users[index]
        expected = config.expected.get(user) if config.expected else None
        client = None
        began = time.perf_counter()
        try:
            client = await connect(config.host, config.port, config.sessionTimeout, context)
            fetched = await asyncio.wait_for(
                session(client, config.scenario, user, config.password, config.apop, expected),
                config.sessionTimeout,
            )
        finally:
            if client is not None:
                totals["bytes"] += client.buffer.received
                if client.tlsVersion is not None:
                    tlsVersions[client.tlsVersion] += 1
                client.close()
        latencies.append(time.perf_counter() - began)
        totals["messages"] += fetched

    async def worker():
        while loop.time() < deadline:
            if config.sessions is not None:
                if totals["started"] >= config.sessions:
                    return
                totals["started"] += 1
            index = await pool.acquire()
            if loop.time() >= deadline:
                await pool.release(index)
                return
            try:
                await one(index)
            except (Exception, asyncio.TimeoutError) as e:
                errors[_describe(e)] += 1
                await asyncio.sleep(0.01)
            else:
                totals["sessions"] += 1
            finally:
                await pool.release(index)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    elapsed = loop.time() - start
    clientAfter = _ownCpu()
    if config.settle:
        await asyncio.sleep(config.settle)
    cpuAfter = cpuSeconds(config.serverPids)
    extraAfter = cpuSnapshot(extraRoots)
    systemAfter = systemBusySeconds()
    stealAfter = systemStealSeconds()
    return LoadResult(
        scenario=config.scenario,
        concurrency=config.concurrency,
        apop=config.apop,
        elapsed=elapsed,
        sessions=totals["sessions"],
        errors=sum(errors.values()),
        errorKinds=dict(errors),
        bytesReceived=totals["bytes"],
        messages=totals["messages"],
        latencies=latencies,
        cpuSeconds=cpuAfter - cpuBefore,
        extraCpuSeconds=cpuDelta(extraBefore, extraAfter, extraRoots),
        peak=pool.peak,
        users=len(config.users),
        clientCpuSeconds=clientAfter - clientBefore,
        systemCpuSeconds=systemAfter - systemBefore,
        stealSeconds=stealAfter - stealBefore,
        tls=config.tls,
        tlsVersions=dict(tlsVersions),
    )


def load(**kwargs):
    """
    Run a load synchronously: C{load(port=..., users=[...], password=...,
    scenario=..., concurrency=..., duration=...)}.
    """
    return asyncio.run(runLoad(LoadConfig(**kwargs)))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="POP3 load generator: N concurrent clients for a fixed time."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", choices=SCENARIOS, default="stat")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    parser.add_argument("--user", action="append", default=[], help="a user (repeat); default: the corpus users")
    parser.add_argument("--users", type=int, default=20, help="use the first N corpus users (user01@bench.test ...)")
    parser.add_argument("--password", default=None, help="default: the corpus password")
    parser.add_argument("--apop", action="store_true", help="log in with APOP instead of USER/PASS")
    parser.add_argument("--verify-corpus", metavar="USERSxMESSAGES", help="verify every RETR against the corpus of that shape, e.g. 20x50")
    parser.add_argument("--server-pid", type=int, action="append", default=[], help="a server process (tree) to measure CPU of; repeat")
    parser.add_argument("--share-users", action="store_true", help="allow concurrent sessions on one maildrop")
    parser.add_argument("--tls", action="store_true", help="implicit TLS (POP3S), TLS 1.3 only")
    parser.add_argument("--tls-ca", default=None, help="verify the server certificate against this CA file (default: no verification)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import corpus

    users = args.user or [corpus.address(i) for i in range(1, args.users + 1)]
    expected = None
    if args.verify_corpus:
        u, m = (int(x) for x in args.verify_corpus.lower().split("x"))
        expected = corpus.Corpus(u, m).digests()
    result = load(
        host=args.host,
        port=args.port,
        users=users,
        password=args.password or corpus.PASSWORD,
        scenario=args.scenario,
        concurrency=args.concurrency,
        duration=args.duration,
        apop=args.apop,
        expected=expected,
        serverPids=args.server_pid,
        shareUsers=args.share_users,
        tls=args.tls,
        tlsCA=args.tls_ca,
    )
    if args.json:
        import json

        print(json.dumps(result.asDict()))
    else:
        print(result.summary())
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
