"""
The floor at one client: what a command and a short session cost a server
when one client waits for each answer before sending the next command (the
one-client rows of C{make bench}), measured beside two servers that do no
mail work at all.

    .venv/bin/python benchmarks/floor.py [--rounds 5] [--commands 20000] [--sessions 2000]

Four servers, each on 127.0.0.1, measured in interleaved rounds (medians):

  - C{c-fixed}: a C epoll loop answering every line with a fixed reply of
    the size of an average TOP n 0 answer (compiled here with C{cc}; left
    out, and said so, without a compiler): the kernel's part of a
    command (wake-up, recv, send over loopback).
  - C{twisted-fixed}: a bare Twisted line protocol (epoll reactor,
    C{LineOnlyReceiver}) giving the same fixed replies: the least any
    Twisted server pays per command and per connection.
  - C{dovecot-hp} (benchmarks/dovecot.py, warm credentials) and
    C{mailgate} (SQLite) on a small corpus of the standard kind.

Per command: one logged-in session sends C{TOP n 0} (n going round the
maildrop) or C{NOOP} many times, each answered before the next; server CPU
(the process tree, /proc) divided by the commands.  Per session: a new
connection each time, greeting, USER, PASS, STAT, QUIT.  The fixed servers
answer USER, PASS and NOOP with C{+OK} and every other line (STAT, TOP)
with the fixed reply.

Where each runs (C{--server-cpus}, C{--client-cpus}): by default nothing is
pinned.  C{--server-cpus 0} puts every server on CPU 0 (mailgate with
C{--cpu-affinity}, Dovecot's processes and the fixed servers with
C{sched_setaffinity}), and C{--client-cpus} the measuring client where it
is said: on the servers' CPU or on another.  When the client is on another
CPU, every reply wakes it there, and every command wakes the server; in a
virtual machine those cross-CPU wake-ups are a large part of what one
client costs a server, whatever the server is.

Nothing here is a target: it says how much of a one-client figure is left
for a server's own work once the kernel and the framework have had theirs.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus as corpusModule  # noqa: E402
import dovecot as dovecotModule  # noqa: E402
import pop3load  # noqa: E402
import run  # noqa: E402

#: a POP3-shaped server in C: epoll, one recv and one send per line
C_SOURCE = r"""
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atoi(argv[1]) : 64;
    char *reply = malloc(size);
    memset(reply, 'x', size);
    memcpy(reply, "+OK\r\n", 5);
    memcpy(reply + size - 5, "\r\n.\r\n", 5);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = inet_addr("127.0.0.1");
    if (bind(listener, (void *)&address, sizeof address) || listen(listener, 64)) return 1;
    socklen_t length = sizeof address;
    getsockname(listener, (void *)&address, &length);
    printf("%d\n", ntohs(address.sin_port));
    fflush(stdout);
    int poller = epoll_create1(0);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(poller, EPOLL_CTL_ADD, listener, &event);
    char buffer[65536];
    for (;;) {
        struct epoll_event events[64];
        int ready = epoll_wait(poller, events, 64, -1);
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int client = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
                if (client < 0) continue;
                int one = 1;
                setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                send(client, "+OK ready\r\n", 11, 0);
                struct epoll_event added = {.events = EPOLLIN, .data.fd = client};
                epoll_ctl(poller, EPOLL_CTL_ADD, client, &added);
                continue;
            }
            ssize_t got = recv(fd, buffer, sizeof buffer, 0);
            if (got <= 0) { close(fd); continue; }
            if (!memcmp(buffer, "QUIT", 4)) { send(fd, "+OK\r\n", 5, 0); close(fd); continue; }
            if (!memcmp(buffer, "USER", 4) || !memcmp(buffer, "PASS", 4) || !memcmp(buffer, "NOOP", 4))
                send(fd, "+OK\r\n", 5, 0);
            else
                send(fd, reply, size, 0);
        }
    }
}
"""


def fixedReply(size):
    """
    The fixed servers' answer to STAT and TOP: a multi-line reply of
    C{size} octets (at least 10).
    """
    size = max(size, 10)
    return b"+OK\r\n" + b"x" * (size - 10) + b"\r\n.\r\n"


def serveTwisted(size):
    """
    The bare Twisted server (C{--serve-twisted SIZE}): prints its port,
    then runs until killed.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import protocol, reactor
    from twisted.protocols.basic import LineOnlyReceiver

    reply = fixedReply(size)

    class Fixed(LineOnlyReceiver):
        def connectionMade(self):
            self.transport.write(b"+OK ready\r\n")

        def lineReceived(self, line):
            if line.startswith((b"USER", b"PASS", b"NOOP")):
                self.transport.write(b"+OK\r\n")
            elif line.startswith(b"QUIT"):
                self.transport.write(b"+OK\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(reply)

    factory = protocol.Factory.forProtocol(Fixed)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


class Client:
    """
    One blocking POP3 client connection (TCP_NODELAY), reading whole
    answers.
    """

    def __init__(self, port):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.socket.makefile("rb")
        self.status()

    def status(self):
        line = self.file.readline()
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"server answered {line[:80]!r}")
        return line

    def command(self, line, multi=False):
        self.socket.sendall(line + b"\r\n")
        status = self.status()
        size = len(status)
        if multi:
            while True:
                line = self.file.readline()
                if not line:
                    raise RuntimeError("connection closed in a multi-line answer")
                size += len(line)
                if line == b".\r\n":
                    break
        return size

    def login(self, user, password):
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())

    def close(self):
        self.file.close()
        self.socket.close()


def commandLines(command, count, messages):
    """
    C{count} command lines: C{TOP n 0} with n going round C{messages}
    messages, or C{command} itself.
    """
    if command == "TOP":
        return [b"TOP %d 0" % (i % messages + 1) for i in range(count)]
    return [command.encode()] * count


def perCommand(port, pids, user, password, lines):
    """
    Server CPU microseconds per command over one logged-in session.
    """
    client = Client(port)
    try:
        client.login(user, password)
        multi = lines[0].startswith(b"TOP")
        for line in lines[:200]:
            client.command(line, multi)
        before = pop3load.cpuSeconds(pids)
        for line in lines:
            client.command(line, multi)
        return (pop3load.cpuSeconds(pids) - before) / len(lines) * 1e6
    finally:
        client.command(b"QUIT")
        client.close()


def statSession(port, user, password):
    client = Client(port)
    try:
        client.login(user, password)
        client.socket.sendall(b"STAT\r\n")
        if client.status() == b"+OK\r\n":
            # A fixed server's multi-line reply.
            while True:
                line = client.file.readline()
                if not line:
                    raise RuntimeError("connection closed in a multi-line answer")
                if line == b".\r\n":
                    break
        client.command(b"QUIT")
    finally:
        client.close()


def perSession(port, pids, users, password, count):
    """
    Server CPU microseconds per stat session, C{count} sessions one after
    another, the users taken in turn.
    """
    for i in range(50):
        statSession(port, users[i % len(users)], password)
    before = pop3load.cpuSeconds(pids)
    for i in range(count):
        statSession(port, users[i % len(users)], password)
    return (pop3load.cpuSeconds(pids) - before) / count * 1e6


def meanTopSize(port, user, password, messages):
    """
    The mean size of the answers to TOP n 0 over a maildrop's messages.
    """
    client = Client(port)
    try:
        client.login(user, password)
        return sum(client.command(b"TOP %d 0" % n, True) for n in range(1, messages + 1)) // messages
    finally:
        client.command(b"QUIT")
        client.close()


def compileC(workdir):
    """
    The C server's executable, or C{None} (and why) without a compiler.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) on this machine"
    source = os.path.join(workdir, "fixed.c")
    with open(source, "w") as f:
        f.write(C_SOURCE)
    executable = os.path.join(workdir, "fixed")
    result = subprocess.run([compiler, "-O2", "-o", executable, source], capture_output=True, text=True)
    if result.returncode != 0:
        return None, f"cc failed: {result.stderr.strip()[:200]}"
    return executable, None


def startFixed(argv):
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"{argv[0]} did not print its port")
    return process, int(line)


def measure(args):
    corpus = corpusModule.Corpus(args.users, args.messages)
    serverCPUs = run.parseCPUs(args.server_cpus) if args.server_cpus else None
    workdir = tempfile.mkdtemp(prefix="mailgate-floor-")
    # Dovecot's unprivileged processes must reach their files.
    os.chmod(workdir, 0o755)
    processes, servers, notes = [], {}, []
    mailgate = dv = None
    try:
        database = "sqlite:///" + os.path.join(workdir, "mailgate.sqlite3")
        run.log(f"loading {args.users} x {args.messages} messages into mailgate")
        run.loadMailgate(args.bin, database, corpus)
        mailgate = run.MailgateServer(args.bin, database, os.path.join(workdir, "mailgate.log"),
                                      lmtp=False, smtp=False, cpus=args.server_cpus)
        mailgate.start()
        if dovecotModule.available():
            dv = dovecotModule.Dovecot(os.path.join(workdir, "dovecot"), variant="hp", credentials="warm")
            dv.loadCorpus(corpus)
            dv.start()
            if serverCPUs:
                dv.pin(serverCPUs)
        else:
            notes.append("Dovecot is not installed: no dovecot-hp row")
        size = meanTopSize(mailgate.ports["POP3"], corpus.users[0], corpus.password, args.messages)
        executable, why = compileC(workdir)
        if executable is None:
            notes.append(f"no c-fixed row: {why}")
        else:
            process, port = startFixed([executable, str(size)])
            processes.append(process)
            if serverCPUs:
                pop3load.pinProcessTrees([process.pid], serverCPUs)
            servers["c-fixed"] = (port, [process.pid])
        process, port = startFixed([sys.executable, os.path.abspath(__file__), "--serve-twisted", str(size)])
        processes.append(process)
        if serverCPUs:
            pop3load.pinProcessTrees([process.pid], serverCPUs)
        servers["twisted-fixed"] = (port, [process.pid])
        if dv is not None:
            servers["dovecot-hp"] = (dv.pop3Port, [dv.pid])
        servers["mailgate"] = (mailgate.ports["POP3"], [mailgate.pid])
        if args.client_cpus:
            # Only now: the servers started above would have inherited it.
            os.sched_setaffinity(0, run.parseCPUs(args.client_cpus))
        measurements = {
            "TOP n 0": lambda port, pids: perCommand(
                port, pids, corpus.users[0], corpus.password, commandLines("TOP", args.commands, args.messages)),
            "NOOP": lambda port, pids: perCommand(
                port, pids, corpus.users[0], corpus.password, commandLines("NOOP", args.commands, args.messages)),
            "stat session": lambda port, pids: perSession(port, pids, corpus.users, corpus.password, args.sessions),
        }
        figures = {}
        for r in range(args.rounds):
            for what, function in measurements.items():
                for name, (port, pids) in servers.items():
                    steal = pop3load.systemStealSeconds()
                    began = time.monotonic()
                    value = function(port, pids)
                    stealCores = (pop3load.systemStealSeconds() - steal) / (time.monotonic() - began)
                    figures.setdefault((what, name), []).append(value)
                    run.log(f"round {r + 1}: {what}, {name}: {value:.1f} us of server CPU, steal {stealCores:.2f} cores")
        return figures, list(servers), list(measurements), size, notes
    finally:
        for process in processes:
            process.kill()
            process.wait()
        if mailgate is not None:
            mailgate.stop()
        if dv is not None:
            dv.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def placement(args):
    """
    Where the servers and the client ran, in words.
    """
    servers = f"servers on CPU {args.server_cpus}" if args.server_cpus else "servers where the kernel put them"
    client = f"the client on CPU {args.client_cpus}" if args.client_cpus else "the client where the kernel put it"
    return f"{servers}, {client}"


def table(figures, servers, measurements, size):
    """
    The medians, one row per server, µs of server CPU, and each as a
    multiple of Dovecot hp's where it was measured.
    """
    lines = [
        f"server CPU per command and per stat session at one client, microseconds "
        f"(medians; fixed replies of {size} octets, the mean TOP n 0 answer; warm credentials on both "
        f"mail servers: mailgate's verified-login cache, warmed by the first sessions, and Dovecot's "
        f"{{PLAIN}} passwords with its auth cache)",
        "",
        "| server | " + " | ".join(measurements) + " |",
        "|---|" + "---:|" * len(measurements),
    ]
    medians = {key: statistics.median(values) for key, values in figures.items()}
    for name in servers:
        cells = []
        for what in measurements:
            value = medians[(what, name)]
            reference = medians.get((what, "dovecot-hp"))
            cell = f"{value:.1f}"
            if reference and name != "dovecot-hp":
                cell += f" ({value / reference:.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parseArgs(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commands", type=int, default=20000, help="commands per per-command measurement")
    parser.add_argument("--sessions", type=int, default=2000, help="sessions per per-session measurement")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--bin", default=os.path.dirname(sys.executable), help="where twistd and mailgate are")
    parser.add_argument("--server-cpus", default=None, metavar="CPUS",
                        help="run every server on these CPUs, e.g. 0 (default: not pinned)")
    parser.add_argument("--client-cpus", default=None, metavar="CPUS",
                        help="run the measuring client on these CPUs, e.g. 0 or 1 (default: not pinned)")
    parser.add_argument("--serve-twisted", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("server_cpus", "client_cpus"):
        value = getattr(args, option)
        if value is not None:
            try:
                setattr(args, option, run.formatCPUs(run.parseCPUs(value)))
            except ValueError as e:
                parser.error(f"--{option.replace('_', '-')}: {e}")
    return args


def main(argv=None):
    args = parseArgs(argv)
    if args.serve_twisted is not None:
        serveTwisted(args.serve_twisted)
        return 0
    figures, servers, measurements, size, notes = measure(args)
    print(table(figures, servers, measurements, size))
    print(f"\ncorpus: {args.users} users x {args.messages} messages of the standard kind (benchmarks/corpus.py); "
          f"{placement(args)}")
    for note in notes:
        print(f"\nnote: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
