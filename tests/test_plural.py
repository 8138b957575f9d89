"""
L{mailgate.plural}: the one rule for a count and its noun in texts people
read (the texts themselves are tested where they are made).
"""

from mailgate.plural import counted, noun


def test_oneIsSingularAndEveryOtherCountPlural():
    assert counted(1, "message") == "1 message"
    assert counted(2, "message") == "2 messages"
    assert counted(0, "message") == "0 messages"
    assert counted(1, "body", "bodies") == "1 body"
    assert counted(2, "body", "bodies") == "2 bodies"
    # Seconds given as floats: 1.0 is one second, 1.5 is not.
    assert counted(1.0, "second", spec="g") == "1 second"
    assert counted(1.5, "second", spec="g") == "1.5 seconds"
    # A verb agreeing with its count: "1 session gets", "2 sessions get".
    assert (noun(1, "gets", "get"), noun(2, "gets", "get")) == ("gets", "get")
