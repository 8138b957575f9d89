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
    otherwise Dovecot's C{pop3_uidl_format} (default C{%08Xu%08Xv}: uid
    and uidvalidity, in hex) over its variables C{%u} (uid), C{%v}
    (uidvalidity), C{%f} (the file's base name), C{%g} (the message's
    GUID: the list's C{G} field, else the base name) and C{%m} (the MD5 of
    the header, in hex; Dovecot itself has it for mbox only).  A maildir
    without C{dovecot-uidlist} has no uids: its default is C{%f}.
  - Content: octet for octet, LF line ends served as CRLF (what Dovecot's
    LIST counts and RETR sends).
"""

import functools
import hashlib
import os
import re

import attr

from mailgate.errors import MailgateError
from mailgate.importers import BatchWriter, FileSource, ImportFailed, ImportReport, validUidl

UIDLIST = "dovecot-uidlist"
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


def readUidList(path):
    """
    Parse a C{dovecot-uidlist} (version 3, or the old version 1).

    @return: a L{UidList}, or C{None} if there is no such file.
    @raise ImportFailed: if it cannot be read or parsed.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImportFailed(f"cannot read {path}: {e.strerror}") from None
    if not lines:
        raise ImportFailed(f"{path} is empty")
    header = lines[0].split()
    try:
        version = int(header[0])
        if version == 1:
            uidList = UidList(int(header[1]), int(header[2]))
        elif version == 3:
            fields = {item[0]: item[1:] for item in header[1:] if item}
            uidList = UidList(int(fields["V"]), int(fields["N"]), fields.get("G"))
        else:
            raise ImportFailed(f"{path}: unknown dovecot-uidlist version {version}")
        for number, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            if version == 1:
                uid, filename = line.split(" ", 1)
                fields = {}
            else:
                before, separator, filename = line.partition(" :")
                if not separator:
                    raise ValueError(f"line {number}: no file name")
                parts = before.split(" ")
                uid = parts[0]
                fields = {part[0]: part[1:] for part in parts[1:] if part}
            record = Record(int(uid), filename, fields)
            uidList.records[baseName(filename)] = record
    except (IndexError, KeyError, ValueError) as e:
        raise ImportFailed(f"{path}: not a dovecot-uidlist Dovecot wrote: {e}") from None
    return uidList


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


def listMaildir(directory, uidList=None):
    """
    The messages of a maildir in Dovecot's POP3 order, each with its uid
    (C{None} everywhere if there is no uid list).

    @raise ImportFailed: if C{directory} is not a maildir.
    """
    found = {}
    for sub in ("cur", "new"):
        folder = os.path.join(directory, sub)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ImportFailed(f"cannot read {folder}: {e.strerror}") from None
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.setdefault(baseName(name), path)
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
    if uidList is not None:
        nextUid = max([uidList.nextUid] + [m.uid + 1 for m in listed])
        for offset, message in enumerate(unlisted):
            message.uid = nextUid + offset
    messages = listed + unlisted
    if any("O" in m.fields for m in messages):
        # A POP3 order saved by the pop3-migration plugin comes first.
        messages.sort(key=lambda m: (0, int(m.fields["O"]), m.uid) if "O" in m.fields else (1, 0, m.uid))
    return messages


# -- pop3_uidl_format -----------------------------------------------------------

_LONG_NAMES = {"uid": "u", "uidvalidity": "v", "md5": "m", "filename": "f", "guid": "g"}
_MODIFIERS = "LUXRMT"


def _modify(modifier, value):
    if modifier == "L":
        return value.lower()
    if modifier == "U":
        return value.upper()
    if modifier == "X":
        try:
            return f"{int(value):x}"
        except ValueError:
            return "0"
    if modifier == "R":
        return value[::-1]
    if modifier == "M":
        return hashlib.md5(value.encode("utf-8", "surrogateescape")).hexdigest()
    if modifier == "T":
        return value.rstrip()
    raise AssertionError(modifier)


def formatUidl(template, variables):
    """
    Expand a Dovecot C{pop3_uidl_format} (Dovecot 2.3's C{%} variables):
    C{%[-][0][width][.[0][-]width]}, modifiers C{L U X R M T}, one-letter
    variables or C{%{long}} names, C{%%}.

    @param variables: the values by letter (C{u v m f g}), as text.
    @raise ValueError: for a variable that is unknown or has no value.
    """
    out = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        i += 1
        sign, zero, width, offset = 1, False, 0, 0
        if i < n and template[i] == "-":
            sign, i = -1, i + 1
        if i < n and template[i] == "0":
            zero, i = True, i + 1
        while i < n and template[i].isdigit():
            width, i = width * 10 + int(template[i]), i + 1
        if i < n and template[i] == ".":
            offset, sign, width, i = sign * width, 1, 0, i + 1
            zero = False
            if i < n and template[i] == "0":
                zero, i = True, i + 1
            if i < n and template[i] == "-":
                sign, i = -1, i + 1
            while i < n and template[i].isdigit():
                width, i = width * 10 + int(template[i]), i + 1
            width *= sign
        modifiers = []
        while i < n and template[i] in _MODIFIERS:
            modifiers.append(template[i])
            i += 1
        if i >= n:
            break
        if template[i] == "%":
            value = "%"
            i += 1
        else:
            if template[i] == "{":
                end = template.find("}", i)
                if end < 0:
                    raise ValueError(f"unterminated %{{ in {template!r}")
                key = _LONG_NAMES.get(template[i + 1 : end])
                name = template[i + 1 : end]
                i = end + 1
            else:
                key = name = template[i]
                i += 1
            if key not in variables or variables[key] is None:
                raise ValueError(f"%{name} is not available here")
            value = variables[key]
        for modifier in modifiers:
            value = _modify(modifier, value)
        if offset < 0:
            if len(value) > -offset:
                value = value[len(value) + offset :]
        elif offset > 0:
            value = value[offset:]
        if width == 0:
            out.append(value)
        elif not zero:
            if width < 0:
                width = len(value) + width
            out.append(value[: max(width, 0)])
        else:
            out.append(value.rjust(width, "0"))
    return "".join(out)


def usesVariable(template, letter):
    """
    Whether a format refers to variable C{letter}.
    """
    try:
        formatUidl(template, {k: "0" for k in "uvmfg" if k != letter})
    except ValueError:
        return True
    return False


def _headerMD5(source):
    header = b""
    for chunk in source.chunks(1 << 16):
        header += chunk
        if len(header) >= source.headerSize:
            break
    return hashlib.md5(header[: source.headerSize]).hexdigest()


def _arrival(message, default):
    """
    When a message arrived: the delivery time its name starts with, else
    the file's modification time.
    """
    seconds, _ = _leadingNumber(message.base)
    if seconds >= 100000000:
        return seconds
    try:
        return int(os.stat(message.path).st_mtime)
    except OSError:
        return default


def importMaildir(store, directory, address, uidlFormat=None, now=0, progress=None):
    """
    Import a maildir into C{address}'s maildrop, keeping the unique ids
    Dovecot serves for it.

    @param uidlFormat: Dovecot's C{pop3_uidl_format} for the maildir;
        default C{%08Xu%08Xv}, or C{%f} without a C{dovecot-uidlist}.
    @param progress: called with a line of text now and then.
    @return: an L{ImportReport}.
    @raise ImportFailed: if the maildir cannot be read, or the format
        needs what it has not (uids without a uid list).
    """
    uidList = readUidList(os.path.join(directory, UIDLIST))
    if uidlFormat is None:
        uidlFormat = DEFAULT_FORMAT if uidList is not None else FILENAME_FORMAT
    if uidList is None and (usesVariable(uidlFormat, "u") or usesVariable(uidlFormat, "v")):
        raise ImportFailed(
            f"{directory} has no {UIDLIST}, so its messages have no uid or uidvalidity: "
            f"use a --uidl-format without %u and %v (e.g. %f)"
        )
    try:
        formatUidl(uidlFormat, {k: "1" for k in "uvmfg"})
    except ValueError as e:
        raise ImportFailed(f"bad --uidl-format {uidlFormat!r}: {e}") from None
    messages = listMaildir(directory, uidList)
    report = ImportReport()
    try:
        _importMessages(store, address, messages, uidList, uidlFormat, report, now, progress)
    except MailgateError as e:
        report.failures.append(
            f"writing to the maildrop of {address} failed: {e}; the batch under way was not imported"
        )
    return report


def _importMessages(store, address, messages, uidList, uidlFormat, report, now, progress):
    writer = BatchWriter(store, address, report)
    needsMD5 = usesVariable(uidlFormat, "m")
    seen = {}
    for message in messages:
        try:
            source = FileSource(message.path)
        except OSError as e:
            report.failures.append(f"{message.path}: {e.strerror}")
            continue
        # A saved id; an empty one stands for the base file name.
        uidl = message.fields.get("P")
        if uidl == "":
            uidl = message.base
        if uidl is None:
            variables = {
                "u": None if message.uid is None else str(message.uid),
                "v": None if uidList is None else str(uidList.uidValidity),
                "f": message.base,
                "g": message.fields.get("G") or message.base,
                "m": _headerMD5(source) if needsMD5 else None,
            }
            uidl = formatUidl(uidlFormat, variables)
        if not validUidl(uidl):
            report.failures.append(f"{message.path}: unique id {uidl[:80]!r} is not one POP3 can carry")
            continue
        if uidl in seen:
            # Dovecot's pop3_uidl_duplicates = rename: "-2", "-3"...
            seen[uidl] += 1
            renamed = f"{uidl}-{seen[uidl]}"
            if progress is not None:
                progress(f"{message.path}: unique id {uidl} appears twice; imported as {renamed}")
            uidl = renamed
        seen.setdefault(uidl, 1)
        writer.add(uidl, source, _arrival(message, now))
    writer.flush()
