"""
The benchmark tools (benchmarks/) keep working: the corpus generator, the
POP3 response parser and load generator (against canned bytes, a scripted
in-process server and one real C{twistd mailgate}, over plain TCP and over
TLS 1.3, also against a real Dovecot where installed), the SMTP reply
parser and the intake verification, intake by BDAT chunks (against an
in-process server recording what it is sent, mailgate traced by
--debug-peer, and Dovecot's LMTP), the generated Dovecot configuration,
the report's ratios and verdicts on synthetic rows, the interleaving of
the rounds, and the py-spy profile summary.  Behaviour only, never
timings.
"""

import asyncio
import hashlib
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import corpus  # noqa: E402
import floor  # noqa: E402
import pop3load  # noqa: E402
import smtpload  # noqa: E402
import bans as bansBenchmark  # noqa: E402
import trickle  # noqa: E402
from pop3load import POP3ProtocolError, ResponseBuffer  # noqa: E402

BIN = os.path.dirname(sys.executable)


# -- the corpus -----------------------------------------------------------------


def test_corpusIsDeterministic():
    a = corpus.Corpus(3, 4)
    b = corpus.Corpus(3, 4)
    assert a.users == ["user01@bench.test", "user02@bench.test", "user03@bench.test"]
    assert a.expected() == b.expected()
    assert corpus.Corpus(3, 4, seed=2).message(0, 2) != a.message(0, 2)


def test_corpusMessagesAreWellFormed():
    c = corpus.Corpus(2, 6)
    for user, address, number, data in c.iterMessages():
        assert data.endswith(b"\r\n")
        assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
        assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
        header, _, body = data.partition(b"\r\n\r\n")
        assert body
        assert f"To: <{address}>".encode() in header
        assert b"\r\nSubject: " in header and b"\r\nMessage-ID: <" in header
        assert header.isascii()
        assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_corpusFirstMessageHasEveryEdgeCase():
    lines = corpus.Corpus(1, 1).message(0, 1).split(b"\r\n")
    assert b"." in lines, "a lone dot line"
    assert any(line.startswith(b"..") for line in lines)
    assert any(len(line) == corpus.LONG_LINE for line in lines)
    assert any(not line.isascii() for line in lines), "8-bit text"


def test_corpusSizes():
    c = corpus.standard()
    kinds = [c.kind(u, n) for u in range(c.userCount) for n in range(1, c.messageCount + 1)]
    assert (kinds.count("small"), kinds.count("medium"), kinds.count("large")) == (870, 120, 10)
    small = c.message(0, 1)
    assert 2000 <= len(small) <= 12000
    medium = next(
        c.message(u, n) for u in range(20) for n in range(1, 51) if c.kind(u, n) == "medium"
    )
    assert 50_000 <= len(medium) <= 210_000
    assert b"Content-Transfer-Encoding: base64" in medium


def test_corpusFiles(tmp_path):
    c = corpus.Corpus(2, 3)
    paths = c.writeFiles(str(tmp_path / "files"))
    assert [open(p, "rb").read() for p in paths["user02@bench.test"]] == c.messages(1)
    homes = c.writeMaildirs(str(tmp_path / "maildirs"))
    cur = os.path.join(homes["user01@bench.test"], "Maildir", "cur")
    names = sorted(os.listdir(cur))
    assert len(names) == 3
    first = open(os.path.join(cur, names[0]), "rb").read()
    assert first.replace(b"\n", b"\r\n") == c.message(0, 1)
    assert f",S={len(first)},W={len(c.message(0, 1))}:2,S" in names[0]
    size, digest, headerSize = c.digests()["user01@bench.test"][0]
    assert (size, digest) == (len(c.message(0, 1)), hashlib.sha1(c.message(0, 1)).hexdigest())
    assert c.message(0, 1)[headerSize - 4 : headerSize] == b"\r\n\r\n"


# -- POP3 response parsing --------------------------------------------------------


def stuffed(message):
    return smtpload.dotStuff(message)


def feedBytewise(data, parse, buffer=None):
    """
    Feed C{data} one octet at a time; return the results of C{parse} as they
    complete.
    """
    buffer = buffer or ResponseBuffer()
    results = []
    for i in range(len(data)):
        buffer.feed(data[i : i + 1])
        result = parse(buffer)
        while result is not None:
            results.append(result)
            result = parse(buffer)
    return results


def test_statusLines():
    b = ResponseBuffer()
    b.feed(b"+OK ready <1.2@host>\r\n-ERR [IN-USE] locked\r\n+OK\r\n+OK 2 ")
    assert b.status() == (True, "ready <1.2@host>")
    assert b.status() == (False, "[IN-USE] locked")
    assert b.status() == (True, "")
    assert b.status() is None
    b.feed(b"320\r\n")
    assert b.status() == (True, "2 320")


def test_statusGarbage():
    b = ResponseBuffer()
    b.feed(b"* OK IMAP4rev1\r\n")
    with pytest.raises(POP3ProtocolError):
        b.status()


def test_multilineUnstuffing():
    message = corpus.Corpus(1, 1).message(0, 1)
    wire = stuffed(message)
    assert b"\r\n..\r\n" in wire
    results = feedBytewise(wire + wire, lambda b: b.multiline())
    assert results == [message, message]


def test_multilineEdgeCases():
    b = ResponseBuffer()
    b.feed(b".\r\n..\r\n.\r\n...x\r\n.\r\n")
    assert b.multiline() == b""
    assert b.multiline() == b".\r\n"
    assert b.multiline() == b"..x\r\n"
    assert len(b) == 0


def test_multilineUnstuffedDot():
    b = ResponseBuffer()
    b.feed(b"line\r\n.oops\r\n.\r\n")
    with pytest.raises(POP3ProtocolError):
        b.multiline()
    b = ResponseBuffer()
    b.feed(b".oops\r\n.\r\n")
    with pytest.raises(POP3ProtocolError):
        b.multiline()


def test_listingAndAPOP():
    assert pop3load.parseListing(b"1 120\r\n2 3400\r\n", "LIST") == [(1, b"120"), (2, b"3400")]
    with pytest.raises(POP3ProtocolError):
        pop3load.parseListing(b"1\r\n", "LIST")
    # RFC 1939's example.
    assert (
        pop3load.apopDigest("POP3 server ready <1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
        == "c4c9334bac560ecc979e58001b3e22fb"
    )
    with pytest.raises(POP3ProtocolError):
        pop3load.apopDigest("POP3 server ready", "x")


# -- the load generator against a scripted server ----------------------------------


class ScriptedPOP3:
    """
    A minimal POP3 server over a corpus, with faults to inject: LIST
    sizes off by one (C{lie}), -ERR for PASS (C{refuse}), a message that
    differs from the corpus (C{corrupt}).
    """

    def __init__(self, c, lie=False, refuse=False, corrupt=False):
        self.corpus = c
        self.lie = lie
        self.refuse = refuse
        self.corrupt = corrupt
        self.sessions = 0
        #: every RETR and TOP asked for, in order
        self.fetches = []

    async def handle(self, reader, writer):
        self.sessions += 1
        user = None
        messages = []
        writer.write(b"+OK scripted <42.1@scripted.test>\r\n")
        try:
            while True:
                line = (await reader.readline()).rstrip(b"\r\n").decode()
                if not line:
                    return
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb in ("RETR", "TOP"):
                    self.fetches.append(line)
                if verb == "USER":
                    user = arg
                    writer.write(b"+OK\r\n")
                elif verb in ("PASS", "APOP"):
                    if verb == "APOP":
                        user, digest = arg.split()
                        good = pop3load.apopDigest("<42.1@scripted.test>", self.corpus.password)
                        ok = digest == good
                    else:
                        ok = arg == self.corpus.password
                    if self.refuse or not ok:
                        writer.write(b"-ERR [AUTH] no\r\n")
                        continue
                    messages = self.corpus.messages(user)
                    if self.corrupt:
                        messages = [messages[0].replace(b"the", b"THE", 1)] + messages[1:]
                    writer.write(b"+OK logged in\r\n")
                elif verb == "STAT":
                    writer.write(b"+OK %d %d\r\n" % (len(messages), sum(map(len, messages))))
                elif verb == "LIST" and arg:
                    n = int(arg)
                    writer.write(b"+OK %d %d\r\n" % (n, len(messages[n - 1]) + self.lie))
                elif verb == "LIST":
                    body = b"".join(b"%d %d\r\n" % (i + 1, len(m) + self.lie) for i, m in enumerate(messages))
                    writer.write(b"+OK\r\n" + body + b".\r\n")
                elif verb == "UIDL":
                    body = b"".join(b"%d uid%d\r\n" % (i + 1, i) for i in range(len(messages)))
                    writer.write(b"+OK\r\n" + body + b".\r\n")
                elif verb == "RETR":
                    m = messages[int(arg) - 1]
                    writer.write(b"+OK %d octets\r\n" % len(m) + stuffed(m))
                elif verb == "TOP":
                    m = messages[int(arg.split()[0]) - 1]
                    writer.write(b"+OK\r\n" + stuffed(m[: m.index(b"\r\n\r\n") + 4]))
                elif verb == "QUIT":
                    writer.write(b"+OK bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"-ERR unknown\r\n")
                await writer.drain()
        finally:
            writer.close()


async def scriptedLoad(server, **kwargs):
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        config = dict(
            port=port, users=server.corpus.users, password=server.corpus.password,
            duration=30, sessions=4, concurrency=2, settle=0, serverPids=[os.getpid()],
        )
        config.update(kwargs)
        return await pop3load.runLoad(pop3load.LoadConfig(**config))
    finally:
        listener.close()
        await listener.wait_closed()


SMALL = corpus.Corpus(2, 3)


@pytest.mark.parametrize("scenario", pop3load.SCENARIOS)
def test_loadScenarios(scenario):
    result = asyncio.run(scriptedLoad(ScriptedPOP3(SMALL), scenario=scenario, expected=SMALL.digests()))
    assert (result.sessions, result.errors) == (4, 0), result.errorKinds
    assert len(result.latencies) == 4 and result.p99 >= result.p50 > 0
    assert result.peak == 2
    fetched = {"stat": 0, "list": 0, "top": 3, "fetchall": 3, "retr1": 1, "newest": 3, "pick": 4, "limit": 3}[scenario]
    assert result.messages == 4 * fetched
    if scenario == "fetchall":
        assert result.bytesReceived > 2 * sum(map(len, SMALL.messages(0)))
    assert result.cpuSeconds >= 0 and result.cpuMsPerSession is not None


def test_theAccessPatternScenariosFetchInTheirOrder():
    """
    newest fetches every message from the last back; pick lists every
    header, then fetches every fifth message from the third, here and
    there; limit goes through in order, fetching the messages up to 50 KB
    and the headers of the larger ones: all verified octet for octet.
    """
    c = corpus.Corpus(1, 20)
    server = ScriptedPOP3(c)
    result = asyncio.run(scriptedLoad(server, scenario="newest", expected=c.digests(), sessions=1))
    assert (result.sessions, result.errors, result.messages) == (1, 0, 20), result.errorKinds
    assert server.fetches == [f"RETR {n}" for n in range(20, 0, -1)]
    server.fetches.clear()
    result = asyncio.run(scriptedLoad(server, scenario="pick", expected=c.digests(), sessions=1))
    assert (result.sessions, result.errors, result.messages) == (1, 0, 24), result.errorKinds
    assert server.fetches == [f"TOP {n} 0" for n in range(1, 21)] + ["RETR 3", "RETR 13", "RETR 18", "RETR 8"]
    # limit: in order, the messages over 50 KB by their headers alone.
    server.fetches.clear()
    result = asyncio.run(scriptedLoad(server, scenario="limit", expected=c.digests(), sessions=1))
    assert (result.sessions, result.errors, result.messages) == (1, 0, 20), result.errorKinds
    sizes = [len(m) for m in c.messages(0)]
    assert min(sizes) <= pop3load.SIZE_LIMIT < max(sizes)
    assert server.fetches == [
        f"TOP {n} 0" if size > pop3load.SIZE_LIMIT else f"RETR {n}" for n, size in enumerate(sizes, 1)
    ]


def test_loadAPOP():
    result = asyncio.run(scriptedLoad(ScriptedPOP3(SMALL), scenario="fetchall", apop=True))
    assert (result.sessions, result.errors) == (4, 0), result.errorKinds


def test_loadCountsSizeMismatch():
    result = asyncio.run(scriptedLoad(ScriptedPOP3(SMALL, lie=True), scenario="fetchall"))
    assert result.sessions == 0 and result.errors == 4
    assert all(kind.startswith("verification: RETR 1") for kind in result.errorKinds)
    result = asyncio.run(scriptedLoad(ScriptedPOP3(SMALL, lie=True), scenario="retr1"))
    assert result.errors == 4


def test_loadCountsERR():
    result = asyncio.run(scriptedLoad(ScriptedPOP3(SMALL, refuse=True), scenario="stat"))
    assert result.sessions == 0 and result.errors == 4
    assert result.errorKinds == {"PASS -ERR [AUTH]": 4}


def test_loadVerifiesContent():
    result = asyncio.run(
        scriptedLoad(ScriptedPOP3(SMALL, corrupt=True), scenario="fetchall", expected=SMALL.digests())
    )
    assert result.errors == 4 and result.sessions == 0
    assert all("differ from the corpus" in kind for kind in result.errorKinds)


def test_loadCountsRefusedConnections():
    async def go():
        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        listener.close()
        await listener.wait_closed()
        return await pop3load.runLoad(pop3load.LoadConfig(
            port=port, users=["a"], password="b", duration=30, sessions=3, settle=0,
        ))

    result = asyncio.run(go())
    assert result.sessions == 0 and result.errors == 3


def test_cpuOfProcessTree():
    assert os.getpid() in pop3load.processTree([os.getpid()])
    assert pop3load.cpuSeconds([os.getpid()]) > 0
    assert pop3load.rssBytes(os.getpid()) > 0


def test_stealIsReadFromProcStat():
    with open("/proc/stat") as f:
        fields = f.readline().split()
    first = pop3load.systemStealSeconds()
    assert first >= 0
    assert pop3load.systemStealSeconds() >= first
    if len(fields) > 8:
        assert first >= int(fields[8]) / os.sysconf("SC_CLK_TCK")


def test_theHeaderSaysWhatTheHypervisorTook():
    import report

    args = {"quiet_wait": 10, "quiet_threshold": 0.25, "duration": 4.0, "rounds": 3}
    info = {"nproc": 2, "loadavgBefore": ["0.1", "0.2", "0.3"]}
    assert "steal" not in report.header(info, args, {})
    info.update(stealCoreSeconds=12.0, runSeconds=600.0)
    assert "VM steal during the run: 12.0 core-seconds, 1.0% of the machine's time" in report.header(info, args, {})
    assert "taken again" not in report.header(info, args, {})
    info.update(stealRepeats=5)
    args.update(steal_limit=0.1, steal_retries=2)
    assert (
        "a measurement with more than 0.1 cores of steal was taken again (at most 2 times): 5 taken again"
        in report.header(info, args, {})
    )


def test_theHeaderNamesTheInterpreterThatServes(tmp_path):
    """
    The header names the Python that runs the servers (C{--bin}'s
    C{twistd}) and the Twisted and mailgate it has, not the benchmarks'
    own: a run with another interpreter's C{--bin} says so.
    """
    import platform
    import subprocess

    import report
    import run

    args = {"quiet_wait": 10, "quiet_threshold": 0.25, "duration": 4.0, "rounds": 3}
    own = run.machineInfo(BIN)
    assert (own["implementation"], own["python"]) == (platform.python_implementation(), platform.python_version())
    # The binary behind the venv's link, which tells one build from another.
    assert own["executable"] == os.path.realpath(sys.executable)
    assert own["mailgate"] is not None
    assert (
        f"{platform.python_implementation()} {platform.python_version()} ({own['executable']}), Twisted {own['twisted']},"
        in report.header(own, args, {})
    )

    other = "/usr/bin/python3"
    if not os.access(other, os.X_OK):
        pytest.skip("no system Python at /usr/bin/python3 to serve as another interpreter")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "twistd").write_text(f"#!{other}\nprint('twistd')\n")
    itsVersion = subprocess.run(
        [other, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    info = run.machineInfo(str(bindir))
    assert info["python"] == itsVersion
    assert info["executable"] == os.path.realpath(other)
    # The system Python has no mailgate installed: the benchmarks' own
    # interpreter, which has, would say otherwise.
    assert info["mailgate"] is None
    assert f" {itsVersion} ({info['executable']}), Twisted {info['twisted']}," in report.header(info, args, {})

    # A script run through env names its interpreter after it.
    (bindir / "twistd").write_text(f"#!/usr/bin/env {other}\nprint('twistd')\n")
    assert run.machineInfo(str(bindir))["python"] == itsVersion

    # Nothing to ask: the header says it does not know rather than guess.
    empty = tmp_path / "empty"
    empty.mkdir()
    unknown = run.machineInfo(str(empty))
    assert (unknown["python"], unknown["executable"], unknown["twisted"], unknown["mailgate"]) == (None, None, None, None)
    assert "Python None, Twisted None," in report.header(unknown, args, {})


# -- SMTP replies and intake verification -------------------------------------------


def test_smtpReplies():
    b = smtpload.ReplyBuffer()
    for piece in (b"250-mail", b"gate\r\n250-PIPELINING\r", b"\n250 SIZE 100\r\n354 go"):
        b.feed(piece)
    assert b.reply() == (250, ["mailgate", "PIPELINING", "SIZE 100"])
    assert b.reply() is None
    b.feed(b"\r\n")
    assert b.reply() == (354, ["go"])
    b.feed(b"250-a\r\n251 b\r\n")
    with pytest.raises(smtpload.SMTPProtocolError):
        b.reply()


def test_dotStuffRoundTrip():
    message = corpus.intakeMessage(4096, "tok-1", "intake01@bench.test")
    assert b"Subject: bench intake tok-1\r\n" in message
    wire = smtpload.dotStuff(message)
    assert wire.endswith(b"\r\n.\r\n")
    b = ResponseBuffer()
    b.feed(wire)
    assert b.multiline() == message
    assert smtpload.tokensIn(message) == ["tok-1"]


def test_intakeVerification():
    runId, outgoing = smtpload.makeMessages(4, 1000, ["a@x", "b@x"], runId="r1")
    result = smtpload.IntakeResult(
        protocol="LMTP", sessions=1, size=1000, messages=4,
        acknowledged=[m.token for m in outgoing], errors=0, errorKinds={}, elapsed=1.0,
        latencies=[0.1], cpuSeconds=0.0, extraCpuSeconds=0.0, runId=runId,
        expected={m.token: m.recipients for m in outgoing},
    )
    from collections import Counter

    good = {"a@x": Counter(["r1-000000", "r1-000002", "other-1"]), "b@x": Counter(["r1-000001", "r1-000003"])}
    assert smtpload.verify(result, good)["ok"]
    bad = {"a@x": Counter({"r1-000000": 2}), "b@x": Counter(["r1-000001", "r1-000003", "r1-000002"])}
    report = smtpload.verify(result, bad)
    assert not report["ok"]
    assert report["duplicated"] == [("a@x", "r1-000000", 2)]
    assert report["missing"] == [("a@x", "r1-000002")]
    assert report["unexpected"] == [("b@x", "r1-000002")]


# -- BDAT: what the load generator sends when asked for chunks --------------------------------


class RecordingSMTP(asyncio.Protocol):
    """
    A minimal SMTP/LMTP server that records what it is sent: every
    command line (with how many octets were already waiting behind it,
    so that pipelining shows) and every BDAT chunk, and keeps each chunk
    as a message for its recipients.  It offers the C{capabilities} it is
    given; DATA, and anything it does not know, get 500 (it stores no
    message that did not come as a chunk).
    """

    def __init__(self, capabilities, lmtp, record):
        self.capabilities = capabilities
        self.lmtp = lmtp
        self.commands = record.commands
        self.chunks = record.chunks
        self.delivered = record.delivered
        self.buffer = bytearray()
        self.chunkLeft = None
        self.recipients = []

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"220 recording ready\r\n")

    def data_received(self, data):
        self.buffer += data
        while True:
            if self.chunkLeft is not None:
                if len(self.buffer) < self.chunkLeft:
                    return
                chunk = bytes(self.buffer[: self.chunkLeft])
                del self.buffer[: self.chunkLeft]
                self.chunkLeft = None
                self.chunks.append(chunk)
                for rcpt in self.recipients:
                    self.delivered.setdefault(rcpt, []).append(chunk)
                replies = len(self.recipients) if self.lmtp else 1
                self.transport.write(b"250 2.0.0 stored\r\n" * replies)
                self.recipients = []
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end]).decode()
            del self.buffer[: end + 2]
            self.commands.append((line, len(self.buffer)))
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "LHLO"):
                lines = ["recording"] + self.capabilities
                self.transport.write("".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n" for i, text in enumerate(lines)
                ).encode())
            elif verb == "MAIL":
                self.recipients = []
                self.transport.write(b"250 2.1.0 ok\r\n")
            elif verb == "RCPT":
                self.recipients.append(argument.partition("<")[2].rstrip(">"))
                self.transport.write(b"250 2.1.5 ok\r\n")
            elif verb == "BDAT":
                size, *last = argument.split()
                assert last == ["LAST"], line
                self.chunkLeft = int(size)
            elif verb == "QUIT":
                self.transport.write(b"221 2.0.0 bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"500 5.5.1 not here\r\n")


class Record:
    """
    What a L{RecordingSMTP} was sent: C{commands}, C{(line, octets
    already waiting behind it)}; C{chunks}, every BDAT chunk; and
    C{delivered}, C{{recipient: [chunk]}}.
    """

    def __init__(self):
        self.commands = []
        self.chunks = []
        self.delivered = {}

    def verbs(self):
        return [line.split()[0] for line, _ in self.commands]


async def recorded(capabilities, lmtp, client):
    """
    Run C{client(port)} against a L{RecordingSMTP} offering
    C{capabilities}; C{(what it returned, the L{Record})}.
    """
    record = Record()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: RecordingSMTP(capabilities, lmtp, record), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        return await asyncio.wait_for(client(port), 60), record
    finally:
        listener.close()
        await listener.wait_closed()


def recordedIntake(capabilities, lmtp, **kwargs):
    """
    Intake against a L{RecordingSMTP} offering C{capabilities}: the
    result, verified from what the server kept, and the L{Record}.
    """
    from collections import Counter

    result, record = asyncio.run(recorded(
        capabilities, lmtp, lambda port: smtpload.runIntake(port, lmtp=lmtp, settle=0, timeout=30, **kwargs)
    ))
    smtpload.verify(result, {
        user: Counter(token for message in messages for token in smtpload.tokensIn(message))
        for user, messages in record.delivered.items()
    })
    return result, record


def test_theChunkIsTheRawMessage():
    """
    A message's BDAT form is its CRLF octets as they are, after a BDAT
    command with their count: not dot-stuffed, no terminating line (its
    DATA form is both).
    """
    _, outgoing = smtpload.makeMessages(20, 2048, ["a@x"], runId="r1")
    dotted = [m for m in outgoing if b"\r\n." in m.raw]
    assert dotted, "no message of the sample has a line starting with a dot"
    for m in outgoing:
        assert m.chunk() == b"BDAT %d LAST\r\n" % len(m.raw) + m.raw
        assert m.data == smtpload.dotStuff(m.raw)
        assert m.raw == corpus.intakeMessage(2048, m.token, "a@x")
    assert all(m.data != m.raw for m in dotted)


@pytest.mark.parametrize("lmtp", [True, False], ids=["lmtp", "smtp"])
def test_bdatSendsEachMessageAsOneLastChunk(lmtp):
    """
    With bdat, every message goes as one BDAT <n> LAST chunk of its raw
    octets, pipelined after MAIL and RCPT, and never by DATA; with LMTP
    the chunk's reply per recipient is read (two recipients a message
    here), and what the server kept is verified like DATA's deliveries.
    """
    recipients = ["a@x", "b@x", "c@x"]
    result, record = recordedIntake(
        ["PIPELINING", "CHUNKING"], lmtp, recipients=recipients, sessions=2, messages=7, size=2048,
        perConnection=3, rcptsPerMessage=2, runId="b1", bdat=True,
    )
    assert result.protocol == ("LMTP BDAT" if lmtp else "SMTP BDAT")
    assert (result.errors, len(result.acknowledged)) == (0, 7), result.errorKinds
    assert result.verified, result.verification
    assert result.verification["found"] == 14
    _, outgoing = smtpload.makeMessages(7, 2048, recipients, 2, "b1")
    assert sorted(record.chunks) == sorted(m.raw for m in outgoing)
    verbs = record.verbs()
    assert "DATA" not in verbs
    assert verbs.count("BDAT") == 7 and verbs.count("MAIL") == 7 and verbs.count("RCPT") == 14
    assert sorted(line for line, _ in record.commands if line.startswith("BDAT")) == sorted(
        f"BDAT {len(m.raw)} LAST" for m in outgoing
    )
    assert verbs.count("LHLO" if lmtp else "EHLO") == 3  # 7 messages, 3 a connection


def test_bdatWithoutPipeliningWaitsForEachReply():
    """
    A server offering CHUNKING but not PIPELINING is sent MAIL, each
    RCPT and the chunk one by one: no octet of the next command arrives
    before the previous one's reply.
    """
    result, record = recordedIntake(
        ["CHUNKING"], True, recipients=["a@x", "b@x"], sessions=1, messages=3, size=1024,
        perConnection=3, rcptsPerMessage=2, bdat=True,
    )
    assert (result.errors, len(result.acknowledged)) == (0, 3), result.errorKinds
    assert result.verified, result.verification
    assert record.verbs() == ["LHLO"] + ["MAIL", "RCPT", "RCPT", "BDAT"] * 3 + ["QUIT"]
    # Behind a command, nothing; behind BDAT, at most its own chunk.
    assert all(
        waiting <= (int(line.split()[1]) if line.startswith("BDAT") else 0) for line, waiting in record.commands
    ), record.commands


def test_bdatAskedOfAServerWithoutChunkingFails(capsys):
    """
    --bdat against a server whose EHLO/LHLO reply does not list CHUNKING
    is an error saying so, raised before any message: never DATA in its
    place.
    """
    for lmtp in (True, False):
        failures = []

        async def intake(port, lmtp=lmtp):
            try:
                await smtpload.runIntake(port, ["a@x"], lmtp=lmtp, sessions=3, messages=9, size=1024,
                                         perConnection=3, settle=0, timeout=30, bdat=True)
            except smtpload.ChunkingNotOffered as e:
                failures.append(str(e))

        _, record = asyncio.run(recorded(["PIPELINING", "8BITMIME"], lmtp, intake))
        assert len(failures) == 1 and "does not offer CHUNKING" in failures[0], failures
        assert set(record.verbs()) <= {"LHLO", "EHLO"}
    # The command line: its exit status and a line saying why.
    code, record = asyncio.run(recorded(["PIPELINING"], True, lambda port: asyncio.to_thread(
        smtpload.main, ["--port", str(port), "--lmtp", "--bdat", "--messages", "4", "--sessions", "1"]
    )))
    assert code == 2
    assert "does not offer CHUNKING" in capsys.readouterr().err
    assert record.verbs() == ["LHLO"]


# -- against a real twistd mailgate ---------------------------------------------------


@pytest.mark.skipif(
    not os.access(os.path.join(BIN, "twistd"), os.X_OK) or not os.access(os.path.join(BIN, "mailgate"), os.X_OK),
    reason="twistd and mailgate are not installed next to this Python (make install)",
)
def test_againstMailgate(tmp_path):
    import run

    c = corpus.Corpus(1, 2)
    database = "sqlite:///" + str(tmp_path / "bench.sqlite3")
    user = c.users[0]
    run.mailgateCLI(BIN, database, ["user", "add", user, "--password-stdin", "--apop"], c.password + "\n")
    run.mailgateCLI(BIN, database, ["user", "add", "intake01@bench.test", "--password-stdin"], c.password + "\n")
    for data in c.messages(0):
        run.mailgateCLI(BIN, database, ["deliver", user], data)
    run.checkMailbox(BIN, database, c)
    # The wrong password's -ERR without the default 1 s delay.
    server = run.MailgateServer(BIN, database, str(tmp_path / "mailgate.log"), smtp=False,
                                options=["--auth-failure-delay", "0.1"])
    try:
        server.start()
        port = server.ports["POP3"]
        for scenario, apop in (("fetchall", False), ("top", True), ("retr1", False)):
            result = pop3load.load(
                port=port, users=c.users, password=c.password, scenario=scenario, apop=apop,
                duration=30, sessions=2, settle=0, expected=c.digests(), serverPids=[server.pid],
            )
            assert (result.sessions, result.errors) == (2, 0), result.errorKinds
        result = pop3load.load(
            port=port, users=c.users, password="wrong", duration=30, sessions=1, settle=0,
        )
        assert result.errors == 1 and "PASS -ERR" in next(iter(result.errorKinds))

        async def intake():
            r = await smtpload.runIntake(
                server.ports["LMTP"], ["intake01@bench.test"], lmtp=True, sessions=2,
                messages=6, size=2048, perConnection=2, serverPids=[server.pid], settle=0,
            )
            smtpload.verify(r, await smtpload.tokensFromPOP3(port, ["intake01@bench.test"], c.password))
            return r

        result = asyncio.run(intake())
        assert result.errors == 0 and len(result.acknowledged) == 6
        assert result.verified, result.verification
    finally:
        server.stop()


@pytest.mark.skipif(
    not os.access(os.path.join(BIN, "twistd"), os.X_OK) or not os.access(os.path.join(BIN, "mailgate"), os.X_OK),
    reason="twistd and mailgate are not installed next to this Python (make install)",
)
def test_bdatAgainstMailgate(tmp_path):
    """
    Intake by BDAT against a real twistd mailgate, LMTP and SMTP: every
    message acknowledged and found once through POP3, and the server's own
    trace (--debug-peer) shows a BDAT <n> LAST per message and no DATA.
    """
    import run

    database = "sqlite:///" + str(tmp_path / "bench.sqlite3")
    users = run.intakeUsers(2)
    for user in users:
        run.mailgateCLI(BIN, database, ["user", "add", user, "--password-stdin"], "secret\n")
    logPath = tmp_path / "mailgate.log"
    server = run.MailgateServer(BIN, database, str(logPath), options=["--debug-peer", "127.0.0.1/32"])
    try:
        server.start()
        for protocol in ("LMTP", "SMTP"):
            async def intake(protocol=protocol):
                r = await smtpload.runIntake(
                    server.ports[protocol], users, lmtp=protocol == "LMTP", sessions=2, messages=5, size=2048,
                    perConnection=2, rcptsPerMessage=2, serverPids=[server.pid], settle=0, bdat=True,
                )
                smtpload.verify(r, await smtpload.tokensFromPOP3(server.ports["POP3"], users, "secret"))
                return r

            result = asyncio.run(intake())
            assert result.errors == 0 and len(result.acknowledged) == 5, result.errorKinds
            assert result.verified and result.verification["found"] == 10, result.verification
    finally:
        server.stop()
    commands = [line.split(" C: ", 1)[1] for line in logPath.read_text(errors="replace").splitlines()
                if " trace " in line and " C: " in line]
    bdats = [c for c in commands if c.startswith("BDAT ")]
    assert len(bdats) == 10 and all(c.endswith(" LAST") for c in bdats), bdats
    assert not [c for c in commands if c.upper().startswith("DATA")]


@pytest.mark.skipif(
    not os.access("/usr/sbin/dovecot", os.X_OK), reason="Dovecot is not installed (tests/sysdeps.sh)"
)
def test_bdatAgainstDovecot(tmp_path):
    """
    Dovecot's LMTP, as the suite runs it, offers CHUNKING and takes every
    message by BDAT: found once each in its maildirs.
    """
    import dovecot
    import run

    users = run.intakeUsers(2)
    with dovecot.Dovecot(variant="hp", credentials="warm") as dv:
        dv.loadCorpus(corpus.Corpus(1, 1))
        dv.addUsers(users, "secret")
        dv.start()
        result = asyncio.run(smtpload.runIntake(
            dv.lmtpPort, users, lmtp=True, sessions=2, messages=5, size=2048, perConnection=2,
            rcptsPerMessage=2, serverPids=[dv.pid], settle=0, bdat=True,
        ))
        assert result.errors == 0 and len(result.acknowledged) == 5, result.errorKinds
        smtpload.verify(result, smtpload.tokensFromMaildirs({u: dv.maildir(u) for u in users}))
        assert result.verified and result.verification["found"] == 10, result.verification
        assert dv.errorsLogged() == []


# -- TLS: the load generator really talks TLS 1.3 -------------------------------------


def _tlsFiles(tmp_path):
    import tlscert

    return tlscert.makeCertificate(str(tmp_path / "tls"))


def test_certificateIsRSA2048ForLoopback(tmp_path):
    from cryptography import x509

    certificate, key = _tlsFiles(tmp_path)
    cert = x509.load_pem_x509_certificate(open(certificate, "rb").read())
    assert cert.public_key().key_size == 2048
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in open(key, "rb").read()


def test_rsaAndECDSACertificatesForLoopback(tmp_path):
    """
    --tls-certificates rsa+ecdsa: the RSA 2048 pair, then an ECDSA P-256
    pair for the same names, which both servers load as the alternative.
    """
    import tlscert
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = tlscert.makeCertificates(str(tmp_path / "tls"), "rsa+ecdsa")
    assert len(paths) == 4 and len(set(paths)) == 4
    rsaCert, ecCert = (x509.load_pem_x509_certificate(open(p, "rb").read()) for p in paths[0::2])
    assert rsaCert.public_key().key_size == 2048
    assert isinstance(ecCert.public_key(), ec.EllipticCurvePublicKey)
    assert ecCert.public_key().curve.name == "secp256r1"
    assert ecCert.subject == rsaCert.subject
    assert tlscert.makeCertificates(str(tmp_path / "rsa"), "rsa")[0].endswith("bench-cert.pem")
    with pytest.raises(ValueError):
        tlscert.makeCertificates(str(tmp_path / "x"), "dsa")


def test_mailgateIsGivenTheAlternativeCertificate(tmp_path):
    import run
    import tlscert

    paths = tlscert.makeCertificates(str(tmp_path / "tls"), "rsa+ecdsa")
    argv = run.MailgateServer(BIN, "sqlite:///x", "log", tls=paths).argv
    assert argv[argv.index("--tls-cert") + 1] == paths[0] and argv[argv.index("--tls-key") + 1] == paths[1]
    assert argv[argv.index("--tls-alt-cert") + 1] == paths[2]
    assert argv[argv.index("--tls-alt-key") + 1] == paths[3]
    assert "--tls-alt-cert" not in run.MailgateServer(BIN, "sqlite:///x", "log", tls=paths[:2]).argv


def test_tlsContextRefusesBelowTLS13():
    import ssl

    context = pop3load.tlsContext()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_NONE


def test_loadOverTLSAgainstScriptedServer(tmp_path):
    """
    The TLS mode completes sessions with a TLS 1.3 server (verifying the
    certificate when given one), and fails against a server that offers
    only TLS 1.2.
    """
    import ssl

    certificate, key = _tlsFiles(tmp_path)

    async def go(maximum):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        context.maximum_version = maximum
        server = ScriptedPOP3(SMALL)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
        port = listener.sockets[0].getsockname()[1]
        try:
            return await pop3load.runLoad(pop3load.LoadConfig(
                port=port, users=SMALL.users, password=SMALL.password, scenario="fetchall",
                duration=30, sessions=3, concurrency=1, settle=0, expected=SMALL.digests(),
                tls=True, tlsCA=certificate, sessionTimeout=10,
            ))
        finally:
            listener.close()
            await listener.wait_closed()

    result = asyncio.run(go(ssl.TLSVersion.TLSv1_3))
    assert (result.sessions, result.errors) == (3, 0), result.errorKinds
    assert result.tls and result.tlsVersions == {"TLSv1.3": 3}
    assert result.asDict()["tlsVersions"] == {"TLSv1.3": 3}
    result = asyncio.run(go(ssl.TLSVersion.TLSv1_2))
    assert result.sessions == 0 and result.errors == 3


# -- Dovecot's configuration ---------------------------------------------------------


def _block(text, header):
    """
    The lines of the top-level C{header {...}} block of a Dovecot config
    (nested blocks included).
    """
    lines = text.splitlines()
    start = lines.index(header + " {")
    depth, body = 0, []
    for line in lines[start:]:
        depth += line.count("{") - line.count("}")
        body.append(line.strip())
        if depth == 0:
            return body
    raise AssertionError(f"unterminated {header}")


def test_dovecotHighPerformanceWarmConfig(tmp_path):
    import dovecot

    certificate, key = _tlsFiles(tmp_path)
    with dovecot.Dovecot(variant="hp", credentials="warm", tls=(certificate, key)) as dv:
        dv.pop3Port, dv.pop3sPort, dv.lmtpPort = 1100, 9950, 2400
        text = dv.configText()
        assert (dv.scheme, dv.authCache, dv.credentials) == ("PLAIN", True, "warm")
    lines = [line.strip() for line in text.splitlines()]
    login = _block(text, "service pop3-login")
    for setting in ("service_count = 0", "process_min_avail = 2", "client_limit = 1000"):
        assert setting in login
    pop3 = _block(text, "service pop3")
    assert "service_count = 0" in pop3 and "process_min_avail = 2" in pop3
    for setting in ("pop3_no_flag_updates = yes", "mail_max_userip_connections = 1000",
                    "auth_cache_size = 1M", "auth_cache_ttl = 1 hour", "ssl = yes",
                    f"ssl_cert = <{certificate}", f"ssl_key = <{key}", "mail_fsync = always"):
        assert setting in lines, setting
    pop3s = login[login.index("inet_listener pop3s {"):]
    assert pop3s[1:3] == ["address = 127.0.0.1", "port = 9950"]
    assert dovecot.hashPassword("secret", "PLAIN") == "{PLAIN}secret"


def test_dovecotAlternativeCertificateConfig(tmp_path):
    import dovecot
    import tlscert

    paths = tlscert.makeCertificates(str(tmp_path / "tls"), "rsa+ecdsa")
    with dovecot.Dovecot(variant="hp", credentials="warm", tls=paths) as dv:
        dv.pop3Port, dv.pop3sPort, dv.lmtpPort = 1100, 9950, 2400
        lines = [line.strip() for line in dv.configText().splitlines()]
    for setting in (f"ssl_cert = <{paths[0]}", f"ssl_key = <{paths[1]}",
                    f"ssl_alt_cert = <{paths[2]}", f"ssl_alt_key = <{paths[3]}"):
        assert setting in lines, setting


def test_dovecotColdAndDefaultConfig():
    import dovecot

    with dovecot.Dovecot(variant="hp", credentials="cold") as dv:
        dv.pop3Port, dv.lmtpPort = 1100, 2400
        cold = dv.configText()
        assert (dv.scheme, dv.credentials) == ("SHA512-CRYPT", "cold")
        dv.variant = "default"
        stock = dv.configText()
    assert "auth_cache_size = 0" in cold.splitlines() and "ssl = no" in cold.splitlines()
    assert "auth_cache_ttl" not in cold
    assert "client_limit" not in stock and "service pop3 {" not in stock
    assert "pop3_no_flag_updates" not in stock
    with pytest.raises(ValueError):
        dovecot.Dovecot(variant="fast")


@pytest.mark.skipif(
    not os.access("/usr/sbin/dovecot", os.X_OK), reason="Dovecot is not installed (tests/sysdeps.sh)"
)
def test_againstDovecotOverTLS(tmp_path):
    import dovecot

    certificate, key = _tlsFiles(tmp_path)
    c = corpus.Corpus(2, 2)
    with dovecot.Dovecot(variant="hp", credentials="warm", tls=(certificate, key)) as dv:
        dv.loadCorpus(c)
        dv.start()
        names = dv.processNames()
        assert names.count("pop3-login") >= 2 and names.count("pop3") >= 2
        for tls, port in ((True, dv.pop3sPort), (False, dv.pop3Port)):
            result = pop3load.load(
                port=port, users=c.users, password=c.password, scenario="fetchall", duration=30,
                sessions=4, settle=0, expected=c.digests(), serverPids=[dv.pid], tls=tls, tlsCA=certificate,
            )
            assert (result.sessions, result.errors) == (4, 0), result.errorKinds
            assert result.tlsVersions == ({"TLSv1.3": 4} if tls else {})
        # Plain POP3 on the TLS port is not answered as POP3 (a greeting
        # in clear would come within milliseconds, not half a second).
        result = pop3load.load(port=dv.pop3sPort, users=c.users, password=c.password, duration=30,
                               sessions=1, settle=0, sessionTimeout=0.5)
        assert result.errors == 1
        assert dv.errorsLogged() == []


@pytest.mark.skipif(
    not os.access("/usr/sbin/dovecot", os.X_OK), reason="Dovecot is not installed (tests/sysdeps.sh)"
)
def test_dovecotServesTheAlternativeCertificate(tmp_path):
    """
    The comparison with --tls-certificates rsa+ecdsa is even: the real
    Dovecot, like mailgate, gives a TLS 1.3 client the ECDSA certificate
    and a client offering only RSA suites the RSA one.
    """
    import socket
    import ssl

    import dovecot
    import tlscert

    paths = tlscert.makeCertificates(str(tmp_path / "tls"), "rsa+ecdsa")
    with dovecot.Dovecot(variant="hp", credentials="warm", tls=paths) as dv:
        dv.loadCorpus(corpus.Corpus(1, 1))
        dv.start()
        modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        modern.load_verify_locations(cafile=paths[0])
        modern.load_verify_locations(cafile=paths[2])
        rsaOnly = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        rsaOnly.load_verify_locations(cafile=paths[0])
        rsaOnly.maximum_version = ssl.TLSVersion.TLSv1_2
        rsaOnly.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
        for context, expected, version in ((modern, paths[2], "TLSv1.3"), (rsaOnly, paths[0], "TLSv1.2")):
            with socket.create_connection(("127.0.0.1", dv.pop3sPort), timeout=30) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() == version
                    assert tls.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(open(expected).read())
                    assert tls.recv(100).startswith(b"+OK")
        assert dv.errorsLogged() == []


@pytest.mark.skipif(
    not os.access("/usr/sbin/dovecot", os.X_OK), reason="Dovecot is not installed (tests/sysdeps.sh)"
)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning shows only with two CPUs or more")
def test_dovecotPinnedWithEveryProcess():
    """
    The comparison's pinned Dovecot: every process of its tree on the
    CPU given, those started before the pinning and after it.
    """
    import dovecot
    from pop3load import processTree

    cpu = max(os.sched_getaffinity(0))
    c = corpus.Corpus(2, 2)
    with dovecot.Dovecot(variant="hp", credentials="warm") as dv:
        dv.loadCorpus(c)
        dv.start()
        dv.pin({cpu})
        # Sessions make the master start processes (auth, the mail ones).
        result = pop3load.load(port=dv.pop3Port, users=c.users, password=c.password, scenario="stat",
                               duration=30, sessions=4, settle=0)
        assert (result.sessions, result.errors) == (4, 0), result.errorKinds
        pids = processTree([dv.pid])
        assert len(pids) > 4
        assert {frozenset(os.sched_getaffinity(pid)) for pid in pids} == {frozenset({cpu})}


# -- the report's arithmetic on synthetic rows --------------------------------------------


def _row(server, backend, scenario, concurrency, cpu, transport="plain", credentials="warm", **more):
    row = {
        "server": server, "backend": backend, "kind": "pop3", "credentials": credentials, "transport": transport,
        "login": "USER/PASS", "scenario": scenario, "concurrency": concurrency, "cpuMsPerSession": cpu,
        "sessionsPerSecond": 100.0, "megabytesPerSecond": 10.0, "errors": 0, "backgroundCores": 0.1,
        "extraCpuMsPerSession": None, "rounds": 3,
    }
    row.update(more)
    return row


def _intake(server, backend, protocol, rate, cpu):
    return {
        "server": server, "backend": backend, "kind": "intake", "credentials": "warm", "transport": "plain",
        "login": "-", "scenario": f"{protocol} 4KB", "concurrency": 10, "messagesPerSecond": rate,
        "cpuMsPerMessage": cpu, "errors": 0, "backgroundCores": 0.0, "verification": {"ok": True},
        "acknowledged": 100,
    }


def _syntheticRows():
    import report

    return [
        _row("mailgate", "sqlite", "stat", 1, 0.4),
        _row("mailgate", "postgres", "stat", 1, 0.5, extraCpuMsPerSession=0.3),
        _row(report.REFERENCE, "maildir", "stat", 1, 1.0),
        _row("mailgate", "sqlite", "top", 10, 0.9, transport="tls"),
        _row("mailgate", "postgres", "top", 10, 1.8, transport="tls"),
        _row(report.REFERENCE, "maildir", "top", 10, 1.0, transport="tls"),
        _row("mailgate", "sqlite", "fetchall", 10, 1.0, megabytesPerSecond=300.0),
        _row(report.REFERENCE, "maildir", "fetchall", 10, 2.0, megabytesPerSecond=250.0, errors=2),
        _row("mailgate", "sqlite", "stat", 10, 90.0, credentials="cold"),
        _row(report.REFERENCE, "maildir", "stat", 10, 9.0, credentials="cold"),
        _intake("mailgate", "sqlite", "lmtp", 2000.0, 0.2),
        _intake("mailgate", "postgres", "smtp", 1500.0, 0.25),
        _intake("mailgate", "sqlite", "smtp", 2500.0, 0.2),
        _intake(report.REFERENCE, "maildir", "lmtp", 900.0, 1.0),
    ]


def test_sideBySideRatiosAndVerdicts():
    import report

    rows = _syntheticRows()
    cells = {(c["scenario"], c["transport"], c["concurrency"]): c for c in report.pop3Cells(rows)}
    stat = cells[("stat", "plain", 1)]
    assert stat["ratio"] == pytest.approx(0.4) and stat["target"] == 0.5 and stat["verdict"] == "met"
    assert stat["pgRatio"] == pytest.approx(1.25) and stat["pgVerdict"] == "met"
    assert stat["pgTotalRatio"] == pytest.approx(2.0)
    top = cells[("top", "tls", 10)]
    assert top["ratio"] == pytest.approx(0.9) and top["verdict"] == "NOT met"
    assert top["pgRatio"] == pytest.approx(2.0) and top["pgVerdict"] == "NOT met"
    fetch = cells[("fetchall", "plain", 10)]
    assert fetch["ratio"] == pytest.approx(0.5) and fetch["verdict"] == "errors"
    assert fetch["postgres"] is None and fetch["pgVerdict"] == "-"
    # Cold rows stay out of the scenario cells.
    assert ("stat", "plain", 10) not in cells
    [plain] = report.throughputCells(rows)
    assert plain["concurrency"] == 10 and plain["ratio"] == pytest.approx(1.2)
    assert plain["verdict"] == "errors"
    intake = {(c["backend"], c["protocol"]): c for c in report.intakeCells(rows)}
    assert intake[("sqlite", "LMTP")]["ratio"] == pytest.approx(2000 / 900)
    assert intake[("sqlite", "LMTP")]["verdict"] == "met"
    assert intake[("postgres", "SMTP")]["verdict"] == "NOT met"  # 1500 / 900 < 2
    assert intake[("postgres", "SMTP")]["pgRatio"] == pytest.approx(1.25)
    [cold] = report.coldCells(rows)
    assert cold["concurrency"] == 10 and cold["ratio"] == pytest.approx(10.0)
    lines = report.targetLines(rows, {})
    assert any(line.startswith("stat (plain)") and line.endswith("-> met") for line in lines)
    assert any(line.startswith("top (tls)") and line.endswith("-> NOT met") for line in lines)
    assert any("PostgreSQL within 1.5x" in line and "worst 2.00x (top/tls/x10)" in line for line in lines)
    text = report.sideBySide(rows, {})
    assert "warm credentials on both sides" in text and "Cold logins" in text
    assert "| scenario | transport |" in report.sideBySide(rows, {}, markdown=True)


def test_eachCellAgainstTheBetterOfTheTwoDovecots():
    """
    With Dovecot hp measured as it runs and pinned to mailgate's CPUs,
    each cell compares with the better of the two, and says when that is
    the pinned one.
    """
    import report

    pinned = report.PINNED_REFERENCE
    rows = [
        _row("mailgate", "sqlite", "stat", 1, 0.4),
        _row(report.REFERENCE, "maildir", "stat", 1, 1.0),
        _row(pinned, "maildir", "stat", 1, 0.8),
        _row("mailgate", "sqlite", "top", 10, 1.0),
        _row(report.REFERENCE, "maildir", "top", 10, 2.0),
        _row(pinned, "maildir", "top", 10, 2.5),
        _row("mailgate", "sqlite", "fetchall", 10, 1.0, megabytesPerSecond=300.0),
        # Less CPU per session when pinned, but fewer MB/s: each figure
        # against the better one.
        _row(report.REFERENCE, "maildir", "fetchall", 10, 2.0, megabytesPerSecond=250.0),
        _row(pinned, "maildir", "fetchall", 10, 1.9, megabytesPerSecond=200.0),
        _intake("mailgate", "sqlite", "lmtp", 2000.0, 0.2),
        _intake(report.REFERENCE, "maildir", "lmtp", 900.0, 1.0),
        _intake(pinned, "maildir", "lmtp", 1000.0, 1.0),
    ]
    cells = {(c["scenario"], c["concurrency"]): c for c in report.pop3Cells(rows)}
    assert cells[("stat", 1)]["dovecot"] == 0.8 and cells[("stat", 1)]["ratio"] == pytest.approx(0.5)
    assert cells[("stat", 1)]["dovecotMark"] == " (p)"
    assert cells[("top", 10)]["dovecot"] == 2.0 and cells[("top", 10)]["dovecotMark"] == ""
    assert cells[("fetchall", 10)]["ratio"] == pytest.approx(1.0 / 1.9)
    [throughput] = report.throughputCells(rows)
    assert throughput["dovecot"] == 250.0 and throughput["ratio"] == pytest.approx(1.2)
    [intake] = report.intakeCells(rows)
    assert intake["dovecotRate"] == 1000.0 and intake["ratio"] == pytest.approx(2.0)
    table = report.sideBySide(rows, {})
    assert "0.800 (p)" in table and "1000 (p)" in table
    # Without the pinned Dovecot, as before.
    alone = [r for r in rows if r["server"] != pinned]
    assert {c["dovecotMark"] for c in report.pop3Cells(alone)} == {""}
    assert report.pop3Cells(alone)[0]["ratio"] == pytest.approx(0.4)
    args = {"quiet_wait": 0, "quiet_threshold": 0.25, "duration": 4.0, "rounds": 3, "mailgate_cpus": "0"}
    assert "every mailgate with --cpu-affinity 0" in report.header({}, args, {})
    assert "cpu-affinity" not in report.header({}, dict(args, mailgate_cpus=None), {})


def test_verdicts():
    import report

    assert report.verdict(0.5, 0.5) == "met"
    assert report.verdict(0.51, 0.5) == "NOT met"
    assert report.verdict(1.1, 1.1, atLeast=True) == "met"
    assert report.verdict(None, 0.5) == "-" and report.verdict(0.2, None) == "-"
    assert report.verdict(0.2, 0.5, errors=1) == "errors"


def test_aggregateRounds():
    import report

    rounds = [
        {"scenario": "top", "sessionsPerSecond": 10.0, "cpuMsPerSession": 3.0, "errors": 0, "sessions": 50,
         "backgroundCores": 0.1, "peak": 1, "errorKinds": {}, "tlsVersions": {"TLSv1.3": 50}, "p99ms": 9.0},
        {"scenario": "top", "sessionsPerSecond": 30.0, "cpuMsPerSession": 1.0, "errors": 1, "sessions": 40,
         "backgroundCores": 0.6, "peak": 2, "errorKinds": {"timeout": 1}, "tlsVersions": {"TLSv1.3": 40}, "p99ms": None},
        {"scenario": "top", "sessionsPerSecond": 20.0, "cpuMsPerSession": 2.0, "errors": 0, "sessions": 45,
         "backgroundCores": 0.2, "peak": 1, "errorKinds": {}, "tlsVersions": {"TLSv1.3": 45}, "p99ms": 5.0},
    ]
    row = report.aggregate(rounds)
    assert row["sessionsPerSecond"] == 20.0 and row["cpuMsPerSession"] == 2.0
    assert row["p99ms"] == 7.0  # the median of the rounds that have one
    assert (row["errors"], row["sessions"], row["peak"], row["backgroundCores"]) == (1, 135, 2, 0.6)
    assert row["errorKinds"] == {"timeout": 1} and row["tlsVersions"] == {"TLSv1.3": 135}
    assert row["rounds"] == 3 and [r["rate"] for r in row["perRound"]] == [10.0, 30.0, 20.0]
    intake = report.aggregate([
        {"messagesPerSecond": 5.0, "cpuMsPerMessage": 1.0, "verification": {"ok": True}},
        {"messagesPerSecond": 7.0, "cpuMsPerMessage": 1.0, "verification": {"ok": False}},
    ])
    assert intake["messagesPerSecond"] == 6.0 and intake["verification"]["ok"] is False


def test_detailAndBigTables():
    import report

    rows = _syntheticRows()
    text = report.detailTable(rows)
    assert text.splitlines()[0].split()[:4] == ["server", "backend", "cred", "transport"]
    mine = [line for line in text.splitlines() if line.startswith("mailgate ") and " stat " in line and " cold " not in line]
    assert mine[0].rstrip().endswith("0.40")  # x dv-hp
    big = {"messages": 100, "loginToStatMs": 2.0, "uidlMs": 30.0, "listMs": 20.0, "firstLoginToStatMs": 90.0,
           "sessions": 5, "ok": True, "octets": 1000}
    extra = {"big maildrop": big, "big maildrop dovecot": dict(big, loginToStatMs=4.0, uidlMs=20.0, indexSeconds=1.5)}
    cells = {c["server"]: c for c in report.bigCells(extra)}
    assert cells["mailgate/sqlite"]["statRatio"] == pytest.approx(0.5)
    assert cells["mailgate/sqlite"]["uidlRatio"] == pytest.approx(1.5)
    assert "index 1.5 s" in report.bigTable(list(cells.values()))
    assert any("login->STAT < 100 ms, mailgate/sqlite: 2.0 ms (Dovecot 4.0 ms) -> met" in line
               for line in report.targetLines([], extra))


def test_idleSessionsOverTLSAreReportedApart():
    import report

    def idle(rss, p99):
        return {"sessions": 100, "rssBaselineMiB": 60.0, "rssGreetedMiB": 70.0, "rssLoggedInMiB": rss,
                "rssPerSessionKiB": 20.0, "rssAfterCloseMiB": 65.0, "loggedIn": 100, "failures": 0,
                "probeWithoutIdle": {"p50ms": 1.0, "p99ms": 2.0},
                "probeWithIdle": {"p50ms": 1.1, "p99ms": p99, "errors": 0}}

    extra = {"idle sessions": idle(80.0, 3.0), "idle sessions tls": idle(1100.0, 4.0)}
    plain, overTLS = report.idleText(extra).split("\n\n")
    assert plain.startswith("100 idle POP3 sessions (one mailgate process, SQLite): RSS baseline 60.0 MiB")
    assert overTLS.startswith("100 idle POP3 sessions over TLS (one mailgate process, SQLite)")
    lines = report.targetLines([], extra)
    assert "100 idle sessions < 1 GiB RSS and an active session's p99 < 50 ms: 80 MiB, p99 3.0 ms -> met" in lines
    assert "100 idle sessions over TLS < 1 GiB RSS and an active session's p99 < 50 ms: 1100 MiB, p99 4.0 ms -> NOT met" in lines
    assert report.idleText({"idle sessions": idle(80.0, 3.0)}) == plain
    # 1 s after close and, where measured, after the server's memory trim.
    assert "1 s after close 65.0 MiB; logged in 100" in plain
    trimmed = dict(idle(80.0, 3.0), rssAfterTrimMiB=61.5)
    assert "1 s after close 65.0 MiB, after the next memory trim 61.5 MiB; logged in 100" in report.idleText(
        {"idle sessions": trimmed}
    )


# -- the profile summary --------------------------------------------------------------------


RAW = """\
<module> (twistd:1);mainLoop (twisted/internet/base.py:690);doPoll (twisted/internet/epollreactor.py:215) 50
<module> (twistd:1);mainLoop (twisted/internet/base.py:690);doPoll (twisted/internet/epollreactor.py:215);stuff (mailgate/pop3/dotstuff.py:23) 30
<module> (twistd:1);mainLoop (twisted/internet/base.py:690);rec (a.py:5);rec (a.py:5) 15
_work (mailgate/store/database.py:328);0x7f00 (libc.so.6) 5
not a stack line
"""


def test_profileSummary():
    import pyspy

    summary = pyspy.summarise(RAW, top=3)
    assert summary["samples"] == 100
    top = [(e["function"], e["where"], e["own"]) for e in summary["entries"]]
    assert top == [
        ("doPoll", "twisted/internet/epollreactor.py:215", 50),
        ("stuff", "mailgate/pop3/dotstuff.py:23", 30),
        ("rec", "a.py:5", 15),
    ]
    doPoll = summary["entries"][0]
    assert doPoll["ownShare"] == 0.5 and doPoll["inclusiveShare"] == 0.8
    assert summary["entries"][2]["inclusiveShare"] == 0.15  # a recursive frame counts once per stack
    assert pyspy.parseFrame("0x7f00 (libc.so.6)") == ("0x7f00", "libc.so.6")
    assert pyspy.parseFrame("thread (0x1)") == ("thread", "0x1")
    text = pyspy.formatSummary(summary, "title")
    assert text.splitlines()[0] == "title"
    assert "  50.0%   80.0%  doPoll  (twisted/internet/epollreactor.py:215)" in text
    assert "mailgate/pop3/dotstuff.py" in text.split("own time by file:")[1]
    argv = pyspy.command("py-spy", 42, "out.raw", 10, mode="gil")
    assert argv[:3] == ["py-spy", "record", "--pid"] and "--gil" in argv and "raw" in argv
    assert "--gil" not in pyspy.command("py-spy", 42, "out.raw", 10, mode="all")


# -- run.py's pieces ----------------------------------------------------------------------------


def test_runArguments():
    import run

    full = run.parseArgs([])
    assert (full.concurrency, full.rounds, full.duration, full.transports) == ([1, 10], 3, 4.0, ["plain", "tls"])
    assert full.profile == ["top", "fetchall"] and full.profile_modes == ["gil", "all"]
    assert {"cold", "big", "idle", "profile"} <= full.only
    quick = run.parseArgs(["--quick", "--profile", "none", "--no-big"])
    assert (quick.concurrency, quick.rounds, quick.profile) == ([1, 4], 1, [])
    assert not {"big", "idle"} & quick.only
    with pytest.raises(SystemExit):
        run.parseArgs(["--profile", "nosuch"])
    # Nothing pinned unless asked; a CPU list normalised, a bad one refused.
    assert full.mailgate_cpus is None
    assert run.parseArgs(["--mailgate-cpus", "1,0"]).mailgate_cpus == "0-1"
    with pytest.raises(SystemExit):
        run.parseArgs(["--mailgate-cpus", "first"])
    server = run.MailgateServer("/bin", "sqlite:///x", "/tmp/x.log", cpus="0")
    assert server.argv[-2:] == ["--cpu-affinity", "0"]
    assert "--cpu-affinity" not in run.MailgateServer("/bin", "sqlite:///x", "/tmp/x.log").argv


def test_bigMaildirLinks(tmp_path):
    import run

    message = corpus.Corpus(1, 1).message(0, 1)
    maildir = tmp_path / "home" / "Maildir"
    run.writeBigMaildir(str(maildir), message, 7, os.getuid(), os.getgid(), linksPerFile=3)
    names = sorted(os.listdir(maildir / "cur"))
    assert len(names) == 7
    onDisk = len(message.replace(b"\r\n", b"\n"))
    assert all(f",S={onDisk},W={len(message)}:2,S" in n for n in names)
    assert len({os.stat(maildir / "cur" / n).st_ino for n in names}) == 3
    assert (maildir / "cur" / names[-1]).read_bytes().replace(b"\n", b"\r\n") == message


class _FakeResult:
    def __init__(self, target, m, number):
        self.d = {"scenario": m.scenario, "concurrency": m.concurrency, "sessionsPerSecond": float(number),
                  "cpuMsPerSession": 1.0, "errors": 0, "target": target}

    def asDict(self):
        return dict(self.d)

    def summary(self):
        return "fake"


def test_roundsInterleaveAndAggregate(monkeypatch):
    import run

    args = run.parseArgs(["--quick", "--rounds", "2"])
    suite = run.Suite(args)
    calls = []

    def measure(target, port, m):
        calls.append((target.name, m.describe()))
        return _FakeResult(target.name, m, len(calls))

    monkeypatch.setattr(suite, "measure", measure)
    a = run.Target("mailgate", "sqlite", "warm", {"pop3": 1, "pop3s": 2}, [])
    b = run.Target("dovecot-hp", "maildir", "warm", {"pop3": 3}, [])
    measurements = [run.Measurement("pop3", "stat", 1), run.Measurement("pop3", "stat", 1, "tls")]
    suite.rounds([a, b], measurements, "test")
    assert calls == [
        ("mailgate/sqlite", "stat plain x1"), ("dovecot-hp/maildir", "stat plain x1"),
        ("mailgate/sqlite", "stat tls x1"),
        ("dovecot-hp/maildir", "stat plain x1"), ("mailgate/sqlite", "stat plain x1"),
        ("mailgate/sqlite", "stat tls x1"),
    ]
    rows = [(r["server"], r["transport"], r["rounds"], r["sessionsPerSecond"]) for r in suite.rows]
    assert rows == [("mailgate", "plain", 2, 3.0), ("dovecot-hp", "plain", 2, 3.0), ("mailgate", "tls", 2, 4.5)]


@pytest.mark.skipif(
    not os.access(os.path.join(BIN, "twistd"), os.X_OK) or not os.access(os.path.join(BIN, "mailgate"), os.X_OK),
    reason="twistd and mailgate are not installed next to this Python (make install)",
)
def test_againstMailgateOverTLS(tmp_path):
    """
    mailgate's --pop3s listener as the suite starts it: the TLS load
    generator's scenarios verify octet for octet over TLS 1.3; plain POP3
    on that port fails; the cold-login server (--auth-cache-size 0)
    serves logins too.
    """
    import run

    from mailgate.testing import addUser, deliver, memoryStore

    certificate, key = _tlsFiles(tmp_path)
    c = corpus.Corpus(2, 2)
    database = "sqlite:///" + str(tmp_path / "bench.sqlite3")
    # Filled through the store in this process rather than eight runs of
    # the mailgate command (test_againstMailgate runs those).
    store = memoryStore(database)
    try:
        for index, user in enumerate(c.users):
            addUser(store, user, c.password)
            for data in c.messages(index):
                deliver(store, [user], data)
    finally:
        store.close()
    server = run.MailgateServer(BIN, database, str(tmp_path / "mailgate.log"), lmtp=False, smtp=False,
                                tls=(certificate, key))
    try:
        server.start()
        assert set(server.ports) == {"POP3", "POP3S"}
        for scenario in ("stat", "top", "fetchall"):
            result = pop3load.load(
                port=server.ports["POP3S"], users=c.users, password=c.password, scenario=scenario,
                duration=30, sessions=2, settle=0, expected=c.digests(), serverPids=[server.pid],
                tls=True, tlsCA=certificate,
            )
            assert (result.sessions, result.errors) == (2, 0), result.errorKinds
            assert result.tlsVersions == {"TLSv1.3": 2}
        # Plain POP3 on that port: no greeting (one in clear would come
        # within milliseconds, not half a second).
        result = pop3load.load(port=server.ports["POP3S"], users=c.users, password=c.password,
                               duration=30, sessions=1, settle=0, sessionTimeout=0.5)
        assert result.errors == 1
    finally:
        server.stop()
    cold = tmp_path / "cold.sqlite3"
    run.copySqlite(str(tmp_path / "bench.sqlite3"), str(cold))
    server = run.MailgateServer(BIN, "sqlite:///" + str(cold), str(tmp_path / "cold.log"), lmtp=False,
                                smtp=False, options=["--auth-cache-size", "0"])
    try:
        server.start()
        result = pop3load.load(port=server.ports["POP3"], users=c.users, password=c.password, duration=30,
                               sessions=2, settle=0, serverPids=[server.pid])
        assert (result.sessions, result.errors) == (2, 0), result.errorKinds
    finally:
        server.stop()


# -- benchmarks/floor.py: the floor at one client ---------------------------------


@pytest.mark.parametrize("kind", ["twisted", "c"])
def test_theFixedServersAnswerLikeAPOP3Server(kind, tmp_path):
    """
    The floor's fixed servers (bare Twisted, and C where a compiler is)
    greet, take USER, PASS and NOOP with +OK, answer TOP and STAT with the
    fixed multi-line reply of the size asked for, and close after QUIT;
    the measurements run on them and give a CPU figure per command and per
    session.
    """
    if kind == "c":
        executable, why = floor.compileC(str(tmp_path))
        if executable is None:
            pytest.skip(f"the C floor server cannot be built here: {why}")
        argv = [executable, "300"]
    else:
        argv = [sys.executable, floor.__file__, "--serve-twisted", "300"]
    process, port = floor.startFixed(argv)
    try:
        client = floor.Client(port)
        client.login("someone", "anything")
        assert client.command(b"NOOP") == len(b"+OK\r\n")
        assert client.command(b"TOP 1 0", multi=True) == 300 == len(floor.fixedReply(300))
        client.command(b"QUIT")
        assert client.file.readline() == b""
        client.close()
        lines = floor.commandLines("TOP", 300, 7)
        assert lines[:2] == [b"TOP 1 0", b"TOP 2 0"] and lines[7] == b"TOP 1 0"
        perCommand = floor.perCommand(port, [process.pid], "someone", "pw", lines)
        perSession = floor.perSession(port, [process.pid], ["a", "b"], "pw", 20)
        assert perCommand >= 0 and perSession >= 0
    finally:
        process.kill()
        process.wait()


def test_theFloorTableGivesMediansAndRatiosToDovecot():
    figures = {
        ("NOOP", "twisted-fixed"): [30.0, 10.0, 20.0],
        ("NOOP", "dovecot-hp"): [40.0, 40.0, 50.0],
        ("NOOP", "mailgate"): [60.0, 20.0, 50.0],
    }
    text = floor.table(figures, ["twisted-fixed", "dovecot-hp", "mailgate"], ["NOOP"], 512)
    rows = text.splitlines()[-3:]
    assert rows == [
        "| twisted-fixed | 20.0 (0.50x) |",
        "| dovecot-hp | 40.0 |",
        "| mailgate | 50.0 (1.25x) |",
    ]
    assert "512 octets" in text


def test_theFloorPinsAFixedServerWhereItIsTold():
    """
    C{--server-cpus} and C{--client-cpus} are CPU lists, checked like
    mailgate's C{--cpu-affinity} (a wrong one stops the run with a
    message), and said in the report; a fixed server pinned with them has
    every thread on those CPUs.
    """
    args = floor.parseArgs(["--server-cpus", "0", "--client-cpus", "0"])
    assert floor.placement(args) == "servers on CPU 0, the client on CPU 0"
    assert floor.placement(floor.parseArgs([])) == (
        "servers where the kernel put them, the client where the kernel put it"
    )
    with pytest.raises(SystemExit):
        floor.parseArgs(["--client-cpus", "one"])
    process, port = floor.startFixed([sys.executable, floor.__file__, "--serve-twisted", "100"])
    try:
        pop3load.pinProcessTrees([process.pid], {0})
        for tid in os.listdir(f"/proc/{process.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == {0}
        client = floor.Client(port)
        assert client.command(b"NOOP") == len(b"+OK\r\n")
        client.close()
    finally:
        process.kill()
        process.wait()


def test_aMeasurementDisturbedByStealIsTakenAgain(monkeypatch):
    """
    A measurement during which the hypervisor took more than
    --steal-limit cores is taken again, at most --steal-retries times;
    the last is kept whatever its steal, and the run counts the repeats.
    """
    import run

    args = run.parseArgs(["--quick", "--rounds", "1", "--steal-limit", "0.1", "--steal-retries", "2"])
    suite = run.Suite(args)
    steals = iter([0.5, 0.05, 0.3, 0.4, 0.9])
    taken = []

    def measure(target, port, m):
        result = _FakeResult(target.name, m, len(taken) + 1)
        result.stealCores = next(steals)
        taken.append((target.name, result.stealCores))
        return result

    monkeypatch.setattr(suite, "measure", measure)
    a = run.Target("mailgate", "sqlite", "warm", {"pop3": 1}, [])
    b = run.Target("dovecot-hp", "maildir", "warm", {"pop3": 3}, [])
    suite.rounds([a, b], [run.Measurement("pop3", "stat", 1)], "test")
    assert taken == [
        ("mailgate/sqlite", 0.5), ("mailgate/sqlite", 0.05),
        ("dovecot-hp/maildir", 0.3), ("dovecot-hp/maildir", 0.4), ("dovecot-hp/maildir", 0.9),
    ]
    assert suite.stealRepeats == 3
    # The kept measurements: the calm one, and the last of the disturbed.
    assert [r["sessionsPerSecond"] for r in suite.rows] == [2.0, 5.0]
    # --quick never measures again.
    assert run.parseArgs(["--quick"]).steal_limit == 0 and run.parseArgs([]).steal_limit == 0.1


# -- intake by BDAT in the suite and the report ---------------------------------------------------


def test_intakeScenarios():
    """
    The suite measures LMTP and SMTP by DATA and LMTP by BDAT
    (--intake-scenarios chooses, --no-intake none); BDAT goes to the
    LMTP listener, so Dovecot (no SMTP) has it too.
    """
    import run

    args = run.parseArgs(["--quick"])
    assert args.intake_scenarios == ["lmtp", "smtp", "lmtp-bdat"]
    intake = [m for m in run.Suite(args).warmMeasurements() if m.kind == "intake"]
    assert [(m.scenario, m.intakeProtocol, m.bdat) for m in intake] == [
        ("lmtp", "lmtp", False), ("smtp", "smtp", False), ("lmtp-bdat", "lmtp", True),
    ]
    dovecot = run.Target("dovecot-hp", "maildir", "warm", {"pop3": 1, "lmtp": 5}, [])
    mailgate = run.Target("mailgate", "sqlite", "warm", {"pop3": 1, "lmtp": 6, "smtp": 7}, [])
    assert [dovecot.port(m) for m in intake] == [5, None, 5]
    assert [mailgate.port(m) for m in intake] == [6, 7, 6]
    only = run.parseArgs(["--quick", "--intake-scenarios", "lmtp-bdat"])
    assert [m.scenario for m in run.Suite(only).warmMeasurements() if m.kind == "intake"] == ["lmtp-bdat"]
    assert not [m for m in run.Suite(run.parseArgs(["--quick", "--no-intake"])).warmMeasurements()
                if m.kind == "intake"]
    with pytest.raises(SystemExit):
        run.parseArgs(["--intake-scenarios", "smtp-bdat"])


def test_theSuiteSendsTheBDATMeasurementInChunks():
    """
    The suite's lmtp-bdat measurement really sends BDAT chunks, to the
    LMTP port, and its lmtp one DATA.
    """
    import run

    suite = run.Suite(run.parseArgs(["--quick", "--intake-messages", "6"]))
    for scenario, verb in (("lmtp-bdat", "BDAT"), ("lmtp", "DATA")):
        m = run.Measurement("intake", scenario, 2)
        # The recording server refuses DATA (500): counted, not raised.
        result, record = asyncio.run(recorded(["PIPELINING", "CHUNKING"], True, lambda port: asyncio.to_thread(
            suite.measure, run.Target("x", "y", "warm", {"lmtp": port}, []), port, m
        )))
        assert verb in record.verbs()
        assert ({"BDAT", "DATA"} - {verb}) & set(record.verbs()) == set()
        assert result.protocol == ("LMTP BDAT" if verb == "BDAT" else "LMTP")
        assert len(result.acknowledged) == (6 if verb == "BDAT" else 0)


def test_aServerWithoutChunkingHasNoBDATRow(monkeypatch):
    """
    A server that does not offer CHUNKING gets no BDAT row and is not
    asked again in later rounds; the run goes on and its notes say why.
    """
    import run

    suite = run.Suite(run.parseArgs(["--quick", "--rounds", "2"]))
    calls = []

    def measure(target, port, m):
        calls.append((target.name, m.scenario))
        if target.name.startswith("old") and m.bdat:
            raise smtpload.ChunkingNotOffered("BDAT asked for, but the LHLO reply does not offer CHUNKING")
        result = _FakeResult(target.name, m, len(calls))
        result.d.update(messagesPerSecond=100.0, cpuMsPerMessage=1.0)
        return result

    monkeypatch.setattr(suite, "measure", measure)
    a = run.Target("mailgate", "sqlite", "warm", {"lmtp": 1}, [])
    b = run.Target("old", "sqlite", "warm", {"lmtp": 2}, [])
    measurements = [run.Measurement("intake", "lmtp", 10), run.Measurement("intake", "lmtp-bdat", 10)]
    suite.rounds([a, b], measurements, "test")
    assert calls.count(("old/sqlite", "lmtp-bdat")) == 1 and calls.count(("mailgate/sqlite", "lmtp-bdat")) == 2
    assert [(r["server"], r["scenario"]) for r in suite.rows] == [
        ("mailgate", "lmtp 4KB"), ("old", "lmtp 4KB"), ("mailgate", "lmtp-bdat 4KB"),
    ]
    assert len(suite.notes) == 1 and "old/sqlite: lmtp-bdat x10 not measured" in suite.notes[0]
    assert "does not offer CHUNKING" in suite.notes[0]


def test_theBDATIntakeRowIsComparedWithDovecotsBDAT():
    """
    mailgate's LMTP-by-BDAT row is compared with Dovecot's LMTP by BDAT,
    its DATA rows (LMTP, SMTP) with Dovecot's LMTP by DATA as before,
    whichever of Dovecot's is faster; without a Dovecot BDAT row, the
    BDAT row has no ratio (never DATA's in its place).
    """
    import report

    pinned = report.PINNED_REFERENCE
    rows = [
        _intake("mailgate", "sqlite", "lmtp", 2000.0, 0.2),
        _intake("mailgate", "sqlite", "smtp", 2500.0, 0.2),
        _intake("mailgate", "sqlite", "lmtp-bdat", 2400.0, 0.15),
        _intake("mailgate", "postgres", "lmtp-bdat", 2100.0, 0.3),
        _intake(report.REFERENCE, "maildir", "lmtp", 900.0, 1.0),
        _intake(report.REFERENCE, "maildir", "lmtp-bdat", 1500.0, 0.8),
        _intake(pinned, "maildir", "lmtp-bdat", 1000.0, 0.9),
    ]
    cells = {(c["backend"], c["protocol"]): c for c in report.intakeCells(rows)}
    assert list(cells) == [("sqlite", "LMTP"), ("sqlite", "SMTP"), ("sqlite", "LMTP BDAT"), ("postgres", "LMTP BDAT")]
    assert cells[("sqlite", "LMTP")]["dovecotRate"] == 900.0 and cells[("sqlite", "LMTP")]["verdict"] == "met"
    assert cells[("sqlite", "SMTP")]["dovecotRate"] == 900.0
    bdat = cells[("sqlite", "LMTP BDAT")]
    assert bdat["dovecotRate"] == 1500.0 and bdat["dovecotMark"] == ""
    assert bdat["ratio"] == pytest.approx(1.6) and bdat["verdict"] == "NOT met"
    assert bdat["cpuRatio"] == pytest.approx(0.15 / 0.8)
    assert cells[("postgres", "LMTP BDAT")]["pgRatio"] == pytest.approx(2.0)
    table = report.sideBySide(rows, {})
    assert "mailgate/sqlite LMTP BDAT 4KB x10" in table and "mailgate/sqlite LMTP 4KB x10" in table
    lines = report.targetLines(rows, {})
    assert any("LMTP BDAT >= 2.0x Dovecot LMTP BDAT msgs/s: 2400 vs 1500" in line for line in lines), lines
    assert any("mailgate/sqlite LMTP >= 2.0x Dovecot LMTP msgs/s: 2000 vs 900" in line for line in lines), lines
    detail = {(c["server"], c["backend"], c["scenario"]): c["xhp"] for c in report.detailCells(rows)}
    assert detail[("mailgate", "sqlite", "lmtp-bdat 4KB")] == report.fmt(0.15 / 0.8, 2)
    assert detail[("mailgate", "sqlite", "smtp 4KB")] == report.fmt(0.2, 2)
    withoutDovecotBDAT = [r for r in rows if not (r["server"] != "mailgate" and r["scenario"].startswith("lmtp-bdat"))]
    cells = {(c["backend"], c["protocol"]): c for c in report.intakeCells(withoutDovecotBDAT)}
    assert cells[("sqlite", "LMTP BDAT")]["dovecotRate"] is None
    assert (cells[("sqlite", "LMTP BDAT")]["ratio"], cells[("sqlite", "LMTP BDAT")]["verdict"]) == (None, "-")
    assert cells[("sqlite", "LMTP")]["ratio"] == pytest.approx(2000 / 900)


# -- benchmarks/trickle.py: one read's cost while input piles up ---------------------


def test_theTrickleMeasuresUntilThePOP3SessionStopsReading(tmp_path):
    """
    The trickle benchmark's session waits on its PASS and is given one
    octet per read: it stops reading when the 65th complete line waits
    (POP3's limit is 64 queued commands), so that is where the
    measurement ends; a logged-in session given NOOPs keeps reading.
    """
    from mailgate.testing import addUser, memoryStore

    store = memoryStore(f"sqlite:///{tmp_path}/t.sqlite3")
    addUser(store, trickle.ADDRESS, "secret", apop=False)
    line = b"NOOP " + b"x" * 93 + b"\r\n"
    micros, reads = trickle.perRead(store, line)
    assert reads == 65 * len(line) and micros > 0
    micros, reads = trickle.perRead(store, b"NOOP\r\n", busy=False)
    assert reads == 20000 and micros > 0


# -- benchmarks/bans.py: what the bans in force cost the reactor ---------------------


def test_theBansBenchmarkTimesEachStepOfTheBanList():
    """
    The bans benchmark times the first read, an unchanged refresh, a sweep
    and a refresh after one ban was added, on a ban list that ends with
    every ban enforced (the one added included).
    """
    figures = bansBenchmark.timings(200)
    assert set(figures) == {"first read", "unchanged refresh", "sweep", "refresh after one ban added"}
    assert len(bansBenchmark.banRecords(3, ["x"])) == 4
