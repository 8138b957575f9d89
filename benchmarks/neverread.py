"""
A client that never reads: how much memory does it cost the server?

For each scenario one TCP connection pipelines the same command over and
over and reads nothing (the socket's receive buffer is kept small), as
issue 11 tried: C{CAPA} x 2,000,000 before login took mailgate from 52 MB
to 374 MB.  The client sends until it has sent the issue's count, or until
the server has not taken a single octet for C{--stall} seconds (it stopped
reading).  The server's resident memory (VmRSS of C{--server-pid}, from
/proc) is read before, at the end of the flood, and after the client has
gone.  Standard library only; nothing here asserts anything.

Scenarios (a port of each protocol can be given; a scenario whose port is
missing is skipped):
  pop3-capa   CAPA before login
  pop3-list   LIST after login        (needs --user/--password)
  pop3-retr   RETR 1 after login      (needs --user/--password, a message)
  pop3-uidl   UIDL after login        (needs --user/--password)
  smtp-ehlo   EHLO
  lmtp-lhlo   LHLO

    python benchmarks/neverread.py --server-pid PID --pop3 1110 \\
        --smtp 2525 --lmtp 2424 --user bench@example.org --password pw
"""

import argparse
import socket
import sys
import time

SCENARIOS = {
    # name: (protocol, command, commands to send at most, needs a login)
    "pop3-capa": ("pop3", b"CAPA\r\n", 2_000_000, False),
    "pop3-list": ("pop3", b"LIST\r\n", 2_000_000, True),
    "pop3-retr": ("pop3", b"RETR 1\r\n", 2_000_000, True),
    "pop3-uidl": ("pop3", b"UIDL\r\n", 2_000_000, True),
    "smtp-ehlo": ("smtp", b"EHLO x\r\n", 1_600_000, False),
    "lmtp-lhlo": ("lmtp", b"LHLO x\r\n", 1_600_000, False),
}


def rss(pid):
    """
    The resident memory of process C{pid}, in octets.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def readLine(sock):
    data = b""
    while not data.endswith(b"\n"):
        piece = sock.recv(1)
        if not piece:
            raise ConnectionError("closed")
        data += piece
    return data


def flood(host, port, command, count, login=None, stall=2.0, limit=120.0, receiveBuffer=4096):
    """
    Send C{command} C{count} times without reading a reply.

    @return: (octets the server took, whether it stopped reading, seconds).
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receiveBuffer)
    sock.settimeout(30)
    sock.connect((host, port))
    readLine(sock)
    if login is not None:
        user, password = login
        sock.sendall(f"USER {user}\r\n".encode())
        readLine(sock)
        sock.sendall(f"PASS {password}\r\n".encode())
        reply = readLine(sock)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"login failed: {reply!r}")
    sock.setblocking(False)
    block = command * max(1, 65536 // len(command))
    total = len(command) * count
    sent = 0
    started = time.monotonic()
    stalledSince = None
    stopped = False
    while sent < total and time.monotonic() - started < limit:
        try:
            sent += sock.send(block[: total - sent])
            stalledSince = None
        except BlockingIOError:
            now = time.monotonic()
            if stalledSince is None:
                stalledSince = now
            elif now - stalledSince >= stall:
                stopped = True
                break
            time.sleep(0.01)
    return sock, sent, stopped, time.monotonic() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--pop3", type=int)
    parser.add_argument("--smtp", type=int)
    parser.add_argument("--lmtp", type=int)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--stall", type=float, default=2.0,
                        help="seconds without progress that count as 'stopped reading'")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per scenario at most")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    ports = {"pop3": args.pop3, "smtp": args.smtp, "lmtp": args.lmtp}
    print(f"{'scenario':<10} {'sent':>10} {'of':>10} {'stopped':>8} {'s':>6}"
          f" {'RSS before':>11} {'at end':>8} {'growth':>8} {'after':>8}")
    for name in args.scenarios.split(","):
        protocol, command, count, needsLogin = SCENARIOS[name]
        port = ports[protocol]
        if port is None or (needsLogin and not args.user):
            continue
        login = (args.user, args.password) if needsLogin else None
        before = rss(args.server_pid)
        sock, sent, stopped, seconds = flood(
            args.host, port, command, count, login, args.stall, args.limit
        )
        during = rss(args.server_pid)
        sock.close()
        time.sleep(1.0)
        after = rss(args.server_pid)
        mb = 1024 * 1024
        print(
            f"{name:<10} {sent / mb:>8.1f}MB {len(command) * count / mb:>8.1f}MB"
            f" {'yes' if stopped else 'no':>8} {seconds:>6.1f}"
            f" {before / mb:>9.1f}MB {during / mb:>6.1f}MB {(during - before) / mb:>+6.1f}MB"
            f" {after / mb:>6.1f}MB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
