"""
Aliases at their edges, on real servers: C{twistd mailgate} with SMTP and
LMTP on 127.0.0.1, the C{mailgate} command (L{e2e.AdminCommand}), Python's smtplib and
poplib, on SQLite and on the real PostgreSQL.

What a sender and an administrator see:
  - a message refused at the end of DATA for the quota of an alias's user
    is refused naming the alias as sent, as RCPT's refusal names it: the
    reply (in the sender's bounce) told whose mailbox the alias is;
  - LMTP's replies at the end of DATA name each recipient as its RCPT did;
  - a user's address the server remembers (it found the user a moment
    ago) whose user is then renamed, the old address made an alias of the
    new one (what an administrator does to keep a renamed user's mail
    coming): the next message to it is delivered to that user, over SMTP
    and LMTP, where LMTP refused it 550 5.1.1 (a bounce) and SMTP 451;
  - a user renamed while a message to their alias is in flight (RCPT
    taken, DATA not yet ended) gets it.

The aliases of test_aliases_e2e.py are not tested again here.  Every wait
is bounded.
"""


from e2e import mailgate_cli, mailgate_server, popLogin, retrieve  # noqa: F401
from test_aliases_e2e import lmtp, smtp, transaction

BOB = "bob@example.org"
ABUSE = "abuse@example.org"
PASSWORD = "wonder land"
SENDER = "sender@remote.test"
LISTEN = "tcp:0:interface=127.0.0.1"
#: 61 lines of 72 octets: over a quota of 2000 octets, with no SIZE
#: declared, so that RCPT takes it and the end of DATA refuses it.
LARGE = b"Subject: large\r\n\r\n" + b"x" * 70 + (b"\r\n" + b"x" * 70) * 60 + b"\r\n"


def subjects(server, address):
    """
    The Subject fields of C{address}'s maildrop, read with POP3 RETR.
    """
    client = popLogin(server, address, PASSWORD)
    try:
        messages = [retrieve(client, n) for n in range(1, client.stat()[0] + 1)]
    finally:
        client.quit()
    return [line.decode() for m in messages for line in m.split(b"\r\n") if line.startswith(b"Subject: ")]


def test_aQuotaRefusalAtTheEndOfDataNamesTheAliasAsSent(mailgate_server, mailgate_cli):
    """
    abuse@ is bob's alias, bob's quota 2000 octets, a larger message sent
    without SIZE: RCPT takes it, the end of DATA refuses it 552 5.2.3
    naming <abuse@example.org> (SMTP's one reply; LMTP's for that
    recipient, the other recipient's 250 naming her as sent too), never
    bob's address.
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.addUser("alice@example.org", PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    mailgate_cli.check("alias", "add", "info@example.org", "alice@example.org")
    mailgate_cli.check("user", "quota", BOB, "2000")
    refused = (552, f"5.2.3 <{ABUSE}>: message larger than the mailbox's whole quota (2000 octets)")
    client = smtp(server)
    accepted, ended = transaction(client, [ABUSE], LARGE)
    assert [code for code, _ in accepted] == [250], accepted
    assert ended == [refused]
    client.quit()
    client = lmtp(server)
    accepted, ended = transaction(client, [ABUSE, "Info@example.org"], LARGE, replies=2)
    assert [code for code, _ in accepted] == [250, 250], accepted
    assert ended[0] == refused
    assert ended[1][0] == 250 and ended[1][1].startswith("2.0.0 <Info@example.org> delivered as "), ended
    client.quit()
    assert subjects(server, "alice@example.org") == ["Subject: large"]


def test_aRememberedUsersAddressMadeAnAliasIsDeliveredToItsUser(mailgate_server, mailgate_cli):
    """
    Mail to carol@ (the server remembers her for a while), then mailgate
    user rename carol@ carol.smith@ and mailgate alias add carol@
    carol.smith@ while the server runs: the next message to carol@ is
    carol.smith's, over SMTP (before: 451, a vanished recipient) and
    over LMTP (550 5.1.1 before, a bounce), its reply naming carol@ as
    sent.  One LMTP transaction naming both addresses gives her one copy.
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    for name in ("carol", "dave"):
        mailgate_cli.addUser(f"{name}@example.org", PASSWORD)
    client, delivery = smtp(server), lmtp(server)
    assert client.sendmail(SENDER, ["carol@example.org"], b"Subject: smtp 1\r\n\r\nhello\r\n") == {}
    assert delivery.sendmail(SENDER, ["dave@example.org"], b"Subject: lmtp 1\r\n\r\nhello\r\n") == {}
    for name in ("carol", "dave"):
        mailgate_cli.check("user", "rename", f"{name}@example.org", f"{name}.smith@example.org")
        mailgate_cli.check("alias", "add", f"{name}@example.org", f"{name}.smith@example.org")

    accepted, ended = transaction(client, ["carol@example.org"], b"Subject: smtp 2\r\n\r\nhello\r\n")
    assert [code for code, _ in accepted] == [250] and ended[0][0] == 250, (accepted, ended)
    accepted, ended = transaction(delivery, ["dave@example.org"], b"Subject: lmtp 2\r\n\r\nhello\r\n")
    assert [code for code, _ in accepted] == [250], accepted
    assert ended[0][0] == 250 and ended[0][1].startswith("2.0.0 <dave@example.org> delivered as "), ended
    assert subjects(server, "carol.smith@example.org") == ["Subject: smtp 1", "Subject: smtp 2"]
    assert subjects(server, "dave.smith@example.org") == ["Subject: lmtp 1", "Subject: lmtp 2"]


def test_oneLmtpTransactionToARememberedAddressNowAnAliasAndItsUserGivesOneCopy(mailgate_server, mailgate_cli):
    """
    dave@ remembered as a user, then renamed to dave.smith@ and made his
    alias: one LMTP transaction naming dave@ and dave.smith@ stores one
    copy, both replies 250 naming the one copy.
    """
    server = mailgate_server("--lmtp", LISTEN)
    mailgate_cli.addUser("dave@example.org", PASSWORD)
    delivery = lmtp(server)
    assert delivery.sendmail(SENDER, ["dave@example.org"], b"Subject: first\r\n\r\nhello\r\n") == {}
    mailgate_cli.check("user", "rename", "dave@example.org", "dave.smith@example.org")
    mailgate_cli.check("alias", "add", "dave@example.org", "dave.smith@example.org")
    recipients = ["dave@example.org", "dave.smith@example.org"]
    accepted, ended = transaction(delivery, recipients, b"Subject: both\r\n\r\nhello\r\n", replies=2)
    assert [code for code, _ in accepted] == [250, 250], accepted
    assert [code for code, _ in ended] == [250, 250], ended
    (uid,) = {text.rpartition(" as ")[2] for _, text in ended}
    assert [text.split()[1] for _, text in ended] == [f"<{r}>" for r in recipients], ended
    delivery.quit()
    assert subjects(server, "dave.smith@example.org") == ["Subject: first", "Subject: both"]
    assert mailgate_cli.mailbox("dave.smith@example.org")[-1][2] == uid


def test_aUserRenamedWhileMailToTheirAliasIsInFlightGetsIt(mailgate_server, mailgate_cli):
    """
    RCPT abuse@ (bob's alias) taken, then, before DATA, mailgate user
    rename bob@ robert@ (the alias goes along): the message is robert's,
    250 over LMTP naming abuse@ (550 5.1.1 before: bob was no longer
    there).  Again over SMTP, renaming robert@ to abuse@ (his own alias,
    which the rename takes over) before DATA: 250 (451 before).
    """
    server = mailgate_server("--smtp", LISTEN, "--lmtp", LISTEN)
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    delivery = lmtp(server)
    assert delivery.mail(SENDER)[0] == 250 and delivery.rcpt(ABUSE)[0] == 250
    mailgate_cli.check("user", "rename", BOB, "robert@example.org")
    code, text = delivery.data(b"Subject: renamed to robert\r\n\r\nhello\r\n")
    assert (code, text.decode().split(" as ")[0]) == (250, f"2.0.0 <{ABUSE}> delivered"), (code, text)
    delivery.quit()
    client = smtp(server)
    assert client.mail(SENDER)[0] == 250 and client.rcpt(ABUSE)[0] == 250
    mailgate_cli.check("user", "rename", "robert@example.org", ABUSE)
    code, text = client.data(b"Subject: renamed to abuse\r\n\r\nhello\r\n")
    assert code == 250, (code, text)
    client.quit()
    assert subjects(server, ABUSE) == ["Subject: renamed to robert", "Subject: renamed to abuse"]
