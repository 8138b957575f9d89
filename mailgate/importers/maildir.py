# -*- test-case-name: tests.test_importers -*-
"""
Importing a Maildir (C{cur/} and C{new/}) the way Dovecot serves it over
POP3: the same messages, in the same order, with the same sizes and the
same unique ids.

  - Order: by IMAP uid, as C{dovecot-uidlist} records it; files the list
    does not know yet come after, in the order Dovecot would give them
    their uids (by the delivery time in the file name, then its
    microseconds, then the rest of the name).
  - Unique ids: an explicit POP3 UIDL saved in the list (its C{P} field,
    written by C{pop3_save_uidl} or the pop3-migration plugin; empty, it
    stands for the base file name) wins;
    otherwise Dovecot's C{pop3_uidl_format}, spelled for Dovecot 2.3 or
    2.4 (L{mailgate.importers.uidlformat}; default C{%08Xu%08Xv}: uid
    and uidvalidity, in hex) over its variables C{%u} (uid), C{%v}
    (uidvalidity), C{%f} (the file's base name), C{%g} (the message's
    GUID: the list's C{G} field, else the base name) and C{%m} (the MD5 of
    the header, in hex; Dovecot itself has it for mbox only).  A maildir
    without C{dovecot-uidlist} has no uids: its default is C{%f}.  With
    Dovecot's C{pop3_reuse_xuidl}, a message's own C{X-UIDL} header field
    comes before the format (after a saved id).
  - Left out: with Dovecot's C{pop3_deleted_flag}, the messages that
    carry that keyword (POP3 clients deleted them; Dovecot no longer
    lists them).
  - Content: octet for octet, LF line ends served as CRLF (what Dovecot's
    LIST counts and RETR sends).
"""

import functools
import hashlib
import os
import re
import time

import attr

from mailgate.errors import MailgateError
from mailgate.importers import (
    BatchWriter,
    FileSource,
    MAX_MESSAGE_SIZE,
    ImportFailed,
    ImportReport,
    claimPresent,
    clientsWord,
    maildirSource,
    messageBlocks,
    openRegularFile,
    removeGone,
    renameDuplicates,
    validUidl,
)
from mailgate.importers.compressed import MAGIC_LENGTH, detect
from mailgate.importers.uidlformat import checkUidlFormat, formatUidl, usesVariable
from mailgate.plural import counted

UIDLIST = "dovecot-uidlist"
KEYWORDS = "dovecot-keywords"
DEFAULT_FORMAT = "%08Xu%08Xv"
FILENAME_FORMAT = "%f"
INFO_SEPARATOR = ":"


@attr.s
class Record:
    uid = attr.ib()
    filename = attr.ib()
    fields = attr.ib(factory=dict)


@attr.s
class UidList:
    """
    What C{dovecot-uidlist} says: the mailbox's uidvalidity, its next uid,
    and per message (by base file name) its uid and extension fields.
    """

    uidValidity = attr.ib()
    nextUid = attr.ib()
    guid = attr.ib(default=None)
    records = attr.ib(factory=dict)


def baseName(filename):
    """
    A maildir file name without its flags (C{:2,S}): what stays the same
    while the message lives.
    """
    return filename.split(INFO_SEPARATOR, 1)[0]


_NUMBER = re.compile(r"[0-9]{1,10}")
_UINT32 = (1 << 32) - 1


def _number(text, what, lowest=1):
    """
    One of the list's numbers, which Dovecot keeps in 32 bits (uids,
    uidvalidity) and writes in decimal digits.

    @raise ValueError: for anything else.
    """
    if _NUMBER.fullmatch(text) and lowest <= int(text) <= _UINT32:
        return int(text)
    raise ValueError(f"{what} {text[:20]!r} is not a number from {lowest} to {_UINT32}")


def readUidList(path):
    """
    Parse a C{dovecot-uidlist} (version 3, or the old version 1).

    @return: a L{UidList}, or C{None} if there is no such file.
    @raise ImportFailed: if it cannot be read or parsed.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImportFailed(f"cannot read {path}: {e.strerror}") from None
    # Lines as Dovecot reads them: ended by LF alone (a CR before it left
    # out), not by the other line breaks of str.splitlines (a file name
    # may hold U+2028 or U+0085); and a last line without its LF is one
    # Dovecot is still appending (or never finished), which it does not
    # read: its message is numbered as a new one.
    lines = [
        (line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "surrogateescape")
        for line in data.split(b"\n")[:-1]
    ]
    if not lines:
        raise ImportFailed(f"{path} is empty")
    header = lines[0].split()
    try:
        uidList = _header(header, path)
        version = int(header[0])
        for number, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            if version == 1:
                uid, separator, filename = line.partition(" ")
                if not separator:
                    raise ValueError(f"line {number}: no file name")
                fields = {}
            else:
                before, separator, filename = line.partition(" :")
                if not separator:
                    raise ValueError(f"line {number}: no file name")
                parts = before.split(" ")
                uid = parts[0]
                fields = {part[0]: part[1:] for part in parts[1:] if part}
            if "O" in fields:
                _number(fields["O"], f"line {number}: POP3 order", lowest=0)
            record = Record(_number(uid, f"line {number}: uid"), filename, fields)
            uidList.records[baseName(filename)] = record
    except ValueError as e:
        raise ImportFailed(f"{path}: not a dovecot-uidlist Dovecot wrote: {e}") from None
    return uidList


def _header(words, path):
    """
    The L{UidList} a C{dovecot-uidlist}'s first line (split in words)
    begins: C{1 <uidvalidity> <next uid>}, or C{3} and fields, of which
    C{V} (uidvalidity) and C{N} (next uid) must be there.

    @raise ImportFailed: for another version.
    @raise ValueError: saying what is wrong with the line.
    """
    if not words or not words[0].isascii() or not words[0].isdigit():
        raise ValueError("line 1: no version number (a dovecot-uidlist begins with 1 or 3)")
    version = int(words[0])
    if version == 1:
        if len(words) < 3:
            raise ValueError("line 1: a version 1 header is 1 <uidvalidity> <next uid>")
        return UidList(_number(words[1], "uidvalidity"), _number(words[2], "next uid"))
    if version == 3:
        fields = {item[0]: item[1:] for item in words[1:]}
        for key, what in (("V", "uidvalidity"), ("N", "next uid")):
            if key not in fields:
                raise ValueError(f"line 1: the header has no {what} ({key} field)")
        return UidList(_number(fields["V"], "uidvalidity"), _number(fields["N"], "next uid"), fields.get("G"))
    raise ImportFailed(f"{path}: unknown dovecot-uidlist version {version}")


def _leadingNumber(name):
    match = re.match(r"[0-9]*", name)
    digits = match.group(0)
    return int(digits) if digits else 0, name[len(digits) :]


def _microseconds(rest):
    """
    The microseconds of a name's uniqueness part (C{.M<usecs>...}), after
    its leading timestamp; C{None} if it has none.
    """
    if not rest.startswith("."):
        return None
    for part in rest[1:].split(".", 1)[0].split(INFO_SEPARATOR, 1)[0:1]:
        match = re.search(r"M([0-9]*)", part)
        if match:
            return int(match.group(1) or 0)
    return None


def dovecotOrder(name1, name2):
    """
    Dovecot's order of new maildir files (C{maildir_filename_sort_cmp}):
    by the timestamp the name starts with, then by the microseconds of
    its uniqueness part where both have them, then by the rest of the
    base name.
    """
    seconds1, rest1 = _leadingNumber(name1)
    seconds2, rest2 = _leadingNumber(name2)
    if seconds1 != seconds2:
        return -1 if seconds1 < seconds2 else 1
    micro1, micro2 = _microseconds(rest1), _microseconds(rest2)
    if micro1 is not None and micro2 is not None and micro1 != micro2:
        return -1 if micro1 < micro2 else 1
    return _baseCompare(rest1, rest2)


def _baseCompare(name1, name2):
    """
    Dovecot's C{maildir_filename_base_cmp}: octet by octet up to the flags
    separator, which ends the comparison but, where only one name has
    reached it, counts as the octet C{:}.  A file still in C{new/} has no
    separator yet: Dovecot gives it one (C{:2,}) as it moves the file to
    C{cur/}, before numbering it, so its end counts as C{:} too.
    """
    a = name1.encode("utf-8", "surrogateescape")
    b = name2.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(a) and i < len(b) and a[i] == b[i] and a[i] != 0x3A:
        i += 1
    x = a[i] if i < len(a) else 0x3A
    y = b[i] if i < len(b) else 0x3A
    if x == 0x3A and y == 0x3A:
        return 0
    return x - y


@attr.s
class MaildirMessage:
    """
    One message file, as POP3 will number it.
    """

    path = attr.ib()
    base = attr.ib()
    uid = attr.ib()
    fields = attr.ib(factory=dict)
    #: whether its unique id, which its file gives (C{%m}, X-UIDL), is
    #: unknown: the file could not be read
    idUnread = attr.ib(default=False)


def listMaildir(directory, uidList=None):
    """
    The messages of a maildir in Dovecot's POP3 order, each with its uid
    (C{None} everywhere if there is no uid list).

    @raise ImportFailed: if C{directory} is not a maildir.
    """
    found, twins = _messageFiles(directory)
    if not found and not any(os.path.isdir(os.path.join(directory, sub)) for sub in ("cur", "new")):
        raise ImportFailed(f"{directory} is not a maildir (no cur/ or new/)")
    listed, unlisted = [], []
    for base, path in found.items():
        record = uidList.records.get(base) if uidList is not None else None
        if record is not None:
            listed.append(MaildirMessage(path, base, record.uid, record.fields))
        else:
            unlisted.append(MaildirMessage(path, base, None))
    listed.sort(key=lambda m: m.uid)
    unlisted.sort(key=functools.cmp_to_key(lambda a, b: dovecotOrder(a.base, b.base)))
    # Another file with a base name already seen (in cur/ and new/ both):
    # Dovecot renames it and numbers it after the others; it comes last
    # here too, its id renamed as a repeat's (never dropped).
    unlisted += [MaildirMessage(path, baseName(os.path.basename(path)), None) for path in sorted(twins)]
    if uidList is not None:
        # After every uid the list has, files or not: Dovecot leaves the
        # records of expunged messages in it (until it rewrites it) and
        # never gives their uids again, and its header's next uid stays
        # behind the records it appends.
        nextUid = max([uidList.nextUid] + [record.uid + 1 for record in uidList.records.values()])
        for offset, message in enumerate(unlisted):
            message.uid = nextUid + offset
    messages = listed + unlisted
    if any("O" in m.fields for m in messages):
        # A POP3 order saved by the pop3-migration plugin comes first.
        messages.sort(key=lambda m: (0, int(m.fields["O"]), m.uid) if "O" in m.fields else (1, 0, m.uid))
    return messages


def _messageFiles(directory):
    """
    Each message file of a maildir by its base name, and the twins: other
    files of a base name already seen (in C{cur/} and C{new/} both).

    A live Dovecot renames files while they are listed: it moves new mail
    to C{cur/} as a client looks, and changes flags in C{cur/}; and
    readdir gives a file renamed while its directory is read under
    either name, both, or neither.  So the two directories are read
    twice, C{new/} before C{cur/} each time (a file only ever moves from
    C{new/} to C{cur/}: read the other way, one moved in between would be
    in neither), and every name read counts.  A message read under
    several names is one message (the names that still exist, the
    first in C{cur/}; where none does, it was renamed again or expunged
    since: any of them, which L{_openMessage} looks for again by its
    base name, or reports gone).

    @return: C{({base name: path}, [paths of twins])}.
    @raise ImportFailed: if a directory cannot be read.
    """
    names = {}
    for _ in range(2):
        for sub in ("new", "cur"):
            folder = os.path.join(directory, sub)
            try:
                listed = os.listdir(folder)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ImportFailed(f"cannot read {folder}: {e.strerror}") from None
            for name in listed:
                if not name.startswith("."):
                    # Whatever it is: a link or a FIFO is refused, and
                    # said so, when it is opened.
                    names.setdefault(baseName(name), {})[os.path.join(folder, name)] = sub
    found, twins = {}, []
    for base, paths in names.items():
        if len(paths) == 1:
            found[base] = next(iter(paths))
            continue
        existing = sorted((path for path in paths if os.path.lexists(path)), key=lambda p: paths[p] != "cur")
        if not existing:
            found[base] = list(paths)[-1]
            continue
        found[base] = existing[0]
        twins += [path for path in existing[1:] if not _sameFile(existing[0], path)]
    return found, twins


def _sameFile(path1, path2):
    """
    Whether two names are links to one file (a delivery that links the
    file into place and crashed before removing the old name): one
    message, not two.
    """
    try:
        one, two = os.lstat(path1), os.lstat(path2)
    except OSError:
        return False
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _headerMD5(source):
    header = b""
    for chunk in source.chunks(1 << 16):
        header += chunk
        if len(header) >= source.headerSize:
            break
    return hashlib.md5(header[: source.headerSize]).hexdigest()


#: Leading numbers below this (1973) are not delivery times.
_EARLIEST_NAME_TIME = 100000000
#: How far past now a time may be (clocks differ a little).
_CLOCK_SLACK = 86400


def _arrival(message, source, now):
    """
    When a message arrived: the delivery time its name starts with, else
    the file's modification time, else C{now}.  A time after tomorrow
    does not count: a broken name or clock would give the message a date
    no listing can show (or the database hold).
    """
    seconds, _ = _leadingNumber(message.base)
    if _EARLIEST_NAME_TIME <= seconds <= now + _CLOCK_SLACK:
        return seconds
    modified = int(source.mtime)
    if 0 <= modified <= now + _CLOCK_SLACK:
        return modified
    return now


def importMaildir(store, directory, address, uidlFormat=None, now=None, progress=None, uidListPath=None,
                  reuseXUidl=False, deletedFlag=None, mirror=False, maxSize=MAX_MESSAGE_SIZE, decompress=True,
                  soleSource=False):
    """
    Import a maildir into C{address}'s maildrop, keeping the unique ids
    Dovecot serves for it.

    @param uidlFormat: Dovecot's C{pop3_uidl_format} for the maildir;
        default C{%08Xu%08Xv}, or C{%f} without a C{dovecot-uidlist}.
    @param uidListPath: the maildir's C{dovecot-uidlist} where Dovecot
        keeps it elsewhere (C{CONTROL=} in C{mail_location}); default:
        the one in C{directory}.
    @param now: the time (default: the clock's), for messages without a
        plausible arrival time.
    @param progress: called with a line of text now and then.
    @param reuseXUidl: whether Dovecot serves a message's X-UIDL header
        field as its unique id (its C{pop3_reuse_xuidl = yes}).
    @param deletedFlag: Dovecot's C{pop3_deleted_flag}, if it has one:
        the messages with that keyword are left out.
    @param mirror: whether to take out of the maildrop what an earlier
        import from this maildir brought in and the maildir no longer
        lists (L{removeGone}).
    @param soleSource: with C{mirror}, whether this maildir alone filled
        the address: what was imported before mailgate recorded the
        source of each id counts as its.
    @param maxSize: the largest message imported, in octets (as served,
        decompressed); a larger one is a failure in the report, found
        out before more than that is read.
    @param decompress: whether files Dovecot's zlib plugin compressed
        (told by their first octets) are read decompressed, as that
        Dovecot serves them; false, every file is imported as it is
        stored, as a Dovecot without the plugin serves it (the files that
        begin like compressed data said, in one line).
    @return: an L{ImportReport}.
    @raise ImportFailed: if the maildir cannot be read, or the format
        needs what it has not (uids without a uid list).
    """
    now = int(time.time()) if now is None else now
    checkMaildir(directory, uidListPath, uidlFormat)
    _reportFolders(directory, progress)
    if progress is not None and os.path.exists(os.path.join(directory, "maildirfolder")):
        progress(
            f"{directory} is a folder of a maildir (it has maildirfolder), not an INBOX, which is all POP3 "
            f"serves: imported as asked"
        )
    uidList = readUidList(uidListPath or os.path.join(directory, UIDLIST))
    if uidList is None:
        # Checked again as read: the file may have gone since.
        _checkWithoutUidList(directory, uidListPath, uidlFormat)
    if uidList is None and uidlFormat is None:
        _noUidList(directory, progress)
    if uidlFormat is None:
        uidlFormat = DEFAULT_FORMAT if uidList is not None else FILENAME_FORMAT
    try:
        checkUidlFormat(uidlFormat)
    except ValueError as e:
        raise ImportFailed(f"bad --uidl-format {uidlFormat!r}: {e}") from None
    uidList, messages = _consistentListing(directory, uidList, uidListPath or os.path.join(directory, UIDLIST), progress)
    if deletedFlag is not None:
        keywords = os.path.join(os.path.dirname(uidListPath) if uidListPath else directory, KEYWORDS)
        messages = _withoutKeyword(messages, deletedFlag, keywords, progress)
    if uidList is not None and usesVariable(uidlFormat, "u"):
        _reportUnnumbered(messages, uidList, progress)
    report = ImportReport()
    source = maildirSource(directory)
    try:
        listed = _importMessages(
            store, address, messages, uidList, uidlFormat, report, now, progress, reuseXUidl, maxSize, decompress,
            source,
        )
        unread = sum(message.idUnread for message in messages)
        if mirror and unread:
            # Their ids unknown, what an earlier run imported under them
            # would look gone from the maildir.
            report.failures.append(
                f"{counted(unread, 'message')} of the maildir could not be read for its unique id: what "
                f"the maildir no longer has was not taken out"
            )
        elif mirror:
            removeGone(store, address, source, listed, report, soleSource)
    except MailgateError as e:
        report.failures.append(
            f"writing to the maildrop of {address} failed: {e}; the batch under way was not imported"
        )
        report.temporary = True
    return report


def _reportUnnumbered(messages, uidList, progress):
    """
    Say which uids the files Dovecot has not numbered yet were given
    (L{listMaildir}: the next ones, in the order Dovecot numbers new
    files), and when those hold: only if Dovecot numbers these files
    before it saves a message of its own.  Its LMTP, LDA and IMAP APPEND
    take the next uid without numbering what another program (Postfix's
    virtual, procmail) dropped in C{new/} (seen with Debian's Dovecot
    2.3: a message its LMTP saved after such a file took the uid the
    import had given the file, which Dovecot numbered after it at the
    next POP3 login), and each would then be served under the other's id.
    """
    guessed = []
    for message in messages:
        record = uidList.records.get(message.base)
        if record is None or record.uid != message.uid:
            guessed.append(message.uid)
    if not guessed or progress is None:
        return
    if len(guessed) == 1:
        given = f"uid {guessed[0]}, the one Dovecot gives it next unless it first saves a message of its own"
        taken = "which takes that uid"
    else:
        given = (
            f"uids {min(guessed)} to {max(guessed)}, the ones Dovecot gives them next unless it first saves a "
            f"message of its own"
        )
        taken = "which takes the first of them"
    progress(
        f"{counted(len(guessed), 'file')} that Dovecot has not numbered yet (dropped in by another program than "
        f"Dovecot) got {given} (by its LMTP, LDA or IMAP), {taken}: where mail also comes in through Dovecot, "
        f"have it number them just before the import (doveadm mailbox status -u USER messages INBOX), or import "
        f"with Dovecot stopped"
    )


#: How many times a maildir is listed while Dovecot changes its uid list.
_LISTINGS = 5


def _consistentListing(directory, uidList, uidListPath, progress):
    """
    L{listMaildir} with a uid list that did not change while the maildir
    was listed: read again after each listing, and the maildir listed
    again while it changed (a live Dovecot numbering new mail, for a
    client that logged in).  Otherwise a message Dovecot numbered and
    expunged meanwhile would leave its uid to the next new file here, a
    uid Dovecot never gives again: that file's id would not be the one
    Dovecot serves.  A few times at most; then the last listing, said.

    @return: C{(uidList, messages)}.
    """
    messages = listMaildir(directory, uidList)
    if uidList is None:
        return uidList, messages
    for _ in range(_LISTINGS - 1):
        again = readUidList(uidListPath)
        if again is None or again == uidList:
            return uidList, messages
        uidList = again
        messages = listMaildir(directory, uidList)
    if progress is not None:
        progress(
            f"{uidListPath} changed at each of {_LISTINGS} listings (Dovecot is numbering new mail): the ids of "
            f"messages it numbers now may differ from Dovecot's; run the import again (with --mirror) once "
            f"Dovecot no longer serves the maildir"
        )
    return uidList, messages


def checkMaildir(directory, uidListPath=None, uidlFormat=None):
    """
    What an import of C{directory} refuses before it reads a message, from
    the files there alone: so that C{mailgate import maildir} can say it
    before it opens the database, and L{importMaildir} says it in the same
    words.

    @raise OtherFormat: if C{directory} holds mail in another format.
    @raise ImportFailed: if C{directory} is no maildir, C{uidListPath} is
        not there, or C{uidlFormat} uses uids (C{%u}, C{%v}) where there is
        no uid list.
    """
    if not any(os.path.isdir(os.path.join(directory, sub)) for sub in ("cur", "new")):
        # Before anything is said of its dovecot-uidlist: a mistyped path
        # is one error, not a warning about ids and then the error.
        _refuseOtherFormat(directory)
        raise ImportFailed(f"{directory} is not a maildir (no cur/ or new/){_maildirBelow(directory)}")
    if not os.path.exists(uidListPath or os.path.join(directory, UIDLIST)):
        _checkWithoutUidList(directory, uidListPath, uidlFormat)


def _checkWithoutUidList(directory, uidListPath, uidlFormat):
    """
    Refuse an import of C{directory}, which has no uid list, if it was
    given one (C{uidListPath}) or its format needs one.
    """
    if uidListPath is not None:
        raise ImportFailed(f"no such file: {uidListPath}")
    if uidlFormat is not None and (usesVariable(uidlFormat, "u") or usesVariable(uidlFormat, "v")):
        raise ImportFailed(
            f"{directory} has no {UIDLIST}, so its messages have no uid or uidvalidity: "
            f"use a --uidl-format without %u and %v (e.g. %f)"
        )


class OtherFormat(ImportFailed):
    """
    What was given as a maildir is mail in another of Dovecot's formats
    (sdbox, mdbox, mbox): its messages are no maildir files, and the
    import cannot read them.
    """


#: What to do with mail in another format: what Dovecot serves of it.
_OTHER_FORMAT_ADVICE = (
    "import it through Dovecot's POP3 (mailgate import pop3), which serves the same ids; or have Dovecot "
    "copy it into a maildir, keeping uids, with doveadm backup -u USER maildir:/PATH/Maildir:LAYOUT=fs, and import that"
)


def _refuseOtherFormat(directory):
    """
    Refuse, saying which format it is and what to do, a C{directory}
    that holds mail in another of Dovecot's formats: an sdbox or mdbox
    (C{mailboxes/NAME/dbox-Mails}, mdbox's C{storage/m.N}; or one
    mailbox's C{dbox-Mails} itself), or an mbox (a file beginning with
    C{From }, or a directory of them).  Anything else is left to the
    caller's "not a maildir".

    @raise OtherFormat: for such a directory.
    """
    kind = _otherFormat(directory)
    if kind is not None:
        raise OtherFormat(f"{directory} is {kind}, not a maildir: {_OTHER_FORMAT_ADVICE}")


def _otherFormat(directory):
    if os.path.isfile(directory):
        return "an mbox file (Dovecot's mbox format)" if _isMbox(directory) else None
    try:
        names = set(os.listdir(directory))
    except OSError:
        return None
    if os.path.isdir(os.path.join(directory, "storage")) and "mailboxes" in names:
        return "an mdbox (Dovecot's multi-dbox format: messages in storage/m.*)"
    if os.path.isdir(os.path.join(directory, "mailboxes")):
        return "an sdbox (Dovecot's single-dbox format: messages in mailboxes/*/dbox-Mails/u.*)"
    if os.path.basename(os.path.normpath(directory)) == "dbox-Mails" or "dbox-Mails" in names:
        return "a dbox mailbox (Dovecot's sdbox or mdbox format)"
    if any(_isMbox(os.path.join(directory, name)) for name in sorted(names)[:100]):
        return "a directory of mbox files (Dovecot's mbox format)"
    return None


def _isMbox(path):
    """
    Whether C{path} is a regular file beginning as an mbox does (C{From }).
    """
    try:
        fd, _ = openRegularFile(path)
    except (OSError, ImportFailed):
        return False
    try:
        return os.pread(fd, 5, 0) == b"From "
    except OSError:
        return False
    finally:
        os.close(fd)


def _maildirBelow(directory):
    """
    For a directory that is no maildir: where one is right below it (a
    home directory given for its C{Maildir/}), said as a hint; else
    nothing.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return ""
    for entry in entries[:1000]:
        if entry.is_dir(follow_symlinks=False) and any(
            os.path.isdir(os.path.join(entry.path, sub)) for sub in ("cur", "new")
        ):
            return f"; {entry.path} is one"
    return ""


#: A maildir's own subdirectories, which are no folders.
_MAILDIR_PARTS = ("cur", "new", "tmp")
#: How many folder names the report shows.
_FOLDERS_SHOWN = 10


def _reportFolders(directory, progress):
    """
    Say which folders a maildir has beside its INBOX (Maildir++'s
    C{.Sent}, C{.a.b}; C{LAYOUT=fs}'s C{Sent/}), and how many messages
    they hold: they are not imported, as POP3 serves INBOX only (so does
    Dovecot's), and an administrator moving mail should know what stays
    behind.
    """
    folders = []
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        if entry.name in _MAILDIR_PARTS or not entry.is_dir(follow_symlinks=False):
            continue
        count = 0
        isFolder = os.path.exists(os.path.join(entry.path, "maildirfolder"))
        for sub in ("cur", "new"):
            try:
                count += sum(not name.startswith(".") for name in os.listdir(os.path.join(entry.path, sub)))
                isFolder = True
            except OSError:
                pass
        if isFolder:
            folders.append((entry.name, count))
    if not folders or progress is None:
        return
    shown = ", ".join(f"{name} ({count})" for name, count in folders[:_FOLDERS_SHOWN])
    if len(folders) > _FOLDERS_SHOWN:
        shown += f", and {len(folders) - _FOLDERS_SHOWN} more"
    messages = sum(count for _, count in folders)
    progress(
        f"{directory}: {counted(len(folders), 'folder')} beside INBOX left as they are, "
        f"{counted(messages, 'message')} in them: {shown}; POP3 serves INBOX only, as Dovecot's does"
    )


#: Files of Dovecot's index, in a maildir it has served (unless INDEX=
#: puts them elsewhere too).
_DOVECOT_INDEX = ("dovecot.index", "dovecot.index.log", "dovecot.index.cache")


def _withoutKeyword(messages, keyword, keywordsPath, progress):
    """
    C{messages} without those whose file name carries C{keyword}, as
    Dovecot leaves them out of POP3 (its C{pop3_deleted_flag}: POP3
    clients deleted them, IMAP ones still see them).  A maildir file name
    carries keywords as the letters C{a} to C{z} among its flags (after
    its last C{:2,}), each standing for the keyword C{dovecot-keywords}
    numbers 0 to 25; keywords are compared without case, as Dovecot
    does.  Said how many were left out, and, where C{dovecot-keywords}
    does not list C{keyword}, that none was (a keyword misspelt, or given
    without its C{$}, would bring back every message POP3 clients
    deleted without a word).

    @raise ImportFailed: if C{dovecot-keywords} cannot be read, or lists
        the 26 keywords file names can carry and not C{keyword}: Dovecot
        keeps any further keyword in its index alone, which is not read
        here, so the messages that have it cannot be told.
    """
    names = _fileNameKeywords(keywordsPath)
    letter = next((letter for letter, name in names.items() if name.lower() == keyword.lower()), None)
    if letter is None:
        if len(names) >= _FILE_NAME_KEYWORDS:
            raise ImportFailed(
                f"{keywordsPath} lists {_FILE_NAME_KEYWORDS} keywords, the most a maildir file name can carry, "
                f"and not {keyword} (--deleted-flag): Dovecot keeps any further keyword in its index only, which "
                f"mailgate does not read, so the messages POP3 clients deleted cannot be told from the others; "
                f"move this maildrop with import pop3, through Dovecot's POP3, which leaves them out"
            )
        if progress is not None:
            near = [name for name in names.values() if name.lower().lstrip("$") == keyword.lower().lstrip("$")]
            progress(
                f"no message has the keyword {keyword} (--deleted-flag), which {keywordsPath} does not list"
                + (f" (it lists {near[0]})" if near else "")
                + ": none left out as deleted by POP3 clients"
            )
        return messages
    kept = [m for m in messages if letter not in _flags(os.path.basename(m.path))]
    if len(kept) < len(messages) and progress is not None:
        progress(
            f"{len(messages) - len(kept)} of the messages have the keyword {keyword} (pop3_deleted_flag: "
            f"deleted by POP3 clients, no longer listed by Dovecot): not imported"
        )
    return kept


#: The keywords a maildir file name can carry: the letters a to z.
_FILE_NAME_KEYWORDS = 26


def _fileNameKeywords(path):
    """
    The keywords a maildir's file names carry, by the letter standing for
    each, as its C{dovecot-keywords} (lines C{<number> <keyword>}, numbers
    0 to 25 for C{a} to C{z}) gives them: C{{letter: keyword}}, empty if
    there is no such file (no keyword was ever set).
    """
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 20).decode("utf-8", "surrogateescape").splitlines()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ImportFailed(f"cannot read {path}: {e.strerror}") from None
    names = {}
    for line in lines:
        number, _, name = line.partition(" ")
        if _NUMBER.fullmatch(number) and int(number) < _FILE_NAME_KEYWORDS:
            names.setdefault(chr(ord("a") + int(number)), name)
    return names


def _flags(filename):
    """
    The flags of a maildir file name, as Dovecot reads them: what follows
    its last C{:2,} (up to a further comma).
    """
    _, separator, info = filename.rpartition(INFO_SEPARATOR)
    if not separator or not info.startswith("2,"):
        return ""
    return info[2:].split(",", 1)[0]


def _noUidList(directory, progress):
    """
    A maildir without C{dovecot-uidlist}, and no format given: its ids
    will be the file names.  Where Dovecot's index shows that Dovecot has
    served it, its uid list is elsewhere (C{CONTROL=}), and file names
    would be other ids than the ones it served (every leave-on-server
    client would download everything again): refused.

    @raise ImportFailed: if Dovecot's index is there.
    """
    index = [name for name in _DOVECOT_INDEX if os.path.exists(os.path.join(directory, name))]
    if index:
        raise ImportFailed(
            f"{directory} has Dovecot's index ({index[0]}) but no {UIDLIST}: Dovecot keeps that elsewhere "
            f"(CONTROL= in mail_location, e.g. ~/control/.INBOX/{UIDLIST}); give it with --uidlist (or, "
            f"if Dovecot serves file names, --uidl-format %f)"
        )
    if progress is not None:
        progress(
            f"{directory} has no {UIDLIST}: the unique ids are the file names (%f); if Dovecot keeps its "
            f"{UIDLIST} elsewhere (CONTROL= in mail_location), give it with --uidlist"
        )


def _importMessages(store, address, messages, uidList, uidlFormat, report, now, progress, reuseXUidl=False,
                    maxSize=MAX_MESSAGE_SIZE, decompress=True, origin=None):
    opener = functools.partial(FileSource, maxSize=maxSize, decompress=decompress)
    uidls = _uniqueIds(messages, uidList, uidlFormat, report, progress, reuseXUidl, opener, decompress)
    writer = BatchWriter(store, address, report, source=origin)
    # Files that begin like compressed data, read as stored.
    asStored = []
    for message, uidl in zip(messages, uidls):
        if uidl is None:
            continue
        source = _openMessage(message, report, opener)
        if source is not None:
            _checkNamedSizes(message, source, progress)
            if source.detected is not None and source.compression is None:
                asStored.append((message.path, source.detected.name))
            writer.add(uidl, source, _arrival(message, source, now), message.path)
    writer.flush()
    claimPresent(store, address, origin, writer.skipped)
    _sayAsStored(asStored, progress)
    # What the maildir lists, imported now or not.
    return [uidl for uidl in uidls if uidl is not None]


def _sayAsStored(asStored, progress):
    """
    Say how many files that begin like compressed data were read as they
    are stored (C{--decompress=never}), naming the first: right for a
    maildir a Dovecot without its zlib plugin served, and garbage served
    to every client where one with the plugin did, which a mistaken
    option would otherwise leave unsaid.
    """
    if not asStored or progress is None:
        return
    kinds = ", ".join(sorted({kind for _, kind in asStored}))
    progress(
        f"{counted(len(asStored), 'file')} beginning like compressed data ({kinds}; the first {asStored[0][0]}) "
        f"read as stored (--decompress=never): what a Dovecot without its zlib plugin served, not what one "
        f"with it served"
    )


_NAMED_SIZE = re.compile(r",([SW])=([0-9]+)(?=[,:]|$)")


def namedSizes(base):
    """
    The sizes a maildir file's base name gives, as Dovecot writes and
    reads them: C{S=} the file's octets (decompressed), C{W=} the
    message's with CRLF line ends (what POP3's LIST shows); C{{"S": n,
    "W": n}}, either missing where the name has none.
    """
    sizes = {}
    for kind, digits in _NAMED_SIZE.findall(base):
        sizes.setdefault(kind, int(digits))
    return sizes


def _checkNamedSizes(message, source, progress):
    """
    Say so where the sizes in a file's name are not the file's: Dovecot
    believes the name (its LIST shows W=, its RETR stops at S= or logs
    the file as broken), the import reads the file and imports it whole,
    so what mailgate serves for it differs from what Dovecot served.
    """
    named = namedSizes(message.base)
    actual = {"S": source.storedSize, "W": source.size}
    wrong = [kind for kind in ("S", "W") if kind in named and named[kind] != actual[kind]]
    if wrong and progress is not None:
        said = ",".join(f"{kind}={named[kind]}" for kind in wrong)
        real = ",".join(f"{kind}={actual[kind]}" for kind in wrong)
        progress(
            f"{message.path}: the sizes in its name ({said}) are not the file's ({real}), which Dovecot served "
            f"by its name (LIST; RETR cut at S=): imported whole, as the file is ({source.size} octets)"
        )


def _uniqueIds(messages, uidList, uidlFormat, report, progress, reuseXUidl=False, opener=FileSource,
               decompress=True):
    """
    Each message's unique id, or C{None} for one that has none POP3 can
    carry (a failure in the report).  All are known before anything is
    imported, so that a repeated id is renamed to one that no other
    message has (L{renameDuplicates}).
    """
    needsMD5 = usesVariable(uidlFormat, "m")
    own = [
        _ownUniqueId(message, uidList, uidlFormat, needsMD5, report, reuseXUidl, progress, opener, decompress)
        for message in messages
    ]
    renamed = iter(renameDuplicates([uidl for uidl in own if uidl is not None]))
    uidls = []
    for message, uidl in zip(messages, own):
        name = None if uidl is None else next(renamed)
        if name is not None and name != uidl:
            if progress is not None:
                progress(f"{message.path}: unique id {uidl} appears twice; imported as {name}")
            name = _checked(message, name, report)
        uidls.append(name)
    return uidls


def _ownUniqueId(message, uidList, uidlFormat, needsMD5, report, reuseXUidl=False, progress=None, opener=FileSource,
                 decompress=True):
    """
    The unique id Dovecot serves for C{message} (repeats not renamed
    yet), or C{None} (a failure in the report).
    """
    # A saved id; an empty one stands for the base file name.
    uidl = message.fields.get("P")
    if uidl == "":
        uidl = message.base
    if uidl is None and reuseXUidl:
        # Dovecot's pop3_reuse_xuidl: the header field's, before the format.
        found, uidl = _xUidl(message, report, decompress)
        if not found:
            message.idUnread = True
            return None
    if uidl is None:
        variables = {
            "u": None if message.uid is None else str(message.uid),
            "v": None if uidList is None else str(uidList.uidValidity),
            "f": message.base,
            "g": message.fields.get("G") or message.base,
            "m": None,
        }
        if needsMD5:
            source = _openMessage(message, report, opener)
            if source is None:
                message.idUnread = True
                return None
            try:
                variables["m"] = _headerMD5(source)
            finally:
                source.close()
        try:
            uidl = formatUidl(uidlFormat, variables)
        except ValueError as e:
            # A format that cannot be put through this message's values (a
            # Dovecot 2.4 filter refusing them): Dovecot could not list it
            # either.
            report.failures.append(f"{message.path}: pop3_uidl_format gives it no unique id: {e}")
            return None
    # Dovecot serves an id with spaces (a file name's, %f or %g; an
    # X-UIDL field's) as it is; clients keep its first word, as import
    # pop3 does.
    word = clientsWord(uidl)
    if word != uidl and word and progress is not None:
        progress(f"{message.path}: unique id {uidl[:80]!r} has a space; imported as {word[:80]!r}, "
                 f"its first word, which clients keep")
    return _checked(message, word, report)


def _xUidl(message, report, decompress=True):
    """
    The unique id Dovecot serves for C{message} with C{pop3_reuse_xuidl}:
    the value of its header's first X-UIDL field, as it is (spaces and
    all: L{_ownUniqueId} keeps the word clients keep).

    @return: C{(True, id)}, C{(True, None)} if the header has no such
        field (the format gives the id), or C{(False, None)} if the file
        could not be read (a failure in the report).
    """
    fd = _openMessage(message, report, opener=lambda path: openRegularFile(path)[0])
    if fd is None:
        return False, None
    try:
        value = xUidlField(fd, decompress=decompress)
    except OSError as e:
        report.failures.append(f"{message.path}: {e.strerror}")
        return False, None
    except ImportFailed as e:
        report.failures.append(f"{message.path}: {e}")
        return False, None
    finally:
        os.close(fd)
    if value is None:
        return True, None
    return True, value.decode("utf-8", "surrogateescape")


#: How much of one header line is kept while looking for X-UIDL (the rest
#: of a longer line is skipped, never held).
_MAX_FIELD_LINE = 1 << 16


def xUidlField(fd, limit=MAX_MESSAGE_SIZE, decompress=True):
    """
    The value of the first X-UIDL field in the header of the message file
    open as C{fd}, as Dovecot's C{mail_get_first_header} finds it: the
    name compared without case, white space allowed before the colon, the
    value from its first octet that is no space or tab to the end of the
    field's first line.  C{None} if the header has none.

    Read line by line up to the header's end, never more than
    L{_MAX_FIELD_LINE} octets of a line held, never more than C{limit}
    octets (a header as large as that is a message too large to import);
    a file Dovecot's zlib plugin compressed is read decompressed (unless
    C{decompress} is false: as it is stored).

    @raise ImportFailed: for a compressed file mailgate cannot read.
    """
    compression = detect(os.pread(fd, MAGIC_LENGTH, 0)) if decompress else None
    if compression is not None and compression.decompressor is None:
        raise ImportFailed(f"compressed with {compression.name}, which mailgate cannot read: not imported")
    for line in _lines(_upTo(messageBlocks(fd, compression, 1 << 16), limit)):
        line = line.rstrip(b"\r")
        if not line:
            return None
        name, colon, value = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"x-uidl" and not name[:1].isspace():
            return value.lstrip(b" \t")
    return None


def _upTo(blocks, limit):
    """
    C{blocks} until they have given C{limit} octets.
    """
    given = 0
    for block in blocks:
        if given >= limit:
            return
        given += len(block)
        yield block


def _lines(blocks):
    """
    The lines of a file, given as its C{blocks} from its start, without
    their LF, each cut to L{_MAX_FIELD_LINE} octets.
    """
    line, cut = b"", False
    for block in blocks:
        start = 0
        while True:
            end = block.find(b"\n", start)
            piece = block[start:] if end < 0 else block[start:end]
            if not cut:
                line += piece
                if len(line) > _MAX_FIELD_LINE:
                    line, cut = line[:_MAX_FIELD_LINE], True
            if end < 0:
                break
            yield line
            line, cut = b"", False
            start = end + 1
    if line or cut:
        yield line


def _checked(message, uidl, report):
    if validUidl(uidl):
        return uidl
    report.failures.append(f"{message.path}: unique id {uidl[:80]!r} is not one POP3 can carry")
    return None


def _openMessage(message, report, opener=FileSource):
    """
    C{message}'s file as a L{FileSource} (or what C{opener} makes of its
    path), or C{None} (a failure in the report).  A file the mail server
    renamed since the listing (Dovecot does, moving it from C{new/} to
    C{cur/} or changing its flags) is looked for again under its base
    name, a few times at most.
    """
    for _ in range(3):
        try:
            return opener(message.path)
        except FileNotFoundError:
            moved = _findAgain(message)
            if moved is None:
                report.failures.append(f"{message.path}: gone during the import (expunged?): not imported")
                # The next run, which does not list it, completes.
                report.temporary = True
                return None
            message.path = moved
        except ImportFailed as e:
            # Not a regular file, compressed in a way not read here,
            # damaged, too large.
            report.failures.append(f"{message.path}: {e}")
            return None
        except OSError as e:
            report.failures.append(f"{message.path}: {e.strerror}")
            return None
    report.failures.append(f"{message.path}: renamed again and again during the import: not imported")
    report.temporary = True
    return None


def _findAgain(message):
    """
    Where C{message}'s file is now: a name in C{cur/} or C{new/} with its
    base name; C{None} if there is none.
    """
    directory = os.path.dirname(os.path.dirname(message.path))
    for sub in ("cur", "new"):
        folder = os.path.join(directory, sub)
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not name.startswith(".") and baseName(name) == message.base:
                return os.path.join(folder, name)
    return None
