"""
A reload (SIGHUP) of one real C{twistd -n mailgate --config FILE} with
OAuth 2.0 on before and after it: the changed oauth2-* settings (the key
files, issuers, audiences, algorithms, clock-skew allowance, user claim)
apply to the logins after it, validated first as a start validates them
(a value a start refuses is refused, and the settings in service stay
whole), then swapped in at once.  A SASL exchange begun before the reload
is judged by the settings in service when its token comes.  Turning OAuth
on or off still waits for a restart (it changes what CAPA offers and the
portal's checkers).  Clients are poplib's, sending AUTH OAUTHBEARER and
XOAUTH2 themselves; every wait is bounded (L{e2e.DEADLINE}).
"""

import base64
import json
import poplib
import time

import pytest
from oauthtokens import AUDIENCE, ISSUER, Keys, oauthbearer, xoauth2
from test_reload_matrix import ConfiguredServer as MatrixServer

from tests.e2e import DEADLINE, AdminCommand

ALICE = "alice@example.org"
OTHER_ISSUER = "https://login.example.test/realms/other"

CONFIG = """\
database = "sqlite:///{tmp}/mail.sqlite3"
pop3 = ["tcp:0:interface=127.0.0.1"]
trusted-network = ["127.0.0.0/8"]
log-format = "json"
auth-failure-delay = 0.05
"""

OAUTH = """\
oauth2-keys = ["{tmp}/jwks.json"]
oauth2-issuer = ["{issuer}"]
oauth2-audience = ["{audience}"]
"""


class ConfiguredServer(MatrixServer):
    """
    A server whose settings all come from its configuration file, POP3
    alone.
    """

    def __init__(self, configPath, cwd):
        super().__init__(configPath, cwd, expect={"POP3": 1})


@pytest.fixture(scope="module")
def keys():
    return Keys()


@pytest.fixture
def served(tmp_path, keys):
    """
    A configured server with OAuth on (issuer L{ISSUER}, audience
    C{mailgate}) and Alice; C{(server, write)}, C{write(oauth=...)} writing
    the file with other OAuth lines (C{""}: OAuth off).
    """
    keys.write(tmp_path)
    path = tmp_path / "mailgate.toml"

    def write(oauth=OAUTH, issuer=ISSUER, audience=AUDIENCE, more=""):
        path.write_text((CONFIG + oauth).format(tmp=tmp_path, issuer=issuer, audience=audience) + more)

    write()
    AdminCommand(f"sqlite:///{tmp_path}/mail.sqlite3").addUser(ALICE, "wonder land")
    server = ConfiguredServer(path, tmp_path)
    server.start()
    try:
        yield server, write
    finally:
        server.stop()


def client(server):
    return poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)


def close(pop):
    """
    QUIT (a session logged in unlocks its maildrop for the next), or just
    close one the server ended.
    """
    try:
        pop.quit()
    except (poplib.error_proto, OSError):
        pop.close()


def answer(pop, mechanism, message):
    """
    Send C{message} (the SASL response of an exchange begun), answer the
    error challenge if one comes; the last reply, C{+OK ...} or C{-ERR ...}.
    """
    try:
        reply = pop._shortcmd(base64.b64encode(message).decode("ascii"))
        if reply.startswith(b"+ "):
            # The error challenge: OAUTHBEARER's client answers ^A,
            # XOAUTH2's an empty line, before the -ERR.
            reply = pop._shortcmd("AQ==" if mechanism == "OAUTHBEARER" else "")
    except poplib.error_proto as e:
        return e.args[0]
    return reply


def begin(pop, mechanism):
    assert pop._shortcmd(f"AUTH {mechanism}").startswith(b"+")


def login(server, token, mechanism="OAUTHBEARER"):
    """
    A new session's AUTH with C{token} for Alice: the server's last reply.
    """
    pop = client(server)
    try:
        begin(pop, mechanism)
        reply = answer(pop, mechanism, oauthbearer(token) if mechanism == "OAUTHBEARER" else xoauth2(ALICE, token))
    finally:
        close(pop)
    return reply


def loggedIn(reply):
    return reply.startswith(b"+OK alice@example.org")


REFUSED = b"-ERR [AUTH] invalid user name or password"


def test_aChangedAudienceAppliesToTheLoginsAfterTheReload(served, keys):
    """
    oauth2-audience changed from mailgate to webmail: the reload says it
    applied it, nothing waits for a restart; a token for webmail then logs
    in (OAUTHBEARER and XOAUTH2), one for mailgate is refused.  Exchanges
    begun before the reload are judged by the audience in service when
    their token comes: webmail's in, mailgate's out.  OAuth then turned
    off waits for a restart: still offered, webmail's token still in.
    """
    server, write = served
    assert loggedIn(login(server, keys.token()))
    assert login(server, keys.token(aud="webmail")) == REFUSED
    begunNew, begunOld = client(server), client(server)
    begin(begunNew, "OAUTHBEARER")
    begin(begunOld, "XOAUTH2")
    try:
        write(audience="webmail")
        reloaded = server.reload()
        assert reloaded is not None, server.log()
        assert reloaded["applied"] == ["oauth2-audience"]
        assert server.events("config.restart_needed") == []
        assert loggedIn(answer(begunNew, "OAUTHBEARER", oauthbearer(keys.token(aud="webmail"))))
        assert answer(begunOld, "XOAUTH2", xoauth2(ALICE, keys.token())) == REFUSED
    finally:
        for pop in (begunNew, begunOld):
            close(pop)
    for mechanism in ("OAUTHBEARER", "XOAUTH2"):
        assert loggedIn(login(server, keys.token(aud="webmail"), mechanism))
        assert login(server, keys.token(), mechanism) == REFUSED

    write(oauth="")
    reloaded = server.reload()
    assert reloaded is not None and reloaded["applied"] == []
    [later] = server.events("config.restart_needed")
    assert sorted(later["settings"]) == ["oauth2-audience", "oauth2-issuer", "oauth2-keys"]
    pop = client(server)
    try:
        assert "OAUTHBEARER" in pop.capa()["SASL"]
    finally:
        pop.quit()
    assert loggedIn(login(server, keys.token(aud="webmail")))


def test_eachValidationSettingApplies(served, keys):
    """
    Another issuer, ES256 alone, 600 seconds of clock skew and the
    preferred_username claim, in one reload: a token that fits them all
    (not valid for another five minutes) logs in, refused before it; a
    token off in any one of them is refused.
    """
    server, write = served
    now = int(time.time())

    def token(**claims):
        fits = {"alg": "ES256", "iss": OTHER_ISSUER, "email": None, "preferred_username": ALICE, "nbf": now + 300}
        return keys.token(**{**fits, **claims})

    assert login(server, token()) == REFUSED
    write(issuer=OTHER_ISSUER, more='oauth2-algorithm = ["ES256"]\noauth2-clock-skew = 600\n'
          'oauth2-username-claim = "preferred_username"\n')
    reloaded = server.reload()
    assert reloaded is not None, server.log()
    assert sorted(reloaded["applied"]) == [
        "oauth2-algorithm", "oauth2-clock-skew", "oauth2-issuer", "oauth2-username-claim",
    ]
    assert loggedIn(login(server, token()))
    assert loggedIn(login(server, token(), "XOAUTH2"))
    offInOne = {
        "RS256": token(alg="RS256"),
        "the old issuer": token(iss=ISSUER),
        "email, not preferred_username": token(email=ALICE, preferred_username=None),
        "valid in 15 minutes": token(nbf=now + 900),
    }
    for why, refused in offInOne.items():
        assert login(server, refused) == REFUSED, why
    assert server.events("config.restart_needed") == []


def test_aValueAStartRefusesIsRefusedAndTheOldSettingsStayWhole(served, keys, tmp_path):
    """
    A new audience with a key file that is not there, then with an
    algorithm no key verifies (ES384): each reload is refused, with the
    reason, and the settings in service stay whole (mailgate's audience
    in, webmail's out).  The file put right (webmail, another key file),
    the old one removed, both apply, and the reload does not fail on the
    old file: a webmail token signed by the new key logs in; the old
    key's and the old audience's are refused.
    """
    server, write = served
    newKey = tmp_path / "new.pem"
    newKey.write_bytes(Keys.publicPEM(keys.stranger))
    for oauth, reason in (
        (OAUTH.replace("jwks.json", "missing.json"), "cannot read"),
        (OAUTH + 'oauth2-algorithm = ["ES384"]\n', "verifies any oauth2-algorithm"),
    ):
        write(oauth=oauth, audience="webmail")
        assert server.reload() is None
        assert reason in server.events("config.reload_failed")[-1]["text"], server.log()
        assert loggedIn(login(server, keys.token()))
        assert login(server, keys.token(aud="webmail")) == REFUSED

    # The provider's new key file in, the old one removed, in one reload.
    write(oauth=OAUTH.replace("jwks.json", "new.pem"), audience="webmail")
    (tmp_path / "jwks.json").unlink()
    reloaded = server.reload()
    assert reloaded is not None, server.log()
    assert sorted(reloaded["applied"]) == ["oauth2-audience", "oauth2-keys"]
    # Nothing failed: the old file, no longer named, is not read.
    assert server.events("oauth2.reload_failed") == [], server.log()
    assert loggedIn(login(server, keys.token(aud="webmail", key=keys.stranger, kid=None)))
    assert login(server, keys.token(aud="webmail")) == REFUSED
    assert login(server, keys.token(key=keys.stranger, kid=None)) == REFUSED
    # The next SIGHUP reads the new key file again.
    reloaded = server.reload()
    assert reloaded is not None and reloaded["applied"] == []
    assert server.events("oauth2.reload_failed") == []
    assert server.events("oauth2.reloaded")[-1]["count"] == 1
    assert loggedIn(login(server, keys.token(aud="webmail", key=keys.stranger, kid=None)))


def test_adoptTakesEverySettingAtOnce(tmp_path, keys):
    """
    L{TokenValidator.adopt}, without a server: the validator in service
    (the one the portal's checker holds) judges the next token by the
    other's key files, keys, issuer, audience, algorithms, clock skew and
    user claim, all of them; its key files are the other's at the next
    SIGHUP's reading.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mailgate.auth.oauth import InvalidToken, TokenValidator

    jwks, pem = keys.write(tmp_path)
    now = 1_800_000_000
    inService = TokenValidator([jwks], [ISSUER], [AUDIENCE], clock=lambda: now)
    other = TokenValidator([pem], [OTHER_ISSUER], ["webmail"], ["EdDSA"], leeway=600,
                           usernameClaim="preferred_username")
    fits = {"alg": "EdDSA", "iss": OTHER_ISSUER, "aud": "webmail", "email": None, "preferred_username": ALICE,
            "nbf": now + 300, "now": now}
    with pytest.raises(InvalidToken):
        inService.validate(keys.token(**fits).encode())
    inService.adopt(other)
    assert inService.validate(keys.token(**fits).encode()) == ALICE
    for off in ({"alg": "RS256"}, {"iss": ISSUER}, {"aud": AUDIENCE}, {"nbf": now + 900},
                {"email": ALICE, "preferred_username": None}):
        with pytest.raises(InvalidToken):
            inService.validate(keys.token(**{**fits, **off}).encode())
    rotated = ed25519.Ed25519PrivateKey.generate()
    pem.write_bytes(Keys.publicPEM(rotated))
    inService.reload()
    assert [k.key.public_bytes_raw() for k in inService.keys] == [rotated.public_key().public_bytes_raw()]
