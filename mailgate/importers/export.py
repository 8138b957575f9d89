# -*- test-case-name: tests.test_export -*-
"""
Moving a mailbox out of mailgate: a user's maildrop written as a Maildir
with a C{dovecot-uidlist}, the formats L{mailgate.importers.maildir}
reads, so that Dovecot (or mailgate again) serves the same messages in
the same order with the same POP3 unique ids, and clients that leave
mail on the server download nothing again after a move.

  - Each message is a file in C{cur/}, its octets exactly as POP3 serves
    them before dot-stuffing (CRLF line ends, which Dovecot reads as they
    are), named C{<arrival>.M<n>P<pid>Q<n>.<host>,S=<size>,W=<size>:2,}
    (Dovecot takes the size and the virtual size from the name), its
    modification time the message's arrival.
  - C{dovecot-uidlist} (version 3) numbers the messages in POP3 order and
    saves each unique id in its C{P} field, which Dovecot's POP3 serves
    before any C{pop3_uidl_format}.
  - Files are written in C{tmp/}, synced, and moved into C{cur/}; the
    list last, by rename.  Everything is readable by its owner only.
  - Files are synced a batch at a time, many at once on threads of their
    own (a few files handed to a thread at a time), while the next
    messages are read and written: one at a time, each sync waited for
    (a journal commit and a flush of the disk's cache each), the syncs
    were half of an export's time on a quiet disk and nearly all of it on
    a busy one, while syncs running together share a commit.  Each file
    is still synced before it takes its name in C{cur/}: a crash leaves
    only whole messages there.

Run from the admin command against a synchronous store (its L{Deferred}s
have fired on return).
"""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import attr

from mailgate.errors import TemporaryFailure
from mailgate.importers import ImportFailed, fired
from mailgate.importers.maildir import UIDLIST
from mailgate.plural import counted


@attr.s
class ExportReport:
    """
    What an export did.

    @ivar messages: messages written.
    @ivar octets: their octets.
    @ivar failures: one line per message that could not be read (deleted
        while the export ran, say).
    """

    messages = attr.ib(default=0)
    octets = attr.ib(default=0)
    failures = attr.ib(factory=list)


def _hostPart(name):
    """
    The host name as a maildir file name may hold it (the Maildir
    specification's escapes for C{/} and C{:}).
    """
    return name.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _checkEmpty(directory):
    """
    Refuse a directory that already holds a mailbox: mixing two would give
    Dovecot two sets of uids.
    """
    if os.path.exists(os.path.join(directory, UIDLIST)):
        raise ImportFailed(f"{directory} already holds a mailbox ({UIDLIST}); export into a new directory")
    for sub in ("cur", "new"):
        try:
            names = os.listdir(os.path.join(directory, sub))
        except (FileNotFoundError, NotADirectoryError):
            # Nothing there yet (or nothing usable: making it says why).
            continue
        except OSError as e:
            raise ImportFailed(f"cannot read {os.path.join(directory, sub)}: {e.strerror}") from None
        if names:
            raise ImportFailed(f"{directory}/{sub} is not empty; export into a new directory")


def _makeDirectories(directory):
    """
    Make the Maildir's directories.  Its C{cur}, C{new} and C{tmp} must
    be directories of their own, not links: messages are written through
    them, and a link put there by someone who may write to C{directory}
    would have an export run as root write mail where it points.
    """
    try:
        for path in (directory, *(os.path.join(directory, sub) for sub in ("cur", "new", "tmp"))):
            os.makedirs(path, mode=0o700, exist_ok=True)
            if path != directory and os.path.islink(path):
                raise ImportFailed(f"{path} is a symbolic link; export into a new directory")
            if not os.path.isdir(path):
                raise ImportFailed(f"{path} is not a directory")
    except OSError as e:
        raise ImportFailed(f"cannot make {e.filename or directory}: {e.strerror}") from None


def _syncDirectory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Messages written before they are moved into C{cur/} together, once
#: synced: at most that many files open at once.
BATCH_MESSAGES = 128
#: Files synced at the same time (the syncs wait on the disk, not on the
#: processor; running together, they share the file system's commits).
SYNC_THREADS = 16
#: Files handed to one of those threads at a time: a hand-over wakes a
#: thread (a few context switches); one for each file, they cost about a
#: fifth of an export's processor time.
SYNC_GROUP = 8


def _writeBody(path, body):
    """
    Write a message's octets, read a piece at a time, to a new file, not
    synced yet.

    @return: C{(descriptor, octets written)}: the file is left open, for
        L{_syncAndClose}.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    try:
        while True:
            piece = fired(body.read())
            if not piece:
                break
            view = memoryview(piece)
            while view:
                count = os.write(fd, view)
                view = view[count:]
                written += count
    except BaseException:
        os.close(fd)
        raise
    return fd, written


class _Handed:
    """
    The files of a group handed to a sync thread, closed by whichever takes
    them first: the thread (L{_syncAndClose}), or the export when the
    hand-over failed (L{_handOver}).  ThreadPoolExecutor queues the work
    before it starts a thread for it; where that start fails (RuntimeError:
    can't start new thread, under a limit on processes) a thread of the
    pool already running still takes it, later, after the undo has closed
    the files and their numbers have gone to other files.
    """

    def __init__(self, fds):
        self._fds = fds
        self._lock = threading.Lock()

    def take(self):
        """
        @return: the descriptors, to close, or C{None} where they were
            taken already.
        """
        with self._lock:
            fds, self._fds = self._fds, None
        return fds


def _syncAndClose(handed):
    """
    Make written files durable, one after the other (on a thread of the
    export's pool), then close them: those of C{handed} (a L{_Handed}),
    unless the export has taken them back.
    """
    fds = handed.take()
    if fds is None:
        return
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        _close(fds)


def _close(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@attr.s
class _Staged:
    """
    A message written in C{tmp/} and being synced, to be moved to its
    name in C{cur/} once the sync is done.
    """

    path = attr.ib()
    final = attr.ib()
    fd = attr.ib()  # open until its sync is handed over (then None)
    synced = attr.ib(default=None)  # the Future of its group's sync


def exportMaildir(messages, directory, hostname=None, now=None, progress=None):
    """
    Write C{messages} into the Maildir C{directory} (made if missing;
    refused if it holds a mailbox already).

    @param messages: L{mailgate.records.ExportedMessage}s, in POP3 order.
    @param progress: called with a line for each message that could not
        be written, as it happens.
    @return: an L{ExportReport}.
    @raise ImportFailed: if the directory cannot be used or written.
    """
    _checkEmpty(directory)
    _makeDirectories(directory)
    host = _hostPart(hostname or socket.gethostname())
    now = int(time.time() if now is None else now)
    pid = os.getpid()
    report = ExportReport()
    uidLines = []
    tmp = os.path.join(directory, "tmp")
    cur = os.path.join(directory, "cur")
    # What this run has put in place, taken away again if it cannot end:
    # messages without their dovecot-uidlist would get new uids, so new
    # unique ids, from whatever served them (and one would be missing).
    placed = []
    # Written in tmp/, not in place yet (their syncs under way).
    batch = []
    staged = None
    # Leaving the pool waits for every sync it runs: no descriptor is
    # left open, whatever ends the export.
    with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mailgate-export-sync") as syncs:
        try:
            for message in messages:
                uid = len(uidLines) + 1
                base = f"{int(message.arrived)}.M{message.number}P{pid}Q{uid}.{host},S={message.size},W={message.size}"
                name = base + ":2,"
                staged = os.path.join(tmp, base)
                try:
                    fd, written = _writeBody(staged, message.body)
                    try:
                        if written != message.size:
                            raise TemporaryFailure(f"{counted(written, 'octet')} read of {message.size}")
                        os.utime(staged, (message.arrived, message.arrived))
                    except BaseException:
                        os.close(fd)
                        raise
                    batch.append(_Staged(staged, os.path.join(cur, name), fd))
                except TemporaryFailure as e:
                    _removeQuietly(staged)
                    staged = None
                    line = f"message {message.number} (unique id {message.uniqueId}): not exported: {e}"
                    report.failures.append(line)
                    if progress is not None:
                        progress(line)
                    continue
                except OSError as e:
                    raise ImportFailed(f"cannot write {e.filename or staged}: {e.strerror}") from None
                staged = None
                uidLines.append(f"{uid} P{message.uniqueId} W{message.size} :{name}\n")
                report.messages += 1
                report.octets += message.size
                if len(batch) >= BATCH_MESSAGES:
                    _place(syncs, batch, placed)
                elif len(batch) % SYNC_GROUP == 0:
                    _handOver(syncs, batch[-SYNC_GROUP:])
            _place(syncs, batch, placed)
            _writeUidList(directory, now, uidLines)
        except ImportFailed as e:
            _undo(staged, batch, placed)
            raise ImportFailed(f"{e}; nothing of the export is left in {directory}") from None
        except BaseException:
            _undo(staged, batch, placed)
            raise
    try:
        _syncDirectory(cur)
        _syncDirectory(directory)
    except OSError as e:
        raise ImportFailed(f"cannot sync {directory}: {e.strerror}") from None
    return report


def _handOver(syncs, batch):
    """
    Have the files of C{batch} whose syncs are not handed over yet synced
    and closed on a thread of C{syncs}.
    """
    waiting = [message for message in batch if message.fd is not None]
    if waiting:
        handed = _Handed([message.fd for message in waiting])
        try:
            synced = syncs.submit(_syncAndClose, handed)
        except BaseException:
            # No thread could be started for them (RuntimeError: can't
            # start new thread, under a process limit), but the work may
            # be queued for a running one: the export's undo closes them
            # where that thread has not taken them yet, and it then leaves
            # them alone.
            if handed.take() is None:
                for message in waiting:
                    message.fd = None
            raise
        for message in waiting:
            # The thread's to close from now on (an undo must not close
            # them again).
            message.fd = None
            message.synced = synced


def _place(syncs, batch, placed):
    """
    Move the messages of C{batch} to their names in C{cur/}, each once
    its sync is done (none before: a crash must never leave part of a
    message under a name Dovecot serves), and empty the batch.

    @raise ImportFailed: if a file could not be synced or moved.
    """
    _handOver(syncs, batch)
    for message in batch:
        try:
            message.synced.result()
            os.rename(message.path, message.final)
        except OSError as e:
            raise ImportFailed(f"cannot write {e.filename or message.path}: {e.strerror}") from None
        placed.append(message.final)
    batch.clear()


def _writeUidList(directory, uidValidity, lines):
    """
    The list, written whole under another name and renamed: Dovecot never
    reads half of one.
    """
    path = os.path.join(directory, UIDLIST)
    staged = path + ".tmp"
    try:
        # A new file, never through what is there already: a link left
        # in its place would have its target truncated and written.
        _removeQuietly(staged)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"3 V{uidValidity} N{len(lines) + 1}\n")
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.rename(staged, path)
    except OSError as e:
        _removeQuietly(staged)
        raise ImportFailed(f"cannot write {path}: {e.strerror}") from None


def _undo(staged, batch, placed):
    """
    Remove what an export that cannot end has written: the file being
    written (if any), those of the batch under way (in C{tmp/}, or moved
    to C{cur/} already), and the messages placed before.  A name in
    C{cur/} is this run's: it found C{cur/} empty.
    """
    paths = [staged] if staged else []
    _close([message.fd for message in batch if message.fd is not None])
    for message in batch:
        paths += [message.path, message.final]
    for path in paths + placed:
        _removeQuietly(path)


def _removeQuietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
