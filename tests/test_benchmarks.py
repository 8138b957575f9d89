"""
The benchmark tools (benchmarks/) keep working: the corpus generator, the
POP3 response parser and load generator (against canned bytes, a scripted
in-process server and one real C{twistd mailgate}), the SMTP reply parser
and the intake verification.  Behaviour only, never timings.
"""

import asyncio
import hashlib
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import corpus  # noqa: E402
import pop3load  # noqa: E402
import smtpload  # noqa: E402
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
    fetched = {"stat": 0, "list": 0, "top": 3, "fetchall": 3, "retr1": 1}[scenario]
    assert result.messages == 4 * fetched
    if scenario == "fetchall":
        assert result.bytesReceived > 2 * sum(map(len, SMALL.messages(0)))
    assert result.cpuSeconds >= 0 and result.cpuMsPerSession is not None


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
    server = run.MailgateServer(BIN, database, str(tmp_path / "mailgate.log"), smtp=False)
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
