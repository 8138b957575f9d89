# -*- test-case-name: tests.test_smtp_xforward -*-
"""
The client an MTA or a proxy in front says it relays: the attributes of
Postfix's C{XFORWARD} (what its LMTP and SMTP clients send with
C{lmtp_send_xforward_command = yes}, and content filters such as amavis)
and C{XCLIENT} (what Dovecot's LMTP proxy and nginx's mail proxy send),
as C{http://www.postfix.org/XFORWARD_README.html} and
C{XCLIENT_README.html} define them: C{NAME=value} pairs, each value
xtext (RFC 3461 section 4) and C{[UNAVAILABLE]} for what the sender does
not know.

Parsing only: what the session does with them (who may send them, when,
the Received field and log lines that name the client) is
L{mailgate.smtp.protocol}'s.
"""

import ipaddress
import re

import attr

from mailgate.networks import unmapped
from mailgate.printable import printable

#: what XFORWARD carries, in the order its EHLO keyword lists them
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
#: what XCLIENT's EHLO keyword offers: LOGIN (a SASL login at the proxy)
#: grants nothing here, and is not asked for
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO")
#: what an XCLIENT may carry besides, taken and ignored (as Dovecot's
#: lib-smtp server ignores the attributes it does not use): LOGIN (nginx
#: sends it whatever the server offered), Postfix's DESTADDR and
#: DESTPORT, Dovecot's TTL, TIMEOUT and SESSION
_XCLIENT_IGNORED = ("LOGIN", "DESTADDR", "DESTPORT", "TTL", "TIMEOUT", "SESSION")

#: Note 1 of both documents: no value is longer
MAX_VALUE = 255
#: the PROTO attribute's limit (XFORWARD_README)
_MAX_PROTO = 64

_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_PORT = re.compile(r"[0-9]{1,5}")
_PROTO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


class ForwardingSyntaxError(ValueError):
    """
    An XFORWARD or XCLIENT argument that does not parse; the text says why
    (for the C{501 5.5.4} reply).
    """


@attr.s(frozen=True)
class RelayedClient:
    """
    What is known of the client a relay speaks for; C{None} for each
    attribute it did not name, or named C{[UNAVAILABLE]}.

    @ivar address: the client's IP address (an L{ipaddress} address, IPv4
        for an IPv4-mapped one).
    @ivar port: its TCP port.
    @ivar name: its host name, as the relay looked it up; a value that is
        no host name is dropped, as Postfix drops it.
    @ivar helo: the name it greeted the relay with.
    @ivar proto: the protocol it spoke (C{ESMTP}, C{LMTP}...).
    @ivar ident: the relay's own id of the message (XFORWARD: Postfix's
        queue id), for matching its log with this one.
    @ivar source: C{"LOCAL"} or C{"REMOTE"} (XFORWARD).
    """

    address = attr.ib(default=None)
    port = attr.ib(default=None)
    name = attr.ib(default=None)
    helo = attr.ib(default=None)
    proto = attr.ib(default=None)
    ident = attr.ib(default=None)
    source = attr.ib(default=None)

    @property
    def localSubmission(self):
        """
        Whether the relay said it had the message from no client at all:
        XFORWARD's C{ADDR=[UNAVAILABLE]} marks a forwarded local
        submission (C{sendmail} on the relay's host), whose other
        attributes Postfix says to ignore.
        """
        return self.address is None

    def describe(self):
        """
        The client's address as log lines show a peer's (C{host:port},
        C{[v6]:port}; without a port C{host}); C{unknown} for a local
        submission.
        """
        if self.address is None:
            return "unknown"
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return host if self.port is None else f"{host}:{self.port}"


def decodeXtext(value):
    """
    RFC 3461's xtext decoded: C{+XX} is the octet of hex XX, every other
    character stands for itself.  (Postfix before 2.3 sent values
    unencoded: they decode as themselves unless they hold a C{+}.)

    @raise ForwardingSyntaxError: a C{+} not followed by two hex digits.
    """
    if "+" not in value:
        return value
    if value.count("+") != len(_XTEXT_HEX.findall(value)):
        raise ForwardingSyntaxError("malformed xtext")
    return _XTEXT_HEX.sub(lambda match: chr(int(match.group(1), 16)), value)


def _neutered(value):
    """
    A decoded value fit for a header field and a log line (Note 1 of both
    documents: no control characters, non-ASCII characters or white
    space): each such character as C{?}, as Postfix neuters them.
    """
    return "".join(ch if ch.isascii() and ch.isprintable() and not ch.isspace() else "?" for ch in value)


def _address(value):
    """
    An ADDR value: an IPv4 address, or an IPv6 one with or without
    Postfix's C{IPV6:} prefix (Dovecot's LMTP proxy leaves it off).
    """
    text = value[5:] if value[:5].upper() == "IPV6:" else value
    # Not with a zone (fe80::1%eth0), which Python takes with any octets
    # after the "%" (xtext's +0D+0A a line break into the Received field
    # and the log): it names an interface of the sending machine, never
    # the client, and Postfix's inet_ntop never writes one.
    if "%" in text:
        raise ForwardingSyntaxError(f"bad ADDR syntax: {printable(value[:64])} (an address without a %zone)")
    try:
        return unmapped(ipaddress.ip_address(text))
    except ValueError:
        raise ForwardingSyntaxError(f"bad ADDR syntax: {printable(value[:64])}") from None


def _value(name, value):
    """
    One attribute's decoded value, checked; C{None} for C{[UNAVAILABLE]}.
    """
    if value.upper() in _UNAVAILABLE:
        return None
    if name == "ADDR":
        return _address(value)
    if name == "PORT":
        if not _PORT.fullmatch(value) or int(value) > 65535:
            raise ForwardingSyntaxError(f"bad PORT syntax: {printable(value[:64])}")
        return int(value)
    if name == "PROTO":
        if len(value) > _MAX_PROTO or not _PROTO.fullmatch(value):
            raise ForwardingSyntaxError(f"bad PROTO syntax: {printable(value[:64])}")
        return value.upper()
    if name == "SOURCE":
        if value.upper() not in ("LOCAL", "REMOTE"):
            raise ForwardingSyntaxError(f"bad SOURCE syntax: {printable(value[:64])} (LOCAL or REMOTE)")
        return value.upper()
    if name == "NAME":
        # A value that is no host name is no name to show (Postfix's
        # valid_hostname() check): the client's name is unknown.
        return value.lower() if _HOSTNAME.fullmatch(value) else None
    return _neutered(value)


def parseAttributes(argument, command, names, ignored=()):
    """
    The attributes of an XFORWARD or XCLIENT command's argument, as
    C{{NAME: value}} (names in upper case, values decoded and checked,
    C{None} for C{[UNAVAILABLE]}), in the order given: a name given
    twice, the last value.

    @param command: C{"XFORWARD"} or C{"XCLIENT"}, for the reasons.
    @param names: the attributes taken.
    @param ignored: attributes taken (checked as xtext) and left out of
        the result; any other name is refused.
    @raise ForwardingSyntaxError: no attribute, one that is no
        C{name=value}, a name not taken, a value too long, malformed
        xtext, or a value its attribute does not take.
    """
    items = argument.split()
    if not items:
        raise ForwardingSyntaxError(f"syntax: {command} attribute=value ...")
    attributes = {}
    for item in items:
        name, equals, value = item.partition("=")
        name = name.upper()
        if not equals or not name or not value:
            raise ForwardingSyntaxError(f"attribute=value expected, not {printable(item[:64])}")
        if name not in names and name not in ignored:
            raise ForwardingSyntaxError(f"bad {command} attribute name: {printable(name[:64])}")
        if len(value) > MAX_VALUE:
            raise ForwardingSyntaxError(f"{name} value too long (the limit is {MAX_VALUE} characters)")
        try:
            decoded = decodeXtext(value)
        except ForwardingSyntaxError:
            raise ForwardingSyntaxError(f"malformed xtext in the value of {name}") from None
        if name in names:
            attributes[name] = _value(name, decoded)
    return attributes


def parseXFORWARD(argument):
    """
    An XFORWARD command's attributes (L{parseAttributes}): every name
    XFORWARD_README gives, no other.
    """
    return parseAttributes(argument, "XFORWARD", XFORWARD_ATTRIBUTES)


def parseXCLIENT(argument):
    """
    An XCLIENT command's attributes (L{parseAttributes}): those offered,
    and those others send that grant nothing here, ignored.
    """
    return parseAttributes(argument, "XCLIENT", XCLIENT_ATTRIBUTES, _XCLIENT_IGNORED)


def updated(client, attributes):
    """
    C{client} (a L{RelayedClient}, or C{None} before the first command)
    with C{attributes} (from L{parseAttributes}) in place of its own, as
    XFORWARD_README has the server keep them: a first command starts from
    nothing known, each sets what it names (C{[UNAVAILABLE]} erases it),
    and the rest stay.
    """
    fields = {
        "NAME": "name", "ADDR": "address", "PORT": "port", "PROTO": "proto",
        "HELO": "helo", "IDENT": "ident", "SOURCE": "source",
    }
    return attr.evolve(client or RelayedClient(), **{fields[name]: value for name, value in attributes.items()})
