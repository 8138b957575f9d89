"""
OAuth 2.0 bearer tokens: the validation of JWT access tokens
(L{mailgate.auth.oauth.TokenValidator}) with tokens minted here
(C{tests/oauthtokens.py}), and POP3 AUTH OAUTHBEARER and XOAUTH2 as
clients see them, without sockets, against a real SQLite store.
"""

import base64
import json
import os
import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent

from mailgate.auth.oauth import MAX_TOKEN, InvalidToken, TokenValidator, loadSigningKeys
from mailgate.errors import ConfigurationError
from mailgate.testing import POP3Session, addUser, deliver

from oauthtokens import AUDIENCE, ISSUER, Keys, hmacToken, oauthbearer, unsignedToken, xoauth2

ALICE = "alice@example.org"
BOB = "bob@example.org"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"
REFUSED = "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
UNTRUSTED = IPv4Address("TCP", "198.51.100.7", 1234)
OAUTHBEARER_ERROR = {"status": "invalid_token", "schemes": "bearer"}
XOAUTH2_ERROR = {"status": "401", "schemes": "Bearer"}


def b64(data):
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture
def keyFiles(keys, tmp_path):
    return [str(path) for path in keys.write(tmp_path)]


@pytest.fixture
def validator(keyFiles):
    return TokenValidator(keyFiles, [ISSUER], [AUDIENCE], leeway=60)


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_aValidTokenNamesItsUser(keys, validator, alg):
    assert validator.validate(keys.token(alg=alg).encode()) == ALICE


def test_aTokenWithoutKidIsCheckedWithEveryKeyOfItsAlgorithm(keys, validator):
    assert validator.validate(keys.token(alg="RS256", kid=None).encode()) == ALICE
    # A kid the JWKS does not name: only keys without one (PEM) are tried.
    refused(validator, keys.token(alg="ES256", kid="rotated-away"), "no configured key")
    assert validator.validate(keys.token(alg="EdDSA", kid="any").encode()) == ALICE


def refused(validator, token, why):
    with pytest.raises(InvalidToken, match=why):
        validator.validate(token.encode() if isinstance(token, str) else token)


def test_expiredTokensAreRefusedBeyondTheClockSkew(keys, validator):
    now = time.time()
    refused(validator, keys.token(exp=int(now) - 120, iat=int(now) - 600, nbf=None), "expired")
    # Within the 60 seconds allowed, still taken.
    assert validator.validate(keys.token(exp=int(now) - 30, iat=int(now) - 600, nbf=None).encode()) == ALICE


def test_tokensNotYetValidAreRefused(keys, validator):
    now = int(time.time())
    refused(validator, keys.token(nbf=now + 120), "not yet valid|ImmatureSignature")
    refused(validator, keys.token(iat=now + 120, nbf=None), "in the future|ImmatureSignature")
    assert validator.validate(keys.token(nbf=now + 30, iat=now + 30).encode()) == ALICE


def test_aTokenNeedsAnExpiry(keys, validator):
    refused(validator, keys.token(exp=None), "exp")


def test_wrongIssuerOrAudienceIsRefused(keys, validator):
    refused(validator, keys.token(iss="https://evil.example/"), "issuer")
    refused(validator, keys.token(iss=ISSUER + "/"), "issuer")
    refused(validator, keys.token(iss=None), "iss")
    refused(validator, keys.token(aud="another-service"), "Audience|audience")
    refused(validator, keys.token(aud=None), "aud")
    assert validator.validate(keys.token(aud=["another-service", AUDIENCE]).encode()) == ALICE


def test_aTokenSignedWithAnotherKeyIsRefused(keys, validator):
    refused(validator, keys.token(key=keys.stranger), "no configured key")
    refused(validator, keys.token(key=keys.stranger, kid=None), "no configured key")


def test_algNoneIsRefused(keys, validator):
    claims = {"iss": ISSUER, "aud": AUDIENCE, "email": ALICE, "exp": int(time.time()) + 300}
    refused(validator, unsignedToken(**claims), "'none' not accepted")


def test_hs256WithThePublicKeyAsSecretIsRefused(keys, validator):
    claims = {"iss": ISSUER, "aud": AUDIENCE, "email": ALICE, "exp": int(time.time()) + 300}
    refused(validator, hmacToken(Keys.publicPEM(keys.rsa), **claims), "'HS256' not accepted")
    # Even a validator told HS256 is fine is not: no such algorithm is
    # configurable.
    with pytest.raises(ConfigurationError, match="HS256"):
        TokenValidator(validator._keyFiles, [ISSUER], [AUDIENCE], algorithms=["RS256", "HS256"])


def test_aKeyVerifiesOnlyItsOwnAlgorithm(keys, keyFiles):
    onlyEC = TokenValidator(keyFiles, [ISSUER], [AUDIENCE], algorithms=["ES256"])
    assert onlyEC.validate(keys.token(alg="ES256").encode()) == ALICE
    refused(onlyEC, keys.token(alg="RS256"), "'RS256' not accepted")
    # An RS256 signature claimed as ES256 with the RSA key's kid.
    token = keys.token(alg="RS256").split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "kid": "rsa-1"}).encode()).rstrip(b"=")
    refused(onlyEC, ".".join([header.decode()] + token[1:]), "no configured key|Signature")


def test_theUserClaimMustBePresent(keys, validator, keyFiles):
    refused(validator, keys.token(email=None), "no email claim")
    refused(validator, keys.token(email=""), "no email claim")
    refused(validator, keys.token(email=42), "no email claim")
    bySub = TokenValidator(keyFiles, [ISSUER], [AUDIENCE], usernameClaim="preferred_username")
    assert bySub.validate(keys.token(preferred_username="bob").encode()) == "bob"


def test_oversizeAndMalformedTokensAreRefused(keys, validator):
    refused(validator, b"x" * (MAX_TOKEN + 1), "too long")
    refused(validator, b"not.a.token", "malformed")
    refused(validator, b"", "malformed")


def test_keyFiles(keys, tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        loadSigningKeys([str(tmp_path / "missing.json")])
    secretOnly = tmp_path / "secret.json"
    secretOnly.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigurationError, match="no signing key"):
        loadSigningKeys([str(secretOnly)])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    import jwt

    private = tmp_path / "private.pem"
    private.write_bytes(keys.ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigurationError, match="not a public key"):
        loadSigningKeys([str(private)])
    # A JWK with its private part, beside a public one: refused as the PEM
    # one is, not taken for its public half.
    privateJWK = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(keys.ed))
    assert "d" in privateJWK
    jwks = tmp_path / "private.json"
    jwks.write_text(json.dumps({"keys": [json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(keys.ed.public_key())),
                                         privateJWK]}))
    with pytest.raises(ConfigurationError, match=r"key 2: a private key \(its \"d\"\)"):
        loadSigningKeys([str(jwks)])
    small = tmp_path / "small.pem"
    small.write_bytes(Keys.publicPEM(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(ConfigurationError, match="1024 bits"):
        loadSigningKeys([str(small)])
    with pytest.raises(ConfigurationError, match="needs oauth2-issuer"):
        TokenValidator([str(small)], [], [AUDIENCE])


def test_reloadReadsTheKeyFilesAgain(keys, tmp_path):
    path = tmp_path / "keys.pem"
    path.write_bytes(Keys.publicPEM(keys.stranger))
    validator = TokenValidator([str(path)], [ISSUER], [AUDIENCE])
    refused(validator, keys.token(kid=None), "no configured key")
    # The provider rotated its key: the file has the new one.
    path.write_bytes(Keys.publicPEM(keys.rsa))
    validator.reload()
    assert validator.validate(keys.token(kid=None).encode()) == ALICE
    # A file that no longer reads keeps the keys in service.
    path.write_text("garbage")
    with pytest.raises(ConfigurationError):
        validator.reload()
    assert validator.validate(keys.token(kid=None).encode()) == ALICE


# -- POP3 AUTH ------------------------------------------------------------------


@pytest.fixture
def alice(store):
    addUser(store, ALICE, "wonderland")
    deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
    return ALICE


def session(store, validator, **options):
    return POP3Session(store, tokens=validator, **options)


def auth(s, mechanism, message):
    """
    AUTH without an initial response, then the message: a token does not
    fit in a command line (RFC 5034: 255 octets), and clients (curl,
    Thunderbird) send it on a line of its own.
    """
    assert s.command(f"AUTH {mechanism}") == "+ \r\n"
    return s.command(b64(message))


def capaSASL(s):
    reply = s.command("CAPA")
    return [line for line in reply.split("\r\n") if line.startswith("SASL ")][0].split()[1:]


def errorChallenge(reply):
    assert reply.startswith("+ ") and reply.endswith("\r\n") and reply.count("\r\n") == 1, reply
    # Written as RFC 7628 section 3.2.2 and Google write it, without spaces
    # (README quotes it so): {"status":"invalid_token","schemes":"bearer"}.
    challenge = base64.b64decode(reply[2:-2])
    assert challenge == json.dumps(json.loads(challenge), separators=(",", ":")).encode("ascii"), challenge
    return json.loads(challenge)


def test_offeredOnlyWhenConfiguredAndWherePlainIs(store, alice, validator):
    assert "OAUTHBEARER" not in capaSASL(POP3Session(store))
    assert capaSASL(session(store, validator))[-4:] == ["PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"]
    s = session(store, validator, peer=UNTRUSTED)
    assert not {"OAUTHBEARER", "XOAUTH2", "PLAIN"} & set(capaSASL(s))
    assert s.command("AUTH OAUTHBEARER") == REFUSED
    assert s.command("AUTH XOAUTH2") == REFUSED
    assert "OAUTHBEARER" not in s.command("AUTH")
    s = POP3Session(store)
    assert s.command("AUTH XOAUTH2").startswith("-ERR unsupported authentication mechanism")


def test_oauthbearerLogsIn(store, alice, validator, keys, logEvents):
    s = session(store, validator)
    token = keys.token()
    assert s.command("AUTH OAUTHBEARER") == "+ \r\n"
    assert s.command(b64(oauthbearer(token))).startswith(f"+OK {ALICE} has 1 messages")
    assert s.command("STAT").startswith("+OK 1 ")
    s.command("QUIT")
    s = session(store, validator)
    reply = auth(s, "OAUTHBEARER", oauthbearer(keys.token(alg="EdDSA"), authzid="Alice@Example.org"))
    assert reply.startswith(f"+OK {ALICE}")
    texts = [str(event.get("log_format", "")) + repr(event) for event in logEvents]
    assert any("mechanism=oauthbearer" in text for text in texts)
    assert not any(token.split(".")[2][:16] in text or token.split(".")[1][:16] in text for text in texts)


def test_xoauth2LogsIn(store, alice, validator, keys):
    s = session(store, validator)
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    assert s.command(b64(xoauth2(ALICE, keys.token(alg="ES256")))).startswith(f"+OK {ALICE} has 1 messages")


def test_theDefaultRealmAppliesToTheTokensUser(store, alice, keys, keyFiles):
    validator = TokenValidator(keyFiles, [ISSUER], [AUDIENCE], usernameClaim="preferred_username")
    s = session(store, validator, defaultRealm="example.org")
    s.command("AUTH XOAUTH2")
    assert s.command(b64(xoauth2("alice", keys.token(preferred_username="Alice")))).startswith(f"+OK {ALICE}")


def failsLikeAWrongPassword(s, mechanism, message, error, answer):
    """
    The failure as the RFC and Google have it: the error challenge, the
    client's answer, then the -ERR.
    """
    assert s.command(f"AUTH {mechanism}") == "+ \r\n"
    assert errorChallenge(s.command(b64(message))) == error
    return s.command(answer)


@pytest.mark.parametrize("why", ["bad signature", "expired", "unknown user", "deleted user", "other user",
                                 "wrong audience"])
def test_oauthbearerFailures(store, alice, validator, keys, why, logEvents):
    """
    Every cause gets the same answer; the server's log alone says which
    it was (an expired token and a wrong audience are for an administrator
    to tell apart), and never any part of the token.
    """
    addUser(store, BOB, "builder")
    token, authzid = {
        "bad signature": (keys.token(key=keys.stranger), ""),
        "expired": (keys.token(exp=int(time.time()) - 3600, iat=None, nbf=None), ""),
        "unknown user": (keys.token(email="nobody@example.org"), ""),
        "deleted user": (keys.token(email=BOB), ""),
        "other user": (keys.token(), BOB),
        "wrong audience": (keys.token(aud="other"), ""),
    }[why]
    if why == "deleted user":
        store.deleteUser(BOB)
    s = session(store, validator)
    reply = failsLikeAWrongPassword(s, "OAUTHBEARER", oauthbearer(token, authzid), OAUTHBEARER_ERROR, "AQ==")
    assert reply == INVALID
    [failed] = [event for event in logEvents if event.get("event") == "auth.failed"]
    logged = formatEvent(failed)
    assert logged.startswith("pop3 authentication failed user="), logged
    assert logged.split(": ", 1)[1].startswith({
        "bad signature": "token refused: no configured key verifies the signature",
        "expired": "token refused: expired",
        "unknown user": "no such user 'nobody@example.org'",
        "deleted user": f"no such user {BOB!r}",
        "other user": f"the name given is not the token's user {ALICE!r}",
        "wrong audience": "token refused: InvalidAudienceError: ",
    }[why]), logged
    assert not any(part[:16] in logged for part in token.split("."))
    # The session is still usable, and its next login works.
    assert auth(s, "OAUTHBEARER", oauthbearer(keys.token())).startswith(f"+OK {ALICE}")


@pytest.mark.parametrize("user", ["bob@example.org", "nobody@example.org"])
def test_xoauth2FailsForAnotherUsersName(store, alice, validator, keys, user):
    addUser(store, BOB, "builder")
    s = session(store, validator)
    assert failsLikeAWrongPassword(s, "XOAUTH2", xoauth2(user, keys.token()), XOAUTH2_ERROR, "") == INVALID


def test_xoauth2BadTokenAfterTheFailureDelay(store, alice, validator, keys):
    s = session(store, validator, authFailureDelay=5)
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    assert s.command(b64(xoauth2(ALICE, keys.token(key=keys.stranger)))) == ""
    assert s.advance(4.9) == b""
    assert errorChallenge(s.advance(0.1).decode()) == XOAUTH2_ERROR
    assert s.command("") == INVALID


def test_failuresCountTowardsTheLimitAndThePenalty(store, alice, validator, keys):
    s = session(store, validator, peer=IPv4Address("TCP", "127.0.0.1", 1))
    failed = []
    s.factory.policy.authenticationFailed = lambda peer, login, password=None: failed.append(login)
    bad = oauthbearer(keys.token(key=keys.stranger))
    for _ in range(2):
        assert auth(s, "OAUTHBEARER", bad).startswith("+ ")
        assert s.command("AQ==") == INVALID
    assert auth(s, "OAUTHBEARER", bad).startswith("+ ")
    assert s.command("AQ==") == INVALID + "-ERR too many failed logins; closing the connection\r\n"
    assert s.disconnected
    assert len(failed) == 3


def test_malformedMessagesAreRefusedAtOnce(store, alice, validator, keys):
    s = session(store, validator)
    token = keys.token()
    for message in (
        f"p=tls-unique,,\x01auth=Bearer {token}\x01\x01".encode(),
        f"n,,auth=Bearer {token}\x01\x01".encode(),
        b"n,,\x01host=x\x01\x01",
        f"n,,\x01auth=Basic {token}\x01\x01".encode(),
        f"n,,\x01auth=Bearer {token}\x01".encode(),
    ):
        assert auth(s, "OAUTHBEARER", message).startswith("-ERR [AUTH] "), message
    for message in (f"auth=Bearer {token}\x01\x01".encode(), f"user={ALICE}\x01auth=Bearer {token}".encode()):
        assert auth(s, "XOAUTH2", message).startswith("-ERR [AUTH] "), message
    # An initial response is taken where it fits in the command line.
    assert s.command("AUTH XOAUTH2 " + b64(xoauth2(ALICE, "short"))).startswith("+ ")
    assert s.command("") == INVALID


def test_aTokenOnTheAuthLineLogsIn(store, alice, validator, keys):
    """
    A bearer token sent as the initial response, on the AUTH line, as
    Jakarta (Angus) Mail and FairEmail send XOAUTH2 unless told to use
    two lines: taken up to the mechanism's own limit (Dovecot and Gmail
    take it); it was refused as a command line over 255 octets, and the
    client never logged in.
    """
    s = session(store, validator)
    assert s.command("AUTH XOAUTH2 " + b64(xoauth2(ALICE, keys.token()))).startswith(f"+OK {ALICE} has 1 ")
    assert s.command("QUIT").startswith("+OK")
    s = session(store, validator)
    assert s.command("AUTH OAUTHBEARER " + b64(oauthbearer(keys.token()))).startswith(f"+OK {ALICE} has 1 ")
    assert s.command("QUIT").startswith("+OK")
    s = session(store, validator)
    assert errorChallenge(s.command("AUTH XOAUTH2 " + b64(xoauth2(ALICE, "x" * MAX_TOKEN)))) == XOAUTH2_ERROR
    assert s.command("") == INVALID
    assert s.command("AUTH XOAUTH2 " + b64(xoauth2(ALICE, "x" * (MAX_TOKEN + 600)))) == (
        "-ERR [AUTH] SASL response too long\r\n"
    )
    # Where plaintext is refused, the token is refused as PLAIN would be.
    s = session(store, validator, peer=UNTRUSTED)
    assert s.command("AUTH XOAUTH2 " + b64(xoauth2(ALICE, keys.token()))) == REFUSED


def test_aTokenLongerThanTheLimitIsRefused(store, alice, validator, keys):
    s = session(store, validator)
    # A long token (8 KiB) takes a line longer than other SASL responses...
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    long = "x" * MAX_TOKEN
    assert errorChallenge(s.command(b64(xoauth2(ALICE, long)))) == XOAUTH2_ERROR
    assert s.command("") == INVALID
    # ... and a longer one is refused as too long.
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    reply = s.command(b64(xoauth2(ALICE, "x" * (MAX_TOKEN + 600))))
    assert reply == "-ERR [AUTH] SASL response too long\r\n"
    assert s.command("AUTH XOAUTH2") == "+ \r\n"
    reply = s.command(b64(xoauth2(ALICE, "x" * (MAX_TOKEN + 1))))
    assert reply == "-ERR [AUTH] token too long\r\n"


# -- configuration ------------------------------------------------------------------


def test_theSettingsAreCheckedTogether(keyFiles):
    from mailgate.config import MailgateConfig, checkConfig
    from mailgate.service import checkStartable, makeTokenValidator

    assert makeTokenValidator(MailgateConfig()) is None
    with pytest.raises(ConfigurationError, match="needs oauth2-issuer and oauth2-audience"):
        checkConfig(MailgateConfig(oauth2Keys=keyFiles, oauth2Issuers=[ISSUER]))
    with pytest.raises(ConfigurationError, match="go with oauth2-keys"):
        checkConfig(MailgateConfig(oauth2Issuers=[ISSUER], oauth2Audiences=[AUDIENCE]))
    # What a start (and mailgate config --check, and a reload) refuses.
    config = MailgateConfig(oauth2Keys=["/nonexistent.json"], oauth2Issuers=[ISSUER], oauth2Audiences=[AUDIENCE])
    with pytest.raises(ConfigurationError, match="oauth2-keys: cannot read /nonexistent.json"):
        checkStartable(config)
    config = MailgateConfig(oauth2Keys=keyFiles, oauth2Issuers=[ISSUER], oauth2Audiences=[AUDIENCE],
                            oauth2Algorithms=["ES256"], oauth2UsernameClaim="sub")
    validator = makeTokenValidator(config)
    assert validator._algorithms == ("ES256",) and validator._claim == "sub" and len(validator.keys) == 3


def test_algorithmsAreReadInAnyCase():
    from mailgate.tap import Options

    options = Options()
    options.parseOptions(["--oauth2-algorithm", "eddsa", "--oauth2-algorithm", "rs256"])
    assert options.config.oauth2Algorithms == ["EdDSA", "RS256"]
    with pytest.raises(Exception, match="HS256"):
        Options().parseOptions(["--oauth2-algorithm", "HS256"])


def test_keysThatVerifyNoAcceptedAlgorithmAreRefused(keys, tmp_path):
    """
    Key files none of whose keys verifies any accepted algorithm (an RSA
    key with only ES256 and EdDSA accepted) are refused at the start and at
    a reload, as other bad settings are: every login would have failed,
    the reason in the log alone.  A reload keeps the keys in service.
    """
    path = tmp_path / "keys.pem"
    path.write_bytes(Keys.publicPEM(keys.rsa))
    refusal = r"no key in .* verifies any oauth2-algorithm accepted \(ES256, EdDSA\)"
    with pytest.raises(ConfigurationError, match=refusal):
        TokenValidator([str(path)], [ISSUER], [AUDIENCE], algorithms=["ES256", "EdDSA"])
    validator = TokenValidator([str(path)], [ISSUER], [AUDIENCE], algorithms=["RS256", "ES256"])
    assert validator.validate(keys.token(kid=None).encode()) == ALICE
    path.write_bytes(Keys.publicPEM(keys.ed))
    with pytest.raises(ConfigurationError, match="verifies any oauth2-algorithm"):
        validator.reload()
    assert validator.validate(keys.token(kid=None).encode()) == ALICE


# -- the key files' permissions ---------------------------------------------------


def test_aKeyFileOthersMayReplaceIsWarnedOfAtTheStartAndAtEachReload(keyFiles, tmp_path):
    """
    An oauth2-keys file others than its owner may write is warned of
    (C{oauth2.key_permissions}), at the start and after each reload, as a
    TLS private key others may replace is: its keys are public, but
    whoever may write it may put a key of their own in it and, from the
    next reload (logrotate's SIGHUP), sign tokens that log in as any
    user.  Every user may read it all the same.
    """
    from twisted.logger import Logger

    from mailgate.reload import reloadTokenKeys
    from mailgate.service import MailgateConfig, makeService

    from iterated import IteratedReactor

    jwks, pem = keyFiles
    os.chmod(jwks, 0o666)
    os.chmod(pem, 0o644)
    config = MailgateConfig(
        database=f"sqlite:///{tmp_path}/mail.sqlite3", pop3=["tcp:0:interface=127.0.0.1"],
        oauth2Keys=keyFiles, oauth2Issuers=[ISSUER], oauth2Audiences=[AUDIENCE],
    )
    reactor = IteratedReactor()
    try:
        service = makeService(config, reactor=reactor)
        service.store.engine.releaseServer()
    finally:
        reactor.close()
    warning = (
        f"the OAuth 2.0 key file {jwks} may be replaced by others than its owner (mode 0666), "
        "who could put a key of their own in it and log in as any user: chmod go-w it"
    )
    assert [text for event, text in service.startupWarnings if event == "oauth2.key_permissions"] == [warning]

    events = []
    log = Logger(observer=events.append)
    assert reloadTokenKeys(service.tokens, log) is None
    assert [formatEvent(e) for e in events if e["event"] == "oauth2.key_permissions"] == [warning]
    os.chmod(jwks, 0o620)
    del events[:]
    reloadTokenKeys(service.tokens, log)
    assert [formatEvent(e) for e in events if e["event"] == "oauth2.key_permissions"] == [
        warning.replace("0666", "0620")
    ]
    # Made right: nothing more is said.
    os.chmod(jwks, 0o644)
    del events[:]
    reloadTokenKeys(service.tokens, log)
    assert [e for e in events if e["event"] == "oauth2.key_permissions"] == []
