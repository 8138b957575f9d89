"""
Defects found reviewing the administration side (the mailgate command,
its importers and its SQLite openings), each through the real thing: a
real Dovecot, the real mailgate command, real SQLite files.
"""

import os
import time

import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from test_dovecot_migration import ALICE, PASSWORD, aliceStore, servedBy, servedByMailgate


@requireDovecot
def test_aFoldedXUIDLWhoseNextLineBeginsWithANumberIsStillItsFirstLines(tmp_path):
    """
    Dovecot (pop3_reuse_xuidl = yes) serves a folded X-UIDL field as it is,
    the field's next line in the UIDL listing as a line of its own.  Where
    that line begins with a number after its fold (" 2 more"), it is still
    the rest of the id before it, not message 2's: clients take the first
    line's id, and so does import pop3.  It took it for a listing naming
    message 2 twice and refused the user's whole listing, exit 65, on
    every run (the field is the sender's to write), or, for a number no
    message has (" 9 more"), a message 9 to fetch.
    """
    from mailgate.importers.pop3 import importPOP3

    messages = [
        b"X-UIDL: folded1\n 2 more\nSubject: s\n\nbody\n",
        b"Subject: no field\n\nbody\n",
        b"X-UIDL: tabbed3\r\n\t9 more\r\n\r\nbody\r\n",
    ]
    server = PrivateDovecot(extra="pop3_reuse_xuidl = yes")
    try:
        server.addUsers([ALICE], PASSWORD)
        now = int(time.time())
        for n, message in enumerate(messages):
            with open(os.path.join(server.maildir(ALICE), "new", f"{now - 100 + n}.M{n}P1.host"), "wb") as f:
                f.write(message)
        server.own(server.maildir(ALICE))
        server.start()
        uidl, listing, _ = servedBy(server, ALICE)
        # As Dovecot serves it: each field's second line a line of its own.
        assert [line for line in uidl if not line[:1].isdigit()] == [" 2 more", "\t9 more"]
        kept = [line for line in uidl if line[:1].isdigit()]
        assert [line.split()[1] for line in kept][::2] == ["folded1", "tabbed3"]
        with aliceStore() as store:
            report = importPOP3(store, f"pop3://alice%40example.org@127.0.0.1:{server.pop3Port}", ALICE, PASSWORD)
            assert (report.messages, report.failures) == (3, [])
            assert servedByMailgate(store) == (kept, listing)
        assert server.errorsLogged() == []
    finally:
        server.cleanup()
