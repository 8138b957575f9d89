"""
TLS and SASL as clients see them, without sockets: STLS and the plaintext
policy in POP3, AUTH PLAIN, LOGIN, CRAM-MD5 and SCRAM-SHA-256 (with small
clients written from the RFCs, not from mailgate's code: see
C{tests/saslclients.py}), and STARTTLS in SMTP and LMTP.

Sessions run over L{TLSStringTransport}, which records C{startTLS} and what
went out before it, against a real SQLite store; the L{ServerTLS} is real,
made from a certificate of L{certs} (C{tests/certs.py}).
"""

import hashlib
import hmac
import io
import sqlite3

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress

from mailgate.auth.passwords import parseScramSecret, scramSha256Secret
from mailgate.auth.sasl import Challenge, PlainMechanism, SASLError, ScramCredentials, ScramSHA256Mechanism
from mailgate.pop3.protocol import POP3Server
from mailgate.cli import run as runCLI
from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, memoryStore, pop3Factory, resultOf
from mailgate.tls import ServerTLS

from certs import makeCertificate
from saslclients import ScramClient, b64, cramMD5Response, unb64

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland"

UNTRUSTED = IPv4Address("TCP", "198.51.100.7", 1234)
REFUSED = "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"


def plain(authcid, password, authzid=""):
    """
    A base64 PLAIN message (RFC 4616).
    """
    return b64("\0".join([authzid, authcid, password]))


def multiline(reply):
    assert reply.endswith("\r\n.\r\n"), reply
    lines = reply.split("\r\n")
    return lines[0], lines[1:-2]


def capabilities(session):
    status, lines = multiline(session.command("CAPA"))
    assert status.startswith("+OK")
    return lines


def withoutImplementation(lines):
    """
    CAPA's lines but IMPLEMENTATION, which only a logged-in session sees:
    what RFC 2449 section 5 has announced alike before and after login.
    """
    return [line for line in lines if not line.startswith("IMPLEMENTATION ")]


def challenge(reply):
    """
    The decoded data of a C{+ } continuation.
    """
    assert reply.startswith("+ ") and reply.endswith("\r\n") and reply.count("\r\n") == 1, reply
    return unb64(reply[2:-2])


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    certificatePath, keyPath = makeCertificate(directory, "mail.example.test")
    return ServerTLS(str(certificatePath), str(keyPath))


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD)
    return ALICE


def untrusted(store, **options):
    return POP3Session(store, peer=UNTRUSTED, **options)


def scramExchange(session, username, password, initial=True, **tamper):
    """
    Run AUTH SCRAM-SHA-256 up to and including the client-final-message.

    @return: C{(client, serverFirst, reply to the client-final-message)}.
    """
    client = ScramClient(username, password, nonce="fyko+d2lbbFgONRv9qkxdawL")
    if initial:
        serverFirst = challenge(session.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    else:
        assert session.command("AUTH SCRAM-SHA-256") == "+ \r\n"
        serverFirst = challenge(session.command(b64(client.first())))
    reply = session.command(b64(client.final(serverFirst, **tamper)))
    return client, serverFirst, reply


def scramLogin(session, username, password, initial=True):
    client, _, reply = scramExchange(session, username, password, initial)
    serverFinal = challenge(reply)
    assert client.verify(serverFinal), serverFinal
    return session.command("")


# -- the RFC 7677 test vector --------------------------------------------------

RFC7677_CLIENT_FIRST_BARE = "n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_FINAL_WITHOUT_PROOF = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC7677_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
RFC7677_AUTH_MESSAGE = ",".join(
    [RFC7677_CLIENT_FIRST_BARE, RFC7677_SERVER_FIRST, RFC7677_FINAL_WITHOUT_PROOF]
).encode("ascii")


def rfc7677Keys():
    secret = scramSha256Secret("pencil", 4096, unb64("W22ZaJ0SNY7soEsUEjb6gQ=="))
    iterations, salt, storedKey, serverKey = parseScramSecret(secret)
    assert iterations == 4096 and salt == unb64("W22ZaJ0SNY7soEsUEjb6gQ==")
    return storedKey, serverKey


def test_rfc7677VectorClientProofChecks():
    storedKey, _ = rfc7677Keys()
    credentials = ScramCredentials(b"user", RFC7677_AUTH_MESSAGE, unb64(RFC7677_PROOF))
    assert credentials.checkStoredKey(storedKey) is True


def test_rfc7677VectorServerSignature():
    _, serverKey = rfc7677Keys()
    assert b64(hmac.new(serverKey, RFC7677_AUTH_MESSAGE, hashlib.sha256).digest()) == RFC7677_SERVER_SIGNATURE


def test_rfc7677VectorWrongProofOrMessageFails():
    storedKey, _ = rfc7677Keys()
    proof = bytearray(unb64(RFC7677_PROOF))
    proof[0] ^= 1
    assert ScramCredentials(b"user", RFC7677_AUTH_MESSAGE, bytes(proof)).checkStoredKey(storedKey) is False
    assert ScramCredentials(b"user", RFC7677_AUTH_MESSAGE, unb64(RFC7677_PROOF)[:-1]).checkStoredKey(storedKey) is False
    assert ScramCredentials(b"user", RFC7677_AUTH_MESSAGE + b"x", unb64(RFC7677_PROOF)).checkStoredKey(storedKey) is False
    wrongStoredKey, _ = parseScramSecret(scramSha256Secret("pencil!", 4096, unb64("W22ZaJ0SNY7soEsUEjb6gQ==")))[2:]
    assert ScramCredentials(b"user", RFC7677_AUTH_MESSAGE, unb64(RFC7677_PROOF)).checkStoredKey(wrongStoredKey) is False


def test_rfc7677VectorTestClient():
    """
    The test's own SCRAM client computes the RFC's proof and signature,
    so the protocol tests below exercise a correct client.
    """
    client = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == b"n,," + RFC7677_CLIENT_FIRST_BARE.encode("ascii")
    final = client.final(RFC7677_SERVER_FIRST.encode("ascii"))
    assert final == f"{RFC7677_FINAL_WITHOUT_PROOF},p={RFC7677_PROOF}".encode("ascii")
    assert client.verify(b"v=" + RFC7677_SERVER_SIGNATURE.encode("ascii"))


# -- CAPA and the plaintext policy --------------------------------------------


def test_capaFromTrustedPeer(store, alice):
    lines = capabilities(POP3Session(store))
    assert "USER" in lines
    assert "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in lines
    assert "STLS" not in lines  # no TLS configured


def test_capaFromUntrustedPeerWithoutTLS(store, alice):
    lines = capabilities(untrusted(store))
    assert "USER" not in lines
    assert "SASL SCRAM-SHA-256 CRAM-MD5" in lines
    assert not any("PLAIN" in line or "LOGIN" in line for line in lines)
    assert "STLS" not in lines


def test_untrustedPeerCannotSendPlaintextPasswords(store, alice):
    s = untrusted(store)
    assert s.command(f"USER {ALICE}") == REFUSED
    assert s.command(f"PASS {PASSWORD}") == REFUSED
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD, ALICE)}") == REFUSED
    assert s.command("AUTH PLAIN") == REFUSED
    assert s.command("AUTH plain") == REFUSED
    # Still in the AUTHORIZATION state, and a proper login works.
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")
    assert scramLogin(s, ALICE, PASSWORD).startswith(f"+OK {ALICE} has 0 messages")


def test_refusedPlaintextDoesNotReachTheChecker(store, alice):
    """
    The refusal comes before any password check: no auth-failure delay and
    no failed-login count (three of them would close the session).
    """
    s = untrusted(store, authFailureDelay=30)
    assert s.command(f"USER {ALICE}") == REFUSED
    assert s.command(f"PASS {PASSWORD}") == REFUSED
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}") == REFUSED
    assert not s.disconnected
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_authWithoutMechanismListsMechanisms(store, alice):
    assert POP3Session(store).command("AUTH") == "+OK\r\nSCRAM-SHA-256\r\nCRAM-MD5\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert untrusted(store).command("AUTH") == "+OK\r\nSCRAM-SHA-256\r\nCRAM-MD5\r\n.\r\n"
    # Without APOP, no CRAM-MD5 either.
    assert POP3Session(store, apop=False).command("AUTH") == "+OK\r\nSCRAM-SHA-256\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_apopWorksForUntrustedPeer(store):
    addUser(store, BOB, "builder", apop=True)
    s = untrusted(store)
    digest = hashlib.md5(s.challenge.encode() + b"builder").hexdigest()
    assert s.command(f"APOP {BOB} {digest}").startswith(f"+OK {BOB} has 0 messages")


def test_scramWorksForUntrustedPeer(store, alice):
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    s = untrusted(store)
    assert scramLogin(s, ALICE, PASSWORD) == f"+OK {ALICE} has 1 messages (22 octets)\r\n"
    assert s.command("STAT") == "+OK 1 22\r\n"


def test_trustedNetworksOption(store, alice):
    s = POP3Session(store, peer=UNTRUSTED, trustedNetworks=["198.51.100.0/24"])
    assert "USER" in capabilities(s)
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    # Loopback is no longer trusted when the list does not name it.
    s = POP3Session(store, trustedNetworks=["198.51.100.0/24"])
    assert "USER" not in capabilities(s)
    assert s.command(f"USER {ALICE}") == REFUSED


def test_trustedNetworksIPv6AndMappedAddresses(store, alice):
    from twisted.internet.address import IPv6Address

    for host in ("::1", "::ffff:127.0.0.1"):
        s = POP3Session(store, peer=IPv6Address("TCP", host, 4000))
        assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n", host
    s = POP3Session(store, peer=IPv6Address("TCP", "2001:db8::1", 4000))
    assert s.command(f"USER {ALICE}") == REFUSED
    s = POP3Session(store, peer=IPv6Address("TCP", "::ffff:198.51.100.7", 4000))
    assert s.command(f"USER {ALICE}") == REFUSED


def test_unixSocketPeerIsTrusted(store, alice):
    s = POP3Session(store, peer=UNIXAddress(None))
    assert s.login(ALICE, PASSWORD).startswith("+OK")


# -- STLS ----------------------------------------------------------------------


def test_capaListsSTLSBeforeLogin(store, alice, tls):
    for s in (untrusted(store, tls=tls), POP3Session(store, tls=tls)):
        assert "STLS" in capabilities(s)
    # Before STLS, an untrusted peer is still offered no plaintext login.
    lines = capabilities(untrusted(store, tls=tls))
    assert "USER" not in lines
    assert "SASL SCRAM-SHA-256 CRAM-MD5" in lines


def test_stlsAfterAFailedLoginInTheSamePacket(store, alice, tls):
    """
    STLS queued behind a command that waits (a failed login's delay) still
    discards what followed it in the packet, and runs in its turn.
    """
    s = POP3Session(store, tls=tls, authFailureDelay=5)
    out = s.send(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\nSTLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    assert out == b""
    assert s.advance(5) == INVALID.encode() + b"+OK begin TLS negotiation\r\n"
    assert s.transport.tlsStarted is tls
    assert s.advance(60) == b""
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")


def test_stls(store, alice, tls):
    s = untrusted(store, tls=tls)
    assert s.command("STLS") == "+OK begin TLS negotiation\r\n"
    assert s.transport.tlsStarted is tls
    assert s.transport.clearText == b"+OK begin TLS negotiation\r\n"


def test_afterSTLSTheSessionIsSecure(store, alice, tls):
    s = untrusted(store, tls=tls)
    s.command("STLS")
    lines = capabilities(s)
    assert "STLS" not in lines
    assert "USER" in lines
    assert "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in lines
    assert s.command("AUTH") == "+OK\r\nSCRAM-SHA-256\r\nCRAM-MD5\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert s.command("STLS") == "-ERR already using TLS\r\n"
    assert s.login(ALICE, PASSWORD).startswith(f"+OK {ALICE} has 0 messages")


def test_authPlainAfterSTLS(store, alice, tls):
    s = untrusted(store, tls=tls)
    s.command("STLS")
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").startswith(f"+OK {ALICE} has 0 messages")


def test_stlsAfterLogin(store, alice, tls):
    s = POP3Session(store, tls=tls)
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    assert "STLS" not in capabilities(s)
    assert s.command("STLS").startswith("-ERR ")
    assert s.transport.tlsStarted is None
    assert s.command("NOOP") == "+OK\r\n"


def test_stlsWithoutTLS(store, alice):
    s = POP3Session(store)
    assert s.command("STLS") == "-ERR STLS is not available on this server\r\n"
    assert s.transport.tlsStarted is None


def test_stlsTakesNoArgument(store, alice, tls):
    s = POP3Session(store, tls=tls)
    assert s.command("STLS now").startswith("-ERR ")
    assert s.transport.tlsStarted is None


def test_stlsInjection(store, alice, tls):
    """
    Commands pipelined after STLS in the clear are discarded: never run,
    never answered, before or after the handshake.
    """
    s = untrusted(store, tls=tls)
    out = s.send(b"STLS\r\nUSER x\r\nPASS y\r\n")
    assert out == b"+OK begin TLS negotiation\r\n"
    assert s.transport.clearText == b"+OK begin TLS negotiation\r\n"
    # Nothing was held back to be answered later either.
    assert s.advance(60) == b""
    # The injected USER left no trace: PASS now has no user to go with.
    assert s.command("PASS y") == "-ERR send USER first\r\n"
    assert s.login(ALICE, PASSWORD).startswith(f"+OK {ALICE} has 0 messages")


def test_stlsInjectionFromTrustedPeer(store, alice, tls):
    """
    Injected commands that would have succeeded in the clear are dropped
    just the same.
    """
    s = POP3Session(store, tls=tls)
    out = s.send(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
    assert out == b"+OK begin TLS negotiation\r\n"
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")


def test_stlsInjectionOfAPartialLine(store, alice, tls):
    """
    A partial line after STLS is dropped too, so it cannot be completed
    by the first line sent over TLS.
    """
    s = POP3Session(store, tls=tls)
    assert s.send(b"STLS\r\nDELE") == b"+OK begin TLS negotiation\r\n"
    assert s.command("NOOP").startswith("-ERR NOOP is not valid in the AUTHORIZATION state")


def test_userBeforeSTLSIsForgotten(store, alice, tls):
    s = POP3Session(store, tls=tls)
    assert s.command(f"USER {ALICE}") == "+OK send PASS\r\n"
    s.command("STLS")
    assert s.command(f"PASS {PASSWORD}") == "-ERR send USER first\r\n"


# -- AUTH PLAIN ------------------------------------------------------------------


def test_authPlainWithInitialResponse(store, alice):
    s = POP3Session(store)
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}") == f"+OK {ALICE} has 0 messages (0 octets)\r\n"
    assert s.command("STAT") == "+OK 0 0\r\n"


def test_authPlainWithoutInitialResponse(store, alice):
    s = POP3Session(store)
    assert s.command("AUTH PLAIN") == "+ \r\n"
    assert s.command(plain(ALICE, PASSWORD)) == f"+OK {ALICE} has 0 messages (0 octets)\r\n"


def test_authPlainMechanismNameIsCaseInsensitive(store, alice):
    s = POP3Session(store)
    assert s.command(f"AUTH plain {plain(ALICE, PASSWORD)}").startswith("+OK")


def test_aMechanismNameIsMatchedInASCIIOnly(store, alice):
    """
    A letter that Unicode upper-cases to an ASCII one (a long s) names no
    mechanism: "\u017fcram-sha-256" is not SCRAM-SHA-256.
    """
    s = POP3Session(store)
    reply = s.command("AUTH \u017fcram-sha-256")
    assert reply.startswith("-ERR unsupported authentication mechanism"), reply
    assert s.command(f"AUTH plain {plain(ALICE, PASSWORD)}").startswith("+OK")


def test_authPlainForgivesSpacesAroundItsArguments(store, alice):
    """
    Extra spaces around the mechanism and the initial response, which
    Dovecot accepts (a client that worked with it logs in), as mailgate
    forgives them around other commands' arguments; one inside the base64
    is still refused.
    """
    response = plain(ALICE, PASSWORD)
    for command in (f"AUTH PLAIN {response} ", f"AUTH PLAIN  {response}", f"AUTH  PLAIN {response}"):
        s = POP3Session(store)
        assert s.command(command) == f"+OK {ALICE} has 0 messages (0 octets)\r\n", command
        s.command("QUIT")
    s = POP3Session(store)
    assert s.command(f"AUTH PLAIN {response[:8]} {response[8:]}") == "-ERR [AUTH] invalid base64 data\r\n"
    assert s.command("AUTH PLAIN ") == "+ \r\n"


def test_anInitialResponsePastTheCommandLimitIsTaken(store):
    """
    An initial response that takes the AUTH line past a command's 255
    octets (a long password; Jakarta Mail sends every initial response
    on the AUTH line, whatever its length) logs in, as Dovecot's does:
    it was refused as a command line too long.  It is bounded as a SASL
    response is, sent whole or in pieces; other commands keep their 255.
    """
    password = "correct horse battery staple " * 8
    addUser(store, ALICE, password)
    command = f"AUTH PLAIN {plain(ALICE, password, authzid=ALICE)}"
    assert len(command) > POP3Server.maxCommandLength
    s = POP3Session(store)
    assert s.command(command) == f"+OK {ALICE} has 0 messages (0 octets)\r\n"
    # After login, AUTH is a command like any other.
    assert s.command(command) == "-ERR command line too long (the limit is 255 octets)\r\n"
    assert s.command("QUIT").startswith("+OK")
    s = POP3Session(store)
    line = (command + "\r\n").encode("ascii")
    assert s.send(line[:300]) == b""
    assert s.send(line[300:]) == f"+OK {ALICE} has 0 messages (0 octets)\r\n".encode()
    assert s.command("QUIT").startswith("+OK")
    s = POP3Session(store)
    assert s.command("AUTH PLAIN " + "A" * 5000) == "-ERR [AUTH] SASL response too long\r\n"
    assert s.send(b"AUTH PLAIN " + b"A" * 70000) == b""
    assert len(s.protocol._buffer) <= POP3Server.maxResponseLength
    assert s.send(b"\r\n") == b"-ERR [AUTH] SASL response too long\r\n"
    assert s.command("USER " + "a" * 300) == "-ERR command line too long (the limit is 255 octets)\r\n"
    assert s.command("AUTH NOSUCH " + "A" * 300) == "-ERR command line too long (the limit is 255 octets)\r\n"
    assert s.command(command).startswith("+OK")


def test_authPlainEmptyInitialResponse(store, alice):
    """
    C{=} is an initial response of zero length (RFC 5034), not an absent
    one: the server evaluates it (an empty PLAIN message is malformed)
    rather than asking for a response.
    """
    s = POP3Session(store)
    reply = s.command("AUTH PLAIN =")
    assert reply.startswith("-ERR [AUTH] ")
    assert not reply.startswith("+")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authPlainEmptyContinuationLine(store, alice):
    s = POP3Session(store)
    assert s.command("AUTH PLAIN") == "+ \r\n"
    assert s.command("").startswith("-ERR [AUTH] ")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authPlainWithAuthzidEqualToAuthcid(store, alice):
    s = POP3Session(store)
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD, ALICE)}").startswith("+OK")


def test_authPlainWithAuthzidNamingTheSameUser(store, alice):
    """
    RFC 4616: the authzid is the identity to act as.  One that names the
    authcid's own user otherwise (another case, as login names are
    matched) is that user, not another: refused, a client set up with
    both names went on working with Dovecot and stopped with mailgate.
    """
    s = POP3Session(store)
    assert s.command(f"AUTH PLAIN {plain(ALICE.upper(), PASSWORD, ALICE)}").startswith(f"+OK {ALICE} has")
    assert s.command("QUIT").startswith("+OK")
    s = POP3Session(store)
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD, 'Alice@Example.ORG')}").startswith(f"+OK {ALICE} has")


def test_aPlainOrScramAuthzidIsReadWithTheDefaultRealm():
    """
    With a default realm, a bare authcid and its full address as authzid
    (or the other way round) name one user; another user stays refused.
    """
    realm = "example.org"
    done = PlainMechanism(realm).step(b"alice@example.org\0alice\0pw")
    assert done.credentials.username == b"alice"
    assert PlainMechanism(realm).step(b"alice\0Alice@example.org\0pw").credentials.username == b"Alice@example.org"
    with pytest.raises(SASLError):
        PlainMechanism(realm).step(b"bob\0alice\0pw")
    with pytest.raises(SASLError):
        PlainMechanism().step(b"alice@example.org\0alice\0pw")

    def scramFirst(gs2, name):
        mechanism = ScramSHA256Mechanism(lambda address: defer.succeed(None), lambda: defer.succeed(b"k" * 32), realm)
        return mechanism.start(f"{gs2}n={name},r=abcdefghijklmnop".encode())

    assert isinstance(resultOf(defer.maybeDeferred(scramFirst, "n,a=alice@example.org,", "alice")), Challenge)
    with pytest.raises(SASLError):
        scramFirst("n,a=bob@example.org,", "alice")


def test_authPlainWithOtherAuthzid(store, alice):
    addUser(store, BOB, "builder")
    s = POP3Session(store)
    reply = s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD, BOB)}")
    assert reply.startswith("-ERR [AUTH] ")
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")


def test_authPlainWrongPasswordAfterDelay(store, alice):
    s = POP3Session(store, authFailureDelay=5)
    assert s.command(f"AUTH PLAIN {plain(ALICE, 'wrong')}") == ""
    assert s.advance(4.9) == b""
    assert s.advance(0.1) == INVALID.encode()
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authPlainUnknownUserLikeWrongPassword(store, alice):
    s = POP3Session(store, authFailureDelay=5)
    assert s.command(f"AUTH PLAIN {plain('nobody@example.org', PASSWORD)}") == ""
    assert s.advance(4.9) == b""
    assert s.advance(0.1) == INVALID.encode()


def test_authPlainFailuresCountTowardsTheLimit(store, alice):
    s = POP3Session(store)
    for _ in range(2):
        assert s.command(f"AUTH PLAIN {plain(ALICE, 'wrong')}") == INVALID
    reply = s.command(f"AUTH PLAIN {plain(ALICE, 'wrong')}")
    assert reply == INVALID + "-ERR too many failed logins; closing the connection\r\n"
    assert s.disconnected


def test_authPlainMalformed(store, alice):
    s = POP3Session(store)
    for bad in (f"{ALICE}\0{PASSWORD}", f"\0\0{PASSWORD}", f"\0{ALICE}\0{PASSWORD}\0extra"):
        assert s.command(f"AUTH PLAIN {b64(bad)}").startswith("-ERR [AUTH] ")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authCancel(store, alice):
    s = POP3Session(store)
    assert s.command("AUTH PLAIN") == "+ \r\n"
    reply = s.command("*")
    assert reply.startswith("-ERR ") and reply.count("\r\n") == 1
    # The session goes on, in the AUTHORIZATION state.
    assert s.command("NOOP").startswith("-ERR NOOP is not valid in the AUTHORIZATION state")
    assert s.login(ALICE, PASSWORD).startswith(f"+OK {ALICE}")


def test_authBadBase64InitialResponse(store, alice):
    s = POP3Session(store)
    assert s.command("AUTH PLAIN !!notbase64!!").startswith("-ERR [AUTH] ")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authBadBase64Continuation(store, alice):
    s = POP3Session(store)
    assert s.command("AUTH PLAIN") == "+ \r\n"
    assert s.command("@@@@").startswith("-ERR [AUTH] ")
    # The exchange is over: the next line is a command again.
    assert s.command("NOOP").startswith("-ERR NOOP is not valid")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authUnknownMechanism(store, alice):
    s = POP3Session(store)
    reply = s.command("AUTH KERBEROS_V4")
    assert reply.startswith("-ERR ") and reply.count("\r\n") == 1
    assert s.command("AUTH DIGEST-MD5").startswith("-ERR unsupported authentication mechanism")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authAfterLogin(store, alice):
    s = POP3Session(store)
    s.login(ALICE, PASSWORD)
    assert s.command(f"AUTH PLAIN {plain(ALICE, PASSWORD)}").startswith("-ERR AUTH is not valid in the TRANSACTION state")


def test_authWhenSASLIsOff(store, alice):
    s = POP3Session(store, sasl=False)
    assert s.command("AUTH PLAIN").startswith("-ERR ")
    assert not any(line.startswith("SASL") for line in capabilities(s))


def test_saslResponseMayBeLongerThanACommand(store, alice):
    """
    RFC 5034: a SASL response line is not bound by the 255-octet command
    limit.
    """
    addUser(store, BOB, "x" * 400)
    s = POP3Session(store)
    assert s.command("AUTH PLAIN") == "+ \r\n"
    assert s.command(plain(BOB, 'x' * 400)).startswith(f"+OK {BOB}")


# -- AUTH LOGIN --------------------------------------------------------------------


def test_authLoginAsksForNameThenPassword(store, alice):
    s = POP3Session(store)
    assert challenge(s.command("AUTH LOGIN")) == b"Username:"
    assert challenge(s.command(b64(ALICE))) == b"Password:"
    assert s.command(b64(PASSWORD)) == f"+OK {ALICE} has 0 messages (0 octets)\r\n"
    assert s.command("STAT") == "+OK 0 0\r\n"


def test_authLoginWithTheNameAsInitialResponse(store, alice):
    s = POP3Session(store)
    assert challenge(s.command(f"AUTH LOGIN {b64(ALICE)}")) == b"Password:"
    assert s.command(b64(PASSWORD)).startswith(f"+OK {ALICE} has 0 messages")


def test_authLoginFailuresLookLikeAnyFailedLogin(store, alice):
    """
    A wrong password and an unknown user get the same answer, after the
    same delay, as USER/PASS and PLAIN, and count towards the limit.
    """
    s = POP3Session(store, authFailureDelay=5)
    for name, password in ((ALICE, "wrong"), ("nobody@example.org", PASSWORD), (ALICE, "")):
        s.command("AUTH LOGIN")
        s.command(b64(name))
        assert s.command(b64(password)) == ""
        assert s.advance(4.9) == b""
        expected = INVALID.encode()
        if name == ALICE and password == "":
            expected += b"-ERR too many failed logins; closing the connection\r\n"
        assert s.advance(0.1) == expected
    assert s.disconnected


def test_authLoginNeedsAName(store, alice):
    s = POP3Session(store)
    s.command("AUTH LOGIN")
    assert s.command("=").startswith("-ERR [AUTH] ")
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_authLoginCancel(store, alice):
    s = POP3Session(store)
    s.command("AUTH LOGIN")
    s.command(b64(ALICE))
    assert s.command("*") == "-ERR authentication cancelled\r\n"
    assert s.login(ALICE, PASSWORD).startswith("+OK")


def test_exchangesCancelledAgainAndAgainEndTheSession(store, alice):
    """
    A cancelled exchange is a bad command: a client that begins SCRAM
    (whose first message costs a look-up of the user in the database) and
    cancels it, over and over, is closed as a client sending any other
    refused command is, where nothing ended it before (no login failed,
    so no penalty and no failed-login limit applied).  A few cancels, as
    a client trying one mechanism and then another makes, do not stand in
    the way of a login.
    """
    s = POP3Session(store)
    for _ in range(3):
        challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,,n={ALICE},r=abcdefgh')}"))
        assert s.command("*") == "-ERR authentication cancelled\r\n"
    assert s.login(ALICE, PASSWORD).startswith("+OK")

    s = POP3Session(store)
    replies = []
    for _ in range(30):
        if s.disconnected:
            break
        s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,,n={ALICE},r=abcdefgh')}")
        replies.append(s.command("*"))
    assert s.disconnected
    assert replies[:-1] == ["-ERR authentication cancelled\r\n"] * (len(replies) - 1)
    assert replies[-1] == "-ERR authentication cancelled\r\n-ERR too many bad commands; closing the connection\r\n"
    assert len(replies) == POP3Server.maxBadCommands


def test_authLoginIsPlaintext(store, alice, tls):
    """
    LOGIN sends the password itself: refused (before anything is asked)
    where plaintext passwords are, and accepted once the session is secure.
    """
    s = untrusted(store, tls=tls)
    assert s.command("AUTH LOGIN") == REFUSED
    assert s.command(f"AUTH LOGIN {b64(ALICE)}") == REFUSED
    s.command("STLS")
    assert challenge(s.command(f"AUTH LOGIN {b64(ALICE)}")) == b"Password:"
    assert s.command(b64(PASSWORD)).startswith("+OK")


# -- AUTH CRAM-MD5 -------------------------------------------------------------------


def test_rfc2195Vector():
    """
    The example exchange of RFC 2195 section 2.
    """
    from mailgate.auth.credentials import CramMD5Credentials

    credentials = CramMD5Credentials(
        b"<1896.697170952@postoffice.reston.mci.net>", b"tim", b"b913a602c7eda7a495b4e6e7334d3890"
    )
    assert credentials.checkPassword(b"tanstaaftanstaaf")
    assert not credentials.checkPassword(b"tanstaaftanstaag")
    assert cramMD5Response("tim", "tanstaaftanstaaf", b"<1896.697170952@postoffice.reston.mci.net>") == (
        b"tim b913a602c7eda7a495b4e6e7334d3890"
    )


@pytest.fixture
def bobWithAPOP(store):
    """
    A user with APOP enabled: the one kind CRAM-MD5 works for.
    """
    addUser(store, BOB, "builder", apop=True)
    return BOB


def cramChallenge(session):
    data = challenge(session.command("AUTH CRAM-MD5"))
    assert data.startswith(b"<") and data.endswith(b"@mailgate.test>"), data
    return data


def test_cramMD5ForAUserWithAPOP(store, bobWithAPOP):
    s = POP3Session(store)
    data = cramChallenge(s)
    assert s.command(b64(cramMD5Response(BOB, "builder", data))) == f"+OK {BOB} has 0 messages (0 octets)\r\n"


def test_cramMD5WorksWithoutTLS(store, bobWithAPOP):
    """
    Like APOP and SCRAM, CRAM-MD5 never sends the password: offered to and
    accepted from an untrusted peer without TLS.
    """
    s = untrusted(store)
    data = cramChallenge(s)
    assert s.command(b64(cramMD5Response(BOB, "builder", data))).startswith("+OK")


def test_cramMD5ChallengesAreFresh(store, bobWithAPOP):
    first = cramChallenge(POP3Session(store))
    s = POP3Session(store)
    second = cramChallenge(s)
    assert first != second
    # An answer to another challenge is a failed login.
    assert s.command(b64(cramMD5Response(BOB, "builder", first))) == INVALID


def test_cramMD5FailuresLookLikeAnyFailedLogin(store, alice, bobWithAPOP):
    """
    A wrong password, an unknown user, and a user without APOP (who has no
    secret CRAM-MD5 could be checked against, even with the right
    password) all get the answer of any failed login, after its delay.
    """
    for name, password in ((BOB, "wrong"), ("nobody@example.org", "builder"), (ALICE, PASSWORD)):
        s = POP3Session(store, authFailureDelay=5)
        data = cramChallenge(s)
        assert s.command(b64(cramMD5Response(name, password, data))) == ""
        assert s.advance(4.9) == b""
        assert s.advance(0.1) == INVALID.encode()
        assert s.login(ALICE, PASSWORD).startswith("+OK")
        s.command("QUIT")


def test_cramMD5MalformedResponses(store, bobWithAPOP):
    s = POP3Session(store)
    assert s.command(f"AUTH CRAM-MD5 {b64('bob 0123')}").startswith("-ERR [AUTH] ")
    # RFC 5034 section 4: "=" is an initial response (an empty one), which
    # a mechanism the server begins refuses like any other.
    assert s.command("AUTH CRAM-MD5 =") == "-ERR [AUTH] CRAM-MD5 takes no initial response\r\n"
    for bad in ("no-digest", f"{BOB} {'x' * 32}", f"{BOB}  ", ""):
        cramChallenge(s)
        assert s.command(b64(bad) if bad else "=").startswith("-ERR [AUTH] "), bad
    data = cramChallenge(s)
    assert s.command(b64(cramMD5Response(BOB, "builder", data))).startswith("+OK")


def test_cramMD5IsOfferedWithAPOPOnlyWhenAlwaysOffered(store, alice):
    """
    CRAM-MD5 works for the users with APOP: never offered with APOP off,
    offered with C{--apop}; by default not merely because some user has
    APOP enabled (clients that pick it whenever it is listed, curl, would
    fail for everyone else), only for imported CRAM-MD5 states (see
    C{tests/test_cram_offer.py}).
    """
    from mailgate.pop3.factory import APOP_DECISION_WAIT, APOPAdvertiser

    s = POP3Session(store, apop=False)
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities(s)
    assert s.command("AUTH CRAM-MD5").startswith("-ERR unsupported authentication mechanism")

    advertiser = APOPAdvertiser(store)
    addUser(store, BOB, "builder", apop=True)
    # No answer from the store at start (the greeting waits for it a
    # while): the timestamp, but no CRAM-MD5.
    s = POP3Session(store, apop=advertiser)
    assert s.greeting == ""
    s.advance(APOP_DECISION_WAIT)
    assert s.challenge is not None
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities(s)
    resultOf(store.deleteUser(BOB))
    resultOf(advertiser.refresh())
    s = POP3Session(store, apop=advertiser)
    assert s.challenge is None
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities(s)
    addUser(store, BOB, "builder", apop=True)
    resultOf(advertiser.refresh())
    s = POP3Session(store, apop=advertiser)
    assert s.challenge is not None
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities(s)
    assert s.command("AUTH CRAM-MD5").startswith("-ERR unsupported authentication mechanism")
    s = POP3Session(store, apop=True)
    assert "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in capabilities(s)
    data = cramChallenge(s)
    assert s.command(b64(cramMD5Response(BOB, "builder", data))).startswith("+OK")


# -- SCRAM-SHA-256 ------------------------------------------------------------------


def test_scramLogin(store, alice):
    s = POP3Session(store)
    client, serverFirst, reply = scramExchange(s, ALICE, PASSWORD)
    serverFinal = challenge(reply)
    # The server proves it knows the key too, before the session opens.
    assert serverFinal.startswith(b"v=")
    assert client.verify(serverFinal)
    assert s.command("") == f"+OK {ALICE} has 0 messages (0 octets)\r\n"
    assert s.command("STAT") == "+OK 0 0\r\n"


def test_scramLoginWithoutInitialResponse(store, alice):
    s = POP3Session(store)
    assert scramLogin(s, ALICE, PASSWORD, initial=False).startswith(f"+OK {ALICE}")


def test_scramServerFirstMessage(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    nonce, salt, iterations = client.parseServerFirst(serverFirst)
    assert nonce.startswith(client.clientNonce)
    assert len(nonce) >= len(client.clientNonce) + 16
    assert iterations == 4096
    assert len(salt) == 16


def test_scramNoncesAreFresh(store, alice):
    nonces = set()
    for _ in range(3):
        s = POP3Session(store)
        client = ScramClient(ALICE, PASSWORD)
        nonce, _, _ = client.parseServerFirst(challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")))
        nonces.add(nonce)
    assert len(nonces) == 3


def test_scramWrongPassword(store, alice):
    s = POP3Session(store, authFailureDelay=5)
    _, _, reply = scramExchange(s, ALICE, "wrong")
    assert reply == ""
    assert s.advance(4.9) == b""
    assert s.advance(5) == INVALID.encode()
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramUnknownUserLooksLikeWrongPassword(store, alice):
    factory = pop3Factory(store, authFailureDelay=5)
    known = POP3Session(store, factory=factory, clock=factory.reactor)
    unknown = POP3Session(store, factory=factory, clock=factory.reactor)
    client = ScramClient(ALICE, "wrong")
    knownFirst = challenge(known.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    stranger = ScramClient("nobody@example.org", "wrong")
    unknownFirst = challenge(unknown.command(f"AUTH SCRAM-SHA-256 {b64(stranger.first())}"))

    knownNonce, knownSalt, knownIterations = client.parseServerFirst(knownFirst)
    unknownNonce, unknownSalt, unknownIterations = stranger.parseServerFirst(unknownFirst)
    assert unknownIterations == knownIterations == 4096
    assert len(unknownSalt) == len(knownSalt)
    assert len(unknownNonce) == len(knownNonce)

    assert known.command(b64(client.final(knownFirst))) == ""
    assert unknown.command(b64(stranger.final(unknownFirst))) == ""
    factory.reactor.advance(5)
    assert known.advance(0) == unknown.advance(0) == INVALID.encode()


def test_scramUserNameThatIsNotAnAddress(store, alice):
    """
    The RFC's own example user name, "user", is no mail address here: it
    gets a server-first-message all the same, and fails like a wrong
    password.
    """
    s = POP3Session(store)
    _, serverFirst, reply = scramExchange(s, "user", "pencil")
    _, salt, iterations = ScramClient("user", "pencil").parseServerFirst(serverFirst)
    assert (len(salt), iterations) == (16, 4096)
    assert reply == INVALID


def test_scramUnknownUserGetsAStableSalt(store):
    """
    Asking twice about an unknown user gives the same salt, as a real user
    would: the salt does not give away that the user does not exist.
    """
    factory = pop3Factory(store)
    salts = []
    for _ in range(2):
        s = POP3Session(store, factory=factory)
        client = ScramClient("nobody@example.org", "x")
        _, salt, _ = client.parseServerFirst(challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")))
        salts.append(salt)
    assert salts[0] == salts[1]


@pytest.mark.parametrize("databaseURL", ["sqlite", "postgres"], indirect=True)
def test_scramUnknownUserSaltIsTheSameOnEveryNode(databaseURL, tmp_path):
    """
    Nodes sharing a database (or one node restarted) make up the same salt
    for an unknown user, as each serves a real user's stored salt: a
    client asking two of them behind a balancer cannot tell an unknown
    user by salts that differ.  Another deployment makes up its own.
    """

    def saltOf(store, name):
        s = POP3Session(store, factory=pop3Factory(store))
        client = ScramClient(name, "x")
        _, salt, _ = client.parseServerFirst(challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")))
        return salt

    nodes = [memoryStore(databaseURL), memoryStore(databaseURL)]
    elsewhere = memoryStore(f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}")
    try:
        addUser(nodes[0], ALICE, PASSWORD)
        assert saltOf(nodes[0], ALICE) == saltOf(nodes[1], ALICE)
        made = [saltOf(node, "nobody@example.org") for node in nodes]
        assert made[0] == made[1]
        assert saltOf(elsewhere, "nobody@example.org") != made[0]
        assert saltOf(nodes[1], "other@example.org") != made[0]
    finally:
        for store in nodes + [elsewhere]:
            store.close()


def test_scramUnknownUserSaltIgnoresCase(store, alice):
    """
    A real user's salt is the same however the address is capitalised
    (the lookup normalises it): an unknown user's made-up salt must be too,
    or asking with two spellings would tell them apart.
    """
    factory = pop3Factory(store)

    def saltOf(name):
        s = POP3Session(store, factory=factory)
        client = ScramClient(name, "x")
        _, salt, _ = client.parseServerFirst(challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")))
        return salt

    assert saltOf(ALICE) == saltOf(ALICE.upper()) == saltOf("Alice@Example.ORG")
    assert saltOf("nobody@example.org") == saltOf("NOBODY@example.org") == saltOf("Nobody@Example.ORG ")


def test_scramTamperedNonce(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    nonce, _, _ = client.parseServerFirst(serverFirst)
    reply = s.command(b64(client.final(serverFirst, nonce=nonce[:-1] + ("A" if nonce[-1] != "A" else "B"))))
    assert reply.startswith("-ERR [AUTH] ") and reply.count("\r\n") == 1
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramClientNonceOnly(store, alice):
    """
    Replaying only the client's part of the nonce is refused.
    """
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    assert s.command(b64(client.final(serverFirst, nonce=client.clientNonce))).startswith("-ERR [AUTH] ")


def test_scramTamperedChannelBinding(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    reply = s.command(b64(client.final(serverFirst, channelBinding=b64("y,,"))))
    assert reply.startswith("-ERR [AUTH] ") and reply.count("\r\n") == 1
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramChannelBindingFlagRefused(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD, gs2="p=tls-unique,,")
    reply = s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert reply.startswith("-ERR [AUTH] ") and reply.count("\r\n") == 1
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramClientSupportsBindingButServerDoesNot(store, alice):
    """
    The C{y} flag: the client could bind but the server offers no -PLUS
    mechanism; that is a normal login.
    """
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD, gs2="y,,")
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    serverFinal = challenge(s.command(b64(client.final(serverFirst))))
    assert client.verify(serverFinal)
    assert s.command("").startswith("+OK")


def test_scramMalformedClientFirst(store, alice):
    s = POP3Session(store)
    for bad in ("", "n,,", "x,,n=a,r=b", f"n,,r=abc,n={ALICE}", f"n,,n={ALICE}", f"n,,n={ALICE},r="):
        reply = s.command(f"AUTH SCRAM-SHA-256 {b64(bad) if bad else '='}")
        assert reply.startswith("-ERR [AUTH] "), (bad, reply)
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramMandatoryExtensionsFail(store, alice):
    """
    RFC 5802 section 5.1: an m= attribute, wherever it stands, MUST make
    the exchange fail; the session can still log in.
    """
    s = POP3Session(store)
    for bad in (f"n,,m=ext,n={ALICE},r=abc", f"n,,n={ALICE},r=abc,m=ext"):
        reply = s.command(f"AUTH SCRAM-SHA-256 {b64(bad)}")
        assert reply.startswith("-ERR [AUTH] mandatory SCRAM extensions"), (bad, reply)
    client = ScramClient(ALICE, PASSWORD)
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    final = client.final(serverFirst).decode("utf-8")
    withoutProof, _, proof = final.rpartition(",")
    reply = s.command(b64(f"{withoutProof},m=ext,{proof}"))
    assert reply.startswith("-ERR [AUTH] mandatory SCRAM extensions"), reply
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramCancelAfterServerFirst(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD)
    challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    reply = s.command("*")
    assert reply.startswith("-ERR ") and reply.count("\r\n") == 1
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramCancelAfterServerFinal(store, alice):
    """
    A client that does not accept the server's signature answers C{*}
    instead of the empty response: it is not logged in, and the maildrop
    is not left locked.
    """
    s = POP3Session(store)
    _, _, reply = scramExchange(s, ALICE, PASSWORD)
    challenge(reply)
    assert s.command("*").startswith("-ERR ")
    assert s.command("STAT").startswith("-ERR STAT is not valid in the AUTHORIZATION state")
    other = POP3Session(store)
    assert other.login(ALICE, PASSWORD).startswith(f"+OK {ALICE}")


def test_scramLoginCountsOnceTheClientTookTheServersProof(store, alice):
    """
    The login is logged (and counted) when the client has answered the
    server's final message, not before: one that cancels there is logged
    as abandoned, never as logged in.
    """
    from twisted.logger import Logger, formatEvent

    for answer, expected in (("", "pop3.login"), ("*", "auth.abandoned")):
        s = POP3Session(store)
        events = []
        s.protocol.log = Logger(observer=events.append)
        _, _, reply = scramExchange(s, ALICE, PASSWORD)
        challenge(reply)
        assert [e["event"] for e in events] == []
        s.command(answer)
        assert [e["event"] for e in events] == [expected]
        if answer == "*":
            assert formatEvent(events[0]) == (
                f"pop3 login abandoned user={ALICE} peer={s.protocol.peerText} "
                "mechanism=scram-sha-256: authentication cancelled"
            )
        s.command("QUIT")


def test_scramClientGoneBeforeTakingTheServersProofDidNotLogIn(store, alice):
    """
    A client that goes (or is timed out, or the server stops) after the
    server's final message, without answering it, did not log in either:
    its end is logged as an abandoned login, not as the logout of a
    session whose login was never logged, and the maildrop is released.
    """
    from twisted.internet.error import ConnectionDone
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    s = POP3Session(store)
    events = []
    s.protocol.log = Logger(observer=events.append)
    _, _, reply = scramExchange(s, ALICE, PASSWORD)
    challenge(reply)
    s.transport.loseConnection()
    s.protocol.connectionLost(Failure(ConnectionDone()))
    # (and the end line of a session that did not log in, never a logout)
    assert [(e["event"], e.get("reason")) for e in events] == [
        ("auth.abandoned", "connection lost"),
        ("pop3.disconnect", "connection lost"),
    ]
    other = POP3Session(store)
    assert other.login(ALICE, PASSWORD).startswith(f"+OK {ALICE}")


def test_scramWithAuthzid(store, alice):
    s = POP3Session(store)
    client = ScramClient(ALICE, PASSWORD, gs2=f"n,a={ALICE},")
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    serverFinal = challenge(s.command(b64(client.final(serverFirst))))
    assert client.verify(serverFinal)
    assert s.command("").startswith("+OK")

    assert s.command("QUIT").startswith("+OK")
    # The same user in capitals is that user, not another.
    s = POP3Session(store)
    client = ScramClient(ALICE.upper(), PASSWORD, gs2=f"n,a={ALICE},")
    serverFirst = challenge(s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}"))
    assert client.verify(challenge(s.command(b64(client.final(serverFirst)))))
    assert s.command("").startswith(f"+OK {ALICE} has")

    addUser(store, BOB, "builder")
    s = POP3Session(store)
    client = ScramClient(BOB, "builder", gs2=f"n,a={ALICE},")
    assert s.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}").startswith("-ERR [AUTH] ")


def test_scramUserNameWithSpecialCharacters(store):
    """
    saslname escaping: C{=} and C{,} in a user name travel as C{=3D} and
    C{=2C}.
    """
    address = "a=b@example.org"
    addUser(store, address, "secret")
    s = POP3Session(store)
    assert scramLogin(s, address, "secret").startswith(f"+OK {address}")


def test_scramForUsersAddedWithTheCLI(tmp_path):
    """
    C{mailgate user add} stores an scrypt hash and SCRAM keys; SCRAM works
    from those keys, and the database never holds the password of a user
    without APOP.
    """
    path = tmp_path / "cli.sqlite3"
    url = f"sqlite:///{path}"
    secret = "Tr0ub4dor&3-cli"
    out, err = io.StringIO(), io.StringIO()
    code = runCLI(["--database", url, "user", "add", ALICE, "--password-stdin"],
                  stdin=io.StringIO(secret + "\n"), stdout=out, stderr=err)
    assert code == 0, (out.getvalue(), err.getvalue())

    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM users WHERE address = ?", (ALICE,)).fetchone())
    db.close()
    assert row["password_hash"].startswith("$scrypt$")
    assert row["scram_sha256"].startswith("SCRAM-SHA-256$4096:")
    assert row["apop_secret"] is None
    for value in row.values():
        if isinstance(value, (str, bytes)):
            text = value if isinstance(value, str) else value.decode("latin-1")
            assert secret not in text
            assert b64(secret) not in text

    from mailgate.testing import memoryStore

    store = memoryStore(url)
    try:
        s = untrusted(store)
        assert scramLogin(s, ALICE, secret).startswith(f"+OK {ALICE}")
        s.command("QUIT")
        s = untrusted(store)
        _, _, reply = scramExchange(s, ALICE, secret + "x")
        assert reply == INVALID
        # The scrypt hash serves USER/PASS from a trusted peer.
        assert POP3Session(store).login(ALICE, secret).startswith(f"+OK {ALICE}")
    finally:
        store.close()


# -- SMTP and LMTP STARTTLS -----------------------------------------------------


@pytest.fixture
def bob(store):
    addUser(store, BOB, "builder")
    return BOB


def ehloLines(reply, code="250"):
    lines = reply.split("\r\n")
    assert lines[-1] == ""
    assert all(line.startswith((f"{code}-", f"{code} ")) for line in lines[:-1]), reply
    return [line[4:] for line in lines[:-1]]


def retrieve(store, address, password, number):
    s = POP3Session(store)
    assert s.login(address, password).startswith("+OK")
    reply = s.command(f"RETR {number}")
    assert reply.startswith("+OK")
    s.command("QUIT")
    return reply


def test_smtpEhloListsStartTLS(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    assert "STARTTLS" in ehloLines(s.command("EHLO client.test"))


def test_smtpWithoutTLSDoesNotOfferStartTLS(store, bob):
    s = SMTPSession(store)
    assert "STARTTLS" not in ehloLines(s.command("EHLO client.test"))
    assert s.command("STARTTLS").startswith("502 5.5.1 ")
    assert s.transport.tlsStarted is None


def test_smtpStartTLS(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    reply = s.command("STARTTLS")
    assert reply.startswith("220 2.0.0 ") and reply.count("\r\n") == 1
    assert s.transport.tlsStarted is tls
    assert s.transport.clearText == reply.encode()


def test_smtpStartTLSInjection(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    out = s.send(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n")
    assert out.startswith(b"220 2.0.0 ") and out.count(b"\r\n") == 1
    assert s.transport.clearText == out
    assert s.advance(60) == b""
    # The injected MAIL did not open a transaction: after EHLO, MAIL is
    # accepted (it would be a nested MAIL otherwise).
    s.command("EHLO client.test")
    assert s.command("MAIL FROM:<a@b.example>").startswith("250 ")


def test_smtpStartTLSInjectionOfAPartialLine(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    assert s.send(b"STARTTLS\r\nRSE").startswith(b"220 ")
    assert s.command("EHLO client.test").startswith("250")


def test_smtpAfterStartTLSTheSessionStartsOver(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    assert s.command("MAIL FROM:<a@b.example>").startswith("250 ")
    s.command("STARTTLS")
    assert s.command("MAIL FROM:<a@b.example>").startswith("503 5.5.1 ")
    lines = ehloLines(s.command("EHLO client.test"))
    assert "STARTTLS" not in lines
    assert "PIPELINING" in lines
    assert s.command("STARTTLS").startswith("503 5.5.1 ")
    assert s.command("MAIL FROM:<a@b.example>").startswith("250 ")


def test_smtpStartTLSTakesNoArgument(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    assert s.command("STARTTLS now").startswith("501 ")
    assert s.transport.tlsStarted is None


def test_smtpReceivedSaysESMTPSAfterStartTLS(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    s.command("EHLO client.test")
    s.command("STARTTLS")
    replies = s.sendMail("sender@example.net", [BOB], b"Subject: over TLS\r\n\r\nsecret\r\n")
    assert replies.splitlines()[-1].startswith("250 2.0.0 ")
    message = retrieve(store, BOB, "builder", 1)
    assert " with ESMTPS id " in message
    assert "Subject: over TLS" in message


def test_smtpReceivedSaysESMTPWithoutTLS(store, bob, tls):
    s = SMTPSession(store, tls=tls)
    replies = s.sendMail("sender@example.net", [BOB], b"Subject: clear\r\n\r\nhi\r\n")
    assert replies.splitlines()[-1].startswith("250 2.0.0 ")
    message = retrieve(store, BOB, "builder", 1)
    assert " with ESMTP id " in message
    assert "ESMTPS" not in message


def test_lmtpStartTLS(store, bob, tls):
    s = SMTPSession(store, lmtp=True, tls=tls)
    assert "STARTTLS" in ehloLines(s.command("LHLO client.test"))
    out = s.send(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n")
    assert out.startswith(b"220 2.0.0 ") and out.count(b"\r\n") == 1
    assert s.transport.tlsStarted is tls
    assert s.command("MAIL FROM:<a@b.example>").startswith("503 5.5.1 ")
    lines = ehloLines(s.command("LHLO client.test"))
    assert "STARTTLS" not in lines
    assert s.command("STARTTLS").startswith("503 ")
    replies = s.sendMail("sender@example.net", [BOB], b"Subject: lmtp\r\n\r\nhi\r\n", hello=None)
    assert replies.splitlines()[-1].startswith(f"250 2.0.0 <{BOB}> ")
    message = retrieve(store, BOB, "builder", 1)
    assert " with LMTPS id " in message


def test_lmtpReceivedWithoutTLS(store, bob, tls):
    s = SMTPSession(store, lmtp=True, tls=tls)
    replies = s.sendMail("sender@example.net", [BOB], b"Subject: lmtp\r\n\r\nhi\r\n", hello="LHLO client.test")
    assert replies.splitlines()[-1].startswith(f"250 2.0.0 <{BOB}> ")
    message = retrieve(store, BOB, "builder", 1)
    assert " with LMTP id " in message


# -- implicit TLS (pop3s), with a real handshake in memory ----------------------


def test_implicitTLSSessionIsSecure(store, alice, tmp_path):
    """
    POP3 behind a TLSLayerFactory, as the pop3s listeners are built: a
    real TLS client completes the handshake, sees the server certificate,
    and an untrusted peer may log in with USER/PASS; STLS is neither
    offered nor accepted.
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailgate.session.tlslayer import TLSLayerFactory
    from mailgate.testing import connectClient
    from certs import certificateFingerprint

    certificatePath, keyPath = makeCertificate(tmp_path, "mail.example.test")
    serverTLS = ServerTLS(str(certificatePath), str(keyPath))
    pop3 = pop3Factory(store, tls=serverTLS)
    received = []

    class Client(Protocol):
        def dataReceived(self, data):
            received.append(data)

    def take():
        data = b"".join(received).decode("utf-8")
        received.clear()
        return data

    clientCreator = optionsForClientTLS(
        "mail.example.test", trustRoot=Certificate.loadPEM(certificatePath.read_bytes())
    )
    # The client's TLSMemoryBIOFactory aggregates small writes until the clock turns.
    clock = pop3.reactor
    client = TLSMemoryBIOFactory(clientCreator, True, Factory.forProtocol(Client), clock=clock).buildProtocol(None)
    connection = connectClient(TLSLayerFactory(serverTLS, pop3, clock), client, peer=("198.51.100.7", 1234))

    def pump():
        for _ in range(10):
            connection.flush()
            clock.advance(0)

    def command(line):
        client.write(line.encode("utf-8") + b"\r\n")
        pump()
        return take()

    pump()
    assert take().startswith("+OK mailgate POP3 server ready")
    peerCertificate = client.getPeerCertificate()
    assert peerCertificate.digest("sha256").decode("ascii") == certificateFingerprint(certificatePath)

    _, lines = multiline(command("CAPA"))
    assert "STLS" not in lines
    assert "USER" in lines
    assert "SASL SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN" in lines
    assert command("STLS") == "-ERR already using TLS\r\n"
    assert command(f"USER {ALICE}") == "+OK send PASS\r\n"
    assert command(f"PASS {PASSWORD}") == f"+OK {ALICE} has 0 messages (0 octets)\r\n"
    assert command("QUIT").startswith("+OK")


# -- a domain in Unicode -------------------------------------------------------


IDN_USER = "alice@xn--bcher-kva.example"


@pytest.mark.parametrize("name", ["alice@bücher.example", "Alice@BÜCHER.example.", "alice@ｂücher.example"])
def test_aDomainInUnicodeLogsInAsItsASCIIFormThroughEveryMechanism(store, name):
    """
    Mail to alice@bücher.example reaches the user alice@xn--bcher-kva.example
    (SMTP, LMTP, deliver and the mailgate command take a domain in Unicode as
    its A-labels), so the same name logs her in, whatever the mechanism: it
    was refused as an invalid address, the name her mail came to unusable
    for fetching it.
    """
    addUser(store, IDN_USER, PASSWORD, apop=True)
    welcome = f"+OK {IDN_USER} has 0 messages (0 octets)\r\n"

    def loggedIn(session, reply):
        assert reply == welcome
        assert session.command("QUIT").startswith("+OK")

    s = POP3Session(store)
    assert s.command(f"USER {name}").startswith("+OK")
    loggedIn(s, s.command(f"PASS {PASSWORD}"))
    s = POP3Session(store)
    digest = hashlib.md5(s.challenge.encode() + PASSWORD.encode()).hexdigest()
    loggedIn(s, s.command(f"APOP {name} {digest}"))
    s = POP3Session(store)
    loggedIn(s, s.command(f"AUTH PLAIN {plain(name, PASSWORD)}"))
    s = POP3Session(store)
    assert s.command(f"AUTH LOGIN {b64(name)}").startswith("+ ")
    loggedIn(s, s.command(b64(PASSWORD)))
    s = POP3Session(store)
    data = cramChallenge(s)
    loggedIn(s, s.command(b64(cramMD5Response(name, PASSWORD, data))))
    s = POP3Session(store)
    loggedIn(s, scramLogin(s, name, PASSWORD))


def test_aPasswordSASLprepEmptiesIsNoEmptySCRAMPassword(store):
    """
    A password of characters SASLprep maps to nothing (soft hyphens,
    zero-width spaces) prepares to the empty string, which RFC 7613 (4.2.2)
    refuses: its SCRAM keys were made from the empty password, so SCRAM
    with no password at all logged its user in.  It is taken as it is,
    as a password SASLprep refuses is.
    """
    invisible = "\u00ad" * 4 + "\u200b" * 4
    addUser(store, ALICE, invisible)
    s = POP3Session(store)
    assert scramExchange(s, ALICE, "")[2] == INVALID
    s = POP3Session(store)
    assert scramLogin(s, ALICE, invisible) == f"+OK {ALICE} has 0 messages (0 octets)\r\n"


def test_scramUserNameWithAnEqualsSignNotEscapingIsRefused(store, alice):
    """
    RFC 5802 section 5.1: a saslname with an "=" that begins neither
    C{=2C} nor C{=3D} MUST fail the exchange, wherever the "=" stands:
    C{=3=2CD} was taken (its C{=2C} removed, the rest read as C{=3D}) and
    answered with a server-first-message.
    """
    s = POP3Session(store)
    for name in ("a=3=2CD@example.org", "a=@example.org", "a=2c@example.org", "a=3@example.org"):
        reply = s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,,n={name},r=abcdefgh')}")
        assert reply.startswith("-ERR [AUTH] malformed user name"), (name, reply)
        reply = s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,a={name},n={ALICE},r=abcdefgh')}")
        assert reply.startswith("-ERR [AUTH] malformed user name"), (name, reply)
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_scramUserNameWithANulIsRefused(store, alice):
    """
    RFC 5802's saslname has no NUL (value-safe-char starts at 0x01): a
    name or authzid with one is refused as malformed, as USER refuses a
    NUL, rather than looked up and given a made-up salt.
    """
    s = POP3Session(store)
    name = "alice\0@example.org"
    reply = s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,,n={name},r=abcdefgh')}")
    assert reply.startswith("-ERR [AUTH] malformed user name"), reply
    reply = s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,a={name},n={ALICE},r=abcdefgh')}")
    assert reply.startswith("-ERR [AUTH] malformed user name"), reply
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_anEqualsSignIsTheEmptyInitialResponseOnly(store, alice):
    """
    RFC 5034 section 4: C{=} is the empty initial response; an answer to a
    challenge is base64 (an empty one, an empty line), and the server MUST
    refuse one it cannot decode, as Dovecot refuses C{=} there ("Invalid
    base64 data in continued response").  LOGIN took it for an empty
    password: a failed login, answered after the failure delay.
    """
    s = POP3Session(store)
    assert s.command(f"AUTH LOGIN {b64(ALICE)}").startswith("+ ")
    assert s.command("=") == "-ERR [AUTH] invalid base64 data\r\n"
    assert s.command("AUTH PLAIN").startswith("+ ")
    assert s.command("=") == "-ERR [AUTH] invalid base64 data\r\n"
    # As the initial response it is still the empty one.
    assert s.command("AUTH LOGIN =") == "+ " + b64("Username:") + "\r\n"
    assert s.command(b64(ALICE)).startswith("+ ")
    assert s.command(b64(PASSWORD)).startswith(f"+OK {ALICE} has")


def test_scramClientFirstWithAnEmptyUserNameOrANonceOutsidePrintable(store, alice):
    """
    RFC 5802 section 5.1: an empty user name SHOULD abort the exchange,
    and a nonce is "printable" (ASCII 0x21 to 0x7E but ","): a space or a
    non-ASCII letter in it was taken and sent back in the
    server-first-message, which then was not well-formed either.
    """
    s = POP3Session(store)
    reply = s.command(f"AUTH SCRAM-SHA-256 {b64('n,,n=,r=abcdefgh')}")
    assert reply == "-ERR [AUTH] empty user name\r\n"
    for nonce in ("abc def", "abc\u00e9", "abc\x7f"):
        reply = s.command(f"AUTH SCRAM-SHA-256 {b64(f'n,,n={ALICE},r={nonce}')}")
        assert reply == "-ERR [AUTH] malformed nonce\r\n", (nonce, reply)
    assert scramLogin(s, ALICE, PASSWORD).startswith("+OK")


def test_aLoginGivenUpAtSASLsLastStepIsRefusedOnceTheMaildropIsReleased(store, alice):
    """
    RFC 1939 section 4: a lock taken for a login that is then refused is
    released before the refusal.  The maildrop SCRAM's login took waits
    for the client's answer to the server's proof; cancelled there (or
    answered with a line too long), the -ERR went out while the release
    (a database round trip where locks are shared between nodes) was
    still under way, and a client logging in again at once could find its
    maildrop in use.
    """
    for answer, refusal in (
        (b"*", "-ERR [AUTH] authentication cancelled\r\n"),
        (b"A" * 5000, "-ERR [AUTH] SASL response too long\r\n"),
    ):
        s = POP3Session(store)
        _, _, reply = scramExchange(s, ALICE, PASSWORD)
        challenge(reply)
        release = s.protocol._logout
        pending = defer.Deferred()

        def slowRelease(release=release, pending=pending):
            release()
            return pending

        s.protocol._logout = slowRelease
        assert s.send(answer + b"\r\nCAPA\r\n") == b""
        pending.callback(None)
        reply = s._take().decode()
        assert reply.startswith(refusal), reply
        assert reply[len(refusal):].startswith("+OK capability list follows\r\n")
        other = POP3Session(store)
        assert other.login(ALICE, PASSWORD).startswith(f"+OK {ALICE}")
        other.command("QUIT")
