# -*- test-case-name: tests.test_pop3_deletions -*-
"""
The messages a POP3 session has marked deleted (DELE), until QUIT removes
them or RSET unmarks them.
"""

from itertools import compress


class DeletionMarks:
    """
    Deletion marks by 0-based message index: an octet per message of the
    maildrop, from the first mark on (none before it).

    Not a C{set} of indexes: that cost some 84 octets per mark (a hash
    table slot and an C{int} each), so a client deleting every message of
    a 10,000-message maildrop (eleven octets a DELE) made its session hold
    840 KB, five times the maildrop's snapshot of sizes; this holds 10 KB.

    @param size: the number of messages in the maildrop.
    """

    __slots__ = ("_size", "_marks", "_count")

    def __init__(self, size=0):
        self._size = size
        self._marks = None
        self._count = 0

    def add(self, index):
        """
        Mark message C{index} (an index of the maildrop) deleted.
        """
        marks = self._marks
        if marks is None:
            marks = self._marks = bytearray(self._size)
        if not marks[index]:
            marks[index] = 1
            self._count += 1

    def clear(self):
        """
        Unmark every message (RSET).
        """
        self._marks = None
        self._count = 0

    def __contains__(self, index):
        marks = self._marks
        return marks is not None and 0 <= index < len(marks) and marks[index] != 0

    def __len__(self):
        return self._count

    def __iter__(self):
        """
        The marked indexes, in ascending order.
        """
        marks = self._marks
        if marks is None:
            return iter(())
        return compress(range(len(marks)), marks)

    def among(self, start, count):
        """
        The marks of messages C{start} to C{start + count - 1}, an octet
        each, non-zero for a marked message (for a listing to skip them
        without a look-up per message).
        """
        marks = self._marks
        if marks is None:
            return bytes(count)
        return marks[start : start + count]
