# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate deliver}: a message from standard input into local maildrops,
for an MTA's pipe transport.
"""

from mailgate.cli import audit
from mailgate.cli.common import CommandError, EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_TEMPFAIL, _result
from mailgate.errors import NoSuchUser, QuotaExceeded
from mailgate.message import spoolFile
from mailgate.records import AlreadyDelivered


def _sender(text):
    """
    The envelope sender of C{deliver -f}, checked as SMTP's MAIL FROM
    checks it (it goes into the Return-Path: field): a mailbox, with or
    without its angle brackets, or the null sender (C{''} or C{<>}, or
    C{MAILER-DAEMON}, which Postfix's pipe transport passes as C{${sender}}
    for it unless told otherwise, its C{null_sender} default: refused, every
    bounce for a local user would bounce in turn).
    """
    from mailgate.smtp.syntax import MAX_PATH, EnvelopeSyntaxError, checkMailbox

    inside = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if not inside or inside.upper() == "MAILER-DAEMON":
        return ""
    try:
        # An argument that was not UTF-8 (octets from an 8-bit MAIL FROM)
        # holds surrogates, which no header field can carry.
        inside.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError(f"bad sender {ascii(text[:60])}: not UTF-8", EX_DATAERR) from None
    # As it came, else as Postfix's internal form (see _quoted); what is
    # wrong with it as it came is what the refusal says.
    error = None
    for address in (inside, _quoted(inside)):
        if address is None:
            break
        try:
            if len(address) > MAX_PATH:
                raise EnvelopeSyntaxError("address too long")
            return checkMailbox(address, utf8=True, maxLocalPart=None)
        except EnvelopeSyntaxError as e:
            error = error or e
    raise CommandError(f"bad sender {text[:60]!r}: {error}", EX_DATAERR) from None


def _quoted(address):
    """
    C{address} with its local part quoted (RFC 5321's quoted-string), or
    C{None} if it has no local part or has it quoted already.  Postfix's
    pipe gives C{${sender}} in its internal form, without the quotes a
    local part such as C{"john doe"} needs (unless its C{q} flag is set):
    refused as it came, such a sender's mail bounced.
    """
    local, at, domain = address.rpartition("@")
    if not local or not domain or (len(local) > 1 and local[0] == local[-1] == '"'):
        return None
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"@{domain}'


def _largerThanEveryQuota(store, addresses, size):
    """
    Whether a message of C{size} octets is larger than the whole storage
    quota of each of C{addresses}.
    """
    for address in addresses:
        status = _result(store.quotaOf(address))
        if status is None or status.quotaOctets is None or size <= status.quotaOctets:
            return False
    return True


class _BoundedInput:
    """
    Standard input read up to the server's C{max-message-size}: its octets
    counted as they are stored (a bare LF as CRLF, as SMTP's and LMTP's
    limit counts them), and no more read once they exceed it, so that a
    message however large is never held, in memory or in the spool, past
    the limit.

    @ivar exceeded: the message is larger than the limit (what was read
        past it was dropped).
    """

    def __init__(self, stream, limit):
        self._stream = stream
        self._limit = limit
        self._octets = 0
        self._afterCR = False
        self.exceeded = False

    def read(self, size):
        if self.exceeded:
            return b""
        block = self._stream.read(max(1, min(size, self._limit + 1 - self._octets)))
        if block:
            bare = block.count(b"\n") - block.count(b"\r\n") - (self._afterCR and block[:1] == b"\n")
            self._afterCR = block[-1:] == b"\r"
            self._octets += len(block) + bare
            if self._octets > self._limit:
                self.exceeded = True
                return b""
        return block


class _Directory:
    """
    The store as L{LocalDelivery} asks it who a recipient is (its users,
    their aliases and their domains), without the quotas it would check at RCPT: here
    the delivery below checks them, and says so in deliver's own exit
    statuses (a full mailbox among other recipients with room is 75,
    whatever C{quota-exceeded} says, as SMTP's end of DATA has it).
    """

    def __init__(self, store):
        self.findUser = store.findUser
        self.findAlias = store.findAlias
        self.findAliases = store.findAliases
        self.hasDomain = store.hasDomain


def _recipients(store, args):
    """
    The users C{args.addresses} are for, and those addresses as named for
    the C{Received:} field's C{for} clause: found as the server's SMTP and
    LMTP find them (L{LocalDelivery.checkRecipient}), given the server's
    configuration file (its C{domain}s, C{postmaster} and
    C{recipient-delimiter}): postmaster@ an accepted domain with no user
    of that name was no such user here (67, a bounce) and the configured
    user's mail over LMTP.

    @return: the users' addresses, the addresses as named, and each
        user's address to its names (joined by commas), for what a
        refusal says.
    @raise CommandError: one is no user's (67), or the store failed.
    """
    from mailgate.smtp.delivery import LocalDelivery
    from mailgate.smtp.envelope import SMTPReply, forwardPath

    delivery = LocalDelivery(
        _Directory(store), getattr(args, "domains", None) or None, postmaster=getattr(args, "postmaster", None),
        recipientDelimiter=getattr(args, "recipientDelimiter", None),
    )
    addresses, named, names = [], [], {}
    for text in args.addresses:
        try:
            address = _result(delivery.checkRecipient(text))
        except SMTPReply as e:
            # 550 5.1.1 (no such user, no postmaster) or 5.7.1 (a domain
            # not accepted): LMTP's refusal, an unknown addressee here.
            reason = e.text.partition(": ")[2]
            why = "" if reason == "no such user here" else f" ({reason})"
            raise CommandError(f"no such user: {text}{why}", EX_NOUSER) from None
        addresses.append(address)
        named.append(forwardPath(text, address))
        names.setdefault(address, {})[named[-1]] = None
    # All or nothing: an unknown recipient fails the delivery before any copy
    # is stored, so the MTA's bounce tells the whole truth.
    return list(dict.fromkeys(addresses)), list(dict.fromkeys(named)), {a: ", ".join(n) for a, n in names.items()}


def _deliver(store, args, out, stdin):
    sender = None if args.sender is None else _sender(args.sender)
    addresses, named, names = _recipients(store, args)
    trace = ()
    prefixes = None
    if sender is not None:
        # Like the final delivery of SMTP and LMTP: where the message came
        # from, and that mailgate stored it.
        from mailgate.hostname import machineName
        from mailgate.smtp.envelope import Envelope, copyPrefixes, traceHeaders

        envelope = Envelope(
            helo=None, peer=None, protocol="local", sender=sender, recipients=addresses, forwardPaths=named
        )
        # And, as Postfix's pipe flag D and the server's LMTP (the config
        # file's delivered-to), each recipient's own Delivered-To:.
        perCopy = (getattr(args, "deliveredTo", None) or "final") == "final"
        trace = traceHeaders(envelope, getattr(args, "hostname", None) or machineName(), returnPath=not perCopy)
        if perCopy:
            prefixes = copyPrefixes(envelope)
    if stdin is None:
        # Started with standard input closed (<&-; Python gives it as
        # None): said as such, not as an internal error.  75 as deliver's
        # other failures that are not the message's: an MTA keeps it.
        raise CommandError("standard input is closed: no message to read; nothing was delivered", EX_TEMPFAIL)
    # Keyed by what the MTA handed over: its retry of a delivery whose
    # outcome it did not learn (this command killed after the commit, say)
    # is recognised and not stored twice.
    limit = getattr(args, "maxMessageSize", None)
    stream = getattr(stdin, "buffer", stdin)
    if limit is not None:
        stream = _BoundedInput(stream, limit)
    source = spoolFile(
        stream, headerLines=trace,
        sender=None if getattr(args, "again", False) else sender or "",
        directory=getattr(args, "spoolDirectory", None),
    )
    if prefixes is not None:
        source.copyPrefixes = prefixes
    # The content as stored, without the trace fields (SMTP and LMTP count
    # it so); a last line without its end has been given one.
    if limit is not None and (stream.exceeded or source.size - sum(len(line) + 2 for line in trace) > limit):
        source.close()
        # As LMTP's 552 5.3.4: refused for good, the MTA bounces it (65, the
        # data refused, as a sender SMTP refuses; a mailbox is not to blame).
        raise CommandError(
            f"message size exceeds the limit of {limit} octets (max-message-size); nothing was delivered", EX_DATAERR
        )
    try:
        # All or nothing, here too: a recipient vanished or over quota
        # since the check above stores nothing for anyone.
        results = _result(store.deliver(addresses, source, partial=False))
    except NoSuchUser as e:
        raise CommandError(f"no such user: {e}", EX_NOUSER)
    except QuotaExceeded as e:
        # Named as given (an alias, a detail), as SMTP's and LMTP's
        # refusals name them: the MTA's bounce reaches the sender, who is
        # not told whose mailbox an alias is.
        refusal = "mailbox full: " + ", ".join(names.get(a, a) for a in e.addresses)
        if set(e.addresses) >= set(addresses) and _largerThanEveryQuota(store, e.addresses, source.size):
            # No room the users make will ever fit it (SMTP and LMTP answer
            # 552 5.2.3 at RCPT): a bounce now, not days of retries.
            raise CommandError(f"{refusal} (the message is larger than the mailbox's whole quota)", EX_NOPERM)
        if getattr(args, "quotaExceeded", None) == "permanent" and set(e.addresses) >= set(addresses):
            # The server's file refuses a full mailbox for good, as its
            # SMTP and LMTP do (552 5.2.2): the MTA bounces the message
            # rather than keep it for days.  Not when other recipients had
            # room (SMTP's rule too): they would lose it as well.
            raise CommandError(f"{refusal} (refused for good: quota-exceeded is permanent)", EX_NOPERM)
        # Temporary: the MTA keeps the message and retries once the user
        # has made room (Dovecot's default for a full mailbox).
        raise CommandError(f"{refusal}; try again later", EX_TEMPFAIL)
    finally:
        source.close()
    for address, uniqueId in results.items():
        if isinstance(uniqueId, AlreadyDelivered):
            out.write(f"already delivered to {address} as {uniqueId} (the same message again: not stored twice)\n")
        else:
            out.write(f"delivered to {address} as {uniqueId}\n")
    audit.outcome(args, "; ".join(f"delivered to {address} as {uniqueId}" for address, uniqueId in results.items()))


def _addDeliverCommand(commands):
    """
    C{mailgate deliver}: local delivery, for an MTA's pipe transport.
    """
    deliver = commands.add_parser(
        "deliver",
        help="deliver a message from standard input to local users",
        description="Deliver a message from standard input to local users, all or none of "
        "them, for an MTA's pipe transport (give it one recipient at a time, so that an "
        "unknown one bounces alone).  Exit status (sysexits): 0 delivered, 67 no such user (nothing "
        "delivered), 75 a temporary failure (a full mailbox, the database unavailable: the "
        "MTA tries again), 77 a full mailbox the server's --config file refuses for good "
        "(quota-exceeded = \"permanent\") or a message larger than the recipients' whole "
        "quota (no room made will fit it), 65 a sender SMTP would refuse or a message larger than the "
        "--config file's max-message-size (LMTP's 552 5.3.4).",
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
    # An MTA's deliveries, one run a message, are in its own log
    # (Postfix's pipe: to=<...>, relay=mailgate, status=sent): only an
    # administrator's --again, giving a user back mail, is audited.
    deliver.set_defaults(
        run=_deliver, migrate=True, audit=audit.Audited("deliver --again", "addresses", when=lambda args: args.again)
    )
