"""
A review of OAUTHBEARER and XOAUTH2 (19ecadc) as a hostile client would
try them: tokens an identity provider might sign that no validator should
take (an iss that is no string, an exp of infinity, an e-mail the provider
says it has not verified), headers PyJWT's oldest allowed version (2.6)
lets through (crit, JSON nested too deep), and against a real twistd
mailgate --pop3s over raw TLS sockets: the same bytes for every cause of
failure, a client that never answers the error challenge, nothing of a
token in a JSON log traced with --debug-peer, and a SIGHUP with a broken
key file.
"""

import base64
import json
import os
import poplib
import signal
import socket
import ssl
import time

import jwt
import pytest

from e2e import DEADLINE, LineReader, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401
from certs import makeCertificate
from mailgate.auth.oauth import InvalidToken, TokenValidator
from mailgate.testing import POP3Session, addUser
from oauthtokens import AUDIENCE, ISSUER, Keys, oauthbearer, xoauth2
from test_e2e_oauth import TLSWire

ALICE = "alice@example.org"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
INVALID = b"-ERR [AUTH] invalid user name or password\r\n"


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture
def validator(keys, tmp_path):
    jwks, pem = keys.write(tmp_path)
    return TokenValidator([jwks, pem], [ISSUER], [AUDIENCE])


def signed(keys, payload, header=None):
    """
    A token over C{payload} (L{bytes}: JSON that jwt.encode would not
    write) signed RS256 by the server's RSA key.
    """
    return jwt.api_jws.encode(payload, keys.rsa, algorithm="RS256", headers=header or {"kid": "rsa-1"})


def claims(**more):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "email": ALICE, "iat": now, "exp": now + 300}
    body.update(more)
    return body


@pytest.mark.parametrize("iss", [[ISSUER], {"url": ISSUER}])
def test_anIssuerThatIsNoStringIsAnInvalidToken(validator, keys, iss):
    """
    A signed token whose iss is a list or an object is refused as any
    other issuer is; it raised TypeError (unhashable), which the POP3
    session answered as an internal error, its traceback logged as
    critical, no failed login counted.
    """
    with pytest.raises(InvalidToken):
        validator.validate(signed(keys, json.dumps(claims(iss=iss)).encode()).encode())


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN"])
def test_aTimeThatIsNoFiniteNumberIsAnInvalidToken(validator, keys, name, number):
    """
    exp of 1e400 (infinity in JSON) or NaN never expired: a token that
    never expires; NaN's nbf was never in the future.
    """
    payload = json.dumps(claims(**{name: 0})).encode().replace(f'"{name}": 0'.encode(), f'"{name}": '.encode() + number)
    with pytest.raises(InvalidToken):
        validator.validate(signed(keys, payload).encode())


@pytest.mark.parametrize("verified", [False, "false"])
def test_anEmailTheProviderHasNotVerifiedNamesNoUser(validator, keys, verified):
    """
    email_verified false: the provider says the address is not known to be
    the user's (Keycloak's self-registration, a profile's editable e-mail),
    and the token logged in as whoever has that address here.
    """
    with pytest.raises(InvalidToken):
        validator.validate(keys.token(email_verified=verified).encode())
    assert validator.validate(keys.token(email_verified=True).encode()) == ALICE
    assert validator.validate(keys.token().encode()) == ALICE


def test_aCriticalHeaderExtensionIsRefused(validator, keys):
    """
    RFC 7515 section 4.1.11: crit names extensions the verifier must
    understand; mailgate understands none.  PyJWT 2.6 (the floor) ignored
    crit and took the token.
    """
    token = signed(keys, json.dumps(claims()).encode(), {"kid": "rsa-1", "crit": ["exp2"], "exp2": 1})
    with pytest.raises(InvalidToken):
        validator.validate(token.encode())


def test_aHeaderNestedTooDeepIsAMalformedToken(validator):
    """
    An unsigned header of 6000 '[': PyJWT 2.6 let json's RecursionError
    out, an internal error in the session (no failed login counted, a
    critical traceback logged at each try).
    """
    token = f"{_b64url(b'[' * 6000)}.{_b64url(b'{}')}.AAAA".encode()
    with pytest.raises(InvalidToken):
        validator.validate(token)


def test_aSignatureOfALengthNoKeyMakesIsRefusedBeforeTheTokenIsDecoded(validator, keys, monkeypatch):
    """
    A good token's signature made 6 KB long (a hostile client's, to cost
    the reactor thread) is refused before PyJWT decodes any of it: PyJWT
    checked each of its characters, twice, 0.5 ms a token, and again for
    each key of a token naming none.  One of the right length still is.
    """
    decoded = []
    for name in ("get_unverified_header", "decode"):
        real = getattr(jwt, name)
        monkeypatch.setattr(jwt, name, lambda *a, real=real, name=name, **kw: decoded.append(name) or real(*a, **kw))
    for alg in ("RS256", "ES256", "EdDSA"):
        signingInput = keys.token(alg=alg).rpartition(".")[0]
        with pytest.raises(InvalidToken):
            validator.validate(f"{signingInput}.{'A' * 6000}".encode())
        assert decoded == [], alg
    assert validator.validate(keys.token().encode()) == ALICE
    assert decoded == ["get_unverified_header", "decode"]


def test_anAnswerToTheErrorChallengeTooLongIsStillItsAnswer(store, validator):
    """
    A client answering a bearer token's error challenge with a line past
    the SASL response limit: it got "-ERR [AUTH] SASL response too long",
    and the session still waited for the answer, so the next command
    (CAPA here) was taken for it and got the login's -ERR.  Now that line
    is the answer: the login's -ERR, and CAPA is CAPA.
    """
    addUser(store, ALICE, "wonderland")
    s = POP3Session(store, tokens=validator)
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    assert s.command(base64.b64encode(xoauth2(ALICE, "abc")).decode()).startswith("+ ")
    assert s.command("x" * 5000) == INVALID.decode()
    assert s.command("CAPA").startswith("+OK")


# -- on the real thing -------------------------------------------------------


def start(mailgate_server, mailgate_cli, keys, tmp_path, *more, trusted="none"):
    (tmp_path / "tls").mkdir()
    certificatePath, keyPath = makeCertificate(tmp_path / "tls", "localhost", name="server")
    (tmp_path / "oauth").mkdir()
    jwks, pem = keys.write(tmp_path / "oauth")
    mailgate_cli.addUser(ALICE, "wonder land")
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--pop3s", LOOPBACK_TCP,
        "--trusted-network", trusted, "--auth-failure-delay", "0.05",
        "--oauth2-keys", str(jwks), "--oauth2-keys", str(pem),
        "--oauth2-issuer", ISSUER, "--oauth2-audience", AUDIENCE, *more,
    )
    return server, certificatePath, jwks


class Wire(TLSWire):
    """
    test_e2e_oauth's raw POP3 connection over implicit TLS, with the three
    steps of a bearer-token login.
    """

    def exchange(self, mechanism, message, answer):
        """
        The server's replies to AUTH, the message, and the answer to an
        error challenge (if one came), as bytes.
        """
        replies = [self.command(b"AUTH " + mechanism), self.command(base64.b64encode(message))]
        if replies[-1].startswith(b"+ "):
            replies.append(self.command(answer))
        return replies


@sqliteOnly
def test_everyFailureGetsTheSameBytesAndNoTokenIsLoggedOrTraced(mailgate_server, mailgate_cli, keys, tmp_path):
    """
    Over implicit TLS, traced (--debug-peer) into a JSON log: each token
    that must fail (among them a signed one with a list for iss, one with
    an infinite exp, one whose e-mail is not verified, which before got an
    internal error's -ERR, or logged in) gets the same three replies, byte
    for byte, as a token signed by a stranger; the log holds no part of
    any token, and the trace shows no SASL response.  A client that
    never answers the error challenge is ended by --login-timeout.
    """
    server, certificatePath, _ = start(
        mailgate_server, mailgate_cli, keys, tmp_path, "--debug-peer", "127.0.0.0/8", "--log-format", "json",
        "--login-timeout", "3",
    )
    port = server.portOf("POP3S")
    tokens = {
        "stranger": keys.token(key=keys.stranger),
        "not a JWT": "abc",
        "unknown user": keys.token(email="nobody@example.org"),
        "user with a NUL": keys.token(email="alice@example.org\x00"),
        "iss a list": signed(keys, json.dumps(claims(iss=[ISSUER])).encode()),
        "exp infinite": signed(keys, json.dumps(claims(exp=float("inf"))).encode()),
        "email not verified": keys.token(email_verified=False),
    }
    for mechanism, message, answer in ((b"OAUTHBEARER", oauthbearer, b"AQ=="),
                                        (b"XOAUTH2", lambda token: xoauth2(ALICE, token), b"")):
        seen = {}
        for why, token in tokens.items():
            wire = Wire(port, certificatePath)
            seen[why] = wire.exchange(mechanism, message(token), answer)
            wire.close()
        assert seen["stranger"][-1] == INVALID
        for why, replies in seen.items():
            assert replies == seen["stranger"], (mechanism, why)
    # A client that never answers the error challenge: the login timer
    # ends it (read bounded by DEADLINE, well past the 3 s).
    wire = Wire(port, certificatePath)
    assert wire.command(b"AUTH XOAUTH2") == b"+ \r\n"
    assert wire.command(base64.b64encode(xoauth2(ALICE, "abc"))).startswith(b"+ ")
    assert wire.reader.line().startswith(b"-ERR")
    with pytest.raises((EOFError, ssl.SSLError, ConnectionError)):
        wire.reader.line()
    wire.close()
    server.stop()
    log = server.stdout
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    traced = [event["trace"] for event in events if event.get("event") == "session.trace"]
    assert "<SASL response>" in traced
    assert all(not line.startswith(("AUTH OAUTHBEARER ", "AUTH XOAUTH2 ")) for line in traced)
    assert not any(event.get("level") in ("error", "critical") for event in events), log
    for token in tokens.values():
        for part in token.split("."):
            if len(part) >= 12:
                assert part[:12] not in log
                assert base64.b64encode(oauthbearer(token))[:40].decode() not in log


@sqliteOnly
def test_aKeyFileBrokenAtSighupLeavesTheKeysInService(mailgate_server, mailgate_cli, keys, tmp_path):
    """
    SIGHUP with the JWKS file now garbage: oauth2.reload_failed, and a
    token signed by the key in service still logs in.
    """
    server, certificatePath, jwks = start(mailgate_server, mailgate_cli, keys, tmp_path)
    jwks.write_text('{"keys": [{"kty": "RSA", "n": "AQAB"')
    os.kill(server.process.pid, signal.SIGHUP)
    waitFor(lambda: "oauth2.reload_failed" in server.stdout or "oauth2 keys not reloaded" in server.stdout,
            "the oauth2.reload_failed line")
    wire = Wire(server.portOf("POP3S"), certificatePath)
    assert wire.command(b"AUTH XOAUTH2") == b"+ \r\n"
    assert wire.command(base64.b64encode(xoauth2(ALICE, keys.token()))).startswith(b"+OK alice@example.org")
    wire.command(b"QUIT")
    wire.close()


@sqliteOnly
def test_aTrustedNetworkIsOfferedBothWithoutTLS(mailgate_server, mailgate_cli, keys, tmp_path):
    """
    From a --trusted-network, plain POP3 offers OAUTHBEARER and XOAUTH2 as
    it offers PLAIN, and a token logs in there.
    """
    server, _, _ = start(mailgate_server, mailgate_cli, keys, tmp_path, trusted="127.0.0.0/8")
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    assert pop.capa()["SASL"] == ["SCRAM-SHA-256", "PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"]
    assert pop._shortcmd("AUTH OAUTHBEARER") == b"+ "
    assert pop._shortcmd(base64.b64encode(oauthbearer(keys.token(), authzid="ALICE@Example.ORG")).decode()).startswith(
        b"+OK alice@example.org"
    )
    pop.quit()


@sqliteOnly
def test_theSameStaleTokenAgainIsCountedOnceAsTheSamePasswordIs(mailgate_server, mailgate_cli, keys, tmp_path):
    """
    --ban-after 3: a client sending the same expired token at each poll
    is counted once, as one sending the same old password is; it was
    counted at each try, and its address banned at the third.  Three
    different bad tokens are three failures, and ban.
    """
    server, certificatePath, _ = start(
        mailgate_server, mailgate_cli, keys, tmp_path, "--ban-after", "3", "--auth-penalty-max", "0",
        "--exempt-network", "none",
    )
    port = server.portOf("POP3S")
    now = int(time.time())
    stale = keys.token(exp=now - 3600, iat=now - 7200, nbf=None)
    for _ in range(4):
        wire = Wire(port, certificatePath)
        assert wire.exchange(b"XOAUTH2", xoauth2(ALICE, stale), b"")[-1] == INVALID
        wire.close()
    for exp in (now - 3601, now - 3602):
        wire = Wire(port, certificatePath)
        assert wire.exchange(b"XOAUTH2", xoauth2(ALICE, keys.token(exp=exp, nbf=None)), b"")[-1] == INVALID
        wire.close()
    context = ssl.create_default_context(cafile=str(certificatePath))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                             server_hostname="localhost") as sock:
        assert LineReader(sock).line() == b"-ERR [SYS/TEMP] banned\r\n"
