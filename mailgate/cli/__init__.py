# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate}: the administrator's command.

  mailgate [--database URL | --config FILE] user add ADDRESS [--password-stdin] [--apop] [--hashed]
  mailgate user passwd ADDRESS [--password-stdin] [--hashed]
  mailgate user import PASSWD-FILE [--domain DOMAIN] [--scheme SCHEME] [--apop] [--refresh]
  mailgate user test ADDRESS [--password-stdin]
  mailgate user del ADDRESS
  mailgate user list [--json]
  mailgate user apop ADDRESS on|off [--password-stdin]
  mailgate user quota ADDRESS SIZE|none|default [--messages N|none|default]
  mailgate user expire ADDRESS N|never|default
  mailgate user rename OLD NEW
  mailgate user recount (ADDRESS... | --all)
  mailgate mailbox list ADDRESS [--json]
  mailgate mailbox expunge ADDRESS (--older-than DAYS | --all)
  mailgate mailbox deleted ADDRESS [--json]
  mailgate mailbox restore ADDRESS [UIDL ...] [--since TIME] [--as-new]
  mailgate mailbox show ADDRESS MESSAGE
  mailgate mailbox export (ADDRESS DIR | --all DIR)
  mailgate import forget ADDRESS [UIDL ...]
  mailgate import maildir DIR ADDRESS [--uidl-format FORMAT] [--uidlist FILE] [--reuse-xuidl]
                          [--deleted-flag KEYWORD] [--mirror]
  mailgate import pop3 URL [ADDRESS] [--password-stdin] [--insecure] [--delete | --mirror] [--users FILE]
                       [--max-message-size SIZE] [--master-user NAME [--master-separator SEP]]
  mailgate who [--json]
  mailgate nodes [--json]
  mailgate kick ADDRESS [--wait SECONDS]
  mailgate deliver [-f SENDER] [--again] ADDRESS... < message
  mailgate db upgrade
  mailgate db version
  mailgate db copy --from URL --to URL
  mailgate db backup FILE
  mailgate db restored
  mailgate config [--all | --check]
  mailgate serve [options of twistd mailgate]
  mailgate ban list [--json]
  mailgate ban add ADDRESS [--for SECONDS]
  mailgate ban del ADDRESS

It works on the database directly and synchronously (no reactor), through
the same store code the server uses, so it is safe to run while the server
is up.  C{mailgate serve} is the exception: it runs the server itself, in
the foreground, as C{twistd -n mailgate} would.  Exit codes follow sysexits(3), which is what an MTA's pipe transport
understands for C{deliver}: 0 delivered, 67 unknown user, 75 try again.
"""

import argparse
import contextlib
import io
import os
import select
import sys

from mailgate import __version__
from mailgate.cli.bans import _addBanCommands
from mailgate.cli.common import (
    CommandError,
    EXIT_READER_GONE,
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Output,
    OutputFailed,
    _addHashed,
    _addJSON,
)
from mailgate.cli.database import _dbBackup, _dbCopy, _dbRestored, _dbUpgrade, _dbVersion
from mailgate.cli.deliver import _deliver
from mailgate.cli.imports import _importForget, _importMaildir, _importPOP3
from mailgate.cli.mailboxes import (
    _mailboxDeleted,
    _mailboxExport,
    _mailboxExpunge,
    _mailboxList,
    _mailboxRestore,
    _mailboxShow,
)
from mailgate.cli.serve import _serve
from mailgate.cli.sessions import _kick, _nodes, _who
from mailgate.cli.users import (
    _userAdd,
    _userApop,
    _userDel,
    _userExpire,
    _userImport,
    _userList,
    _userPasswd,
    _userQuota,
    _userRecount,
    _userRename,
    _userTest,
)
from mailgate.errors import ConfigurationError, DatabaseRefused, MailgateError, TemporaryFailure
from mailgate.store import DEFAULT_DATABASE, NoSuchDatabase, openSynchronousStore

#: what this package offers: the command, its parser, and the exit codes
#: (sysexits(3)) scripts and tests compare with
__all__ = [
    "buildParser",
    "main",
    "run",
    "EXIT_READER_GONE",
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_IOERR",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
]


def buildParser():
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="Administer a mailgate database: users, maildrops, local delivery.",
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument(
        "--database",
        metavar="URL",
        help="database URL (default: the --config file's database, else $MAILGATE_DATABASE, "
        "else " + DEFAULT_DATABASE + ")",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the server's configuration file (twistd mailgate --config FILE): its database is "
        "used, so the URL and its password need not be repeated; the file is checked as the "
        "server checks it",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION"
    )
    user.required = True
    add = user.add_parser(
        "add",
        help="add a user",
        description="Add a user (an empty maildrop, the server's default quota and retention) with a "
        "password asked for on the terminal, or read with --password-stdin: its first line, UTF-8, "
        "at most 1024 octets.  A user that exists already is left as it is (exit 73).",
    )
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP; this keeps the password recoverable in the database (see README)",
    )
    _addHashed(add)
    add.set_defaults(run=_userAdd, migrate=True, create=True)
    passwd = user.add_parser(
        "passwd",
        help="change a user's password",
        description="Change a user's password (asked for on the terminal, or read with "
        "--password-stdin: its first line, UTF-8, at most 1024 octets), for every login method "
        "the user has (APOP and CRAM-MD5 too).  The old password fails at once on every server.",
    )
    passwd.add_argument("address", metavar="ADDRESS")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _addHashed(passwd)
    passwd.set_defaults(run=_userPasswd, migrate=True)
    imports = user.add_parser(
        "import",
        help="add the users of a Dovecot passwd-file, keeping their passwords",
        description="Add the users of a Dovecot passwd-file (user:{SCHEME}hash:...; '-' reads "
        "standard input), keeping their password hashes: each is replaced by mailgate's own "
        "at the user's first login.  Users already there are left as they are, so the "
        "command can be run again.  SCRAM-SHA-256 works for a user once they have logged "
        "in with their password (at once for Dovecot's {SCRAM-SHA-256} and {PLAIN}).",
    )
    imports.add_argument("file", metavar="PASSWD-FILE")
    imports.add_argument("--domain", help="the domain of user names without one")
    imports.add_argument(
        "--scheme",
        help="the scheme of passwords written without a {SCHEME} prefix, as the passdb's "
        "args = scheme=... says (PLAIN for passwords in clear); crypt(3) strings by default",
    )
    imports.add_argument(
        "--refresh",
        action="store_true",
        help="replace the password of users already there whose password is still the one "
        "imported (they have not logged in to mailgate since) with the file's, for passwords "
        "changed on the old server while the move goes on",
    )
    imports.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP (and CRAM-MD5) for the users whose password is in clear ({PLAIN}), "
        "as Dovecot did; this keeps it recoverable in the database (see README)",
    )
    imports.set_defaults(run=_userImport, migrate=True, create=True)
    delete = user.add_parser(
        "del",
        help="delete a user and their maildrop",
        description="Delete a user and their maildrop.  Refused while the user is in a POP3 session.",
    )
    delete.add_argument("address", metavar="ADDRESS")
    delete.set_defaults(run=_userDel, migrate=True)
    listing = user.add_parser(
        "list",
        help="list users: their use, their own limits, their last POP3 login",
        description="List every user, by address in byte order: messages and octets in use, "
        "APOP (on, off, or cram for CRAM-MD5 alone), their own quota, message limit and "
        "retention (default: the server's), and their last POP3 login (never for none yet).",
    )
    _addJSON(listing)
    listing.set_defaults(run=_userList, migrate=True)
    test = user.add_parser(
        "test",
        help="check a user's password without logging in",
        description="Check a user's password as a POP3 login would (as doveadm auth test): exit "
        "0 if it is right, 77 if not.  Nothing is changed, not even an imported hash.",
    )
    test.add_argument("address", metavar="ADDRESS")
    test.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    test.set_defaults(run=_userTest, migrate=True)
    apop = user.add_parser(
        "apop",
        help="switch APOP (and CRAM-MD5) on or off for a user; off also erases CRAM-MD5 states from Dovecot",
        description="on keeps the password recoverably, for APOP and CRAM-MD5 (it asks for the password); "
        "off erases it, and the CRAM-MD5 states of a {CRAM-MD5} hash imported from Dovecot: the user "
        "then has neither APOP nor CRAM-MD5.",
    )
    apop.add_argument("address", metavar="ADDRESS")
    apop.add_argument("state", choices=["on", "off"])
    apop.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    apop.set_defaults(run=_userApop, migrate=True)
    rename = user.add_parser(
        "rename",
        help="give a user a new address (maildrop, unique ids and quota follow)",
        description="Give a user a new address.  The maildrop, its unique ids, quota and "
        "retention follow; the next login must use the new address, on running servers "
        "too.  Refused while the user is in a POP3 session.",
    )
    rename.add_argument("old", metavar="OLD")
    rename.add_argument("new", metavar="NEW")
    rename.set_defaults(run=_userRename, migrate=True)
    quota = user.add_parser(
        "quota",
        help="set a user's storage quota",
        description="Set a user's storage quota: a size (1G, 500M, 64K or octets), "
        "'none' for no limit, or 'default' for the server's --default-quota.  Mail "
        "already stored is kept whatever the new quota; only new mail is refused.",
    )
    quota.add_argument("address", metavar="ADDRESS")
    quota.add_argument("size", metavar="SIZE|none|default")
    quota.add_argument(
        "--messages", metavar="N|none|default", help="also limit the number of messages"
    )
    quota.set_defaults(run=_userQuota, migrate=True)
    expire = user.add_parser(
        "expire",
        help="set how many days a user's messages are kept",
        description="Set after how many days a user's messages are removed by the "
        "retention task (advertised to the user's POP3 clients as EXPIRE): a number "
        "of days, 'never', or 'default' for the server's --expire-days.",
    )
    expire.add_argument("address", metavar="ADDRESS")
    expire.add_argument("days", metavar="N|never|default")
    expire.set_defaults(run=_userExpire, migrate=True)

    recount = user.add_parser(
        "recount",
        help="count users' storage use again from their messages",
        description="Count each user's storage use (messages and octets, what quotas and user "
        "list go by) again from the messages in the maildrop, and keep that, as doveadm quota "
        "recalc does.  Use is kept with every delivery and removal; a node of a mailgate from "
        "before quotas (schema version 3) that goes on delivering after the upgrade does not "
        "keep it.",
    )
    recount.add_argument("addresses", nargs="*", metavar="ADDRESS")
    recount.add_argument("--all", action="store_true", help="every user")
    recount.set_defaults(run=_userRecount, migrate=True)

    mailbox = commands.add_parser("mailbox", help="list, expunge, restore and export a user's messages").add_subparsers(
        dest="action", metavar="ACTION"
    )
    mailbox.required = True
    mlist = mailbox.add_parser(
        "list",
        help="list a user's messages as POP3 numbers them",
        description="List a user's messages as a POP3 session would number them: number, "
        "octets, unique id, arrival time (UTC); then the use and quota (not with --json).",
    )
    mlist.add_argument("address", metavar="ADDRESS")
    _addJSON(mlist)
    mlist.set_defaults(run=_mailboxList, migrate=True)
    mdeleted = mailbox.add_parser(
        "deleted",
        help="list a user's messages deleted by POP3 and kept for recovery (--keep-deleted-days)",
        description="List a user's messages deleted by POP3 and kept for recovery "
        "(--keep-deleted-days): unique id, octets, when deleted (UTC) and from which client address; "
        "mailbox restore brings them back.",
    )
    mdeleted.add_argument("address", metavar="ADDRESS")
    _addJSON(mdeleted)
    mdeleted.set_defaults(run=_mailboxDeleted, migrate=True)
    mrestore = mailbox.add_parser(
        "restore",
        help="bring back messages deleted by POP3 (kept for --keep-deleted-days)",
        description="Bring back kept deleted messages: those with the given unique ids, "
        "or all of them (optionally only those deleted since TIME).  They come back "
        "under their own unique ids, so that POP3 clients that leave mail on the server "
        "treat them as already downloaded; with --as-new under new ids, so that they "
        "download them again.",
    )
    mrestore.add_argument("address", metavar="ADDRESS")
    mrestore.add_argument("uidls", nargs="*", metavar="UIDL")
    mrestore.add_argument(
        "--since", metavar="TIME", help="only messages deleted since TIME (2024-05-01T10:00:00Z, 2h ago as 2h)"
    )
    mrestore.add_argument("--as-new", action="store_true", help="give them new unique ids")
    mrestore.set_defaults(run=_mailboxRestore, migrate=True)
    mexpunge = mailbox.add_parser(
        "expunge",
        help="remove a user's messages for good (all, or older than DAYS)",
        description="Remove messages from a user's maildrop for good (they are not kept "
        "for mailbox restore).  Refused while the user is in a POP3 session.",
    )
    mexpunge.add_argument("address", metavar="ADDRESS")
    which = mexpunge.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", metavar="DAYS", help="messages that arrived more than DAYS days ago")
    which.add_argument("--all", action="store_true", help="every message")
    mexpunge.set_defaults(run=_mailboxExpunge, migrate=True)
    mshow = mailbox.add_parser(
        "show",
        help="write one message to standard output, as POP3 serves it",
        description="Write one message of a user's to standard output, its octets as POP3's "
        "RETR gives them (CRLF line ends, before dot-stuffing): MESSAGE is its number or its "
        "unique id, as mailbox list shows them.  Read without the maildrop's lock.",
    )
    mshow.add_argument("address", metavar="ADDRESS")
    mshow.add_argument("message", metavar="MESSAGE")
    mshow.set_defaults(run=_mailboxShow, migrate=True)
    mexport = mailbox.add_parser(
        "export",
        # argparse would write the operands as ADDRESS DIR | DIR [ADDRESS
        # DIR | DIR ...]: the two forms README's synopsis gives instead.
        usage="%(prog)s [-h] (ADDRESS DIR | --all DIR)",
        help="copy a user's messages out as a Maildir that Dovecot serves with the same unique ids",
        description="Write a user's messages into DIR (made if missing; refused if it holds a "
        "mailbox already) as a Maildir with a dovecot-uidlist: Dovecot, or mailgate import "
        "maildir, then serves the same messages in the same order under the same POP3 unique "
        "ids, so clients that leave mail on the server download nothing again.  Reads without "
        "the maildrop's lock: allowed while the user is in a POP3 session.  Files are "
        "readable by their owner only: give them to the mail account that will serve them.",
    )
    mexport.add_argument(
        "operands", nargs="+", metavar="ADDRESS DIR",
        help="the user and the directory to write into; with --all, the directory alone",
    )
    mexport.add_argument(
        "--all", action="store_true",
        help="every user, each into DIR/ADDRESS (Dovecot: mail_location = maildir:DIR/%%u)",
    )
    mexport.set_defaults(run=_mailboxExport, migrate=True)

    who = commands.add_parser(
        "who",
        help="list the POP3 sessions in progress on every node",
        description="List the POP3 sessions in progress on every node sharing the database: "
        "user, node (its hostname and process id), client address, since when.  A session shows "
        "within a second or two of its login; those of a node whose heartbeat stopped (killed, "
        "its machine gone) are left out after 30 seconds.",
    )
    _addJSON(who)
    who.set_defaults(run=_who, migrate=True)
    nodes = commands.add_parser(
        "nodes",
        help="list the running nodes sharing the database and the settings they work with",
        description="List the nodes whose heartbeat is recent, with the settings each works with on "
        "the data they share (default quota, retention (EXPIRE), days deleted mail is kept, how mail "
        "over quota is refused, quota warnings, recipient delimiter, duplicate window) and its clock "
        "against the database server's; says which of these settings differ between nodes.",
    )
    _addJSON(nodes)
    nodes.set_defaults(run=_nodes, migrate=True)
    kick = commands.add_parser(
        "kick",
        help="end a user's POP3 session, wherever it runs, without applying its deletions",
        description="End ADDRESS's POP3 session on whichever node serves it: the client is told "
        "-ERR [SYS/TEMP] session ended by the administrator, nothing the session marked deleted "
        "is deleted, and the maildrop is free again.  Waits until the session is gone: exit 0, "
        "1 if there was none, 75 if it is still there after --wait seconds.",
    )
    kick.add_argument("address", metavar="ADDRESS")
    kick.add_argument(
        "--wait", default="30", metavar="SECONDS", help="how long to wait for it to end (default 30)"
    )
    kick.set_defaults(run=_kick, migrate=True)

    imports = commands.add_parser(
        "import", help="move maildrops from another server, keeping unique ids"
    ).add_subparsers(dest="action", metavar="ACTION")
    imports.required = True
    imaildir = imports.add_parser(
        "maildir",
        help="import a Maildir (e.g. Dovecot's) into a user's maildrop",
        description="Import a Maildir's messages (cur/ and new/) into a user's maildrop, "
        "in the order Dovecot serves them, with the unique ids it serves (read from "
        "dovecot-uidlist and formatted like Dovecot's pop3_uidl_format).  Safe to run "
        "again: messages already imported are skipped.",
    )
    imaildir.add_argument("directory", metavar="DIR")
    imaildir.add_argument("address", metavar="ADDRESS")
    imaildir.add_argument(
        "--uidl-format",
        metavar="FORMAT",
        help="Dovecot's pop3_uidl_format for this maildir: %%u uid, %%v uidvalidity, "
        "%%f file name, %%g GUID, %%m header MD5 (default %%08Xu%%08Xv, or %%f without "
        "a dovecot-uidlist); or as Dovecot 2.4 spells it, %%{uid | hex(8)}%%{uidvalidity | hex(8)}",
    )
    imaildir.add_argument(
        "--uidlist",
        metavar="FILE",
        help="the maildir's dovecot-uidlist, where Dovecot keeps it outside the maildir (CONTROL= in "
        "mail_location, e.g. ~/control/.INBOX/dovecot-uidlist; default: DIR/dovecot-uidlist)",
    )
    imaildir.add_argument(
        "--reuse-xuidl",
        action="store_true",
        help="where Dovecot has pop3_reuse_xuidl = yes: a message's X-UIDL header field is its unique id "
        "(a saved one still comes first, the --uidl-format after it)",
    )
    imaildir.add_argument(
        "--deleted-flag",
        metavar="KEYWORD",
        help="where Dovecot has pop3_deleted_flag = KEYWORD: the messages with that keyword (deleted by POP3 "
        "clients, no longer listed by Dovecot) are left out",
    )
    imaildir.add_argument("--mirror", action="store_true", help="a run after an earlier one: also take out of the maildrop what an earlier import brought in and the " 
        "source no longer has (deleted there since, by a client or its retention), which leave-on-server clients "
        "would download again; kept for recovery (mailgate mailbox deleted)")
    imaildir.set_defaults(run=_importMaildir, migrate=True)
    ipop3 = imports.add_parser(
        "pop3",
        help="copy a live POP3 server's maildrop into a user's",
        description="Copy a maildrop from a POP3 server (UIDL, then RETR of each message), "
        "keeping its unique ids.  URL: pop3://user@host:port or pop3s://user@host:port "
        "(a user name containing @ written %40; without one, the ADDRESS).  STLS is used "
        "when offered (a server without it is refused, except on this machine, unless "
        "--insecure); certificates are verified unless --insecure.  Resumable: messages "
        "already imported are skipped.  The source is left untouched unless --delete.",
    )
    ipop3.add_argument("url", metavar="URL")
    ipop3.add_argument("address", nargs="?", metavar="ADDRESS")
    ipop3.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    ipop3.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate, and send the password to a server "
        "that offers no STLS in the clear (refused otherwise, except to this machine)",
    )
    ipop3.add_argument("--delete", action="store_true", help="delete each message from the source once imported")
    ipop3.add_argument("--mirror", action="store_true", help="a run after an earlier one: also take out of the maildrop what an earlier import brought in and the " 
        "source no longer has (deleted there since, by a client or its retention), which leave-on-server clients "
        "would download again; kept for recovery (mailgate mailbox deleted)" + " (not with --delete)")
    ipop3.add_argument(
        "--max-message-size",
        metavar="SIZE",
        default="50M",
        help="the largest message imported (octets, or with a unit: 100M, 1G); a larger one is "
        "reported and left on the source (default: 50M, the server's own default limit)",
    )
    ipop3.add_argument(
        "--users",
        metavar="FILE",
        help="import many users: one 'ADDRESS PASSWORD' per line, each logging in to the "
        "source as ADDRESS (with --master-user, one ADDRESS per line)",
    )
    ipop3.add_argument(
        "--master-user",
        metavar="NAME",
        help="log in to the source as each user through this master user (Dovecot's master "
        "users: ADDRESS*NAME, with the master user's password), so that no user's own "
        "password is needed",
    )
    ipop3.add_argument(
        "--master-separator",
        metavar="SEP",
        default="*",
        help="what joins the user and the master user, the source's auth_master_user_separator "
        "(default: *)",
    )
    ipop3.set_defaults(run=_importPOP3, migrate=True)
    iforget = imports.add_parser(
        "forget",
        help="forget the unique ids imported for a user, so that the next import brings back "
        "what the user deleted since",
        description="mailgate remembers the unique ids it imported for each user after the user "
        "deletes the messages, so that a later import does not bring them back.  Forget them "
        "(those given, or all) to import such messages again on purpose: messages the maildrop "
        "still holds stay skipped; deleted mail mailgate keeps (--keep-deleted-days) comes back "
        "with mailbox restore, not by importing.",
    )
    iforget.add_argument("address", metavar="ADDRESS")
    iforget.add_argument("uidls", nargs="*", metavar="UIDL", help="only these unique ids (default: all)")
    iforget.set_defaults(run=_importForget, migrate=True)

    deliver = commands.add_parser(
        "deliver",
        help="deliver a message from standard input to local users",
        description="Deliver a message from standard input to local users, all or none of "
        "them, for an MTA's pipe transport (give it one recipient at a time, so that an "
        "unknown one bounces alone).  Exit status (sysexits): 0 delivered, 67 no such user (nothing "
        "delivered), 75 a temporary failure (a full mailbox, the database unavailable: the "
        "MTA tries again), 77 a full mailbox the server's --config file refuses for good "
        "(quota-exceeded = \"permanent\") or a message larger than the recipients' whole "
        "quota (no room made will fit it), 65 a sender SMTP would refuse.",
    )
    deliver.add_argument("addresses", nargs="+", metavar="ADDRESS")
    deliver.add_argument(
        "-f",
        "--sender",
        metavar="ADDRESS",
        help="the envelope sender (e.g. Postfix's ${sender}); adds Return-Path: and Received: "
        "fields, as SMTP and LMTP delivery do (use '' for the null sender; MAILER-DAEMON, which "
        "Postfix's pipe passes for it, is taken as the null sender too)",
    )
    deliver.add_argument(
        "--again",
        action="store_true",
        help="store the message even for a recipient who got the same one from the same sender "
        "within the duplicate window (by default taken for the MTA's retry and not stored twice): "
        "to give a user back mail she deleted",
    )
    deliver.set_defaults(run=_deliver, migrate=True)

    db = commands.add_parser("db", help="database maintenance").add_subparsers(
        dest="action", metavar="ACTION"
    )
    db.required = True
    dbUpgrade = db.add_parser(
        "upgrade",
        help="apply pending schema migrations",
        description="Bring the database's schema up to this mailgate's version, creating an "
        "SQLite file that is not there yet (servers and the other commands migrate too; run it "
        "as the schema's owner where the nodes' role may only read and write the tables).  "
        "Each migration is one transaction: one interrupted leaves the version before.",
    )
    dbUpgrade.set_defaults(run=_dbUpgrade, migrate=False, create=True)
    dbVersion = db.add_parser(
        "version",
        help="show the schema version",
        description="Show the database's schema version and the newest this mailgate knows, "
        "without changing either: a mailgate older than its database refuses it.",
    )
    dbVersion.set_defaults(run=_dbVersion, migrate=False)
    dbCopy = db.add_parser(
        "copy",
        help="copy users and maildrops to another (empty) database, keeping unique ids",
        description="Copy every user and maildrop from one database to another, "
        "e.g. from SQLite to PostgreSQL, preserving message numbers and unique ids. "
        "Stop the servers using either database first.",
    )
    dbCopy.add_argument("--from", dest="source", required=True, metavar="URL", help="the database to copy")
    dbCopy.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty database to copy into")
    dbCopy.set_defaults(run=_dbCopy, migrate=False, store=False)
    dbBackup = db.add_parser(
        "backup",
        help="copy the SQLite database into a new file while servers use it",
        description="Copy the SQLite database into FILE (a new file, readable by its owner "
        "only) as one consistent snapshot, while servers go on serving and taking mail in: "
        "the backup to restore (servers stopped) after a lost disk or before an upgrade.  "
        "PostgreSQL has its own tools (pg_dump).",
    )
    dbBackup.add_argument("file", metavar="FILE")
    dbBackup.set_defaults(run=_dbBackup, migrate=False)
    dbRestored = db.add_parser(
        "restored",
        help="ready a database just restored from a backup taken by other means (pg_dump, a snapshot)",
        description="Run once a database has been restored from a backup that db backup did not make "
        "(pg_dump or pg_basebackup, a filesystem snapshot, a copied SQLite file), before any server "
        "starts on it: in one transaction, every maildrop gets a new validity stamp, so that new "
        "mail gets no unique id the lost database gave after the backup, and the nodes and POP3 "
        "sessions of the servers that ran when the backup was taken are forgotten.  Refused "
        "(exit 75) while a server runs on the database.",
    )
    dbRestored.set_defaults(run=_dbRestored, migrate=True)

    showConfig = commands.add_parser(
        "config",
        help="show the configuration a server would serve (the settings not at their defaults)",
        description="Print the configuration twistd mailgate serves with --config FILE (the "
        "global --config) and no other option: the settings not at their defaults, as a "
        "configuration file (as postconf -n and doveconf -n), the database's password hidden; "
        "--all prints every setting.",
    )
    showConfig.add_argument("--all", action="store_true", help="every setting, at its default or not")
    showConfig.add_argument(
        "--check",
        action="store_true",
        help="check the configuration as a server starting or reloading would (values, TLS "
        "certificates and keys loaded), print what is wrong and exit 78, or 'configuration OK' "
        "(as nginx -t; the systemd unit's ExecReload runs it before the SIGHUP)",
    )
    showConfig.set_defaults(run=_showConfig, migrate=False, store=False)

    # Its options are twistd mailgate's, parsed by mailgate.tap: passed on as
    # they are (see run).
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the server in the foreground, with the options of twistd mailgate "
        "(mailgate serve --help lists them)",
    ).set_defaults(run=None)
    _addBanCommands(commands)
    return parser


def _configDatabase(path):
    """
    The database URL the server's configuration file at C{path} sets, or
    C{None} (no file given, or no database in it).  The whole file is read
    and checked as C{twistd mailgate --config} reads it, so a file the
    server would refuse is refused here too, in the same words.

    @raise ConfigurationError: the file cannot be used.
    """
    if path is None:
        return None
    from mailgate import config

    return config.readFile(path).get("database")


def _showConfig(store, args, out, stdin):
    from mailgate import config

    served = config.resolveFile(args.config, {}, args.environ)
    source = f"--config {args.config}" if args.config is not None else "no configuration file"
    if args.check:
        _checkServed(served, args, out)
        return
    out.write(f"# what twistd mailgate serves with {source} and no other option\n")
    out.write(config.effectiveFile(served, everything=args.all))


def _checkServed(served, args, out):
    """
    What C{config --check} does: build what a server starting with this
    configuration builds before it binds or opens the database (the
    checks across settings, the TLS contexts from the certificate and key
    files, the CPU affinity), so that C{systemctl reload} refuses a file
    or a certificate the server would refuse, saying why, instead of
    sending a SIGHUP whose failure only the log would tell.  What a
    server would warn of at start (a certificate expiring, a key or
    configuration file others may read) is written to standard error.

    @raise ConfigurationError: what the server would refuse.
    """
    from mailgate import config, service, tap

    config.checkConfig(served)
    config.checkListening(served, args.config)
    tls = service.checkStartable(served)
    warnings = [] if tls is None else [*tls.expiryWarnings(), *tls.keyWarnings, *tls.chainWarnings]
    if args.config is not None:
        warnings.append(tap.configFileWarning(args.config))
    # Warned of, not refused: the server may be stopped, and the unit's
    # RuntimeDirectory= with it, which systemd makes again at its start.
    warnings += [
        f"{name} {description}: {reason}: a start cannot listen there unless it is made first "
        "(for /run/mailgate, the unit's RuntimeDirectory= makes it at each start)"
        for name, description, reason in config.missingSocketDirectories(served)
    ]
    for warning in filter(None, warnings):
        args.stderr.write(f"mailgate: warning: {warning}\n")
    where = args.config if args.config is not None else "no configuration file"
    out.write(f"mailgate: {where}: configuration OK\n")


def _configValues(path):
    """
    What the server's configuration file at C{path} sets, by long option
    name (read and checked as the server reads it).
    """
    from mailgate import config

    return config.readFile(path)


def _configLimits(values):
    """
    The store's defaults as the server's configuration file sets them
    (C{values}, what L{_configValues} read: C{--default-quota},
    C{--quota-warning}, the retention days), so that C{mailgate deliver
    --config FILE}, an MTA's pipe transport, applies the quota the
    server's SMTP and LMTP apply.
    """
    from mailgate.store.limits import DUPLICATE_WINDOW, StoreLimits

    return StoreLimits(
        quotaOctets=values.get("default-quota"),
        expireDays=values.get("expire-days"),
        keepDeletedDays=values.get("keep-deleted-days", 0),
        quotaWarnings=values.get("quota-warning", ()),
        duplicateWindow=values.get("duplicate-window", DUPLICATE_WINDOW),
    )


def _databaseURL(args, environ):
    """
    The database URL to work on, and where it came from, for messages
    about it: C{--database}, else the C{--config} file's, else
    C{$MAILGATE_DATABASE}, else the default, as for the server.
    """
    if args.database:
        return args.database, "--database"
    fromFile = _configDatabase(args.config)
    if fromFile:
        return fromFile, f"database in {args.config}"
    if environ.get("MAILGATE_DATABASE"):
        return environ["MAILGATE_DATABASE"], "$MAILGATE_DATABASE"
    # A --config file that sets no database is named: an MTA's pipe
    # transport given the server's file, whose database the systemd unit
    # sets in its environment instead, defers every message with this line.
    inFile = f", nor database in {args.config}" if args.config else ""
    return DEFAULT_DATABASE, (
        f"--database: none was given{inFile}, nor $MAILGATE_DATABASE, and the default, {DEFAULT_DATABASE}, "
        "is in the working directory"
    )


def run(argv, stdin=None, stdout=None, stderr=None, environ=None):
    """
    Run the command; return its exit code.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if stderr is None:
        # Python's standard error where the command started with it closed
        # (2>&-): its messages go nowhere, and the exit status still says
        # what happened (writing them failed, and every failure exited 1).
        stderr = io.StringIO()
    environ = os.environ if environ is None else environ
    parser = buildParser()
    try:
        # argparse writes help and usage errors to sys.stdout/sys.stderr;
        # send them to the streams this run was given.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args, rest = parser.parse_known_args(argv)
            if args.command != "serve":
                args = parser.parse_args(argv)
    except SystemExit as e:
        return EX_USAGE if e.code else EX_OK
    except BrokenPipeError:
        # mailgate user --help | head: the reader gone, as for a listing.
        if _readerGone(stdout):
            return EXIT_READER_GONE
        raise
    if args.command == "serve":
        if args.config is not None:
            # Before serve's own options, so that a --config of its own wins.
            rest = ["--config", args.config, *rest]
        try:
            return _serve(rest, args.database, stdout, stderr)
        except BrokenPipeError:
            # mailgate serve --help | head (its options, 24 KB of them).
            if _readerGone(stdout):
                return EXIT_READER_GONE
            raise
    delivering = args.run is _deliver
    try:
        url, source = _databaseURL(args, environ)
    except ConfigurationError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    store = None
    opening = False
    try:
        args.stderr = stderr
        args.environ = environ
        if getattr(args, "store", True):
            # Only the commands that start a database from nothing create
            # its file: any other one on a mistyped path would make an
            # empty database and report no users.
            opening = True
            store = openSynchronousStore(url, migrate=args.migrate, create=getattr(args, "create", False))
            opening = False
            if args.config is not None:
                values = _configValues(args.config)
                store.limits = _configLimits(values)
                args.recipientDelimiter = values.get("recipient-delimiter")
                # How the server refuses a full mailbox (deliver's exit 77
                # for "permanent", 75 else).
                args.quotaExceeded = values.get("quota-exceeded")
                # The name the server's Received: fields give (deliver's too).
                args.hostname = values.get("hostname")
                args.spoolDirectory = values.get("spool-directory")
        output = Output(stdout)
        args.run(store, args, output, stdin)
        # Here rather than at exit, so that a reader gone is seen below.
        output.flush()
        return EX_OK
    except CommandError as e:
        stderr.write(f"mailgate: {e}\n")
        return e.code
    except OutputFailed as e:
        if delivering:
            # deliver writes only once the message is stored: 75 would
            # have the MTA store it again.
            stderr.write(f"mailgate: the message is stored, but {e}\n")
            return EX_OK
        stderr.write(f"mailgate: {e}\n")
        return EX_IOERR
    except NoSuchDatabase as e:
        stderr.write(f"mailgate: {e} (check {source}; mailgate user add or db upgrade creates it)\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except DatabaseRefused as e:
        # PostgreSQL refused the URL's password, role or database: trying
        # again changes nothing (deliver's MTA keeps the message all the
        # same).
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except TemporaryFailure as e:
        stderr.write(f"mailgate: temporary failure, try again: {e}\n")
        return EX_TEMPFAIL
    except ConfigurationError as e:
        # A database that cannot be opened: say whose URL it was.  Not of
        # another error (config --check's TLS files, which opens none):
        # "database in FILE: tls-ciphers ..." blamed the database.
        where = f"{source}: " if opening and not source.startswith("--database") else ""
        stderr.write(f"mailgate: {where}{e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except MailgateError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
    except KeyboardInterrupt:
        stderr.write("mailgate: interrupted\n")
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _readerGone(stdout):
            # mailgate mailbox list ... | head: nothing failed.  deliver
            # writes only once the message is stored: a retry would store
            # it twice.
            return EX_OK if delivering else EXIT_READER_GONE
        from mailgate.store.sqlite import damageOf

        damage = damageOf(e)
        if damage is not None:
            # Found past the opening (a damaged page read later).
            stderr.write(f"mailgate: {damage}\n")
            return EX_TEMPFAIL if delivering else EX_CONFIG
        stderr.write(f"mailgate: internal error: {e.__class__.__name__}: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
    finally:
        if store is not None:
            store.close()


def _readerGone(stream):
    """
    Whether C{stream} is a pipe (or socket) that nothing reads any more,
    rather than some other part of the command having met a broken pipe.
    (Asked of the descriptor: what failed to be written may be gone from
    the stream's buffer, so flushing it again can succeed.)
    """
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except Exception:
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def main():
    status = run(sys.argv[1:])
    if _readerGone(sys.stdout):
        # The interpreter flushes standard output once more on exit, and
        # would report the broken pipe as an exception ignored.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(status)
