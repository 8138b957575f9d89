"""
A session whose PROXY header names no client (a load balancer's C{LOCAL}
health check) is spared its end line only if it sent nothing but check
commands, none refused.  A bad line (too long, control characters)
refused, then C{CAPA} and C{QUIT} answered C{+OK} (POP3 counts refusals
afresh at each C{+OK}), is no check: its C{pop3.disconnect} line is
written, by a real C{twistd mailgate} behind a C{haproxy:} listener.
The core's bookkeeping is tested in test_session_healthcheck.
"""

import re
import socket

import pytest

from e2e import DEADLINE, LineReader, sqliteOnly, waitFor
from e2e import mailgate_server  # noqa: F401 (fixture)
from test_proxy import v2

#: HAProxy's health check on a send-proxy-v2 server: LOCAL, no client named.
LOCAL = v2("127.0.0.1", "127.0.0.1", command=0)


def checkLike(port, first):
    """
    Connect as a balancer's check (a LOCAL header), send C{first}, then
    CAPA and QUIT as a check would; return the replies' first lines.
    """
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        reader = LineReader(sock)
        sock.sendall(LOCAL)
        assert reader.line().startswith(b"+OK")
        for line in (first, b"CAPA", b"QUIT"):
            if line is not None:
                sock.sendall(line + b"\r\n")
                replies.append(reader.line())
                if line == b"CAPA":
                    while reader.line() != b".\r\n":
                        pass
    return replies


@sqliteOnly
def test_aBadLineBehindAHeaderNamingNoClientIsLogged(mailgate_server):  # noqa: F811
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server("--pop3", description)
    port = int(re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    # A check proper: no line (the sessions below are told apart by
    # their reasons and count).
    assert [r[:3] for r in checkLike(port, None)] == [b"+OK", b"+OK"]
    for bad in (b"CAPA " + b"x" * 600, b"CAPA \x01"):
        replies = checkLike(port, bad)
        assert replies[0].startswith(b"-ERR") and [r[:3] for r in replies[1:]] == [b"+OK", b"+OK"], replies
    lines = waitFor(
        lambda: (found := [x for x in server.stdout.splitlines() if "pop3 disconnect" in x]) and len(found) >= 2
        and found,
        "the two sessions' end lines",
    )
    assert len(lines) == 2, lines
    assert all("reason='quit' auth_failed=0" in line for line in lines), lines


if __name__ == "__main__":
    pytest.main([__file__])
