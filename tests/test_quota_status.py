"""
The quota-status service (C{--quota-status}, L{mailgate.smtp.policyservice})
without sockets: Postfix's policy delegation protocol over a
StringTransport, with a clock for the idle timer, answered from a real
SQLite file and a PostgreSQL database by the same RCPT check SMTP and LMTP
use.

The tests assert what Postfix reads (C{action=...} and an empty line, or
a closed connection) and what an administrator sees (log lines, the
answers counted).
"""

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from mailgate import tap
from mailgate.errors import TemporaryFailure
from mailgate.metrics import Metrics
from mailgate.smtp.delivery import LocalDelivery
from mailgate.smtp.policyservice import TEMPFAIL_ACTION, QuotaStatusActions, QuotaStatusFactory, checkAction
from mailgate.testing import FaultInjectingStore, addUser, deliver, memoryStore, resultOf

FULL = "full@example.org"
ROOMY = "roomy@example.org"
FREE = "free@example.org"
PASSWORD = "secret"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


@pytest.fixture
def backendStore(databaseURL):
    """
    A synchronous store on each backend in turn: the RCPT check reads
    quotas, aliases and users there.
    """
    store = memoryStore(databaseURL)
    yield store
    store.close()


def addQuotaUsers(store):
    """
    full@ (1000 octets of quota, over it), roomy@ (10000 octets, nothing
    stored), free@ (no quota), in C{store}; return it.
    """
    for address in (FULL, ROOMY, FREE):
        addUser(store, address, PASSWORD)
    deliver(store, [FULL], b"Subject: big\r\n\r\n" + b"x" * 1200 + b"\r\n")
    # Set once the message is in: the quota lowered under the use.
    resultOf(store.setQuota(FULL, 1000))
    resultOf(store.setQuota(ROOMY, 10000))
    return store


@pytest.fixture
def users(backendStore):
    """
    The users of L{addQuotaUsers}, on each backend in turn.
    """
    return addQuotaUsers(backendStore)


class Connection:
    """
    One connection of a Postfix to a L{QuotaStatusFactory}, over a
    StringTransport; the events the session logged in L{events}.
    """

    def __init__(self, factory, peer=LOOPBACK):
        self.events = []
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.log = Logger(observer=self.events.append)
        self.protocol.makeConnection(self.transport)

    def send(self, data):
        self.protocol.dataReceived(data)

    def ask(self, recipient, size=None, request="smtpd_access_policy", **more):
        """
        Send one request as Postfix's smtpd sends it at RCPT; return what
        came back since the last call.
        """
        self.send(request_(recipient, size, request, **more))
        return self.read()

    def read(self):
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return out

    @property
    def closed(self):
        return self.transport.disconnecting

    def lines(self, event=None):
        return [e["line"] for e in self.events if event is None or e.get("event") == event]


def request_(recipient, size=None, request="smtpd_access_policy", **more):
    """
    The octets of a policy request (the attributes Postfix 3 sends at RCPT,
    most of them).
    """
    attributes = {
        "request": request,
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "helo_name": "client.example.net",
        "queue_id": "",
        "sender": "someone@elsewhere.test",
        "recipient": recipient,
        "recipient_count": "0",
        "client_address": "192.0.2.7",
        "client_name": "client.example.net",
        "reverse_client_name": "client.example.net",
        "instance": "1f2e.6570a4b1.2c1d.0",
        "sasl_method": "",
        "ccert_subject": "",
        "encryption_protocol": "TLSv1.3",
        "stress": "",
        "size": "" if size is None else str(size),
        "server_address": "127.0.0.1",
        "server_port": "25",
        "compatibility_level": "3.6",
        "mail_version": "3.7.11",
        **more,
    }
    if size is None:
        del attributes["size"]
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode("utf-8") + b"\n"


def factoryFor(store, clock=None, quotaExceeded="temporary", metrics=None, **actions):
    return QuotaStatusFactory(
        LocalDelivery(store, quotaExceeded=quotaExceeded), clock or MemoryReactorClock(),
        QuotaStatusActions(**actions), hostname="mailgate.test", metrics=metrics,
    )


# -- answers ------------------------------------------------------------------------------------


def test_aFullMailboxIsRefusedAsRCPTRefusesIt(users):
    """
    A mailbox over quota: the refusal mailgate's own RCPT gives, by
    --quota-exceeded (452 4.2.2 temporary by default, 552 5.2.2
    permanent), without the address Postfix's reply names already.
    """
    assert Connection(factoryFor(users)).ask(FULL, 0) == "action=452 4.2.2 mailbox full\n\n"
    permanent = factoryFor(users, quotaExceeded="permanent")
    assert Connection(permanent).ask(FULL, 500) == "action=552 5.2.2 mailbox full\n\n"


def test_manyRequestsOnOneConnection(users):
    """
    Postfix keeps its connection: each request is answered in turn, also
    when several arrive in one read.
    """
    c = Connection(factoryFor(users))
    assert c.ask(ROOMY, 100) == "action=DUNNO\n\n"
    assert c.ask(FULL, 100) == "action=452 4.2.2 mailbox full\n\n"
    assert c.ask(FREE, 10**9) == "action=DUNNO\n\n"
    c.send(request_("nobody@example.org", 10) + request_(FULL) + request_("someone@elsewhere.test", 10))
    # Unknown here: Postfix's own checks decide; a domain not served: too.
    assert c.read() == "action=DUNNO\n\naction=452 4.2.2 mailbox full\n\naction=DUNNO\n\n"
    assert not c.closed


def test_theSizeDeclaredCounts(users):
    """
    The size Postfix passes on from MAIL FROM's SIZE=: a message that
    would not fit is refused, one larger than the whole quota refused for
    good (5.2.3); none declared (size=0, or no size) refuses only a mailbox
    already full.
    """
    c = Connection(factoryFor(users))
    assert c.ask(ROOMY, 5000) == "action=DUNNO\n\n"
    assert c.ask(ROOMY, 0) == "action=DUNNO\n\n"
    assert c.ask(ROOMY) == "action=DUNNO\n\n"
    assert c.ask(ROOMY, 20000) == (
        "action=552 5.2.3 message larger than the mailbox's whole quota (10000 octets)\n\n"
    )
    deliver(users, [ROOMY], b"Subject: some\r\n\r\n" + b"y" * 6000 + b"\r\n")
    assert c.ask(ROOMY, 5000) == "action=452 4.2.2 mailbox full\n\n"
    assert c.ask(ROOMY, 1000) == "action=DUNNO\n\n"
    # Not a number: as none declared.
    assert c.ask(ROOMY, "lots") == "action=DUNNO\n\n"


def test_theTraceFieldsCountAsAtRCPT(users):
    """
    Room for the size declared but not for the Return-Path and Received
    fields mailgate's LMTP adds: refused, as mailgate's RCPT refuses it
    (taken, the message would be refused at the end of LMTP's DATA, and
    Postfix would bounce it).
    """
    c = Connection(factoryFor(users))
    # Declared, it fits the quota; stored, it would not (as at RCPT).
    assert c.ask(ROOMY, 10000 - 20) == (
        "action=552 5.2.3 message larger than the mailbox's whole quota (10000 octets)\n\n"
    )
    assert c.ask(ROOMY, 10000 - 1000) == "action=DUNNO\n\n"
    deliver(users, [ROOMY], b"Subject: some\r\n\r\n" + b"y" * 3000 + b"\r\n")
    assert c.ask(ROOMY, 10000 - 3100) == "action=452 4.2.2 mailbox full\n\n"
    assert c.ask(ROOMY, 10000 - 4000) == "action=DUNNO\n\n"


def test_unknownAttributesAreIgnored(users):
    c = Connection(factoryFor(users))
    assert c.ask(FULL, 10, policy_context="x", some_future_attribute="a=b=c") == (
        "action=452 4.2.2 mailbox full\n\n"
    )


def test_otherRequestsAndNoRecipientAreDUNNO(users):
    """
    Another request type than smtpd_access_policy is answered DUNNO and
    logged once per connection; so is a request without a recipient (one
    made at the end of DATA), without a line.
    """
    c = Connection(factoryFor(users))
    assert c.ask(FULL, request="something_else") == "action=DUNNO\n\n"
    assert c.ask(FULL, request="something_else") == "action=DUNNO\n\n"
    assert c.ask("", 100) == "action=DUNNO\n\n"
    [line] = c.lines("quota_status.unknown_request")
    assert "request=something_else is no smtpd_access_policy" in line
    c.send(b"\n")
    assert c.read() == "action=DUNNO\n\n"
    assert not c.closed


def test_configuredActions(users):
    """
    The texts of --quota-status-success, -nouser, -overquota, -toolarge,
    as Dovecot's quota_status_* settings.
    """
    factory = factoryFor(
        users, success="OK", nouser="REJECT Unknown user", overquota="552 5.2.2 Mailbox is full",
        toolarge="552 5.2.3 Message is too large",
    )
    c = Connection(factory)
    assert c.ask(ROOMY, 10) == "action=OK\n\n"
    assert c.ask("nobody@example.org", 10) == "action=REJECT Unknown user\n\n"
    assert c.ask(FULL, 10) == "action=552 5.2.2 Mailbox is full\n\n"
    assert c.ask(ROOMY, 10**6) == "action=552 5.2.3 Message is too large\n\n"
    # A domain not served here is Postfix's to decide, whatever nouser says.
    assert c.ask("alice@elsewhere.test", 10) == "action=DUNNO\n\n"


def test_aliasesAndDetailsAreTheUsersMail(backendStore):
    """
    The recipient is resolved as at RCPT: an alias is its user's mail, and
    so is an address with a detail (recipient-delimiter).
    """
    store = backendStore
    addUser(store, FULL, PASSWORD)
    deliver(store, [FULL], b"Subject: x\r\n\r\n" + b"x" * 1200 + b"\r\n")
    resultOf(store.setQuota(FULL, 1000))
    resultOf(store.addAlias("sales@example.org", FULL))
    delivery = LocalDelivery(store, recipientDelimiter="+")
    factory = QuotaStatusFactory(delivery, MemoryReactorClock(), hostname="mailgate.test")
    c = Connection(factory)
    assert c.ask("sales@example.org", 10) == "action=452 4.2.2 mailbox full\n\n"
    assert c.ask("full+lists@example.org", 10) == "action=452 4.2.2 mailbox full\n\n"


# -- the store failing ---------------------------------------------------------------------------


def test_theStoreFailingIsDeferIfPermit(users):
    """
    The store cannot be asked: DEFER_IF_PERMIT, as Dovecot's quota-status
    answers its errors (Postfix defers the recipient unless another
    restriction refuses it), logged with the store's error (Postfix
    defers at its RCPT, so no LMTP line ever says it); the connection
    goes on.
    """
    faulty = FaultInjectingStore(users)
    faulty.fail("quotaOf", TemporaryFailure("database unavailable"))
    c = Connection(factoryFor(faulty))
    assert c.ask(FULL, 10) == f"action={TEMPFAIL_ACTION}\n\n"
    assert TEMPFAIL_ACTION.startswith("DEFER_IF_PERMIT 4.3.0 ")
    [line] = c.lines("quota_status.answer")
    assert line.startswith(f"quota-status tempfail recipient=<{FULL}> size=10 action=DEFER_IF_PERMIT ")
    assert line.endswith(": database unavailable")
    [event] = [e for e in c.events if e.get("event") == "quota_status.answer"]
    assert event["error"] == "database unavailable"
    faulty.heal()
    assert c.ask(FULL, 10) == "action=452 4.2.2 mailbox full\n\n"


def test_aBugIsDeferIfPermitAndLoggedNeverATraceback(users):
    """
    Anything else failing the check (a bug): the same answer, the failure
    logged with its traceback in the log only.
    """
    faulty = FaultInjectingStore(users)
    faulty.fail("quotaOf", ZeroDivisionError("a bug"))
    c = Connection(factoryFor(faulty))
    assert c.ask(FULL, 10) == f"action={TEMPFAIL_ACTION}\n\n"
    [event] = [e for e in c.events if e.get("event") == "quota_status.error"]
    assert event["log_failure"].check(ZeroDivisionError)
    assert not c.closed


class SlowDelivery:
    """
    A recipient check that answers when the test says.
    """

    def __init__(self):
        self.asked = []

    def checkRecipient(self, mailbox, size=None):
        d = defer.Deferred()
        self.asked.append((mailbox, size, d))
        return d


def test_requestsWaitForTheAnswerBeforeThem():
    """
    While the store is asked, reading pauses; a request that came along
    is answered after the one before it, in order.
    """
    delivery = SlowDelivery()
    c = Connection(QuotaStatusFactory(delivery, MemoryReactorClock(), hostname="mailgate.test"))
    c.send(request_(FULL, 10) + request_(ROOMY, 0))
    assert c.read() == ""
    assert c.transport.producerState == "paused"
    [(mailbox, size, first)] = delivery.asked
    assert mailbox == FULL and size > 10
    first.callback(FULL)
    assert c.read() == "action=DUNNO\n\n"
    [_, (mailbox, size, second)] = delivery.asked
    assert (mailbox, size) == (ROOMY, None)
    assert c.transport.producerState == "paused"
    second.callback(ROOMY)
    assert c.read() == "action=DUNNO\n\n"
    assert c.transport.producerState == "producing"


def test_manyRequestsInOneReadAnsweredFromMemory(users):
    """
    Recipients remembered (no quota) are answered at once: thousands of
    requests in one read are answered, none lost, no recursion.
    """
    c = Connection(factoryFor(users))
    c.send(request_(FREE, 10) * 3000)
    assert c.read() == "action=DUNNO\n\n" * 3000


# -- hostile input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"this is no attribute\n", "a line that is not name=value"),
        (b"Recipient=bob@example.org\n", "a line that is not name=value"),
        (b"=x\n", "a line that is not name=value"),
        (b"recipient=bob\x00@example.org\n", "a line that is not name=value"),
        (b"recipient=\xff\xfe@example.org\n", "a line that is not UTF-8"),
        (b"GET / HTTP/1.1\r\n", "a line that is not name=value"),
    ],
)
def test_aGarbageLineClosesTheConnection(users, line, reason):
    """
    A line that is no attribute is logged (why, not what) and the
    connection closed, as Postfix's policy servers do; nothing is
    answered, and nothing after it is read.
    """
    c = Connection(factoryFor(users))
    c.send(b"request=smtpd_access_policy\n" + line + b"recipient=" + FULL.encode() + b"\n\n")
    assert c.read() == ""
    assert c.closed
    [logged] = c.lines("quota_status.bad_input")
    assert logged == f"quota-status closing the connection peer=127.0.0.1:40000: {reason}"


def test_aLineTooLongClosesTheConnectionBeforeItEnds(users):
    c = Connection(factoryFor(users))
    c.send(b"request=smtpd_access_policy\nccert_subject=" + b"x" * 5000)
    assert c.closed
    assert c.lines("quota_status.bad_input") == [
        "quota-status closing the connection peer=127.0.0.1:40000: a line longer than 4096 octets"
    ]


def test_tooManyAttributesCloseTheConnection(users):
    c = Connection(factoryFor(users))
    c.send(b"request=smtpd_access_policy\n" + b"x=1\n" * 100)
    assert c.closed
    assert "a request of more than 100 attributes" in c.lines("quota_status.bad_input")[0]


def test_tooManyOctetsCloseTheConnection(users):
    c = Connection(factoryFor(users))
    c.send(b"request=smtpd_access_policy\n" + (b"x=" + b"y" * 3000 + b"\n") * 11)
    assert c.closed
    assert "a request of more than 32768 octets" in c.lines("quota_status.bad_input")[0]


def test_theIdleTimeoutClosesAConnectionLeftSilent(users):
    """
    Closed after 600 s without a request line (longer than Postfix keeps
    an idle one, 300 s): a line's octets trickled in do not keep it open.
    """
    clock = MemoryReactorClock()
    c = Connection(factoryFor(users, clock=clock))
    assert c.ask(ROOMY, 10) == "action=DUNNO\n\n"
    clock.advance(599)
    assert not c.closed
    assert c.ask(ROOMY, 10) == "action=DUNNO\n\n"
    for _ in range(60):
        c.send(b"r")
        clock.advance(10)
    assert c.closed
    assert c.lines("quota_status.timeout") == [
        "quota-status connection idle for 600 s closed peer=127.0.0.1:40000"
    ]


def test_notWhileTheStoreIsAsked():
    clock = MemoryReactorClock()
    delivery = SlowDelivery()
    c = Connection(QuotaStatusFactory(delivery, clock, hostname="mailgate.test"))
    c.send(request_(FULL, 10))
    clock.advance(700)
    assert not c.closed
    delivery.asked[0][2].callback(FULL)
    assert c.read() == "action=DUNNO\n\n"
    clock.advance(600)
    assert c.closed


def test_theListenersStopClosesTheConnectionsPostfixKeeps():
    """
    When the server stops (its quota-status listener stops, after the mail
    sessions' grace and before the store closes), the connections Postfix
    keeps are closed, one waiting for the store too: nothing more is
    asked of a store that is closing, nothing answered.
    """
    delivery = SlowDelivery()
    factory = QuotaStatusFactory(delivery, MemoryReactorClock(), hostname="mailgate.test")
    factory.doStart()
    idle, waiting = Connection(factory), Connection(factory)
    waiting.send(request_(FULL, 10))
    factory.doStop()
    assert idle.closed and waiting.closed
    delivery.asked[0][2].callback(FULL)
    assert waiting.read() == ""


# -- who may ask ---------------------------------------------------------------------------------


def test_peersOffTheNetworksAreClosedUnread(users):
    """
    The service tells which addresses exist and how full they are: a peer
    not on --quota-status-network (loopback by default) is closed unread,
    one line a minute per address; a Unix socket peer is answered.
    """
    clock = MemoryReactorClock()
    factory = factoryFor(users, clock=clock)
    outsider = IPv4Address("TCP", "192.0.2.9", 5555)
    first = Connection(factory, peer=outsider)
    first.send(request_(FULL, 10))
    assert first.closed and first.read() == ""
    assert first.lines() == [
        "quota-status connection refused peer=192.0.2.9:5555 reason=not on quota-status-network"
    ]
    # The reason a field of the record too, as the refusal past the limit's.
    [event] = first.events
    assert (event["event"], event["reason"]) == ("quota_status.refused", "not on quota-status-network")
    second = Connection(factory, peer=outsider)
    assert second.closed and second.lines() == []
    assert Connection(factory, peer=UNIXAddress(b"/run/mailgate/quota-status")).ask(FULL, 10) == (
        "action=452 4.2.2 mailbox full\n\n"
    )
    wider = QuotaStatusFactory(
        LocalDelivery(users), clock, networks=["192.0.2.0/24"], hostname="mailgate.test"
    )
    assert Connection(wider, peer=outsider).ask(FULL, 10) == "action=452 4.2.2 mailbox full\n\n"
    assert Connection(wider).closed


def test_pastTheLimitANewConnectionIsClosedUnanswered(users):
    """
    With --quota-status-max-connections connections open, the next is
    closed with nothing written, even to its request (Postfix answers that
    recipient 451 4.3.5, and tries again later), and counted; one line
    says so for the burst, not one per connection (the next a minute
    later, with how many were not logged).  Once one of those open
    closes, a new connection is answered; the limit set anew (a reload)
    holds for the connections after it.
    """
    clock, metrics = MemoryReactorClock(), Metrics()
    factory = factoryFor(users, clock=clock, metrics=metrics)
    factory.maxConnections = 2
    first, second = Connection(factory), Connection(factory)
    refused = [Connection(factory) for _ in range(3)]
    for c in refused:
        c.send(request_(FULL, 10))
        assert c.closed and c.read() == ""
    assert refused[0].lines() == [
        "quota-status connection refused peer=127.0.0.1:40000 reason=too many connections "
        "(quota-status-max-connections 2 open)"
    ]
    [event] = refused[0].events
    assert (event["event"], event["reason"]) == ("quota_status.refused", "too many connections")
    assert refused[1].lines() == refused[2].lines() == []
    assert second.ask(FULL, 10) == "action=452 4.2.2 mailbox full\n\n"

    def refusedCount():
        return metrics.registry.get_sample_value(
            "mailgate_connections_refused_total", {"protocol": "quota-status", "reason": "too_many"}
        )

    assert refusedCount() == 3
    clock.advance(61)
    later = Connection(factory)
    assert later.closed and later.lines() == [
        "quota-status connection refused peer=127.0.0.1:40000 reason=too many connections "
        "(quota-status-max-connections 2 open) (2 more refused since the last line)"
    ]
    first.protocol.connectionLost(Failure(ConnectionDone()))
    assert Connection(factory).ask(ROOMY, 10) == "action=DUNNO\n\n"
    assert Connection(factory).closed
    factory.maxConnections = 3
    assert Connection(factory).ask(ROOMY, 10) == "action=DUNNO\n\n"
    factory.maxConnections = 0
    assert not any(Connection(factory).closed for _ in range(5))
    assert refusedCount() == 5


def test_aPeerOffTheNetworksIsNotCountedAgainstTheLimit(users):
    """
    A peer refused for its network neither takes a place nor is counted
    as too many.
    """
    metrics = Metrics()
    factory = factoryFor(users, metrics=metrics)
    factory.maxConnections = 1
    assert Connection(factory, peer=IPv4Address("TCP", "192.0.2.9", 5555)).closed
    assert Connection(factory).ask(ROOMY, 10) == "action=DUNNO\n\n"
    assert metrics.registry.get_sample_value(
        "mailgate_connections_refused_total", {"protocol": "quota-status", "reason": "too_many"}
    ) == 0


def test_peersOffTheNetworksAreCounted(users):
    """
    Each peer refused for its network is counted, with reason network
    (0 from the start), though only the first has a line: an operator
    sees a Postfix missing from --quota-status-network in the metrics,
    not only in the log.  The mail protocols have no network series.
    """
    metrics = Metrics()
    factory = factoryFor(users, metrics=metrics)

    def refused(reason, protocol="quota-status"):
        return metrics.registry.get_sample_value(
            "mailgate_connections_refused_total", {"protocol": protocol, "reason": reason}
        )

    assert refused("network") == 0
    outsider = IPv4Address("TCP", "192.0.2.9", 5555)
    connections = [Connection(factory, peer=outsider) for _ in range(3)]
    assert all(c.closed for c in connections)
    assert len(connections[0].lines()) == 1 and connections[2].lines() == []
    assert refused("network") == 3
    assert refused("too_many") == 0
    assert Connection(factory).ask(ROOMY, 10) == "action=DUNNO\n\n"
    assert refused("network") == 3
    assert refused("network", protocol="smtp") is None


# -- logs and metrics ----------------------------------------------------------------------------


def test_theOpenConnectionsGaugeFollowsConnections(users):
    """
    mailgate_connections{protocol="quota-status"} is the connections open
    now: up as each is admitted, down as each closes (once, however it
    ends), never for one refused (its network, past the limit); each
    admitted counted in mailgate_sessions_total.  systemd's status line
    still counts the mail protocols' sessions only.
    """
    metrics = Metrics()
    factory = factoryFor(users, metrics=metrics)
    factory.maxConnections = 2

    def sample(name):
        return metrics.registry.get_sample_value(name, {"protocol": "quota-status"})

    assert sample("mailgate_connections") == 0
    first, second = Connection(factory), Connection(factory)
    assert sample("mailgate_connections") == 2
    assert Connection(factory).closed
    assert Connection(factory, peer=IPv4Address("TCP", "192.0.2.9", 5555)).closed
    assert sample("mailgate_connections") == 2
    first.protocol.connectionLost(Failure(ConnectionDone()))
    first.protocol.connectionLost(Failure(ConnectionDone()))
    assert sample("mailgate_connections") == 1
    third = Connection(factory)
    assert sample("mailgate_connections") == 2
    for c in (second, third):
        c.protocol.connectionLost(Failure(ConnectionDone()))
    assert sample("mailgate_connections") == 0
    assert sample("mailgate_sessions_total") == 3
    assert metrics.openConnections() == {"pop3": 0, "smtp": 0, "lmtp": 0}



def test_aLinePerAnswerThatIsNotDUNNO(users):
    """
    One line per refusal, with the recipient, the size, the action, the
    client Postfix is talking to and its queue id; none for DUNNO.
    """
    c = Connection(factoryFor(users))
    c.ask(ROOMY, 10)
    c.ask("nobody@example.org", 10)
    c.ask(FULL, 567, queue_id="4XyZ1")
    [line] = c.lines("quota_status.answer")
    assert line == (
        f"quota-status overquota recipient=<{FULL}> size=567 action=452 4.2.2 mailbox full "
        "client=192.0.2.7 queue_id=4XyZ1 peer=127.0.0.1:40000"
    )
    [event] = [e for e in c.events if e.get("event") == "quota_status.answer"]
    assert (event["recipient"], event["size"], event["result"]) == (FULL, 567, "overquota")
    assert event["protocol"] == "quota-status" and event["session"]


def test_answersAreCountedByOutcome(users):
    metrics = Metrics()
    c = Connection(factoryFor(users, metrics=metrics))
    c.ask(ROOMY, 10)
    c.ask(FULL, 10)
    c.ask(FULL, 10)
    c.ask(ROOMY, 10**6)
    c.ask("nobody@example.org", 10)
    c.ask("x@elsewhere.test", 10)

    def count(result):
        return metrics.registry.get_sample_value("mailgate_quota_status_answers_total", {"result": result})

    assert [count(r) for r in ("success", "overquota", "toolarge", "nouser", "ignored", "tempfail")] == [
        1, 2, 1, 1, 1, 0
    ]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["DUNNO", "REJECT Unknown user", "552 5.2.2 Mailbox is full", "defer_if_permit try later", "OK"]
)
def test_actionsPostfixTakes(text):
    assert checkAction(text) == text


@pytest.mark.parametrize(
    "text, why",
    [
        ("Mailbox is full", "not a Postfix access action"),
        ("552", "552 needs a text after it"),
        ("252 2.0.0 fine", "not a Postfix access action"),
        ("REJECT full\nOK", "one line"),
    ],
)
def test_actionsPostfixWouldNotTake(text, why):
    with pytest.raises(ValueError, match=why):
        checkAction(text)


def parsed(*arguments):
    options = tap.Options()
    options.parseOptions(list(arguments))
    return options.toConfig()


def test_theOptions():
    config = parsed(
        "--quota-status", "tcp:12340:interface=127.0.0.1",
        "--quota-status-nouser", "REJECT Unknown user",
        "--quota-status-overquota", "552 5.2.2 Mailbox is full",
        "--quota-status-network", "10.0.0.0/8",
    )
    assert config.quotaStatus == ["tcp:12340:interface=127.0.0.1"]
    assert config.quotaStatusNouser == "REJECT Unknown user"
    assert config.quotaStatusOverquota == "552 5.2.2 Mailbox is full"
    assert config.quotaStatusToolarge is None
    assert config.quotaStatusSuccess == "DUNNO"
    assert list(config.quotaStatusNetworks) == ["10.0.0.0/8"]
    assert config.quotaStatusMaxConnections == 200
    assert parsed("--quota-status-max-connections", "0").quotaStatusMaxConnections == 0
    with pytest.raises(UsageError, match="quota-status-max-connections.*at least 0"):
        parsed("--quota-status-max-connections", "-1")
    with pytest.raises(UsageError, match="quota-status-overquota.*not a Postfix access action"):
        parsed("--quota-status-overquota", "Mailbox is full")


# -- the descriptor budget -----------------------------------------------------------------------


def test_theQuotaStatusConnectionsAreKeptApartFromTheOpenFiles():
    """
    Up to quota-status-max-connections descriptors are Postfix's policy
    connections: the mail connections' limit is fitted to the open file
    limit beside them, lest they eat the reserve the database, the log and
    the refusals need; the warning names both limits and the open file
    limit that would fit them.
    """
    from mailgate.policy.descriptors import RESERVED, fittedConnectionLimit

    assert fittedConnectionLimit(5000, 1024)[0] == 1024 - RESERVED
    assert fittedConnectionLimit(500, 1024, 200) == (500, None)
    limit, warning = fittedConnectionLimit(700, 1024, 200)
    assert limit == 1024 - 200 - RESERVED
    assert warning.startswith(
        "max-connections 700 beside quota-status-max-connections 200 does not fit the 1024 open files"
    )
    assert warning.endswith(
        f"raise the open file limit to at least {700 + 200 + RESERVED} or lower max-connections "
        "or quota-status-max-connections"
    )
    assert fittedConnectionLimit(700, 1024)[1] is None


def test_theStartAndAReloadFitMaxConnectionsBesideQuotaStatus(tmp_path, monkeypatch):
    """
    With --quota-status, the start fits max-connections beside
    quota-status-max-connections (and says so in limits.open_files), and a
    reload that changes quota-status-max-connections alone fits it again;
    without --quota-status, its limit takes nothing.
    """
    from test_service import _reloadableService

    from mailgate import reload, service
    from mailgate.policy.descriptors import RESERVED

    monkeypatch.setattr(service, "openFileLimit", lambda: 1024)
    monkeypatch.setattr(reload, "openFileLimit", lambda: 1024)

    def fitted(root):
        return root.policy.settings.maxConnections

    def warnings(root):
        return [text for event, text in root.startupWarnings if event == "limits.open_files"]

    _, plain = _reloadableService(tmp_path / "plain.toml", "max-connections = 700\n", "--pop3", "tcp:1110")
    assert (fitted(plain), warnings(plain)) == (700, [])

    path = tmp_path / "mailgate.toml"
    _, root = _reloadableService(path, "max-connections = 700\n", "--pop3", "tcp:1110", "--quota-status", "tcp:10023")
    assert fitted(root) == 1024 - 200 - RESERVED
    [warning] = warnings(root)
    assert "max-connections 700 beside quota-status-max-connections 200 does not fit" in warning
    path.write_text("max-connections = 700\nquota-status-max-connections = 50\n")
    assert root.reloadConfig() == ["quota-status-max-connections"]
    assert fitted(root) == 700
    [factory] = root.quotaStatusFactories
    assert factory.maxConnections == 50
    path.write_text("max-connections = 700\nquota-status-max-connections = 500\n")
    assert root.reloadConfig() == ["quota-status-max-connections"]
    assert fitted(root) == 1024 - 500 - RESERVED


# -- reload --------------------------------------------------------------------------------------


def test_aReloadAppliesTheActionsToTheAnswersAfterIt(tmp_path, users):
    """
    The quota-status-* actions apply at a SIGHUP, as Dovecot's reload
    applies its quota_status_* settings: the next answer on a connection
    Postfix kept open across it is the new action; one taken away gives
    the default back; quota-status-network still waits for the restart.
    """
    from test_service import _reloadableService
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.service import makeService

    path = tmp_path / "mailgate.toml"
    options, _ = _reloadableService(path, 'quota-status-nouser = "REJECT Unknown user"\n', "--quota-status", "tcp:10023")
    root = makeService(options.toConfig(), reactor=MemoryReactorClock(), store=users)
    root.configSource = options.reread
    [factory] = root.quotaStatusFactories
    kept = Connection(factory)
    assert kept.ask("nobody@example.org") == "action=REJECT Unknown user\n\n"
    path.write_text(
        'quota-status-nouser = "550 5.1.1 No such user here"\nquota-status-success = "OK"\n'
        'quota-status-overquota = "552 5.2.2 Mailbox is full"\nquota-status-network = ["192.0.2.0/24"]\n'
    )
    assert sorted(root.reloadConfig()) == ["quota-status-nouser", "quota-status-overquota", "quota-status-success"]
    assert root.restartNeeded == ("quota-status-network",)
    assert kept.ask("nobody@example.org") == "action=550 5.1.1 No such user here\n\n"
    assert kept.ask(ROOMY, 10) == "action=OK\n\n"
    assert kept.ask(FULL, 10) == "action=552 5.2.2 Mailbox is full\n\n"
    path.write_text('quota-status-network = ["192.0.2.0/24"]\n')
    assert sorted(root.reloadConfig()) == ["quota-status-nouser", "quota-status-overquota", "quota-status-success"]
    assert kept.ask("nobody@example.org") == kept.ask(ROOMY, 10) == "action=DUNNO\n\n"
    assert kept.ask(FULL, 10) == "action=452 4.2.2 mailbox full\n\n"
