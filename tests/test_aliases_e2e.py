"""
Aliases (C{mailgate alias add|del|list}) on real servers: C{twistd mailgate}
with SMTP, LMTP and POP3 on 127.0.0.1, the C{mailgate} command (L{e2e.AdminCommand}),
Python's smtplib and poplib, on SQLite and on the real PostgreSQL.

What an administrator and a user see: an alias added while the server
runs is taken at the next RCPT, its mail is in the user's maildrop with
the alias named as sent in the Received field; removed, it is refused
(550 5.1.1) at the next RCPT; a POP3 login with its name is refused as an
unknown user's is; C{mailgate deliver} takes it; a full mailbox refuses
mail to the alias as it refuses the user's; one transaction naming the
user and the alias (as one naming C{bob+a@} and C{bob+b@}) gives the user
one copy; a domain's catch-all (C{@example.org}) takes what no one has;
two nodes on one PostgreSQL take an alias without a restart.
What the store does is tested in test_aliases_store.py.

Every wait is bounded.
"""

import poplib
import smtplib

import pytest

from e2e import DEADLINE, mailgate_cli, mailgate_server, pop, popLogin, postgresOnly, retrieve  # noqa: F401

ALICE = "alice@example.org"
BOB = "bob@example.org"
MADE_UP = "made-up@example.org"
ABUSE = "abuse@example.org"
INFO = "info@other.example"
PASSWORD = "wonder land"
SENDER = "sender@remote.test"
LISTEN = "tcp:0:interface=127.0.0.1"
NO_SUCH_USER = "5.1.1 <{}>: no such user here"


def smtp(server):
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    client.ehlo("mta.test")
    return client


def lmtp(server):
    client = smtplib.LMTP(timeout=DEADLINE)
    client.connect("127.0.0.1", server.portOf("LMTP"))
    client.ehlo("mta.test")
    return client


def rcpt(client, address):
    """
    The reply to RCPT TO:<address> in a transaction of its own, as text.
    """
    client.mail(SENDER)
    try:
        code, text = client.rcpt(address)
    finally:
        client.rset()
    return code, text.decode()


def transaction(client, recipients, message, replies=1):
    """
    One transaction: the RCPT replies, and the C{replies} replies to the
    end of DATA (LMTP answers once for each recipient accepted).
    """
    assert client.mail(SENDER)[0] == 250
    accepted = [client.rcpt(r) for r in recipients]
    ended = [client.data(message)]
    ended += [client.getreply() for _ in range(replies - 1)]
    return [(code, text.decode()) for code, text in accepted], [(code, text.decode()) for code, text in ended]


def aliasList(cli, *user):
    """
    C{mailgate alias list [USER]}'s table, a list of its columns a line.
    """
    return [line.split(None, 1) for line in cli.check("alias", "list", *user).splitlines()]


def header(message):
    """
    The header of a retrieved message, its folded lines unfolded.
    """
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    return head.replace("\r\n\t", " ").replace("\r\n ", " ")


def maildrop(server, address=BOB):
    """
    Every message of C{address}'s maildrop, read with POP3 RETR.
    """
    client = popLogin(server, address, PASSWORD)
    try:
        count = client.stat()[0]
        return [retrieve(client, n) for n in range(1, count + 1)]
    finally:
        client.quit()


def test_anAliasAddedWhileTheServerRunsIsTakenAtTheNextRcpt(mailgate_server, mailgate_cli):
    """
    mailgate alias add, the server running: the next RCPT (SMTP and LMTP)
    takes the alias, the message is the user's, its Received field names
    the alias as sent; an alias in a domain no user has makes mail for it
    taken.  mailgate alias del: the next RCPT is refused, 550 5.1.1.
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    mailgate_cli.addUser(BOB, PASSWORD)
    client = smtp(server)
    assert rcpt(client, ABUSE) == (550, NO_SUCH_USER.format(ABUSE))
    out = mailgate_cli.check("alias", "add", ABUSE, BOB)
    assert out == f"added {ABUSE}, an alias of {BOB}: mail to it is {BOB}'s\n"
    assert client.sendmail(SENDER, [ABUSE], b"Subject: to abuse\r\n\r\nhello\r\n") == {}
    mailgate_cli.check("alias", "add", INFO, BOB)
    delivery = lmtp(server)
    assert delivery.sendmail(SENDER, [INFO], b"Subject: to info\r\n\r\nhello\r\n") == {}
    assert aliasList(mailgate_cli, BOB) == [["ALIAS", "USER"], [ABUSE, BOB], [INFO, BOB]]

    first, second = (header(m) for m in maildrop(server))
    assert "Subject: to abuse" in first and "with ESMTP id " in first and f"for <{ABUSE}>;" in first, first
    assert "Subject: to info" in second and "with LMTP id " in second and f"for <{INFO}>;" in second, second

    assert mailgate_cli.check("alias", "del", ABUSE) == (
        f"removed the alias {ABUSE} (of {BOB}): mail to it is refused from now on\n"
    )
    assert rcpt(client, ABUSE) == (550, NO_SUCH_USER.format(ABUSE))
    assert rcpt(delivery, ABUSE) == (550, NO_SUCH_USER.format(ABUSE))
    # The other alias and the user are as they were.
    assert rcpt(client, INFO)[0] == 250
    assert rcpt(client, BOB)[0] == 250
    assert aliasList(mailgate_cli) == [["ALIAS", "USER"], [INFO, BOB]]
    client.quit()
    delivery.quit()


def test_aCatchAllTakesTheDomainsOtherAddresses(mailgate_server, mailgate_cli):
    """
    mailgate alias add @example.org, the server running: the next RCPT of
    an address of the domain no one has (SMTP and LMTP) is the catch-all's
    user's, the Received field naming it as sent; a user's own address
    stays hers.  Removed: the next such RCPT is refused, 550 5.1.1.
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.addUser(BOB, PASSWORD)
    client, delivery = smtp(server), lmtp(server)
    assert rcpt(client, MADE_UP) == (550, NO_SUCH_USER.format(MADE_UP))
    assert mailgate_cli.check("alias", "add", "@example.org", BOB).startswith(
        "added @example.org, the catch-all of example.org: "
    )
    assert client.sendmail(SENDER, [MADE_UP, ALICE], b"Subject: made up\r\n\r\nhello\r\n") == {}
    assert delivery.sendmail(SENDER, ["other@example.org"], b"Subject: other\r\n\r\nhello\r\n") == {}
    first, second = (header(m) for m in maildrop(server))
    assert "Subject: made up" in first and "Subject: other" in second, (first, second)
    assert "for <other@example.org>;" in second, second
    (alices,) = maildrop(server, ALICE)
    assert "Subject: made up" in header(alices)
    mailgate_cli.check("alias", "del", "@example.org")
    assert rcpt(client, MADE_UP) == (550, NO_SUCH_USER.format(MADE_UP))
    assert rcpt(delivery, MADE_UP) == (550, NO_SUCH_USER.format(MADE_UP))
    client.quit()
    delivery.quit()


def loginReplies(server, address, password):
    """
    The replies to USER and PASS, the second as poplib raises it.
    """
    client = pop(server)
    try:
        user = client.user(address)
        with pytest.raises(poplib.error_proto) as refused:
            client.pass_(password)
        return user, refused.value.args[0]
    finally:
        client.close()


def test_aPOP3LoginWithAnAliasIsRefusedAsAnUnknownUsersIs(mailgate_server, mailgate_cli):
    """
    An alias is an address for mail, not a login: its name with the
    user's password is refused with the reply a wrong password and an
    unknown user get, so the reply tells a guesser nothing either.
    """
    server = mailgate_server("--auth-failure-delay", "0")
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    withTheAlias = loginReplies(server, ABUSE, PASSWORD)
    assert withTheAlias == loginReplies(server, BOB, "not " + PASSWORD)
    assert withTheAlias == loginReplies(server, "nobody@example.org", PASSWORD)
    assert withTheAlias[1].startswith(b"-ERR [AUTH] "), withTheAlias
    # The user's own address logs in.
    assert maildrop(server) == []


def test_mailgateDeliverAndAFullMailboxTakeTheAliasAsTheUser(mailgate_server, mailgate_cli):
    """
    mailgate deliver ALIAS delivers to the user (the Received field names
    the alias); once the user's mailbox is full, mail to the alias is
    refused as the user's own is: at RCPT over SMTP and LMTP, and by
    mailgate deliver's exit status, each naming the alias.
    """
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    code, out, err = mailgate_cli("deliver", "-f", SENDER, ABUSE, input=b"Subject: delivered\r\n\r\nhello\r\n")
    assert (code, err) == (0, ""), (out, err)
    assert out.startswith(f"delivered to {BOB} as "), out
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    (only,) = maildrop(server)
    assert "Subject: delivered" in header(only) and f"for <{ABUSE}>;" in header(only), only

    mailgate_cli.check("user", "quota", BOB, "none", "--messages", "1")
    for client in (smtp(server), lmtp(server)):
        toAlias, toUser = rcpt(client, ABUSE), rcpt(client, BOB)
        assert toAlias[0] == toUser[0] == 452, (toAlias, toUser)
        # The same reply, each naming the mailbox as the client sent it.
        assert toAlias[1] == toUser[1].replace(BOB, ABUSE), (toAlias, toUser)
        assert toAlias[1].startswith(f"4.2.2 <{ABUSE}>: "), toAlias
        client.quit()
    asAlias = mailgate_cli("deliver", "-f", SENDER, ABUSE, input=b"Subject: full\r\n\r\nhello\r\n")
    asUser = mailgate_cli("deliver", "-f", SENDER, BOB, input=b"Subject: full\r\n\r\nhello\r\n")
    assert asAlias[0] == asUser[0] == 75, (asAlias, asUser)
    # Each naming the mailbox as it was given: a Postfix pipe's bounce
    # does not tell the sender whose mailbox the alias is.
    assert asAlias[2].splitlines()[-1] == asUser[2].splitlines()[-1].replace(BOB, ABUSE), (asAlias, asUser)
    assert BOB not in asAlias[2], asAlias
    assert len(mailgate_cli.mailbox(BOB)) == 1


def test_oneTransactionToAUserAndTheirAliasGivesOneCopy(mailgate_server, mailgate_cli):
    """
    One transaction naming bob and his alias (or bob's address with two
    details, --recipient-delimiter): one copy in bob's maildrop, as
    Postfix delivers one per final recipient.  SMTP answers the message
    once; LMTP once per RCPT, each 250 with the one copy's unique id.
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN, "--recipient-delimiter", "+")
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    pairs = [[BOB, ABUSE], ["bob+a@example.org", "bob+b@example.org"], [ABUSE, "abuse+x@example.org"]]
    client = smtp(server)
    for pair in pairs:
        accepted, ended = transaction(client, pair, b"Subject: %s\r\n\r\nhello\r\n" % pair[1].encode())
        assert [code for code, _ in accepted] == [250, 250], accepted
        assert [code for code, _ in ended] == [250], ended
    client.quit()
    assert len(mailgate_cli.mailbox(BOB)) == len(pairs)
    client = lmtp(server)
    for pair in pairs:
        accepted, ended = transaction(client, pair, b"Subject: lmtp %s\r\n\r\nhello\r\n" % pair[1].encode(), replies=2)
        assert [code for code, _ in accepted] == [250, 250], accepted
        assert [code for code, _ in ended] == [250, 250], ended
        # Both replies name the one copy bob got.
        (uid,) = {text.rpartition(" as ")[2] for _, text in ended}
        assert uid == mailgate_cli.mailbox(BOB)[-1][2], (ended, mailgate_cli.mailbox(BOB))
    client.quit()
    assert len(mailgate_cli.mailbox(BOB)) == 2 * len(pairs)


@postgresOnly
def test_twoNodesTakeAnAliasWithoutARestart(mailgate_server, mailgate_cli):
    """
    Two servers on one PostgreSQL database: an alias the command adds is
    taken by both at the next RCPT, and refused by both once removed.
    """
    mailgate_cli.addUser(BOB, PASSWORD)
    nodes = [mailgate_server("--hostname", f"node-{n}.test", "--smtp", LISTEN) for n in "ab"]
    clients = [smtp(node) for node in nodes]
    for client in clients:
        assert rcpt(client, ABUSE) == (550, NO_SUCH_USER.format(ABUSE))
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    for n, client in enumerate(clients):
        assert client.sendmail(SENDER, [ABUSE], b"Subject: node %d\r\n\r\nhello\r\n" % n) == {}
    received = [header(m) for m in maildrop(nodes[0])]
    for n, h in enumerate(received):
        assert f"Subject: node {n}" in h and f"by node-{'ab'[n]}.test" in h and f"for <{ABUSE}>;" in h, received
    mailgate_cli.check("alias", "del", ABUSE)
    for client in clients:
        assert rcpt(client, ABUSE) == (550, NO_SUCH_USER.format(ABUSE))
        client.quit()
