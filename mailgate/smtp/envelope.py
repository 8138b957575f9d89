# -*- test-case-name: tests.test_smtp_protocol -*-
"""
What an SMTP or LMTP transaction carries besides the message, and the trace
fields (RFC 5321 section 4.4) built from it.
"""

import datetime
import email.utils
import ipaddress
import secrets
import time

import attr

from mailgate.address import asciiDomain, normalizeAddress
from mailgate.errors import InvalidAddress


class SMTPReply(Exception):
    """
    A reply to send instead of going on: raised by delivery policy hooks to
    refuse a sender or recipient.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 enhanced status code, e.g. C{"5.1.1"}.
    @ivar text: the human-readable reason.
    """

    def __init__(self, code, enhanced, text):
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self):
        return f"{self.code} {self.enhanced} {self.text}"


@attr.s
class Envelope:
    """
    One mail transaction.

    @ivar sender: the reverse-path, C{""} for the null sender.
    @ivar recipients: the users the accepted forward-paths are for,
        normalised, in RCPT order.
    @ivar forwardPaths: the accepted forward-paths as the client named
        them (L{forwardPath}), in the same order: C{bob+lists@example.org},
        which C{--recipient-delimiter} made bob's mail, is C{bob}'s in
        L{recipients} and itself here.  Empty: the same as L{recipients}.
    @ivar parameters: the MAIL FROM ESMTP parameters.
    @ivar chunks: the message as its BDAT chunks arrive (a
        L{mailgate.smtp.chunks.ChunkedMessage}), from the first chunk to
        the last; C{None} before the first (and for DATA).
    @ivar helo: the name the client greeted with; C{peer}: its address;
        C{peerName}: its host name, where a relay looked it up (XFORWARD's
        or XCLIENT's C{NAME}), else C{None}.
    @ivar forwarded: the client the relay's XFORWARD named for this
        transaction (a L{mailgate.smtp.forwarding.RelayedClient}), whose
        C{helo} and C{peer} these are; C{None} without XFORWARD.
    """

    helo = attr.ib()
    peer = attr.ib()
    protocol = attr.ib()
    sender = attr.ib(default="")
    recipients = attr.ib(factory=list)
    forwardPaths = attr.ib(factory=list)
    parameters = attr.ib(factory=dict)
    transactionId = attr.ib(factory=lambda: secrets.token_hex(6).upper())
    utf8 = attr.ib(default=False)
    chunks = attr.ib(default=None, repr=False)
    peerName = attr.ib(default=None)
    forwarded = attr.ib(default=None, repr=False)


def forwardPath(mailbox, accepted):
    """
    A recipient as the client named it at RCPT, for the Received field's
    C{for} clause (RFC 5321 section 4.4), as Postfix and Dovecot write it:
    with its detail.  The user's address alone (C{bob@example.org} for
    C{bob+lists@example.org}) took away the only trace of the address
    the mail was sent to, which a POP3 user's client filters on.

    Its local part keeps the case the client gave it, as Postfix's and
    Dovecot's C{for} clauses keep it: RFC 5321 section 2.4 has SMTP
    implementations preserve the case of local parts (only the host that
    owns the mailbox may fold it, as mailgate does to find the user).
    Lower-cased, C{Bob.Smith@example.org} was traced as an address the
    client never named.

    @param mailbox: the RCPT's mailbox, as parsed.
    @param accepted: the address the delivery accepted it as.
    @return: C{mailbox} checked as addresses are, its domain in its
        ASCII form and lower case, so that the field holds nothing else
        than an address of that form; C{accepted} if it names none (RFC
        5321's domainless C{<postmaster>}).
    """
    local, at, domain = mailbox.rpartition("@")
    if not at:
        return accepted
    try:
        normalised = normalizeAddress(f"{local}@{asciiDomain(domain) or domain}")
    except InvalidAddress:
        return accepted
    return local.strip() + normalised[normalised.rindex("@"):]


#: What an EHLO name may not carry into the Received field, as Postfix's
#: smtpd neuters them: a comment's parentheses and quoting backslash, and
#: RFC 5322's specials that change how the field reads: C{;} ends its
#: tokens (what follows is taken for the date), C{"} opens a quoted
#: string that swallows the rest (the date included), C{<}, C{>} and C{@}
#: make an address of it.
_NEUTERED = '()\\;"<>@'


def fieldText(text, utf8=False):
    """
    Make client-supplied text (an EHLO name) safe inside a header field
    or a reply: printable, no line breaks, none of L{_NEUTERED}, bounded;
    and ASCII unless the transaction is SMTPUTF8 (C{utf8}): a header field
    of any other message is ASCII (RFC 5322 section 2.2), and so is a
    reply to a client that has not asked for SMTPUTF8 (RFC 6531).
    """
    text = text[:100]
    return "".join(
        ch if ch.isprintable() and ch not in _NEUTERED and (utf8 or ch.isascii()) else "?"
        for ch in text
    )


_lastDate = [None, None]


def _date(second):
    """
    An RFC 5322 date for C{second}, formatted once per second.
    """
    if _lastDate[0] != second:
        _lastDate[1] = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        )
        _lastDate[0] = second
    return _lastDate[1]


def addressLiteral(host):
    """
    The client's address as the Received field names it: RFC 5321's
    address-literal (section 4.1.3), C{[192.0.2.7]}, or C{[IPv6:2001:db8::7]}
    with the tag a reader of the field needs to tell it from a domain (as
    Postfix writes it); an IPv4 address that a dual-stack listener saw
    mapped into IPv6 as the IPv4 address it is.  A link-local client's
    zone (C{fe80::1%eth0}, the server's interface) is left out: no
    address literal has one.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"[{host}]"
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def traceHeaders(envelope, hostname, now=None, paths=None, returnPath=True):
    """
    The C{Return-Path:} and C{Received:} fields the final delivery server
    prepends (RFC 5321 sections 4.4 and 4.1.1.4), as lines without their
    line ends.

    @param paths: the recipients as the client named them, for the
        C{for} clause; by default the envelope's.
    @param returnPath: C{False} for the C{Received:} field alone: the
        C{Return-Path:} then goes in each copy's own fields
        (L{copyPrefixes}), before its C{Delivered-To:}.
    """
    now = time.time() if now is None else now
    peerHost = getattr(envelope.peer, "host", None)
    peerText = addressLiteral(peerHost) if peerHost else "local"
    if envelope.peerName and peerHost:
        # RFC 5321's TCP-info: the name the relay looked up, then the
        # address (as Postfix writes it).
        peerText = f"{envelope.peerName} {peerText}"
    forClause = ""
    if paths is None:
        paths = envelope.forwardPaths or envelope.recipients
    if len(paths) == 1:
        forClause = f"\r\n\tfor <{paths[0]}>"
    date = _date(int(now))
    # A local hand-over (mailgate deliver) has no client to name.
    origin = "" if envelope.helo is None and envelope.peer is None else (
        f"from {fieldText(envelope.helo or 'unknown', envelope.utf8)} ({peerText})\r\n\t"
    )
    received = (
        f"Received: {origin}"
        f"by {hostname} (mailgate) with {envelope.protocol} id {envelope.transactionId}"
        f"{forClause}; {date}"
    )
    sender = envelope.sender
    lines = [line.encode("utf-8") for line in received.split("\r\n")]
    return [f"Return-Path: <{sender}>".encode("utf-8"), *lines] if returnPath else lines


#: The values of C{--delivered-to} (Dovecot's C{lmtp_hdr_delivery_address}):
#: a C{Delivered-To:} field naming the recipient as the client named it at
#: RCPT, or none.
DELIVERED_TO = ("final", "none")


def deliveredTo(path):
    """
    The C{Delivered-To:} field naming C{path}, a recipient as the client
    named it at RCPT (L{forwardPath}), as a line without its line end:
    the address bare, as Dovecot's LMTP writes it.
    """
    return f"Delivered-To: {path}".encode("utf-8")


def copyPrefixes(envelope):
    """
    Each recipient's own fields, put before the message stored once for
    all of them (see L{mailgate.store.rows.PREFIX_COLUMNS}): its
    C{Return-Path:} then its C{Delivered-To:}, in the order Dovecot's
    LMTP writes them (the shared message then begins with the
    C{Received:} field, L{traceHeaders} without C{returnPath}).

    @return: a dict from each of the envelope's recipients (the users'
        addresses the store is given) to octets; a user named twice
        (C{bob+a} and C{bob+b}, stored once) is named as at the first RCPT.
    """
    returnPath = f"Return-Path: <{envelope.sender}>\r\n".encode("utf-8")
    prefixes = {}
    for address, path in zip(envelope.recipients, envelope.forwardPaths or envelope.recipients):
        if address not in prefixes:
            prefixes[address] = returnPath + deliveredTo(path) + b"\r\n"
    return prefixes


def traceOctets(envelope, hostname, mailbox, delivered="none"):
    """
    The octets the trace fields (L{traceHeaders}) add to the message of
    C{envelope} if C{mailbox} is taken as one more recipient: what a
    recipient's quota must hold beyond the size the client declares.  At
    most that: the C{for} clause is written for a message of one
    recipient only, and this may be the first of several.

    @param delivered: C{--delivered-to}: with C{"final"}, the copy's
        C{Delivered-To:} field (L{copyPrefixes}) counts too.
    """
    path = forwardPath(mailbox, mailbox)
    paths = [*(envelope.forwardPaths or envelope.recipients), path]
    octets = sum(len(line) + 2 for line in traceHeaders(envelope, hostname, paths=paths))
    if delivered == "final":
        octets += len(deliveredTo(path)) + 2
    return octets
