# -*- test-case-name: tests.test_saslprep -*-
"""
SASLprep (RFC 4013), the preparation SCRAM asks of a password before its
keys are derived (RFC 5802 section 2.2, "Normalize").

Clients built on GNU SASL (mpop, msmtp) or Python's scramp prepare the
password they are given; keys made from the password as it was typed then
fail them wherever SASLprep changes it: a no-break space, a soft hyphen,
a ligature, full-width or superscript characters.  Plain ASCII and
ordinary composed letters are their own preparation.
"""

import stringprep
import unicodedata

# RFC 4013 section 2.3; the spaces of C.1.2 are mapped away first.
_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    # A "stored string" (RFC 5802): unassigned code points are refused.
    stringprep.in_table_a1,
)


class SASLprepError(ValueError):
    """
    The string holds what SASLprep prohibits.
    """


def saslprep(text):
    """
    C{text} prepared by SASLprep as a stored string: non-ASCII spaces
    become spaces, what maps to nothing goes, the result is NFKC (of
    Unicode 3.2, as RFC 3454 fixes it).

    @raise SASLprepError: if the result holds a prohibited character
        (controls, private use, surrogates, unassigned code points...) or
        breaks the bidirectional rule (RFC 3454 section 6).
    """
    prepared = _mappedAndNormalized(text)
    for c in prepared:
        if any(prohibited(c) for prohibited in _PROHIBITED):
            raise SASLprepError(f"prohibited character U+{ord(c):04X}")
    rightToLeft = [stringprep.in_table_d1(c) for c in prepared]
    if any(rightToLeft):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise SASLprepError("right-to-left and left-to-right characters mixed")
        if not (rightToLeft[0] and rightToLeft[-1]):
            raise SASLprepError("right-to-left text must start and end with a right-to-left character")
    return prepared


def _mappedAndNormalized(text):
    """
    SASLprep's mapping and normalisation (RFC 4013 sections 2.1 and 2.2):
    non-ASCII spaces as spaces, what maps to nothing gone, NFKC of Unicode
    3.2.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    return unicodedata.ucd_3_2_0.normalize("NFKC", mapped)


def preparedName(name):
    """
    A SCRAM user name as SASLprep prepares a query string, which RFC 5802
    section 5.1 has the server do to the name it is sent (or compare names
    as if it had): a client that prepares its user's name sends C{ａb} as
    C{ab}, and one that does not sends it as typed; both name one user.

    Its prohibitions and bidirectional rule are not applied: what they
    refuse, no user's address holds (L{mailgate.address.normalizeAddress}
    refuses controls, spaces, invisible and compatibility characters), and
    the bidirectional rule would refuse every right-to-left local part
    before its left-to-right domain.  An ASCII name is its own preparation,
    returned as it is.

    The name is composed by the running Python's Unicode first: SASLprep's
    Unicode 3.2 decomposed five CJK compatibility ideographs (U+2F868,
    U+2F874, U+2F91F, U+2F95F, U+2F9BF) into other ideographs than
    Unicode 4.0 corrected them to, which user names follow, so such a name
    reached another user by SCRAM than by PLAIN.  Every other name reaches
    the user it reached before: composing first changes only ideographs
    Unicode 3.2 did not have, which the address's own normalisation
    composes the same way.
    """
    if name.isascii():
        return name
    return _mappedAndNormalized(unicodedata.normalize("NFC", name))
