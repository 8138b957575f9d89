# -*- test-case-name: tests.test_cli -*-
"""
The largest values the limits an administrator sets may take, the
parsers that read them (sizes as C{1G}, whole numbers) and refuse larger
ones, and sizes written back the same way: one place for C{mailgate} and
the settings of C{twistd mailgate} alike.

The database keeps limits in 64-bit integers, the retention task turns
days into seconds, and bans end at a time that logs show as a date: a
value past these bounds would not mean "a lot" but fail later, at every
delivery or every pass (an C{OverflowError} from the database driver).
The bounds are far beyond any real need and far inside those integers;
where "no limit" is meant, the limits say so in words (C{none},
C{never}).
"""

import re

#: The largest size (a quota, a message): 1024T, 2**50 octets.
MAX_SIZE = 1 << 50
#: The most messages a quota counts.
MAX_MESSAGES = 10**12
#: The most days a retention, a recovery period or an age in days may
#: be: about 100 years.
MAX_DAYS = 36500

#: why a retention of 0 days is refused
ZERO_DAYS = (
    "must be at least 1, not 0: 0 days would remove every message at the next "
    "retention pass; never keeps mail"
)

#: why a quota of 0 is refused: it would refuse every message (for ever: a
#: full mailbox is a temporary failure), where Dovecot reads 0 as no limit
ZERO_QUOTA = (
    "must be at least 1, not 0: a quota of 0 would refuse every message (no limit: no "
    "--default-quota, or a user's quota none)"
)


# Sizes as administrators write them: units of 1024, as Dovecot's quota
# settings count them.
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# A whole number as settings are written: ASCII digits, a sign allowed (so
# that "-3" is told it must not be negative, not that it is no number).
_WHOLE = re.compile(r"\s*([+-]?)0*([0-9]+)\s*\Z", re.ASCII)
# More digits than any bound has.
_DIGITS = 30


def parseSize(text):
    """
    Octets from C{1G}, C{500M}, C{64k}, C{1GiB} or a plain number (units
    of 1024, as Dovecot's quota settings count them), at most
    L{MAX_SIZE}.

    @raise ValueError: saying what is wrong.
    """
    digits = re.match(r"\s*0*([0-9]*)", text or "", re.ASCII).group(1)
    if len(digits) > _DIGITS:
        raise ValueError(f"too large: {_shortened(text.strip())} (at most {formatSize(MAX_SIZE)})")
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 1G, 500M, 64K or octets)")
    number, unit, _ = match.groups()
    octets = int(number) * _UNITS[unit.lower()]
    if octets > MAX_SIZE:
        raise ValueError(f"too large: {_shortened(text.strip())} (at most {formatSize(MAX_SIZE)})")
    return octets


def formatSize(octets):
    """
    A size the way L{parseSize} reads it, exact: C{1G}, C{1536K}, C{1000}.
    """
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if octets and octets % factor == 0:
            return f"{octets // factor}{unit}"
    return str(octets)


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
