"""
SMTP / LMTP intake benchmark on asyncio (standard library only).

N parallel sessions send M messages in all (of a given size, 4 KB by
default), each session reusing its connection for several messages
(MAIL / RCPT / DATA, pipelined when the server offers PIPELINING) before
QUIT and a new connection.  With LMTP, the end of DATA is answered once per
accepted recipient and every one of those replies is read and checked.

With C{--bdat} (RFC 3030 CHUNKING) each message goes as one C{BDAT <n>
LAST} chunk of its raw CRLF octets (no dot-stuffing, no terminating line)
instead of DATA, pipelined after MAIL and RCPT when the server offers
PIPELINING; the chunk is answered like the end of DATA (with LMTP once per
accepted recipient).  A server whose EHLO/LHLO reply does not list
CHUNKING is an error (L{ChunkingNotOffered}), never a silent fall back to
DATA: the figures would be DATA's under BDAT's name.

Every message carries a unique token in its Subject (C{Subject: bench
intake RUN-000042}).  Afterwards L{verify} checks that each acknowledged
message arrived exactly once in each of its recipients' maildrops, from
what a server shows: POP3 (L{tokensFromPOP3}, TOP n 0 of every message)
or the maildir files (L{tokensFromMaildirs}).

It reports messages/s, p50/p99 per-message latency (MAIL to the last DATA
reply) and the server's CPU milliseconds per message (process tree, as in
pop3load).

    python benchmarks/smtpload.py --port 2424 --lmtp --sessions 10 \\
        --messages 2000 --rcpt intake01@bench.test --server-pid PID \\
        --verify-pop3 1110 --password secret
"""

import argparse
import asyncio
import os
import re
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
from pop3load import (  # noqa: E402
    BufferedClient,
    LatencyPercentiles,
    _ownCpu,
    connect as pop3Connect,
    cpuDelta,
    cpuSnapshot,
    resolvePids,
    systemBusySeconds,
    cpuSeconds,
    login as pop3Login,
    parseListing,
    raiseFileLimit,
)

SENDER = "bench-sender@example.net"
_TOKEN = re.compile(rb"^Subject: bench intake (\S+)", re.MULTILINE | re.IGNORECASE)


class SMTPProtocolError(Exception):
    pass


class ChunkingNotOffered(Exception):
    """
    BDAT was asked for and the server's EHLO/LHLO reply does not list
    CHUNKING: the measurement cannot be made, and DATA's figures must not
    stand in for it.
    """


class SMTPReplyError(Exception):
    def __init__(self, what, code, text):
        super().__init__(f"{what}: {code} {text}")
        self.what = what
        self.code = code


class ReplyBuffer:
    """
    Incremental parser of SMTP/LMTP replies (RFC 5321 section 4.2):
    C{ddd-text} continuation lines ending with a C{ddd text} line.
    """

    def __init__(self):
        self._buffer = bytearray()
        self.received = 0

    def feed(self, data):
        self._buffer += data
        self.received += len(data)

    def reply(self):
        """
        C{(code, [line texts])} for one complete reply, or C{None}.
        """
        buf = self._buffer
        position = 0
        lines = []
        code = None
        while True:
            end = buf.find(b"\r\n", position)
            if end < 0:
                if len(buf) - position > 4096:
                    raise SMTPProtocolError("reply line too long")
                return None
            line = bytes(buf[position:end])
            position = end + 2
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
                raise SMTPProtocolError(f"malformed reply line {line[:80]!r}")
            lineCode = int(line[:3])
            if code is not None and lineCode != code:
                raise SMTPProtocolError(f"reply code changed within a reply: {line[:80]!r}")
            code = lineCode
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                del buf[:position]
                return code, lines


class SMTPClient(BufferedClient):
    bufferClass = ReplyBuffer

    async def reply(self):
        return await self._wait(self.buffer.reply)

    def write(self, data):
        self.transport.write(data)

    def close(self):
        if self.transport is not None:
            self.transport.close()


def dotStuff(data):
    """
    The DATA form of a CRLF message: lines starting with '.' get another,
    and the terminating line follows.
    """
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class Outgoing:
    """
    One message to send: its token, its recipients, and its octets in the
    two forms it can go in.  The DATA form is made here, before the clock
    starts (dot-stuffing scans the whole message), so that the load
    generator's own work stays out of the timing; the BDAT form is the raw
    octets themselves, after a command line (L{chunk}).
    """

    token: str
    recipients: list
    raw: bytes  # the CRLF message itself: BDAT's chunk
    data: bytes = None  # its DATA form: dot-stuffed, with the terminating line

    def __post_init__(self):
        if self.data is None:
            self.data = dotStuff(self.raw)

    def chunk(self):
        """
        The whole message as one last chunk (RFC 3030): the BDAT command
        and the raw octets after it, as they go on the wire.
        """
        return b"BDAT %d LAST\r\n" % len(self.raw) + self.raw


def makeMessages(count, size, recipients, rcptsPerMessage=1, runId=None):
    """
    C{count} distinct messages of about C{size} octets with unique tokens,
    recipients taken round-robin.
    """
    runId = runId or secrets.token_hex(4)
    messages = []
    for i in range(count):
        token = f"{runId}-{i:06d}"
        rcpts = [recipients[(i + j) % len(recipients)] for j in range(rcptsPerMessage)]
        messages.append(Outgoing(token, rcpts, corpus.intakeMessage(size, token, rcpts[0])))
    return runId, messages


def _expect(reply, what, codes):
    code, lines = reply
    if code not in codes:
        raise SMTPReplyError(what, code, " / ".join(lines)[:200])
    return lines


async def sendMessages(client, lmtp, messages, acknowledged, latencies, host="bench.client", bdat=False):
    """
    One connection's work: greeting, EHLO/LHLO, the messages, QUIT.
    Tokens of messages the server took (every recipient acknowledged) are
    added to C{acknowledged}.

    Each message goes by DATA, or with C{bdat} as one C{BDAT <n> LAST}
    chunk; MAIL, RCPT and DATA (or BDAT with its chunk) are written at once
    when the server offers PIPELINING, else one by one, each after the
    previous reply.

    @raise ChunkingNotOffered: if C{bdat} and the server does not offer
        CHUNKING.
    """
    _expect(await client.reply(), "greeting", (220,))
    hello = "LHLO" if lmtp else "EHLO"
    client.write(f"{hello} {host}\r\n".encode())
    capabilities = {line.split(" ", 1)[0].upper() for line in _expect(await client.reply(), hello, (250,))[1:]}
    pipelining = "PIPELINING" in capabilities
    if bdat and "CHUNKING" not in capabilities:
        raise ChunkingNotOffered(
            f"BDAT asked for, but the {hello} reply does not offer CHUNKING (it offers "
            f"{', '.join(sorted(capabilities)) or 'nothing'})"
        )
    for message in messages:
        began = time.perf_counter()
        envelope = [f"MAIL FROM:<{SENDER}>\r\n".encode()]
        envelope += [f"RCPT TO:<{r}>\r\n".encode() for r in message.recipients]
        # What follows the envelope: the whole message after BDAT, or the
        # DATA command (its text only after the 354).
        body = message.chunk() if bdat else b"DATA\r\n"
        if pipelining:
            client.write(b"".join(envelope) + body)
            replies = [await client.reply() for _ in envelope]
        else:
            replies = []
            for command in envelope:
                client.write(command)
                replies.append(await client.reply())
                if replies[-1][0] >= 400:
                    break
        _expect(replies[0], "MAIL", (250,))
        accepted = 0
        for reply in replies[1:]:
            _expect(reply, "RCPT", (250, 251))
            accepted += 1
        if not pipelining:
            client.write(body)
        if bdat:
            end = "BDAT LAST"
        else:
            _expect(await client.reply(), "DATA", (354,))
            client.write(message.data)
            end = "end of DATA"
        for _ in range(accepted if lmtp else 1):
            _expect(await client.reply(), end, (250,))
        latencies.append(time.perf_counter() - began)
        acknowledged.append(message.token)
    client.write(b"QUIT\r\n")
    _expect(await client.reply(), "QUIT", (221,))


@dataclass
class IntakeResult(LatencyPercentiles):
    protocol: str
    sessions: int
    size: int
    messages: int
    acknowledged: list
    errors: int
    errorKinds: dict
    elapsed: float
    latencies: list
    cpuSeconds: float
    extraCpuSeconds: float
    runId: str
    expected: dict = field(default_factory=dict)
    verification: dict = None
    clientCpuSeconds: float = 0.0
    systemCpuSeconds: float = 0.0

    @property
    def backgroundCores(self):
        if not self.elapsed:
            return None
        if self.extraCpuSeconds is None:
            return None
        other = self.systemCpuSeconds - self.cpuSeconds - self.extraCpuSeconds - self.clientCpuSeconds
        return max(0.0, other) / self.elapsed

    @property
    def messagesPerSecond(self):
        return len(self.acknowledged) / self.elapsed if self.elapsed else 0.0

    @property
    def cpuMsPerMessage(self):
        return self.cpuSeconds * 1000 / len(self.acknowledged) if self.acknowledged else None

    @property
    def extraCpuMsPerMessage(self):
        if self.extraCpuSeconds is None or not self.acknowledged:
            return None
        return self.extraCpuSeconds * 1000 / len(self.acknowledged)

    @property
    def verified(self):
        return self.verification is not None and self.verification["ok"]

    def asDict(self):
        return {
            "protocol": self.protocol,
            "sessions": self.sessions,
            "size": self.size,
            "messages": self.messages,
            "acknowledged": len(self.acknowledged),
            "errors": self.errors,
            "errorKinds": self.errorKinds,
            "elapsed": round(self.elapsed, 3),
            "messagesPerSecond": round(self.messagesPerSecond, 2),
            "p50ms": None if self.p50 is None else round(self.p50, 3),
            "p99ms": None if self.p99 is None else round(self.p99, 3),
            "cpuSeconds": round(self.cpuSeconds, 3),
            "cpuMsPerMessage": None if self.cpuMsPerMessage is None else round(self.cpuMsPerMessage, 3),
            "extraCpuSeconds": None if self.extraCpuSeconds is None else round(self.extraCpuSeconds, 3),
            "extraCpuMsPerMessage": None if self.extraCpuMsPerMessage is None else round(self.extraCpuMsPerMessage, 3),
            "runId": self.runId,
            "verification": self.verification,
            "clientCpuSeconds": round(self.clientCpuSeconds, 3),
            "clientCpuShare": round(self.clientCpuSeconds / self.elapsed, 3) if self.elapsed else None,
            "backgroundCores": None if self.backgroundCores is None else round(self.backgroundCores, 2),
        }

    def summary(self):
        cpu = "-" if self.cpuMsPerMessage is None else f"{self.cpuMsPerMessage:.3f}"
        p50 = "-" if self.p50 is None else f"{self.p50:.2f}"
        p99 = "-" if self.p99 is None else f"{self.p99:.2f}"
        text = (
            f"{self.protocol} x{self.sessions} {self.size} B: {len(self.acknowledged)}/{self.messages} "
            f"messages in {self.elapsed:.2f} s = {self.messagesPerSecond:.1f} msgs/s, "
            f"p50 {p50} ms, p99 {p99} ms, server CPU {cpu} ms/message, errors {self.errors}"
        )
        if self.errorKinds:
            text += " " + repr(self.errorKinds)
        if self.verification is not None:
            v = self.verification
            text += (
                f"; verified: {'OK' if v['ok'] else 'FAILED'} ({v['found']} found, "
                f"{len(v['missing'])} missing, {len(v['duplicated'])} duplicated, "
                f"{len(v['unexpected'])} unexpected)"
            )
        return text


async def runIntake(
    port,
    recipients,
    lmtp=False,
    sessions=10,
    messages=1000,
    size=4096,
    perConnection=10,
    rcptsPerMessage=1,
    host="127.0.0.1",
    serverPids=(),
    extraPids=(),
    timeout=60.0,
    runId=None,
    settle=0.2,
    bdat=False,
):
    """
    Send the messages (by DATA, or with C{bdat} each as one BDAT chunk);
    return an L{IntakeResult} (not yet verified).

    @raise ChunkingNotOffered: if C{bdat} and the server does not offer
        CHUNKING (the first session that finds so stops the run: it is not
        counted as a failed message, since nothing was measured).
    """
    raiseFileLimit(sessions * 2 + 64)
    runId, outgoing = makeMessages(messages, size, recipients, rcptsPerMessage, runId)
    expected = {m.token: list(m.recipients) for m in outgoing}
    queue = list(reversed(outgoing))
    acknowledged = []
    latencies = []
    errors = Counter()
    loop = asyncio.get_running_loop()

    async def worker():
        while queue:
            batch = [queue.pop() for _ in range(min(perConnection, len(queue)))]
            client = None
            done = len(acknowledged)
            try:
                _, client = await asyncio.wait_for(
                    loop.create_connection(SMTPClient, host, port), timeout
                )
                await asyncio.wait_for(
                    sendMessages(client, lmtp, batch, acknowledged, latencies, bdat=bdat),
                    timeout * len(batch),
                )
            except ChunkingNotOffered:
                queue.clear()
                raise
            except (Exception, asyncio.TimeoutError) as e:
                failed = len(batch) - (len(acknowledged) - done)
                if isinstance(e, SMTPReplyError):
                    kind = f"{e.what} {e.code}"
                elif isinstance(e, asyncio.TimeoutError):
                    kind = "timeout"
                else:
                    kind = f"{e.__class__.__name__}: {e}"[:120]
                errors[kind] += max(failed, 1)
                await asyncio.sleep(0.01)
            finally:
                if client is not None:
                    client.close()

    if settle:
        await asyncio.sleep(settle)
    extraRoots = resolvePids(extraPids)
    cpuBefore = cpuSeconds(list(serverPids))
    extraBefore = cpuSnapshot(extraRoots)
    clientBefore = _ownCpu()
    systemBefore = systemBusySeconds()
    start = loop.time()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    elapsed = loop.time() - start
    clientAfter = _ownCpu()
    if settle:
        await asyncio.sleep(settle)
    cpuAfter = cpuSeconds(list(serverPids))
    extraAfter = cpuSnapshot(extraRoots)
    systemAfter = systemBusySeconds()
    return IntakeResult(
        protocol=("LMTP" if lmtp else "SMTP") + (" BDAT" if bdat else ""),
        sessions=sessions,
        size=size,
        messages=messages,
        acknowledged=acknowledged,
        errors=sum(errors.values()),
        errorKinds=dict(errors),
        elapsed=elapsed,
        latencies=latencies,
        cpuSeconds=cpuAfter - cpuBefore,
        extraCpuSeconds=cpuDelta(extraBefore, extraAfter, extraRoots),
        runId=runId,
        expected=expected,
        clientCpuSeconds=clientAfter - clientBefore,
        systemCpuSeconds=systemAfter - systemBefore,
    )


# -- verification ---------------------------------------------------------------


def tokensIn(header):
    """
    The intake tokens in a message header (normally one).
    """
    return [m.decode("ascii", "replace") for m in _TOKEN.findall(header)]


async def tokensFromPOP3(port, users, password, host="127.0.0.1", apop=False, timeout=120.0):
    """
    C{{user: Counter(token)}} from TOP n 0 of every message in each
    user's maildrop.
    """
    found = {}
    for user in users:
        client = await pop3Connect(host, port, timeout)
        try:
            async def collect():
                await pop3Login(client, user, password, apop)
                listing = parseListing(await client.multiline("LIST"), "LIST")
                tokens = Counter()
                for number, _ in listing:
                    tokens.update(tokensIn(await client.multiline(f"TOP {number} 0")))
                await client.command("QUIT")
                return tokens

            found[user] = await asyncio.wait_for(collect(), timeout)
        finally:
            client.close()
    return found


def tokensFromMaildirs(maildirs):
    """
    C{{user: Counter(token)}} from the headers of every file in each
    user's maildir (C{{user: path to Maildir}}), new/ and cur/.
    """
    found = {}
    for user, maildir in maildirs.items():
        tokens = Counter()
        for sub in ("new", "cur"):
            folder = os.path.join(maildir, sub)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    head = f.read(16384)
                end = head.find(b"\n\n")
                if end < 0:
                    end = head.find(b"\r\n\r\n")
                tokens.update(tokensIn(head if end < 0 else head[:end]))
        found[user] = tokens
    return found


def verify(result, found):
    """
    Check that every message the server acknowledged arrived exactly once
    in each of its recipients' maildrops, and nothing else of this run.

    @param found: C{{user: Counter(token)}} (from L{tokensFromPOP3} or
        L{tokensFromMaildirs}).
    @return: a report dict (also stored as C{result.verification}).
    """
    prefix = result.runId + "-"
    acknowledged = set(result.acknowledged)
    missing, duplicated, unexpected = [], [], []
    seen = Counter()
    for user, tokens in found.items():
        for token, count in tokens.items():
            if not token.startswith(prefix):
                continue
            seen[token] += count
            recipients = result.expected.get(token)
            if recipients is None or user not in recipients:
                unexpected.append((user, token))
            elif count > 1:
                duplicated.append((user, token, count))
    for token in sorted(acknowledged):
        for user in result.expected[token]:
            if found.get(user, Counter()).get(token, 0) == 0:
                missing.append((user, token))
    unacknowledgedPresent = sorted(t for t in seen if t not in acknowledged)
    report = {
        "ok": not (missing or duplicated or unexpected),
        "found": sum(seen.values()),
        "expected": sum(len(result.expected[t]) for t in acknowledged),
        "missing": missing[:20],
        "duplicated": duplicated[:20],
        "unexpected": unexpected[:20],
        "unacknowledgedButPresent": unacknowledgedPresent[:20],
    }
    result.verification = report
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="SMTP/LMTP intake benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lmtp", action="store_true", help="speak LMTP (LHLO, a reply per recipient)")
    parser.add_argument(
        "--bdat", action="store_true",
        help="send each message as one BDAT <n> LAST chunk (RFC 3030) instead of DATA; "
        "an error if the server does not offer CHUNKING",
    )
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--per-connection", type=int, default=10)
    parser.add_argument("--rcpts-per-message", type=int, default=1)
    parser.add_argument("--rcpt", action="append", default=[], help="a recipient (repeat)")
    parser.add_argument("--server-pid", type=int, action="append", default=[])
    parser.add_argument("--verify-pop3", type=int, metavar="PORT", help="verify through this POP3 port")
    parser.add_argument("--password", default=corpus.PASSWORD)
    parser.add_argument("--verify-maildir", metavar="ROOT", help="verify from ROOT/<address>/Maildir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    recipients = args.rcpt or [f"intake{i:02d}@{corpus.DOMAIN}" for i in range(1, 11)]

    async def go():
        result = await runIntake(
            args.port, recipients, args.lmtp, args.sessions, args.messages, args.size,
            args.per_connection, args.rcpts_per_message, args.host, args.server_pid, bdat=args.bdat,
        )
        if args.verify_pop3:
            verify(result, await tokensFromPOP3(args.verify_pop3, recipients, args.password, args.host))
        elif args.verify_maildir:
            verify(result, tokensFromMaildirs(
                {r: os.path.join(args.verify_maildir, r, "Maildir") for r in recipients}
            ))
        return result

    try:
        result = asyncio.run(go())
    except ChunkingNotOffered as e:
        print(f"smtpload: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(result.asDict()))
    else:
        print(result.summary())
    return 0 if result.errors == 0 and (result.verification is None or result.verified) else 1


if __name__ == "__main__":
    sys.exit(main())
