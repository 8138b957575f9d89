# -*- test-case-name: tests.test_alias_import -*-
"""
Postfix's C{virtual_alias_maps} source file (virtual(5)), read as Postfix
3.7's C{postmap} reads it, for C{mailgate alias import}: each line's
pattern and the addresses it is rewritten to.  Which of them mailgate can
keep as aliases (one user each) is the command's to judge
(L{mailgate.cli.aliases}): this module reads.

What C{postmap} does, checked against it (tests/test_alias_import.py asks
C{postmap -q} of the same file):
  - blank lines, and lines whose first character that is not white space
    is C{#}, are skipped; C{#} elsewhere is no comment (C{a@x b@x # note}
    maps C{a@x} to three addresses);
  - a line starting with white space continues the logical line before
    it, across blank and comment lines; one that continues nothing is
    ignored (with a warning);
  - the pattern ends at the first white space outside double quotes; a
    line with no result after it is ignored (with a warning);
  - patterns are compared without regard to case, and of a pattern given
    twice the first line is kept (a warning names the other);
  - a warning names a logical line by its first line's number.
The results are separated by commas and/or white space (a quoted local
part is one).  Lines that cannot be imported are reported with their
number and the reason, never dropped without a word.
"""

import re

import attr

from mailgate.address import CATCH_ALL, userAddress
from mailgate.errors import InvalidAddress
from mailgate.importers.passwdfile import RefusedLine, _isText

#: The largest virtual(5) file read, in octets: a site's aliases are a
#: few thousand lines, and reading is bounded (a file path mistyped as a
#: disk image was read whole into memory).
MAX_FILE = 64 * 1024 * 1024


@attr.s(frozen=True, slots=True)
class VirtualAlias:
    """
    One pattern of a virtual(5) file and what Postfix rewrites it to.

    @ivar number: the number of its (first) line.
    @ivar pattern: the address, normalised as mailgate keeps addresses
        (L{mailgate.address.userAddress}); C{@domain} for a domain's
        catch-all.
    @ivar targets: the addresses of its result, normalised, each once, in
        the file's order (the pattern itself among them where the line
        keeps a copy for it).
    """

    number = attr.ib()
    pattern = attr.ib()
    targets = attr.ib()


@attr.s(frozen=True, slots=True)
class DomainLine:
    """
    A line whose pattern is a domain (C{example.com anything}): a "virtual
    alias domain" for C{virtual_alias_domains}, which names no address;
    mailgate takes mail for the domain of any of its aliases.
    """

    number = attr.ib()
    domain = attr.ib()


def readVirtualFile(lines):
    """
    The entries of a virtual(5) file's lines, in order: a L{VirtualAlias},
    a L{DomainLine} or a L{RefusedLine} for each logical line.

    @param lines: the file's lines (L{str}, without their line ends).
    """
    # The line kept for each pattern, by the pattern as Postfix compares
    # it (in lower case) and as mailgate does: the first line Postfix
    # keeps, even where mailgate cannot import it (a later line of the
    # same pattern is not what mail to it got).
    kept = {}
    for number, text in _logicalLines(lines):
        if text is None:
            yield RefusedLine(
                number, "starts with white space but continues no line before it (Postfix ignores the line)"
            )
            continue
        key = _KEY.match(text).group()
        rest = text[len(key) :].strip()
        if not _isText(key):
            yield RefusedLine(number, "its pattern is not UTF-8 text (a file in Latin-1?)")
            continue
        if not rest:
            yield RefusedLine(number, f"no result after {key!r} (a line is 'pattern result'; Postfix ignores the line)")
            continue
        try:
            pattern = _pattern(key)
        except _Refused as e:
            pattern, refused = None, e
        name = pattern.domain if isinstance(pattern, DomainLine) else pattern
        names = {key.lower(), name} - {None}
        first = min((kept[n] for n in names if n in kept), default=None)
        if first is not None:
            yield RefusedLine(
                number, f"{name or key} is on line {first} already (that line is kept, as Postfix keeps the first)"
            )
            continue
        kept.update((n, number) for n in names)
        try:
            if pattern is None:
                raise refused
            if not _isText(rest):
                raise _Refused(f"{name}: its result is not UTF-8 text (a file in Latin-1?)")
            yield _entry(number, pattern, rest)
        except _Refused as e:
            yield RefusedLine(number, str(e))


def _logicalLines(lines):
    """
    Each logical line's first line number and text, as Postfix's
    readllines() joins them (C{None} for text where a line starting with
    white space continues none).
    """
    number, text = None, None
    for at, line in enumerate(lines, 1):
        line = line.rstrip()
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if text is not None:
                text += line
                continue
            yield at, None
            continue
        if text is not None:
            yield number, text
        number, text = at, line
    if text is not None:
        yield number, text


class _Refused(Exception):
    pass


#: A word of a line: a run of characters other than white space (and, in
#: results, commas), double-quoted strings (with their backslash pairs)
#: whole.
_KEY = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^\s"])+')
_RESULT = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^\s",])+')


def _entry(number, pattern, rest):
    if isinstance(pattern, DomainLine):
        return attr.evolve(pattern, number=number)
    words = _RESULT.findall(rest)
    comment = [word for word in words if word.startswith("#")]
    if comment:
        raise _Refused(
            f"{pattern}: its result holds {' '.join(words[words.index(comment[0]):])!r}: a '#' starts a comment "
            "only at the start of a line, Postfix reads the rest as addresses too"
        )
    targets = []
    for word in words:
        target = _target(pattern, word)
        if target not in targets:
            targets.append(target)
    return VirtualAlias(number, pattern, tuple(targets))


def _pattern(key):
    """
    A pattern's address as mailgate keeps it; C{@domain}, the domain's
    catch-all, as its domain is kept; a L{DomainLine} for a domain (a
    pattern without C{@}: C{virtual_alias_domains}' line).
    """
    try:
        if "@" not in key:
            return _domain(key)
        if key.startswith(CATCH_ALL):
            # The domain as an address of it has it (IDNA, lower case).
            return CATCH_ALL + userAddress(f"postmaster{key}").rpartition("@")[2]
        return userAddress(key)
    except InvalidAddress as e:
        raise _Refused(str(e)) from None


def _domain(key):
    """
    A pattern without C{@}: a domain, or a user name Postfix matches in
    its own domains only.
    """
    if "." in key:
        try:
            return DomainLine(None, userAddress(f"postmaster@{key}").rpartition("@")[2])
        except InvalidAddress:
            pass
    raise _Refused(
        f"{key!r} has no domain: Postfix matches it in the domains of $myorigin, $mydestination and its "
        f"interfaces, which mailgate does not know; write it {key}@DOMAIN"
    )


def _target(pattern, word):
    if "@" not in word:
        raise _Refused(
            f"{pattern}: {word!r} has no domain (Postfix adds $myorigin's, which mailgate does not know): "
            f"write it {word}@DOMAIN"
        )
    try:
        return userAddress(word)
    except InvalidAddress as e:
        raise _Refused(f"{pattern}: {e}") from None
