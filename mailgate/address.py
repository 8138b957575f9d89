# -*- test-case-name: tests.test_auth -*-
"""
Mailbox addresses: the one place that decides what a user name looks like.

Users are addressed as C{local@domain}.  Addresses are compared without regard
to case, the way Dovecot's C{auth_username_format = %Lu} and practically every
mail system does, so they are stored lower-cased.

A local part may be written in UTF-8 (RFC 6531 and 6532: C{jörg@example.com}),
as Dovecot takes UTF-8 user names; see L{normalizeAddress} for what such a
local part may hold and the one form it is stored in.  The domain is kept in
its ASCII form (IDNA A-labels, L{asciiDomain}).
"""

import re
import unicodedata

from mailgate.errors import InvalidAddress

MAX_LOCAL_PART = 64
MAX_ADDRESS = 254

#: What a catch-all alias's address is (C{@example.org}): the domain after
#: it, no local part, so that no address of a user or of another alias,
#: nor any RCPT's, can be one (L{mailgate.store.aliases}).
CATCH_ALL = "@"

# RFC 5321 dot-atom local parts, plus the quoted-string-free subset of
# characters people actually use; domains as LDH labels (or IDNA A-labels).
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# A quoted-pair of a quoted local part (RFC 5321 section 4.1.2).
_QUOTED_PAIR = re.compile(r"\\(.)")
# RFC 6532 section 3.2's atext, extended by UTF8-non-ascii: RFC 5322's atext
# and every non-ASCII character (those refused are refused by what they are,
# _refusal).  Written as the characters it leaves out, as smtp.syntax's are:
# a class ranging up to U+10FFFF takes re milliseconds to compile.
_UTF8_ATEXT = r"""[^\x00-\x20"(),.:;<>@[\\\]\x7f]"""
_UTF8_LOCAL = re.compile(rf"{_UTF8_ATEXT}+(\.{_UTF8_ATEXT}+)*")

#: The general categories no local part may hold, and what they are called in
#: a refusal: controls, invisible format characters (the right-to-left
#: override that shows C{gpj.exe} as C{exe.jpg}, zero-width joiners and
#: spaces that make two names of one look), code points of no character yet
#: (Unicode may give them a meaning, or a case, later), private use (shown as
#: whatever a font puts there), surrogates, spaces and line separators.
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cn": "not an assigned character",
    "Co": "a private-use character",
    "Cs": "a surrogate",
    "Zs": "a space",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}

#: Characters that show as nothing though they are not format characters:
#: SASLprep's "commonly mapped to nothing" (RFC 3454 table B.1: the
#: combining grapheme joiner, variation selectors, the Mongolian soft hyphen
#: and free variation selectors), the Hangul fillers and Khmer inherent
#: vowels that Unicode counts as default-ignorable.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x1806, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164, 0xFFA0]
    + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0))
)


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


#: A master user's name (L{masterName}): lower-case letters, digits and
#: C{. _ - @}, so that no character a separator may be
#: (L{MASTER_SEPARATORS}) is ever part of one.
_MASTER_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,127}$")

#: The characters that may separate a user's name from a master user's in
#: one login name (Dovecot's C{auth_master_user_separator}, C{*} most
#: often): printable ASCII that no master name holds.
MASTER_SEPARATORS = "*%!#$&+/=?^`|~:;,"


def masterName(name):
    """
    A master user's name as given to a C{mailgate master} command or by a
    client at login, normalised: lower-cased, as user names are compared
    (C{Admin} logs in as C{admin}).  Master users are not mailboxes (they
    receive no mail and have no address): a name is letters, digits and
    C{. _ - @}, up to 128 characters (C{admin}, C{helpdesk@example.org}).

    @param name: as L{str} or UTF-8 L{bytes}.
    @raise InvalidAddress: if it is no such name.
    """
    name = _text(name)
    lowered = name.lower()
    if not _MASTER_NAME.match(lowered) or not lowered.isascii():
        raise InvalidAddress(
            "a master user's name is 1 to 128 letters, digits and . _ - @, starting with a letter or digit"
        )
    return lowered


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

    An ASCII address is what it always was: a dot-atom local part (RFC
    5321) lower-cased, a host name lower-cased.

    A local part in UTF-8 (RFC 6532's atext with UTF8-non-ascii) is put in
    Unicode's normalisation form C and lower-cased (C{str.lower}, then NFC
    again; I{İ} as I{i} and a sigma final at the end of a word, as
    L{_lowered} says why): C{Jörg} written with a precomposed C{ö} (as
    most keyboards) or as C{o} and a combining diaeresis (NFD, as macOS's
    file names and some clients and MTAs send it) is the one user
    C{jörg}.  Its length is counted in octets of UTF-8 (RFC 6531 section
    3.3): 64 for the local part, 254 for the address.  Refused, each named
    in the refusal with its code point:
      - controls, spaces, line and paragraph separators, surrogates;
      - invisible characters (format characters such as the right-to-left
        override or a zero-width joiner, variation selectors, fillers):
        two users whose names differ by what cannot be seen;
      - U+FFFD, what a decoder puts for octets that are not UTF-8;
      - unassigned and private-use code points: no one can tell what they
        show (judged by the Unicode version of the running Python);
      - characters with a compatibility form (full-width C{ａ}, the
        ligature C{ﬁ}, superscripts, C{µ}): SASLprep (SCRAM's preparation
        of user names, RFC 5802) makes the plain letters of them, so a name
        holding one would be another user's name to a SCRAM client; and a
        full-width C{ａdmin} looks like C{admin};
      - a combining mark that begins an atom, with nothing of its own to
        combine with;
      - a letter whose capital is another letter's (the Cyrillic rounded
        I{ᲀ}, whose capital is I{в}'s; I{ᾳ}, in capitals I{αι}'s): the
        name in capitals would be another user's.  The German I{ß} and
        the Turkish I{ı} are letters of their own (I{STRASSE} is
        C{strasse}, not C{straße}).
    Letters of other scripts that look like Latin ones (a Cyrillic C{а})
    are not refused: they are letters of their names, and only an
    administrator creates users.

    @param address: C{local@domain}, as L{str} or UTF-8 L{bytes}.
    @raise InvalidAddress: if it is not a plain C{local@domain} address.
    """
    address = _text(address)
    address = address.strip()
    if not address.isascii():
        # The ASCII addresses of every login and delivery take the path
        # below, as fast as before UTF-8 local parts were allowed.
        return _normalizeUTF8(address)
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


def _normalizeUTF8(address):
    """
    L{normalizeAddress} of an address that is not all ASCII: its local part
    in NFC and lower case, checked; its domain as an ASCII one is (one in
    Unicode is refused, as it always was: L{userAddress} converts it).
    """
    if address.count("@") != 1:
        raise InvalidAddress(f"not an address of the form local@domain: {address!r}")
    typed, domain = address.split("@")
    local = _lowered(typed)
    octets = len(local.encode("utf-8"))
    if octets > MAX_LOCAL_PART:
        raise InvalidAddress(
            f"local part too long in {address!r} ({octets} octets of UTF-8, at most {MAX_LOCAL_PART})"
        )
    if not _UTF8_LOCAL.fullmatch(local):
        raise InvalidAddress(f"invalid local part in {address!r}")
    refusal = _refusal(local)
    if refusal is not None:
        # Named as typed where it can be: a full-width Ａ is refused as
        # itself, not as the ａ it lowers to, which the administrator
        # would look for in vain.
        refusal = _refusal(unicodedata.normalize("NFC", typed), lowered=False) or refusal
        raise InvalidAddress(f"invalid local part in {address!r}: {refusal}")
    domain = normalizeDomain(domain)
    octets += 1 + len(domain)
    if octets > MAX_ADDRESS:
        raise InvalidAddress(
            f"address too long: {address[:40]!r}... ({octets} octets of UTF-8, at most {MAX_ADDRESS})"
        )
    return f"{local}@{domain}"


def _lowered(local):
    """
    A UTF-8 local part in NFC and lower case, in the one spelling every
    case of it is lowered to.

    NFC before lower-casing (a decomposed capital is lowered as the one
    letter it is) and after (lower-casing may leave a letter decomposed).
    Beyond C{str.lower}, so that however a client writes the name (all in
    capitals, or as it is spelt in lower case) it is the one user:
      - the dotted capital I{İ} is I{i}: C{str.lower} makes it I{i} and a
        combining dot above (U+0307), which no one types and many fonts
        show as a plain I{i}: C{İlker} was a user that C{ilker} did not
        reach, and a user of its own beside C{ilker};
      - a sigma is final (I{ς}) at the end of a word and I{σ} elsewhere:
        C{str.lower} makes a final sigma only where it ends the whole
        name (a dot does not end a Greek word for it), so C{ΝΙΚΟΣ.ΠΑΠΑΣ}
        was C{νικοσ.παπας}, a user C{νικος.παπας} (as a Greek writes it)
        did not reach.
    """
    local = unicodedata.normalize("NFC", local).lower()
    if "i\u0307" in local:
        local = _DOTTED_I.sub("i", local)
    local = unicodedata.normalize("NFC", local)
    if "σ" in local or "ς" in local:
        local = _SIGMA.sub(_sigmaOfItsPlace, local)
    return local


_DOTTED_I = re.compile("i\u0307+")
_SIGMA = re.compile("[σς]")


def _sigmaOfItsPlace(match):
    """
    The sigma a Greek writes where C{match} found one: final (I{ς}) after
    a letter (and its marks) and before no letter or mark, I{σ} elsewhere.
    """
    text, at = match.string, match.start()
    before = at - 1
    while before >= 0 and unicodedata.category(text[before])[0] == "M":
        before -= 1
    after = text[at + 1 : at + 2]
    endsAWord = not after or not (after.isalpha() or unicodedata.category(after)[0] == "M")
    return "ς" if endsAWord and before >= 0 and text[before].isalpha() else "σ"


#: Letters whose capital is another letter's too, kept as letters of their
#: own (L{_refusal}): the German I{ß} (I{SS}: I{Maße} is not I{Masse}) and
#: the Turkish dotless I{ı} (I{I}), as RFC 8265's user names keep them
#: (toLowerCase, no case folding); and the sigmas, which L{_lowered} puts in their places.
_OWN_LETTERS = frozenset("ßıσς")


def _refusal(local, lowered=True):
    """
    Why C{local} (a dot-atom in NFC and lower case) can be no user's local
    part (see L{normalizeAddress}), or C{None} if it can.

    @param lowered: C{False} for a local part as it was typed (in NFC, in
        any case), whose capitals are not letters whose capital is
        another's: only what it holds that no case of it may hold.
    """
    if local.isascii():
        return None
    previous = "."
    for ch in local:
        if ch >= "\x80":
            category = unicodedata.category(ch)
            what = _REFUSED_CATEGORIES.get(category)
            if what is None and ord(ch) in _INVISIBLE:
                what = "an invisible character"
            if ch == "\ufffd":
                # What a decoder puts for octets that are not UTF-8: a user
                # of that name would be whoever any broken name stands for.
                what = "what stands for octets that are not UTF-8"
            if what is None and category[0] == "M" and previous == ".":
                what = "a combining mark with no letter before it"
            if what is not None:
                return f"{_named(ch)} is {what}"
        previous = ch
    if unicodedata.normalize("NFKC", local) != local:
        for ch in local:
            compatible = unicodedata.normalize("NFKC", ch)
            if compatible != ch:
                return f"{_named(ch)} has a compatibility form, {compatible!r}: write that instead"
        return "it holds characters with a compatibility form"
    for ch in local if lowered else ():
        if ch >= "\x80" and ch not in _OWN_LETTERS:
            other = unicodedata.normalize("NFC", ch.upper().lower())
            if other != ch:
                # Written in capitals it is the other's name (ᲀ and в are
                # both В): two users whose names look one.
                return f"{_named(ch)} has the capital of {other!r}: write that instead"
    return None


def _named(ch):
    """
    A character as a refusal names it: C{U+202E RIGHT-TO-LEFT OVERRIDE}.
    """
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X} {name}" if name else f"U+{ord(ch):04X}"


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
