# -*- test-case-name: tests.test_message -*-
"""
Messages on their way into the store.

L{MessageSpool} collects a message as it arrives (line by line from SMTP
DATA, or block by block from standard input), normalises every line end to
CRLF, measures it, and keeps it in memory only while it is small: a large
message spills to a temporary file, so intake never holds it whole.  The
spools of the process share a budget of memory as well: past it, a spool
spills however small its message, so that many messages arriving at once
(a thousand connections each sending just under the limit, slowly) cannot
hold a thousand times the limit.
"""

import hashlib
import os
import re
import tempfile
import threading
from array import array

from zope.interface import implementer

from mailgate.interfaces import IMessageSource

SPOOL_MEMORY_LIMIT = 1 << 20

#: Octets all the spools of the process may hold in memory together.
SPOOL_MEMORY_BUDGET = 64 << 20


class _MemoryBudget:
    """
    The octets spools hold in memory now, across the process.  A spool
    gives back what it holds when it spills, is closed, or is freed (if
    nobody closed it): the count never drifts upward.
    """

    def __init__(self):
        self.held = 0
        self._lock = threading.Lock()

    def take(self, octets):
        """
        Hold C{octets} more, if the budget has room; whether it had.
        """
        with self._lock:
            if self.held + octets > SPOOL_MEMORY_BUDGET:
                return False
            self.held += octets
            return True

    def giveBack(self, holding):
        """
        Give back what a spool holds (C{holding}: a one-item list, the
        spool's count, set to zero).
        """
        with self._lock:
            self.held -= holding[0]
            holding[0] = 0


_budget = _MemoryBudget()


def spooledInMemory():
    """
    Octets the spools of this process hold in memory now.
    """
    return _budget.held

#: Octets of a line without its end that L{MessageSpool.writeData} holds
#: back; a longer line is written in pieces as it arrives.
WRITE_PARTIAL_LINE = 64 * 1024

#: The most line positions a message's L{MessageSpool.dotOffsets} keeps; a
#: message with more lines that start with "." (nearly always a crafted
#: one) is stuffed by searching it, as one stored without them.
MAX_DOT_OFFSETS = 10_000


def dotLineOffsets(data, base=0, atLineStart=True):
    """
    Where the lines of C{data} that start with "." begin, as offsets from
    C{base}; C{atLineStart}: C{data} begins a line (else it continues one).
    """
    found = [base] if atLineStart and data[:1] == b"." else []
    at = data.find(b"\n.")
    while at >= 0:
        found.append(base + at + 1)
        at = data.find(b"\n.", at + 2)
    return found


class DotLineFinder:
    """
    L{dotLineOffsets} over a message given in pieces cut anywhere, for the
    sources that read a message as it comes (files, another server).

    @ivar dotLines: whether a line seen so far starts with ".".
    @ivar dotOffsets: where such lines begin; C{None} once there are more
        than L{MAX_DOT_OFFSETS}.
    """

    def __init__(self):
        self.dotLines = False
        self.dotOffsets = []
        self._position = 0
        self._atLineStart = True

    def feed(self, piece):
        if not piece:
            return
        if (self._atLineStart and piece[:1] == b".") or b"\n." in piece:
            self.dotLines = True
            if self.dotOffsets is not None:
                found = dotLineOffsets(piece, self._position)
                if found and found[0] == self._position and not self._atLineStart:
                    found.pop(0)
                self.dotOffsets.extend(found)
                if len(self.dotOffsets) > MAX_DOT_OFFSETS:
                    self.dotOffsets = None
        self._position += len(piece)
        self._atLineStart = piece[-1:] == b"\n"


@implementer(IMessageSource)
class MessageSpool:
    """
    A message being received, stored in canonical form: CRLF line ends.

    @ivar size: octets written so far.
    @ivar headerSize: octets of the header section including its ending
        empty line, once that line has been seen; the whole size until then.
    @ivar dotLines: whether some line starts with ".", so that POP3 must
        dot-stuff the message (learnt once here, not at every RETR).
    @ivar dotOffsets: where those lines begin (an C{array} of offsets, so
        that POP3 stuffs by copying slices), or C{None} if there were more
        than L{MAX_DOT_OFFSETS}.
    @ivar deliveryKey: what tells a client's retry of this message (see
        L{mailgate.interfaces.IMessageSource}), set by whoever received
        it; C{None}: none.
    """

    deliveryKey = None

    def __init__(self, memoryLimit=SPOOL_MEMORY_LIMIT, directory=None):
        """
        @param directory: where the temporary file goes (C{--spool-directory},
            as Dovecot's C{mail_temp_dir}); C{None}: the system's temporary
            directory.
        """
        # Small messages (nearly all of them) stay in memory, in one buffer
        # however many pieces they came in (a piece of its own for each of
        # them would cost some forty octets more than the piece: a client
        # sending its message an octet or two at a time would make the
        # spool hold twenty times the message); the first write past
        # memoryLimit moves everything to a temporary file.  Once the
        # message is finished, its octets are one bytes object
        # (L{_finished}), which the store reads from another thread.
        self._memoryLimit = memoryLimit
        self._directory = directory
        self._memory = bytearray()
        self._finished = None
        self._file = None
        # What this spool holds of the process's budget.
        self._holding = [0]
        self.size = 0
        self._headerSize = None
        self._partial = b""
        # Part of the line being written by writeData has been written
        # already (a long line, in pieces).
        self._midLine = False
        self.dotLines = False
        # Eight octets an offset: a list of ints held some 40, so a message
        # of "..", one dot line in four octets sent, held ten times what
        # the client sent (430 KB for 40 KB).
        self.dotOffsets = array("q")

    def _write(self, data):
        if self._file is not None:
            self._file.write(data)
            return
        if self._finished is not None:
            # Written to after finish(): back to a buffer.
            self._memory, self._finished = bytearray(self._finished), None
        if self.size + len(data) > self._memoryLimit or not _budget.take(len(data)):
            self._file = tempfile.TemporaryFile(dir=self._directory)
            self._file.write(self._memory)
            self._file.write(data)
            self._memory = None
            _budget.giveBack(self._holding)
        else:
            self._memory += data
            self._holding[0] += len(data)

    @property
    def headerSize(self):
        return self.size if self._headerSize is None else self._headerSize

    def writeLine(self, line):
        """
        Append one line, given without its line end.
        """
        self._write(line + b"\r\n")
        if line[:1] == b".":
            self.dotLines = True
            self._noteDotLines([self.size])
        self.size += len(line) + 2
        if self._headerSize is None and not line:
            self._headerSize = self.size

    def writeBlock(self, block, atLineStart=True):
        """
        Append octets with CRLF line ends, as they are (the fast path for
        SMTP DATA): complete lines, or a piece of a long line.

        @param atLineStart: C{block} begins a line; else it continues the
            last one written (whose first octets do not begin a line).
        """
        if self._headerSize is None:
            if atLineStart and block.startswith(b"\r\n"):
                self._headerSize = self.size + 2
            else:
                end = block.find(b"\n\r\n")
                if end >= 0:
                    self._headerSize = self.size + end + 3
        if (atLineStart and block[:1] == b".") or b"\n." in block:
            self.dotLines = True
            if self.dotOffsets is not None:
                self._noteDotLines(dotLineOffsets(block, self.size, atLineStart))
        self._write(block)
        self.size += len(block)

    def _noteDotLines(self, offsets):
        if self.dotOffsets is None:
            return
        self.dotOffsets.extend(offsets)
        if len(self.dotOffsets) > MAX_DOT_OFFSETS:
            self.dotOffsets = None

    def writeLines(self, lines):
        """
        Append several lines, each given without its line end.
        """
        for line in lines:
            self.writeLine(line)

    def writeData(self, data):
        """
        Append raw octets whose lines end in LF or CRLF (a bare LF is made
        CRLF, a CR not before an LF is kept); a final line without its end
        is held back until more data or L{finish}.

        Written as blocks of lines, and a line longer than
        L{WRITE_PARTIAL_LINE} in pieces as it arrives, as SMTP's DATA
        stores it: a message of one line without a line end (a binary file
        piped to C{mailgate deliver}) held that line in memory whole and
        copied it at every read, 134 MB and 13 s for 40 MB.
        """
        if not data:
            return
        if self._partial:
            data = self._partial + data
        last = data.rfind(b"\n")
        if last >= 0:
            complete, partial = data[: last + 1], data[last + 1:]
            if complete.count(b"\n") != complete.count(b"\r\n"):
                # Every LF made CRLF, a CR before it kept (CR CR LF stays):
                # twice as fast as a regular expression on a pipe's LF lines.
                complete = complete.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            self.writeBlock(complete, not self._midLine)
            self._midLine = False
        else:
            partial = data
        if len(partial) > WRITE_PARTIAL_LINE:
            # All but its last octet, which may be a CR whose LF is still
            # to come.
            self.writeBlock(partial[:-1], not self._midLine)
            self._midLine = True
            partial = partial[-1:]
        self._partial = partial

    def finish(self):
        """
        Complete the message: a last line without a line end gets one, so
        every stored message ends in CRLF (or is empty).
        """
        if self._partial or self._midLine:
            partial, self._partial = self._partial, b""
            if partial.endswith(b"\r"):
                partial = partial[:-1]
            self.writeBlock(partial + b"\r\n", not self._midLine)
            self._midLine = False
        if self._file is not None:
            self._file.flush()
        elif self._finished is None:
            self._finished, self._memory = bytes(self._memory), None
        return self

    def chunks(self, chunkSize):
        """
        Iterate over the stored octets.  Called from a store worker thread
        while nothing else touches the spool.
        """
        if self._file is None:
            data = self._finished if self._finished is not None else bytes(self._memory or b"")
            for start in range(0, len(data), chunkSize):
                yield data[start : start + chunkSize]
            return
        yield from fileChunks(self._file, chunkSize)

    def getvalue(self):
        """
        The whole message as L{bytes}; for tests and small messages only.
        """
        return b"".join(self.chunks(1 << 20))

    def __del__(self):
        # A spool nobody closed gives its share back all the same.
        if self._holding[0]:
            _budget.giveBack(self._holding)

    def close(self):
        """
        Discard the spooled octets.
        """
        self._memory = bytearray()
        self._finished = None
        _budget.giveBack(self._holding)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                # Closing flushes first: what the full disk refused is
                # discarded anyway, and the file is closed all the same.
                pass


#: the header fields that make a message's octets its own: one of them (a
#: Message-ID, an earlier hop's trace field with its queue id) is in what
#: an MTA or a mail program sends.  Not a Date: alone, which a script
#: sending the same alert twice in a second gives both copies.
_IDENTIFYING_FIELD = re.compile(rb"(?:message-id|received)[ \t]*:", re.IGNORECASE)
#: octets of a message's start looked at to find them (its header
#: section, as a rule: past this, a message is not taken for a retry)
_HEADER_LOOKED_AT = 64 * 1024


class DeliveryKey:
    """
    Makes a message's delivery key (see
    L{mailgate.interfaces.IMessageSource}) as its octets arrive: the
    same message by the same protocol (C{"smtp"}, C{"lmtp"}, C{"local"})
    from the same envelope sender, sent again, has the same key (whatever
    its MAIL FROM parameters: a client may declare another SIZE, or
    none, when it tries again).

    Fed the octets as received (dot-stuffing undone, before the server's
    own trace fields).  A message whose header section holds no
    Message-ID nor trace field of an earlier hop gets no key: such octets
    (a device's fixed alert, a script's, dated to the second at most) may
    well be sent again as a new message, and are stored every time.
    """

    def __init__(self, protocol, sender):
        text = f"{protocol}\0{sender}".encode("utf-8", "surrogateescape")
        self._hash = hashlib.sha256(b"mailgate delivery key\0" + text + b"\0\0")
        # Looking at the header section, line by line, for a field that
        # identifies the message: the line not yet ended, the octets seen.
        self._looking = True
        self._line = b""
        self._seen = 0
        self._identified = False

    def update(self, data):
        self._hash.update(data)
        if self._looking:
            self._look(data[: _HEADER_LOOKED_AT - self._seen])

    def _look(self, piece):
        self._seen += len(piece)
        if b"\n" not in piece:
            # The line goes on (a BDAT chunk may be one octet of it): added
            # to in place.  Joined to the line so far and split at every
            # piece, a header line sent in one-octet chunks cost a copy of
            # the whole line per octet (27 us a chunk 64 KB into the line,
            # 8 at its start).
            if type(self._line) is not bytearray:
                self._line = bytearray(self._line)
            self._line += piece
            if self._seen >= _HEADER_LOOKED_AT:
                self._looking = False
                self._line = b""
            return
        lines = (self._line + piece).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            if line in (b"", b"\r"):
                # The header section ended without one.
                self._looking = False
                break
            if _IDENTIFYING_FIELD.match(line):
                self._identified = True
                self._looking = False
                break
        if self._seen >= _HEADER_LOOKED_AT:
            self._looking = False
        if not self._looking:
            self._line = b""

    def key(self):
        """
        The key (128 bits of SHA-256: a collision between two messages of
        one user is what must not happen), or C{None} for a message
        without an identifying field.
        """
        return self._hash.digest()[:16] if self._identified else None


def fileChunks(file, chunkSize):
    """
    The whole content of the binary C{file}, from its start, in pieces of
    at most C{chunkSize} octets.
    """
    file.seek(0)
    while True:
        chunk = file.read(chunkSize)
        if not chunk:
            return
        yield chunk


def spoolBytes(data):
    """
    A finished L{MessageSpool} holding C{data}, line ends normalised.
    """
    spool = MessageSpool()
    spool.writeData(data)
    return spool.finish()


def spoolFile(fileObject, blockSize=1 << 16, headerLines=(), sender=None, directory=None):
    """
    A finished L{MessageSpool} holding what C{fileObject} yields until EOF.

    @param headerLines: lines (without line ends) to put first, such as
        trace fields.
    @param sender: the envelope sender, for the spool's C{deliveryKey} (of
        the octets read, not of C{headerLines}); C{None}: no key.
    @param directory: see L{MessageSpool}.
    """
    spool = MessageSpool(directory=directory)
    spool.writeLines(headerLines)
    keyed = None if sender is None else DeliveryKey("local", sender)
    while True:
        block = fileObject.read(blockSize)
        if not block:
            break
        if keyed is not None:
            keyed.update(block)
        spool.writeData(block)
    if keyed is not None:
        spool.deliveryKey = keyed.key()
    return spool.finish()


def checkSpoolDirectory(path):
    """
    Check that messages can be spooled in the directory at C{path}, by
    making (and at once removing) a temporary file there, as a spool
    will: at start, so that a mistyped or unwritable C{--spool-directory}
    stops start-up rather than refuse every large message with 452.

    @raise OSError: it cannot be used.
    """
    if not os.path.lexists(path):
        # As a start or reload after a mistyped path or a directory not
        # made yet: it said "is not a directory" of what is not there.
        raise FileNotFoundError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    with tempfile.TemporaryFile(dir=path):
        pass
