"""
SCRAM tells a client a user's salt and iteration count before it proves
anything; a name that is no user gets made-up ones.  Made up as mailgate's
own alone (C{i=4096}, 16 octets of salt), they told apart every user whose
keys came from another server with other parameters (Dovecot's
C{{SCRAM-SHA-256}}, moved with C{user import}): such a user's answer
could only be a user's.  Now the made-up ones are drawn from the kinds the
users' keys have, as many names getting each kind as there are users with
it, the same name always the same answer.
"""

import base64
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from e2e import LineReader, connect, mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from mailgate.auth.passwords import importedCredentials, parseScramSecret, scramSha256Secret
from mailgate.auth.sasl import OWN_SCRAM_PARAMETERS, ScramParameters, madeUpParameters
from mailgate.testing import FaultInjectingStore, POP3Session, addUser, memoryStore, pop3Factory, resultOf
from saslclients import ScramClient, b64

ALICE = "alice@example.org"
CAROL = "carol@example.org"
CAROL_PW = "carol's own"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"
#: the kind of key mailgate makes, and one Dovecot's configuration may
#: make (any iteration count; a salt of another length)
OWN = (4096, 16)
OTHER = (10000, 24)


def dovecotScram(password, iterations, saltLength):
    """
    A Dovecot C{{SCRAM-SHA-256}} hash, C{iterations,salt,StoredKey,ServerKey}.
    """
    _, salt, stored, server = parseScramSecret(scramSha256Secret(password, iterations, os.urandom(saltLength)))
    return "{SCRAM-SHA-256}" + ",".join(
        [str(iterations)] + [base64.b64encode(x).decode("ascii") for x in (salt, stored, server)]
    )


def kindOf(client, serverFirst):
    _, salt, iterations = client.parseServerFirst(serverFirst)
    return iterations, len(salt)


def serverFirstOf(factory, name):
    """
    The server-first-message a new session of C{factory} answers
    C{name}'s first message with, the exchange then cancelled.
    """
    session = POP3Session(None, factory=factory, clock=factory.reactor)
    client = ScramClient(name, "whatever")
    reply = session.command(f"AUTH SCRAM-SHA-256 {b64(client.first())}")
    assert reply.startswith("+ "), reply
    session.command("*")
    return client, base64.b64decode(reply[2:])


@pytest.fixture
def store(tmp_path):
    s = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    addUser(s, ALICE, "alice's")
    resultOf(s.addUser(CAROL, importedCredentials(dovecotScram(CAROL_PW, *OTHER))))
    yield s
    s.close()


# -- the protocol, without sockets ------------------------------------------------------


def test_namesThatAreNoUserAreToldTheKindsTheUsersHave(store):
    """
    Alice's keys are mailgate's own, Carol's Dovecot's with 10,000
    iterations and 24 octets of salt: she is told those, and names that
    are no user are told one kind or the other, each name always the same.
    """
    factory = pop3Factory(store)
    assert kindOf(*serverFirstOf(factory, CAROL)) == OTHER
    assert kindOf(*serverFirstOf(factory, ALICE)) == OWN
    told = {}
    for n in range(60):
        name = f"nobody{n}@example.org"
        client, serverFirst = serverFirstOf(factory, name)
        told[name] = kindOf(client, serverFirst)
        again = serverFirstOf(factory, name)
        assert again[0].parseServerFirst(again[1])[1:] == client.parseServerFirst(serverFirst)[1:]
    # Before, every one was told (4096, 16): Carol's answer was a user's.
    assert set(told.values()) == {OWN, OTHER}


def test_aUserWithoutScramKeysIsToldAsANameThatIsNoUser(store):
    """
    A user imported with a hash of another scheme has no SCRAM keys until
    a login with the password: made-up parameters, as for a name that is
    no user, the same whether the user is there or not.
    """
    factory = pop3Factory(store)
    before = serverFirstOf(factory, "dave@example.org")
    resultOf(store.addUser("dave@example.org", importedCredentials("{SHA256}" + "ab" * 32)))
    after = serverFirstOf(factory, "dave@example.org")
    assert before[0].parseServerFirst(before[1])[1:] == after[0].parseServerFirst(after[1])[1:]


def test_kindsAreDrawnInProportionToTheUsersWithEach():
    """
    A name is told a kind as often as users have it: with 3 users of one
    kind for 1 of the other, three names in four get the first.
    """
    key = bytes(range(32))
    kinds = {OWN: 3, OTHER: 1}
    told = [madeUpParameters(key, f"n{n}@example.org", kinds) for n in range(4000)]
    others = sum(1 for iterations, salt in told if (iterations, len(salt)) == OTHER)
    assert 900 <= others <= 1100, others
    assert all((iterations, len(salt)) in kinds for iterations, salt in told)


def test_aKindAddedMovesOnlyTheNamesItGains():
    """
    Users of a new kind arriving take names from the other kinds to theirs,
    and move no name between the kinds there were; a salt's first octets
    are the same whatever its length.
    """
    key = os.urandom(32)
    names = [f"n{n}@example.org" for n in range(2000)]
    before = {name: madeUpParameters(key, name, {OWN: 5, (4096, 20): 5}) for name in names}
    after = {name: madeUpParameters(key, name, {OWN: 5, (4096, 20): 5, OTHER: 5}) for name in names}
    moved = [name for name in names if before[name] != after[name]]
    assert all(after[name][0] == OTHER[0] for name in moved)
    assert 500 <= len(moved) <= 830, len(moved)
    long = madeUpParameters(key, "x@example.org", {(4096, 100): 1})[1]
    short = madeUpParameters(key, "x@example.org", {(4096, 16): 1})[1]
    assert len(long) == 100 and long[:16] == short


def test_theKindsAreReadOnceAndAgainInTheBackground():
    """
    The kinds are read at the first exchange, which waits for them; later
    exchanges use what was read, and one more than the interval after the
    read starts a new read without waiting for it.  A read that fails
    keeps the kinds read before.
    """
    reads = []

    def read():
        reads.append(defer.Deferred())
        return reads[-1]

    clock = Clock()
    parameters = ScramParameters(read, clock.seconds, interval=60)
    first, second = parameters.current(), parameters.current()
    assert len(reads) == 1 and not first.called
    reads[0].callback({OWN: 2, OTHER: 1})
    assert resultOf(first) == resultOf(second) == {OWN: 2, OTHER: 1}
    clock.advance(59)
    assert resultOf(parameters.current()) == {OWN: 2, OTHER: 1} and len(reads) == 1
    clock.advance(1)
    assert resultOf(parameters.current()) == {OWN: 2, OTHER: 1} and len(reads) == 2
    assert resultOf(parameters.current()) == {OWN: 2, OTHER: 1} and len(reads) == 2
    reads[1].callback({OWN: 2, OTHER: 5})
    assert resultOf(parameters.current()) == {OWN: 2, OTHER: 5}
    clock.advance(60)
    parameters.current()
    reads[2].errback(RuntimeError("the database is away"))
    assert resultOf(parameters.current()) == {OWN: 2, OTHER: 5}
    # No user with SCRAM keys: mailgate's own.
    empty = ScramParameters(lambda: defer.succeed({}), clock.seconds)
    assert resultOf(empty.current()) == OWN_SCRAM_PARAMETERS
    # Salts longer than user import takes (stored before it refused them)
    # are no kind a name that is no user is told: made at every exchange.
    huge = ScramParameters(lambda: defer.succeed({OWN: 2, (4096, 1 << 20): 7}), clock.seconds)
    assert resultOf(huge.current()) == {OWN: 2}


def test_aUsersFirstMessageTakesTheLookUpsAStrangersDoes(store):
    """
    Once the kinds and the key are read, a user's first message and a
    stranger's cost the store the same: one look-up of the name.
    """
    faulty = FaultInjectingStore(store)
    factory = pop3Factory(faulty)
    serverFirstOf(factory, "warm@example.org")
    calls = []
    for name in (CAROL, "nobody@example.org", ALICE):
        start = len(faulty.calls)
        serverFirstOf(factory, name)
        calls.append([operation for operation, _ in faulty.calls[start:]])
    assert calls == [["findUser"]] * 3


def test_newKindsReachNamesThatAreNoUserOnceReadAgain(store):
    """
    Users imported while the server runs: within the interval the kinds
    are read again in, names that are no user are told theirs too.
    """
    factory = pop3Factory(store)
    names = [f"nobody{n}@example.org" for n in range(60)]
    assert {kindOf(*serverFirstOf(factory, name)) for name in names} == {OWN, OTHER}
    for n in range(4):
        resultOf(store.addUser(f"erin{n}@example.org", importedCredentials(dovecotScram("pw", 50000, 32))))
    factory.reactor.advance(60)
    serverFirstOf(factory, "anyone@example.org")  # starts the read
    assert (50000, 32) in {kindOf(*serverFirstOf(factory, name)) for name in names}


# -- the store, on each engine ------------------------------------------------------------


def test_theStoreCountsTheKindsOfKeys(databaseURL):
    """
    scramParameters: users by iteration count and salt length in octets
    (a salt's padding told apart: 16, 17 and 18 octets are all 24 base64
    characters); users without SCRAM keys, and keys that do not read, are
    left out.
    """
    from mailgate.auth.passwords import StoredCredentials

    s = memoryStore(databaseURL)
    try:
        assert resultOf(s.scramParameters()) == {}
        addUser(s, ALICE, "pw")
        addUser(s, "bob@example.org", "pw")
        for n, (iterations, length) in enumerate([(10000, 24), (4096, 17), (4096, 18), (4096, 0), (1, 64)]):
            stored = importedCredentials(dovecotScram("pw", iterations, length))
            resultOf(s.addUser(f"u{n}@example.org", stored))
        resultOf(s.addUser("dave@example.org", importedCredentials("{SHA256}" + "ab" * 32)))
        for n, bad in enumerate(["SCRAM-SHA-256$x:AAAA$a:b", "SCRAM-SHA-1$4096:AAAA$a:b", "nonsense", "$:$:"]):
            resultOf(s.addUser(f"bad{n}@example.org", StoredCredentials("$scrypt$", scramSha256=bad)))
        assert resultOf(s.scramParameters()) == {
            (4096, 16): 2, (10000, 24): 1, (4096, 17): 1, (4096, 18): 1, (4096, 0): 1, (1, 64): 1,
        }
    finally:
        s.close()


def test_oddStoredKeysAreLeftOutWithoutFailingTheRead(databaseURL):
    """
    Keys written by hand (or by another program) that are no RFC 5803 keys
    mailgate reads are left out of the kinds, the others counted: an
    iteration count of thousands of digits (which Python's int() refuses),
    one that is negative or not in ASCII digits, nothing after the prefix,
    and on SQLite, which keeps what it is given, octets instead of text.
    Before, the first of them failed the whole read with ValueError (the
    octets: TypeError), and with it every SCRAM login of every user.
    """
    from mailgate.auth.passwords import StoredCredentials

    s = memoryStore(databaseURL)
    try:
        addUser(s, ALICE, "pw")
        odd = [
            "SCRAM-SHA-256$" + "9" * 5000 + ":AAAAAAAAAAAAAAAAAAAAAA==$a:b",
            "SCRAM-SHA-256$-1:AAAAAAAAAAAAAAAAAAAAAA==$a:b",
            "SCRAM-SHA-256$\u0664\u0660\u0669\u0666:AAAAAAAAAAAAAAAAAAAAAA==$a:b",
            "SCRAM-SHA-256$",
            "",
        ]
        if databaseURL.startswith("sqlite"):
            odd.append(b"SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$a:b")
        for n, bad in enumerate(odd):
            resultOf(s.addUser(f"odd{n}@example.org", StoredCredentials("$scrypt$", scramSha256=bad)))
        assert resultOf(s.scramParameters()) == {OWN: 1}
    finally:
        s.close()


def test_aUserWithAnOddKeyDoesNotStopOthersLoggingIn(store):
    """
    A user whose stored iteration count has 5,000 digits is answered as a
    name that is no user; Alice, Carol and names that are no user are
    answered as ever.  Before, every SCRAM exchange got "-ERR [SYS/TEMP]
    ... internal server error" (a real twistd logged the traceback of
    int()'s ValueError at each).
    """
    from mailgate.auth.passwords import StoredCredentials

    huge = "SCRAM-SHA-256$" + "9" * 5000 + ":AAAAAAAAAAAAAAAAAAAAAA==$a:b"
    resultOf(store.addUser("odd@example.org", StoredCredentials("$scrypt$", scramSha256=huge)))
    factory = pop3Factory(store)
    assert kindOf(*serverFirstOf(factory, ALICE)) == OWN
    assert kindOf(*serverFirstOf(factory, CAROL)) == OTHER
    assert kindOf(*serverFirstOf(factory, "odd@example.org")) in {OWN, OTHER}
    assert kindOf(*serverFirstOf(factory, "nobody@example.org")) in {OWN, OTHER}


# -- a real server --------------------------------------------------------------------------


def wireServerFirst(port, name):
    """
    The server-first-message a real server answers C{name} with, over a
    socket of its own.
    """
    sock = connect(port)
    try:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK ")
        client = ScramClient(name, "whatever")
        sock.sendall(f"AUTH SCRAM-SHA-256 {b64(client.first())}\r\n".encode("ascii"))
        reply = reader.line()
        assert reply.startswith(b"+ "), reply
        sock.sendall(b"*\r\nQUIT\r\n")
        return kindOf(client, base64.b64decode(reply[2:]))
    finally:
        sock.close()


def wireScramLogin(port, name, password):
    """
    A whole SCRAM exchange over a socket: the kind told, and the last line.
    """
    sock = connect(port)
    try:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK ")
        client = ScramClient(name, password)
        sock.sendall(f"AUTH SCRAM-SHA-256 {b64(client.first())}\r\n".encode("ascii"))
        reply = reader.line()
        serverFirst = base64.b64decode(reply[2:])
        sock.sendall(f"{b64(client.final(serverFirst))}\r\n".encode("ascii"))
        reply = reader.line().decode("utf-8")
        if reply.startswith("+ "):
            assert client.verify(base64.b64decode(reply[2:]))
            sock.sendall(b"\r\n")
            reply = reader.line().decode("utf-8")
        sock.sendall(b"QUIT\r\n")
        return kindOf(client, serverFirst), reply
    finally:
        sock.close()


def test_aRealServerTellsNamesThatAreNoUserTheKindsOfItsUsers(mailgate_server, mailgate_cli, tmp_path):
    """
    Carol moved from a Dovecot whose SCRAM keys have 10,000 iterations and
    24 octets of salt (C{user import}), Alice is mailgate's own: Carol
    logs in with SCRAM, told her own parameters; names that are no user
    are told Carol's kind or Alice's, never another, each name the same on
    every connection, and fail as Carol's wrong password does.
    """
    mailgate_cli.addUser(ALICE, "alice's")
    passwd = tmp_path / "users.passwd"
    passwd.write_text(f"carol:{dovecotScram(CAROL_PW, *OTHER)}\n")
    out = mailgate_cli.check("user", "import", str(passwd), "--domain", "example.org")
    assert out.splitlines()[0] == f"added {CAROL}", out
    server = mailgate_server("--auth-failure-delay", "0.05", "--no-apop")

    assert wireScramLogin(server.port, CAROL, CAROL_PW) == (OTHER, f"+OK {CAROL} has 0 messages (0 octets)\r\n")
    assert wireScramLogin(server.port, CAROL, "wrong") == (OTHER, INVALID)
    assert wireServerFirst(server.port, ALICE) == OWN
    told = {f"nobody{n}@example.org": wireServerFirst(server.port, f"nobody{n}@example.org") for n in range(40)}
    assert set(told.values()) == {OWN, OTHER}
    for name in list(told)[:5]:
        assert wireServerFirst(server.port, name) == told[name]
    name = next(name for name, kind in told.items() if kind == OTHER)
    assert wireScramLogin(server.port, name, CAROL_PW) == (OTHER, INVALID)
