# -*- test-case-name: tests.test_pop3_protocol -*-
"""
The POP3 TRANSACTION state's commands (STAT, LIST, UIDL, RETR, TOP, DELE,
RSET, NOOP) and the UPDATE state a QUIT enters.

Storage is reached only through the L{mailgate.interfaces.IMaildrop} the
login returned; deletion marks are this session's own until QUIT applies
them, all at once.
"""

from twisted.python.failure import Failure

from mailgate.errors import CommitUncertain, TemporaryFailure
from mailgate.pop3.arguments import arguments, lineCount, noArguments, number
from mailgate.pop3.dotstuff import stuffedParts
from mailgate.pop3.responses import END, numberedLines, terminated
from mailgate.pop3.workarounds import messageBlocks
from mailgate.session import CommandError, SendAborted
from mailgate.plural import counted

UPDATE = "UPDATE"

#: Seconds a QUIT's reply waits for the maildrop's lock to be released.
#: The reply waits so that a client logging in again as soon as it reads
#: +OK finds the maildrop free; but with the database silent the release
#: waits for the connection's answer deadline (75 s), longer than clients
#: wait for a reply (60 s for some), which then report an error for a
#: QUIT whose outcome is already certain: nothing was to be removed, or
#: the removal has committed.  The release goes on after the reply.
QUIT_RELEASE_WAIT = 5


class TransactionCommands:
    """
    The commands of the TRANSACTION state, for L{mailgate.pop3.POP3Server}.
    """

    def _messageIndex(self, text):
        """
        Parse a message number and check it names a message of this session
        that is not marked deleted.  Returns the 0-based index.
        """
        # Spaces around it are forgiven; other white space (a tab, Unicode's
        # no-break space) is not a message number's.
        n = number(text.strip(" "))
        if not 1 <= n <= len(self._maildrop.sizes):
            # Echoed as the client wrote it, leading zeros dropped, cut
            # short where it is past any maildrop.
            shown = str(n) if n < 10**20 else str(n)[:20] + "..."
            raise CommandError(f"no such message: {shown}")
        index = n - 1
        if index in self._deleted:
            raise CommandError(f"message {n} is deleted")
        return index

    def pop3_STAT(self, argument):
        noArguments(argument)
        self._ok(f"{self._count} {self._octets}")

    def pop3_NOOP(self, argument):
        noArguments(argument)
        self._ok()

    def pop3_RSET(self, argument):
        noArguments(argument)
        self._deleted.clear()
        self._count = len(self._maildrop.sizes)
        self._octets = sum(self._maildrop.sizes)
        self._ok(f"maildrop has {self._count} messages ({self._octets} octets)")

    def pop3_DELE(self, argument):
        index = self._messageIndex(argument)
        self._deleted.add(index)
        self._count -= 1
        self._octets -= self._maildrop.sizes[index]
        self._ok(f"message {index + 1} deleted")

    def pop3_LIST(self, argument):
        if argument.strip(" "):
            index = self._messageIndex(argument)
            self._ok(f"{index + 1} {self._maildrop.sizes[index]}")
            return None
        sizes = self._maildrop.sizes
        deleted = self._deleted
        batch = self.listBatch
        status = f"+OK {self._count} messages ({self._octets} octets)\r\n".encode("ascii")
        # A +OK written here, not by _ok: the refusals before it are
        # forgiven all the same (see _ok).
        self._badCommands = 0
        if len(sizes) <= batch:
            # The usual case: the whole listing in one write.
            self._out.write(status + numberedLines(1, sizes, deleted) + b".\r\n")
            return None
        self._out.write(status)
        positions = iter(range(0, len(sizes), batch))

        def nextBlock():
            for start in positions:
                lines = numberedLines(start + 1, sizes[start : start + batch], deleted)
                if lines:
                    return lines
            return END

        return self.stream(terminated(nextBlock))

    def pop3_UIDL(self, argument):
        if argument.strip(" "):
            index = self._messageIndex(argument)
            d = self._maildrop.uniqueIds(index, 1)
            d.addCallback(lambda ids: self._ok(f"{index + 1} {ids[0]}"))
            d.addErrback(self._storeError, "unique id")
            return d
        total = len(self._maildrop.sizes)
        deleted = self._deleted
        batch = self.uidlBatch
        if not total:
            self._ok("unique-id listing follows")
            self._out.write(b".\r\n")
            return None
        # The first batch is read here, the others (if any) by nextBlock.
        positions = iter(range(batch, total, batch))

        def format(ids, start):
            return numberedLines(start + 1, ids, deleted)

        # One batch at a time: asking for the next one ahead, to overlap
        # its trip with the sending of this one, was slower (measured:
        # its rows are made into Python objects under the GIL, in
        # contention with the reactor thread formatting this one).
        def nextBlock():
            start = next(positions, None)
            if start is None:
                return END
            return self._maildrop.uniqueIds(start, min(batch, total - start)).addCallback(format, start)

        def begin(block):
            status = b"+OK unique-id listing follows\r\n"
            self._badCommands = 0
            if total <= batch:
                self._out.write(status + block + b".\r\n")
                return None
            self._out.write(status + block)
            # Past +OK, a batch that cannot be read ends the session.
            listed = self.stream(terminated(nextBlock))
            return listed.addErrback(self._streamBroken, "unique ids")

        # Read the first batch before answering +OK, so a store failure
        # can still be reported as -ERR.
        first = self._maildrop.uniqueIds(0, min(batch, total))
        if first.called and not isinstance(first.result, Failure):
            # A small maildrop's ids came with the login: answered at once,
            # without a callback chain (and without holding the session's
            # command queue on a Deferred), as a read-ahead RETR is.
            ids, first.result = first.result, None
            try:
                block = format(ids, 0)
            except Exception:
                return self._storeError(Failure(), "unique ids")
            return begin(block)
        first.addCallback(format, 0)
        first.addCallbacks(begin, self._storeError, errbackArgs=("unique ids",))
        return first

    def pop3_RETR(self, argument):
        index = self._messageIndex(argument)
        return self._sendMessage(index, None)

    def pop3_TOP(self, argument):
        n, lines = arguments(argument, 2, "TOP message-number lines")
        index = self._messageIndex(n)
        count = lineCount(lines)
        return self._sendMessage(index, count)

    def _sendMessage(self, index, bodyLines):
        d = self._maildrop.openMessage(index, headerOnly=bodyLines == 0)
        if d.called and not isinstance(d.result, Failure):
            # Read ahead: the message is here already.  Answering at once,
            # without a callback chain, is most of what a TOP or RETR of a
            # small message costs.
            body, d.result = d.result, None
            return self._messageOpened(body, index, bodyLines)
        d.addCallbacks(
            self._messageOpened,
            self._storeError,
            callbackArgs=(index, bodyLines),
            errbackArgs=("message",),
        )
        return d

    def _messageOpened(self, body, index, bodyLines):
        if self._closed:
            return None
        self._badCommands = 0
        stats = self._stats
        if bodyLines is None:
            status = b"+OK %d octets\r\n" % body.size
        else:
            stats["top"] += 1
            status = b"+OK top of message follows\r\n"
        whole = body.whole
        workarounds = self.clientWorkarounds
        if (
            whole is not None
            and not workarounds
            and (bodyLines is None or (bodyLines == 0 and len(whole) <= body.headerSize))
        ):
            # The whole message, or for TOP n 0 its whole header, in one
            # piece (nearly every message): stuffed and sent in one write.
            out = self._out
            parts = stuffedParts(whole, body.needsStuffing, getattr(body, "dotOffsets", None))
            if len(whole) <= out.joinBelow:
                out.write(status + b"".join(parts))
            else:
                parts.insert(0, status)
                out.writeParts(parts)
            if bodyLines is None:
                self._retrieved(body.size)
            return None
        source = messageBlocks(body, bodyLines, workarounds)
        whole = source.whole()
        if whole is not None:
            # All TOP wants of it came in one piece (or, with client
            # workarounds, all of a RETR's): one write, no producer.
            self._out.write(status + whole)
            if bodyLines is None:
                self._retrieved(body.size)
            return None
        self._out.write(status)
        sent = self.stream(source.nextBlock)
        if bodyLines is None:
            sent.addCallback(lambda _: self._retrieved(body.size))
        return sent.addErrback(self._streamBroken, f"message {index + 1}")

    def _retrieved(self, octets):
        """
        A RETR's message has gone out whole (to the transport): counted
        then, for the metrics and the session's logout line, not when it
        began (a client that stops reading halfway has not retrieved it).
        """
        stats = self._stats
        stats["retr"] += 1
        stats["retrBytes"] += octets
        self.factory.metrics.retrieved(octets)

    def _streamBroken(self, failure, what):
        """
        The message (or listing) could not be read after +OK went out.
        There is no way to say -ERR in the middle of a multi-line response,
        so the session ends; the client sees a truncated response, and
        nothing is deleted.
        """
        if failure.check(SendAborted):
            return None
        if failure.check(TemporaryFailure):
            # The database away (restarted, its connection lost or given
            # up): what an outage does, said in one line, as a read that
            # fails before the +OK is; a traceback at critical level is
            # for a defect.
            self.logWarning(
                "pop3.read_failed",
                f"pop3 reading {what} failed mid-response {self.whoText()}: {failure.value}",
                what=what,
            )
        else:
            self.logFailure("pop3.read_failed", f"pop3 reading {what} failed mid-response {self.whoText()}", failure)
        self._endSession(f"{what} could not be read")
        self.close(abort=True)
        return None

    def _storeError(self, failure, what):
        if failure.check(TemporaryFailure):
            self.logWarning(
                "pop3.read_failed", f"pop3 cannot read {what} {self.whoText()}: {failure.value}", what=what
            )
            self._err(f"[SYS/TEMP] cannot read the {what} now; try again later")
        else:
            self.logFailure("pop3.read_failed", f"pop3 reading {what} failed {self.whoText()}", failure, what=what)
            self._err("[SYS/TEMP] internal server error")
        return None

    def _update(self):
        """
        QUIT in the TRANSACTION state: the UPDATE state.  Marked messages
        are removed in one transaction, and +OK goes out only once that
        transaction has committed.
        """
        self.state = UPDATE
        deleted = sorted(self._deleted)
        # The client's address goes with what it deletes, where the store
        # keeps deleted mail for recovery.
        d = self._maildrop.expunge(deleted, peer=self.peerText)

        def removed(_):
            self._stats["deleted"] = len(deleted)
            self.factory.metrics.deleted(len(deleted))
            return f"+OK mailgate POP3 server signing off ({counted(self._count, 'message')} left)\r\n"

        def failed(failure):
            if failure.check(TemporaryFailure):
                self.logWarning("pop3.update_failed", f"pop3 update failed {self.whoText()}: {failure.value}")
            else:
                self.logFailure("pop3.update_failed", f"pop3 update failed {self.whoText()}", failure)
            if failure.check(CommitUncertain):
                # The removal's COMMIT went out and its answer was lost:
                # "none were removed" could be false.
                return (
                    "-ERR [SYS/TEMP] lost the database while removing the deleted messages; "
                    "they may or may not have been removed\r\n"
                )
            return "-ERR [SYS/TEMP] could not remove the deleted messages; none were removed\r\n"

        def finish(reply):
            # The lock is released before the reply goes out, so a client
            # that logs in again (on any node) as soon as it reads +OK finds
            # the maildrop free.
            return self._answerQuitOnceReleased(self._endSession("quit"), reply)

        if d.called and not isinstance(d.result, Failure):
            # Nothing to remove (most sessions) or removed already: the
            # reply and the lock's release without a callback chain, and
            # the session's end without holding its command queue.
            d.result = None
            reply = removed(None)
            released = self._endSession("quit")
            if released.called and not isinstance(released.result, Failure):
                released.result = None
                self._out.write(reply.encode("utf-8"))
                self.close()
                return None
            return self._answerQuitOnceReleased(released, reply)
        d.addCallbacks(removed, failed)
        d.addCallback(finish)
        # Until the removal is written and the lock released, a connection
        # lost meanwhile must not release the lock itself (sessionEnded).
        self._updating = d
        return d

    def _answerQuitOnceReleased(self, released, reply):
        """
        QUIT's reply once the maildrop's lock is C{released}, or after
        L{QUIT_RELEASE_WAIT} seconds if it is not by then (the database
        silent): whichever comes first.
        """
        answered = []

        def answer(_=None):
            if answered:
                return None
            answered.append(True)
            if timer.active():
                timer.cancel()
            self._answerQuit(reply)
            return None

        timer = self._clock.callLater(QUIT_RELEASE_WAIT, answer)
        return released.addBoth(answer)

    def _answerQuit(self, reply):
        """
        QUIT's reply, once the maildrop's lock is released, and the end.
        """
        self._out.write(reply.encode("utf-8"))
        self.close()
