# -*- test-case-name: tests.test_smtp_chunking -*-
"""
Reading a message sent in chunks: RFC 3030's BDAT, for SMTP and LMTP.

A BDAT command says how many octets follow it, and exactly that many are
the chunk: no dot-stuffing, no terminator, so nothing in a message can end
it early or be taken for a command (the SMTP smuggling DATA's readers must
guard against cannot happen here).  A message is one or more chunks, the
last one's command marked C{LAST}.

What is stored is the same as for DATA (L{mailgate.smtp.data}): the
message's lines with CRLF ends, a bare LF made CRLF, lines of any length
stored in pieces as they come, and a message that does not end its last
line given a CRLF there, so that POP3 can send every message whole.  A
chunk may end anywhere, in the middle of a line or between a CR and its
LF: L{ChunkedMessage} carries what a line end needs across the boundary.
"""

import re

from mailgate.smtp.data import MessageContent

#: RFC 3030 section 2: C{"BDAT" SP chunk-size [SP end-marker]}, the size a
#: decimal number of octets, the end marker C{LAST} (in any case).  Twenty
#: digits are more than any size: a longer number is no size at all.  In
#: ASCII's case only: matched case-blind over Unicode, C{LA\u017fT} (a
#: long s) would be C{LAST}, a chunk ending its message where a stricter
#: parser on the way sees a malformed command.
_BDAT_ARGUMENT = re.compile(r"^([0-9]{1,20})(?: +(LAST))? *$", re.IGNORECASE | re.ASCII)


class BDATSyntaxError(ValueError):
    """
    A BDAT command whose argument is not C{chunk-size [LAST]}: how many
    octets follow it is unknown, so nothing after it can be read as a
    command.
    """


def parseBDAT(argument):
    """
    The chunk's size and whether it is the message's last, from a BDAT
    command's argument.

    @raise BDATSyntaxError: if it is not C{chunk-size [LAST]}.
    """
    match = _BDAT_ARGUMENT.match(argument.strip(" "))
    if match is None:
        raise BDATSyntaxError(argument)
    return int(match.group(1)), match.group(2) is not None


class ChunkedMessage(MessageContent):
    """
    The content of one message as its chunks arrive, stored into a
    L{mailgate.message.MessageSpool} in canonical form, under the limits
    DATA's content has (L{MessageContent}).

    @ivar started: when its first chunk came, by the session's monotonic clock: the
        minimum data rate bounds the message from there to its last chunk,
        as it bounds DATA from the 354 to the final dot.
    @ivar wireOctets: octets of its chunks read so far, as sent.
    """

    def __init__(self, spool, maxSize, maxLineLength=None, digest=None, started=None, afterTrace=False):
        super().__init__(spool, maxSize, maxLineLength, digest, afterTrace)
        self.started = started
        self.wireOctets = 0
        # A CR that ended the last piece: whether it ends a line depends
        # on the octet after it, in the next piece.
        self._heldCR = False
        # Whether the next octet stored begins a line, and how long the
        # line being stored is so far (for maxLineLength).
        self._atLineStart = True
        self._lineLength = 0

    def add(self, piece):
        """
        Store the next octets of the message, as they came.
        """
        self.wireOctets += len(piece)
        if self.failed or not piece:
            return
        if self._heldCR:
            piece = b"\r" + piece
            self._heldCR = False
        if piece[-1] == 0x0D:
            self._heldCR = True
            piece = piece[:-1]
            if not piece:
                return
        if self.maxLineLength is not None:
            self._checkLineLengths(piece)
            if self.failed:
                return
        self._store(piece)

    def _checkLineLengths(self, piece):
        """
        Refuse the message once a line (CRLF included) is longer than
        L{maxLineLength}, counting a line's octets across pieces.
        """
        first = piece.find(b"\n")
        if first < 0:
            self._lineLength += len(piece)
            # Its CRLF is still to come.
            longest = self._lineLength + 2
        else:
            longest = self._lineLength + first + 1
            last = piece.rfind(b"\n")
            if last > first:
                longest = max(longest, max(map(len, piece[first + 1 : last].split(b"\n"))) + 1)
            self._lineLength = len(piece) - last - 1
        if longest > self.maxLineLength:
            self._refuseLongLine()

    def _store(self, block):
        # A bare LF becomes CRLF: the block ends a line as it ended one.
        if self._keep(block, self._atLineStart):
            self._atLineStart = block[-1] == 0x0A

    def finish(self):
        """
        The last chunk has been stored: end the last line if it was not
        ended (a lone CR at the very end is taken for its line's end), and
        finish the spool.

        @return: the finished spool, or C{None} if the message failed
            (L{failed}) on the way.
        """
        # Not after a failure: its spool is closed (a file, past the memory
        # limit, that cannot be written to any more).
        if not self.failed and (self._heldCR or not self._atLineStart):
            self._heldCR = False
            self._store(b"\r\n")
        if self.failed:
            return None
        try:
            return self.spool.finish()
        except OSError as error:
            # Its last octets, held in the file's buffer until now, could
            # not be written (the disk filled up).
            self.storageFailed = True
            self.storageError = error
            self.spool.close()
            return None


class ChunkReader:
    """
    The raw-input receiver for one BDAT chunk: takes exactly C{size}
    octets from the connection, hands them to C{message} (or drops them,
    for a chunk refused or of a failed transaction: C{message} is
    C{None}), and gives back what followed them.

    @ivar size: the chunk's size, as its command said.
    @ivar last: whether its command said C{LAST}.
    @ivar refusal: the reply a chunk whose octets are only read to be
        dropped gets once they have been, as C{(code, enhanced, text,
        counted)}, C{counted} saying whether the refusal counts as the
        client's error.
    @ivar wireOctets: octets of the chunk read so far.
    """

    def __init__(self, message, size, last, refusal=None):
        self.message = message
        self.size = size
        self.last = last
        self.refusal = refusal
        self.wireOctets = 0

    def feed(self, data):
        """
        Consume octets from the wire.

        @return: C{None} while the chunk goes on; once its last octet has
            been read, the octets that followed it (the next command).
        """
        wanted = self.size - self.wireOctets
        if len(data) > wanted:
            data, rest = data[:wanted], data[wanted:]
        else:
            rest = None
        self.wireOctets += len(data)
        if self.message is not None:
            self.message.add(data)
        if self.wireOctets < self.size:
            return None
        return b"" if rest is None else rest

    def discard(self):
        """
        The session ended in the middle of the chunk: drop what it was
        storing into.
        """
        if self.message is not None:
            self.message.discard()
            self.message = None
