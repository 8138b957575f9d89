# -*- test-case-name: tests.test_auth -*-
"""
Mailbox addresses: the one place that decides what a user name looks like.

Users are addressed as C{local@domain}.  Addresses are compared without regard
to case, the way Dovecot's C{auth_username_format = %Lu} and practically every
mail system does, so they are stored lower-cased.
"""

import re

from mailgate.errors import InvalidAddress

MAX_LOCAL_PART = 64
MAX_ADDRESS = 254

# RFC 5321 dot-atom local parts, plus the quoted-string-free subset of
# characters people actually use; domains as LDH labels (or IDNA A-labels).
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# A quoted-pair of a quoted local part (RFC 5321 section 4.1.2).
_QUOTED_PAIR = re.compile(r"\\(.)")


def normalizeDomain(domain):
    """
    Return C{domain} lower-cased and checked.

    @type domain: L{str}
    @raise InvalidAddress: if it is not a host name.
    """
    domain = domain.strip().rstrip(".").lower()
    if not domain or len(domain) > 253:
        raise InvalidAddress(f"invalid domain: {domain!r}")
    for label in domain.split("."):
        # fullmatch: $ alone also matches before a last line end, and
        # "example.com\n.evil" was a domain.
        if not _LABEL.fullmatch(label):
            raise InvalidAddress(f"invalid domain: {domain!r}")
    return domain


def asciiDomain(domain):
    """
    The ASCII form (IDNA A-labels, lower case) of a domain written in
    Unicode, as users' addresses and C{--domain} keep it: an SMTPUTF8
    client may write a recipient's domain with U-labels (RFC 6531 section
    3.2; C{alice@bücher.example} is C{alice@xn--bcher-kva.example}, as
    Postfix looks it up).  IDNA 2008 with UTS 46's mapping, not
    transitional (C{straße} is not C{strasse}), as Postfix and browsers
    convert.  An ASCII domain is returned as it is.

    @return: the domain, or C{None} if it cannot be converted.
    """
    # White space around it is forgiven as around an ASCII domain (an
    # MTA's "alice@bücher.example " was no such user where
    # "alice@example.org " was alice's).
    domain = domain.strip()
    if domain.isascii():
        return domain
    # Imported here: only a recipient in Unicode needs it (the package
    # comes with Twisted's TLS).
    import idna

    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def _text(address):
    """
    An address given as L{str} or UTF-8 L{bytes}, as L{str}: each of
    L{loginAddress}, L{userAddress} and L{normalizeAddress} takes either,
    and refuses octets that are not UTF-8 with the same words.

    @raise InvalidAddress: if it is bytes that are not UTF-8.
    """
    if isinstance(address, bytes):
        try:
            return address.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAddress("address is not valid UTF-8") from None
    return address


def loginAddress(name, defaultRealm=None):
    """
    The address a login name stands for: the name itself, normalised; or,
    with a default realm (Dovecot's C{auth_default_realm}), a name without
    a domain in that domain, so that clients set up with the bare user
    name of a server that took it go on logging in after a move.

    @param name: the name the client gave, as L{str} or UTF-8 L{bytes}.
    @param defaultRealm: a normalised domain, or C{None}.
    @raise InvalidAddress: if it names no address.
    """
    if defaultRealm is not None:
        name = _text(name)
        if "@" not in name and name.strip():
            name = f"{name.strip()}@{defaultRealm}"
    return userAddress(name)


def userAddress(address):
    """
    A user's address as a person or a client writes it, normalised (see
    L{normalizeAddress}), a domain in Unicode taken as its ASCII form (see
    L{asciiDomain}): C{alice@bücher.example} is
    C{alice@xn--bcher-kva.example}, whether mail is sent to it, a
    C{mailgate} command names it or its user logs in with it.  A login
    with it was refused as an invalid address while mail to it was
    delivered, so the name the mail came to did not log in.

    @param address: as L{str} or UTF-8 L{bytes}.
    @raise InvalidAddress: if it names no address.
    """
    address = _text(address)
    local, at, domain = address.rpartition("@")
    if at and not domain.isascii():
        address = f"{local}@{asciiDomain(domain) or domain}"
    return normalizeAddress(address)


def normalizeAddress(address):
    """
    Return the canonical form of a user's address.

    @param address: C{local@domain}, as L{str} or UTF-8 L{bytes}.
    @raise InvalidAddress: if it is not a plain C{local@domain} address.
    """
    address = _text(address)
    address = address.strip()
    if len(address) > MAX_ADDRESS:
        # Said as such: the address itself may be of the right form.
        raise InvalidAddress(
            f"address too long: {address[:40]!r}... ({len(address)} characters, at most {MAX_ADDRESS})"
        )
    if address.count("@") != 1:
        raise InvalidAddress(f"not an address of the form local@domain: {address!r}")
    local, domain = address.split("@")
    if len(local) > MAX_LOCAL_PART:
        raise InvalidAddress(
            f"local part too long in {address!r} ({len(local)} characters, at most {MAX_LOCAL_PART})"
        )
    if not local or not _LOCAL.fullmatch(local):
        raise InvalidAddress(f"invalid local part in {address!r}")
    return local.lower() + "@" + normalizeDomain(domain)


def withoutDetail(address, delimiters):
    """
    The address of the user that C{address} names with a detail
    (C{bob@example.org} for C{bob+lists@example.org}, C{delimiters}
    C{"+"}, as Postfix's and Dovecot's C{recipient_delimiter}): its local
    part cut at the first delimiter; C{None} if it has none, or one only
    as its first character (a detail of nobody), or no delimiters are set.
    """
    if not delimiters:
        return None
    local, _, domain = address.rpartition("@")
    cuts = [i for i in map(local.find, delimiters) if i > 0]
    if not cuts:
        return None
    return f"{local[:min(cuts)]}@{domain}"


def userOfADetail(address, delimiters):
    """
    The user an address names with a detail when the address as a whole
    is none (L{normalizeAddress} refuses it): a detail is the sender's to
    choose, in UTF-8 (C{bob+café@}, with SMTPUTF8) or quoted with what a
    local part cannot hold unquoted (C{"bob+x y"@}), and Dovecot's LMTP
    and Postfix deliver it to bob, cut at the delimiter before anything
    else is asked of it.

    @param address: C{local@domain} as the client or the MTA wrote it, the
        local part possibly quoted (RFC 5321 section 4.1.2).
    @return: the user's normalised address (see L{withoutDetail},
        L{userAddress}), or C{None} if it names none.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return None
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    user = withoutDetail(f"{local}@{domain}", delimiters)
    if user is None:
        return None
    try:
        return userAddress(user)
    except InvalidAddress:
        return None
