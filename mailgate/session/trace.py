# -*- test-case-name: tests.test_trace -*-
"""
Protocol traces of chosen clients, for an administrator finding out why
one user's client fails: every command the client sends and the first
line of every reply, logged as C{session.trace} events, as Postfix's
C{debug_peer_list} and Dovecot's rawlog do.

Which sessions are traced is L{TraceSelection}'s: those from given
networks (C{--debug-peer}), from their first line, and POP3 sessions that
name or log in as given users (C{--debug-user}), from then on.

What a trace never holds: passwords (PASS's argument, APOP's digest,
AUTH's initial response), SASL exchanges (the client's responses and the
server's challenges), and message content (DATA's lines never reach the
command parser, and of a reply only its first line, the status, is
logged).  Each logged line is cut at L{LINE_LIMIT} characters, with
anything unprintable shown as C{?}.

An untraced session pays nothing for this beyond a look-up when it
connects and when it logs in: tracing replaces the session's own
C{lineReceived} and its reply writer's C{write} and C{writeParts} with
logging ones, on that session alone.
"""

from mailgate.address import userAddress
from mailgate.errors import InvalidAddress
from mailgate.networks import hostOnNetworks, parseNetwork
from mailgate.printable import printable

#: characters of a command or reply logged at most
LINE_LIMIT = 256


class TraceSelection:
    """
    The clients to trace.

    @param networks: networks (CIDR text or L{ipaddress} networks) whose
        clients' sessions are traced from their start.
    @param users: addresses whose POP3 sessions are traced once they name
        the user (USER) or log in as it.
    """

    def __init__(self, networks=(), users=()):
        self.networks = tuple(parseNetwork(n) for n in networks)
        self.users = frozenset(_userName(u) for u in users)

    def __bool__(self):
        return bool(self.networks or self.users)

    def peer(self, address):
        """
        Whether the client at C{address} (a Twisted address) is traced.
        """
        host = getattr(address, "host", None)
        if not self.networks or host is None:
            return False
        return hostOnNetworks(host, self.networks)

    def user(self, name):
        """
        Whether the sessions of the user named C{name} are traced.
        """
        return bool(self.users) and _userName(name) in self.users


def _userName(name):
    """
    A user's name as delivery and logins read it (L{userAddress}: case, a
    trailing dot, a domain in Unicode): compared as sent, the RCPT to
    alice@bücher.example that brought alice@xn--bcher-kva.example's mail
    was not traced.  What is no address is compared trimmed and
    case-folded.
    """
    try:
        return userAddress(name)
    except InvalidAddress:
        return name.strip().lower()


def shown(text):
    """
    C{text} fit for a trace line: at most L{LINE_LIMIT} characters,
    anything unprintable as C{?}.
    """
    cut = printable(text[:LINE_LIMIT])
    return cut + "..." if len(text) > LINE_LIMIT else cut


def replyLine(data):
    """
    What the trace shows of a reply written as C{data}: its first line (a
    status line), or C{None} for the terminator of a listing whose status
    went before; a SASL challenge is not shown.
    """
    if data == b".\r\n":
        return None
    if data[:2] == b"+ ":
        return "+ <SASL challenge>"
    end = data.find(b"\n")
    first = data if end < 0 else data[:end]
    if first.endswith(b"\r"):
        first = first[:-1]
    line = shown(first.decode("utf-8", "replace"))
    return line + " ..." if 0 <= end < len(data) - 1 else line


def startTrace(session, why):
    """
    Trace C{session} (a L{mailgate.session.CommandSession}) from now on;
    nothing if it is traced already.  Its commands are shown as its
    protocol's C{tracedCommand} gives them.

    @param why: what made it traced, for the first line.
    """
    if session.traced:
        return
    session.traced = True
    protocolLineReceived = session.lineReceived
    out = session._out
    writerWrite = out.write
    writerWriteParts = out.writeParts

    def trace(direction, line):
        session.logInfo(
            "session.trace",
            f"{session.protocolName} trace peer={session.peerText} {direction}: {line}",
            direction=direction,
            trace=line,
        )

    def lineReceived(line):
        trace("C", session.tracedCommand(line))
        return protocolLineReceived(line)

    def write(data):
        line = replyLine(data)
        if line is not None:
            trace("S", line)
        return writerWrite(data)

    def writeParts(parts):
        if parts:
            line = replyLine(bytes(parts[0]))
            if line is not None:
                trace("S", line)
        return writerWriteParts(parts)

    session.lineReceived = lineReceived
    out.write = write
    out.writeParts = writeParts
    session.logInfo(
        "session.trace",
        f"{session.protocolName} trace peer={session.peerText} started: {why}",
        direction="-",
        trace=f"started: {why}",
    )


def endTrace(session, why):
    """
    The last line of a traced C{session}'s trace: how it ended (its end
    line's reason), so that a trace whose client went away without a
    command (in its TLS handshake, say) does not just stop.
    """
    session.logInfo(
        "session.trace",
        f"{session.protocolName} trace peer={session.peerText} ended: {why}",
        direction="-",
        trace=f"ended: {why}",
    )
