# -*- test-case-name: tests.test_importers -*-
"""
Importing a maildrop from a live POP3 server, through POP3: log in,
C{UIDL}, then C{RETR} every message mailgate does not have yet, keeping
the ids the server gave them.

  - C{pop3://user@host:port} or C{pop3s://...} (TLS from the first octet);
    a user name with C{@} is written C{%40}.  With C{pop3://}, C{STLS} is
    used when the server offers it.  Certificates are verified (against
    the system's trust store, or C{SSL_CERT_FILE}) unless C{insecure}.
  - Resumable: ids the maildrop already has, with the size LIST gives,
    are not fetched again, so an interrupted import is finished by
    running it again.
  - The source is left as it was, unless C{delete}: then each message is
    marked with C{DELE} once mailgate holds its very content (committed
    by this run, or compared octet for octet with what an earlier one
    stored), and the server removes them at C{QUIT}.
  - Octets are kept exactly: the message as RETR sent it, dot-stuffing
    undone, whatever LIST said its size was; only a message the server
    had to end with a line break it did not have (its RETR is two octets
    longer than its LIST size) gets it taken off again, and mailgate's
    RETR adds it back.  A first line that starts with "." comes whole from
    a server that does not stuff it (Dovecot 2.3; see
    L{POP3Client.retrieve}).  A message over C{maxSize} octets is a
    failure: not fetched at all where LIST says so, else read to its end
    (and dropped) so that the import goes on.
  - A message the server will not give (C{-ERR} to its RETR) is a
    failure of its own: the others are imported.

The client is a small blocking one (the admin command has no reactor), and
reads every response in bounded memory: a long line is read in pieces, a
large message goes to a temporary file.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import socket
import ssl
import tempfile
import time
from urllib.parse import quote, unquote, urlsplit

from zope.interface import implementer

from mailgate.errors import MailgateError
from mailgate.importers import (
    BatchWriter,
    ImportFailed,
    ImportReport,
    MAX_MESSAGE_SIZE,
    claimPresent,
    clientsWord,
    fired,
    removeGone,
    renameDuplicates,
    validUidl,
)
from mailgate.interfaces import IMessageSource
from mailgate.message import DotLineFinder, fileChunks
from mailgate.printable import printable
from mailgate.urls import shownURL

DEFAULT_PORTS = {"pop3": 110, "pop3s": 995}
TIMEOUT = 60
_MAX_STATUS = 4096
#: Reads of a status line (of L{_MAX_STATUS} octets) before giving up.
_MAX_STATUS_READS = 256
_PIECE = 1 << 16
#: Lines after the greeting's own that are dropped as more of it.
_MAX_GREETING_LINES = 32
#: A message number or size in a listing: ASCII digits, as many as a size
#: can take.  (C{str.isdigit} also takes "²" or "١", which C{int} refuses
#: or reads as another number.)
_LISTED_NUMBER = re.compile(r"[0-9]{1,20}")
#: The white space around a unique id in a UIDL line, as clients read one
#: (C's isspace: fetchmail's sscanf; see L{clientsWord}).
_SPACES = " \t\r\n\v\f"


class POP3Failed(ImportFailed):
    """
    The POP3 server said no, or the connection failed.
    """


class POP3Refused(POP3Failed):
    """
    The POP3 server answered C{-ERR}: the session itself goes on.

    @ivar response: the server's line, as it came (but its line end).
    """

    response = ""


class MalformedResponse(POP3Failed):
    """
    The server answered with what POP3 cannot be (a UIDL listing that
    names a message twice, a status line without end): it will answer so
    again, so running the import again does not help.
    """


class NotSecure(POP3Failed):
    """
    The server cannot be used safely as it is (a certificate that cannot
    be verified, no STLS to protect the password): refused until the
    administrator says otherwise (C{--insecure}, C{pop3s://}), so running
    the import again does not help.
    """


class LoginRefused(POP3Refused):
    """
    The server refused the user name or the password, for good (not with
    a response code that says the refusal passes, L{SourceBusy}).
    """


class GreetingRefused(POP3Refused):
    """
    The server greeted with C{-ERR} without a response code that says it
    passes (C{[SYS/TEMP]}, L{SourceBusy}): it refuses this client, an
    access rule as a rule, and will refuse it again, so running the import
    again does not help (as for a refused login).
    """


class NoUniqueIds(POP3Failed):
    """
    The server has no UIDL: its messages have no unique ids to keep.
    Importing them under new ids would give leave-on-server clients every
    message again, so nothing is imported (exit status 69, the server
    cannot be used).
    """


class SourceBusy(POP3Failed):
    """
    The server will not open the maildrop for now (RFC 2449's C{[IN-USE]}:
    another client has it; C{[LOGIN-DELAY]}; C{[SYS/TEMP]}): running the
    import again later finishes it, so its exit status is 75, a temporary
    failure, not 69.
    """

    code = 75


#: The response codes (RFC 2449, 3206) of a refusal that passes.
_TEMPORARY_CODES = ("[IN-USE]", "[LOGIN-DELAY]", "[SYS/TEMP]")


def _temporary(refusal):
    """
    C{refusal} (a L{POP3Refused} of the login) as a L{SourceBusy} if its
    response code says it passes, else as a L{LoginRefused}.
    """
    text = str(refusal)
    if any(f"-ERR {code}" in text.upper() for code in _TEMPORARY_CODES):
        return SourceBusy(f"{text}: the server cannot open the maildrop now; run the import again later")
    return LoginRefused(text)


def passes(failure):
    """
    Whether C{failure}, which stopped a user's import before it began,
    may pass: the source busy (L{SourceBusy}), the connection failing.
    Not a refused login, a server without UIDL, a malformed answer, a
    server that cannot be used safely (L{NotSecure}), or what mailgate
    itself refuses (no such user): a run again meets them again.
    """
    if isinstance(failure, SourceBusy):
        return True
    return isinstance(failure, POP3Failed) and not isinstance(
        failure, (POP3Refused, NoUniqueIds, MalformedResponse, NotSecure)
    )


#: An APOP timestamp in a greeting (RFC 1939 section 7: a msg-id).
_APOP_TIMESTAMP = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")

#: What a refused PASS says when the server checked no password, so that
#: APOP may follow it (upper-cased): a word of APOP (qpopper's users kept
#: to APOP), or Dovecot's refusal of the PLAIN mechanism its USER and PASS
#: go through, where C{auth_mechanisms} has APOP (and CRAM-MD5) only: it
#: answers the right password and a wrong one alike with
#: "-ERR [AUTH] Unsupported authentication mechanism."
_PASS_NOT_CHECKED = ("APOP", "UNSUPPORTED AUTHENTICATION MECHANISM")


class TooLarge(ImportFailed):
    """
    A message over the largest size imported; it was read to its end, so
    the session goes on.
    """


def parseURL(url):
    """
    C{(tls, host, port, user, password)} from a C{pop3://} or C{pop3s://}
    URL; C{user} and C{password} are C{None} where the URL has none.

    @raise ImportFailed: for another scheme or a URL without a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # A URL with the password in it is shown without.
    shown = shownURL(url)
    if scheme not in DEFAULT_PORTS:
        raise ImportFailed(f"not a POP3 URL: {shown!r} (use pop3://user@host:port or pop3s://...)")
    if not parts.hostname:
        raise ImportFailed(f"no host in {shown!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ImportFailed(f"bad port in {shown!r}") from None
    user = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return scheme == "pop3s", parts.hostname, port, user, password


def pop3Source(url, user):
    """
    The identity of a POP3 maildrop as a source of imported mail: the
    server's host and port and the user whose maildrop it is, never the
    password.  The same maildrop given two ways is the same source: the
    host in lower case, without a final dot, an IP address in its one
    form (C{::1} for C{[0:0::1]}), the port given or the scheme's default
    (C{pop3://mail.example.org} is C{pop3://MAIL.example.org.:110}); the
    scheme itself (C{pop3s://} on 995 and C{pop3://} on 110 are two
    ports) and the user name's case (servers differ) are kept as given.

    @param user: the user whose maildrop is read (the URL's takes
        precedence, as it does for the login).
    """
    _, host, port, urlUser, _ = parseURL(url)
    host = host.rstrip(".")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        host = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return f"pop3:{quote(urlUser or user, safe='')}@{host}:{port}"


@implementer(IMessageSource)
class SpoolSource:
    """
    A message as RETR delivered it: in memory while small, in a temporary
    file beyond a megabyte.
    """

    #: imports never take a message for a client's retry (see FileSource)
    deliveryKey = None

    def __init__(self):
        self._file = tempfile.SpooledTemporaryFile(max_size=1 << 20)
        self.size = 0
        self.headerSize = None
        self._atLineStart = True
        self._dots = DotLineFinder()

    @property
    def dotLines(self):
        return self._dots.dotLines

    @property
    def dotOffsets(self):
        offsets = self._dots.dotOffsets
        # finish() may have taken a line break off the end.
        return None if offsets is None else [o for o in offsets if o < self.size]

    def write(self, piece):
        if self.headerSize is None and self._atLineStart and piece == b"\r\n":
            self.headerSize = self.size + 2
        self._dots.feed(piece)
        self._file.write(piece)
        self.size += len(piece)
        self._atLineStart = piece.endswith(b"\n")

    def finish(self, listedSize):
        """
        The message is complete.  If the server ended it with a line break
        it did not have (RETR is two octets longer than LIST said), take
        that off again.  Not when another line break comes before it: a
        server adds one only to a message that does not end with one, and
        a two-line message from a server whose LIST counts LF line ends is
        two octets longer too (its empty last line would be lost).
        """
        if listedSize is not None and self.size == listedSize + 2 and self.size >= 2:
            self._file.seek(max(self.size - 3, 0))
            end = self._file.read(3)
            if end.endswith(b"\r\n") and not (len(end) == 3 and end[0:1] == b"\n"):
                self._file.truncate(listedSize)
                self._file.seek(0, 2)
                self.size = listedSize
        if self.headerSize is None or self.headerSize > self.size:
            self.headerSize = self.size
        return self

    def withFirstDot(self):
        """
        This message with a "." put back in front (this spool is closed):
        for a first line the server did not stuff.
        """
        fixed = SpoolSource()
        fixed.write(b".")
        self._file.seek(0)
        while True:
            piece = self._file.readline(_PIECE)
            if not piece:
                break
            fixed.write(piece)
        self.close()
        return fixed

    def chunks(self, chunkSize):
        return fileChunks(self._file, chunkSize)

    def close(self):
        self._file.close()


class POP3Client:
    """
    A blocking POP3 client (RFC 1939, CAPA and STLS of RFC 2449 and 2595).
    """

    def __init__(self, host, port, tls=False, insecure=False, timeout=TIMEOUT):
        self.host = host
        self.port = port
        self.context = ssl.create_default_context()
        if insecure:
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        try:
            self._socket = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise POP3Failed(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        self.secure = False
        self._strayLines = 0
        self._reader = None
        try:
            if tls:
                self._startTLS()
            self._reader = self._socket.makefile("rb")
            self.greeting = self._greet()
        except BaseException:
            self.close()
            raise
        # Lines some servers send after their greeting's line (a banner
        # of several lines) are dropped before the first response.
        self._strayLines = _MAX_GREETING_LINES

    def _greet(self):
        """
        The server's greeting.

        @raise SourceBusy: for a C{-ERR} greeting whose response code
            says it passes (C{[SYS/TEMP]}: a server at its connection
            limit).
        @raise GreetingRefused: for another C{-ERR}.
        @raise MalformedResponse: for what is no POP3 greeting at all (an
            IMAP server's, the URL's port mistyped).
        """
        try:
            return self._status("the connection")
        except POP3Refused as e:
            if not e.response.startswith("-ERR"):
                raise MalformedResponse(
                    f"{self.host}:{self.port} does not answer as a POP3 server (it greets with "
                    f"{e.response[:80]!r}): check the URL's port"
                ) from None
            if any(f"-ERR {code}" in e.response.upper() for code in _TEMPORARY_CODES):
                raise SourceBusy(f"{e}: the server takes no connection now; run the import again later") from None
            raise GreetingRefused(str(e)) from None

    def peerAddress(self):
        """
        The IP address (text) of the server this client is connected to.
        """
        return self._socket.getpeername()[0]

    def _startTLS(self):
        try:
            self._socket = self.context.wrap_socket(self._socket, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raise NotSecure(
                f"the certificate of {self.host} cannot be verified ({e.verify_message}); "
                f"--insecure skips the check"
            ) from None
        except (ssl.SSLError, OSError) as e:
            raise POP3Failed(f"TLS with {self.host}:{self.port} failed: {e}") from None
        self.secure = True

    # -- the wire ------------------------------------------------------------

    def _send(self, line):
        try:
            self._socket.sendall(line.encode("utf-8") + b"\r\n")
        except OSError as e:
            raise POP3Failed(f"connection to {self.host} lost: {e}") from None

    def _readline(self, limit):
        try:
            line = self._reader.readline(limit)
        except (OSError, ValueError) as e:
            raise POP3Failed(f"connection to {self.host} lost: {e}") from None
        if not line:
            raise POP3Failed(f"{self.host} closed the connection")
        return line

    def _status(self, what="command"):
        line = self._readline(_MAX_STATUS)
        self._discardRestOf(line)
        while self._strayLines and not line.startswith((b"+OK", b"-ERR")):
            # More of a greeting of several lines: taken for this
            # response, it would make every later one the answer to the
            # command before.
            self._strayLines -= 1
            line = self._readline(_MAX_STATUS)
            self._discardRestOf(line)
        self._strayLines = 0
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if line.startswith(b"+OK"):
            return text
        refusal = POP3Refused(f"{self.host} refused {what}: {printable(text[:200])}")
        refusal.response = text
        raise refusal

    def _discardRestOf(self, line):
        """
        Read and drop the rest of a status line longer than one read: left
        unread, it would be taken for the next response, or for the first
        line of a message.
        """
        for _ in range(_MAX_STATUS_READS):
            if line.endswith(b"\n"):
                return
            line = self._readline(_MAX_STATUS)
        raise MalformedResponse(f"{self.host} sent a status line of over {_MAX_STATUS * _MAX_STATUS_READS} octets")

    def command(self, line, what=None):
        self._send(line)
        return self._status(what or line.split(" ", 1)[0])

    def _lines(self):
        """
        The lines of a multi-line response (dot-stuffing undone, CRLF
        ends), until the terminating ".".
        """
        while True:
            line = self._readline(_MAX_STATUS * 16)
            if line in (b".\r\n", b".\n"):
                return
            if line.startswith(b"."):
                line = line[1:]
            yield line

    def _pieces(self, firstLine=None):
        """
        A multi-line response's data, in pieces: lines, lines longer than
        a read cut where it ends; dot-stuffing undone, bare LF line ends
        made CRLF.

        A line that starts with one "." only was not stuffed (RFC 1939
        stuffs every line that starts with "."): it is kept as it came.
        Dovecot 2.3 sends the first line of a message so.

        @param firstLine: a list to which the first line's first piece is
            appended as it came (the terminator, if the response is empty).
        """
        atLineStart = True
        previousCR = False
        while True:
            piece = self._readline(_PIECE)
            if firstLine is not None:
                firstLine.append(piece)
                firstLine = None
            if atLineStart:
                if piece in (b".\r\n", b".\n"):
                    return
                if piece.startswith(b".."):
                    piece = piece[1:]
            if piece.endswith(b"\n") and not piece.endswith(b"\r\n") and not (piece == b"\n" and previousCR):
                piece = piece[:-1] + b"\r\n"
            atLineStart = piece.endswith(b"\n")
            previousCR = piece.endswith(b"\r")
            yield piece

    def _multiline(self, spool, maxSize, firstLine=None):
        """
        A multi-line response's data, written to C{spool}, at most
        C{maxSize} octets of it.

        @param firstLine: see L{_pieces}.
        @raise TooLarge: if there is more; the rest has been read (and
            dropped), so the session can go on.
        """
        pieces = self._pieces(firstLine)
        for piece in pieces:
            if spool.size + len(piece) > maxSize:
                for _ in pieces:
                    pass
                raise TooLarge(f"over {maxSize} octets, the largest message imported")
            spool.write(piece)

    # -- commands ----------------------------------------------------------------

    def capabilities(self):
        """
        The CAPA list (upper-cased keywords with their arguments), or an
        empty list if the server has no CAPA.
        """
        self._send("CAPA")
        try:
            self._status()
        except POP3Failed:
            return []
        return [line.rstrip(b"\r\n").decode("utf-8", "replace").upper() for line in self._lines()]

    def startTLS(self):
        self.command("STLS")
        self._startTLS()
        self._reader = self._socket.makefile("rb")

    def login(self, user, password):
        """
        USER and PASS; if the greeting has an APOP timestamp and USER is
        refused, or PASS in words that say no password was checked
        (L{_PASS_NOT_CHECKED}: a word of APOP, a Dovecot that offers APOP
        only), APOP (RFC 1939 section 7): a server may keep APOP users from
        logging in any other way.  Without a timestamp, after such a PASS,
        AUTH CRAM-MD5 where CAPA offers it (a Dovecot whose
        C{auth_mechanisms} has CRAM-MD5 and no PLAIN).  (Not after any
        refused PASS: a wrong password would count twice against the
        source's limits.)

        @raise SourceBusy: for a refusal that says it passes.
        @raise LoginRefused: for any other.
        """
        passRefused = False
        try:
            self.command(f"USER {user}", "the user name")
            passRefused = True
            self.command(f"PASS {password}", "the login")
            return
        except POP3Refused as e:
            refusal = _temporary(e)
            # The server's words only: the host name may hold "APOP".
            said = e.response.upper()
        stamp = _APOP_TIMESTAMP.search(self.greeting)
        passChecked = not any(words in said for words in _PASS_NOT_CHECKED)
        if isinstance(refusal, SourceBusy) or (passRefused and passChecked):
            raise refusal
        if stamp is None:
            if passRefused and "CRAM-MD5" in self._saslMechanisms():
                # No APOP, but CRAM-MD5 (Dovecot with auth_mechanisms =
                # cram-md5): the password is checked once, there.
                return self._cramMD5(user, password, refusal)
            raise refusal
        digest = hashlib.md5((stamp.group(0) + password).encode("utf-8")).hexdigest()
        try:
            self.command(f"APOP {user} {digest}", "APOP")
        except POP3Refused as e:
            raise _temporary(POP3Refused(f"{refusal}; {e}")) from None
        except POP3Failed:
            # Closed after the first refusal, as some servers do.
            raise refusal from None

    def _saslMechanisms(self):
        """
        The SASL mechanisms the server's CAPA offers (upper-cased), asked
        again now: a server may offer others once TLS is on.
        """
        for line in self.capabilities():
            name, *mechanisms = line.split()
            if name == "SASL":
                return mechanisms
        return []

    def _cramMD5(self, user, password, refusal):
        """
        AUTH CRAM-MD5 (RFC 2195), after C{refusal} of USER and PASS.

        @raise SourceBusy: for a refusal that says it passes.
        @raise LoginRefused: for any other.
        """
        self._send("AUTH CRAM-MD5")
        line = self._readline(_MAX_STATUS)
        self._discardRestOf(line)
        text = printable(line.rstrip(b"\r\n").decode("utf-8", "replace")[:200])
        if not line.startswith(b"+ "):
            raise _temporary(POP3Refused(f"{refusal}; {self.host} refused AUTH CRAM-MD5: {text}"))
        try:
            challenge = base64.b64decode(line[2:].strip(), validate=True)
        except binascii.Error:
            raise MalformedResponse(f"{self.host} sent a malformed CRAM-MD5 challenge: {text}") from None
        digest = hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
        answer = base64.b64encode(f"{user} {digest}".encode("utf-8")).decode("ascii")
        try:
            self.command(answer, "AUTH CRAM-MD5")
        except POP3Refused as e:
            raise _temporary(POP3Refused(f"{refusal}; {e}")) from None

    def uniqueIds(self):
        """
        C{[(number, unique id)]} from UIDL, the id as the line has it after
        the number (even empty, or with spaces: L{_importable} judges it).

        @raise NoUniqueIds: if the server has no UIDL (a refusal without
            a response code).
        """
        try:
            self.command("UIDL")
        except POP3Refused as e:
            if "-ERR [" in str(e):
                # A response code ([SYS/TEMP]: Dovecot's, when it cannot
                # read the maildrop): the server has UIDL, but failed.
                raise
            raise NoUniqueIds(
                f"{e}: without UIDL the messages have no unique ids to keep (new ones would make "
                f"every leave-on-server client download them all again); nothing was imported"
            ) from None
        found = []
        numbers = set()
        # Read to the end first: a refusal must not leave the rest of the
        # listing to be taken for the next response.
        for line in list(self._lines()):
            number, *rest = line.decode("utf-8", "replace").split(None, 1) or [""]
            if found and line[:1] in (b" ", b"\t"):
                # The rest of the id before it, served across a line
                # break: Dovecot with pop3_reuse_xuidl serves a folded
                # X-UIDL field as it is.  Clients read the listing line
                # by line, the id being the first line's (as import
                # maildir --reuse-xuidl reads the field).  Whatever it
                # holds, a number too (" 2 more": the field is the
                # sender's to write): no listed line begins with a space.
                continue
            if not _LISTED_NUMBER.fullmatch(number):
                raise MalformedResponse(f"{self.host} sent a malformed UIDL line: {line[:100]!r}")
            number = int(number)
            uidl = rest[0] if rest else ""
            if number in numbers:
                # Which of its ids would be the message's?  Importing it
                # under both would store it twice.
                raise MalformedResponse(f"{self.host} sent a malformed UIDL listing: message {number} twice")
            numbers.add(number)
            found.append((number, uidl.strip(_SPACES)))
        return found

    def sizes(self):
        """
        Message number to size, from LIST.
        """
        self.command("LIST")
        sizes = {}
        for line in self._lines():
            parts = line.decode("utf-8", "replace").split()
            if len(parts) >= 2 and all(_LISTED_NUMBER.fullmatch(part) for part in parts[:2]):
                sizes[int(parts[0])] = int(parts[1])
        return sizes

    def retrieve(self, number, listedSize=None, maxSize=MAX_MESSAGE_SIZE):
        """
        Message C{number} as an L{IMessageSource}.

        Dovecot 2.3 does not dot-stuff a message's first line.  One that
        starts with a single "." is kept as it came (L{_pieces}); one that
        starts with ".." lost a "." it needed, which C{listedSize} tells
        (the message is one octet short); and a first line "." ends the
        response at once, where LIST said there is more: the rest follows,
        up to the real end.

        @raise POP3Refused: if the server will not give it.
        @raise TooLarge: if it is over C{maxSize} octets.
        """
        self.command(f"RETR {number}", f"RETR {number}")
        spool = SpoolSource()
        first = []
        try:
            self._multiline(spool, maxSize, first)
            if listedSize and first[0] in (b".\r\n", b".\n"):
                # Empty where LIST said it was not: a first line "." the
                # server did not stuff (Dovecot 2.3), taken for the end.
                # The rest of the message follows, up to the real end.
                spool.write(b".\r\n")
                self._multiline(spool, maxSize)
            elif listedSize and first[0].startswith(b"..") and spool.size == listedSize - 1:
                # One octet short: a first line that starts with ".." was
                # not stuffed, and its first "." was taken off as stuffing.
                spool = spool.withFirstDot()
        except BaseException:
            spool.close()
            raise
        return spool.finish(listedSize)

    def delete(self, number):
        self.command(f"DELE {number}")

    def quit(self):
        """
        QUIT: the server applies the DELEs.
        """
        return self.command("QUIT", "QUIT (its deletions)")

    def close(self):
        for thing in (self._reader, self._socket):
            if thing is None:
                continue
            try:
                thing.close()
            except OSError:
                pass


def isLoopback(address):
    """
    Whether C{address} (the connected server's IP address, as text) is
    this machine's.
    """
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def cleartextAllowed(address, insecure):
    """
    Whether a password may be sent in the clear to a server at C{address}
    that offers no STLS: only to this machine (it never crosses a
    network), or when the administrator said C{insecure}.
    """
    return insecure or isLoopback(address)


def connect(url, user, password, insecure=False, warn=None, timeout=TIMEOUT):
    """
    A logged-in L{POP3Client} for C{url}.
    """
    tls, host, port, urlUser, urlPassword = parseURL(url)
    user = urlUser or user
    password = urlPassword if password is None else password
    for what, value in (("user name", user), ("password", password)):
        if value is not None and any(c in value for c in "\r\n\0"):
            # Sent as it is, a line break would end the command there and
            # send the rest to the server as commands of its own.
            raise ImportFailed(f"the {what} holds a line break or a NUL, which POP3 cannot send")
    client = POP3Client(host, port, tls=tls, insecure=insecure, timeout=timeout)
    try:
        if not tls:
            if "STLS" in client.capabilities():
                client.startTLS()
            elif not cleartextAllowed(client.peerAddress(), insecure):
                raise NotSecure(
                    f"{host} offers no STLS: the password would go over the network in the clear "
                    f"(use pop3s:// if the server has it; --insecure sends it anyway)"
                )
            elif warn is not None and not isLoopback(client.peerAddress()):
                warn(f"{host} offers no STLS: the password goes in the clear")
        client.login(user, password)
    except BaseException:
        client.close()
        raise
    return client


def importPOP3(
    store, url, address, password, user=None, insecure=False, delete=False, warn=None, now=None,
    maxSize=MAX_MESSAGE_SIZE, mirror=False, sourceUser=None, soleSource=False,
):
    """
    Copy a live POP3 maildrop into C{address}'s, keeping its unique ids.

    @param user: the POP3 user name when the URL has none (default:
        C{address}).
    @param maxSize: the largest message imported, in octets; a larger one
        is a failure.
    @param mirror: whether to take out of the maildrop, once the copy is
        done, what an earlier import from this source brought in and the
        source no longer lists (L{removeGone}); not with C{delete}, which
        empties the source.
    @param sourceUser: the user whose maildrop is read, where the login
        is another's (a master user's), for the source's identity
        (L{pop3Source}); default: the login's user.
    @param soleSource: with C{mirror}, whether this source alone filled
        the address: what was imported before mailgate recorded the
        source of each id counts as its.
    @return: an L{ImportReport}.
    @raise ImportFailed: if the server cannot be reached or refuses the
        login; failures later on are in the report.
    """
    if mirror and delete:
        raise ValueError("mirror and delete: what delete takes from the source, mirror would take out here next")
    now = int(time.time()) if now is None else now
    source = pop3Source(url, sourceUser or user or address)
    client = connect(url, user or address, password, insecure, warn)
    report = ImportReport()
    try:
        try:
            listed = _copy(client, store, address, report, delete, now, maxSize, warn, source)
            if mirror:
                removeGone(store, address, source, listed, report, soleSource)
        except NoUniqueIds:
            raise
        except MailgateError as e:
            # The connection broke, the store failed: the next run goes on
            # from there.  A malformed answer would be given again.
            report.failures.append(str(e))
            report.temporary = report.temporary or not isinstance(e, MalformedResponse)
        try:
            # With --delete, the server removes the messages marked now.
            client.quit()
        except POP3Failed as e:
            if delete:
                report.failures.append(f"{e}; nothing was deleted from the source")
                report.temporary = True
    finally:
        client.close()
    return report


def _copy(client, store, address, report, delete, now, maxSize, warn, source=None):
    listing = _importable(client.uniqueIds(), report, warn)
    sizes = client.sizes()
    present = fired(store.existingUidls(address, [uidl for _, uidl in listing]))
    numbers = {uidl: number for number, uidl in listing}
    committed = []
    writer = BatchWriter(store, address, report, onBatch=committed.extend, source=source)
    # Skipped as imported before: the source's, if none is recorded.
    known = []
    try:
        for number, uidl in listing:
            if not delete and sizes.get(number) in present.get(uidl, ()):
                # Imported by an earlier run, by its id and size.  (With
                # delete, the content itself is compared, by the store,
                # before the source may lose it.)
                report.skipped += 1
                known.append(uidl)
                continue
            if sizes.get(number, 0) > maxSize:
                # Not fetched: read to its end to be dropped, a message of
                # gigabytes would be downloaded for nothing, on every run.
                report.failures.append(
                    f"message {number} ({uidl}): over {maxSize} octets, the largest message imported "
                    f"(LIST gives {sizes[number]}); not imported"
                )
                continue
            _fetch(client, writer, number, uidl, sizes.get(number), now, maxSize, report)
    finally:
        # What was fetched completely is stored, even if the connection
        # broke after it.
        try:
            writer.flush()
        finally:
            if delete:
                _deleteCommitted(client, [numbers[uidl] for uidl in committed])
    claimPresent(store, address, source, known + writer.skipped)
    # What the source lists, imported now or not.
    return [uidl for _, uidl in listing]


def _importable(listing, report, warn):
    """
    C{(number, unique id)} of the messages of a UIDL listing to import: an
    id with spaces cut at the first (what clients keep: fetchmail and
    Thunderbird read the id as one word); an id the server repeats renamed
    (L{renameDuplicates}); an id POP3 cannot carry is a failure in the
    report.
    """
    words = []
    for number, uidl in listing:
        word = clientsWord(uidl)
        if word != uidl and warn is not None:
            warn(f"message {number}: unique id {uidl[:80]!r} has a space; imported as {word[:80]!r}, "
                 f"its first word, which clients keep")
        words.append((number, word))
    listing = words
    renamed = renameDuplicates([uidl for _, uidl in listing])
    importable = []
    for (number, original), uidl in zip(listing, renamed):
        if not validUidl(uidl):
            report.failures.append(f"message {number}: unique id {uidl[:80]!r} is not one POP3 can carry")
            continue
        if uidl != original and warn is not None:
            warn(f"message {number}: unique id {original} appears twice; imported as {uidl}")
        importable.append((number, uidl))
    return importable


def _fetch(client, writer, number, uidl, listedSize, now, maxSize, report):
    """
    RETR one message and queue it; one the server will not give, or too
    large, is a failure of its own.
    """
    try:
        source = client.retrieve(number, listedSize, maxSize)
    except (POP3Refused, TooLarge) as e:
        report.failures.append(f"message {number} ({uidl}): {e}; not imported")
        # A refusal may pass (a message another session holds, a storage
        # error); a size does not.
        report.temporary = report.temporary or isinstance(e, POP3Refused)
        return
    writer.add(uidl, source, now, f"message {number}")


def _deleteCommitted(client, numbers):
    """
    DELE what is safely in mailgate (imported, or there before with the
    same content); the server removes it at QUIT.  A connection that
    broke has no deletions to apply.
    """
    try:
        for number in numbers:
            client.delete(number)
    except POP3Failed:
        pass
