"""
Who may log in to which maildrop, against a model, generated: a user
whose allowed networks, disabled state and APOP opt-in vary, a master
user whose networks vary, master logins on or off (C{--master-users},
C{--master-user-separator}), the networks plaintext passwords may come
from, the client's address; and a login by USER/PASS, AUTH PLAIN (with or
without an authorisation identity), AUTH LOGIN or APOP, as the user, as
the master user for the user, by names spelt in other cases, by names no
one has, with the right password, another's, or a wrong one.

The model is README's rules: a plaintext password only from a trusted
network (no TLS here); the user's own password for their own login, the
master user's for a master login, which needs master logins on and the
master user's networks, and still the user's networks and enabled state;
APOP only for a user who opted in, never for a master login.  The login
succeeds into the user's maildrop exactly when the model says so, and is
otherwise refused with C{-ERR}; a refusal for a wrong password, an
unknown name or a network reads the same.
"""

import base64
import hashlib
import os
from ipaddress import ip_address, ip_network

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address

from mailgate.auth.passwords import makeCredentials
from mailgate.networks import parseAllowedNetworks
from mailgate.testing import POP3Session, TEST_HASH_COST, deliver, memoryStore, resultOf

from test_pop3_model import MODEL

# 200 take about 6 s; MAILGATE_MODEL_EXAMPLES sets them, as for the others.
LOGINS = settings(MODEL, max_examples=int(os.environ.get("MAILGATE_MODEL_EXAMPLES", "200")))
ALICE = "alice@example.org"
ALICE_PASSWORD = "alice-pw"
ADMIN = "admin"
ADMIN_PASSWORD = "admin-pw"
INVALID = "-ERR [AUTH] invalid user name or password\r\n"

PEERS = ["127.0.0.1", "192.0.2.7", "198.51.100.7", "203.0.113.7"]
USER_NETWORKS = [None, "192.0.2.0/24", "198.51.100.0/24", "local", "127.0.0.0/8,198.51.100.0/24"]
MASTER_NETWORKS = [None, "192.0.2.0/24", "203.0.113.0/24"]
TRUSTED = [("127.0.0.0/8",), ("127.0.0.0/8", "192.0.2.0/24"), ("0.0.0.0/0",)]

# Each setting is at its most permissive half the time or more, so that
# logins that should succeed (a master login needs many things right) are
# a good share of the examples.
worlds = st.fixed_dictionaries(
    {
        "userNetworks": st.sampled_from([None] * 4 + USER_NETWORKS),
        "disabled": st.sampled_from([False] * 3 + [True]),
        "apop": st.booleans(),
        "masterNetworks": st.sampled_from([None] * 3 + MASTER_NETWORKS),
        "masterUsers": st.booleans(),
        "separator": st.sampled_from([None, "*", "*"]),
        "trusted": st.sampled_from([("0.0.0.0/0",)] * 3 + TRUSTED),
        "peer": st.sampled_from(PEERS),
    }
)
attempts = st.fixed_dictionaries(
    {
        "mechanism": st.sampled_from(["user", "plain", "login", "apop"]),
        # (user named, master named or None)
        "who": st.sampled_from(
            [(ALICE, None), ("ALICE@Example.ORG", None), ("carol@example.org", None), (ALICE, ADMIN), (ALICE, ADMIN),
             (ALICE, "Admin"), (ALICE, "nobody"), ("carol@example.org", ADMIN)]
        ),
        # The password of who authenticates (the master user's for a
        # master login), the other one's, or a wrong one.
        "password": st.sampled_from(["right", "right", "other", "wrong"]),
        # A master login by PLAIN: by its authorisation identity, or by
        # the separator in its authentication identity.
        "plainBySeparator": st.booleans(),
    }
)


def _inNetworks(peer, networks):
    """
    Whether C{peer} is in C{networks} (comma-separated; C{None}: anywhere;
    C{local}: clients on a Unix socket, none of these).
    """
    if networks is None:
        return True
    return any(part != "local" and ip_address(peer) in ip_network(part) for part in networks.split(","))


def expected(world, attempt):
    """
    Whether the model lets the attempt in (to alice's maildrop).
    """
    user, master = attempt["who"]
    mechanism, password = attempt["mechanism"], _password(attempt)
    if user.lower() != ALICE:
        return False
    plaintext = mechanism != "apop"
    if plaintext and not _inNetworks(world["peer"], ",".join(world["trusted"])):
        return False
    if world["disabled"] or not _inNetworks(world["peer"], world["userNetworks"]):
        return False
    if master is None:
        if mechanism == "apop" and not world["apop"]:
            return False
        return password == ALICE_PASSWORD
    # A master login.
    if mechanism == "apop" or master.lower() != ADMIN:
        return False
    if not (world["masterUsers"] or world["separator"]):
        return False
    bySeparator = mechanism in ("user", "login") or attempt["plainBySeparator"]
    if bySeparator and world["separator"] is None:
        return False
    if not _inNetworks(world["peer"], world["masterNetworks"]):
        return False
    return password == ADMIN_PASSWORD


def _b64(text):
    return base64.b64encode(text.encode()).decode()


def _password(attempt):
    master = attempt["who"][1] is not None
    return {
        "right": ADMIN_PASSWORD if master else ALICE_PASSWORD,
        "other": ALICE_PASSWORD if master else ADMIN_PASSWORD,
        "wrong": "wrong",
    }[attempt["password"]]


def attempt_(session, attempt, separator):
    user, master = attempt["who"]
    password = _password(attempt)
    mechanism = attempt["mechanism"]
    joined = user if master is None else f"{user}{separator or '*'}{master}"
    if mechanism == "user":
        session.command(f"USER {joined}")
        return session.command(f"PASS {password}")
    if mechanism == "login":
        session.command(f"AUTH LOGIN {_b64(joined)}")
        return session.command(_b64(password))
    if mechanism == "plain":
        if master is not None and not attempt["plainBySeparator"]:
            return session.command(f"AUTH PLAIN {_b64(user + chr(0) + master + chr(0) + password)}")
        return session.command(f"AUTH PLAIN {_b64(chr(0) + joined + chr(0) + password)}")
    digest = hashlib.md5((session.challenge + password).encode()).hexdigest()
    return session.command(f"APOP {joined} {digest}")


_OPEN = {
    "userNetworks": None, "disabled": False, "apop": True, "masterNetworks": "192.0.2.0/24", "masterUsers": True,
    "separator": "*", "trusted": ("0.0.0.0/0",), "peer": "192.0.2.7",
}


@LOGINS
@given(worlds, attempts)
# Master logins that succeed by each way in, and one refused by the master
# user's networks, whatever the examples drawn.
@example(_OPEN, {"mechanism": "user", "who": (ALICE, ADMIN), "password": "right", "plainBySeparator": False})
@example(_OPEN, {"mechanism": "plain", "who": (ALICE, "Admin"), "password": "right", "plainBySeparator": False})
@example(_OPEN, {"mechanism": "login", "who": (ALICE, ADMIN), "password": "right", "plainBySeparator": False})
@example({**_OPEN, "masterNetworks": None, "peer": "198.51.100.7"},
         {"mechanism": "plain", "who": (ALICE, ADMIN), "password": "right", "plainBySeparator": True})
@example({**_OPEN, "peer": "198.51.100.7"},
         {"mechanism": "user", "who": (ALICE, ADMIN), "password": "right", "plainBySeparator": False})
def test_whoMayLogInIsWhatTheModelSays(world, attempt):
    store = memoryStore()
    try:
        resultOf(store.addUser(ALICE, makeCredentials(ALICE_PASSWORD, apop=world["apop"], logN=TEST_HASH_COST)))
        deliver(store, [ALICE], b"Subject: hi\r\n\r\nhello\r\n")
        networks = world["masterNetworks"]
        resultOf(store.addMasterUser(
            ADMIN, makeCredentials(ADMIN_PASSWORD, logN=TEST_HASH_COST).passwordHash,
            None if networks is None else parseAllowedNetworks(networks),
        ))
        if world["userNetworks"] is not None:
            resultOf(store.setAllowedNetworks(ALICE, parseAllowedNetworks(world["userNetworks"])))
        if world["disabled"]:
            resultOf(store.disableUser(ALICE))
        session = POP3Session(
            store,
            peer=IPv4Address("TCP", world["peer"], 40000),
            apop=True,
            trustedNetworks=world["trusted"],
            # As the service has it: a separator turns master logins on.
            masterUsers=world["masterUsers"] or world["separator"] is not None,
            masterUserSeparator=world["separator"],
        )
        reply = attempt_(session, attempt, world["separator"])
        if expected(world, attempt):
            assert reply.startswith(f"+OK {ALICE} has 1 messages ("), (world, attempt, reply)
            assert session.command("UIDL 1").startswith("+OK 1 ")
        else:
            assert reply.startswith("-ERR"), (world, attempt, reply)
    finally:
        store.close()
