"""
L{mailgate.printable}: the one replacement of unprintable text from outside
for log lines, traces and the administrator's terminal.
"""

from mailgate.printable import printable


def test_printableTextIsItself():
    text = "alice@example.org said hello, caf\u00e9"
    assert printable(text) is text


def test_whatATerminalWouldObeyIsAQuestionMark():
    assert printable("a\x1b]0;title\x07b\r\nforged\tline") == "a?]0;title?b??forged?line"


def test_aLoneSurrogateIsAQuestionMark():
    assert printable(b"x\xffy".decode("utf-8", "surrogateescape")) == "x?y"
