"""
L{mailgate.printable}: the one replacement of unprintable text from outside
for log lines, traces and the administrator's terminal.
"""

from mailgate.printable import columns, leftAligned, printable


def test_printableTextIsItself():
    text = "alice@example.org said hello, caf\u00e9"
    assert printable(text) is text


def test_whatATerminalWouldObeyIsAQuestionMark():
    assert printable("a\x1b]0;title\x07b\r\nforged\tline") == "a?]0;title?b??forged?line"


def test_aLoneSurrogateIsAQuestionMark():
    assert printable(b"x\xffy".decode("utf-8", "surrogateescape")) == "x?y"


def test_columnsCountWideCharactersTwiceAndCombiningMarksNever():
    assert columns("alice@example.org") == 17
    assert columns("\u5f20\u4f1f@example.cn") == 4 + 11
    # Devanagari: a letter, a vowel sign that combines (Mn) and one that
    # takes a column of its own (Mc).
    assert columns("\u0915\u093f\u0901") == 2


def test_leftAlignedPadsToColumnsNotCharacters():
    assert leftAligned("bob@x.org", 12) == "bob@x.org   "
    wide = leftAligned("\u5f20\u4f1f@x.cn", 12)
    assert wide == "\u5f20\u4f1f@x.cn" + " " * 3
    assert leftAligned("\u5f20" * 8, 12) == "\u5f20" * 8
