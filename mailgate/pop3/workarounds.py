# -*- test-case-name: tests.test_pop3_workarounds -*-
"""
Dovecot's C{pop3_client_workarounds}, for clients moved from a Dovecot
that served them with some: RETR and TOP send a message otherwise than it
is stored, for old clients that break on it as it is.

    - C{outlook-no-nuls}: every NUL octet goes out as 0x80 (Outlook and
      Outlook Express stop reading a message at a NUL).  One octet for
      one: sizes, line ends and the positions of the lines that start
      with "." (the store's dot offsets) stay as they are.
    - C{oe-ns-eoh}: a message whose header has no end (no empty line: a
      message of header fields only, or the empty message) gets that
      empty line after its last line, before the response's ".": Outlook
      Express and Netscape Mail show such a message badly, or not at all.
      Like Dovecot, LIST, STAT and RETR's C{+OK n octets} still give the
      message's size as stored, two octets less than RETR then sends.

Without any (the default) messages go out as stored, by
L{mailgate.pop3.transaction.TransactionCommands}' own path, which this
module does not touch.
"""

from mailgate.pop3.responses import MessageBlocks

OUTLOOK_NO_NULS = "outlook-no-nuls"
OE_NS_EOH = "oe-ns-eoh"
#: the workarounds known, in Dovecot's spelling and order
KNOWN = (OUTLOOK_NO_NULS, OE_NS_EOH)


def parseWorkarounds(value):
    """
    The workarounds named in C{value}: a string of names separated by
    spaces or commas (as Dovecot's C{pop3_client_workarounds} and a
    command line give them), or a list of such strings (a configuration
    file's array).

    @return: a tuple of the names, each once, in the order of L{KNOWN}.
    @raise ValueError: naming the first unknown name and the known ones.
    """
    if isinstance(value, str):
        value = [value]
    names = set()
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected workaround names, got {item!r}")
        for name in item.replace(",", " ").split():
            if name.lower() not in KNOWN:
                raise ValueError(f"unknown POP3 client workaround {name!r} (known: {', '.join(KNOWN)})")
            names.add(name.lower())
    return tuple(name for name in KNOWN if name in names)


#: what replaces NUL under outlook-no-nuls, as Dovecot's pop3 sends it
NUL_REPLACEMENT = b"\x80"


class WorkedAroundBlocks(MessageBlocks):
    """
    L{MessageBlocks} with the C{workarounds} (a collection of L{KNOWN}
    names): NULs replaced chunk by chunk, before the dot-stuffing (which
    they cannot move: one octet for one, and never a "." or a line end);
    and the header's end looked for while the header section (the
    message's first C{headerSize} octets) goes by, so that the empty line
    it lacks is added before the terminator.

    The header section holds its empty line when there is one (see
    L{mailgate.interfaces.IMessageBody.headerSize}), so the section's
    last three octets say whether it has one: C{"\\n\\r\\n"}, or the whole
    section is C{"\\r\\n"} (an empty header).  For C{TOP n 0} the body
    opened is that section alone, whose size is the header's.
    """

    def __init__(self, body, bodyLines, workarounds):
        super().__init__(body, bodyLines)
        self._noNuls = OUTLOOK_NO_NULS in workarounds
        self._endHeaders = OE_NS_EOH in workarounds
        # Octets of the header section not yet passed, and the last three
        # passed.
        self._headerToPass = body.headerSize if self._endHeaders else 0
        self._headerTail = b""

    def _encode(self, chunk):
        done = not chunk
        if self._headerToPass and chunk:
            keep = min(self._headerToPass, len(chunk))
            self._headerToPass -= keep
            self._headerTail = (self._headerTail + chunk[max(0, keep - 3) : keep])[-3:]
        if chunk and self._linesLeft is not None:
            chunk, done = self._cut(chunk)
        if self._noNuls and b"\0" in chunk:
            chunk = chunk.replace(b"\0", NUL_REPLACEMENT)
        out = self._stuffer.stuff(chunk)
        if done:
            self._ended = True
            if self._endHeaders and self._headerTail not in (b"\n\r\n", b"\r\n"):
                # The message's last line ended (as the terminator would
                # end it), then the empty line, then ".".
                out += (b"" if self._stuffer.atLineStart else b"\r\n") + b"\r\n.\r\n"
            else:
                out += self._stuffer.terminator()
        return out


def messageBlocks(body, bodyLines, workarounds):
    """
    The L{MessageBlocks} that send C{body} (a RETR's, or a TOP's of
    C{bodyLines} lines) with C{workarounds}, if any.
    """
    if workarounds:
        return WorkedAroundBlocks(body, bodyLines, workarounds)
    return MessageBlocks(body, bodyLines)
