"""
Messages over mailgate's --max-message-size through a real Postfix, one
after another over its cached connection, into mailgate by LMTP and by
SMTP: each bounced by Postfix with mailgate's 552, the connection kept, and
the good messages among and after them delivered, none deferred.

Postfix (3.7.11) checks a message's size against the server's SIZE before
its MAIL only on a new connection ("message size ... exceeds size limit
... of server"); over a cached one it sends MAIL with SIZE over the limit,
pipelining its RCPTs and DATA behind it, and mailgate refuses the MAIL
(552 5.3.4) and the rest for want of a transaction (503).  Those were each
counted as errors: with two recipients, four a message, and the fifth
such message in a row closed the connection with 421 ("too many errors").
Now what the client pipelined behind a refused MAIL is not its error
(RFC 2920 section 3.1: it could not know); the MAIL still is.
"""

import re
import smtplib

import pytest

from e2e import DEADLINE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_lmtp_postfix_burst import FloodedPostfix, message
from test_pairings import postfixRoot  # noqa: F401 (fixture)

#: oversized messages in a row, each for two recipients (mailgate closed
#: the fifth before)
OVERSIZED = 12


class SMTPRelayingPostfix(FloodedPostfix):
    """
    The flooded Postfix, relaying mailgate's domain to its SMTP port (given
    as C{lmtpPort}) instead, one message at a time.
    """

    mainCF = FloodedPostfix.mainCF.replace(
        "virtual_transport = lmtp:inet:127.0.0.1:{lmtpPort}", "virtual_transport = smtp:[127.0.0.1]:{lmtpPort}"
    ) + "smtp_destination_concurrency_limit = 1\n"


@sqliteOnly
@pytest.mark.parametrize("protocol", ["LMTP", "SMTP"])
def test_oversizedMessagesOverACachedConnectionKeepIt(mailgate_server, mailgate_cli, postfixRoot, protocol):
    server = mailgate_server(
        f"--{protocol.lower()}", "tcp:0:interface=127.0.0.1", "--no-apop", "--max-message-size", "4K"
    )
    for user in ("alice", "carol"):
        mailgate_cli.addUser(f"{user}@example.org", f"{user}'s secret")
    kind = FloodedPostfix if protocol == "LMTP" else SMTPRelayingPostfix
    assert "virtual_transport = " + ("lmtp:" if protocol == "LMTP" else "smtp:") in kind.mainCF
    postfix = kind(postfixRoot, server.portOf(protocol))
    both = ["alice@example.org", "carol@example.org"]
    good = []
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            for n in range(OVERSIZED):
                smtp.sendmail("", both, message(f"too large {n}", lines=100))
                if n == OVERSIZED // 2:
                    good.append(f"among them {n}")
                    smtp.sendmail("held@elsewhere.test", ["alice@example.org"], message(good[-1]))
        postfix.release()
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            good.append("after them")
            smtp.sendmail("bob@elsewhere.test", ["alice@example.org"], message(good[-1]))
        outcomes = 2 * OVERSIZED + len(good)

        def finished():
            log = postfix.maillog()
            done = re.findall(r"postfix/(?:lmtp|smtp)\[\d+\]: \w+: to=<[^>]*@example\.org>.* status=(\w+)", log)
            return log if len(done) >= outcomes else None

        log = waitFor(finished, f"Postfix to deliver or bounce {outcomes} recipients")
    finally:
        postfix.stop()

    lines = [line for line in log.splitlines() if re.search(r"postfix/(lmtp|smtp)\[\d+\]: \w+: to=<", line)]
    assert [line for line in lines if "status=deferred" in line] == [], log
    sent = [line for line in lines if "to=<alice@example.org>" in line and "status=sent" in line]
    assert len(sent) == len(good), log
    bounced = [line for line in lines if "status=bounced" in line]
    assert len(bounced) == 2 * OVERSIZED, log
    # Over the cached connection it was mailgate that refused them, at MAIL.
    refusedHere = [line for line in bounced if "said: 552 5.3.4 " in line and "in reply to MAIL FROM" in line]
    assert len(refusedHere) >= OVERSIZED, log
    # mailgate kept Postfix's connection: no session ended for errors.
    assert "too many bad commands" not in server.stdout
    assert not re.search(r"disconnect .*reason='too many errors'", server.stdout)
