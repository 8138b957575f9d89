# -*- test-case-name: tests.test_dotstuff -*-
"""
Byte-stuffing for multi-line responses (RFC 1939 section 3), as a stream.

A message goes out in chunks, and a line may start at any chunk boundary,
so the encoder remembers whether the last chunk ended a line.  Twisted's
POP3 server stuffed each chunk on its own: a first line, or a line just
after a chunk boundary, that began with "." went out unstuffed and could
end the response early.
"""


class DotStuffer:
    """
    Stuffs a CRLF-normalised message chunk by chunk.

    When the store knows where the message's lines that start with "." are
    (L{mailgate.interfaces.IMessageBody.dotOffsets}, learnt at delivery),
    stuffing is a copy of the slices between them, at memory speed;
    otherwise every chunk is searched for line starts, about a gigabyte a
    second.  A known position that does not hold a "." (a store that does
    not match its bodies) stops the use of positions for the rest of the
    message, which is then searched like any other.

    @ivar atLineStart: whether the next octet begins a line.
    """

    def __init__(self, offsets=None):
        self.atLineStart = True
        self._offsets = offsets
        # The message offset of the next chunk, and the index of the first
        # known position not yet passed.
        self._position = 0
        self._next = 0

    def stuff(self, chunk):
        """
        Return C{chunk} with a "." added before every line that starts with
        ".", wherever the line starts.  The chunks must be given in order,
        from the start of the message.
        """
        parts = self.parts(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def parts(self, chunk):
        """
        L{stuff}, as a list of bytes-like pieces to send one after the
        other: at known positions, views of C{chunk} with the added "."
        between them, so that the message is not copied to be stuffed.
        """
        if not chunk:
            return [b""]
        if self._offsets is not None:
            out = self._partsAt(chunk)
            if out is not None:
                self.atLineStart = chunk[-1] == 0x0A
                return out
        if b"." not in chunk:
            # Most octets of most mail (base64 above all) hold no "." at
            # all; looking for one byte is many times faster than looking
            # for the pair, which a line end every 76 octets slows down.
            out = [chunk]
        else:
            out = [chunk.replace(b"\n.", b"\n..")]
            if self.atLineStart and chunk[0] == 0x2E:
                out.insert(0, b".")
        self.atLineStart = chunk[-1] == 0x0A
        return out

    def _partsAt(self, chunk):
        """
        Stuff C{chunk} at the known positions, or return C{None} (and give
        the positions up) if one of them does not hold a ".".
        """
        offsets = self._offsets
        start = self._position
        end = start + len(chunk)
        self._position = end
        index = self._next
        count = len(offsets)
        if index >= count or offsets[index] >= end:
            return [chunk]
        view = memoryview(chunk)
        parts = []
        last = 0
        while index < count and offsets[index] < end:
            cut = offsets[index] - start
            if cut < 0 or chunk[cut] != 0x2E:
                self._offsets = None
                return None
            parts.append(view[last:cut])
            parts.append(b".")
            last = cut
            index += 1
        parts.append(view[last:])
        self._next = index
        return parts

    def terminator(self):
        """
        The end of the multi-line response: ".", on a line of its own.
        """
        return b".\r\n" if self.atLineStart else b"\r\n.\r\n"


def stuffed(data, needsStuffing=True, offsets=None):
    """
    A whole message (or the start of one), stuffed and terminated: what
    the wire carries after the C{+OK} line.

    @param needsStuffing: C{False} when it is known that no line of
        C{data} starts with ".": then only the terminator is added.
    @param offsets: where the lines that start with "." begin, if known
        (see L{DotStuffer}).
    """
    return b"".join(stuffedParts(data, needsStuffing, offsets))


def stuffedParts(data, needsStuffing=True, offsets=None):
    """
    L{stuffed} as a list of bytes-like pieces (see L{DotStuffer.parts}),
    for a writer that sends them without joining them first.
    """
    if not needsStuffing:
        return [data, b".\r\n" if not data or data[-1] == 0x0A else b"\r\n.\r\n"]
    stuffer = DotStuffer(offsets)
    parts = stuffer.parts(data)
    parts.append(stuffer.terminator())
    return parts
