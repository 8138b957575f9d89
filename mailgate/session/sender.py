# -*- test-case-name: tests.test_session_core,tests.test_pop3_protocol -*-
"""
Writing a long multi-line response without holding it in memory.

L{BlockSender} is a push producer: it asks a source for one block at a
time and writes it, stopping whenever the transport's buffer is full and
going on when the transport drains.  Sources may answer at once or with a
L{Deferred} (a database read), so a 50 MB message or a 100,000-line listing
costs one block of memory at a time.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


class SendAborted(Exception):
    """
    The connection went away while a response was being sent.
    """


@implementer(IPushProducer)
class BlockSender:
    """
    @param transport: where the blocks go.
    @param nextBlock: a callable returning the next block as L{bytes}, a
        L{Deferred} firing with one, or C{None} at the end (directly or
        through the L{Deferred}).
    @param write: writes a block to C{transport} (its own C{write} if not
        given); the transport still does the flow control.
    """

    def __init__(self, transport, nextBlock, write=None):
        self._transport = transport
        self._nextBlock = nextBlock
        self._writeBlock = transport.write if write is None else write
        self._paused = False
        self._waiting = False
        self._done = None
        self._finished = False
        self._running = False

    def start(self):
        """
        Begin sending.

        @return: a L{Deferred} that fires when the last block was written,
            or fails with the source's error or L{SendAborted}.
        """
        self._done = done = defer.Deferred()
        self._transport.registerProducer(self, True)
        self._run()
        return done

    def _run(self):
        # A loop, not recursion: a source whose Deferreds have already fired
        # (an inline store) would otherwise nest one call per block.
        if self._running:
            return
        self._running = True
        try:
            while not (self._paused or self._waiting or self._finished):
                try:
                    block = self._nextBlock()
                except Exception:
                    self._finish(defer.fail())
                    return
                if isinstance(block, defer.Deferred):
                    self._waiting = True
                    block.addCallbacks(self._gotBlock, self._failed)
                    if self._waiting:
                        return
                    continue
                self._write(block)
        finally:
            self._running = False

    def _write(self, block):
        if block is None:
            self._finish(None)
        else:
            self._writeBlock(block)

    def _gotBlock(self, block):
        self._waiting = False
        if self._finished:
            return
        self._write(block)
        self._run()

    def _failed(self, failure):
        self._waiting = False
        if not self._finished:
            self._finish(failure)

    def _finish(self, result):
        self._finished = True
        self._transport.unregisterProducer()
        done, self._done = self._done, None
        if isinstance(result, defer.Deferred):
            result.chainDeferred(done)
        elif result is None:
            done.callback(None)
        else:
            done.errback(result)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._run()

    def stopProducing(self):
        if not self._finished:
            self._finish(defer.fail(SendAborted()))
