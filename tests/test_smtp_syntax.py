"""
L{mailgate.smtp.syntax}: the paths and ESMTP parameters of MAIL FROM and
RCPT TO (RFC 5321 section 4.1.2, RFC 1870, RFC 6152, RFC 6531).
"""

import pytest

from mailgate.smtp.syntax import EnvelopeSyntaxError, parseCommandPath, parseParameters


def mailFrom(argument):
    return parseCommandPath(argument, "FROM", allowEmpty=True)


def rcptTo(argument):
    return parseCommandPath(argument, "TO", allowEmpty=False)


# -- paths -------------------------------------------------------------------


def test_plainAddresses():
    assert mailFrom("FROM:<alice@example.org>") == ("alice@example.org", {})
    assert rcptTo("TO:<bob@example.org>") == ("bob@example.org", {})


def test_keywordIsCaseInsensitive():
    assert mailFrom("from:<alice@example.org>") == ("alice@example.org", {})
    assert rcptTo("To:<bob@example.org>") == ("bob@example.org", {})


def test_addressCaseIsKept():
    """
    The parser does not normalise; deciding what matches a user is the
    delivery policy's business.
    """
    assert rcptTo("TO:<Bob@Example.ORG>") == ("Bob@Example.ORG", {})


def test_nullSender():
    assert mailFrom("FROM:<>") == ("", {})
    assert mailFrom("FROM:<> SIZE=100") == ("", {"SIZE": "100"})


def test_nullRecipientIsRefused():
    with pytest.raises(EnvelopeSyntaxError, match="empty address"):
        rcptTo("TO:<>")


def test_spaceAfterColonIsTolerated():
    assert mailFrom("FROM: <alice@example.org>") == ("alice@example.org", {})
    assert rcptTo("TO:  <bob@example.org>") == ("bob@example.org", {})
    assert mailFrom("FROM: <>") == ("", {})


@pytest.mark.parametrize(
    "argument",
    [
        "TO:<@relay.example.net:bob@example.org>",
        "TO:<@relay.example.net,@hop2.example.com:bob@example.org>",
        "TO:<@[192.0.2.1]:bob@example.org>",
    ],
)
def test_sourceRoutesAreStripped(argument):
    """
    RFC 5321 section 4.1.1.3 / appendix C: servers SHOULD accept and ignore
    source routes; the mailbox is what follows the colon.
    """
    assert rcptTo(argument) == ("bob@example.org", {})


def test_sourceRouteToNothingIsEmpty():
    with pytest.raises(EnvelopeSyntaxError):
        rcptTo("TO:<@relay.example.net:>")
    assert mailFrom("FROM:<@relay.example.net:>") == ("", {})


@pytest.mark.parametrize(
    "local",
    ['"john doe"', '"a\\"b"', '"with>angle"', '"x@y"', '"back\\\\slash"', '"a..b"'],
)
def test_quotedLocalParts(local):
    mailbox = f"{local}@example.org"
    assert rcptTo(f"TO:<{mailbox}>") == (mailbox, {})
    assert rcptTo(f"TO:<{mailbox}> X-FOO=1") == (mailbox, {"X-FOO": "1"})


def test_quotedGreaterThanDoesNotEndThePath():
    assert mailFrom('FROM:<"a>b"@example.org> SIZE=5') == ('"a>b"@example.org', {"SIZE": "5"})


@pytest.mark.parametrize(
    "mailbox",
    [
        "postmaster@[192.0.2.1]",
        "postmaster@[IPv6:2001:db8::1]",
        "postmaster@[IPv6:::1]",
        "postmaster@[255.255.255.255]",
        "postmaster@[010.0.0.1]",
        "postmaster@[IPv6:::ffff:192.0.2.1]",
        # RFC 5321's ABNF strings are case-insensitive (RFC 5234 section
        # 2.3): the tag may be written in any case, as Postfix takes it.
        "postmaster@[ipv6:2001:db8::1]",
        "postmaster@[IPV6:::1]",
    ],
)
def test_addressLiterals(mailbox):
    assert rcptTo(f"TO:<{mailbox}>") == (mailbox, {})


@pytest.mark.parametrize(
    "mailbox",
    [
        "a.b-c+tag@example.org",
        "!#$%&'*+/=?^_`{|}~-@example.org",
        "x@sub.example-domain.org",
        "x@example.org.",  # absolute domain name
    ],
)
def test_validDotAtoms(mailbox):
    assert rcptTo(f"TO:<{mailbox}>") == (mailbox, {})


@pytest.mark.parametrize(
    "argument, reason",
    [
        ("TO:bob@example.org", "enclosed in <>"),
        ("TO: bob@example.org", "enclosed in <>"),
        ("TO:<bob@example.org", "unterminated"),
        ('TO:<"bob>@example.org', "unterminated"),
        ("TO:<>", "empty address"),
        ("TO:", "enclosed in <>"),
        ("TO", "expected TO:<address>"),
        ("", "expected TO:<address>"),
        ("TO <bob@example.org>", "expected TO:<address>"),
        ("FROM:<bob@example.org>", "expected TO:<address>"),
        ("TO:<bob@example.org>SIZE=1", "space before parameters"),
        ("TO:<bob@example.org>>", "space before parameters"),
        ("TO:<<bob@example.org>>", "space before parameters"),
        ("TO:<bob>", "local-part@domain"),
        ("TO:<bob@>", "local-part@domain"),
        ("TO:<@example.org>", "local-part@domain"),
        ("TO:<bob smith@example.org>", "invalid local part"),
        ("TO:<bob..smith@example.org>", "invalid local part"),
        ("TO:<.bob@example.org>", "invalid local part"),
        ("TO:<bob.@example.org>", "invalid local part"),
        ("TO:<bob@evil.test@example.org>", "invalid local part"),
        ("TO:<bob@example..org>", "invalid domain"),
        ("TO:<bob@-example.org>", "invalid domain"),
        ("TO:<bob@exa_mple.org>", "invalid domain"),
        ("TO:<bob@[192.0.2.1>", "invalid domain"),
        ("TO:<bob@[not a literal]>", "invalid domain"),
        ("TO:<bob@[300.1.1.1]>", "invalid address literal"),
        ("TO:<bob@[192.0.2.256]>", "invalid address literal"),
        ("TO:<bob@[IPv6:::::]>", "invalid address literal"),
        ("TO:<bob@[IPv6:2001:db8::1::2]>", "invalid address literal"),
        ("TO:<bob@[IPv6:12345::1]>", "invalid address literal"),
        ("TO:<bob@[ipv6:192.0.2.1]>", "invalid address literal"),
        ("TO:<b@" + "x" * 260 + ".org>", "address too long"),
        ("TO:<bob@example.org> SIZE", None),  # parses: RCPT parameters are the protocol's to refuse
    ],
)
def test_malformedPaths(argument, reason):
    if reason is None:
        assert rcptTo(argument) == ("bob@example.org", {"SIZE": None})
        return
    with pytest.raises(EnvelopeSyntaxError) as caught:
        rcptTo(argument)
    assert reason in str(caught.value)


SRS_SENDER = "SRS0=Ab3d=XY=some-long-domain.example=a.rather.long.user.name+tag@forwarder.example"


def test_aLocalPartMayBeLongerThan64Octets():
    """
    RFC 5321 section 4.5.3.1 asks receivers to impose no length limits
    where they can; forwarders' SRS and mailing lists' VERP senders are
    often over the 64 octets of a local part, and Postfix takes them.  The
    path's 256 still hold.
    """
    assert len(SRS_SENDER.partition("@")[0]) > 64
    assert mailFrom(f"FROM:<{SRS_SENDER}>") == (SRS_SENDER, {})
    with pytest.raises(EnvelopeSyntaxError, match="address too long"):
        mailFrom("FROM:<" + "a" * 250 + "@example.org>")
    # A recipient's too (bob with a long detail, --recipient-delimiter):
    # the delivery decides whom it names.
    assert rcptTo(f"TO:<{SRS_SENDER}>") == (SRS_SENDER, {})
    with pytest.raises(EnvelopeSyntaxError, match="address too long"):
        rcptTo("TO:<" + "a" * 250 + "@example.org>")


@pytest.mark.parametrize("local", ["taro..yamada", "taro.", ".taro", "a...b.", "."])
def test_aSenderLocalPartsDotsMayBeOutOfPlace(local):
    """
    Mail comes from addresses with dots out of place (Japanese mobile
    carriers gave out "taro..yamada." for years): not RFC 5321's
    dot-string, but Postfix and Dovecot's LMTP take them as senders, and
    a refusal bounced an MTA's mail (tests/test_lmtp_vs_dovecot.py).  A
    recipient's local part stays a dot-string (L{test_malformedPaths}),
    and so does the rest of a sender's address.
    """
    assert mailFrom(f"FROM:<{local}@docomo.example>") == (f"{local}@docomo.example", {})
    assert mailFrom(f"FROM:<{local}@docomo.example> BODY=8BITMIME") == (
        f"{local}@docomo.example", {"BODY": "8BITMIME"}
    )
    with pytest.raises(EnvelopeSyntaxError, match="invalid local part"):
        rcptTo(f"TO:<{local}@example.org>")
    for malformed in (f"{local}@docomo..example", f"{local} x@docomo.example", f"{local}@", f"a@{local}@x.example"):
        with pytest.raises(EnvelopeSyntaxError):
            mailFrom(f"FROM:<{malformed}>")


@pytest.mark.parametrize("domain", ["mail_gw.example.com", "_relay.example.com", "example_.com", "a_b"])
def test_aSendersDomainMayHoldUnderscores(domain):
    """
    Mail comes from domains with underscores in their labels: not host
    names by RFC 1123, but names in the DNS, which Postfix's smtpd takes
    (its valid_hostname allows them) and hands over by LMTP as they are.
    Refused here, the mail Postfix had accepted bounced (seen with a
    private Postfix: "501 5.1.7 ... (in reply to MAIL FROM command)").  A
    recipient's domain is one of this server's, never so written; the
    rest of a domain's rules still hold for a sender's.
    """
    assert mailFrom(f"FROM:<s@{domain}>") == (f"s@{domain}", {})
    with pytest.raises(EnvelopeSyntaxError, match="invalid domain"):
        rcptTo(f"TO:<s@{domain}>")
    for malformed in (f"s@{domain}..org", f"s@-{domain}", f"s@{domain}-", "s@a_b c.org"):
        with pytest.raises(EnvelopeSyntaxError, match="invalid domain"):
            mailFrom(f"FROM:<{malformed}>")


def test_envelopeSyntaxErrorIsAValueError():
    with pytest.raises(ValueError):
        rcptTo("TO:garbage")


@pytest.mark.parametrize(
    "garbage",
    ["\x00", "<\x00@example.org>", "\x7f\x7f", "\ufffd\ufffd", "TO:<>>>", "TO:<<<<", ":::", "TO:<" * 50],
)
def test_garbage(garbage):
    with pytest.raises(EnvelopeSyntaxError):
        rcptTo(garbage)


# -- international addresses -------------------------------------------------


@pytest.mark.parametrize(
    "mailbox",
    ["jörg@example.org", "bob@bücher.example", "用户@例子.广告", '"jörg d"@example.org'],
)
def test_nonASCIIIsRefusedWithoutSMTPUTF8(mailbox):
    with pytest.raises(EnvelopeSyntaxError, match="non-ASCII address without SMTPUTF8"):
        mailFrom(f"FROM:<{mailbox}>")
    with pytest.raises(EnvelopeSyntaxError, match="non-ASCII address without SMTPUTF8"):
        mailFrom(f"FROM:<{mailbox}> BODY=8BITMIME")


@pytest.mark.parametrize(
    "mailbox",
    ["jörg@example.org", "bob@bücher.example", "用户@例子.广告", '"jörg d"@example.org'],
)
def test_nonASCIIIsAcceptedWithSMTPUTF8(mailbox):
    assert mailFrom(f"FROM:<{mailbox}> SMTPUTF8") == (mailbox, {"SMTPUTF8": None})
    assert mailFrom(f"FROM:<{mailbox}> smtputf8 BODY=8BITMIME") == (
        mailbox,
        {"SMTPUTF8": None, "BODY": "8BITMIME"},
    )


def test_nonASCIIWithSMTPUTF8MustStillBeWellFormed():
    with pytest.raises(EnvelopeSyntaxError, match="invalid local part"):
        mailFrom("FROM:<jö rg@example.org> SMTPUTF8")
    with pytest.raises(EnvelopeSyntaxError, match="invalid domain"):
        mailFrom("FROM:<jörg@bü..cher> SMTPUTF8")


# -- parameters --------------------------------------------------------------


def test_sizeBodyAndSMTPUTF8():
    assert mailFrom("FROM:<alice@example.org> SIZE=12345 BODY=8BITMIME SMTPUTF8") == (
        "alice@example.org",
        {"SIZE": "12345", "BODY": "8BITMIME", "SMTPUTF8": None},
    )
    assert mailFrom("FROM:<alice@example.org> BODY=7BIT") == ("alice@example.org", {"BODY": "7BIT"})


def test_parameterKeywordsAreUpperCasedValuesKept():
    assert parseParameters(" size=10 body=8bitmime X-Tag=MiXeD") == {
        "SIZE": "10",
        "BODY": "8bitmime",
        "X-TAG": "MiXeD",
    }


def test_noParameters():
    assert parseParameters("") == {}
    assert parseParameters("   ") == {}


def test_extraSpacesBetweenParameters():
    assert parseParameters("  SIZE=1    BODY=7BIT  ") == {"SIZE": "1", "BODY": "7BIT"}
    assert mailFrom("FROM:<a@example.org>  SIZE=1 ") == ("a@example.org", {"SIZE": "1"})


def test_keywordWithoutValue():
    assert parseParameters(" SMTPUTF8") == {"SMTPUTF8": None}


@pytest.mark.parametrize(
    "text",
    [" SIZE=1 SIZE=2", " SIZE=1 size=1", " SMTPUTF8 smtputf8", " BODY=7BIT BODY=8BITMIME"],
)
def test_duplicateParametersAreRefused(text):
    with pytest.raises(EnvelopeSyntaxError, match="duplicate parameter"):
        parseParameters(text)
    with pytest.raises(EnvelopeSyntaxError, match="duplicate parameter"):
        mailFrom("FROM:<a@example.org>" + text)


@pytest.mark.parametrize(
    "text",
    [" =1", " SIZE=", " SI_ZE=1", " -SIZE=1", " SIZE=a=b", " SIZE==", " SÏZE=1", " SIZE=\x01", " SIZE=\x7f"],
)
def test_malformedParametersAreRefused(text):
    with pytest.raises(EnvelopeSyntaxError, match="malformed parameter"):
        parseParameters(text)
    with pytest.raises(EnvelopeSyntaxError, match="malformed parameter"):
        mailFrom("FROM:<a@example.org>" + text)


def test_parameterErrorsQuoteABoundedPieceOfTheInput():
    with pytest.raises(EnvelopeSyntaxError) as caught:
        parseParameters(" =" + "x" * 10_000)
    assert len(str(caught.value)) < 100
