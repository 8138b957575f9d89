# -*- test-case-name: tests.test_importers -*-
"""
Moving mailboxes into mailgate from another server, keeping every
message's POP3 unique id, so that clients that leave mail on the server
download nothing again after the switch.

  - L{mailgate.importers.maildir}: a Maildir on disk (Dovecot's, with its
    C{dovecot-uidlist}), ids formatted as Dovecot's C{pop3_uidl_format}.
  - L{mailgate.importers.pop3}: any live POP3 server, through POP3 itself
    (UIDL, then RETR of each message).

What both share is here: messages are written in batches, each batch one
transaction of the store (L{mailgate.store.lifecycle._importMessages}), so
a failure leaves the maildrop as it was after the last whole batch, and a
second run skips what the first one imported; and a report of what was
done.

Importers run in the admin command, synchronously, against a store from
L{mailgate.store.openSynchronousStore}.
"""

import re

import attr
from zope.interface import implementer

from mailgate.errors import MailgateError
from mailgate.interfaces import IMessageSource
from mailgate.message import MAX_DOT_OFFSETS, DotLineFinder, dotLineOffsets

#: RFC 1939 section 7: 1 to 70 characters from 0x21 to 0x7E.
_UIDL = re.compile(r"^[\x21-\x7e]{1,70}$")


class ImportFailed(MailgateError):
    """
    An import could not go on (an unreadable source, a refused login, a
    broken connection); what was imported before stays.
    """


def validUidl(uidl):
    """
    Whether C{uidl} is a unique id POP3 can carry (RFC 1939 section 7).
    """
    return bool(_UIDL.match(uidl))


@attr.s
class ImportReport:
    """
    What an import did.

    @ivar messages: messages imported.
    @ivar octets: their octets.
    @ivar skipped: messages already present (an earlier run imported them).
    @ivar failures: one line per message (or user) that could not be
        imported.
    """

    messages = attr.ib(default=0)
    octets = attr.ib(default=0)
    skipped = attr.ib(default=0)
    failures = attr.ib(factory=list)

    def add(self, other):
        self.messages += other.messages
        self.octets += other.octets
        self.skipped += other.skipped
        self.failures += other.failures

    def summary(self):
        text = f"{self.messages} messages imported ({self.octets} octets), {self.skipped} skipped as already present"
        if self.failures:
            text += f", {len(self.failures)} failed"
        return text


def toCRLF(data, pendingCR=False):
    """
    Octets with every bare LF made CRLF (CRLF and lone CR stay), as POP3
    serves a message stored with LF line ends.

    @param pendingCR: whether the octet before C{data} was a CR (then a
        leading LF is already preceded by it).
    """
    if pendingCR and data.startswith(b"\n"):
        return b"\n" + data[1:].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def headerSizeOf(head):
    """
    The header section's length (its empty line included) in a CRLF
    message beginning with C{head}; C{None} if C{head} does not reach the
    empty line.
    """
    if head.startswith(b"\r\n"):
        return 2
    end = head.find(b"\r\n\r\n")
    return None if end < 0 else end + 4


@implementer(IMessageSource)
class BytesSource:
    """
    A message held in memory, already in CRLF form.
    """

    def __init__(self, data):
        self._data = data
        self.size = len(data)
        header = headerSizeOf(data)
        self.headerSize = self.size if header is None else header
        self.dotLines = data[:1] == b"." or b"\n." in data
        offsets = dotLineOffsets(data) if self.dotLines else []
        self.dotOffsets = offsets if len(offsets) <= MAX_DOT_OFFSETS else None

    def chunks(self, chunkSize):
        for start in range(0, len(self._data), chunkSize):
            yield self._data[start : start + chunkSize]

    def close(self):
        self._data = b""


@implementer(IMessageSource)
class FileSource:
    """
    A message file with LF (or CRLF) line ends, read in blocks and served
    in CRLF form: never held in memory whole.  Its size and header size
    are measured once, at construction.
    """

    blockSize = 1 << 20

    def __init__(self, path):
        self.path = path
        size = 0
        head = b""
        header = None
        dots = DotLineFinder()
        for block in self._blocks():
            if header is None:
                head = (head + block)[: 1 << 20]
                header = headerSizeOf(head)
            size += len(block)
            dots.feed(block)
        self.size = size
        self.headerSize = size if header is None else header
        self.dotLines = dots.dotLines
        self.dotOffsets = dots.dotOffsets

    def _blocks(self):
        pendingCR = False
        with open(self.path, "rb") as f:
            while True:
                block = f.read(self.blockSize)
                if not block:
                    return
                converted = toCRLF(block, pendingCR)
                pendingCR = block.endswith(b"\r")
                yield converted

    def chunks(self, chunkSize):
        rest = b""
        for block in self._blocks():
            rest += block
            while len(rest) >= chunkSize:
                yield rest[:chunkSize]
                rest = rest[chunkSize:]
        if rest:
            yield rest

    def close(self):
        pass


def fired(d):
    """
    The result of an already-fired L{Deferred} (a synchronous store's);
    raises its failure.
    """
    box = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the store returned an unfired Deferred")
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class BatchWriter:
    """
    Writes imported messages to a maildrop a batch at a time, each batch
    one transaction, and counts what was done in an L{ImportReport}.

    @cvar maxMessages: messages per batch.
    @cvar maxOctets: octets per batch (a batch closes once past it).
    """

    maxMessages = 100
    maxOctets = 8 << 20

    def __init__(self, store, address, report, onBatch=None):
        self._store = store
        self._address = address
        self.report = report
        self._pending = []
        self._octets = 0
        self._onBatch = onBatch

    def add(self, uidl, source, arrived):
        """
        Queue a message; write the batch once it is full.
        """
        self._pending.append((uidl, source, arrived))
        self._octets += source.size
        if len(self._pending) >= self.maxMessages or self._octets >= self.maxOctets:
            self.flush()

    def flush(self):
        """
        Write what is queued, in one transaction.

        @return: the unique ids of the batch that are now in the maildrop
            (imported by it, or present before).
        """
        batch, self._pending, self._octets = self._pending, [], 0
        if not batch:
            return []
        try:
            imported, skipped = fired(self._store.importMessages(self._address, batch))
        finally:
            for _, source, _ in batch:
                source.close()
        sizes = {uidl: source.size for uidl, source, _ in batch}
        self.report.messages += len(imported)
        self.report.octets += sum(sizes[u] for u in imported)
        self.report.skipped += len(skipped)
        done = list(imported) + list(skipped)
        if self._onBatch is not None:
            self._onBatch(done)
        return done
