"""
A TCP relay between mailgate nodes and PostgreSQL that a test can pause
(stop forwarding without closing anything: a wedged pooler, a stopped
PostgreSQL, a middlebox that lost its state but still answers the TCP
handshake's kernel) and cut (close every relayed connection at once, and
refuse new ones until resumed: a network partition noticed by both ends).

The relay runs on threads of the test's own process: only the node (a
process of its own) connects through it, so libpq blocking the test's
interpreter never stops it.  A paused relay keeps reading nothing: the
kernel's buffers fill, the peers' TCP stays established and acknowledged,
so neither side's keepalive notices anything.
"""

import select
import socket
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
        self._flowing = threading.Event()
        self._flowing.set()
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

    def pause(self, refuse=False):
        """
        Stop forwarding in both directions; every connection stays open.

        @param refuse: close new connections at once (a server whose
            listener is gone) rather than hold them unanswered too.
        """
        self._refusing = refuse
        self._flowing.clear()

    def resume(self):
        self._refusing = False
        self._flowing.set()

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
        self._flowing.set()
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
            for source, target in ((client, server), (server, client)):
                thread = threading.Thread(target=self._relay, args=(source, target), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _relay(self, source, target):
        while not self._stopping.is_set():
            self._flowing.wait()
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
            self._flowing.wait()
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
