"""
A flood of mail for unknown users through a real Postfix delivering into
mailgate by LMTP, good mail among it and after it: every good message is
delivered at once, none deferred to Postfix's queue.

Postfix caches its LMTP connections while a destination has a backlog,
and over a cached connection sends two RSETs a refused message (one ending
the transaction, one probing the connection before reusing it).  Counted
as junk commands, some 60 refused messages over one connection closed it
with 421; where that 421 came after the 250 to a probe, Postfix read it as
the reply to the next message's MAIL FROM and deferred that message
("status=deferred ... 421 4.7.0 ... (in reply to MAIL FROM command)"),
until its queue's next retry, minutes later.  Here Postfix delivers over
one connection at a time (lmtp_destination_concurrency_limit = 1: a
smaller flood does what a larger one does to each of the default 20), and
a few messages larger than mailgate's --max-message-size (each one
error: its MAIL refused; the RCPT and DATA pipelined behind it are not
counted, tests/test_pipelined_after_refused_mail.py) make the count odd, as
they do where mailgate's limit is below Postfix's.

The flood is held in Postfix's queue as it arrives and released at once,
as a backlog builds when it arrives faster than it is delivered.
"""

import os
import re
import smtplib
import subprocess

from e2e import DEADLINE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_pairings import MAIN_CF, POSTFIX, PrivatePostfix, postfixRoot  # noqa: F401 (fixtures)

#: messages of the flood, each for one unknown user
FLOOD = 300


class FloodedPostfix(PrivatePostfix):
    """
    The pairing's Postfix, holding what the flood's senders send (the null
    sender of backscatter, and held@elsewhere.test for the good messages
    among it) until L{release}, and delivering one message at a time.
    """

    mainCF = MAIN_CF + (
        "smtpd_sender_restrictions = check_sender_access inline:{{ <>=HOLD, held@elsewhere.test=HOLD }}\n"
        "lmtp_destination_concurrency_limit = 1\n"
    )

    def release(self):
        """
        Move the held mail to the deferred queue and have it all delivered
        now.
        """
        sbin = os.path.dirname(POSTFIX)
        for command in (["postsuper", "-H", "ALL"], ["postqueue", "-f"]):
            done = subprocess.run(
                [os.path.join(sbin, command[0]), "-c", str(self.config), *command[1:]],
                capture_output=True, text=True, timeout=DEADLINE,
            )
            assert done.returncode == 0, done.stdout + done.stderr


def message(subject, lines=1):
    return f"Subject: {subject}\r\n\r\n" + ("x" * 70 + "\r\n") * lines


@sqliteOnly
def test_aFloodForUnknownUsersDefersNoGoodMessage(mailgate_server, mailgate_cli, postfixRoot):
    server = mailgate_server("--lmtp", "tcp:0:interface=127.0.0.1", "--no-apop", "--max-message-size", "4K")
    mailgate_cli.addUser("alice@example.org", "alice's secret")
    postfix = FloodedPostfix(postfixRoot, server.portOf("LMTP"))
    good = []
    outcomes = FLOOD
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            for n in range(FLOOD):
                smtp.sendmail("", [f"nobody{n}@example.org"], message(f"flood {n}"))
                if n % 50 == 25:
                    # Larger than mailgate takes: Postfix bounces it (and,
                    # from <>, sends the bounce nowhere).
                    smtp.sendmail("", ["alice@example.org"], message("too large", lines=100))
                    outcomes += 1
                if n == FLOOD // 2:
                    good.append(f"among the flood {n}")
                    smtp.sendmail("held@elsewhere.test", ["alice@example.org"], message(good[-1]))
        postfix.release()
        # While the flood is delivered, and after it: some for several
        # recipients, some of them unknown.
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            for n in range(6):
                good.append(f"after the flood {n}")
                others = [f"gone{n}.{i}@example.org" for i in range(n % 3)]
                smtp.sendmail("bob@elsewhere.test", ["alice@example.org", *others], message(good[-1]))
                outcomes += 1 + len(others)
        outcomes += 1  # the one among the flood

        def finished():
            log = postfix.maillog()
            done = re.findall(r"postfix/lmtp\[\d+\]: \w+: to=<[^>]*>.* status=(\w+)", log)
            return log if len(done) >= outcomes else None

        log = waitFor(finished, f"Postfix to deliver or bounce {outcomes} recipients")
    finally:
        postfix.stop()

    # (Postfix's bounces to elsewhere.test wait in its queue: not LMTP's.)
    deferred = [line for line in log.splitlines() if "postfix/lmtp[" in line and "status=deferred" in line]
    assert deferred == []
    sent = [line for line in log.splitlines() if "to=<alice@example.org>" in line and "status=sent" in line]
    assert len(sent) == len(good), log
    # mailgate kept Postfix's connections: no session ended for "errors".
    assert "too many errors" not in server.stdout
    assert not re.search(r"lmtp disconnect .*reason='too many errors'", server.stdout)
