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

    @ivar atLineStart: whether the next octet begins a line.
    """

    def __init__(self):
        self.atLineStart = True

    def stuff(self, chunk):
        """
        Return C{chunk} with a "." added before every line that starts with
        ".", wherever the line starts.
        """
        if not chunk:
            return b""
        if b"." not in chunk:
            # Most octets of most mail (base64 above all) hold no "." at
            # all; looking for one byte is many times faster than looking
            # for the pair, which a line end every 76 octets slows down.
            out = chunk
        else:
            out = chunk.replace(b"\n.", b"\n..")
            if self.atLineStart and chunk[0] == 0x2E:
                out = b"." + out
        self.atLineStart = chunk[-1] == 0x0A
        return out

    def terminator(self):
        """
        The end of the multi-line response: ".", on a line of its own.
        """
        return b".\r\n" if self.atLineStart else b"\r\n.\r\n"


def stuffed(data, needsStuffing=True):
    """
    A whole message, stuffed and terminated: what the wire carries after
    the C{+OK} line.

    @param needsStuffing: C{False} when it is known that no line of
        C{data} starts with ".": then only the terminator is added.
    """
    if not needsStuffing:
        return data + (b".\r\n" if not data or data[-1] == 0x0A else b"\r\n.\r\n")
    stuffer = DotStuffer()
    return stuffer.stuff(data) + stuffer.terminator()
