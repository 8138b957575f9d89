# -*- test-case-name: tests.test_importers -*-
"""
Importing a maildrop from a live POP3 server, through POP3: log in,
C{UIDL}, then C{RETR} every message mailgate does not have yet, keeping
the ids the server gave them.

  - C{pop3://user@host:port} or C{pop3s://...} (TLS from the first octet);
    a user name with C{@} is written C{%40}.  With C{pop3://}, C{STLS} is
    used when the server offers it.  Certificates are verified (against
    the system's trust store, or C{SSL_CERT_FILE}) unless C{insecure}.
  - Resumable: ids the maildrop already has are not fetched again, so an
    interrupted import is finished by running it again.
  - The source is left as it was, unless C{delete}: then each message is
    marked with C{DELE} once it is committed in mailgate, and the server
    removes them at C{QUIT}.
  - Octets are kept exactly: the message as RETR sent it, dot-stuffing
    undone; a message the server had to end with a line break it did not
    have (its RETR is two octets longer than its LIST size) gets it taken
    off again.

The client is a small blocking one (the admin command has no reactor), and
reads every response in bounded memory: a long line is read in pieces, a
large message goes to a temporary file.
"""

import socket
import ssl
import tempfile
import time
from urllib.parse import unquote, urlsplit

from zope.interface import implementer

from mailgate.errors import MailgateError
from mailgate.importers import BatchWriter, ImportFailed, ImportReport, validUidl
from mailgate.interfaces import IMessageSource
from mailgate.message import DotLineFinder, fileChunks

DEFAULT_PORTS = {"pop3": 110, "pop3s": 995}
TIMEOUT = 60
_MAX_STATUS = 4096
_PIECE = 1 << 16


class POP3Failed(ImportFailed):
    """
    The POP3 server said no, or the connection failed.
    """


def parseURL(url):
    """
    C{(tls, host, port, user, password)} from a C{pop3://} or C{pop3s://}
    URL; C{user} and C{password} are C{None} where the URL has none.

    @raise ImportFailed: for another scheme or a URL without a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ImportFailed(f"not a POP3 URL: {url!r} (use pop3://user@host:port or pop3s://...)")
    if not parts.hostname:
        raise ImportFailed(f"no host in {url!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ImportFailed(f"bad port in {url!r}") from None
    user = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return scheme == "pop3s", parts.hostname, port, user, password


@implementer(IMessageSource)
class SpoolSource:
    """
    A message as RETR delivered it: in memory while small, in a temporary
    file beyond a megabyte.
    """

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
        that off again.
        """
        if listedSize is not None and self.size == listedSize + 2:
            self._file.seek(self.size - 2)
            if self._file.read(2) == b"\r\n":
                self._file.truncate(listedSize)
                self._file.seek(0, 2)
                self.size = listedSize
        if self.headerSize is None or self.headerSize > self.size:
            self.headerSize = self.size
        return self

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
        if tls:
            self._startTLS()
        self._reader = self._socket.makefile("rb")
        self.greeting = self._status()

    def _startTLS(self):
        try:
            self._socket = self.context.wrap_socket(self._socket, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            raise POP3Failed(
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
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if line.startswith(b"+OK"):
            return text
        raise POP3Failed(f"{self.host} refused {what}: {text[:200]}")

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

    def _multiline(self, spool):
        """
        A multi-line response's data, written to C{spool}, lines longer
        than a read ending where they end; bare LF line ends made CRLF.
        """
        atLineStart = True
        previousCR = False
        while True:
            piece = self._readline(_PIECE)
            if atLineStart:
                if piece in (b".\r\n", b".\n"):
                    return
                if piece.startswith(b"."):
                    piece = piece[1:]
            if piece.endswith(b"\n") and not piece.endswith(b"\r\n") and not (piece == b"\n" and previousCR):
                piece = piece[:-1] + b"\r\n"
            atLineStart = piece.endswith(b"\n")
            previousCR = piece.endswith(b"\r")
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
        self.command(f"USER {user}", "the user name")
        self.command(f"PASS {password}", "the login")

    def uniqueIds(self):
        """
        C{[(number, unique id)]} from UIDL.
        """
        self.command("UIDL")
        found = []
        for line in self._lines():
            parts = line.decode("utf-8", "replace").split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise POP3Failed(f"{self.host} sent a malformed UIDL line: {line[:100]!r}")
            found.append((int(parts[0]), parts[1]))
        return found

    def sizes(self):
        """
        Message number to size, from LIST.
        """
        self.command("LIST")
        sizes = {}
        for line in self._lines():
            parts = line.decode("utf-8", "replace").split()
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                sizes[int(parts[0])] = int(parts[1])
        return sizes

    def retrieve(self, number, listedSize=None):
        """
        Message C{number} as an L{IMessageSource}.
        """
        self.command(f"RETR {number}", f"RETR {number}")
        spool = SpoolSource()
        try:
            self._multiline(spool)
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
            try:
                thing.close()
            except OSError:
                pass


def connect(url, user, password, insecure=False, warn=None, timeout=TIMEOUT):
    """
    A logged-in L{POP3Client} for C{url}.
    """
    tls, host, port, urlUser, urlPassword = parseURL(url)
    user = urlUser or user
    password = urlPassword if password is None else password
    client = POP3Client(host, port, tls=tls, insecure=insecure, timeout=timeout)
    try:
        if not tls:
            if "STLS" in client.capabilities():
                client.startTLS()
            elif warn is not None and host not in ("127.0.0.1", "::1", "localhost"):
                warn(f"{host} offers no STLS: the password goes in the clear")
        client.login(user, password)
    except BaseException:
        client.close()
        raise
    return client


def importPOP3(store, url, address, password, user=None, insecure=False, delete=False, warn=None, now=None):
    """
    Copy a live POP3 maildrop into C{address}'s, keeping its unique ids.

    @param user: the POP3 user name when the URL has none (default:
        C{address}).
    @return: an L{ImportReport}.
    @raise ImportFailed: if the server cannot be reached or refuses the
        login; failures later on are in the report.
    """
    now = int(time.time()) if now is None else now
    client = connect(url, user or address, password, insecure, warn)
    report = ImportReport()
    try:
        try:
            _copy(client, store, address, report, delete, now)
        except MailgateError as e:
            report.failures.append(str(e))
        try:
            # With --delete, the server removes the messages marked now.
            client.quit()
        except POP3Failed as e:
            if delete:
                report.failures.append(f"{e}; nothing was deleted from the source")
    finally:
        client.close()
    return report


def _copy(client, store, address, report, delete, now):
    from mailgate.importers import fired

    listing = client.uniqueIds()
    sizes = client.sizes()
    present = fired(store.existingUidls(address, [uidl for _, uidl in listing]))
    numbers = {}
    pending = []
    committed = []
    writer = BatchWriter(store, address, report, onBatch=committed.extend)
    seen = {}
    for number, uidl in listing:
        if uidl in seen:
            seen[uidl] += 1
            uidl = f"{uidl}-{seen[uidl]}"
        seen.setdefault(uidl, 1)
        numbers[uidl] = number
        if uidl in present:
            report.skipped += 1
            committed.append(uidl)
            continue
        if not validUidl(uidl):
            report.failures.append(f"message {number}: unique id {uidl[:80]!r} is not one POP3 can carry")
            continue
        pending.append((number, uidl))
    try:
        for number, uidl in pending:
            writer.add(uidl, client.retrieve(number, sizes.get(number)), now)
        writer.flush()
    finally:
        if delete:
            # Only what is safely in mailgate; the server removes it at
            # QUIT.  (A connection that broke has no deletions to apply.)
            try:
                for uidl in committed:
                    client.delete(numbers[uidl])
            except POP3Failed:
                pass
