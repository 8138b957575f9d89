"""
SMTP's counting of a client's errors against a model, generated: the
limits Postfix has (C{smtpd_soft_error_limit} and C{smtpd_error_sleep_time},
C{smtpd_hard_error_limit}, C{smtpd_junk_command_limit}), as README's
"Errors slow an SMTP client down" states them, in an in-memory SMTP
session on a clock the test moves.  Hypothesis runs sequences of good
and bad commands (unknown verbs, commands out of sequence, recipients
refused as unknown, DATA without a recipient, MAIL without a hello),
commands that deliver nothing (the hellos, NOOP, RSET, VRFY, HELP),
whole transactions, and QUIT, and checks after each:

  - an error reply is sent at once while the errors before it are fewer
    than the soft limit, and a held one, the sleep time later, from then
    on (never before), but a refused DATA's, which the message's text
    may follow unasked; a reply to anything else is never held;
  - the hard limit's error is answered and followed by C{421} and the
    end of the session;
  - past the junk limit, each command that delivers nothing counts as an
    error (its reply not held);
  - a delivered message starts the counts afresh (errors and junk);
  - the RCPTs and the DATA refused behind a MAIL refused for its sender
    are not errors (a client pipelining as RFC 2920 has them sent before
    it reads the MAIL's reply): the MAIL is.

The limits are small here (soft 3, hard 8, junk 5), so that sequences
reach them; the counting is the same at Postfix's numbers.
"""

import os

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from twisted.internet.testing import MemoryReactorClock

from mailgate.config import MailgateConfig
from mailgate.service import makeSMTPFactory
from mailgate.testing import SMTPSession, addUser, memoryStore

from test_pop3_model import MODEL

SOFT, HARD, JUNK, SLEEP = 3, 8, 5, 1.0

# More examples than the protocol models' 60: a step is a command in
# memory (300 take about 4 s), and 60 missed a delivered message not
# forgiving the junk commands before it.
ERRORS_MODEL = settings(MODEL, max_examples=int(os.environ.get("MAILGATE_MODEL_EXAMPLES", "300")))
ALICE = "alice@example.org"

#: commands that deliver nothing: their code, counted as junk
JUNK_COMMANDS = {
    "NOOP": "250",
    "RSET": "250",
    "VRFY alice": "252",
    "HELP": "214",
}
#: each protocol's hellos (junk too), and the other's (its errors)
HELLOS = {"smtp": ["EHLO client.test", "HELO client.test"], "lmtp": ["LHLO client.test"]}


class SMTPErrorsModel(RuleBasedStateMachine):
    def __init__(self, store, config, protocol):
        super().__init__()
        self.store = store
        self.config = config
        self.lmtp = protocol == "lmtp"
        self.hellos = HELLOS[protocol]
        self.otherHellos = HELLOS["smtp" if self.lmtp else "lmtp"]
        self._connect()

    def _connect(self):
        self.clock = MemoryReactorClock()
        factory = makeSMTPFactory(self.store, self.config, self.clock, lmtp=self.lmtp)
        self.session = SMTPSession(self.store, lmtp=self.lmtp, clock=self.clock, factory=factory)
        self.session.protocol.maxBadCommands = HARD
        self.session.protocol.maxJunkCommands = JUNK
        assert self.session.greeting.startswith("220 ")
        self.errors = 0
        self.junk = 0
        self.hello = False
        self.mail = False
        self.recipients = 0
        self.closed = False
        # After a MAIL refused for its sender or parameters: the RCPTs and
        # the DATA behind it (how many RCPTs so far), or None.
        self.afterRefusedMail = None

    def teardown(self):
        if not self.closed:
            self.session.command("QUIT")

    def _reply(self, line):
        """
        Send C{line}; the reply, waited for as long as it is held (the
        sleep time at most), and how long that was.
        """
        out = self.session.command(line)
        if out:
            return out, 0
        # Held: nothing before the sleep time is over, all of it then.
        assert self.session.advance(SLEEP - 0.01) == b""
        return self.session.advance(0.01).decode(), SLEEP

    def _error(self, line, code, holds=True, counts=True):
        """
        A command the client gets wrong: refused with C{code}, held past
        the soft limit (unless it never C{holds}), and the session closed
        at the hard one; or, if it does not count, refused at once.
        """
        held = counts and holds and not self.lmtp and self.errors >= SOFT
        out, waited = self._reply(line)
        assert waited == (SLEEP if held else 0), (line, self.errors, out)
        if counts:
            self.errors += 1
        self._endsAtTheLimit(out, code)

    def _another(self):
        """
        A command that is none of what a client pipelines behind MAIL
        (RCPT, DATA, BDAT): what followed a refused MAIL is over.
        """
        self.afterRefusedMail = None

    def _behindRefusedMail(self, recipient):
        """
        Whether a RCPT (C{recipient}) or DATA refused for want of a
        transaction is one a client pipelined behind a refused MAIL (RFC
        2920: it sends them before reading the MAIL's reply), not its
        error: up to the recipient limit (100) and one DATA, which ends it.
        """
        count = self.afterRefusedMail
        if count is None:
            return False
        if recipient:
            if count >= 100:
                return False
            self.afterRefusedMail = count + 1
        else:
            self.afterRefusedMail = None
        return True

    def _endsAtTheLimit(self, out, code):
        if self.errors >= HARD:
            # The reply (EHLO's of several lines), then the goodbye.
            lines = out.splitlines()
            assert lines[0][:4] in (code + " ", code + "-") and lines[-1].startswith("421 4.7.0 "), out
            assert not any(line.startswith("421") for line in lines[:-1]), out
            assert self.session.disconnected
            self.closed = True
        else:
            assert out[:4] in (code + " ", code + "-") and "421 " not in out, out
            assert not self.session.disconnected

    # -- errors ----------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(verb=st.sampled_from(["XYZZY", "MAIL", "RCPT TO <x>", "another protocol's hello"]))
    def badCommand(self, verb):
        if verb == "XYZZY":
            self._another()
            self._error(verb, "500")
        elif verb == "another protocol's hello":
            # SMTP's LHLO, LMTP's EHLO and HELO: an error, not a hello.
            self._another()
            for hello in self.otherHellos:
                if not self.closed:
                    self._error(hello, "500")
        elif verb == "MAIL":
            self._another()
            refusedSender = self.hello and not self.mail
            self._error(verb, "501" if refusedSender else "503")
            if refusedSender:
                self.afterRefusedMail = 0
        elif self.mail:
            self._error(verb, "501")
        else:
            # No transaction: refused as RCPT before MAIL is.
            self._error(verb, "503", counts=not self._behindRefusedMail(recipient=True))

    @precondition(lambda self: not self.closed and self.mail)
    @rule()
    def unknownRecipient(self):
        # LMTP: the MTA handing over what it took, not its error; the
        # lookup was work it asked for (its junk before it forgiven).
        self._error("RCPT TO:<nobody@example.org>", "550", counts=not self.lmtp)
        if self.lmtp:
            self.junk = 0

    @precondition(lambda self: not self.closed and self.mail and not self.recipients)
    @rule()
    def dataWithoutRecipient(self):
        # Counted, never held: a client may send its message's text after
        # DATA without waiting, and what follows needs the reply sent.
        # LMTP: RFC 2033's 503, not counted (its recipients were refused).
        self._error("DATA", "503" if self.lmtp else "554", holds=False, counts=not self.lmtp)

    @precondition(lambda self: not self.closed and not self.mail)
    @rule()
    def recipientBeforeMail(self):
        self._error(f"RCPT TO:<{ALICE}>", "503", counts=not self._behindRefusedMail(recipient=True))

    @precondition(lambda self: not self.closed and not self.mail)
    @rule()
    def dataBeforeMail(self):
        # Never held, as any refused DATA.
        self._error("DATA", "503", holds=False, counts=not self._behindRefusedMail(recipient=False))

    # -- what delivers nothing ----------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(line=st.sampled_from(sorted(JUNK_COMMANDS) + ["hello"]), which=st.integers(0, 1))
    def junkCommand(self, line, which):
        if line == "hello":
            line = self.hellos[which % len(self.hellos)]
            code = "250"
        else:
            code = JUNK_COMMANDS[line]
        self._another()
        out, waited = self._reply(line)
        assert waited == 0, line
        self.junk += 1
        if line.startswith(("EHLO", "HELO", "LHLO", "RSET")):
            if line.startswith(("EHLO", "HELO", "LHLO")):
                self.hello = True
            self.mail = False
            self.recipients = 0
        if self.junk > JUNK:
            # Counted as an error, its reply already sent.
            self.errors += 1
        if self.errors >= HARD:
            self._endsAtTheLimit(out, code)
        else:
            assert out.startswith(code), (line, out)
            assert not self.session.disconnected

    # -- what delivers -------------------------------------------------------------

    @precondition(lambda self: not self.closed and self.hello and not self.mail)
    @rule()
    def mailFrom(self):
        self._another()
        out, waited = self._reply("MAIL FROM:<sender@far.test>")
        assert waited == 0 and out.startswith("250 "), out
        self.mail = True

    @precondition(lambda self: not self.closed and self.mail)
    @rule()
    def recipient(self):
        out, waited = self._reply(f"RCPT TO:<{ALICE}>")
        assert waited == 0 and out.startswith("250 "), out
        self.recipients += 1
        if self.lmtp:
            self.junk = 0

    @precondition(lambda self: not self.closed and self.recipients)
    @rule()
    def data(self):
        out, waited = self._reply("DATA")
        assert waited == 0 and out.startswith("354 "), out
        out = self.session.send(b"Subject: model\r\n\r\nhello\r\n.\r\n").decode()
        # LMTP: one reply a recipient (RFC 2033), SMTP one.
        replies = out.splitlines()
        assert len(replies) == (self.recipients if self.lmtp else 1), out
        assert all(reply.startswith("250 ") for reply in replies), out
        # A delivered message: a fresh start.
        self.errors = self.junk = 0
        self.mail = False
        self.recipients = 0

    @precondition(lambda self: self.closed)
    @rule()
    def reconnect(self):
        """
        A new session: its counts start at nothing.
        """
        self._connect()

    @precondition(lambda self: not self.closed)
    @rule()
    def quit(self):
        out, waited = self._reply("QUIT")
        assert waited == 0 and out.startswith("221 "), out
        assert self.session.disconnected
        self.closed = True


@pytest.fixture
def errorsStore():
    """
    A store in memory with one user: what is counted is the session's,
    whatever the store.
    """
    store = memoryStore()
    addUser(store, ALICE, "secret")
    yield store
    store.close()


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_errorsAreCountedAsTheModelSays(errorsStore, protocol):
    # Set for SMTP, as an administrator would: LMTP must not take them.
    config = MailgateConfig(database="sqlite:///unused.sqlite3", smtpSoftErrorLimit=SOFT, smtpErrorSleepTime=SLEEP)
    run_state_machine_as_test(lambda: SMTPErrorsModel(errorsStore, config, protocol), settings=ERRORS_MODEL)
