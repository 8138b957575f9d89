"""
XFORWARD and XCLIENT (SMTP and LMTP) from a relay on --xclient-network,
generated: whatever attributes and values it sends (xtext escapes of any
octet among them: line breaks, NULs, "%", non-ASCII), the command is
answered (250, XCLIENT's new greeting, or 501 5.5.4 with a reason), the
session goes on, and nothing of the values reaches a log line, a log
event's field or the Received field as a control character: a relay's
values are shown, never obeyed by a terminal or a log reader.
"""

import re

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from mailgate.testing import memoryStore, addUser

from test_smtp_xforward import ALICE, PASSWORD, end, receivedField, session, transaction
from fuzzing import fuzzSettings

FUZZ = fuzzSettings(150)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

names = st.sampled_from(
    ["NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE", "LOGIN", "SESSION", "TTL", "name", "COLOUR"]
)
# Values as a relay writes them: a start (an address of any form, a
# name, nothing), then xtext (+XX: control octets most often, any octet)
# and text as is.
octetEscapes = st.one_of(st.integers(0, 0x1F), st.just(0x7F), st.integers(0, 255)).map(lambda o: "+%02X" % o)
starts = st.sampled_from(
    ["", "192.0.2.7", "IPV6:2001:db8::7", "IPV6:fe80::1%", "fe80::1%", "::ffff:192.0.2.7", "[UNAVAILABLE]",
     "LOCAL", "ESMTP", "4711", "mail.example.net", "é", "\u2028"]
)
valueParts = st.one_of(
    octetEscapes, st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
)
values = st.tuples(starts, st.lists(valueParts, max_size=4)).map(lambda t: t[0] + "".join(t[1]))
arguments = st.lists(st.tuples(names, values), min_size=0, max_size=5).map(
    lambda items: " ".join(f"{name}={value}" for name, value in items)
)


def _shownWithoutControls(event):
    for key, value in event.items():
        if isinstance(value, str) and key not in ("log_format", "log_namespace"):
            assert not _CONTROL.search(value), (key, value)


@FUZZ
@given(st.sampled_from(["XFORWARD", "XCLIENT"]), st.booleans(), arguments)
@example("XFORWARD", False, "ADDR=IPV6:fe80::1%+0D+0AX-Injected:+20yes")
def test_anyAttributesAreAnsweredAndShownWithoutControlCharacters(command, lmtp, argument):
    store = memoryStore()
    addUser(store, ALICE, PASSWORD)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        s = session(store, lmtp=lmtp)
        reply = s.command(f"{command} {argument}".rstrip())
        assert re.fullmatch(r"(250 2\.0\.0 OK|220 .*|501 5\.5\.4 .*)\r\n", reply), reply
        assert not _CONTROL.search(reply[:-2]), reply
        if reply.startswith("220"):
            # XCLIENT's new greeting: the session starts over.
            hello = s.command(("LHLO" if lmtp else "EHLO") + " relay.example.org")
            assert hello.startswith("250"), hello
        out = transaction(s)
        # Delivered (LMTP's one recipient's reply, SMTP's one).
        assert out.splitlines()[-1].startswith("250 2.0.0 "), out
        s.command("QUIT")
        end(s)
        received = receivedField(store, 1)
        assert not _CONTROL.search(received), received
    finally:
        globalLogPublisher.removeObserver(events.append)
        store.close()
    for event in events:
        _shownWithoutControls(event)
