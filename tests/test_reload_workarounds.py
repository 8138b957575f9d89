"""
A reload (SIGHUP) and C{pop3-client-workarounds}: applied to the POP3
sessions opened after it, as Dovecot's reload applies its settings to new
connections; a session under way keeps the workarounds it began with; a
file naming an unknown workaround is refused whole, as a start refuses it.
"""

import poplib

from twisted.logger import formatEvent

from mailgate.testing import addUser, deliver, memoryStore
from test_reload_matrix import ConfiguredServer
from test_service import _reloadableService
from tests.e2e import DEADLINE, databaseURL

BOTH = ("outlook-no-nuls", "oe-ns-eoh")
#: a header with a NUL and no end
MESSAGE = b"Subject: a \0 in it\r\n"


def test_aReloadGivesTheWorkaroundsToTheSessionsAfterIt(tmp_path, logEvents):
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(path, 'pop3 = ["tcp:1110"]\n')
    factory = root.listeners["POP3"][0].factory
    before = factory.buildProtocol(None)
    assert before.clientWorkarounds == ()

    def said(event):
        return [formatEvent(e) for e in logEvents if e.get("event") == event]

    path.write_text('pop3 = ["tcp:1110"]\npop3-client-workarounds = "oe-ns-eoh, outlook-no-nuls"\n')
    root.hangup()
    assert said("config.reloaded") == ["configuration reloaded: applied pop3-client-workarounds"]
    assert said("config.restart_needed") == []
    assert factory.buildProtocol(None).clientWorkarounds == BOTH
    assert before.clientWorkarounds == ()

    # A name a start refuses: the whole file is refused, the workarounds
    # in service stay.
    path.write_text(
        'pop3 = ["tcp:1110"]\npop3-client-workarounds = "outlook-no-nuls delay-newmail"\nidle-timeout = 900\n'
    )
    root.hangup()
    [failed] = said("config.reload_failed")
    assert "unknown POP3 client workaround 'delay-newmail' (known: outlook-no-nuls, oe-ns-eoh)" in failed
    assert factory.buildProtocol(None).clientWorkarounds == BOTH
    assert factory.idleTimeout == 600

    path.write_text('pop3 = ["tcp:1110"]\n')
    root.hangup()
    assert said("config.reloaded")[-1] == "configuration reloaded: applied pop3-client-workarounds"
    assert factory.buildProtocol(None).clientWorkarounds == ()


def retrieved(client):
    """
    RETR 1's lines as poplib gives them (dot-stuffing undone).
    """
    return client.retr(1)[1]


def test_aSessionOpenedBeforeTheReloadKeepsItsWorkarounds(tmp_path):
    """
    On a real C{twistd mailgate}: a client logged in before the SIGHUP
    reads the message as stored, NUL and all; one that logs in after it
    reads the NUL as 0x80 and the header's end added.
    """
    url = databaseURL(tmp_path / "mail.sqlite3")
    store = memoryStore(url)
    try:
        addUser(store, "alice@example.org", "wonder land")
        addUser(store, "bob@example.org", "wonder land")
        deliver(store, ["alice@example.org", "bob@example.org"], MESSAGE)
    finally:
        store.close()
    config = tmp_path / "mailgate.toml"
    text = f'database = "{url}"\npop3 = ["tcp:0:interface=127.0.0.1"]\nlog-format = "json"\nauth-failure-delay = 0\n'
    config.write_text(text)
    server = ConfiguredServer(config, cwd=tmp_path, expect={"POP3": 1})
    server.start()
    try:
        before = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        before.user("alice@example.org")
        before.pass_("wonder land")
        config.write_text(text + 'pop3-client-workarounds = "outlook-no-nuls oe-ns-eoh"\n')
        assert server.reload()["applied"] == ["pop3-client-workarounds"]
        after = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        after.user("bob@example.org")
        after.pass_("wonder land")
        assert retrieved(after) == [b"Subject: a \x80 in it", b""]
        assert retrieved(before) == [b"Subject: a \0 in it"]
        # The size as stored, for both.
        assert before.list(1) == after.list(1) == b"+OK 1 %d" % len(MESSAGE)
        before.quit()
        after.quit()
    finally:
        server.stop()
