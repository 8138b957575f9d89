"""
Nodes on PostgreSQL as a role that may only read and write the rows, the
schema owned by another (README, Scaling out: the nodes' role and its
grants): the README's SQL, run as written (its role and schema names
replaced by the test's own), gives a real node all it needs, and nothing
of what the owner alone may do.
"""

import poplib
import re
import secrets
import smtplib
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import POSTGRES, _requirePostgres, withSchema
from databasefiles import olderSchema
from e2e import DEADLINE, AdminCommand, ServerProcess, mailgateHere, waitFor
from mailgate.store import openSynchronousStore
from mailgate.store.schema import LATEST
from mailgate.testing import addUser, deliver
from test_readme import codeBlocks, section

pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"


def recipe():
    """
    The README's grants for the nodes' role: the SQL block of Scaling out
    that grants USAGE on the schema.
    """
    [block] = [b for b in codeBlocks(section("Scaling out"), "sql") if "GRANT USAGE ON SCHEMA" in b]
    return block


class Roles:
    """
    A schema owned by a role of its own (C{owner}, as README's
    C{mailgate}), and a second role (C{node}, as README's C{mailnode})
    with no privilege on it yet; neither is a superuser.
    """

    def __init__(self):
        tag = secrets.token_hex(4)
        self.owner, self.node, self.schema = f"mgown_{tag}", f"mgnode_{tag}", f"t_{tag}"
        self.ownerURL = self._url(self.owner)
        self.nodeURL = self._url(self.node)

    def _url(self, role):
        parts = urlsplit(POSTGRES)
        host = parts.netloc.rpartition("@")[2]
        return withSchema(urlunsplit(parts._replace(netloc=f"{role}:pw@{host}")), self.schema)

    def asSuperuser(self, sql):
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(sql)

    def runRecipe(self):
        """
        The README's SQL as written, as the superuser README runs it as,
        for this test's roles and schema.  Its unqualified names
        (C{mailgate_schema}) are found where psql finds them in a database
        whose tables are in C{public}: on the search path, which is the
        test's schema here.  (Without it, they were looked up in this shared
        test database's C{public}, which holds that table only if some
        earlier test happened to create it there: the test failed when run
        alone.)
        """
        sql = recipe()
        sql = re.sub(r"\bpublic\b", self.schema, sql)
        sql = re.sub(r"\bmailnode\b", self.node, sql)
        sql = re.sub(r"\bmailgate\b", self.owner, sql)
        self.asSuperuser(f"SET search_path TO {self.schema};\n{sql}")


def _madeRoles(build):
    """
    L{Roles}, their schema given its tables by C{build(roles)}, all dropped
    after the test.
    """
    _requirePostgres()
    roles = Roles()
    roles.asSuperuser(f"CREATE ROLE {roles.owner} LOGIN PASSWORD 'pw'")
    roles.asSuperuser(f"CREATE ROLE {roles.node} LOGIN PASSWORD 'pw'")
    roles.asSuperuser(f"CREATE SCHEMA {roles.schema} AUTHORIZATION {roles.owner}")
    try:
        build(roles)
        yield roles
    finally:
        roles.asSuperuser(f"DROP SCHEMA {roles.schema} CASCADE")
        for role in (roles.node, roles.owner):
            roles.asSuperuser(f"DROP OWNED BY {role}")
            roles.asSuperuser(f"DROP ROLE {role}")


def _upgradedByTheOwner(roles):
    code, out, err = mailgateHere(roles.ownerURL, "db", "upgrade")
    assert code == 0, err


@pytest.fixture
def roles():
    """
    L{Roles}, the schema brought up to date by its owner.
    """
    yield from _madeRoles(_upgradedByTheOwner)


@pytest.fixture
def rolesOfVersion11():
    """
    L{Roles}, the schema made by its owner as version 11 of mailgate's
    schema left it: built from the start, so that no migration after it
    has to be undone here (each new one broke a test that did).
    """
    yield from _madeRoles(lambda roles: olderSchema(roles.ownerURL, version=11))


def test_theReadmesGrantsRunANodeAndTheOwnerAloneUpgrades(rolesOfVersion11):
    """
    README's grants for the nodes' role, run on a database as version 11
    left it: with an upgrade pending, a node as that role stops, exit 78,
    telling who must run the upgrade.  Once the owner has, the tables it
    created are the role's by the default privileges, with no grant after
    it: as that role, a real node delivers by LMTP, serves POP3 (RETR,
    DELE, QUIT), keeps the session registry the command's who and kick
    read, follows bans; the command manages users and bans.
    """
    roles = rolesOfVersion11
    roles.runRecipe()
    stale = ServerProcess(roles.nodeURL)
    stale.spawn()
    assert stale.wait() == 78, stale.log()
    assert (
        f"cannot upgrade the database schema from version 11 to {LATEST}: permission denied for schema "
        f"{roles.schema} (changing the schema takes CREATE on it and owning its tables: run mailgate "
        f"db upgrade as the schema's owner)"
    ) in stale.stdout + stale.stderr, stale.log()
    assert mailgateHere(roles.ownerURL, "db", "upgrade")[0] == 0

    cli = AdminCommand(roles.nodeURL)
    cli.addUser(ALICE, "pw")
    server = ServerProcess(roles.nodeURL, ["--lmtp", "tcp:0:interface=127.0.0.1"])
    try:
        server.start()
        lmtp = smtplib.LMTP("127.0.0.1", server.portOf("LMTP"), timeout=DEADLINE)
        assert lmtp.sendmail("sender@example.net", [ALICE], b"Subject: one\r\n\r\nhello\r\n") == {}
        lmtp.quit()
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.user(ALICE)
        pop.pass_("pw")
        assert b"hello" in b"\n".join(pop.retr(1)[1])
        pop.dele(1)
        pop.quit()
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.user(ALICE)
        pop.pass_("pw")
        waitFor(lambda: ALICE in mailgateHere(roles.nodeURL, "who")[1], "the session in mailgate who")
        assert mailgateHere(roles.nodeURL, "kick", ALICE)[0] == 0
        with pytest.raises(poplib.error_proto, match="administrator"):
            waitFor(lambda: pop.noop() and None, "the kick", timeout=10)
        code, out, err = mailgateHere(roles.nodeURL, "ban", "add", "192.0.2.1")
        assert code == 0, err
        assert "192.0.2.1" in mailgateHere(roles.nodeURL, "ban", "list")[1]
        assert "mailgate.test[" in mailgateHere(roles.nodeURL, "nodes")[1]
        code, out, err = mailgateHere(roles.nodeURL, "mailbox", "deleted", ALICE)
        assert (code, len(out.splitlines())) == (0, 1), (out, err)
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()
    code, out, err = mailgateHere(roles.nodeURL, "user", "list")
    assert code == 0, err
    assert ALICE in out


def test_aRoleWithoutUsageOnTheSchemaIsToldTheGrant(roles):
    """
    PostgreSQL leaves a schema its role may not use out of the search
    path: such a role sees no tables, and was told that the URL's schema
    did not exist, upgrading "from version 0", of a database the owner
    had brought up to date.  It is told the grant it lacks, exit 78.
    """
    code, out, err = mailgateHere(roles.nodeURL, "user", "list")
    assert code == 78
    assert err == (
        f"mailgate: the database role {roles.node} may not use schema {roles.schema} (the database "
        f"URL's search_path): as the schema's owner, GRANT USAGE ON SCHEMA {roles.schema} TO "
        f"{roles.node}, and SELECT, INSERT, UPDATE, DELETE on its tables\n"
    )


def test_aCopyIntoTheDatabaseAsTheNodesRoleIsRefusedBeforeCopying(roles, tmp_path):
    """
    db copy --to as the nodes' role: setting where the users' ids continue
    takes UPDATE on the sequence, which README's grants do not give.
    Refused in one line naming the owner's URL (exit 78), before the
    source is read; it was an internal error (exit 70) after the whole
    copy, rolled back.
    """
    roles.runRecipe()
    source = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    store = openSynchronousStore(source)
    try:
        addUser(store, ALICE, "pw")
        deliver(store, [ALICE], b"Subject: one\r\n\r\nhello\r\n")
    finally:
        store.close()
    code, out, err = mailgateHere(roles.nodeURL, "db", "copy", "--from", source, "--to", roles.nodeURL)
    assert (code, err) == (
        78,
        f"mailgate: the database role {roles.node} may not set where the ids of table users continue "
        f"(UPDATE on sequence {roles.schema}.users_user_id_seq), which copying into the database needs: "
        f"run mailgate db copy with a --to URL of the schema's owner\n",
    )
    assert mailgateHere(roles.nodeURL, "user", "list")[1].splitlines()[1:] == []
    code, out, err = mailgateHere(roles.nodeURL, "db", "copy", "--from", source, "--to", roles.ownerURL)
    assert code == 0, err


def test_aRoleThatMayOnlyReadServesTheCommandsThatOnlyRead(roles):
    """
    A monitoring host's role, granted SELECT alone (as Dovecot's and
    Postfix's SQL users may only read), runs the commands that only read:
    user list, who, nodes, ban list, mailbox list.  Each was refused, exit
    78, telling the DBA to grant it INSERT, UPDATE and DELETE on every
    table.  A command that writes is refused as before, naming what it
    lacks; so is a role that may not even read.
    """
    roles.asSuperuser(f"GRANT USAGE ON SCHEMA {roles.schema} TO {roles.node}")
    cli = AdminCommand(roles.ownerURL)
    cli.addUser(ALICE, "pw")
    for command in (["user", "list"], ["who"], ["nodes"], ["ban", "list"], ["mailbox", "list", ALICE]):
        code, out, err = mailgateHere(roles.nodeURL, *command)
        assert code == 78 and f"the database role {roles.node} may not SELECT on table " in err, (command, err)
        assert f"GRANT SELECT ON ALL TABLES IN SCHEMA {roles.schema} TO {roles.node}," in err, err
    roles.asSuperuser(f"GRANT SELECT ON ALL TABLES IN SCHEMA {roles.schema} TO {roles.node}")
    for command in (["user", "list"], ["who"], ["nodes"], ["ban", "list"], ["mailbox", "list", ALICE]):
        code, out, err = mailgateHere(roles.nodeURL, *command)
        assert (code, err) == (0, ""), (command, err)
    assert ALICE in mailgateHere(roles.nodeURL, "user", "list")[1]
    code, out, err = mailgateHere(roles.nodeURL, "ban", "add", "192.0.2.1")
    assert code == 78 and f"the database role {roles.node} may not INSERT, UPDATE, DELETE on table " in err, err
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {roles.schema} TO {roles.node}," in err
