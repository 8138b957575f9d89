"""
A relay between libpq and a PostgreSQL server that hands its clients a
backend key of its own, as a connection pooler (PgBouncer) does: the
C{BackendKeyData} a client sees names a pid no backend has.  Everything
else passes through as it is.

It runs in a process of its own (L{start}): libpq's blocking connect
(C{PQconnectdb}, as mailgate's lock connections are made) keeps Python's
lock while it waits, so a relay on a thread of the test's own process
would never get to answer it.
"""

import socket
import struct
import subprocess
import sys
import threading

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _readExactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class KeyRewritingProxy:
    """
    Listens on 127.0.0.1 (port 0) and relays each connection to C{server}
    (host, port), replacing the pid in the server's C{BackendKeyData} by
    C{pid}.  Refuses TLS and GSS encryption (libpq then goes on in the
    clear), so the messages can be read.

    @ivar address: (host, port) to connect to.
    """

    def __init__(self, server, pid=1):
        self._server = server
        self._pid = pid
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = self._listener.getsockname()
        self._stopping = threading.Event()
        self._sockets = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self):
        self._stopping.set()
        for sock in self._sockets + [self._listener]:
            try:
                sock.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def _accept(self):
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(self._server, timeout=10)
            server.settimeout(None)
            self._sockets += [client, server]
            for target in (self._fromClient, self._fromServer):
                thread = threading.Thread(target=target, args=(client, server), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _fromClient(self, client, server):
        try:
            while True:
                length, code = struct.unpack("!ii", _readExactly(client, 8))
                if length == 8 and code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    client.sendall(b"N")
                    continue
                server.sendall(struct.pack("!ii", length, code) + _readExactly(client, length - 8))
                break
            while True:
                data = client.recv(65536)
                if not data:
                    break
                server.sendall(data)
        except OSError:
            pass
        finally:
            self._closeBoth(client, server)

    def _fromServer(self, client, server):
        try:
            while True:
                header = _readExactly(server, 5)
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                body = _readExactly(server, length - 4)
                if kind == b"K":
                    body = struct.pack("!i", self._pid) + body[4:]
                client.sendall(header + body)
        except OSError:
            pass
        finally:
            self._closeBoth(client, server)

    @staticmethod
    def _closeBoth(client, server):
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RunningProxy:
    """
    A L{KeyRewritingProxy} in a process of its own.

    @ivar address: (host, port) to connect to.
    """

    def __init__(self, server, pid=1):
        self._process = subprocess.Popen(
            [sys.executable, __file__, server[0], str(server[1]), str(pid)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(10)
            raise RuntimeError("the relay did not start")
        self.address = ("127.0.0.1", int(line))

    def close(self):
        self._process.kill()
        self._process.wait(10)
        self._process.stdout.close()


def start(server, pid=1):
    """
    A relay to C{server} (host, port) in a process of its own, handing out
    C{pid} as the backend's: a L{RunningProxy}, to L{RunningProxy.close}.
    """
    return RunningProxy(server, pid)


if __name__ == "__main__":
    host, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    proxy = KeyRewritingProxy((host, port), pid)
    print(proxy.address[1], flush=True)
    # Until the test kills it, or at most ten minutes.
    proxy._stopping.wait(600)
