"""
Master users' logins to other users' maildrops (Dovecot's master users),
over the POP3 protocol without sockets: USER user*master, AUTH PLAIN with
an authorisation identity, AUTH LOGIN; refusals that look like any
failed login; the user's own restrictions; what the log says.
"""

import base64

import pytest
from twisted.internet.task import Clock

from mailgate.auth.passwords import makeCredentials
from mailgate.testing import POP3Session, TEST_HASH_COST, addUser, deliver, memoryStore, pop3Factory, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"


def _addMaster(store, name, password):
    resultOf(store.addMasterUser(name, makeCredentials(password, logN=TEST_HASH_COST).passwordHash))


@pytest.fixture
def store():
    store = memoryStore()
    addUser(store, ALICE, "alice-pw")
    addUser(store, BOB, "bob-pw")
    deliver(store, [ALICE], b"Subject: one\r\n\r\nfor alice\r\n")
    deliver(store, [ALICE], b"Subject: two\r\n\r\nfor alice again\r\n")
    _addMaster(store, "admin", "admin-pw")
    return store


#: where plaintext logins are allowed in these tests: loopback and the
#: documentation network the allowed-networks tests log in from
TRUSTED = ("127.0.0.0/8", "192.0.2.0/24")


def _session(store, **options):
    options.setdefault("apop", False)
    options.setdefault("trustedNetworks", TRUSTED)
    return POP3Session(store, masterUsers=True, masterUserSeparator="*", **options)


def _plain(authzid, authcid, password):
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def _events(logEvents, name):
    return [e for e in logEvents if e.get("event") == name]


def test_userWithSeparatorLogsInToTheUsersMaildropWithTheMastersPassword(store, logEvents):
    session = _session(store)
    assert session.login(f"{ALICE}*admin", "admin-pw").startswith(f"+OK {ALICE} has 2 messages (")
    assert session.command("RETR 1").endswith("for alice\r\n.\r\n")
    [login] = _events(logEvents, "pop3.login")
    assert login["user"] == ALICE and login["master"] == "admin"
    assert login["line"].startswith(f"pop3 login user={ALICE} master=admin peer=")


def test_theMastersNameIsReadWithoutRegardToCase(store):
    session = _session(store)
    assert session.login(f"{ALICE}*Admin", "admin-pw").startswith(f"+OK {ALICE} has 2 messages")


def test_plainWithAnAuthorisationIdentityIsAMasterLogin(store):
    session = _session(store)
    reply = session.command("AUTH PLAIN " + _plain(ALICE, "admin", "admin-pw"))
    assert reply.startswith(f"+OK {ALICE} has 2 messages")


def test_loginMechanismTakesTheSeparator(store):
    session = _session(store)
    assert session.command("AUTH LOGIN") == "+ " + base64.b64encode(b"Username:").decode() + "\r\n"
    session.command(base64.b64encode(f"{BOB}*admin".encode()).decode())
    reply = session.command(base64.b64encode(b"admin-pw").decode())
    assert reply.startswith(f"+OK {BOB} has 0 messages")


@pytest.mark.parametrize(
    "name, password",
    [
        (f"{ALICE}*admin", "wrong"),  # the master's password wrong
        (f"{ALICE}*nobody", "admin-pw"),  # no such master user
        (f"{ALICE}*bad name!", "admin-pw"),  # no master user's name at all
        ("carol@example.org*admin", "admin-pw"),  # no such user
        (f"{ALICE}*admin", "alice-pw"),  # the user's own password is not the master's
    ],
)
def test_everyRefusedMasterLoginLooksLikeAWrongPassword(store, name, password):
    own = _session(store).login(ALICE, "wrong")
    assert _session(store).login(name, password) == own
    assert own.startswith("-ERR [AUTH]")


def test_theMastersPasswordIsNotTheUsers(store):
    assert _session(store).login(ALICE, "admin-pw").startswith("-ERR [AUTH]")
    assert _session(store).login("admin", "admin-pw").startswith("-ERR [AUTH]")


def test_withoutMasterUsersPlainRefusesAnotherIdentityAtOnce(store):
    session = POP3Session(store, apop=False)
    reply = session.command("AUTH PLAIN " + _plain(ALICE, "admin", "admin-pw"))
    assert reply == "-ERR [AUTH] authorising as another user is not supported\r\n"


def test_withoutASeparatorTheNameIsTheUsersOwn(store):
    session = POP3Session(store, apop=False, masterUsers=True)
    assert session.login(f"{ALICE}*admin", "admin-pw").startswith("-ERR [AUTH]")
    # PLAIN's authorisation identity still works.
    session = POP3Session(store, apop=False, masterUsers=True)
    assert session.command("AUTH PLAIN " + _plain(ALICE, "admin", "admin-pw")).startswith("+OK")


def test_aUserWhoseLocalPartHoldsTheSeparatorLogsInAsThemselvesWithoutIt(store):
    addUser(store, "a*b@example.org", "ab-pw")
    own = POP3Session(store, apop=False)
    assert own.login("a*b@example.org", "ab-pw").startswith("+OK")
    own.command("QUIT")
    # With the separator, the name is cut at the last one: a master login.
    master = _session(store)
    assert master.login("a*b@example.org*admin", "admin-pw").startswith("+OK a*b@example.org has 0")
    master.command("QUIT")
    # The user's own login with the separator set: the * inside the local
    # part cuts nothing (it was taken for the master user b@example.org,
    # and the user's right password refused).
    own = _session(store)
    assert own.login("a*b@example.org", "ab-pw").startswith("+OK a*b@example.org has 0")
    own.command("QUIT")
    assert _session(store).login("a*b@example.org", "admin-pw").startswith("-ERR [AUTH]")


def _sessions(store):
    """
    Sessions of one factory (one credential cache), on one clock.
    """
    clock = Clock()
    factory = pop3Factory(store, clock, apop=False, masterUsers=True, masterUserSeparator="*")
    return lambda: POP3Session(store, clock=clock, factory=factory)


def test_aNewMasterPasswordRefusesTheOldOneAtOnceThoughRemembered(store):
    session = _sessions(store)
    first = session()
    assert first.login(f"{ALICE}*admin", "admin-pw").startswith("+OK")
    first.command("QUIT")
    resultOf(store.setMasterUserPassword("admin", makeCredentials("new-pw", logN=TEST_HASH_COST).passwordHash))
    assert session().login(f"{ALICE}*admin", "admin-pw").startswith("-ERR [AUTH]")
    assert session().login(f"{ALICE}*admin", "new-pw").startswith("+OK")


def test_aRemovedMasterUserIsRefusedThoughRemembered(store):
    session = _sessions(store)
    first = session()
    assert first.login(f"{ALICE}*admin", "admin-pw").startswith("+OK")
    first.command("QUIT")
    resultOf(store.removeMasterUser("admin"))
    assert session().login(f"{ALICE}*admin", "admin-pw").startswith("-ERR [AUTH]")


def test_aMasterUserOnlyFromItsNetworks(store, logEvents):
    from twisted.internet.address import IPv4Address

    resultOf(store.setMasterUserNetworks("admin", "192.0.2.0/24"))
    wrong = _session(store).login(ALICE, "wrong")
    assert _session(store).login(f"{ALICE}*admin", "admin-pw") == wrong
    [failed] = [e for e in _events(logEvents, "auth.failed") if e.get("master")]
    assert failed["reason"] == "network"
    assert failed["line"].endswith(
        ": the client's address is not on the master user's allowed networks (master user admin)"
    )
    inside = _session(store, peer=IPv4Address("TCP", "192.0.2.7", 40000))
    assert inside.login(f"{ALICE}*admin", "admin-pw").startswith("+OK")
    inside.command("QUIT")
    # Lifted, from anywhere.
    resultOf(store.setMasterUserNetworks("admin", None))
    assert _session(store).login(f"{ALICE}*admin", "admin-pw").startswith("+OK")


def test_theMastersNetworksAreItsOwnNotTheUsers(store):
    from twisted.internet.address import IPv4Address

    # Alice may log in from loopback only; her master user's login to her
    # maildrop is held to her networks as well as to its own.
    resultOf(store.setAllowedNetworks(ALICE, "127.0.0.0/8"))
    resultOf(store.setMasterUserNetworks("admin", "192.0.2.0/24"))
    wrong = _session(store).login(ALICE, "wrong")
    assert _session(store, peer=IPv4Address("TCP", "192.0.2.7", 40000)).login(f"{ALICE}*admin", "admin-pw") == wrong
    assert _session(store).login(f"{ALICE}*admin", "admin-pw") == wrong
    assert _session(store, peer=IPv4Address("TCP", "192.0.2.7", 40000)).login(f"{BOB}*admin", "admin-pw").startswith(
        "+OK"
    )


def test_aDisabledUserIsRefusedToTheMasterToo(store):
    resultOf(store.disableUser(ALICE, "left the company"))
    reply = _session(store).login(f"{ALICE}*admin", "admin-pw")
    assert reply == "-ERR [AUTH] left the company\r\n"


def test_theUsersLockHolds(store):
    own = _session(store)
    assert own.login(ALICE, "alice-pw").startswith("+OK")
    assert _session(store).login(f"{ALICE}*admin", "admin-pw").startswith("-ERR [IN-USE]")


def test_scramStillRefusesAnotherIdentity(store):
    session = _session(store)
    first = base64.b64encode(f"n,a={ALICE},n=admin,r=abcdefghijkl".encode()).decode()
    assert session.command("AUTH SCRAM-SHA-256 " + first) == (
        "-ERR [AUTH] authorising as another user is not supported\r\n"
    )


def test_everyLineOfTheSessionNamesTheMasterUser(store, logEvents):
    session = _session(store)
    session.login(f"{ALICE}*admin", "admin-pw")
    session.command("DELE 1")
    session.command("QUIT")
    [login] = _events(logEvents, "pop3.login")
    [logout] = _events(logEvents, "pop3.logout")
    for event in (login, logout):
        assert event["user"] == ALICE and event["master"] == "admin"
    assert logout["line"].startswith(f"pop3 logout user={ALICE} master=admin peer=")


def test_aFailedMasterLoginIsLoggedWithTheMastersName(store, logEvents):
    _session(store).login(f"{ALICE}*admin", "wrong")
    [failed] = _events(logEvents, "auth.failed")
    assert failed["master"] == "admin" and failed["reason"] == "failed"
    assert failed["line"].endswith("(master user admin)")
    assert "wrong" not in failed["line"]


def test_aUsersOwnLoginNamesNoMaster(store, logEvents):
    session = _session(store)
    session.login(ALICE, "alice-pw")
    session.command("QUIT")
    for event in _events(logEvents, "pop3.login") + _events(logEvents, "pop3.logout"):
        assert "master" not in event


# -- the settings ----------------------------------------------------------------


def test_theOptionsOnTheCommandLine():
    from test_tap import parse

    options = parse("--master-users", "--master-user-separator", "*")
    assert (options["master-users"], options["master-user-separator"]) == (True, "*")
    assert (parse()["master-users"], parse()["master-user-separator"]) == (False, None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--master-users", "--master-user-separator", "a"), "must be one of"),
        (("--master-users", "--master-user-separator", "**"), "must be one of"),
        (("--master-users", "--master-user-separator", "@"), "must be one of"),
    ],
)
def test_aSeparatorThatCannotWorkIsRefusedAtStart(argv, message):
    from twisted.python import usage

    from test_tap import parse

    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_theOptionsInTheConfigurationFile(tmp_path):
    from mailgate.config import MailgateConfig, checkConfig
    from mailgate.service import masterLogins

    assert not masterLogins(checkConfig(MailgateConfig()))
    assert masterLogins(checkConfig(MailgateConfig(masterUserSeparator="*")))

    from mailgate.tap import ConfigurationRefused
    from test_tap import parse

    path = tmp_path / "mailgate.toml"
    path.write_text('master-users = true\nmaster-user-separator = "%"\n')
    options = parse("--config", str(path))
    assert (options["master-users"], options["master-user-separator"]) == (True, "%")
    path.write_text('master-user-separator = "a"\n')
    with pytest.raises(ConfigurationRefused, match="key 'master-user-separator': must be one of"):
        parse("--config", str(path))


def test_masterUsersFalseBesideASeparatorIsWarnedOf(tmp_path, logEvents):
    """
    A separator turns master logins on by itself: C{master-users = false}
    beside one (an administrator turning master logins off who left the
    separator's line) left them on, and the reload that wrote it said
    "master-users takes effect at the next restart".  The start and each
    reload warn that master users log in all the same
    (C{config.master_users_on}); the separator alone, C{true} beside it,
    or C{false} alone say nothing.
    """
    from twisted.logger import formatEvent

    from mailgate.service import makeService, masterLogins
    from mailgate.tap import Options

    path = tmp_path / "mailgate.toml"
    path.write_text('master-users = true\nmaster-user-separator = "*"\n')
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert options.masterUsersWarning() is None
    root = makeService(options.toConfig(), reactor=Clock(), store=memoryStore())
    root.configSource = options.reread
    path.write_text('master-users = false\nmaster-user-separator = "*"\n')
    warning = (
        f"master-users = false in {path}, but master-user-separator is set, which turns master logins on "
        "by itself: master users log in all the same; remove master-user-separator to turn them off"
    )
    assert options.masterUsersWarning() == warning
    root.hangup()
    assert [formatEvent(e) for e in logEvents if e.get("event") == "config.master_users_on"] == [warning]
    # As the start sees it: on, whatever false said.
    assert masterLogins(options.reread())
    for text in ('master-user-separator = "*"\n', "master-users = false\n"):
        path.write_text(text)
        assert options.masterUsersWarning() is None
    # The separator on the command line, false in the file: the same.
    options = Options()
    options.parseOptions(["--config", str(path), "--master-user-separator", "%"])
    assert options.masterUsersWarning() == warning
