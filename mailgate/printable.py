"""
Text from outside (a client's words, a login name, a POP3 server's reply,
a maildir's file names, a command-line argument) fit to show in one line
of a log, a trace or an administrator's terminal.

Whoever chose such text may put in it an escape sequence, which a terminal
obeys (a window title, a cleared screen), or a line break, which starts a
line that looks like mailgate's own.  The SMTP and POP3 sessions, the
session trace, the POP3 importer and the admin commands each wrote the
same replacement; it is here once, so that they cannot come to differ.
"""


def printable(text):
    """
    C{text} with anything unprintable (controls, line breaks, lone
    surrogates) as C{?}; C{text} itself when all of it is printable, the
    usual case, which costs one scan.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def leftAligned(text, width):
    """
    C{text} followed by the spaces that make it C{width} columns wide on a
    terminal (no spaces if it is as wide or wider), as C{f"{text:<{width}}"}
    pads ASCII: a user name in CJK letters takes two columns a character
    and one with combining marks fewer than its characters, so that
    padding by characters left the admin commands' columns out of line
    for UTF-8 local parts.
    """
    if text.isascii():
        return text.ljust(width)
    return text + " " * max(0, width - columns(text))


def columns(text):
    """
    The columns a terminal gives C{text} (printable, see L{printable}):
    wide and full-width characters (Unicode's East Asian Width C{W} and
    C{F}) two, combining marks and other zero-width characters none, the
    rest one, as C{wcwidth(3)} counts them.
    """
    from unicodedata import category, east_asian_width

    width = 0
    for ch in text:
        if category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if east_asian_width(ch) in ("W", "F") else 1
    return width
