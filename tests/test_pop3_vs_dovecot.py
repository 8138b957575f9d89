"""
POP3 as a client sees it, mailgate against Dovecot: a differential test.

One maildrop (awkward messages: empty, no final line end, dot lines,
8-bit, a long folded header, no header/body separator, bare LF and CR, a
body and a header past mailgate's 128 KiB chunks) is served by a private
Debian Dovecot (tests/dovecotserver.py; the messages dropped into its
maildir as files, so that it adds no header field) and by a real C{twistd
mailgate} (the same octets delivered to its SQLite database).  The same
command sequences go to both over raw sockets: a fixed list (every command
in every state, bad numbers and arguments, case, spaces, empty and
over-long lines, NUL, AUTH PLAIN's and LOGIN's forms, APOP, STLS, QUIT in
each state, pipelined batches) and a seeded random mix.  What is compared
is what a client acts on: each reply's status (C{+OK}, C{-ERR}, SASL's
C{+}, the connection closed), the RESP-CODE where both give one, sizes,
the lines of LIST and the message numbers of UIDL (the ids themselves
differ by design), and RETR and TOP octet for octet.  The human-readable
text after the status is not compared: RFC 1939 leaves it to the server.

Dovecot runs with its defaults for what a client sees: no
pop3_client_workarounds (with C{oe-ns-eoh} it would add the blank line a
header without body separator lacks, which RFC 1939 does not ask for:
messages are sent as stored; mailgate's C{--pop3-client-workarounds} does
what Dovecot's do, compared in tests/test_pop3_workarounds_vs_dovecot.py),
pop3_lock_session = no.  Both offer STLS
with one certificate, and the same SASL mechanisms (PLAIN, LOGIN; APOP);
mailgate adds SCRAM-SHA-256.

A difference is allowed only if L{DIFFERENCES} explains it: each entry says
why mailgate differs on purpose, or which Dovecot behaviour RFC 1939, 2449
or 5034 does not require (and which mailgate does not copy).  Anything else
fails the test, with the exchange that differed.
"""

import base64
import hashlib
import os
import random
import re
import ssl
import time

import attr
import pytest

from certs import makeCertificate
from dovecotserver import PrivateDovecot, requireDovecot
from e2e import _LOGGED_ERROR, ServerProcess, databaseURL
from mailgate.testing import addUser, deliver, memoryStore
from rawexchange import Difference, RawConnection, batch, fail, lines

pytestmark = requireDovecot

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
PASSWORD = "wonder land"

#: Seconds any one read from either server may take.
READ_TIMEOUT = 10.0

#: The maildrop both serve, in this order (message numbers 1 to 10).
MESSAGES = (
    b"",
    b"Subject: empty body\r\n\r\n",
    b"Subject: no final line end\r\n\r\nlast line",
    b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nend\r\n",
    b"Subject: a lone dot\r\n\r\n.\r\n",
    b"Subject: 8-bit \xe9\r\n\r\n\xe9t\xe9 \xff\x80\r\n",
    b"Subject: long\r\nX-Long: " + b"x" * 1500 + b"\r\n\tfolded " + b"y" * 100 + b"\r\n\r\nbody\r\n",
    b"Subject: no separator\r\nFrom: a@example.net\r\n",
    b"Subject: bare\r\n\r\nbare LF\nhere\r\nbare CR\rthere\r\nCR CR LF\r\r\n",
    b"Subject: LF file\n\nline one\n.dot\nline three\n",
    # Past mailgate's 128 KiB chunks: lines (dot lines among them) cross
    # the chunk boundaries, for TOP's line counting and RETR's stuffing.
    b"Subject: big\r\n\r\n" + b"".join(
        (b"." if n % 7 == 0 else b"") + b"line %05d " % n + b"z" * (n % 97) + b"\r\n" for n in range(4000)
    ),
    b"Subject: a header, no line end",
    b"\r\nno header at all\r\n",
    b"Subject: the terminator inside\r\n\r\nbefore\r\n.\r\nafter\r\n.\r\n",
    # A header past a chunk: TOP n 0 ends it at its blank line.
    b"".join(b"X-Field-%05d: " % n + b"h" * 60 + b"\r\n" for n in range(3000))
    + b"\r\n.body line\r\nsecond\r\n",
)
COUNT = len(MESSAGES)

#: Messages without a final line end: Dovecot sends one at RETR (a
#: multi-line response must end its last line before ".") without counting
#: it in LIST and STAT.
UNTERMINATED = frozenset(n for n, m in enumerate(MESSAGES, 1) if m and not m.endswith(b"\n"))
EMPTY = frozenset(n for n, m in enumerate(MESSAGES, 1) if not m)

#: Messages Dovecot sends otherwise than mailgate (carol's maildrop), with
#: what each sends (the dot-stuffed response body, ".CRLF" included): the
#: sequences do not RETR them, as Dovecot's response to the first ones
#: cannot even be framed.  See L{test_messagesDovecotSendsOtherwise}.
SENT_OTHERWISE = (
    b".first: x\r\n\r\nbody\r\n",
    b".\r\nrest\r\n",
    b"..two\r\n",
    b"Subject: CR line ends\r\rline\rline\r",
)
SENT = {
    # RFC 1939 section 3: a line of a multi-line response that starts with
    # "." gets another one.  Dovecot 2.3 does not stuff the message's first
    # line: a client reads ".first: x" as "first: x", a lone "." as the
    # end of the response (the rest then reads as replies to the commands
    # that follow), "..two" as ".two".  mailgate stuffs every line.
    "mailgate": [
        b"..first: x\r\n\r\nbody\r\n.\r\n",
        b"..\r\nrest\r\n.\r\n",
        b"...two\r\n.\r\n",
        # The last octet a bare CR: mailgate takes it for the line end it
        # ends the message with (as it takes CRLF and LF); Dovecot keeps
        # it and adds CRLF, and LIST leaves those two octets out.  RFC
        # 5322 allows CR only in CRLF; neither reading is required.
        b"Subject: CR line ends\r\rline\rline\r\n.\r\n",
    ],
    "dovecot": [
        b".first: x\r\n\r\nbody\r\n.\r\n",
        b".\r\nrest\r\n.\r\n",
        b"..two\r\n.\r\n",
        b"Subject: CR line ends\r\rline\rline\r\r\n.\r\n",
    ],
}


# -- talking to a server ----------------------------------------------------


@attr.s(frozen=True)
class Reply:
    """
    One reply as a client reads it.

    @ivar status: C{"+OK"}, C{"-ERR"}, C{"+"} (a SASL challenge),
        C{"closed"} (the connection ended instead).
    @ivar code: the RESP-CODE (C{"AUTH"}, C{"SYS/TEMP"}, ...) or C{None}.
    @ivar line: the status line without its CRLF.
    @ivar body: a multi-line response's octets (still dot-stuffed, the
        terminating line included), or C{None}.
    """

    status = attr.ib()
    code = attr.ib(default=None)
    line = attr.ib(default=b"")
    body = attr.ib(default=None)


CLOSED = Reply("closed")
_STATUS = re.compile(rb"^(\+OK|-ERR|\+)(?: |$)(?:\[([^\]]*)\])?")


class Client(RawConnection):
    """
    A raw POP3 connection: lines sent as given, replies read as RFC 1939
    frames them.
    """

    def __init__(self, port):
        RawConnection.__init__(self, port, READ_TIMEOUT)
        self.greeting = self.reply(b"")

    def reply(self, command, sasl=False):
        """
        The reply to C{command} (one line, as sent); C{sasl}: the line was
        a SASL response, not a command.
        """
        if self.closed and not self.buffer:
            return CLOSED
        try:
            line = self._until(b"\r\n")[:-2]
        except EOFError:
            return CLOSED
        match = _STATUS.match(line)
        assert match, f"not a POP3 reply to {command!r}: {line!r}"
        status, code = match.group(1).decode(), match.group(2)
        body = None
        if status == "+OK" and not sasl and multiline(command, line):
            try:
                body = b".\r\n" if self.buffer.startswith(b".\r\n") else None
                if body is None:
                    body = self._until(b"\r\n.\r\n")
                else:
                    self.buffer = self.buffer[3:]
            except EOFError:
                body = b"<cut short>"
        return Reply(status, code.decode() if code is not None else None, line, body)

    def startTLS(self):
        """
        The TLS handshake, after STLS's +OK; what the server sent before it
        (nothing, if it is right) is kept for the next read to show.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            self.sock = context.wrap_socket(self.sock)
        except (ssl.SSLError, OSError) as e:
            self.closed = True
            return Reply("closed", line=f"TLS handshake failed: {e}".encode())
        return Reply("+OK", line=b"<TLS>")


def verbOf(command):
    return command.split(b" ", 1)[0].rstrip(b"\r\n").upper()


def argumentOf(command):
    return command.rstrip(b"\r\n").partition(b" ")[2]


def multiline(command, line):
    """
    Whether a +OK to C{command} (status line C{line}) has a multi-line body.
    """
    verb = verbOf(command)
    if verb in (b"CAPA", b"RETR", b"TOP"):
        return True
    if verb in (b"LIST", b"UIDL"):
        return not argumentOf(command).strip()
    if verb == b"AUTH":
        # No mechanism: the list of them.  Dovecot takes "AUTH  PLAIN
        # <response>" (two spaces) for one without, mailgate logs in: both
        # answer the list with a bare +OK, a login with text.
        return not argumentOf(command).split(b" ")[0] and line == b"+OK"
    return False


# -- what is compared --------------------------------------------------------


def sizeFix(n):
    """
    The octets Dovecot leaves out of message C{n}'s size (see
    L{UNTERMINATED}).
    """
    return 2 if n in UNTERMINATED else 0


def view(command, reply, deleted, side):
    """
    What a client acts on in C{reply}: its status, and for some commands
    the numbers or octets it carries.  C{side}: C{"mailgate"},
    C{"dovecot"}, or C{"dovecot-fixed"}: Dovecot's sizes corrected by
    L{sizeFix}, for the entry of L{DIFFERENCES} about them.
    """
    fix = side == "dovecot-fixed"
    if reply.status != "+OK":
        return (reply.status,)
    verb = verbOf(command)
    words = reply.line.split()
    if verb == b"STAT" and len(words) == 3:
        count, octets = int(words[1]), int(words[2])
        if fix:
            octets += sum(sizeFix(n) for n in range(1, COUNT + 1) if n not in deleted)
        return ("+OK", count, octets)
    if verb == b"LIST" and reply.body is None and len(words) == 3:
        n, size = int(words[1]), int(words[2])
        return ("+OK", n, size + (sizeFix(n) if fix else 0))
    if verb == b"LIST" and reply.body is not None:
        lines = [tuple(int(w) for w in line.split()) for line in reply.body.split(b"\r\n")[:-2]]
        return ("+OK", [(n, size + (sizeFix(n) if fix else 0)) for n, size in lines])
    if verb == b"UIDL" and reply.body is None and len(words) == 3:
        assert validUniqueId(words[2]), reply
        return ("+OK", int(words[1]))
    if verb == b"UIDL" and reply.body is not None:
        lines = [line.split(b" ") for line in reply.body.split(b"\r\n")[:-2]]
        assert all(len(line) == 2 and validUniqueId(line[1]) for line in lines), reply
        return ("+OK", [int(n) for n, _ in lines])
    if verb in (b"RETR", b"TOP"):
        return ("+OK", reply.body)
    if verb == b"CAPA":
        return ("+OK", capabilities(reply.body))
    if verb == b"AUTH":
        # The list of mechanisms (which each is set up with), or a login.
        return ("+OK", "list" if reply.body is not None else "login")
    return ("+OK",)


def validUniqueId(uid):
    """
    RFC 1939: 1 to 70 octets in the range 0x21 to 0x7E.
    """
    return 1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid)


#: Capabilities left out of the comparison: each server's own
#: IMPLEMENTATION, and what depends on configuration rather than on
#: correctness (the SASL mechanisms each is set up with: mailgate adds
#: SCRAM-SHA-256 and LOGIN; EXPIRE, which mailgate announces with its
#: retention policy).
CONFIGURED_CAPABILITIES = ("IMPLEMENTATION", "SASL", "EXPIRE", "LOGIN-DELAY")


def capabilities(body):
    lines = body.split(b"\r\n")[:-2]
    return frozenset(
        line.decode() for line in lines if line.split(b" ")[0].decode() not in CONFIGURED_CAPABILITIES
    )


# -- the documented differences --------------------------------------------


@attr.s(frozen=True)
class Exchange:
    """
    One command and both replies, with what the comparison needs to know.

    @ivar state: C{"AUTHORIZATION"} or C{"TRANSACTION"} (mailgate's, before
        the command).
    @ivar previous: Dovecot's reply to the command before, if any.
    @ivar previousCommand: that command.
    @ivar previousMailgate: mailgate's reply to it.
    """

    command = attr.ib()
    dovecot = attr.ib()
    mailgate = attr.ib()
    state = attr.ib()
    deleted = attr.ib()
    previous = attr.ib(default=None)
    previousCommand = attr.ib(default=None)
    previousMailgate = attr.ib(default=None)

    def views(self, dovecotSide="dovecot"):
        return (
            view(self.command, self.dovecot, self.deleted, dovecotSide),
            view(self.command, self.mailgate, self.deleted, "mailgate"),
        )


def _statuses(dovecot, mailgate):
    return lambda ex: (ex.dovecot.status, ex.mailgate.status) == (dovecot, mailgate)


def _noArgumentNoise(ex):
    return (
        verbOf(ex.command) in (b"STAT", b"NOOP", b"RSET", b"QUIT", b"CAPA", b"STLS")
        and argumentOf(ex.command).strip(b" ")
        and ex.dovecot.status in ("+OK", "closed")
        and ex.mailgate.status == "-ERR"
    )


def _trailingSpace(ex):
    # "LIST 1 ": Dovecot's "Noise after message number".
    argument = argumentOf(ex.command)
    return (
        verbOf(ex.command) in (b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP")
        and argument != argument.rstrip(b" ")
        and ex.dovecot.status == "-ERR"
        and ex.mailgate.status == "+OK"
    )


def _hugeLineCount(ex):
    if verbOf(ex.command) != b"TOP" or (ex.dovecot.status, ex.mailgate.status) != ("-ERR", "+OK"):
        return False
    count = argumentOf(ex.command).split(b" ")[-1]
    return count.isdigit() and int(count) > 2**32 - 1


def _overLong(ex):
    return len(ex.command) > 255 and ex.mailgate.status == "-ERR" and ex.dovecot.status in ("+OK", "-ERR", "closed")


def _nul(ex):
    return b"\0" in ex.command and ex.mailgate.status == "-ERR"


def _bufferFull(ex):
    return ex.dovecot.status == "closed" and ex.previous is not None and b"Input buffer full" in ex.previous.line


def _emptyUser(ex):
    return (
        verbOf(ex.command) == b"USER"
        and not argumentOf(ex.command).strip()
        and _statuses("+OK", "-ERR")(ex)
    )


def _authTwoSpaces(ex):
    # "AUTH  PLAIN <response>": Dovecot lists its mechanisms, mailgate
    # logs in.
    return (
        verbOf(ex.command) == b"AUTH"
        and argumentOf(ex.command).startswith(b" ")
        and ex.dovecot.body is not None
        and ex.mailgate.status == "+OK"
    )


def _spacesInBase64(ex):
    response = argumentOf(ex.command).strip(b" ").partition(b" ")[2].strip(b" ")
    return (
        verbOf(ex.command) == b"AUTH"
        and b" " in response
        and _statuses("+OK", "-ERR")(ex)
        and ex.mailgate.code == "AUTH"
    )


def _spacesAroundUser(ex):
    name = argumentOf(ex.previousCommand or b"")
    return (
        verbOf(ex.command) == b"PASS"
        and name != name.strip(b" ")
        and _statuses("-ERR", "+OK")(ex)
    )


def _badCommandsAfterLogin(ex):
    return ex.state == "TRANSACTION" and ex.mailgate.status == "closed" and b"Too many bad commands" in ex.dovecot.line


def _failedLogins(ex):
    said = b"-ERR too many failed logins"
    return ex.state == "AUTHORIZATION" and (
        ex.mailgate.line.startswith(said)
        or ex.mailgate.status == "closed" and ex.previousMailgate is not None
        and ex.previousMailgate.line.startswith(said)
    )


def _notUTF8(ex):
    try:
        ex.command.decode("utf-8")
    except UnicodeDecodeError:
        return ex.mailgate.status == "-ERR"
    return False


def _userBeforeTLS(ex):
    return (
        verbOf(ex.command) == b"PASS"
        and ex.state == "AUTHORIZATION"
        and _statuses("+OK", "-ERR")(ex)
        and ex.mailgate.line == b"-ERR send USER first"
    )


def _clearTextBehindSTLS(ex):
    return (
        ex.command == b"<TLS handshake>\r\n"
        and _statuses("closed", "+OK")(ex)
        and ex.previousMailgate is not None
        and ex.previousMailgate.status == "discarded"
    )


def _badCommandsBeforeLogin(ex):
    # Dovecot's closing line comes instead of the fourth command's reply,
    # whatever that command was.
    said = b"-ERR Too many invalid bad commands"
    return ex.state == "AUTHORIZATION" and (
        ex.dovecot.line.startswith(said)
        or ex.dovecot.status == "closed" and ex.previous is not None and ex.previous.line.startswith(said)
    )


def _capabilities(ex):
    if verbOf(ex.command) != b"CAPA":
        return False
    dovecot, mailgate = ex.views()
    afterLogin = {"USER"} if ex.state == "TRANSACTION" else set()
    return dovecot[0] == mailgate[0] == "+OK" and dovecot[1] - {"CAPA"} == mailgate[1] - afterLogin


def _sizes(ex):
    dovecot, mailgate = ex.views("dovecot-fixed")
    return dovecot == mailgate


def _emptyMessage(ex):
    if verbOf(ex.command) not in (b"RETR", b"TOP"):
        return False
    number = argumentOf(ex.command).split(b" ")[0]
    return (
        number.isdigit()
        and int(number) in EMPTY
        and ex.dovecot.body == b"\r\n.\r\n"
        and ex.mailgate.body == b".\r\n"
    )


def _noLock(ex):
    return ex.command.startswith(b"<second login>") and _statuses("+OK", "-ERR")(ex) and ex.mailgate.code == "IN-USE"


#: Every difference between the two that is accepted, with its reason.
DIFFERENCES = (
    # RFC 1939 section 3: "the POP3 server then acquires an exclusive-access
    # lock on the maildrop"; Dovecot by default (pop3_lock_session = no)
    # lets a second session in.  mailgate answers -ERR [IN-USE] (RFC 2449).
    Difference("no maildrop lock", _noLock, diverges=True),
    # Dovecot lists its own CAPA command as a capability; RFC 2449 defines
    # no such tag (a client ignores it).  And RFC 2449 section 5: the
    # capabilities of the AUTHORIZATION state "MUST be announced in both
    # states"; Dovecot drops USER (and SASL) after login, mailgate keeps
    # them.
    Difference("capabilities", _capabilities),
    # RFC 1939 section 11 (Message Format): a size counts each line end as
    # the two octets the client receives.  Dovecot sends a CRLF after a
    # message whose last line has none but leaves it out of LIST and STAT;
    # mailgate stores that CRLF and counts it.
    Difference("sizes of messages without a final line end", _sizes),
    # The empty message: Dovecot sends an empty line (CRLF) as its
    # content, which LIST counted as 0 octets; mailgate sends nothing, the
    # 0 octets it announced.
    Difference("the empty message", _emptyMessage),
    # RFC 1939, 2449 and 2595 give STAT, NOOP, RSET, QUIT, CAPA and STLS
    # no argument; Dovecot runs them with any text after them (QUIT and
    # STLS included, which end the session or start TLS); mailgate says
    # -ERR (diverges).
    Difference("arguments to a command that takes none", _noArgumentNoise, diverges=True),
    # RFC 1939 separates arguments by single spaces and says nothing of a
    # trailing one; Dovecot refuses "LIST 1 " ("noise after message
    # number"), mailgate forgives the spaces some clients leave.
    Difference("a space after the last argument", _trailingSpace),
    # RFC 1939 section 7, TOP: "If the number of lines requested by the
    # POP3 client is greater than than the number of lines in the body,
    # then the POP3 server sends the entire message."  Dovecot refuses
    # counts beyond 2**32 - 1 ("Size too large"); mailgate sends it all.
    Difference("TOP with a count beyond 32 bits", _hugeLineCount),
    # RFC 2449 section 4: a command line is at most 255 octets.  mailgate
    # refuses longer ones with -ERR and goes on; Dovecot reads up to its
    # buffer (and runs STAT, ignoring what follows it, or closes the
    # connection past its buffer: diverges).
    Difference("a command line over 255 octets", _overLong, diverges=True),
    Difference("a line past Dovecot's buffer", _bufferFull, diverges=True),
    # RFC 1939: USER takes a name.  Dovecot answers +OK to USER without
    # one (and refuses the PASS that follows); mailgate refuses the USER.
    Difference("USER without a name", _emptyUser),
    # RFC 5034: "AUTH mechanism [initial-response]", single spaces.
    # mailgate forgives more spaces there, as around every command's
    # arguments; Dovecot answers "AUTH  PLAIN <response>" as AUTH without
    # a mechanism, with its list (then mailgate has logged in: diverges).
    Difference("AUTH with two spaces before the mechanism", _authTwoSpaces, diverges=True),
    # RFC 5034 section 4 and RFC 4648 section 3.3: base64 has no spaces,
    # and a server must reject characters outside its alphabet.  Dovecot
    # skips a space inside an initial response and logs in; mailgate
    # refuses with [AUTH] (diverges).
    Difference("a space inside a base64 response", _spacesInBase64, diverges=True),
    # RFC 1939 names no spaces around USER's name.  mailgate strips them
    # (as it forgives spaces around every argument); Dovecot keeps them
    # in the name, and its login fails (diverges).
    Difference("spaces around USER's name", _spacesAroundUser, diverges=True),
    # RFC 2595 section 4: STLS protects what follows it; a USER sent in
    # the clear before it may be a man in the middle's.  mailgate forgets
    # it (PASS then needs USER again, sent through TLS); Dovecot keeps it
    # and logs the client in with it (diverges).
    Difference("USER before STLS", _userBeforeTLS, diverges=True),
    # RFC 2595 section 4 (the STARTTLS injection): nothing the client sent
    # behind STLS, in the clear, may be run as if it came through TLS.
    # mailgate discards it, and the handshake that follows succeeds (the
    # commands were not run: the session is not logged in); Dovecot takes
    # it for the start of the handshake, which fails, and closes
    # (diverges).  Both refuse the injection.
    Difference("commands behind STLS", _clearTextBehindSTLS, diverges=True),
    # NUL is no command's character (RFC 1939: printable ASCII).  Dovecot
    # cuts the line at the NUL and runs what comes before ("NOOP\\0" is
    # NOOP); mailgate refuses the line.
    Difference("NUL in a command line", _nul),
    # Dovecot's login process closes the connection at the fourth bad
    # command before login (its -ERR replacing that command's reply);
    # mailgate closes at the 20th in a row (a +OK starts the count again),
    # before login as after it.  No RFC sets a number; mailgate's login
    # timeout bounds a session that never logs in.
    Difference("bad commands before login", _badCommandsBeforeLogin, diverges=True),
    # After login both close the session for bad commands in a row, each
    # saying so in one more -ERR line after the last command's own:
    # Dovecot after the 21st, mailgate after the 20th (the figure its
    # README gives).  No RFC sets a number.
    Difference("bad commands after login", _badCommandsAfterLogin, diverges=True),
    # mailgate closes a session after its third failed login (README:
    # guessing costs a connection; its penalties and bans do the rest),
    # saying so in one more -ERR line; Dovecot's login process (with its
    # anvil penalty off, as here) lets the session go on.  No RFC sets a
    # number.
    Difference("failed logins in one session", _failedLogins, diverges=True),
    # RFC 1939 commands are ASCII (8-bit only with RFC 6856's UTF8, which
    # neither announces).  mailgate refuses a line that is not UTF-8 with
    # -ERR; Dovecot takes its octets as they are ("USER \xff" gets +OK).
    Difference("a command line that is not UTF-8", _notUTF8),
)


# -- the servers -------------------------------------------------------------


@attr.s
class Servers:
    dovecot = attr.ib()
    mailgate = attr.ib()

    @property
    def ports(self):
        return {"dovecot": self.dovecot.pop3Port, "mailgate": self.mailgate.port}


def dropIntoMaildir(dovecot, user, messages):
    """
    The messages as files in the user's maildir (new/), named in the
    order Dovecot numbers them: the octets Dovecot serves are the file's.
    """
    now = int(time.time())
    for n, message in enumerate(messages):
        with open(os.path.join(dovecot.maildir(user), "new", f"{now}.M{n:06d}P1.differential"), "wb") as f:
            f.write(message)
    dovecot.own(dovecot.maildir(user))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pop3-vs-dovecot")
    # LOGIN as well, which mailgate offers (where plaintext is allowed).
    dovecot = PrivateDovecot(extra="auth_mechanisms = plain login apop")
    # Both offer STLS, with one certificate.
    certificate, key = makeCertificate(directory, "pop3.example.test")
    dovecot.tls = (str(certificate), str(key))
    mailgate = None
    try:
        dovecot.addUsers([ALICE, BOB, CAROL], PASSWORD)
        dropIntoMaildir(dovecot, ALICE, MESSAGES)
        dropIntoMaildir(dovecot, BOB, MESSAGES)
        dropIntoMaildir(dovecot, CAROL, SENT_OTHERWISE)
        dovecot.start()
        url = databaseURL(directory / "mail.sqlite3")
        store = memoryStore(url)
        try:
            # APOP for alice, so that mailgate's greeting carries a
            # timestamp, as Dovecot's (auth_mechanisms = plain apop) does.
            addUser(store, ALICE, PASSWORD, apop=True)
            addUser(store, BOB, PASSWORD)
            addUser(store, CAROL, PASSWORD)
            for message in MESSAGES:
                deliver(store, [ALICE], message)
                deliver(store, [BOB], message)
            for message in SENT_OTHERWISE:
                deliver(store, [CAROL], message)
        finally:
            store.close()
        options = ["--auth-failure-delay", "0", "--tls-cert", str(certificate), "--tls-key", str(key)]
        mailgate = ServerProcess(url, options, cwd=directory)
        mailgate.start()
        yield Servers(dovecot, mailgate)
    finally:
        if mailgate is not None:
            mailgate.stop()
        dovecot.cleanup()
    assert not _LOGGED_ERROR.search(mailgate.stdout + mailgate.stderr), mailgate.log()


# -- running sequences -------------------------------------------------------


def plain(user=ALICE, password=PASSWORD, authzid=""):
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode()


LOGIN = [b"USER " + ALICE.encode() + b"\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"]


def apop(greeting, user=ALICE, password=PASSWORD):
    timestamp = re.search(rb"<[^>]*>", greeting.line).group(0)
    return b"APOP %s %s\r\n" % (user.encode(), hashlib.md5(timestamp + password.encode()).hexdigest().encode())


#: A step: the client's TLS handshake (after STLS).
HANDSHAKE = object()


def run(port, steps):
    """
    Send each step and read its replies.  A step is a line (bytes), a
    batch of lines sent in one write (a tuple: pipelining), or a callable
    making the line from the greeting (APOP).

    @return: C{(greeting, [(command, reply), ...])}.
    """
    client = Client(port)
    exchanges = []
    sasl = False
    try:
        for step in steps:
            if step is HANDSHAKE:
                exchanges.append((b"<TLS handshake>\r\n", client.startTLS()))
                continue
            label = None
            if callable(step):
                # Made from this server's greeting: compared by its verb.
                step = step(client.greeting)
                label = step.split(b" ")[0] + b" <made from the greeting>\r\n"
            batch = step if isinstance(step, tuple) else (step,)
            client.send(b"".join(batch))
            tls = False
            for command in batch:
                if tls:
                    # Behind STLS's +OK: discarded, if the server is right;
                    # answered in the clear, the handshake fails.
                    exchanges.append((command, Reply("discarded")))
                    continue
                reply = client.reply(command, sasl=sasl)
                sasl = reply.status == "+"
                tls = verbOf(command) == b"STLS" and reply.status == "+OK"
                exchanges.append((label or command, reply))
    finally:
        client.close()
    return client.greeting, exchanges


def compare(servers, steps, seen=None):
    """
    The differences L{DIFFERENCES} does not explain, in one sequence.

    @param seen: a set to which the names of the differences that
        explained something are added.
    """
    greetings, results = {}, {}
    for name, port in servers.ports.items():
        greetings[name], results[name] = run(port, steps)
    problems = []
    if (greetings["dovecot"].status, greetings["mailgate"].status) != ("+OK", "+OK"):
        problems.append(("greeting", greetings))
    state, deleted, sasl = "AUTHORIZATION", set(), False
    previous = previousCommand = previousMailgate = None
    for (command, dovecot), (same, mailgate) in zip(results["dovecot"], results["mailgate"]):
        assert command == same
        ex = Exchange(
            command, dovecot, mailgate, state, frozenset(deleted), previous, previousCommand, previousMailgate
        )
        previous, previousCommand, previousMailgate = dovecot, command, mailgate
        dovecotView, mailgateView = ex.views()
        codes = (dovecot.code, mailgate.code)
        if dovecotView != mailgateView or (None not in codes and codes[0] != codes[1]):
            explained = [d for d in DIFFERENCES if d.explains(ex)]
            if not explained:
                problems.append((state, command, dovecot, mailgate))
            if seen is not None:
                seen.update(d.name for d in explained)
            if any(d.diverges for d in explained):
                break
        if mailgate.status == "closed":
            break
        state, sasl = nextState(state, sasl, command, mailgate), mailgate.status == "+"
        verb = verbOf(command)
        if state == "TRANSACTION" and mailgate.status == "+OK":
            if verb == b"DELE":
                deleted.add(int(argumentOf(command).strip(b" ")))
            elif verb == b"RSET":
                deleted.clear()
    return problems


def nextState(state, sasl, command, reply):
    """
    The session's state after C{reply} (mailgate's) to C{command}.
    """
    if state != "AUTHORIZATION" or reply.status != "+OK":
        return state
    verb = verbOf(command)
    if sasl or verb in (b"PASS", b"APOP") or (verb == b"AUTH" and reply.body is None):
        return "TRANSACTION"
    return state


# -- the sequences -----------------------------------------------------------


#: Every command in every state, and the awkward forms of each.
SEQUENCES = {
    "before login": lines(
        "CAPA", "STAT", "NOOP", "USER " + ALICE, "CAPA", "PASS " + PASSWORD, "CAPA", "STAT", "QUIT",
    ),
    "commands of the transaction state before login": lines("STAT", "LIST", "RETR 1", "DELE 1", "NOOP"),
    "more commands of the transaction state before login": lines("UIDL", "TOP 1 0", "RSET", "NOOP"),
    "PASS without USER": lines("PASS " + PASSWORD, "USER " + ALICE, "PASS " + PASSWORD, "STAT"),
    "a wrong password, then the right one": lines(
        "USER " + ALICE, "PASS wrong", "USER " + ALICE, "PASS " + PASSWORD, "STAT",
    ),
    "USER twice": lines("USER nobody@example.org", "USER " + ALICE, "PASS " + PASSWORD, "STAT"),
    "an unknown user": lines("USER nobody@example.org", "PASS " + PASSWORD, "CAPA"),
    "empty USER and PASS": lines("USER", "USER " + ALICE, "PASS", "CAPA"),
    "lower case": lines("user " + ALICE, "pass " + PASSWORD, "stat", "list", "uidl 2", "retr 4", "top 4 1",
                        "dele 3", "list 3", "rset", "noop", "capa", "quit"),
    "mixed case": lines("UsEr " + ALICE, "PaSs " + PASSWORD, "StAt", "LiSt 2"),
    "every message": LOGIN + lines("STAT", "LIST", "UIDL")
    + lines(*(f"LIST {n}" for n in range(1, COUNT + 1)))
    + lines(*(f"UIDL {n}" for n in range(1, COUNT + 1)))
    + lines(*(f"RETR {n}" for n in range(1, COUNT + 1))),
    "TOP of every message": LOGIN
    + lines(*(f"TOP {n} {k}" for n in range(1, COUNT + 1) for k in (0, 1, 2, 3, 1000))),
    "TOP of the big messages": LOGIN + lines(
        *(f"TOP {n} {k}" for n in (COUNT - 4, COUNT) for k in (0, 1, 2, 999, 1000, 1001, 1500, 2047, 3999, 4000, 9999))
    ),
    "TOP counts": LOGIN + lines(
        "TOP 4 -1", "TOP 4 x", "TOP 4 4294967295", "TOP 4 4294967296", "TOP 4 99999999999999999999",
        "TOP 4", "TOP 4 1 1", "TOP", "TOP x 1", "TOP 0 1", f"TOP {COUNT + 1} 0", "TOP 4  1", "TOP 4 +1",
        "TOP 4 01", "TOP 4 0x1", "TOP 4 1.0",
    ),
    "message numbers": LOGIN + lines(*(
        f"{verb} {number}"
        for verb in ("LIST", "UIDL", "RETR")
        for number in ("0", str(COUNT + 1), "4294967297", "99999999999999999999", "-1", "+1", "01",
                       "00000000001", "0000000000000000000000000002", "abc", "1a", "1 2", "\u0661", "")
    )),
    "DELE and what follows": LOGIN + lines(
        "DELE 0", f"DELE {COUNT + 1}", "DELE x", "DELE", "DELE 2 3", "DELE 2", "DELE 2", "STAT", "LIST",
        "UIDL", "LIST 2", "UIDL 2", "RETR 2", "TOP 2 0", "DELE 3", "STAT", "RSET", "STAT", "LIST 2",
        "RETR 2", "DELE 2", "NOOP", "LIST",
    ),
    "DELE everything": LOGIN + lines(*(f"DELE {n}" for n in range(1, COUNT + 1)))
    + lines("STAT", "LIST", "UIDL", "RETR 1", "RSET", "STAT"),
    "arguments to commands that take none": LOGIN + lines(
        "STAT x", "NOOP x", "RSET x", "CAPA x", "STAT ", "NOOP ", "NOOP \t", "RSET \u00a0", "STAT", "QUIT x",
    ),
    "spaces": LOGIN + lines(
        "LIST  1", "LIST 1 ", "UIDL 1 ", "RETR 1 ", "LIST ", "UIDL ", " STAT", "STAT\t", "LIST\t1", "STAT",
    ),
    "empty lines": LOGIN + lines("", "", "STAT", "", "NOOP"),
    "unknown commands": LOGIN + lines("XYZZY", "LAST", "XTND XMIT", "STAT"),
    "AUTHORIZATION commands after login": LOGIN + lines(
        "USER " + ALICE, "PASS " + PASSWORD, "APOP x y", "AUTH PLAIN", "AUTH", "STLS", "STAT",
    ),
    "over-long lines after login": LOGIN + lines("NOOP " + "x" * 300, "STAT", "LIST " + "1" * 300, "STAT"),
    "an over-long line before login": lines("USER " + "a" * 300, "USER " + ALICE, "PASS " + PASSWORD, "STAT"),
    "a line past Dovecot's buffer": lines("USER " + "a" * 9000, "NOOP"),
    "NUL": LOGIN + lines("NO\0OP", "NOOP\0", "LIST 1\0", "STAT"),
    "bare line ends": LOGIN + [b"STAT\n", b"NOOP\n", b"LIST 1\rLIST 2\r\n", b"STAT\r\n"],
    "8-bit in a command": LOGIN + lines("LIST \xe9", "STAT"),
    "pipelined": LOGIN + [
        batch("STAT", "LIST 1", "LIST", "UIDL 3", "UIDL", "RETR 4", "TOP 5 0", "DELE 6", "STAT", "LIST 6",
              "RSET", "STAT", "NOOP", "CAPA"),
    ],
    "pipelined login": [batch("CAPA", "USER " + ALICE, "PASS " + PASSWORD, "STAT", "RETR 2", "QUIT")],
    "pipelined with errors": LOGIN + [batch("RETR 0", "XYZZY", "LIST 1", "", "DELE 99", "STAT", "QUIT")],
    "QUIT before login": lines("QUIT", "STAT"),
    "QUIT after USER": lines("USER " + ALICE, "QUIT", "PASS " + PASSWORD),
    "QUIT after login": LOGIN + lines("QUIT", "STAT"),
    "STLS": lines("CAPA", "STLS") + [HANDSHAKE] + lines("CAPA", "STLS", "USER " + ALICE, "PASS " + PASSWORD,
                                                         "STLS", "CAPA", "STAT"),
    "STLS after login": LOGIN + lines("STLS", "STAT"),
    "STLS with an argument": lines("STLS x", "CAPA"),
    "STLS after USER": lines("USER " + ALICE, "STLS") + [HANDSHAKE] + lines("PASS " + PASSWORD, "CAPA"),
    # RFC 2595 section 3.1 (and RFC 3207's STARTTLS injection): what came
    # with STLS, before the handshake, is discarded, not run as if it had
    # come through TLS.
    "STLS with commands behind it": [batch("STLS", "USER " + ALICE, "PASS " + PASSWORD), HANDSHAKE]
    + lines("STAT", "CAPA"),
    "AUTH PLAIN with an initial response": lines(f"AUTH PLAIN {plain()}", "STAT", "CAPA"),
    "AUTH PLAIN without": lines("AUTH PLAIN", plain(), "STAT"),
    "AUTH plain, lower case": lines(f"auth plain {plain()}", "STAT"),
    "AUTH PLAIN cancelled": lines("AUTH PLAIN", "*", "STAT", "USER " + ALICE, "PASS " + PASSWORD, "STAT"),
    "AUTH PLAIN, bad base64": lines("AUTH PLAIN", "!!!", "AUTH PLAIN !!!", "AUTH PLAIN", "QQ", "STAT"),
    "AUTH PLAIN, empty responses": lines("AUTH PLAIN", "", "AUTH PLAIN =", "CAPA"),
    "AUTH PLAIN, a wrong password": lines(f"AUTH PLAIN {plain(password='wrong')}", "AUTH PLAIN",
                                          plain(password="wrong"), "CAPA"),
    "AUTH PLAIN, authzid": lines(f"AUTH PLAIN {plain(authzid=ALICE)}", "STAT"),
    "AUTH PLAIN, another's authzid": lines(f"AUTH PLAIN {plain(authzid=BOB)}", "CAPA"),
    "AUTH PLAIN, the authzid in another case": lines(f"AUTH PLAIN {plain(user=ALICE.upper(), authzid=ALICE)}", "STAT"),
    "AUTH PLAIN, missing parts": lines(
        "AUTH PLAIN " + base64.b64encode(ALICE.encode()).decode(),
        "AUTH PLAIN " + base64.b64encode(b"\0" + ALICE.encode()).decode(),
        "AUTH PLAIN " + base64.b64encode(b"\0\0" + PASSWORD.encode()).decode(),
        "CAPA",
    ),
    "AUTH LOGIN": lines("AUTH LOGIN", b64(ALICE), b64(PASSWORD), "STAT"),
    "AUTH LOGIN with the name as initial response": lines(f"AUTH LOGIN {b64(ALICE)}", b64(PASSWORD), "STAT"),
    "AUTH LOGIN, a wrong password": lines("AUTH LOGIN", b64(ALICE), b64("wrong"), "CAPA"),
    "AUTH LOGIN cancelled": lines("AUTH LOGIN", b64(ALICE), "*", "CAPA", "AUTH LOGIN", "*", "CAPA"),
    "AUTH LOGIN, empty name": lines("AUTH LOGIN", "", "CAPA", "AUTH LOGIN =", "*", "CAPA"),
    "AUTH LOGIN, bad base64": lines("AUTH LOGIN", "!!", "AUTH LOGIN", b64(ALICE), "!!", "CAPA"),
    "AUTH with an unknown mechanism": lines("AUTH FOO", "AUTH", "CAPA"),
    "AUTH PLAIN, the response as a command": lines("AUTH PLAIN", "STAT", "CAPA"),
    "APOP": [lambda greeting: apop(greeting)] + lines("STAT"),
    "APOP, a wrong digest": [lambda greeting: apop(greeting, password="wrong")] + lines("CAPA"),
    "APOP, malformed": lines("APOP", f"APOP {ALICE}", f"APOP {ALICE} xyz", "CAPA"),
    "AUTH PLAIN, unpadded base64": lines(f"AUTH PLAIN {plain().rstrip('=')}", "STAT"),
    "AUTH PLAIN, unpadded response": lines("AUTH PLAIN", plain().rstrip("="), "STAT"),
    "AUTH PLAIN, spaces in base64": lines(f"AUTH PLAIN {plain()[:8]} {plain()[8:]}", "CAPA"),
    "AUTH PLAIN, a space after the response": lines("AUTH PLAIN", plain() + " ", "STAT"),
    "AUTH PLAIN, a space after the initial response": lines(f"AUTH PLAIN {plain()} ", "STAT"),
    "AUTH PLAIN, two spaces": lines(f"AUTH  PLAIN {plain()}", "STAT"),
    "AUTH PLAIN, a long response": lines("AUTH PLAIN", plain(password="x" * 400), "CAPA"),
    "AUTH PLAIN, the user in capitals": lines(f"AUTH PLAIN {plain(user=ALICE.upper())}", "STAT"),
    "AUTH PLAIN twice": lines("AUTH PLAIN", "AUTH PLAIN", "CAPA"),
    "USER with spaces": lines(f"USER {ALICE} ", "PASS " + PASSWORD, "STAT"),
    "USER with two spaces": lines(f"USER  {ALICE}", "PASS " + PASSWORD, "STAT"),
    "PASS with two spaces": lines(f"USER {ALICE}", "PASS  " + PASSWORD, "CAPA"),
    "PASS with a trailing space": lines(f"USER {ALICE}", "PASS " + PASSWORD + " ", "CAPA"),
    "USER in capitals": lines(f"USER {ALICE.upper()}", "PASS " + PASSWORD, "STAT"),
    "APOP in capitals": [lambda greeting: apop(greeting, user=ALICE.upper())] + lines("STAT"),
    "APOP, an unknown user": [lambda greeting: apop(greeting, user="nobody@example.org")] + lines("CAPA"),
    "APOP after USER": lines("USER " + ALICE) + [lambda greeting: apop(greeting)] + lines("PASS x", "STAT"),
    "failed logins": lines(*(["USER " + ALICE, "PASS wrong"] * 4), "CAPA"),
    "failed AUTH PLAIN": lines(*([f"AUTH PLAIN {plain(password='wrong')}"] * 4), "CAPA"),
    "bad commands after login": LOGIN + lines(*(["XYZZY"] * 22), "STAT"),
    "bad commands after login, with a NOOP between": LOGIN + lines(*(["XYZZY"] * 15), "NOOP",
                                                                   *(["XYZZY"] * 15), "STAT"),
    "invalid UTF-8": [b"USER \xff\xfe\r\n", b"CAPA\r\n"] + LOGIN + [b"LIST \xff\r\n", b"STAT\r\n"],
    "an 8-bit password": lines("USER " + ALICE, "PASS w\u00f6nder", "CAPA"),
    "pipelined AUTH PLAIN": [batch("AUTH PLAIN", plain(), "STAT", "LIST 2", "QUIT")],
    "pipelined past a failed login": [batch("USER " + ALICE, "PASS wrong", "STAT", "USER " + ALICE,
                                            "PASS " + PASSWORD, "STAT")],
    "CAPA with spaces": lines("CAPA ", " CAPA"),
    "RETR, TOP and DELE of a deleted message": LOGIN + lines("DELE 4", "RETR 4", "TOP 4 0", "DELE 4", "LIST 4",
                                                             "UIDL 4", "RSET", "RETR 4"),
}



@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_fixedSequences(servers, name):
    fail(compare(servers, SEQUENCES[name]))


#: A fixed sequence that shows each documented difference.
EXHIBITS = {
    "capabilities": "before login",
    "sizes of messages without a final line end": "every message",
    "the empty message": "every message",
    "arguments to a command that takes none": "arguments to commands that take none",
    "a space after the last argument": "spaces",
    "TOP with a count beyond 32 bits": "TOP counts",
    "a command line over 255 octets": "over-long lines after login",
    "a line past Dovecot's buffer": "a line past Dovecot's buffer",
    "NUL in a command line": "NUL",
    "bad commands before login": "commands of the transaction state before login",
    "USER without a name": "empty USER and PASS",
    "AUTH with two spaces before the mechanism": "AUTH PLAIN, two spaces",
    "a space inside a base64 response": "AUTH PLAIN, spaces in base64",
    "spaces around USER's name": "USER with spaces",
    "bad commands after login": "bad commands after login",
    "failed logins in one session": "failed logins",
    "a command line that is not UTF-8": "invalid UTF-8",
    "USER before STLS": "STLS after USER",
    "commands behind STLS": "STLS with commands behind it",
}


def test_everyDocumentedDifferenceStillHappens(servers):
    """
    Each entry of L{DIFFERENCES} explains something in the sequence that
    shows it (the lock's, in L{test_aSecondSessionOfTheSameUser}): an entry
    a new Dovecot (or a mailgate change) made pointless is removed, not
    left to explain away a future difference.
    """
    assert set(EXHIBITS) | {"no maildrop lock"} == {d.name for d in DIFFERENCES}
    for name, sequence in EXHIBITS.items():
        seen = set()
        assert compare(servers, SEQUENCES[sequence], seen) == []
        assert name in seen, (name, sequence)


# -- the random mix ----------------------------------------------------------

#: Random sequences per run, and their most steps; with the seed, the same
#: sequences every run.
RANDOM_SEQUENCES = 200
RANDOM_STEPS = 12
SEED = 1939


def randomCommand(rng):
    """
    One command line: most of them well-formed, with numbers in and
    around the maildrop, some in odd case or with odd arguments.
    """
    number = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, COUNT + 1, rng.randint(1, COUNT)])
    verb, argument = rng.choice([
        ("STAT", ""), ("LIST", ""), ("UIDL", ""), ("NOOP", ""), ("RSET", ""), ("CAPA", ""),
        ("LIST", str(number)), ("UIDL", str(number)), ("RETR", str(number)), ("DELE", str(number)),
        ("TOP", f"{number} {rng.choice([0, 1, 2, 5, 100])}"),
        ("LIST", rng.choice(["x", "-1", "1 2", "99999999999"])), ("RETR", ""), ("TOP", str(number)),
        ("XYZZY", ""), ("USER", ALICE), ("AUTH", "PLAIN"), ("", ""),
    ])
    if rng.random() < 0.15:
        verb = verb.lower()
    return f"{verb} {argument}" if argument else verb


def randomSequence(rng):
    steps = []
    if rng.random() < 0.8:
        steps += rng.choice([LOGIN, lines(f"AUTH PLAIN {plain()}"), lines("AUTH PLAIN", plain())])
    commands = [randomCommand(rng) for _ in range(rng.randint(1, RANDOM_STEPS))]
    if rng.random() < 0.3:
        cut = rng.randint(0, len(commands))
        steps += lines(*commands[:cut]) + [batch(*commands[cut:])]
    else:
        steps += lines(*commands)
    if not any(verbOf(c.encode()) == b"DELE" for c in commands):
        # QUIT after DELE would delete from the shared maildrop: those
        # sessions end by closing the connection, which deletes nothing.
        steps += lines("QUIT")
    return steps


def test_randomSequences(servers):
    rng = random.Random(SEED)
    problems = []
    for _ in range(RANDOM_SEQUENCES):
        steps = randomSequence(rng)
        problems += [(steps, problem) for problem in compare(servers, steps)]
    fail(problems)


# -- sizes, deletion, the lock -----------------------------------------------


def loggedInSizes(client, user=ALICE, password=PASSWORD):
    """
    Log C{client} in by USER/PASS and return LIST's sizes, by message
    number.
    """
    for command in lines("USER " + user, "PASS " + password):
        client.send(command)
        assert client.reply(command).status == "+OK"
    client.send(b"LIST\r\n")
    listing = client.reply(b"LIST\r\n")
    return dict(tuple(int(w) for w in line.split()) for line in listing.body.split(b"\r\n")[:-2])


def unstuffed(body):
    """
    A multi-line response's octets as a client keeps them: stuffing and
    terminator undone.
    """
    content = body[: -len(b".\r\n")]
    return b"".join(line[1:] if line.startswith(b".") else line for line in content.splitlines(keepends=True))


def retrieved(port, user=ALICE):
    """
    LIST's sizes and each message's octets as RETR sends them, dot-stuffing
    undone (a client's view of what LIST promised).
    """
    client = Client(port)
    try:
        sizes = loggedInSizes(client, user)
        messages = {}
        for n in sizes:
            command = b"RETR %d\r\n" % n
            client.send(command)
            messages[n] = unstuffed(client.reply(command).body)
        return sizes, messages
    finally:
        client.close()


def test_sizesAreTheOctetsRetrSends(servers):
    """
    RFC 1939 section 11: LIST gives the size of a message as the client
    receives it (every line end two octets, dot-stuffing not counted).
    mailgate does for every message; Dovecot misses exactly the messages
    L{DIFFERENCES} names.
    """
    sizes, messages = retrieved(servers.mailgate.port)
    assert {n: len(m) for n, m in messages.items()} == sizes
    sizes, messages = retrieved(servers.dovecot.pop3Port)
    wrong = {n for n in sizes if len(messages[n]) != sizes[n]}
    assert wrong == UNTERMINATED | EMPTY


def test_quitAppliesTheSameDeletions(servers):
    """
    DELE then QUIT (the UPDATE state) on bob's copy of the maildrop: both
    remove the same messages, and the next session sees the same listing.
    """
    # Messages after every one L{sizeFix} knows, so that the numbers it
    # knows them by stay theirs in the next session.
    first, second, third = [n for n in range(1, COUNT + 1) if n > max(UNTERMINATED | EMPTY)][:3]
    steps = lines("USER " + BOB, "PASS " + PASSWORD, f"DELE {first}", f"DELE {second}", "RSET",
                  f"DELE {third}", f"DELE {first}", "QUIT")
    fail(compare(servers, steps))
    fail(compare(servers, lines("USER " + BOB, "PASS " + PASSWORD, "STAT", "LIST", "UIDL", "RETR 3", "QUIT")))


def test_aSecondSessionOfTheSameUser(servers):
    """
    A second login while a session holds the maildrop: the documented
    difference (mailgate's [IN-USE], Dovecot's default of no lock).
    """
    problems = []
    for name, port in servers.ports.items():
        first = Client(port)
        try:
            for command in LOGIN:
                first.send(command)
                assert first.reply(command).status == "+OK"
            greeting, exchanges = run(port, LOGIN)
        finally:
            first.close()
        problems.append(exchanges[-1][1])
    dovecot, mailgate = problems
    ex = Exchange(b"<second login> PASS\r\n", dovecot, mailgate, "AUTHORIZATION", frozenset())
    assert [d.name for d in DIFFERENCES if d.explains(ex)] == ["no maildrop lock"]


def test_messagesDovecotSendsOtherwise(servers):
    """
    Carol's messages (L{SENT_OTHERWISE}), read raw: mailgate sends each
    dot-stuffed, every line, as RFC 1939 asks; Dovecot sends what L{SENT}
    documents (its first line unstuffed).  The sizes LIST gives are the
    octets mailgate sends, once unstuffed.
    """
    for name, port in servers.ports.items():
        client = Client(port)
        try:
            for command in lines("USER " + CAROL, "PASS " + PASSWORD):
                client.send(command)
                assert client.reply(command).status == "+OK"
            client.send(b"LIST\r\n")
            listing = client.reply(b"LIST\r\n")
            # One write with every RETR, and the raw octets of all the
            # replies read to the end: Dovecot's cannot be framed.
            client.send(b"".join(b"RETR %d\r\n" % n for n in range(1, len(SENT_OTHERWISE) + 1)) + b"QUIT\r\n")
            while not client.closed:
                try:
                    client._fill()
                except EOFError:
                    break
        finally:
            client.close()
        replies = re.split(rb"\+OK \d+ octets\r\n", client.buffer.rsplit(b"+OK", 1)[0])[1:]
        assert replies == SENT[name], name
        if name == "mailgate":
            sizes = [int(line.split()[1]) for line in listing.body.split(b"\r\n")[:-2]]
            unstuffed = [len(body[: -len(b".\r\n")].replace(b"\r\n.", b"\r\n")) - body.startswith(b".")
                         for body in replies]
            assert sizes == unstuffed
