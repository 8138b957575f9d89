# -*- test-case-name: tests.test_pop3_protocol -*-
"""
Multi-line responses as blocks, for responses too long to build at once.

A response source is a callable returning the next block (L{bytes}, or a
list of bytes-like parts written together, or a L{Deferred} firing with
either), or L{END} once done: what L{mailgate.session.CommandSession.stream}
sends, paced by the transport.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from mailgate.pop3.dotstuff import DotStuffer

END = None

#: Nothing kept (see L{MessageBlocks}).
_NOTHING = object()


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
    the messages whose 0-based index is in C{deleted}.

    Formatted as text and encoded once: a listing of 100,000 unique ids
    costs a few milliseconds less than formatting each line as bytes.
    Unique ids are ASCII (RFC 1939: 0x21 to 0x7E); one that is not
    raises L{UnicodeEncodeError}.
    """
    numbers = range(first, first + len(values))
    if deleted:
        lines = [f"{n} {v}\r\n" for n, v in zip(numbers, values) if n - 1 not in deleted]
    else:
        lines = [f"{n} {v}\r\n" for n, v in zip(numbers, values)]
    return "".join(lines).encode("ascii")


def _seen(result, box):
    box.append(result)
    return result


def _handled(failure):
    return None


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

    #: at most about this many octets go in one block, whatever the body has
    #: at hand (the transport's flow control acts between blocks)
    blockOctets = 512 * 1024

    def __init__(self, body, bodyLines):
        self._body = body
        self._stuffer = DotStuffer(getattr(body, "dotOffsets", None))
        self._headerLeft = body.headerSize
        self._linesLeft = bodyLines
        self._ended = False
        # A read that had not answered when the last block was made: whether
        # one is under way, what it gave if not asked for yet, and the
        # next block waiting for it.
        self._reading = False
        self._kept = _NOTHING
        self._asking = None
        if bodyLines is None and getattr(body, "whole", None) is None:
            # RETR reads it all: the store may read on while it goes out.
            body.readAhead()

    def nextBlock(self):
        if self._ended:
            return END
        kept = self._kept
        if kept is not _NOTHING:
            self._kept = _NOTHING
            if isinstance(kept, Failure):
                return defer.fail(kept)
            return defer.succeed(self._encode(kept))
        if self._reading:
            self._asking = asking = defer.Deferred()
            return asking.addCallback(self._encode)
        # The pieces the body has at hand go out together, as one block of
        # several parts (written at once): fewer writes, and fewer wake-ups
        # of the client.
        parts = []
        size = 0
        while not self._ended and size < self.blockOctets:
            read = self._body.read()
            box = []
            read.addBoth(_seen, box)
            if not box:
                if not parts:
                    return read.addCallback(self._encode)
                # Not here yet: it goes in the next block.
                self._reading = True
                read.addBoth(self._answered)
                break
            read.addErrback(_handled)
            if isinstance(box[0], Failure):
                if not parts:
                    return defer.fail(box[0])
                self._kept = box[0]
                break
            part = self._encode(box[0])
            parts.append(part)
            size += len(part)
        return defer.succeed(parts[0] if len(parts) == 1 else parts)

    def _answered(self, result):
        """
        The read the last block did not wait for has answered: to the next
        block if it was asked for already, else kept for it (a failure
        nobody asks for, the client gone, is then dropped unsaid).
        """
        self._reading = False
        asking, self._asking = self._asking, None
        if asking is None:
            self._kept = result
        elif isinstance(result, Failure):
            asking.errback(result)
        else:
            asking.callback(result)
        return None

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
