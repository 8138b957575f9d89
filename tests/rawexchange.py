"""
What the differential tests against Dovecot share
(tests/test_pop3_vs_dovecot.py, tests/test_lmtp_vs_dovecot.py): a raw
connection that sends octets as given and reads them as they come, the
steps a sequence is made of, and the differences a comparison accepts.

    from rawexchange import Difference, RawConnection, batch, fail, lines

This module holds no tests.
"""

import socket

import attr
import pytest


class RawConnection:
    """
    A client connection to 127.0.0.1: octets sent as given, received into
    C{buffer} as they come, each read waiting at most C{timeout} seconds.
    Once the server has closed (or reset) it, C{closed} is set and sending
    does nothing; what the server sent before is still read.
    """

    def __init__(self, port, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.closed = False

    def _fill(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            raise EOFError()
        self.buffer += data

    def _until(self, terminator):
        """
        What was received up to and including C{terminator}.

        @raise EOFError: the connection closed before it came.
        """
        while terminator not in self.buffer:
            self._fill()
        end = self.buffer.index(terminator) + len(terminator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def _line(self):
        """
        The next line, without its line end (LF, or CRLF).
        """
        return self._until(b"\n")[:-1].rstrip(b"\r")

    def send(self, data):
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def close(self):
        self.sock.close()


def lines(*texts):
    """
    Steps of one line each, sent one after the other.
    """
    return [t if isinstance(t, bytes) else t.encode("utf-8") + b"\r\n" for t in texts]


def batch(*texts):
    """
    One step: the lines sent in one write (pipelining: RFC 2449 for POP3,
    RFC 2920 for SMTP and LMTP).
    """
    return tuple(lines(*texts))


@attr.s(frozen=True)
class Difference:
    """
    A difference the comparison accepts.

    @ivar name: what it is called in a failure's message.
    @ivar explains: C{Exchange -> bool}.
    @ivar diverges: once it applies, the two sessions are no longer in the
        same state (one closed, one logged out): the rest of the sequence
        is not compared.
    """

    name = attr.ib()
    explains = attr.ib()
    diverges = attr.ib(default=False)


def fail(problems):
    """
    Fail the test with the first twenty differences nothing explains.
    """
    if problems:
        text = "\n".join(repr(p) for p in problems[:20])
        pytest.fail(f"{len(problems)} unexplained differences from Dovecot:\n{text}", pytrace=False)
