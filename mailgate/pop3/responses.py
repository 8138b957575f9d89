# -*- test-case-name: tests.test_pop3_protocol -*-
"""
Multi-line responses as blocks, for responses too long to build at once.

A response source is a callable returning the next block (L{bytes}, or a
L{Deferred} firing with one), or L{END} once done: what
L{mailgate.session.CommandSession.stream} sends, paced by the transport.
"""

from twisted.internet import defer

from mailgate.pop3.dotstuff import DotStuffer

END = None


def terminated(nextBlock):
    """
    Wrap a block source so that the response's final "." follows its last
    block.
    """
    state = {"ended": False}

    def blocks():
        if state["ended"]:
            return END
        block = nextBlock()
        if isinstance(block, defer.Deferred):
            return block.addCallback(_endIfNone, state)
        return _endIfNone(block, state)

    return blocks


def numberedLines(first, values, deleted=()):
    """
    The lines of a LIST or UIDL listing, C{"n value\\r\\n"}: C{values}
    (sizes or unique ids) numbered from message number C{first}, without
    the messages whose 0-based index is in C{deleted} (a
    L{mailgate.pop3.deletions.DeletionMarks}, or any container).

    Formatted as text and encoded once: a listing of 100,000 unique ids
    costs a few milliseconds less than formatting each line as bytes.
    Unique ids are ASCII (RFC 1939: 0x21 to 0x7E); one that is not
    raises L{UnicodeEncodeError}.
    """
    numbers = range(first, first + len(values))
    if deleted:
        among = getattr(deleted, "among", None)
        if among is not None:
            # DeletionMarks: an octet a message, zipped along.
            marks = among(first - 1, len(values))
            lines = [f"{n} {v}\r\n" for n, v, marked in zip(numbers, values, marks) if not marked]
        else:
            lines = [f"{n} {v}\r\n" for n, v in zip(numbers, values) if n - 1 not in deleted]
    else:
        lines = [f"{n} {v}\r\n" for n, v in zip(numbers, values)]
    return "".join(lines).encode("ascii")


def _endIfNone(block, state):
    if block is None:
        state["ended"] = True
        return b".\r\n"
    return block


class MessageBlocks:
    """
    A message as the blocks of a RETR or TOP response: read chunk by chunk,
    cut after the header and C{bodyLines} lines for TOP, dot-stuffed, and
    terminated.
    """

    def __init__(self, body, bodyLines):
        self._body = body
        self._stuffer = DotStuffer(getattr(body, "dotOffsets", None))
        self._headerLeft = body.headerSize
        self._linesLeft = bodyLines
        self._ended = False

    def nextBlock(self):
        if self._ended:
            return END
        return self._body.read().addCallback(self._encode)

    def whole(self):
        """
        The entire response at once, if the body's first piece holds all
        of it (nearly every message); else C{None}, and nothing consumed.
        """
        first = getattr(self._body, "whole", None)
        if first is None:
            return None
        out = self._encode(first)
        if not self._ended:
            out += self._encode(b"")
        return out

    def _encode(self, chunk):
        done = not chunk
        if chunk and self._linesLeft is not None:
            chunk, done = self._cut(chunk)
        out = self._stuffer.stuff(chunk)
        if done:
            self._ended = True
            out += self._stuffer.terminator()
        return out

    def _cut(self, chunk):
        """
        For TOP: keep the header and then C{bodyLines} lines of the body.
        """
        keep = min(self._headerLeft, len(chunk))
        self._headerLeft -= keep
        head, rest = chunk[:keep], chunk[keep:]
        if self._headerLeft:
            return head, False
        position = 0
        while self._linesLeft and position < len(rest):
            end = rest.find(b"\n", position)
            if end < 0:
                return head + rest, False
            position = end + 1
            self._linesLeft -= 1
        return head + rest[:position], self._linesLeft == 0
