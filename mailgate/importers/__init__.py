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
transaction of the store
(L{mailgate.interfaces.ILifecycleStore.importMessages}), so a failure
leaves the maildrop as it was after the last whole batch, and a second
run skips what the first one imported; and a report of what was done.

Importers run in the admin command, synchronously, against a store from
L{mailgate.store.openSynchronousStore}.
"""

import os
import re
import stat

import attr
from zope.interface import implementer

from mailgate.errors import MaildropInUse, MailgateError
from mailgate.importers.compressed import MAGIC_LENGTH, CorruptData, decompressedBlocks, detect
from mailgate.interfaces import IMessageSource
from mailgate.message import DotLineFinder
from mailgate.plural import counted

#: The largest message imported, by default: the mailgate server's own
#: default (L{mailgate.smtp.protocol.SMTPServer.maxMessageSize}).
MAX_MESSAGE_SIZE = 50 * 1024 * 1024
#: The longest unique id imported.  RFC 1939 says 70 octets, but servers
#: serve longer ones (Dovecot's C{%f} is a maildir file name, past 70
#: octets with a long host name, up to 255), and their clients stored
#: them as served: refused, such a message could never be moved, and
#: renamed, it would be downloaded again.  So any length up to this
#: bound, which keeps a UIDL line of mailgate's well within one read.
MAX_UIDL = 1000
#: RFC 1939 section 7: characters from 0x21 to 0x7E.
_UIDL = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_UIDL)


class ImportFailed(MailgateError):
    """
    An import could not go on (an unreadable source, a refused login, a
    broken connection); what was imported before stays.
    """


def validUidl(uidl):
    """
    Whether C{uidl} is a unique id POP3 can carry: the characters of RFC
    1939 section 7 (no space, no control, ASCII), at most L{MAX_UIDL} of
    them.
    """
    # The whole text: "$" also matched before a final line break, and a
    # maildir file name ending in one became an id that split UIDL's
    # listing.
    return bool(_UIDL.fullmatch(uidl))


#: The white space that ends a word of a unique id, as clients read one
#: (C's isspace: fetchmail's sscanf): not Python's, which also takes
#: control characters such as 0x1C and Unicode's spaces.
_CLIENT_SPACES = " \t\r\n\v\f"
_CLIENT_SPACE = re.compile(r"[ \t\r\n\v\f]+")


def clientsWord(uidl):
    """
    The part of a served unique id that clients keep, fetchmail and
    Thunderbird reading it as one word: its first, the white space around
    it left out.  (An id with spaces is no RFC 1939 id, but a server that
    copies it from somewhere, Dovecot from an X-UIDL header field, serves
    it as it is.)
    """
    return _CLIENT_SPACE.split(uidl.strip(_CLIENT_SPACES), 1)[0]


def renameDuplicates(uidls):
    """
    The unique ids to import C{uidls} under, in order: each the same,
    except for a repeat, renamed the way Dovecot's
    C{pop3_uidl_duplicates = rename} does (C{-2}, C{-3}..., the suffix
    added again while the name is taken).

    The whole list is known first, so a new name is never one the source
    itself gives another message later: with C{X, X, X-2}, the second is
    C{X-2-2}, not the third's C{X-2}.  (An id the target already holds
    is the store's to judge: the same message from an earlier run, or a
    conflict; see L{mailgate.interfaces.ILifecycleStore.importMessages}.)

    @return: a list as long as C{uidls}.
    """
    given = set(uidls)
    taken = set()
    repeats = {}
    renamed = []
    for uidl in uidls:
        name = uidl
        while name in taken or (name != uidl and name in given):
            repeats[name] = repeats.get(name, 1) + 1
            name = f"{name}-{repeats[name]}"
        taken.add(name)
        renamed.append(name)
    return renamed


@attr.s
class ImportReport:
    """
    What an import did.

    @ivar messages: messages imported.
    @ivar octets: their octets.
    @ivar skipped: messages already present (an earlier run imported them).
    @ivar removed: messages an earlier run imported that the source no
        longer has, taken out of the maildrop (L{removeGone}).
    @ivar unrecorded: messages the source does not list that were
        imported before mailgate recorded the source of each id, left in
        the maildrop: they may be another source's (L{removeGone}).
    @ivar others: C{(source, how many)} of what another source brought in
        and the source does not list, left in the maildrop, for each
        other source that brought in some of what the source lists: the
        same mailbox by another name, perhaps (L{removeGone}).
    @ivar failures: one line per message (or user) that could not be
        imported.
    @ivar temporary: whether some of the failures pass (writing to the
        store failed, the source's connection broke, the source would not
        give a message now): running the import again finishes it.  The
        others (an id POP3 cannot carry, a message too large, another
        message under its id) come back the same on every run until the
        administrator does something about them, which the exit status
        says.
    """

    messages = attr.ib(default=0)
    octets = attr.ib(default=0)
    skipped = attr.ib(default=0)
    failures = attr.ib(factory=list)
    temporary = attr.ib(default=False)
    removed = attr.ib(default=0)
    unrecorded = attr.ib(default=0)
    others = attr.ib(factory=list)

    def add(self, other):
        self.messages += other.messages
        self.octets += other.octets
        self.skipped += other.skipped
        self.removed += other.removed
        self.unrecorded += other.unrecorded
        self.others += other.others
        self.failures += other.failures
        self.temporary = self.temporary or other.temporary

    def summary(self):
        text = (
            f"{counted(self.messages, 'message')} imported ({counted(self.octets, 'octet')}), "
            f"{self.skipped} skipped as already present"
        )
        if self.removed:
            text += f", {self.removed} taken out as gone from the source"
        if self.unrecorded:
            text += (
                f", {self.unrecorded} not listed left in the maildrop (imported before mailgate recorded "
                f"which source an id came from)"
            )
        if self.others:
            names = ", ".join(sorted({name for name, _ in self.others}))
            text += (
                f", {sum(n for _, n in self.others)} not listed left in the maildrop as brought in from {names}, "
                f"which also brought in some of what this source lists (if it is this source by another name, "
                f"--sole-source takes them out)"
            )
        if self.failures:
            text += f", {len(self.failures)} failed"
        return text


def removeGone(store, address, source, listed, report, soleSource=False):
    """
    With C{--mirror}: take out of C{address}'s maildrop the messages an
    earlier run from C{source} (its identity: L{maildirSource},
    L{mailgate.importers.pop3.pop3Source}) imported whose unique id the
    source no longer lists (C{listed}, every id it lists now): a client
    or the source's retention deleted them there since, and a
    leave-on-server client, which forgets the id of a message its server
    no longer lists, would download them again from mailgate.  Kept for
    recovery, counted in the report; a maildrop in a POP3 session is a
    failure that passes.

    What another source brought in is not this source's to take out: an
    address filled from two old accounts keeps the other's mail.  Messages
    imported before mailgate recorded sources are claimed by the first
    source that lists them; one that this source does not list may be
    another's, and stays (counted in the report), unless C{soleSource}.
    So does what another source brought in where it also brought in some
    of what this source lists: the same mailbox by another name (a copy
    of the maildir, then its live path; a server by name, then by
    address), perhaps; the report names it.  With C{soleSource} both
    are this source's.
    """
    try:
        gone, left, others = fired(store.removeImportedGone(address, source, listed, soleSource))
    except MaildropInUse:
        report.failures.append(
            f"{address} is in a POP3 session here: what the source no longer has was not taken out"
        )
        report.temporary = True
        return
    report.removed += len(gone)
    report.unrecorded += left
    report.others += others


def claimPresent(store, address, source, uidls):
    """
    Record C{source} as where the unique ids of C{uidls} came from (those
    a run found present with the same content: skipped), where an import
    before mailgate recorded sources left none, so that a later
    C{--mirror} run from this source knows them as its own.
    """
    if uidls and source is not None:
        fired(store.claimImported(address, source, uidls))


def maildirSource(directory):
    """
    The identity of a maildir as a source of imported mail: its real path
    (absolute, with symbolic links resolved), so that the same maildir
    named another way (relative, through a link, with a trailing slash)
    is the same source.  A path that is not UTF-8 (a user name in
    Latin-1 on an old server) is kept with its other octets written
    C{\\xNN}: a database stores text, and such a path made the import
    fail before a message was written.
    """
    path = os.fsencode(os.path.realpath(directory))
    return "maildir:" + path.decode("utf-8", "backslashreplace")


def toCRLF(data, pendingCR=False):
    """
    Octets with every bare LF made CRLF (CRLF and lone CR stay), as POP3
    serves a message stored with LF line ends.

    @param pendingCR: whether the octet before C{data} was a CR (then a
        leading LF is already preceded by it).

    Every octet an import reads goes through here: the two common cases
    take one pass of C{bytes} methods each instead of two replaces (they
    were a quarter of an import's time).
    """
    if pendingCR and data.startswith(b"\n"):
        return b"\n" + toCRLF(data[1:])
    if b"\r" not in data:
        # LF line ends only (Dovecot's files).
        return data.replace(b"\n", b"\r\n")
    if b"\n" not in data.replace(b"\r\n", b""):
        # CRLF already (mailgate's own export): as it is.
        return data
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


class NotAFile(ImportFailed):
    """
    A message file that is not a regular file (a symbolic link, a FIFO, a
    device...): refused.
    """


_KINDS = [
    (stat.S_ISLNK, "a symbolic link (not followed)"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
]


def _checkRegular(mode):
    if stat.S_ISREG(mode):
        return
    for test, kind in _KINDS:
        if test(mode):
            raise NotAFile(f"{kind}, not a regular file: not imported")
    raise NotAFile("not a regular file: not imported")


def openRegularFile(path):
    """
    A descriptor of the regular file at C{path} itself, and its C{stat}.

    A maildir belongs to its user, and the import may run as root: a
    symbolic link would let the user import any file of the machine (and
    a FIFO or a device would hang or never end).  So the name is checked
    without following links, and opened without following them and
    without blocking, and what was opened is checked again.

    @raise NotAFile: if it is not a regular file.
    @raise OSError: if it cannot be opened.
    """
    _checkRegular(os.lstat(path).st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        if os.path.islink(path):
            raise NotAFile("a symbolic link (not followed), not a regular file: not imported") from None
        raise
    try:
        status = os.fstat(fd)
        _checkRegular(status.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, status


def messageBlocks(fd, compression, blockSize, path=None):
    """
    The content of the message file open as C{fd}, from its start, in
    blocks of at most C{blockSize} octets: as it is, or decompressed if
    C{compression} (L{detect} of its first octets) says so.

    @raise Unreadable: for a file that begins as compressed data does but
        does not decompress (L{CorruptData}).
    """
    if compression is None:
        offset = 0
        while True:
            block = os.pread(fd, blockSize, offset)
            if not block:
                return
            offset += len(block)
            yield block
    try:
        yield from decompressedBlocks(fd, compression, blockSize)
    except CorruptData as e:
        raise Unreadable(
            f"{e}: not imported, as Dovecot's zlib plugin cannot read it either; if Dovecot served this maildir "
            f"without that plugin (each file as it is stored), import it with --decompress=never"
        ) from None


class Unreadable(ImportFailed):
    """
    A message file whose content cannot be imported: compressed in a way
    mailgate cannot read, or beginning as compressed data does without
    decompressing.
    """


class TooLarge(ImportFailed):
    """
    A message over the largest size imported.
    """


def tooLarge(maxSize):
    return TooLarge(
        f"over {maxSize} octets, the largest message imported (--max-message-size raises that limit): not imported"
    )


@implementer(IMessageSource)
class FileSource:
    """
    A message file with LF (or CRLF) line ends, read in blocks and served
    in CRLF form.  Its size and header size are measured once, at
    construction.  A file of one block (at most L{blockSize} octets: nearly
    all mail) is kept as measured and served from memory, read and
    converted once instead of once more per L{chunks}; a larger one is
    read again each time, never held whole.  (An import holds a batch of
    sources, at most L{BatchWriter.maxOctets} of messages and one more.)

    The file is opened once, at construction (see L{openRegularFile}),
    and read through that descriptor until L{close}: a file the mail
    server renames meanwhile (Dovecot does, to change its flags) is still
    the one read.

    A file Dovecot's zlib plugin compressed is read decompressed, as
    Dovecot serves it (L{mailgate.importers.compressed}), a block at a
    time; unless C{decompress} is false: then every file is read as it is
    stored, as a Dovecot without that plugin serves it.

    @ivar mtime: the file's modification time.
    @ivar detected: the L{Compression} the file's first octets suggest,
        or C{None}.
    @ivar compression: the L{Compression} the file is read through
        (C{detected}, where C{decompress}), or C{None}.
    @ivar storedSize: the message's octets as stored (decompressed, line
        ends as they are): what Dovecot's C{S=} in a file name counts.
    @ivar maxSize: the largest message read, in octets (served size), or
        C{None}: a larger one is L{TooLarge}, found out before more than
        that is read or decompressed.
    """

    blockSize = 1 << 20
    #: imports never take a message for a client's retry (they keep their
    #: own record of what was imported, by unique id)
    deliveryKey = None

    def __init__(self, path, maxSize=None, decompress=True):
        self.path = path
        self.maxSize = maxSize
        self._whole = None
        self._fd, status = openRegularFile(path)
        self.mtime = status.st_mtime
        try:
            self.detected = detect(os.pread(self._fd, MAGIC_LENGTH, 0))
            self.compression = self.detected if decompress else None
            if self.compression is not None and self.compression.decompressor is None:
                raise Unreadable(
                    f"compressed with {self.compression.name} (Dovecot's zlib plugin: zlib_save = "
                    f"{self.compression.name}), which mailgate cannot read: not imported; move this maildir "
                    f"through Dovecot's POP3 (mailgate import pop3), which serves it decompressed"
                )
            if self.compression is None and maxSize is not None and status.st_size > maxSize:
                raise tooLarge(maxSize)
            self._measure()
        except BaseException:
            self.close()
            raise

    def _measure(self):
        size = 0
        head = b""
        header = None
        dots = DotLineFinder()
        count = 0
        first = b""
        for block in self._blocks():
            if header is None:
                head = (head + block)[: 1 << 20]
                header = headerSizeOf(head)
            size += len(block)
            dots.feed(block)
            count += 1
            first = block if count == 1 else None
        self._whole = first
        self.size = size
        self.headerSize = size if header is None else header
        self.dotLines = dots.dotLines
        self.dotOffsets = dots.dotOffsets

    def _blocks(self):
        pendingCR = False
        served = stored = 0
        for block in messageBlocks(self._fd, self.compression, self.blockSize, self.path):
            converted = toCRLF(block, pendingCR)
            pendingCR = block.endswith(b"\r")
            served += len(converted)
            stored += len(block)
            if self.maxSize is not None and served > self.maxSize:
                raise tooLarge(self.maxSize)
            yield converted
        self.storedSize = stored

    def chunks(self, chunkSize):
        whole = self._whole
        if whole is not None:
            for start in range(0, len(whole), chunkSize):
                yield whole[start : start + chunkSize]
            return
        rest = b""
        for block in self._blocks():
            rest += block
            while len(rest) >= chunkSize:
                yield rest[:chunkSize]
                rest = rest[chunkSize:]
        if rest:
            yield rest

    def close(self):
        self._whole = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    @ivar skipped: the unique ids written that the maildrop had with the
        same content already (for L{claimPresent}).
    """

    maxMessages = 100
    maxOctets = 8 << 20

    def __init__(self, store, address, report, onBatch=None, source=None):
        self._store = store
        self._address = address
        self._source = source
        #: the unique ids found present with the same content (skipped)
        self.skipped = []
        self.report = report
        self._pending = []
        self._names = {}
        self._octets = 0
        self._onBatch = onBatch

    def add(self, uidl, source, arrived, what=None):
        """
        Queue a message; write the batch once it is full.

        @param what: the message, for the report (a file, a number).
        """
        self._pending.append((uidl, source, arrived))
        self._names[uidl] = what or uidl
        self._octets += source.size
        if len(self._pending) >= self.maxMessages or self._octets >= self.maxOctets:
            self.flush()

    def flush(self):
        """
        Write what is queued, in one transaction.

        @return: the unique ids of the batch that are now in the maildrop
            (imported by it, or present before with the same content); the
            others are failures in the report.
        """
        batch, self._pending, self._octets = self._pending, [], 0
        names, self._names = self._names, {}
        if not batch:
            return []
        try:
            imported, skipped, conflicts = fired(self._store.importMessages(self._address, batch, self._source))
        finally:
            for _, source, _ in batch:
                source.close()
        sizes = {uidl: source.size for uidl, source, _ in batch}
        self.report.messages += len(imported)
        self.report.octets += sum(sizes[u] for u in imported)
        self.report.skipped += len(skipped)
        self.skipped.extend(skipped)
        for uidl, reason in conflicts:
            self.report.failures.append(f"{names[uidl]}: unique id {uidl}: {reason}; not imported")
        done = list(imported) + list(skipped)
        if self._onBatch is not None:
            self._onBatch(done)
        return done
