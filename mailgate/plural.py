"""
Counts with their nouns in texts people read: "1 message", "2 messages".

Admin output, log lines and free-form replies used to say "1 messages"
and "expires in 1 days"; every such text takes its noun from here, so
there is one rule and not a copy of it at each place.  Machine-read
formats (POP3 STAT and LIST lines, "+OK n octets" of RETR and TOP,
JSON field names, metric names) keep their fixed words and do not use
this.
"""


def noun(count, singular, plural=None):
    """
    C{singular} for a count of exactly 1, else C{plural} (by default
    C{singular} with an "s"): English says "0 messages" and "1.5 seconds".
    """
    if count == 1:
        return singular
    return singular + "s" if plural is None else plural


def counted(count, singular, plural=None, spec=""):
    """
    C{count} and its noun, e.g. C{counted(1, "message")} is
    C{"1 message"}; C{spec} formats the count (C{"g"} for seconds given as
    a float).
    """
    return f"{count:{spec}} {noun(count, singular, plural)}"
