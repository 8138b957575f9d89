# -*- test-case-name: tests.test_smtp_data -*-
"""
Reading the DATA section of an SMTP or LMTP transaction.

The reader works on blocks of complete lines, with C-speed bytes operations
(search, replace), not on one line at a time: under load the cost of DATA is
the cost of copying it to the spool.

It is strict where strictness prevents SMTP smuggling: only CRLF "." CRLF
ends the data, never a "." line next to a bare LF, and an over-long line
never drops the reader out of DATA mode.

Lines of any length are accepted by default, as Postfix and Dovecot's LMTP
accept them: RFC 5321 asks senders to keep lines within 1000 octets, but
mail with longer ones (HTML from bulk mailers, a forwarding fetchmail, a
long To: field) is common, and refusing it bounces real mail.  Memory stays
bounded: a line longer than L{FLUSH_PARTIAL_LINE} is stored in pieces as it
arrives.  With a C{maxLineLength}, a longer line is refused instead: the
rest of the data is read (and discarded) up to the real end, and the
transaction is refused there.
"""

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 5321 section 4.5.2: a leading dot is removed when other characters
# follow it on the line; a lone "." that did not end the data (it sat next
# to a bare LF) stays as it is.
_STUFFED_DOT = re.compile(rb"^\.(?!\r?\n)", re.MULTILINE)
# The same, in a block that begins in the middle of a line.
_STUFFED_DOT_AFTER_LF = re.compile(rb"(?<=\n)\.(?!\r?\n)")

#: Octets of a line without its end held before they are stored: a longer
#: line is stored in pieces as it arrives.
FLUSH_PARTIAL_LINE = 64 * 1024


class MessageContent:
    """
    A message's content on its way into a L{mailgate.message.MessageSpool},
    canonical CRLF line ends, under the limits of its session: what the
    readers of DATA (L{DataReader}) and of BDAT chunks
    (L{mailgate.smtp.chunks.ChunkedMessage}) share.

    @ivar tooLarge: the content exceeded C{maxSize}; nothing more is stored.
    @ivar lineTooLong: a line exceeded C{maxLineLength} octets (CRLF
        included); nothing more is stored.  Never, without a
        C{maxLineLength} (C{None}: lines of any length).
    @ivar received: octets of content stored (after un-stuffing).
    @ivar bareLineFeeds: whether bare LFs were seen (and made CRLF).
    @ivar storageFailed: the spool could not be written (a full disk);
        nothing more is stored, the rest of the data is read and dropped.
    @ivar storageError: the C{OSError} that failed it, which says what to
        answer (no room, or a local error such as no file descriptors).
    @ivar digest: a L{mailgate.message.DeliveryKey} fed every octet of
        content stored, or C{None}.
    @ivar afterTrace: the spool begins with mailgate's trace fields, which
        the content must not continue (see L{_keep}).
    """

    def __init__(self, spool, maxSize, maxLineLength=None, digest=None, afterTrace=False):
        self.spool = spool
        self.digest = digest
        self.afterTrace = afterTrace
        self.maxSize = maxSize
        self.maxLineLength = maxLineLength
        self.tooLarge = False
        self.lineTooLong = False
        self.received = 0
        self.bareLineFeeds = False
        self.storageFailed = False
        self.storageError = None

    @property
    def failed(self):
        return self.tooLarge or self.lineTooLong or self.storageFailed

    def discard(self):
        """
        The message will not be delivered: drop what was stored.
        """
        self.spool.close()

    def _refuseLongLine(self):
        if not self.lineTooLong:
            self.lineTooLong = True
            self.spool.close()

    def _keep(self, block, atLineStart):
        """
        Store a block without stuffing, that begins a line (C{atLineStart})
        or continues the last one: a bare LF made CRLF, then counted
        against L{maxSize}, fed to the digest, written to the spool.

        @return: whether it was stored.
        """
        if block.count(b"\n") != block.count(b"\r\n"):
            self.bareLineFeeds = True
            block = _BARE_LF.sub(b"\r\n", block)
        # Content whose first line begins with a space or a tab would
        # continue the field before it (RFC 5322 section 2.2.3): mailgate's
        # own Received field, to which a sender then added what it liked
        # after the date.  Such a line begins no header field: an empty
        # line first ends the header with mailgate's fields, and the
        # content is the message's body, as Postfix's cleanup makes it.
        # Not content: not counted, nor part of the delivery key.
        separated = self.afterTrace and self.received == 0 and block[:1] in (b" ", b"\t")
        self.received += len(block)
        if self.received > self.maxSize:
            self.tooLarge = True
            self.spool.close()
            return False
        if self.digest is not None:
            self.digest.update(block)
        try:
            if separated:
                self.spool.writeBlock(b"\r\n")
            self.spool.writeBlock(block, atLineStart)
        except OSError as error:
            self.storageFailed = True
            self.storageError = error
            self.spool.close()
            return False
        return True


class DataReader(MessageContent):
    """
    Decodes the wire form of DATA (dot-stuffed, CRLF . CRLF terminated)
    into a L{mailgate.message.MessageSpool}, canonical CRLF line ends.

    @ivar wireOctets: octets read from the connection, as sent.
    """

    def __init__(self, spool, maxSize, maxLineLength=None, digest=None, afterTrace=False):
        super().__init__(spool, maxSize, maxLineLength, digest, afterTrace)
        self.wireOctets = 0
        self._carry = b""
        self._previousEndedCRLF = True
        self._skippingLine = False
        self._skippedCR = False
        # Part of the current line has been stored already (a long line
        # stored in pieces): what comes next does not begin a line.
        self._midLine = False

    def feed(self, data):
        """
        Consume octets from the wire.

        @return: C{None} while the data section goes on; once its end has
            been read, the octets that followed it (pipelined commands).
        """
        self.wireOctets += len(data)
        if self._skippingLine:
            newline = data.find(b"\n")
            if newline < 0:
                if data:
                    self._skippedCR = data[-1] == 0x0D
                return None
            self._previousEndedCRLF = data[newline - 1] == 0x0D if newline > 0 else self._skippedCR
            data = data[newline + 1:]
            self._skippingLine = False
            self._skippedCR = False
            last = data.rfind(b"\n")
        elif self._carry:
            carry = self._carry
            last = data.rfind(b"\n")
            if last < 0 and self.maxLineLength is None and len(carry) + len(data) <= FLUSH_PARTIAL_LINE:
                # A long line going on in small reads: added to in place.
                # Joined to each read, a line sent an octet at a time cost
                # a copy of the whole line per octet (3 us a read 64 KiB
                # into it, 1 at its start).
                if type(carry) is bytes:
                    self._carry = carry = bytearray(carry)
                carry += data
                return None
            if last >= 0:
                last += len(carry)
            data = carry + data if type(carry) is bytes else b"".join((carry, data))
            self._carry = b""
        else:
            last = data.rfind(b"\n")
        if last < 0:
            complete, partial = b"", data
        else:
            complete, partial = data[: last + 1], data[last + 1:]
        if complete:
            if self._previousEndedCRLF and complete.startswith(b".\r\n"):
                end = 0
            else:
                found = complete.find(b"\r\n.\r\n")
                end = found + 2 if found >= 0 else -1
            if end >= 0:
                self._store(complete[:end], not self._midLine)
                return complete[end + 3:] + partial
            self._store(complete, not self._midLine)
            self._midLine = False
            self._previousEndedCRLF = complete.endswith(b"\r\n")
        if self.maxLineLength is None:
            # Three octets at least: the piece stored then keeps an octet
            # after a stuffing dot, so it begins the stored line.
            if len(partial) > max(FLUSH_PARTIAL_LINE, 2):
                # Store all but its last octet (a CR whose LF is still to
                # come stays with it).
                self._store(partial[:-1], not self._midLine)
                partial = partial[-1:]
                self._midLine = True
                self._previousEndedCRLF = False
            self._carry = partial
        # A leading dot is transparency's, not the line's (RFC 5321 section
        # 4.5.3.1.6): such a line may be one octet longer on the wire.  No line
        # yet, or the start of the "." line that ends the data, is never
        # refused, whatever the limit.
        elif (
            len(partial) >= self.maxLineLength + (partial[:1] == b".")
            and partial not in (b"", b".", b".\r")
        ):
            # A line this long is refused whatever follows: drop it as it
            # arrives instead of buffering it.
            self._refuseLongLine()
            self._skippingLine = True
            self._skippedCR = partial[-1] == 0x0D
        else:
            self._carry = partial
        return None

    def _store(self, block, atLineStart=True):
        """
        Store a block of lines: un-stuff, make line ends CRLF, and enforce
        the limits.  The block ends a line, or is a piece of a long one;
        C{atLineStart}: it begins a line (else it continues one stored in
        pieces).
        """
        if not block or self.failed:
            return
        if atLineStart:
            if block[0] == 0x2E or b"\n." in block:
                block = _STUFFED_DOT.sub(b"", block)
        elif b"\n." in block:
            block = _STUFFED_DOT_AFTER_LF.sub(b"", block)
        # Measured without the dots taken away: they do not count towards
        # the limit (RFC 5321 section 4.5.3.1.6).
        if self.maxLineLength is not None and len(block) >= self.maxLineLength:
            longest = max(map(len, block.split(b"\n")))
            if longest + 1 > self.maxLineLength:
                self._refuseLongLine()
                return
        self._keep(block, atLineStart)
