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
