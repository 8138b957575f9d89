# -*- test-case-name: tests.test_foreign_hashes -*-
"""
Dovecot's passwd-file, read as its passwd-file passdb and userdb read it,
for C{mailgate user import}: each account's address, password hash (kept
as it is, see L{mailgate.auth.foreign}) and quota.  What the store keeps of
them is the command's to make (L{mailgate.cli}): this module reads.

A line is C{user:password:uid:gid:gecos:home:shell:extra_fields}; only the
user, the password and the extra fields matter here.  Lines that cannot
be imported are reported with their number and the reason, never dropped
without a word, and the others are read on.
"""

import re
import unicodedata

import attr

from mailgate.address import userAddress
from mailgate.errors import InvalidAddress
from mailgate.networks import parseAllowedNetworks


@attr.s(frozen=True, slots=True)
class PasswdAccount:
    """
    One account of a passwd-file.

    @ivar number: its line number.
    @ivar address: the user's address.
    @ivar password: its password hash as Dovecot reads it, C{{SCHEME}...}
        (with the passwd-file's default scheme put in front where the line
        names none), or a bare crypt(3) string.
    @ivar quota: what its quota rule for all mailboxes sets, C{octets} and
        C{messages}, each a number, 0 for no limit (as in Dovecot); C{{}}
        where it sets none.
    @ivar unkept: its extra fields that limit where it logs in from that
        mailgate does not keep (C{allow_real_nets}: the address that
        connected, a proxy's where one forwarded the client's; mailgate
        checks the client's address alone).
    @ivar networks: its C{allow_nets}, the networks it may log in from, as
        L{mailgate.networks.parseAllowedNetworks} keeps them (C{None}:
        anywhere): imported as the user's (C{mailgate user networks}).
    """

    number = attr.ib()
    address = attr.ib()
    password = attr.ib(repr=False)
    quota = attr.ib()
    unkept = attr.ib(default=())
    #: C{None} for an account that logs in; for one Dovecot refuses
    #: (C{nologin}, C{fail}), imported disabled, its C{reason} (C{""}
    #: for none)
    disabled = attr.ib(default=None)
    #: which of those it has: C{"nologin"}, C{"fail"}, or C{None}
    refusedBy = attr.ib(default=None)
    networks = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class RefusedLine:
    """
    A line that cannot be imported, and why.
    """

    number = attr.ib()
    reason = attr.ib()


def readPasswdFile(lines, domain=None, scheme=None):
    """
    The accounts of a passwd-file's lines, in order: a L{PasswdAccount}
    or a L{RefusedLine} for each line that is not blank or a comment.

    @param lines: the file's lines (L{str}; octets that were not UTF-8
        kept as lone surrogates, so that only a line whose name or hash
        has some is refused: a gecos field in Latin-1 is read past).
    @param domain: the (normalised) domain of user names without one, or
        C{None} to refuse them.
    @param scheme: the scheme of passwords written without a C{{SCHEME}}
        prefix (the passdb's C{args = scheme=...}); without it, such a
        password is a crypt(3) string, as Dovecot's default C{CRYPT}.
    """
    lines = list(lines)
    kept = _keptLines(lines, domain)
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            yield _account(number, line, domain, scheme, kept)
        except _Refused as e:
            yield RefusedLine(number, str(e))


def _keptLines(lines, domain):
    """
    The number of the line Dovecot logs each address in with, where the
    file has it on several: the first, as Dovecot keeps a user's first
    line and logs the others as errors ("exists more than once"), but the
    first whose user name a login reaches (L{_reached}: no ASCII capitals,
    in NFC) where another's is not.  Its
    passwd-file finds a name as it is written, and the name looked for is
    the login lower-cased (C{auth_username_format = %Lu}, the default):
    a line C{Alice@example.org} is one no login reaches, and a line
    C{alice@example.org} after it is the one whose password the user
    logged in with.
    """
    kept = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            address, written = _address(line, domain)
        except _Refused:
            continue
        if address not in kept or (_reached(written) and not _reached(kept[address][1])):
            kept[address] = (number, written)
    return {address: number for address, (number, _) in kept.items()}


#: ASCII's capitals to its small letters: all that Dovecot's %L lowers.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _reached(written):
    """
    Whether the logins of a name's user reach its line in Dovecot: a name
    its C{%Lu} leaves as it is, and in NFC, as keyboards type it.  Its
    C{%L} lowers ASCII letters alone and its passwd-file compares octets
    (Dovecot 2.3.19: C{JÖRG} logs in as a line C{jÖrg}, not C{jörg}; C{jörg}
    decomposed is no line C{jörg} precomposed), so of C{Jörg@} and
    C{jÖrg@}, which mailgate reads as one user, the second is the one whose
    password its user logged in with; C{str.lower} took both for capitals
    and kept the first, which no login reached.
    """
    if written != written.translate(_ASCII_LOWER):
        return False
    return written.isascii() or unicodedata.is_normalized("NFC", written)


class _Refused(Exception):
    pass


def _address(line, domain):
    """
    The address of a line's user, and its user name as written.

    @raise _Refused: for a line that has none.
    """
    name, colon, rest = line.partition(":")
    # A name field that may hold the password (no ":" after it: fields
    # separated by a space or a tab, or a password alone) is not shown:
    # the reason goes to the terminal of whoever runs the import.
    if not colon:
        raise _Refused("no ':' after the user name (a line is user:password:...); the line is not shown")
    if any(ch.isspace() for ch in name):
        raise _Refused("the user name holds white space (a ':' missing after it?); the line is not shown")
    if not _isText(name + rest.split(":", 1)[0]):
        raise _Refused("the user name or password hash is not UTF-8 text")
    written = name
    if "@" not in name:
        if domain is None:
            raise _Refused(f"{name!r} has no domain: give --domain")
        name = f"{name}@{domain}"
    try:
        # A domain in Unicode is its ASCII form, as mail to it and logins
        # with it take it (it was refused as an invalid domain).
        return userAddress(name), written
    except InvalidAddress as e:
        raise _Refused(str(e)) from None


def _account(number, line, domain, scheme, kept):
    address, _ = _address(line, domain)
    if kept[address] < number:
        raise _Refused(f"{address} is on line {kept[address]} already (that line is the one kept)")
    if kept[address] > number:
        raise _Refused(
            f"{address} is on line {kept[address]} too, in lower case, the line Dovecot logs them in with "
            f"(it looks up the name logged in with lower-cased): that line is the one kept"
        )
    name, colon, rest = line.partition(":")
    fields = rest.split(":", 6)
    hashed = fields[0]
    extra = fields[6] if len(fields) == 7 else ""
    if not hashed:
        raise _Refused(f"{address} has no password")
    if scheme is not None and not hashed.startswith("{"):
        hashed = f"{{{scheme}}}{hashed}"
    fields = dict(field.partition("=")[::2] for field in extra.split())
    disabled = refusedBy = None
    for refusing in ("nologin", "fail"):
        # An account Dovecot keeps from logging in (disabled, or served
        # elsewhere: nologin; the passdb lookup failed on purpose: fail,
        # whatever its value): imported disabled, its mail moved, and it
        # does not log in here either until mailgate user enable.
        if refusing in fields:
            disabled, refusedBy = fields.get("reason", ""), refusing
            break
    try:
        quota = dovecotQuota(extra)
    except ValueError as e:
        raise _Refused(f"{address}: {e}") from None
    unkept = tuple(field for field in extra.split() if field.partition("=")[0] in _UNKEPT_NETWORKS)
    networks = None
    if "allow_nets" in fields:
        # Dovecot refuses every login of an account whose allow_nets it
        # cannot read: refused here too, rather than let in from anywhere.
        try:
            networks = parseAllowedNetworks(fields["allow_nets"])
        except ValueError as e:
            raise _Refused(f"{address}: allow_nets: {e}") from None
        if networks is None:
            raise _Refused(f"{address}: allow_nets names no network")
    return PasswdAccount(number, address, hashed, quota, unkept, disabled, refusedBy, networks)


#: Dovecot's extra fields that allow an account's logins from some
#: networks only, which mailgate does not keep: allow_real_nets names the
#: address that connected, a proxy's where one forwarded the client's
#: (mailgate checks the client's, as allow_nets has it; its balancers are
#: --proxy-balancers).
_UNKEPT_NETWORKS = ("allow_real_nets",)


def _isText(text):
    """
    Whether C{text} was read from UTF-8 (holds no octet that was not,
    kept as a lone surrogate).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dovecotQuota(extra):
    """
    The quota of a passwd-file line, from its extra fields'
    C{userdb_quota_rule} (or C{quota_rule}) for all mailboxes (C{*} or
    C{?}): C{storage} (kilobytes unless a unit says otherwise, as Dovecot
    counts it), C{bytes} and C{messages}; 0 and C{ignore} are no limit, as
    in Dovecot.  C{octets} and C{messages} as numbers, 0 for no limit; or
    C{{}} where the line sets none.

    @raise ValueError: a rule mailgate cannot keep (a percentage, another
        unit), saying why.
    """
    changes = {}
    for field in extra.split():
        key, _, value = field.partition("=")
        if key not in ("userdb_quota_rule", "quota_rule"):
            continue
        mask, _, limits = value.partition(":")
        if mask not in ("*", "?"):
            continue
        if limits == "ignore":
            changes.update(octets=0, messages=0)
            continue
        for limit in limits.split(":"):
            name, _, amount = limit.partition("=")
            # Dovecot reads a unit by its first letter: 1G, 1GB and 1GiB
            # alike, for messages too (10k messages are 10240).
            found = re.fullmatch(r"([0-9]+)(?:([bBkKmMgGtT])[a-zA-Z]*)?", amount)
            if name not in ("storage", "bytes", "messages") or found is None:
                raise ValueError(f"quota rule {value!r} is not one mailgate can keep")
            number, unit = int(found.group(1)), (found.group(2) or "").upper()
            default = 1024 if name == "storage" else 1
            scale = {"": default, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
            changes["messages" if name == "messages" else "octets"] = number * scale[unit]
    return changes
