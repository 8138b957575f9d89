"""
LMTP as an MTA sees it, mailgate against Dovecot: a differential test.

A private Debian Dovecot (tests/dovecotserver.py, its LMTP on a loopback
port) and a real C{twistd mailgate --lmtp} have the same users.  The same
command sequences go to both over raw sockets: a fixed list (LHLO's forms,
MAIL FROM and RCPT TO syntax: the null sender, source routes, quoted local
parts, UTF-8 and SMTPUTF8, SIZE= and BODY=, unknown parameters, missing
brackets, spaces; unknown recipients among known ones; commands out of
sequence; RSET, NOOP, VRFY, HELP and QUIT in every state; over-long
lines, NUL, bare LF and CR in commands and in the data, dot-stuffing, the
empty message, PIPELINING batches; and messages sent in RFC 3030 BDAT
chunks: one chunk, chunks cut between CR and LF, before a dot line and
mid-line, C{BDAT 0 LAST}, a whole transaction in one write, bare LF, no
final line end, dot lines kept as sent, per-recipient replies, chunks
before MAIL or before any accepted recipient (their octets never run as
commands), DATA after a chunk, RSET between chunks, a retry by BDAT of a
message sent by DATA, malformed BDAT commands and a chunk over the size
limit) and a seeded random mix.  What is compared is what an MTA acts
on: each reply's class (2xx, 3xx, 4xx, 5xx, or the connection closed),
and the class of the RFC 3463 enhanced status code where both give one;
after DATA or the last chunk, how many replies came (LMTP: one per
accepted recipient, RFC 2033 section 4.2) and each one's class.  The text
after the codes is not compared: RFC 5321 leaves it to the server.

A message either server accepted (a 2xx after its data) is read back by
POP3 from that server, and the maildrops compared octet for octet, once
each server's own trace fields at the top (C{Return-Path:}, C{Received:},
C{Delivered-To:}) are taken off: every message is stored as the other
stores it.

The same sequences then go to mailgate's SMTP listener (C{EHLO} for
C{LHLO}), compared with Dovecot's LMTP where RFC 5321 and RFC 2033 say
the same: everything before the end of the data.  Dovecot has no SMTP
intake of its own to compare with.

A difference is allowed only if L{DIFFERENCES} explains it: each entry says
why mailgate differs on purpose, with the RFC.  Anything else fails the
test, with the exchange that differed.
"""

import random
import re
import socket

import attr
import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import _LOGGED_ERROR, ServerProcess, databaseURL
from mailgate.testing import addUser, memoryStore
from rawexchange import Difference, RawConnection, batch, fail, lines

pytestmark = requireDovecot

DOMAIN = "example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
USERS = (ALICE, BOB, CAROL)
NOBODY = "nobody@example.org"
PASSWORD = "wonder land"

#: Seconds any one read from either server may take.
READ_TIMEOUT = 5.0

#: mailgate's message size limit: above every other message here, and
#: small enough that a chunk over it is quickly sent (and read back from
#: Dovecot, whose LMTP has no limit).
MAX_MESSAGE_SIZE = 100000


# -- talking to a server ----------------------------------------------------


@attr.s(frozen=True)
class Reply:
    """
    One reply as an MTA reads it.

    @ivar code: the three digits, C{"closed"} (the connection ended
        instead) or C{"timeout"} (nothing within L{READ_TIMEOUT}).
    @ivar enhanced: the RFC 3463 code of its last line, or C{None}.
    @ivar lines: its lines, without their CRLF.
    """

    code = attr.ib()
    enhanced = attr.ib(default=None)
    lines = attr.ib(default=())

    @property
    def kind(self):
        return self.code[0] + "xx" if self.code[:1].isdigit() else self.code

    @property
    def enhancedClass(self):
        return self.enhanced[0] if self.enhanced else None

    @property
    def text(self):
        return b"\n".join(self.lines)


CLOSED = Reply("closed")
TIMEOUT = Reply("timeout")
NOT_SENT = Reply("not sent")
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")
_ENHANCED = re.compile(rb"^[2-5][0-9][0-9][ -]([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")


class Client(RawConnection):
    """
    A raw LMTP or SMTP connection: octets sent as given, replies read as
    RFC 5321 section 4.2 frames them.
    """

    def __init__(self, port):
        RawConnection.__init__(self, port, READ_TIMEOUT)
        self.greeting = self.reply()

    def reply(self):
        if self.closed and b"\n" not in self.buffer:
            return CLOSED
        lines = []
        try:
            while True:
                line = self._line()
                lines.append(line)
                match = _REPLY_LINE.match(line)
                assert match, f"not an SMTP reply line: {line!r}"
                if match.group(2) != b"-":
                    break
        except EOFError:
            return CLOSED if not lines else Reply("closed", lines=tuple(lines))
        except socket.timeout:
            self.closed = True
            return TIMEOUT
        enhanced = _ENHANCED.match(lines[-1])
        return Reply(lines[-1][:3].decode(), enhanced.group(1).decode() if enhanced else None, tuple(lines))


def verbOf(command):
    return command.split(b" ", 1)[0].rstrip(b"\r\n").upper()


# -- the steps of a sequence --------------------------------------------------


@attr.s(frozen=True)
class Message:
    """
    A step: the data after a 354, in its wire form (dot-stuffed, the
    terminating CRLF "." CRLF included), sent only if the DATA before it
    got a 354, as an MTA sends it.  C{@ID@} in it becomes a number unique
    to the sequence's run: no two runs send the same message (mailgate
    would take the second for a retry, see L{DIFFERENCES}).
    """

    data = attr.ib()


def message(text=b"Subject: test\r\n\r\nHello.\r\n"):
    """
    A message's data step: a header with the run's unique id, then
    C{text} (its own line end at the end), then the terminator.
    """
    return Message(b"X-Run: @ID@\r\n" + text + b".\r\n")


@attr.s(frozen=True)
class Chunk:
    """
    A step: a BDAT command and exactly the octets it announces (RFC 3030
    section 2), sent in one write whatever the replies before it: a
    chunk's octets follow its command line at once, and a server reads
    them even when it refuses the chunk.  One reply, or, for the chunk
    marked C{LAST} of a transaction with accepted recipients, a message's
    replies (one per recipient over LMTP).  C{@ID@} as in L{Message}; the
    size is counted once it is replaced.
    """

    data = attr.ib()
    last = attr.ib(default=False)

    def _data(self, runId):
        return self.data.replace(b"@ID@", str(runId).encode())

    def command(self, runId):
        return b"BDAT %d%s\r\n" % (len(self._data(runId)), b" LAST" if self.last else b"")

    def wire(self, runId):
        return self.command(runId) + self._data(runId)


def chunks(*pieces):
    """
    A message's BDAT steps: a chunk for each piece (C{b""} is a
    C{BDAT 0}), the last one marked C{LAST}, the run's unique header before
    the first as L{message} puts it.
    """
    pieces = pieces or (b"Subject: test\r\n\r\nHello.\r\n",)
    pieces = (b"X-Run: @ID@\r\n" + pieces[0],) + pieces[1:]
    return [Chunk(piece) for piece in pieces[:-1]] + [Chunk(pieces[-1], last=True)]


HELLO = lines("LHLO client.test")


def envelope(*recipients, sender="sender@example.net"):
    return HELLO + lines(f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients))


def delivery(*recipients, data=None):
    """
    The steps of one whole transaction.
    """
    return envelope(*recipients) + lines("DATA") + [data or message()]


# -- running sequences -------------------------------------------------------


@attr.s
class Run:
    """
    What one server answered to one sequence.

    @ivar exchanges: C{[(command, reply or [replies]), ...]}: after a
        L{Message}, the list of its replies.
    @ivar delivered: whether any reply to a message's data was 2xx.
    """

    greeting = attr.ib()
    exchanges = attr.ib()
    delivered = attr.ib(default=False)


def run(port, steps, runId, lmtp=True):
    """
    Send each step and read its replies.  A step is a line (bytes), a
    L{Chunk}, a batch of them sent in one write (a tuple: pipelining), or
    a L{Message}.  With C{lmtp=False} (mailgate's SMTP), C{LHLO} is sent
    as C{EHLO}, and a message's end (its data, or its last chunk) gets one
    reply.
    """
    client = Client(port)
    exchanges = []
    recipients = 0
    delivered = False
    last = None

    def messageReplies():
        replies = []
        for _ in range(max(recipients if lmtp else 1, 1)):
            reply = client.reply()
            replies.append(reply)
            if reply.code in ("closed", "timeout"):
                break
        return replies

    try:
        for step in steps:
            if isinstance(step, Message):
                label = b"<the message's data>"
                if last is None or last.code != "354":
                    exchanges.append((label, [NOT_SENT]))
                    continue
                client.send(step.data.replace(b"@ID@", str(runId).encode()))
                replies = messageReplies()
                delivered = delivered or any(r.kind == "2xx" for r in replies)
                recipients = 0
                exchanges.append((label, replies))
                last = replies[-1]
                continue
            batch = step if isinstance(step, tuple) else (step,)
            client.send(b"".join(wireOf(part, runId, lmtp) for part in batch))
            for part in batch:
                if isinstance(part, Chunk) and part.last and recipients:
                    replies = messageReplies()
                    delivered = delivered or any(r.kind == "2xx" for r in replies)
                    recipients = 0
                    exchanges.append((part.command(runId), replies))
                    last = replies[-1]
                else:
                    command = part.command(runId) if isinstance(part, Chunk) else part
                    reply = client.reply()
                    verb = verbOf(command)
                    if reply.kind == "2xx":
                        if verb in (b"LHLO", b"MAIL", b"RSET", b"HELO", b"EHLO"):
                            recipients = 0
                        elif verb == b"RCPT":
                            recipients += 1
                    exchanges.append((command, reply))
                    last = reply
                if last.code in ("closed", "timeout"):
                    break
            if last.code in ("closed", "timeout"):
                break
    finally:
        client.close()
    return Run(client.greeting, exchanges, delivered)


def wireOf(part, runId, lmtp):
    """
    What goes on the wire for one part of a step: a chunk's octets as they
    are (an "LHLO" in them is data), a line's with C{LHLO} made C{EHLO}
    over SMTP.
    """
    if isinstance(part, Chunk):
        return part.wire(runId)
    return part if lmtp else re.sub(rb"(?mi)^LHLO", b"EHLO", part)


# -- the maildrops, read back by POP3 -------------------------------------------


TRACE_FIELDS = (b"return-path:", b"received:", b"delivered-to:")


def withoutTrace(stored):
    """
    The message without the trace fields a server put at its top.
    """
    while stored[:20].lower().startswith(TRACE_FIELDS):
        end = stored.find(b"\n")
        while end >= 0 and stored[end + 1:end + 2] in (b" ", b"\t"):
            end = stored.find(b"\n", end + 1)
        stored = stored[end + 1:] if end >= 0 else b""
    return stored


class POP3:
    """
    A raw POP3 session: each message as RETR sends it, dot-stuffing undone.
    """

    def __init__(self, port, user):
        self.client = RawConnection(port, READ_TIMEOUT)
        self._status()
        self.command(f"USER {user}")
        self.command(f"PASS {PASSWORD}")

    def _status(self):
        line = self.client._line()
        assert line.startswith(b"+OK"), line
        return line

    def command(self, text):
        self.client.send(text.encode() + b"\r\n")
        return self._status()

    def drain(self):
        """
        Every message, then each deleted, and QUIT: the next sequence
        finds the maildrop empty.
        """
        count = int(self.command("STAT").split()[1])
        messages = []
        for n in range(1, count + 1):
            self.command(f"RETR {n}")
            data = []
            while True:
                line = self.client._line()
                if line == b".":
                    break
                data.append(line[1:] if line.startswith(b".") else line)
            messages.append(b"".join(line + b"\r\n" for line in data))
            self.command(f"DELE {n}")
        self.command("QUIT")
        self.client.close()
        return messages


def maildrops(port):
    return {user: [withoutTrace(m) for m in POP3(port, user).drain()] for user in USERS}


# -- the differences -----------------------------------------------------------


@attr.s(frozen=True)
class Exchange:
    """
    One step and both servers' replies.  C{dovecot} and C{mailgate}: a
    L{Reply}, or a list of them after a message's data; for a maildrop,
    C{("maildrop", user)} as the command and the lists of messages.
    """

    command = attr.ib()
    dovecot = attr.ib()
    mailgate = attr.ib()
    previousCommand = attr.ib(default=None)
    previousDovecot = attr.ib(default=None)
    previousMailgate = attr.ib(default=None)
    smtp = attr.ib(default=False)


def view(reply):
    """
    What an MTA acts on: the reply's class, the enhanced code's class.
    """
    if isinstance(reply, list):
        return [view(r) for r in reply]
    return reply.kind


def differs(dovecot, mailgate):
    if isinstance(dovecot, list) or isinstance(mailgate, list):
        if not (isinstance(dovecot, list) and isinstance(mailgate, list)) or len(dovecot) != len(mailgate):
            return True
        return any(differs(d, m) for d, m in zip(dovecot, mailgate))
    if dovecot.kind != mailgate.kind:
        return True
    return None not in (dovecot.enhancedClass, mailgate.enhancedClass) and (
        dovecot.enhancedClass != mailgate.enhancedClass
    )


def _kinds(dovecot, mailgate):
    return lambda ex: (view(ex.dovecot), view(ex.mailgate)) == (dovecot, mailgate)


def _verb(*verbs):
    return lambda ex: isinstance(ex.command, bytes) and verbOf(ex.command) in verbs


def _parameters(command):
    """
    The ESMTP parameters' keywords of a MAIL or RCPT line.
    """
    after = command.rstrip(b"\r\n").rpartition(b">")[2]
    return {item.partition(b"=")[0].upper() for item in after.split()}


def _smtpHello(ex):
    return ex.smtp and _verb(b"HELO", b"EHLO")(ex) and _kinds("5xx", "2xx")(ex)


def _mailBeforeHello(ex):
    return _verb(b"MAIL")(ex) and _kinds("2xx", "5xx")(ex) and b"first" in ex.mailgate.text


def _nonASCIIWithoutSMTPUTF8(ex):
    return (
        ex.smtp
        and _verb(b"MAIL", b"RCPT")(ex)
        and not ex.command.isascii()
        and ex.mailgate.enhanced == "5.6.7"
        and ex.dovecot.kind == "2xx"
    )


#: The ESMTP extensions mailgate offers and Dovecot's LMTP does not.
NOT_OFFERED_BY_DOVECOT = {b"SIZE", b"SMTPUTF8"}


def _notOfferedByDovecot(ex):
    return (
        _verb(b"MAIL")(ex)
        and _parameters(ex.command) & NOT_OFFERED_BY_DOVECOT
        and ex.dovecot.code == "555"
        and ex.mailgate.kind in ("2xx", "5xx")
    )


def _spaces(ex):
    if not isinstance(ex.command, bytes):
        return False
    line = ex.command.rstrip(b"\r\n")
    spaced = (
        line.startswith(b" ")
        or b"  " in line
        or re.match(rb"(?i)^(MAIL FROM|RCPT TO): ", line) is not None
    )
    return spaced and _kinds("5xx", "2xx")(ex)


def _tabAfterPath(ex):
    return _verb(b"MAIL", b"RCPT")(ex) and ex.command.rstrip(b"\r\n").endswith(b"\t") and _kinds("2xx", "5xx")(ex)


def _oneHostName(ex):
    return _verb(b"LHLO")(ex) and len(ex.command.split()) > 2 and _kinds("2xx", "5xx")(ex)


def _overLong(ex):
    return isinstance(ex.command, bytes) and len(ex.command) > 512 and ex.mailgate.code == "500"


def _strictSender(ex):
    return ex.smtp and _verb(b"MAIL")(ex) and _kinds("2xx", "5xx")(ex) and ex.mailgate.enhanced == "5.1.7"


def _unadvertisedRecipientParameters(ex):
    return _verb(b"RCPT")(ex) and _parameters(ex.command) and ex.mailgate.code == "555" and ex.dovecot.kind == "2xx"


def _rootDot(ex):
    return _verb(b"RCPT")(ex) and b".>" in ex.command and _kinds("5xx", "2xx")(ex)


def _vrfy(ex):
    return _verb(b"VRFY")(ex) and _kinds("5xx", "2xx")(ex) and ex.mailgate.code == "252"


def _help(ex):
    return _verb(b"HELP")(ex) and _kinds("5xx", "2xx")(ex)


def _badCommands(ex):
    return isinstance(ex.dovecot, Reply) and ex.dovecot.code == "421" and b"Too many invalid" in ex.dovecot.text


def _smtpRefusedRecipients(ex):
    return (
        ex.smtp
        and isinstance(ex.mailgate, Reply)
        and ex.mailgate.code == "421"
        and b"too many errors" in ex.mailgate.text
    )


def _earlyData(ex):
    return isinstance(ex.mailgate, Reply) and ex.mailgate.enhanced == "4.5.0" and ex.mailgate.code == "421"


def _dotAfterBareLF(ex):
    if not (isinstance(ex.command, tuple) and len(ex.dovecot) == len(ex.mailgate)):
        return False
    for dovecot, mailgate in zip(ex.dovecot, ex.mailgate):
        lone = mailgate.find(b"\r\n.\r\n")
        if dovecot != mailgate and (lone < 0 or dovecot != mailgate[: lone + 2]):
            return False
    return True


def _retry(ex):
    if not isinstance(ex.command, tuple):
        return False
    return len(ex.dovecot) > len(ex.mailgate) and set(ex.dovecot) == set(ex.mailgate)


def _chunkSize(command):
    """
    The size a well-formed BDAT line announces, or C{None}.
    """
    match = re.match(rb"(?i)^BDAT ([0-9]+)( LAST)?\r\n$", command) if isinstance(command, bytes) else None
    return int(match.group(1)) if match else None


def _malformedBDAT(ex):
    return (
        isinstance(ex.previousCommand, bytes)
        and verbOf(ex.previousCommand) == b"BDAT"
        and _chunkSize(ex.previousCommand) is None
        and (ex.previousDovecot.code, ex.previousMailgate.code) == ("501", "501")
        and view(ex.mailgate) == "closed"
    )


def _chunkOverLimit(ex):
    size = _chunkSize(ex.command)
    replies = ex.mailgate if isinstance(ex.mailgate, list) else [ex.mailgate]
    # One reply, or for a chunk marked LAST one per recipient (RFC 2033).
    return (
        size is not None
        and size > MAX_MESSAGE_SIZE
        and {r.code for r in replies} == {"552"}
        and all(b"closing connection" in r.text for r in replies)
    )


def _recipientBetweenChunks(ex):
    return (
        _verb(b"RCPT")(ex)
        and _kinds("2xx", "5xx")(ex)
        and ex.mailgate.code == "503"
        and b"chunks are arriving" in ex.mailgate.text
    )


#: Every difference between the two that is accepted, with its reason.
DIFFERENCES = (
    # RFC 2033 section 4.1: LMTP has no HELO or EHLO, and Dovecot's LMTP
    # refuses them; over SMTP (RFC 5321 section 4.1.1.1) mailgate takes
    # both (diverges: that SMTP session has greeted, the LMTP one not).
    Difference("HELO and EHLO over SMTP", _smtpHello, diverges=True),
    # RFC 5321 section 4.1.4: a client MUST send EHLO (LHLO, RFC 2033
    # section 4.1) before a mail transaction; mailgate refuses MAIL before
    # it with 503, Dovecot lets the transaction start.
    Difference("MAIL before LHLO", _mailBeforeHello, diverges=True),
    # RFC 6531 section 3.4 (and RFC 5321's ASCII grammar): a non-ASCII
    # address only in a transaction that said SMTPUTF8.  Over SMTP mailgate
    # answers 553 5.6.7 (RFC 6531's "non-ASCII addresses not permitted"),
    # as Postfix does with strict_smtputf8; Dovecot 2.3 takes the octets,
    # and so does mailgate's LMTP, whose MTA took them (Postfix's default).
    Difference("a non-ASCII address without SMTPUTF8 over SMTP", _nonASCIIWithoutSMTPUTF8, diverges=True),
    # RFC 1869 section 4 (RFC 5321 section 4.1.2): a client uses only the
    # parameters of the extensions the server announced.  Dovecot 2.3's
    # LMTP announces neither SIZE (RFC 1870) nor SMTPUTF8 (RFC 6531) and
    # refuses them with 555; mailgate announces and takes both.
    Difference("parameters of extensions Dovecot does not offer", _notOfferedByDovecot, diverges=True),
    # RFC 5321 section 4.1.2's grammar has single spaces and none after
    # "FROM:"/"TO:"; section 4.5.3.1 and Postel's rule: mailgate forgives
    # the extra spaces some clients send (a space after the colon, two
    # before a parameter or LHLO's name, one before the verb), as Postfix
    # does; Dovecot refuses them (diverges).
    Difference("extra spaces", _spaces, diverges=True),
    # RFC 5321 section 4.1.2: parameters follow the path after SP, never
    # a TAB.  mailgate refuses the line; Dovecot takes the tab for
    # trailing white space.
    Difference("a TAB after the path", _tabAfterPath, diverges=True),
    # RFC 2033 section 4.1 (RFC 5321 section 4.1.1.1): LHLO takes one
    # domain or address literal.  mailgate refuses more words; Dovecot
    # greets.
    Difference("LHLO with more than a host name", _oneHostName, diverges=True),
    # RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets
    # (and section 4.5.3.1.3: a path at most 256).  mailgate refuses a
    # longer line with 500 5.5.2 and goes on; Dovecot reads up to its
    # buffer and runs it.
    Difference("a command line over 512 octets", _overLong, diverges=True),
    # RFC 5321 section 4.1.2: a reverse-path is <> or a Mailbox,
    # local-part "@" domain, the local part a dot-string or quoted.
    # mailgate's SMTP refuses with 501 5.1.7 (RFC 3463's "bad sender's
    # mailbox address syntax") a sender no bounce could go back to (<a>,
    # <a@b@example.net>, <a@>, <a@[300.0.0.1]>, ...); Dovecot's LMTP, and
    # mailgate's, take such text without white space as <> (final
    # delivery: fetchmail hands over senders read from header fields).
    # (Both take dots out of place in the local part, <a..b@...>, as
    # Postfix does: mobile carriers' users send from them.)
    Difference("a sender address RFC 5321 does not allow", _strictSender, diverges=True),
    # RFC 1869 section 6 (RFC 5321 section 4.1.1.11): a parameter the
    # server did not announce is refused with 555.  Dovecot announces no
    # DSN but takes ORCPT= (and NOTIFY=); mailgate announces no RCPT
    # parameter and refuses every one.
    Difference("RCPT parameters neither announces", _unadvertisedRecipientParameters, diverges=True),
    # A domain written with DNS's root dot ("example.org.") names the
    # same fully-qualified domain (RFC 5321 section 2.3.5); mailgate
    # delivers to the user it names, Dovecot refuses the syntax.
    Difference("a domain with its root dot", _rootDot, diverges=True),
    # RFC 5321 section 3.5.3: VRFY takes a user name or a mailbox, and 252
    # answers it without saying whether it exists.  Dovecot refuses a
    # mailbox (its "@" is no atom's character); mailgate answers every
    # argument 252.
    Difference("VRFY with a mailbox", _vrfy),
    # RFC 5321 section 4.1.1.8: HELP is optional (section 4.5.1 lists the
    # commands a server must have).  mailgate answers it, Dovecot's LMTP
    # does not know it.
    Difference("HELP", _help),
    # Dovecot closes the session at its tenth bad command in a row (421
    # instead of that command's reply); mailgate after 20 (README; as
    # Postfix's smtpd_hard_error_limit).  No RFC sets a number.
    Difference("too many bad commands", _badCommands, diverges=True),
    # Over SMTP, refused recipients count among mailgate's 20 errors
    # (README: a client guessing addresses is cut off, as by Postfix's
    # smtpd_hard_error_limit); over LMTP they do not, and Dovecot counts
    # none.
    Difference("refused recipients close an SMTP session", _smtpRefusedRecipients, diverges=True),
    # RFC 2920 section 3.1: DATA is the last command of a pipelined
    # group; nothing may follow it before its reply.  When DATA is
    # refused and more came behind it (a message's text, which run as
    # commands could add recipients: SMTP smuggling), mailgate closes
    # with 421 4.5.0 as Exim's synchronization check does (README);
    # Dovecot runs the lines as commands.
    Difference("input behind a refused DATA", _earlyData, diverges=True),
    # RFC 5321 section 4.1.1.4: only CRLF "." CRLF ends the data.  Dovecot
    # also ends it at LF "." CRLF (SMTP smuggling: what follows runs as
    # commands); mailgate stores that dot line as text and reads on to the
    # real end (README).
    Difference("a dot after a bare LF", _dotAfterBareLF, diverges=True),
    # RFC 5321 section 6.1 (and 4.5.4.1's duplicate deliveries): the same
    # octets from the same sender again, with a Message-ID, within a day,
    # is a client's retry after a lost 250; mailgate answers 250 without
    # a second copy (README), Dovecot stores each.
    Difference("a retry is stored once", _retry),
    # RFC 3030 section 2: a BDAT line is "BDAT" SP chunk-size [SP "LAST"];
    # the size says where the chunk ends and the next command begins, and
    # no RFC says how to find that command after a line without one.
    # mailgate answers 501 5.5.4 and closes the connection (README);
    # Dovecot answers 501 and goes on, dropping as many octets as a size
    # it could read says (BDAT 5 LASTLY), otherwise taking what follows
    # for commands (diverges).
    Difference("a malformed BDAT closes the connection", _malformedBDAT, diverges=True),
    # RFC 1870: a message over the server's fixed maximum size is refused
    # with 552; RFC 3030 section 2: a chunk's size comes before its
    # octets.  A single chunk over mailgate's --max-message-size is
    # refused at its command line and the connection closed, rather than
    # read whole only to be dropped (README); Dovecot's LMTP has no size
    # limit and stores the message (diverges).
    Difference("a chunk over the size limit closes the connection", _chunkOverLimit, diverges=True),
    # RFC 3030 says nothing of RCPT between a message's chunks.  mailgate
    # writes the message's trace fields at its first chunk (Received:
    # names its recipient when it has one), so a recipient added after it
    # would get a copy naming another's address: 503 5.5.1 (README).
    # Dovecot takes the recipient (diverges: its message has one
    # recipient more).
    Difference("a recipient between chunks", _recipientBetweenChunks, diverges=True),
)


# -- the servers -------------------------------------------------------------


@attr.s
class Servers:
    dovecot = attr.ib()
    mailgate = attr.ib()
    runs = attr.ib(default=0)

    def nextRun(self):
        self.runs += 1
        return self.runs


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lmtp-vs-dovecot")
    dovecot = PrivateDovecot()
    mailgate = None
    try:
        dovecot.addUsers(list(USERS), PASSWORD)
        dovecot.start()
        url = databaseURL(directory / "mail.sqlite3")
        store = memoryStore(url)
        try:
            for user in USERS:
                addUser(store, user, PASSWORD)
        finally:
            store.close()
        options = [
            "--lmtp", "tcp:0:interface=127.0.0.1", "--smtp", "tcp:0:interface=127.0.0.1",
            "--domain", DOMAIN, "--auth-failure-delay", "0",
            # The sequences compare replies, not when they come: SMTP's
            # errors past the soft limit would each wait a second (LMTP's
            # never do), ten seconds of "many bad commands" a comparison.
            "--smtp-error-sleep-time", "0",
            # Dovecot's default recipient_delimiter.
            "--recipient-delimiter", "+",
            "--max-message-size", str(MAX_MESSAGE_SIZE),
        ]
        mailgate = ServerProcess(url, options, cwd=directory)
        mailgate.start()
        yield Servers(dovecot, mailgate)
    finally:
        if mailgate is not None:
            mailgate.stop()
        dovecot.cleanup()
    assert not _LOGGED_ERROR.search(mailgate.stdout + mailgate.stderr), mailgate.log()


def compare(servers, steps, seen=None, smtp=True):
    """
    The differences L{DIFFERENCES} does not explain, in one sequence: over
    LMTP, then (C{smtp}) over mailgate's SMTP, up to the first message's
    data.

    @param seen: a set to which the names of the differences that
        explained something are added.
    """
    runId = servers.nextRun()
    dovecot = run(servers.dovecot.lmtpPort, steps, runId)
    mailgate = run(servers.mailgate.portOf("LMTP"), steps, runId)
    problems = []
    if (dovecot.greeting.kind, mailgate.greeting.kind) != ("2xx", "2xx"):
        problems.append(("greeting", dovecot.greeting, mailgate.greeting))
    diverged = comparedExchanges(dovecot, mailgate, problems, seen)
    if dovecot.delivered or mailgate.delivered:
        stored = {"dovecot": maildrops(servers.dovecot.pop3Port), "mailgate": maildrops(servers.mailgate.port)}
        if not diverged:
            for user in USERS:
                ex = Exchange(("maildrop", user), stored["dovecot"][user], stored["mailgate"][user])
                if ex.dovecot != ex.mailgate:
                    explain(ex, problems, seen)
    if smtp:
        viaSMTP = run(servers.mailgate.portOf("SMTP"), steps, runId, lmtp=False)
        comparedExchanges(dovecot, viaSMTP, problems, seen, smtp=True)
        if viaSMTP.delivered:
            maildrops(servers.mailgate.port)
    return problems


def comparedExchanges(dovecot, mailgate, problems, seen, smtp=False):
    """
    Compare the exchanges of two runs, adding the unexplained differences
    to C{problems}; whether the runs diverged (a difference that leaves
    the sessions in different states).
    """
    previous = (None, None, None)
    for (command, d), (same, m) in zip(dovecot.exchanges, mailgate.exchanges):
        assert command == same
        if smtp and isinstance(m, list):
            # Past the data, SMTP's one reply and LMTP's per recipient
            # are not the same answer.
            return True
        ex = Exchange(command, d, m, *previous, smtp=smtp)
        previous = (command, d, m)
        if differs(d, m):
            if explain(ex, problems, seen):
                return True
    if len(dovecot.exchanges) != len(mailgate.exchanges):
        problems.append(("one session ended early", dovecot.exchanges[-1:], mailgate.exchanges[-1:]))
    return False


def explain(ex, problems, seen):
    """
    Add C{ex} to C{problems} unless a documented difference explains it;
    whether the sessions diverged.
    """
    explained = [d for d in DIFFERENCES if d.explains(ex)]
    if not explained:
        problems.append(("smtp" if ex.smtp else "lmtp", ex.command, ex.dovecot, ex.mailgate))
    if seen is not None:
        seen.update(d.name for d in explained)
    return any(d.diverges for d in explained) or not explained


# -- the sequences -----------------------------------------------------------

#: A message with every awkward line: dots to stuff, a lone dot inside,
#: 8-bit text, an empty line, a long line.
AWKWARD = (
    b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n"
    b"\xc3\xa9t\xc3\xa9 \xff\x80\r\n\r\n" + b"x" * 2000 + b"\r\n"
)

#: A message with a Message-ID, sent twice in a sequence (a client's retry).
RETRIED_TEXT = b"Message-ID: <@ID@.retry@client.test>\r\nSubject: again\r\n\r\nsame\r\n"
RETRIED = message(RETRIED_TEXT)

#: A chunk's text made of commands: run as commands, it would send a
#: message of its own (and each line would get a reply).
COMMANDS_AS_DATA = (
    b"MAIL FROM:<smuggler@example.net>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nNOOP\r\n"
)

#: Lines that begin with dots: in a chunk they are the message's own,
#: never dot-stuffed (RFC 3030 section 2), a lone dot no end.
DOT_LINES = b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n.\r\n"

#: A message over mailgate's size limit, in lines of 80 octets.
TOO_LARGE = b"Subject: too large\r\n\r\n" + (b"z" * 78 + b"\r\n") * (MAX_MESSAGE_SIZE // 80 + 1)

SEQUENCES = {
    "one message": delivery(ALICE),
    "three recipients": delivery(ALICE, BOB, CAROL),
    "unknown recipients among known ones": delivery(NOBODY, ALICE, "nobody2@example.org", BOB),
    "only unknown recipients": envelope(NOBODY) + lines("DATA", "RSET", "NOOP"),
    "the same recipient twice": delivery(ALICE, ALICE),
    "a recipient in capitals": delivery(ALICE.upper()),
    "another domain": delivery("alice@example.net", ALICE),
    "awkward text": delivery(ALICE, data=message(AWKWARD)),
    "the empty message": delivery(ALICE, data=Message(b".\r\n")),
    "dot-stuffed first line": delivery(ALICE, data=Message(b"..first\r\nX-Run: @ID@\r\n\r\nbody\r\n.\r\n")),
    "no header": delivery(ALICE, data=Message(b"X-Run: @ID@\r\nno separator, no body\r\n.\r\n")),
    "bare LF in the data": delivery(ALICE, data=message(b"Subject: bare\r\n\r\nbare LF\nhere\r\nnext\r\n")),
    "bare CR in the data": delivery(ALICE, data=message(b"Subject: bare\r\n\r\nbare CR\rhere\r\nCRCRLF\r\r\n")),
    "a bare CR before the end of the data": delivery(ALICE, data=Message(b"X-Run: @ID@\r\n\r\nlast\r\r\n.\r\n")),
    "a last line without its own line end": delivery(ALICE, data=Message(b"X-Run: @ID@\r\n\r\nlast.\r\n.\r\n")),
    "the data and QUIT in one write": envelope(ALICE) + lines("DATA")
    + [Message(b"X-Run: @ID@\r\n\r\nbody\r\n.\r\nQUIT\r\n"), *lines("NOOP")],
    "NUL in the data": delivery(ALICE, data=message(b"Subject: nul\r\n\r\na\0b\r\n")),
    "a dot next to a bare LF": delivery(ALICE, data=message(b"Subject: x\r\n\r\nline\n.\nafter\r\n")),
    "LF dot LF in the data": delivery(ALICE, data=message(b"Subject: x\r\n\r\nline\n.\r\nafter\r\n")),
    "a message of LF lines": delivery(ALICE, data=Message(b"X-Run: @ID@\nSubject: lf\n\nbody\r\n.\r\n")),
    "a long line in the data": delivery(ALICE, data=message(b"Subject: long\r\n\r\n" + b"y" * 20000 + b"\r\n")),
    "two messages in one session": delivery(ALICE) + lines("MAIL FROM:<>", f"RCPT TO:<{BOB}>", "DATA")
    + [message(b"Subject: second\r\n\r\nsecond\r\n")],
    "LHLO forms": lines("LHLO", "LHLO client.test", "LHLO client.test ", "LHLO [127.0.0.1]", "LHLO [IPv6:::1]",
                        "LHLO 127.0.0.1", "LHLO client_test", "lhlo client.test", "NOOP"),
    "LHLO with two spaces": lines("LHLO  client.test", "NOOP"),
    "LHLO with two words": lines("LHLO two words", "NOOP"),
    "a space before LHLO": lines(" LHLO client.test", "NOOP"),
    "HELO and EHLO": lines("HELO client.test", "EHLO client.test", "NOOP", "LHLO client.test", "NOOP"),
    "MAIL before LHLO": lines("MAIL FROM:<a@example.net>", "RCPT TO:<alice@example.org>", "DATA", "NOOP"),
    "RCPT before MAIL": HELLO + lines(f"RCPT TO:<{ALICE}>", "DATA", "NOOP"),
    "DATA without RCPT": HELLO + lines("MAIL FROM:<a@example.net>", "DATA", "NOOP"),
    "DATA without MAIL": HELLO + lines("DATA", "NOOP"),
    "MAIL twice": HELLO + lines("MAIL FROM:<a@example.net>", "MAIL FROM:<b@example.net>", f"RCPT TO:<{ALICE}>",
                                "DATA") + [message()],
    "DATA with an argument": envelope(ALICE) + lines("DATA x", "RSET", "NOOP"),
    "a sender with dots out of place": HELLO + lines("MAIL FROM:<taro..yamada.@docomo.example>", f"RCPT TO:<{ALICE}>",
                                                     "DATA") + [message()],
    "the null sender": HELLO + lines("MAIL FROM:<>", f"RCPT TO:<{ALICE}>", "DATA") + [message()],
    "recipient forms": envelope(ALICE) + lines("RCPT TO <alice@example.org>", "RCPT", "RCPT FROM:<alice@example.org>",
                                               "DATA") + [message()],
    "UTF-8 addresses without SMTPUTF8": HELLO + lines(
        "MAIL FROM:<j\u00f6rg@example.net>", "MAIL FROM:<a@example.net>", "RCPT TO:<\u00e4lice@example.org>",
        "RCPT TO:<alice@ex\u00e4mple.org>", f"RCPT TO:<{ALICE}>", "DATA",
    ) + [message()],
    "UTF-8 addresses with SMTPUTF8": HELLO + lines(
        "MAIL FROM:<j\u00f6rg@example.net> SMTPUTF8", "RCPT TO:<\u00e4lice@example.org>", f"RCPT TO:<{ALICE}>",
        "DATA",
    ) + [message("Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9\r\n".encode())],
    "RSET in every state": lines("RSET") + HELLO + lines("RSET", "MAIL FROM:<a@example.net>", "RSET",
                                                         f"RCPT TO:<{ALICE}>", "MAIL FROM:<a@example.net>",
                                                         f"RCPT TO:<{ALICE}>", "RSET", "DATA", "RSET x", "NOOP"),
    "NOOP in every state": lines("NOOP") + HELLO + lines("NOOP", "MAIL FROM:<a@example.net>", "NOOP",
                                                         f"RCPT TO:<{ALICE}>", "NOOP x", "DATA")
    + [message(), *lines("NOOP")],
    "VRFY and HELP in every state": lines("VRFY alice", "HELP") + HELLO + lines(
        "VRFY", f"VRFY {ALICE}", "VRFY nobody", "HELP", "HELP MAIL", "MAIL FROM:<a@example.net>", "VRFY alice",
        "HELP", f"RCPT TO:<{ALICE}>", "VRFY alice", "HELP", "EXPN list", "DATA",
    ) + [message()],
    "QUIT before LHLO": lines("QUIT", "NOOP"),
    "QUIT after LHLO": HELLO + lines("QUIT", "NOOP"),
    "QUIT after MAIL": HELLO + lines("MAIL FROM:<a@example.net>", "QUIT", "NOOP"),
    "QUIT after RCPT": envelope(ALICE) + lines("QUIT", "NOOP"),
    "QUIT after a message": delivery(ALICE) + lines("QUIT", "NOOP"),
    "QUIT with an argument": HELLO + lines("QUIT x", "NOOP"),
    "unknown commands": HELLO + lines("XYZZY", "STARTTLS", "AUTH PLAIN", "TURN", "ETRN x", "", " ", "NOOP"),
    "case": lines("lhlo client.test", "mail from:<a@example.net>", f"rcpt to:<{ALICE}>", "data")
    + [message(), *lines("quit")],
    "spaces": HELLO + lines(" NOOP", "NOOP ", "NOOP\t", "RSET ", "MAIL FROM:<a@example.net>\t", "NOOP"),
    "an over-long line": HELLO + lines("NOOP " + "x" * 600, "NOOP", "MAIL FROM:<" + "a" * 600 + "@example.net>",
                                       "RSET", "NOOP"),
    "a line past Dovecot's buffer": HELLO + lines("NOOP " + "x" * 10000, "NOOP"),
    "a long recipient": HELLO + lines("MAIL FROM:<a@example.net>", "RCPT TO:<" + "a" * 300 + "@example.org>",
                                      f"RCPT TO:<{ALICE}>", "DATA") + [message()],
    "NUL in commands": HELLO + lines("NO\0OP", "NOOP\0", "MAIL FROM:<a\0@example.net>", "NOOP"),
    "bare line ends in commands": HELLO + [b"NOOP\n", b"MAIL FROM:<a@example.net>\n", b"RSET\rNOOP\r\n",
                                           b"NOOP\r\n"],
    "8-bit in a command": HELLO + [b"NOOP \xe9\r\n", b"MAIL FROM:<\xff@example.net>\r\n", b"NOOP\r\n"],
    "pipelined": HELLO + [batch("MAIL FROM:<a@example.net>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{NOBODY}>",
                                f"RCPT TO:<{BOB}>", "DATA"), message(), batch("RSET", "NOOP", "QUIT")],
    "pipelined from LHLO": [batch("LHLO client.test", "MAIL FROM:<>", f"RCPT TO:<{CAROL}>", "DATA"), message()],
    "pipelined with errors": HELLO + [batch("MAIL FROM:<a@example.net>", "MAIL FROM:<b@example.net>",
                                            "RCPT TO:<bad", f"RCPT TO:<{NOBODY}>", f"RCPT TO:<{ALICE}>", "XYZZY",
                                            "DATA"), message()],
    "pipelined, every recipient refused": HELLO + [batch("MAIL FROM:<a@example.net>", f"RCPT TO:<{NOBODY}>",
                                                         "DATA", "NOOP")],
    "two transactions pipelined": HELLO + [batch("MAIL FROM:<a@example.net>", f"RCPT TO:<{ALICE}>", "DATA"),
                                           message(), batch("MAIL FROM:<b@example.net>", f"RCPT TO:<{BOB}>",
                                                            "DATA"), message(b"Subject: two\r\n\r\n2\r\n")],
    "a retry of the same message": delivery(ALICE, data=RETRIED)
    + lines("MAIL FROM:<sender@example.net>", f"RCPT TO:<{ALICE}>", "DATA") + [RETRIED],
    "BDAT, one chunk": envelope(ALICE) + chunks(),
    "BDAT, cut between CR and LF": envelope(ALICE) + chunks(b"Subject: cut\r", b"\n\r\nbody\r", b"\nend\r\n"),
    "BDAT, cut before a dot line": envelope(ALICE) + chunks(b"Subject: dot\r\n\r\nbody\r\n", b".\r\n",
                                                           b".dot\r\n", b"..dots\r\n"),
    "BDAT, cut mid-line": envelope(ALICE) + chunks(b"Subj", b"ect: mid-line\r\n\r\nhalf a", b" line\r\n"),
    "BDAT, chunks of one octet pipelined": envelope(ALICE)
    + [tuple(chunks(b"S", *(bytes([octet]) for octet in b"ubject: tiny\r\n\r\n.a\r\nb\nc\r\r\n")))],
    "BDAT 0 LAST after chunks": envelope(ALICE) + chunks(b"Subject: zero\r\n", b"\r\nbody\r\n", b""),
    "BDAT, the empty message": envelope(ALICE) + [Chunk(b"", last=True)],
    "BDAT, a whole transaction in one write": [(
        *batch("LHLO client.test", "MAIL FROM:<a@example.net>", f"RCPT TO:<{ALICE}>", f"RCPT TO:<{NOBODY}>",
               f"RCPT TO:<{BOB}>"),
        *chunks(b"Subject: pipelined\r\n\r\n", b"body\r\n"),
        *batch("QUIT"),
    )],
    "BDAT, two messages in one write": envelope(ALICE) + [(
        *chunks(b"Subject: first\r\n\r\n1\r\n"), *batch("MAIL FROM:<>", f"RCPT TO:<{BOB}>"),
        *chunks(b"Subject: second\r\n\r\n2\r\n"),
    )],
    "BDAT, bare LF": envelope(ALICE) + chunks(b"Subject: bare\n\nbare LF\nhere\r\nlast\n"),
    "BDAT, bare CR": envelope(ALICE) + chunks(b"Subject: bare\r\n\r\nbare CR\rhere\r\nCRCRLF\r\r\n"),
    "BDAT, no final line end": envelope(ALICE) + chunks(b"Subject: no end\r\n\r\nlast line"),
    "BDAT, no final line end before BDAT 0 LAST": envelope(ALICE) + chunks(b"Subject: no end\r\n\r\nlast", b""),
    "BDAT, a lone CR at the end": envelope(ALICE) + chunks(b"Subject: cr\r\n\r\nlast\r"),
    "BDAT, lines starting with a dot": envelope(ALICE) + chunks(DOT_LINES),
    "BDAT, awkward text as sent": envelope(ALICE, BOB) + chunks(AWKWARD[:40], AWKWARD[40:]),
    "BDAT, unknown recipients among known ones": envelope(NOBODY, ALICE, "nobody2@example.org", BOB)
    + chunks(b"Subject: some\r\n\r\n", b"body\r\n"),
    "BDAT before MAIL": HELLO + [Chunk(COMMANDS_AS_DATA), *lines("NOOP"), Chunk(COMMANDS_AS_DATA, last=True),
                                 *lines("BDAT 0 LAST", "NOOP", "RSET", "MAIL FROM:<a@example.net>",
                                        f"RCPT TO:<{ALICE}>"), *chunks()],
    "BDAT before any accepted RCPT": HELLO + lines("MAIL FROM:<a@example.net>", f"RCPT TO:<{NOBODY}>") + [
        Chunk(COMMANDS_AS_DATA), *lines("NOOP"), Chunk(COMMANDS_AS_DATA, last=True),
        *lines("NOOP", "RSET", "MAIL FROM:<a@example.net>", f"RCPT TO:<{ALICE}>"), *chunks(),
    ],
    "BDAT pipelined behind a refused RCPT": HELLO + [(
        *batch("MAIL FROM:<a@example.net>", f"RCPT TO:<{NOBODY}>"), Chunk(COMMANDS_AS_DATA),
        Chunk(COMMANDS_AS_DATA, last=True), *batch("RSET", "NOOP"),
    )],
    "a recipient after a refused chunk": HELLO + lines("MAIL FROM:<a@example.net>", f"RCPT TO:<{NOBODY}>")
    + [Chunk(b"X-Run: @ID@\r\nSubject: first part\r\n"), *lines(f"RCPT TO:<{ALICE}>"),
       Chunk(b"\r\nsecond part\r\n", last=True)],
    "DATA after BDAT": envelope(ALICE) + [Chunk(b"X-Run: @ID@\r\nSubject: mixed\r\n\r\n")]
    + lines("DATA", "RSET", "MAIL FROM:<a@example.net>", f"RCPT TO:<{BOB}>") + chunks(),
    "RSET between chunks": envelope(ALICE) + [Chunk(b"X-Run: @ID@\r\nSubject: abandoned\r\n")]
    + lines("RSET", "MAIL FROM:<a@example.net>", f"RCPT TO:<{BOB}>") + chunks(b"Subject: after RSET\r\n\r\nb\r\n"),
    "a retry by BDAT of a message sent by DATA": delivery(ALICE, data=RETRIED)
    + lines("MAIL FROM:<sender@example.net>", f"RCPT TO:<{ALICE}>") + chunks(RETRIED_TEXT),
    "BDAT over the size limit": envelope(ALICE) + chunks(TOO_LARGE) + lines("NOOP"),
    "BDAT over the size limit, two recipients": envelope(ALICE, BOB) + chunks(TOO_LARGE) + lines("NOOP"),
    "a recipient between chunks": envelope(ALICE) + [Chunk(b"X-Run: @ID@\r\nSubject: first part\r\n")]
    + lines(f"RCPT TO:<{BOB}>") + [Chunk(b"\r\nsecond part\r\n", last=True)],
    "many bad commands": HELLO + lines(*(["XYZZY"] * 25), "NOOP"),
    "many unknown recipients": HELLO + lines("MAIL FROM:<a@example.net>",
                                             *(f"RCPT TO:<nobody{n}@example.org>" for n in range(25)),
                                             f"RCPT TO:<{ALICE}>", "DATA") + [message()],
}

#: MAIL FROM's forms, each in a sequence of its own: one that leaves the
#: two servers in different states (a sender one takes and the other
#: refuses) ends the comparison of its sequence.
SENDER_FORMS = (
    "MAIL FROM:<a@example.net>", "MAIL FROM: <a@example.net>", "MAIL FROM:a@example.net",
    "MAIL FROM:<a@example.net", "MAIL FROM:a@example.net>", "MAIL FROM:<>", "MAIL FROM:",
    "MAIL FROM", "MAIL", "MAIL TO:<a@example.net>", "mail from:<a@example.net>",
    "MAIL FROM:<@relay.example:a@example.net>", "MAIL FROM:<@r1.example,@r2.example:a@example.net>",
    'MAIL FROM:<"a b"@example.net>', 'MAIL FROM:<"a\\"b"@example.net>', "MAIL FROM:<a@b@example.net>",
    "MAIL FROM:<a>", "MAIL FROM:<@example.net>", "MAIL FROM:<a@>", "MAIL FROM:<a@[192.0.2.1]>",
    "MAIL FROM:<a@[IPv6:2001:db8::1]>", "MAIL FROM:<a@[300.0.0.1]>", "MAIL FROM:<a..b@example.net>",
    "MAIL FROM:<a @example.net>", "MAIL FROM:<a@example.net> ", "MAIL  FROM:<a@example.net>",
    "MAIL FROM:<a@example.net><b@example.net>", "MAIL FROM:<postmaster>",
    "MAIL FROM:<a.@example.net>", "MAIL FROM:<.a@example.net>",
)

SENDER_PARAMETERS = (
    "MAIL FROM:<a@example.net> SIZE=1000", "MAIL FROM:<a@example.net> SIZE=", "MAIL FROM:<a@example.net> SIZE",
    "MAIL FROM:<a@example.net> SIZE=x", "MAIL FROM:<a@example.net> SIZE=-1",
    "MAIL FROM:<a@example.net> SIZE=99999999999999", "MAIL FROM:<a@example.net> SIZE=99999999999999999999999",
    "MAIL FROM:<a@example.net> BODY=8BITMIME", "MAIL FROM:<a@example.net> BODY=7BIT",
    "MAIL FROM:<a@example.net> body=8bitmime", "MAIL FROM:<a@example.net> BODY=BINARYMIME",
    "MAIL FROM:<a@example.net> BODY=FOO", "MAIL FROM:<a@example.net> BODY",
    "MAIL FROM:<a@example.net> SMTPUTF8", "MAIL FROM:<a@example.net> SMTPUTF8=yes",
    "MAIL FROM:<a@example.net> XFOO=bar", "MAIL FROM:<a@example.net> XFOO",
    "MAIL FROM:<a@example.net> RET=HDRS", "MAIL FROM:<a@example.net> ENVID=x",
    "MAIL FROM:<a@example.net> AUTH=<>", "MAIL FROM:<a@example.net> SIZE=10 SIZE=20",
    "MAIL FROM:<a@example.net>  SIZE=10", "MAIL FROM:<a@example.net>SIZE=10",
    "MAIL FROM:<a@example.net> =x", "MAIL FROM:<a@example.net> SIZE=1 BODY=8BITMIME SMTPUTF8",
)

RECIPIENT_FORMS = (
    f"<{ALICE}>", f" <{ALICE}>", ALICE, f"<{ALICE}", f"{ALICE}>", "<>", "", "<alice>",
    f"<@relay.example:{ALICE}>", '<"alice"@example.org>', '<"al ice"@example.org>',
    '<"bob"@example.org>', "<ALICE@EXAMPLE.ORG>", "<alice@Example.Org>", f"<{ALICE}> ",
    "<postmaster>", "<Postmaster>", "<postmaster@example.org>", "<alice@[127.0.0.1]>",
    f"<{ALICE}> NOTIFY=NEVER", f"<{ALICE}> XFOO", f"<{ALICE}> ORCPT=rfc822;{ALICE}",
    "<alice+tag@example.org>", "<alice@example.org.>", "<" + "a" * 65 + "@example.org>",
)

#: BDAT lines that are not C{"BDAT" SP chunk-size [SP "LAST"]} (RFC 3030
#: section 2), each with the octets a client would send after it.
MALFORMED_BDAT = (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 LASTLY\r\nHello", b"BDAT -1\r\n", b"BDAT 1.5\r\nx")

SEQUENCES.update({f"sender {form}": HELLO + lines(form, "RSET", "NOOP") for form in SENDER_FORMS + SENDER_PARAMETERS})
SEQUENCES.update({
    f"recipient {form}": HELLO + lines("MAIL FROM:<a@example.net>", f"RCPT TO:{form}", f"RCPT TO:<{BOB}>", "DATA")
    + [message()]
    for form in RECIPIENT_FORMS
})
SEQUENCES.update({
    "malformed " + form.partition(b"\r")[0].decode(): envelope(ALICE) + lines(form, "NOOP", "RSET")
    for form in MALFORMED_BDAT
})


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_fixedSequences(servers, name):
    fail(compare(servers, SEQUENCES[name]))


# -- the random mix ----------------------------------------------------------

#: Random sequences per run, and their most steps; with the seed, the same
#: sequences every run.
RANDOM_SEQUENCES = 120
RANDOM_STEPS = 10
SEED = 2033


#: Message texts the random mix picks from.
RANDOM_TEXTS = (
    b"Subject: random\r\n\r\n.dot\r\nline\r\n",
    b"Subject: random\r\n\r\n..\r\n...\r\n",
    b"Subject: bare\r\n\r\nbare LF\nbare CR\rend\r\n",
    b"Subject: long\r\n\r\n" + b"z" * 3000 + b"\r\n",
    b"\r\nno header\r\n",
    b"",
)


def randomCommand(rng):
    """
    One command line: most of them well-formed, some in odd case or with
    odd arguments.
    """
    recipient = rng.choice([ALICE, BOB, CAROL, NOBODY, "x@example.net", ALICE.upper(), "bob+tag@example.org"])
    command = rng.choice([
        "LHLO client.test", "MAIL FROM:<a@example.net>", "MAIL FROM:<>", f"RCPT TO:<{recipient}>",
        f"RCPT TO:<{recipient}>", "DATA", "RSET", "NOOP", "VRFY alice", "XYZZY", "QUIT x",
        "MAIL FROM:<a@example.net> BODY=8BITMIME", "MAIL FROM:<a@example.net> BODY=7BIT",
        "MAIL FROM:a@example.net", f"RCPT TO:{recipient}", "MAIL FROM:<a@example.net> FOO=1", "",
        "RCPT TO:<>", "DATA x", "LHLO",
    ])
    if rng.random() < 0.1:
        command = command.lower()
    return command


def randomTransaction(rng):
    """
    The commands of one transaction (MAIL, RCPTs, DATA), some dropped,
    some random ones put in among them.
    """
    recipients = [rng.choice([ALICE, BOB, CAROL, NOBODY, "bob+tag@example.org"]) for _ in range(rng.randint(1, 3))]
    commands = [rng.choice(["MAIL FROM:<a@example.net>", "MAIL FROM:<>", "MAIL FROM:<a@example.net> BODY=8BITMIME"])]
    commands += [f"RCPT TO:<{r}>" for r in recipients] + ["DATA"]
    if rng.random() < 0.2:
        del commands[rng.randrange(len(commands))]
    for _ in range(rng.choice([0, 0, 1, 2])):
        commands.insert(rng.randrange(len(commands) + 1), randomCommand(rng))
    return commands


def randomSequence(rng):
    steps = []
    if rng.random() < 0.9:
        steps += HELLO
    for _ in range(rng.randint(1, RANDOM_STEPS // 4)):
        commands = randomTransaction(rng) if rng.random() < 0.8 else [
            randomCommand(rng) for _ in range(rng.randint(1, RANDOM_STEPS))
        ]
        if rng.random() < 0.4:
            # Pipelined up to a DATA, the last of its group (RFC 2920).
            group = []
            for command in commands:
                group.append(command)
                if verbOf(command.encode()) == b"DATA":
                    steps.append(batch(*group))
                    steps.append(message(rng.choice(RANDOM_TEXTS)))
                    group = []
            if group:
                steps.append(batch(*group))
        else:
            for command in commands:
                steps += lines(command)
                if verbOf(command.encode()) == b"DATA":
                    steps.append(message(rng.choice(RANDOM_TEXTS)))
    if rng.random() < 0.5:
        steps += lines("QUIT")
    return steps


def test_randomSequences(servers):
    rng = random.Random(SEED)
    problems = []
    for _ in range(RANDOM_SEQUENCES):
        steps = randomSequence(rng)
        problems += [(steps, problem) for problem in compare(servers, steps)]
    fail(problems)


#: A fixed sequence that shows each documented difference (or several:
#: each of them shows it).
EXHIBITS = {
    "HELO and EHLO over SMTP": "HELO and EHLO",
    "MAIL before LHLO": "MAIL before LHLO",
    "a non-ASCII address without SMTPUTF8 over SMTP": "UTF-8 addresses without SMTPUTF8",
    "parameters of extensions Dovecot does not offer": "sender MAIL FROM:<a@example.net> SIZE=1000",
    "extra spaces": "LHLO with two spaces",
    "a TAB after the path": "spaces",
    "LHLO with more than a host name": "LHLO with two words",
    "a command line over 512 octets": "an over-long line",
    "a sender address RFC 5321 does not allow": "sender MAIL FROM:<a@b@example.net>",
    "RCPT parameters neither announces": f"recipient <{ALICE}> ORCPT=rfc822;{ALICE}",
    "a domain with its root dot": "recipient <alice@example.org.>",
    "VRFY with a mailbox": "VRFY and HELP in every state",
    "HELP": "VRFY and HELP in every state",
    "too many bad commands": "many bad commands",
    "refused recipients close an SMTP session": "many unknown recipients",
    "input behind a refused DATA": "pipelined, every recipient refused",
    "a dot after a bare LF": "a dot next to a bare LF",
    "a retry is stored once": ("a retry of the same message", "a retry by BDAT of a message sent by DATA"),
    "a malformed BDAT closes the connection": "malformed BDAT 5 LASTLY",
    "a chunk over the size limit closes the connection": (
        "BDAT over the size limit", "BDAT over the size limit, two recipients",
    ),
    "a recipient between chunks": "a recipient between chunks",
}


def test_everyDocumentedDifferenceStillHappens(servers):
    """
    Each entry of L{DIFFERENCES} explains something in the sequence that
    shows it: an entry a new Dovecot (or a mailgate change) made pointless
    is removed, not left to explain away a future difference.
    """
    assert set(EXHIBITS) == {d.name for d in DIFFERENCES}
    for name, sequences in EXHIBITS.items():
        for sequence in (sequences,) if isinstance(sequences, str) else sequences:
            seen = set()
            assert compare(servers, SEQUENCES[sequence], seen) == []
            assert name in seen, (name, sequence)


def test_chunksAreStoredAsSent(servers):
    """
    What the comparison of chunked messages rests on: each server stores
    the octets of the chunks as sent, lines that begin with dots kept as
    they are (no dot-stuffing in BDAT, RFC 3030 section 2), wherever the
    chunks were cut.
    """
    runId = servers.nextRun()
    sent = b"X-Run: %d\r\n" % runId + DOT_LINES
    steps = envelope(ALICE) + chunks(DOT_LINES[:17], DOT_LINES[17:30], DOT_LINES[30:])
    for name, lmtpPort, pop3Port in (
        ("dovecot", servers.dovecot.lmtpPort, servers.dovecot.pop3Port),
        ("mailgate", servers.mailgate.portOf("LMTP"), servers.mailgate.port),
    ):
        result = run(lmtpPort, steps, runId)
        assert [view(reply) for _, reply in result.exchanges][-3:] == ["2xx", "2xx", ["2xx"]], (name, result)
        assert maildrops(pop3Port) == {ALICE: [sent], BOB: [], CAROL: []}, name


def test_refusedChunksAreNotRunAsCommands(servers):
    """
    What the comparison of refused chunks rests on: neither server runs
    the octets of a chunk it refused (before MAIL, before any accepted
    recipient) as commands.  Each chunk gets one reply and each command
    its own (the exact codes: run as commands, the chunks' lines would
    answer the commands after them), and the message their text would
    send does not arrive.
    """
    runId = servers.nextRun()
    steps = HELLO + [Chunk(COMMANDS_AS_DATA), *lines("NOOP", "MAIL FROM:<a@example.net>", f"RCPT TO:<{NOBODY}>"),
                     Chunk(COMMANDS_AS_DATA, last=True), *lines("NOOP", "QUIT")]
    for name, lmtpPort, pop3Port in (
        ("dovecot", servers.dovecot.lmtpPort, servers.dovecot.pop3Port),
        ("mailgate", servers.mailgate.portOf("LMTP"), servers.mailgate.port),
    ):
        result = run(lmtpPort, steps, runId)
        codes = [reply.code for _, reply in result.exchanges]
        assert codes == ["250", "503", "250", "250", "550", "503", "250", "221"], (name, result)
        assert maildrops(pop3Port) == {ALICE: [], BOB: [], CAROL: []}, name


def test_deliveredMessagesAreReadBack(servers):
    """
    What the maildrop comparison rests on: a message both accepted is
    read back from both, trace fields taken off, as the client's data
    unstuffed; and each server did add its trace fields.
    """
    runId = servers.nextRun()
    steps = delivery(ALICE, BOB, data=message(AWKWARD))
    sent = b"X-Run: %d\r\n" % runId + AWKWARD.replace(b"\r\n..", b"\r\n.")
    for name, lmtpPort, pop3Port in (
        ("dovecot", servers.dovecot.lmtpPort, servers.dovecot.pop3Port),
        ("mailgate", servers.mailgate.portOf("LMTP"), servers.mailgate.port),
    ):
        result = run(lmtpPort, steps, runId)
        assert [view(reply) for _, reply in result.exchanges][-1] == ["2xx", "2xx"], (name, result)
        raw = {user: POP3(pop3Port, user).drain() for user in USERS}
        assert [withoutTrace(m) for m in raw[ALICE]] == [sent], name
        assert [withoutTrace(m) for m in raw[BOB]] == [sent], name
        assert raw[CAROL] == [], name
        assert raw[ALICE][0].lower().startswith(b"return-path: <sender@example.net>"), name


def traceFieldsOf(stored):
    """
    The fields a server put at the top of a stored message, each unfolded
    as C{(lower-cased name, value)}: those of L{TRACE_FIELDS}, in order.
    """
    fields = []
    while stored[:20].lower().startswith(TRACE_FIELDS):
        end = stored.find(b"\n")
        while end >= 0 and stored[end + 1:end + 2] in (b" ", b"\t"):
            end = stored.find(b"\n", end + 1)
        field, stored = stored[:end + 1], stored[end + 1:]
        name, _, value = field.partition(b":")
        fields.append((name.lower(), value))
    return fields


def _topFields(servers, recipients, users):
    """
    Deliver one message to C{recipients} over each server's LMTP and read
    it back by POP3 from each of C{users}: server name to user to the
    trace fields at its top (L{traceFieldsOf}).
    """
    runId = servers.nextRun()
    steps = delivery(*recipients)
    tops = {}
    for name, lmtpPort, pop3Port in (
        ("dovecot", servers.dovecot.lmtpPort, servers.dovecot.pop3Port),
        ("mailgate", servers.mailgate.portOf("LMTP"), servers.mailgate.port),
    ):
        result = run(lmtpPort, steps, runId)
        assert [view(reply) for _, reply in result.exchanges][-1] == ["2xx"] * len(recipients), (name, result)
        raw = {user: POP3(pop3Port, user).drain() for user in users}
        assert all(len(messages) == 1 for messages in raw.values()), (name, raw)
        tops[name] = {user: traceFieldsOf(messages[0]) for user, messages in raw.items()}
    return tops


def test_eachCopyNamesItsRecipientAsDovecotsDoes(servers):
    """
    Dovecot's LMTP (lmtp_hdr_delivery_address = final, its default) puts a
    Delivered-To: field into the copy of a message for one recipient,
    naming the recipient as the client named it at RCPT (with its
    +detail), bare, after Return-Path: and before Received:; mailgate's
    --delivered-to final (its default) writes the same field, octet for
    octet, in the same place.
    """
    for named, user in (("alice+lists@example.org", ALICE), (BOB, BOB)):
        tops = _topFields(servers, [named], [user])
        dovecot, mailgate = tops["dovecot"][user], tops["mailgate"][user]
        assert [f for f, _ in dovecot] == [b"return-path", b"delivered-to", b"received"], dovecot
        assert [f for f, _ in mailgate] == [f for f, _ in dovecot], (user, dovecot, mailgate)
        assert dovecot[1] == (b"delivered-to", b" " + named.encode() + b"\r\n"), dovecot
        assert mailgate[:2] == dovecot[:2], (dovecot, mailgate)


def test_aMessageForSeveralRecipientsNamesEachInItsCopy(servers):
    """
    Where mailgate differs on purpose (README, Moving from Dovecot): one
    message for several recipients gets no Delivered-To: from Dovecot
    2.3's LMTP (its lmtp_hdr_delivery_address is "none" for a transaction
    of several recipients), while mailgate's per-copy fields name each
    recipient in its own copy, as its one-recipient messages do: what an
    MTA batching recipients (Postfix's lmtp_destination_recipient_limit)
    would otherwise take from a POP3 user's filters.
    """
    recipients = ["alice+lists@example.org", BOB]
    tops = _topFields(servers, recipients, [ALICE, BOB])
    for user, named in zip((ALICE, BOB), recipients):
        dovecot, mailgate = tops["dovecot"][user], tops["mailgate"][user]
        assert [f for f, _ in dovecot] == [b"return-path", b"received"], dovecot
        assert [f for f, _ in mailgate] == [b"return-path", b"delivered-to", b"received"], mailgate
        assert mailgate[1] == (b"delivered-to", b" " + named.encode() + b"\r\n"), mailgate
