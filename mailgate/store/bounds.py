# -*- test-case-name: tests.test_cli -*-
"""
The largest values the limits an administrator sets may take, and the
parsers that refuse larger ones: one place for C{mailgate} and the
settings of C{twistd mailgate} alike.

The database keeps limits in 64-bit integers, the retention task turns
days into seconds, and bans end at a time that logs show as a date: a
value past these bounds would not mean "a lot" but fail later, at every
delivery or every pass (an C{OverflowError} from the database driver).
The bounds are far beyond any real need and far inside those integers;
where "no limit" is meant, the limits say so in words (C{none},
C{never}).
"""

import re

from mailgate.store.lifecycle import formatSize, parseSize as _parseSize

#: The largest size (a quota, a message): 1024T, 2**50 octets.
MAX_SIZE = 1 << 50
#: The most messages a quota counts.
MAX_MESSAGES = 10**12
#: The most days a retention, a recovery period or an age in days may
#: be: about 100 years.
MAX_DAYS = 36500


# A whole number as settings are written: ASCII digits, a sign allowed (so
# that "-3" is told it must not be negative, not that it is no number).
_WHOLE = re.compile(r"\s*([+-]?)0*([0-9]+)\s*\Z", re.ASCII)
# More digits than any bound has.
_DIGITS = 30


def parseSize(text):
    """
    Octets from a size as L{mailgate.store.lifecycle.parseSize} reads it
    (C{1G}, C{500M}, octets), at most L{MAX_SIZE}.

    @raise ValueError: saying what is wrong.
    """
    digits = re.match(r"\s*0*([0-9]*)", text or "", re.ASCII).group(1)
    if len(digits) > _DIGITS:
        raise ValueError(f"too large: {_shortened(text.strip())} (at most {formatSize(MAX_SIZE)})")
    octets = _parseSize(text)
    if octets > MAX_SIZE:
        raise ValueError(f"too large: {_shortened(text.strip())} (at most {formatSize(MAX_SIZE)})")
    return octets


def parseWhole(text, maximum):
    """
    A whole number from C{text}, at most C{maximum}.  A sign is read, so
    that C{-3} can be told it must not be negative (by the caller) rather
    than that it is not a number.

    @raise ValueError: saying what is wrong.
    """
    match = _WHOLE.match(text)
    if match is None:
        # int() would also take "1_000" and other scripts' digits ("١٢"):
        # what an administrator writes in a configuration is ASCII.
        raise ValueError(f"not a whole number: {_shortened(text)!r}")
    if len(match.group(2)) > _DIGITS:
        # Past any maximum, and past what int() converts (4300 digits).
        raise ValueError(f"must be at most {maximum}, not {_shortened(match.group(2))}")
    return checkMaximum(int(match.group(1) + match.group(2)), maximum)


def checkMaximum(number, maximum):
    """
    C{number}, if it is at most C{maximum}.

    @raise ValueError: if it is larger.
    """
    if number > maximum:
        raise ValueError(f"must be at most {maximum}, not {_shortened(str(number))}")
    return number


def _shortened(text):
    """
    Text for an error message, a huge number cut short.
    """
    return text if len(text) <= 30 else text[:27] + "..."
