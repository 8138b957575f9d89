# -*- test-case-name: tests.test_smtp_syntax -*-
"""
The syntax of SMTP envelopes (RFC 5321 section 4.1.2): paths and ESMTP
parameters of MAIL FROM and RCPT TO.

Parsing is strict about structure (one path in angle brackets, well-formed
parameters) and lenient where real clients commonly differ (a space after
the colon, upper- or lower-case keywords).
"""

import ipaddress
import re
import unicodedata

from mailgate.address import normalizeDomain
from mailgate.errors import InvalidAddress


class EnvelopeSyntaxError(ValueError):
    """
    A MAIL or RCPT argument that does not parse; the text says why.
    """


class ParameterSyntaxError(EnvelopeSyntaxError):
    """
    The address parsed, but an ESMTP parameter after it did not: a
    syntax error in the parameters (RFC 3463's X.5.4), not in the address.
    """


class BrokenSender(EnvelopeSyntaxError):
    """
    A MAIL command whose line parsed, path and parameters, but whose
    sender is no mailbox RFC 5321 allows (C{<a@b@example.net>},
    C{<undisclosed-recipients:;>}, C{<a@>}): what a client that takes the
    sender from a message's own header fields sends (fetchmail does, when
    the message has no Return-Path).

    @ivar parameters: the command's parameters, parsed.
    """

    def __init__(self, text, parameters):
        super().__init__(text)
        self.parameters = parameters


class NonASCIIAddress(EnvelopeSyntaxError):
    """
    A non-ASCII address in a transaction without SMTPUTF8: not malformed,
    but not permitted there (RFC 6531's X.6.7, "non-ASCII addresses not
    permitted for that sender/recipient"; Postfix answers C{553 5.6.7}
    with C{strict_smtputf8 = yes}, and takes the address by default).
    """


# The classes below that take every non-ASCII character (RFC 6531) are
# written as the characters they leave out: a class ranging up to U+10FFFF,
# as RFC 5321's ABNF reads ([A-Za-z0-9!#...~\x80-\U0010ffff-]), took re
# 2-8 ms to compile each, some 20 ms at every start of the server.
# test_startup_imports checks each against its ABNF form for every character.
_PARAM_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# esmtp-value: %d33-60 / %d62-126, and non-ASCII
_PARAM_VALUE = re.compile(r"^[^\x00-\x20=\x7f]+$")
# atext (ALPHA, DIGIT and !#$%&'*+-/=?^_`{|}~), and non-ASCII
_ATEXT = r"""[^\x00-\x20"(),.:;<>@[\\\]\x7f]"""
_DOT_STRING = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
# A sender's local part of dot-string characters whose dots are out of
# place (".a", "a.", "a..b"): not RFC 5321's dot-string, but the addresses
# some mobile carriers gave their users, which mail comes from every day.
_LOOSE_DOTS = re.compile(r"""^[^\x00-\x20"(),:;<>@[\\\]\x7f]+$""")
# qtextSMTP (%d32-33 / %d35-91 / %d93-126) and non-ASCII, or a quoted-pair
_QUOTED = re.compile(r'^"([^\x00-\x1f"\\\x7f]|\\[\x20-\x7e])*"$')
_QUOTED_PAIR = re.compile(r"\\(.)")
# The tag is matched without regard to case: RFC 5321's ABNF strings are
# case-insensitive (RFC 5234 section 2.3), so [ipv6:::1] is [IPv6:::1].
_ADDRESS_LITERAL = re.compile(r"^\[((?i:IPv6:)[0-9A-Fa-f:.]+|[0-9]{1,3}(\.[0-9]{1,3}){3})\]$")
_SOURCE_ROUTE = re.compile(r"^@[^:,]+(,@[^:,]+)*:")

# Unicode's control characters and line and paragraph separators: RFC
# 6531 admits any non-ASCII character in an address, but these would travel
# into the Return-Path and Received fields, where a reader that splits on
# Unicode line ends (NEL, U+2028) would see fields the sender made up.
_UNSAFE_CATEGORIES = frozenset(("Cc", "Zl", "Zp"))

def _validLiteral(text):
    """
    Whether the inside of an address literal (RFC 5321 section 4.1.3) is an
    address: each IPv4 number at most 255, an IPv6 address in one of its
    written forms.
    """
    if text[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(text[5:])
        except ValueError:
            return False
        return True
    return all(int(number) <= 255 for number in text.split("."))


MAX_PATH = 256
MAX_LOCAL_PART = 64


def _splitPath(text):
    """
    Split C{"<path> params"} into the path's inside and the rest, honouring
    quoted strings (which may contain ">").
    """
    if not text.startswith("<"):
        raise EnvelopeSyntaxError("the address must be enclosed in <>")
    inQuote = False
    escaped = False
    for i, ch in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\" and inQuote:
            escaped = True
        elif ch == '"':
            inQuote = not inQuote
        elif ch == ">" and not inQuote:
            return text[1:i], text[i + 1:]
    raise EnvelopeSyntaxError("unterminated <address>")


def checkMailbox(mailbox, utf8=False, maxLocalPart=MAX_LOCAL_PART, looseDots=False, underscores=False):
    """
    Check a C{local@domain} mailbox (RFC 5321 section 4.1.2).

    @param utf8: allow UTF-8 (the client said SMTPUTF8).
    @param maxLocalPart: the longest local part accepted, in octets;
        C{None} for no limit but the path's.
    @param looseDots: accept a local part whose dots are out of place
        (C{a..b}, C{a.}, C{.a}), as a sender's.
    @param underscores: accept underscores in the domain's labels
        (C{mail_relay.example.com}), as a sender's.
    @raise EnvelopeSyntaxError: if malformed.
    """
    if not mailbox.isascii():
        if not utf8:
            raise NonASCIIAddress("non-ASCII address without SMTPUTF8")
        if any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in mailbox):
            raise EnvelopeSyntaxError("control or line-separator character in the address")
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise EnvelopeSyntaxError("the address must be local-part@domain")
    if maxLocalPart is not None and len(local.encode("utf-8")) > maxLocalPart:
        raise EnvelopeSyntaxError("local part too long")
    if not _DOT_STRING.match(local) and not (looseDots and _LOOSE_DOTS.match(local)):
        if not _QUOTED.match(local):
            raise EnvelopeSyntaxError("invalid local part")
        local = _unquoted(local)
        mailbox = f"{local}@{domain}"
    literal = _ADDRESS_LITERAL.match(domain)
    if literal:
        if not _validLiteral(literal.group(1)):
            raise EnvelopeSyntaxError("invalid address literal")
        return mailbox
    if underscores:
        # Taken as a letter would be: the label's other rules still hold.
        domain = domain.replace("_", "a")
    try:
        if domain.isascii():
            normalizeDomain(domain)
        else:
            normalizeDomain(domain.encode("idna").decode("ascii"))
    except (InvalidAddress, UnicodeError):
        raise EnvelopeSyntaxError("invalid domain") from None
    return mailbox


def _unquoted(local):
    """
    A quoted local part in the form without quotes, if it has one: the
    quotes and backslashes are not part of the mailbox's name (RFC 5322
    section 3.2.4), so C{"alice"@example.org} is alice's mailbox, as
    Postfix delivers it.  One that needs them (C{"john doe"}) is kept.
    """
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return content if _DOT_STRING.match(content) else local


def parseParameters(text):
    """
    Parse ESMTP parameters (C{KEY[=VALUE] ...}) into a dict keyed by the
    upper-cased keyword; a keyword without value maps to C{None}.
    """
    parameters = {}
    for item in text.split():
        keyword, eq, value = item.partition("=")
        if not _PARAM_KEYWORD.match(keyword) or (eq and not _PARAM_VALUE.match(value)):
            raise ParameterSyntaxError(f"malformed parameter {ascii(item[:40])}")
        keyword = keyword.upper()
        if keyword in parameters:
            raise ParameterSyntaxError(f"duplicate parameter {keyword}")
        parameters[keyword] = value if eq else None
    return parameters


def parseCommandPath(argument, keyword, allowEmpty, utf8=False):
    """
    Parse the argument of MAIL (C{keyword="FROM"}) or RCPT (C{"TO"}).

    @param utf8: the transaction allows UTF-8 addresses (its MAIL FROM
        carried SMTPUTF8, RFC 6531), as well as a C{SMTPUTF8} parameter here.

    @return: C{(mailbox, parameters)}; the mailbox is C{""} for the null
        reverse-path C{<>} when C{allowEmpty}.
    @raise BrokenSender: for a MAIL whose sender alone is malformed (its
        line, path and parameters, parse).
    @raise EnvelopeSyntaxError: if malformed.
    """
    prefix = keyword + ":"
    if argument[: len(prefix)].upper() != prefix:
        raise EnvelopeSyntaxError(f"expected {keyword}:<address>")
    rest = argument[len(prefix):].lstrip(" ")
    inside, after = _splitPath(rest)
    if after and not after.startswith(" "):
        raise EnvelopeSyntaxError("expected a space before parameters")
    parameters = parseParameters(after)
    utf8 = utf8 or "SMTPUTF8" in parameters
    if len(inside) > MAX_PATH:
        raise EnvelopeSyntaxError("address too long")
    inside = _SOURCE_ROUTE.sub("", inside, count=1)
    if keyword == "TO" and inside.lower() == "postmaster":
        # RFC 5321 section 4.1.1.3: RCPT TO:<Postmaster>, of no domain.
        return "postmaster", parameters
    if not inside:
        if not allowEmpty:
            raise EnvelopeSyntaxError("empty address")
        return "", parameters
    # A local part may be longer than RFC 5321's 64 octets, which it asks
    # receivers not to insist on where they can (section 4.5.3.1): a
    # sender's SRS and VERP addresses of forwarders and mailing lists often
    # are, and Postfix takes them; so is a recipient's that names a user
    # with a long detail (bob+<a token of 60 characters>@, with
    # --recipient-delimiter), which Postfix and Dovecot's LMTP deliver to
    # bob.  Refused here, such mail bounced.  No user's address is that
    # long: the delivery answers any other "no such user".  The path's 256
    # octets still hold.
    # A sender's dots may be out of place: Japanese mobile carriers long gave
    # out addresses such as "taro..yamada." (not RFC 5321's dot-string),
    # and mail from them still comes.  Postfix takes them, and so does
    # Dovecot's LMTP: refused here, an MTA handing such mail over by LMTP
    # bounced it.  A recipient's names a user here, never so written.
    # Its domain may hold underscores (mail_gw.example.com: not a host
    # name by RFC 1123, but names in the DNS all the same), which Postfix's
    # smtpd takes (its valid_hostname allows them) and passes on by LMTP.
    sender = keyword == "FROM"
    try:
        return checkMailbox(inside, utf8, None, looseDots=sender, underscores=sender), parameters
    except NonASCIIAddress:
        raise
    except EnvelopeSyntaxError as e:
        if sender:
            raise BrokenSender(str(e), parameters) from None
        raise
