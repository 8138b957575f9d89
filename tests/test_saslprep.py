"""
SASLprep (RFC 4013) and the password SCRAM derives its keys from.
"""

import pytest

from mailgate.auth.passwords import scramPassword
from mailgate.auth.saslprep import SASLprepError, saslprep


@pytest.mark.parametrize(
    "text, prepared",
    [
        # RFC 4013 section 3's examples.
        ("I\u00adX", "IX"),
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),
        ("\u2168", "IX"),
        # A no-break space and an ideographic space are spaces; a
        # ligature and full-width letters are their letters.
        ("wonder\u00a0land\u3000", "wonder land "),
        ("\ufb01ne \uff21\uff22", "fine AB"),
        # Composed letters stay; decomposed ones are composed.
        ("caf\u00e9", "caf\u00e9"),
        ("cafe\u0301", "caf\u00e9"),
        ("\u05d0\u05d1", "\u05d0\u05d1"),
    ],
)
def test_saslprepMapsAndNormalises(text, prepared):
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    "text",
    [
        "\u0007",  # RFC 4013: a control character
        "a\u0000b",
        "\ue000",  # private use
        "\u0627\u0031",  # RFC 4013: right-to-left text ending in a digit
        "a\u05d0",  # left-to-right and right-to-left mixed
        "\u0221",  # unassigned in Unicode 3.2
    ],
)
def test_saslprepRefusesWhatItProhibits(text):
    with pytest.raises(SASLprepError):
        saslprep(text)


def test_scramDerivesKeysFromThePreparedPassword():
    """
    The password is prepared; one SASLprep refuses, or not UTF-8, is
    taken as it is rather than made unusable with SCRAM.
    """
    assert scramPassword("caf\u00e9\u00a0\ufb01ve") == "caf\u00e9 five".encode("utf-8")
    assert scramPassword("pencil") == b"pencil"
    assert scramPassword("tab\there") == b"tab\there"
    assert scramPassword(b"\xff\xfe") == b"\xff\xfe"
    # Prepared to nothing: as it is, not the empty password.
    assert scramPassword("\u00ad\u200b") == "\u00ad\u200b".encode("utf-8")
