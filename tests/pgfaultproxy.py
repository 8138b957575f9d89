"""
A TCP relay between mailgate nodes and PostgreSQL that a test can pause
(stop forwarding without closing anything: a wedged pooler, a stopped
PostgreSQL, a middlebox that lost its state but still answers the TCP
handshake's kernel) and cut (close every relayed connection at once, and
refuse new ones until resumed: a network partition noticed by both ends).

The relay runs on threads of the test's own process (L{FaultProxy}) where
only others (a node, a process of its own) or psycopg's connections
(which let go of Python's lock while they wait) connect through it; in a
process of its own (L{RunningFaultProxy}) where libpq's blocking connect
(C{PQconnectdb}, as the maildrop lock connections are made) does, as it
keeps Python's lock while it waits.  A paused relay keeps reading nothing: the
kernel's buffers fill, the peers' TCP stays established and acknowledged,
so neither side's keepalive notices anything.
"""

import select
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit, urlunsplit


class FaultProxy:
    """
    Listens on 127.0.0.1 (port 0) and relays each connection to
    C{server} (host, port).

    @ivar address: (host, port) to connect to.
    """

    def __init__(self, server):
        self._server = server
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = self._listener.getsockname()
        # Forwarding towards the server, and towards the client (answers).
        self._flowing = {True: threading.Event(), False: threading.Event()}
        for flowing in self._flowing.values():
            flowing.set()
        self._refusing = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pairs = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, url):
        """
        C{url} (a postgresql:// URL of C{server}) pointed at this relay.
        """
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@" if auth else ""
        netloc += f"{self.address[0]}:{self.address[1]}"
        return urlunsplit(parts._replace(netloc=netloc))

    def pause(self, refuse=False, answers=False):
        """
        Stop forwarding in both directions; every connection stays open.

        @param refuse: close new connections at once (a server whose
            listener is gone) rather than hold them unanswered too.
        @param answers: stop forwarding the server's answers only: what
            the client sends still reaches the server (a COMMIT is
            carried out, its answer held).
        """
        self._refusing = refuse
        self._flowing[False].clear()
        if not answers:
            self._flowing[True].clear()

    def resume(self):
        self._refusing = False
        for flowing in self._flowing.values():
            flowing.set()

    def cut(self):
        """
        Close every relayed connection (both sides) and refuse new ones
        (closed at once) until L{resume}.
        """
        self._refusing = True
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    @property
    def connections(self):
        with self._lock:
            return len(self._pairs)

    def close(self):
        self._stopping.set()
        self.resume()
        self.cut()
        _close(self._listener)
        for thread in list(self._threads):
            thread.join(5)

    def _accept(self):
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._refusing:
                _close(client)
                continue
            try:
                server = socket.create_connection(self._server, timeout=10)
            except OSError:
                _close(client)
                continue
            for sock in (client, server):
                sock.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            for source, target, toServer in ((client, server, True), (server, client, False)):
                thread = threading.Thread(
                    target=self._relay, args=(source, target, self._flowing[toServer]), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _relay(self, source, target, flowing):
        while not self._stopping.is_set():
            flowing.wait()
            try:
                readable, _, _ = select.select([source], [], [], 0.2)
                if not readable:
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):
                break
            if not data:
                break
            # Paused after the read: hold what was read until resumed.
            flowing.wait()
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            if (source, target) in self._pairs or (target, source) in self._pairs:
                self._pairs = [p for p in self._pairs if source not in p]
        _close(source)
        _close(target)


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


class RunningFaultProxy:
    """
    A L{FaultProxy} in a process of its own, driven through its standard
    input: the same L{url}, L{pause}, L{resume}, L{cut} and L{close}, each
    done when it returns.
    """

    def __init__(self, server):
        self._process = subprocess.Popen(
            [sys.executable, __file__, server[0], str(server[1])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(10)
            raise RuntimeError("the relay did not start")
        self.address = ("127.0.0.1", int(line))

    url = FaultProxy.url

    def _ask(self, command):
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        if self._process.stdout.readline() != "done\n":
            raise RuntimeError(f"the relay did not do {command!r}")

    def pause(self, refuse=False, answers=False):
        self._ask(f"pause {int(refuse)} {int(answers)}")

    def resume(self):
        self._ask("resume")

    def cut(self):
        self._ask("cut")

    def close(self):
        self._process.kill()
        self._process.wait(10)
        self._process.stdin.close()
        self._process.stdout.close()


if __name__ == "__main__":
    relay = FaultProxy((sys.argv[1], int(sys.argv[2])))
    print(relay.address[1], flush=True)
    # One command a line, until the test kills it or its input ends.
    for command in sys.stdin:
        verb, *flags = command.split()
        if verb == "pause":
            relay.pause(*(bool(int(flag)) for flag in flags))
        else:
            getattr(relay, verb)()
        print("done", flush=True)
