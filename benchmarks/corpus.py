"""
A deterministic mail corpus for the benchmarks.

Every message comes from a C{random.Random} seeded with the corpus seed, the
user and the message number, so the same corpus is produced on every run and
on every machine, and any one message can be rebuilt on its own.

Sizes follow a typical maildrop: most messages are 2-10 KB of text, about
12% are 50-200 KB with a base64 attachment and about 1% are 1-5 MB.  The
text exercises what a POP3 server must get right: lines starting with '.',
lone '.' and '..' lines (dot-stuffing), lines of about 990 octets (just
under RFC 5322's 998) and 8-bit UTF-8 bodies.  Each user's first message is
a small text message with all of these, so even a tiny corpus has them.

Every message is CRLF-terminated with proper headers; L{Corpus.message}
returns the exact octets a POP3 server must hand back for it.

The standard corpus (L{standard}) is 20 users (C{user01@bench.test} ...
C{user20@bench.test}, all with the password L{PASSWORD}) with 50 messages
each.

Used as a script it writes the corpus out:

    python benchmarks/corpus.py files DIR      # one .eml file per message
    python benchmarks/corpus.py maildir DIR    # DIR/<address>/Maildir/cur/...
    python benchmarks/corpus.py summary
"""

import argparse
import base64
import hashlib
import os
import random
import sys
import time

DOMAIN = "bench.test"
PASSWORD = "bench-Passw0rd"
STANDARD_USERS = 20
STANDARD_MESSAGES = 50
SEED = 1939

SMALL = "small"
MEDIUM = "medium"
LARGE = "large"

MEDIUM_FRACTION = 0.12
LARGE_FRACTION = 0.01

# The longest line we write: 990 octets before the CRLF.
LONG_LINE = 990

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or "
    "his from at which but have an they you were her she there been one all "
    "would their we him has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well "
    "down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old "
    "year off come since against go came right used take three mailbox server "
    "message delivery queue postmaster relay gateway quarterly report invoice "
    "meeting schedule attachment budget review"
).split()

_WORDS_8BIT = (
    "Grüße naïve café façade Ærø smörgåsbord Zürich Bjørn señor coöperate "
    "jalapeño déjà über Straße crème brûlée résumé Ελληνικά русский 日本語 "
    "中文 한국어 עברית العربية ✓ € £ ¥ °C ½ ¼ — …"
).split()

_NAMES = (
    "Alice Archer", "Bob Baker", "Carol Chen", "Dan Duarte", "Erin Evans",
    "Frank Fischer", "Grace Gomez", "Heidi Hansen", "Ivan Ivanov", "Judy Jones",
    "Mallory Moore", "Niaj Nakamura", "Olivia Olsen", "Peggy Park", "Rupert Ross",
    "Sybil Singh", "Trent Tanaka", "Victor Varga", "Walter White", "Zoe Zimmer",
)

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def address(number):
    """
    The address of user C{number} (1-based): C{user01@bench.test}.
    """
    return f"user{number:02d}@{DOMAIN}"


def _date(rng):
    stamp = 1_600_000_000 + rng.randrange(0, 100_000_000)
    t = time.gmtime(stamp)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def _sentence(rng, eightBit=False):
    count = rng.randint(6, 18)
    words = [rng.choice(_WORDS) for _ in range(count)]
    if eightBit:
        for _ in range(rng.randint(1, 4)):
            words[rng.randrange(count)] = rng.choice(_WORDS_8BIT)
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(".!?.")


def _wrap(text, width=72):
    """
    Wrap words into lines of at most about C{width} characters.
    """
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


def _longLine(rng):
    """
    One line of exactly L{LONG_LINE} octets of ASCII words.
    """
    words = []
    length = 0
    while length < LONG_LINE:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:LONG_LINE].encode("ascii")


_DOT_LINES = (
    b".",  # a lone dot: must be stuffed, or it would end the response
    b"..",
    b"...",
    b".hidden-file and more text",
    b". a line that starts with a dot and a space",
    b"..double dotted line",
    b".\t tab after the dot",
)


def _textBody(rng, target, eightBit, dots, lone, long):
    """
    Body lines (bytes, no line ends) of about C{target} octets.
    """
    lines = []
    size = 0
    special = []
    if dots:
        special.extend(rng.sample(_DOT_LINES[1:], 3))
    if lone:
        special.append(b".")
    if long:
        special.append(_longLine(rng))
    paragraphs = 0
    while size < target or special:
        paragraph = " ".join(_sentence(rng, eightBit) for _ in range(rng.randint(2, 6)))
        for line in _wrap(paragraph):
            encoded = line.encode("utf-8")
            lines.append(encoded)
            size += len(encoded) + 2
        paragraphs += 1
        if special and (size >= target or rng.random() < 0.4):
            line = special.pop(0)
            lines.append(line)
            size += len(line) + 2
        lines.append(b"")
        size += 2
    lines.append(b"-- ")
    lines.append(b"Sent by the mailgate benchmark corpus")
    return lines


def _headers(rng, rcpt, subject, contentType, encoding, messageId, extra=()):
    sender = rng.choice(_NAMES)
    local = sender.split()[0].lower()
    host = f"mx{rng.randint(1, 9)}.example.net"
    date = _date(rng)
    headers = [
        f"Return-Path: <{local}@example.net>",
        f"Received: from {host} ({host} [192.0.2.{rng.randint(1, 254)}])",
        f"\tby mail.{DOMAIN} with ESMTPS id {rng.getrandbits(48):012x}",
        f"\tfor <{rcpt}>; {date}",
        f"Message-ID: <{messageId}@example.net>",
        f"Date: {date}",
        f"From: {sender} <{local}@example.net>",
        f"To: <{rcpt}>",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        f"Content-Type: {contentType}",
    ]
    if encoding:
        headers.append(f"Content-Transfer-Encoding: {encoding}")
    headers.extend(extra)
    return [h.encode("utf-8") for h in headers]


def _attachmentLines(rng, size):
    """
    Base64 lines (76 characters) of C{size} random octets.
    """
    data = base64.b64encode(rng.randbytes(size))
    return [data[i : i + 76] for i in range(0, len(data), 76)]


def _join(lines):
    return b"\r\n".join(lines) + b"\r\n"


def textMessage(rng, rcpt, subject, target, eightBit=False, dots=False, lone=False, long=False, messageId=None):
    """
    A text/plain message of about C{target} octets for C{rcpt}.
    """
    messageId = messageId or f"{rng.getrandbits(64):016x}.bench"
    charset = "utf-8" if eightBit else "us-ascii"
    headers = _headers(
        rng, rcpt, subject, f"text/plain; charset={charset}; format=flowed",
        "8bit" if eightBit else "7bit", messageId,
    )
    headerSize = sum(len(h) + 2 for h in headers) + 2
    body = _textBody(rng, max(0, target - headerSize), eightBit, dots, lone, long)
    return _join(headers + [b""] + body)


def attachmentMessage(rng, rcpt, subject, target, messageId=None):
    """
    A multipart/mixed message: a short text part and a base64 attachment,
    about C{target} octets in all.
    """
    messageId = messageId or f"{rng.getrandbits(64):016x}.bench"
    boundary = f"=_bench_{rng.getrandbits(64):016x}"
    headers = _headers(rng, rcpt, subject, f'multipart/mixed; boundary="{boundary}"', None, messageId)
    text = _textBody(rng, rng.randint(500, 3000), rng.random() < 0.3, rng.random() < 0.5, False, False)
    name = rng.choice(("report.pdf", "photo.jpg", "archive.zip", "slides.pptx", "data.xlsx"))
    payload = max(1, int((target - 1500) * 57 / 78))
    lines = headers + [
        b"",
        b"This is a multi-part message in MIME format.",
        b"",
        f"--{boundary}".encode(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"",
        *text,
        b"",
        f"--{boundary}".encode(),
        f'Content-Type: application/octet-stream; name="{name}"'.encode(),
        b"Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"'.encode(),
        b"",
        *_attachmentLines(rng, payload),
        b"",
        f"--{boundary}--".encode(),
    ]
    return _join(lines)


def intakeMessage(size, token, rcpt, seed=SEED):
    """
    A text message of about C{size} octets for the SMTP/LMTP intake
    benchmark, with C{token} in its Subject (C{Subject: bench intake
    TOKEN}) so that each delivery can be found again exactly once.
    """
    rng = random.Random(f"{seed}:intake:{token}")
    return textMessage(
        rng, rcpt, f"bench intake {token}", size, eightBit=rng.random() < 0.2,
        dots=rng.random() < 0.3, lone=rng.random() < 0.1,
        long=rng.random() < 0.1, messageId=f"{token}.intake",
    )


class Corpus:
    """
    C{users} users with C{messages} messages each.

    @ivar users: the addresses, in order.
    @ivar password: every user's password.
    """

    def __init__(self, users=STANDARD_USERS, messages=STANDARD_MESSAGES, seed=SEED, password=PASSWORD):
        self.userCount = users
        self.messageCount = messages
        self.seed = seed
        self.password = password
        self.users = [address(i) for i in range(1, users + 1)]
        self._kinds = self._assignKinds()
        self._cache = {}

    def _assignKinds(self):
        """
        The kind of every message, exact in number: each user's first
        message is small (with every special line), the others are
        shuffled with the corpus seed.
        """
        total = self.userCount * self.messageCount
        slots = [(u, m) for u in range(self.userCount) for m in range(1, self.messageCount)]
        large = round(total * LARGE_FRACTION)
        medium = round(total * MEDIUM_FRACTION)
        if medium == 0 and len(slots) >= 2:
            medium = 1
        large = min(large, len(slots))
        medium = min(medium, len(slots) - large)
        kinds = [LARGE] * large + [MEDIUM] * medium + [SMALL] * (len(slots) - large - medium)
        rng = random.Random(f"{self.seed}:kinds:{self.userCount}:{self.messageCount}")
        rng.shuffle(kinds)
        result = {(u, 0): SMALL for u in range(self.userCount)}
        result.update(zip(slots, kinds))
        return result

    def kind(self, user, number):
        """
        C{"small"}, C{"medium"} or C{"large"}: the kind of message
        C{number} (1-based) of user index C{user} (0-based).
        """
        return self._kinds[(user, number - 1)]

    def message(self, user, number):
        """
        The exact CRLF octets of message C{number} (1-based) of the user
        with index C{user} (0-based, or an address).
        """
        if isinstance(user, str):
            user = self.users.index(user)
        key = (user, number)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rng = random.Random(f"{self.seed}:{user}:{number}")
        rcpt = self.users[user]
        kind = self.kind(user, number)
        subject = f"[bench] {kind} message {number} for user {user + 1}: " + " ".join(
            rng.choice(_WORDS) for _ in range(rng.randint(2, 6))
        )
        if kind == SMALL:
            first = number == 1
            data = textMessage(
                rng, rcpt, subject, rng.randint(2000, 10000),
                eightBit=first or rng.random() < 0.2,
                dots=first or rng.random() < 0.3,
                lone=first or rng.random() < 0.1,
                long=first or rng.random() < 0.15,
            )
        elif kind == MEDIUM:
            data = attachmentMessage(rng, rcpt, subject, rng.randint(50_000, 200_000))
        else:
            data = attachmentMessage(rng, rcpt, subject, rng.randint(1_000_000, 5_000_000))
        # As a copy delivered by LMTP is, by Dovecot (its LMTP's
        # lmtp_hdr_delivery_address) and mailgate (--delivered-to final)
        # alike: its own Return-Path: and Delivered-To: first (a copy's
        # fields: see copyFields).
        returnPath, rest = data.split(b"\r\n", 1)
        data = returnPath + b"\r\nDelivered-To: " + rcpt.encode("ascii") + b"\r\n" + rest
        if kind != LARGE:
            self._cache[key] = data
        return data

    @staticmethod
    def copyFields(data):
        """
        A corpus message as mailgate stores an LMTP-delivered copy of it:
        C{(fields, body)}, the copy's own C{Return-Path:} and
        C{Delivered-To:} lines (a row of its own beside the maildrop, as
        C{--delivered-to final} keeps them) and the body stored once.
        """
        end = data.index(b"\r\n", data.index(b"\r\n") + 2) + 2
        return data[:end], data[end:]

    def messages(self, user):
        """
        All messages of a user (index or address), in order.
        """
        return [self.message(user, n) for n in range(1, self.messageCount + 1)]

    def expected(self):
        """
        C{{address: [message octets, ...]}}: what each maildrop must hold.
        """
        return {addr: self.messages(i) for i, addr in enumerate(self.users)}

    def digests(self):
        """
        C{{address: [(size, sha1 hex, header size), ...]}}: a compact form
        of L{expected} for verifying retrieved messages (the header size
        includes the empty line that ends the header).
        """
        return {
            addr: [
                (len(m), hashlib.sha1(m).hexdigest(), m.index(b"\r\n\r\n") + 4)
                for m in self.messages(i)
            ]
            for i, addr in enumerate(self.users)
        }

    def iterMessages(self):
        """
        Yield C{(user index, address, number, octets)} for every message.
        """
        for u, addr in enumerate(self.users):
            for n in range(1, self.messageCount + 1):
                yield u, addr, n, self.message(u, n)

    def summary(self):
        counts = {SMALL: 0, MEDIUM: 0, LARGE: 0}
        octets = 0
        for u, _, n, data in self.iterMessages():
            counts[self.kind(u, n)] += 1
            octets += len(data)
        return {"users": self.userCount, "messages": self.userCount * self.messageCount, "octets": octets, **counts}

    def writeFiles(self, directory):
        """
        Write every message as a file (exact CRLF octets), for
        C{mailgate deliver}: C{DIRECTORY/<address>/0001.eml}.

        @return: C{{address: [path, ...]}} in delivery order.
        """
        paths = {}
        for u, addr, n, data in self.iterMessages():
            folder = os.path.join(directory, addr)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{n:04d}.eml")
            with open(path, "wb") as f:
                f.write(data)
            paths.setdefault(addr, []).append(path)
        return paths

    def writeMaildirs(self, root, uid=None, gid=None):
        """
        Write every user's messages as a Maildir, the way Dovecot stores
        them: C{ROOT/<address>/Maildir/cur/<name>,S=<size>,W=<vsize>:2,S},
        LF line ends on disk (Dovecot adds the CRs back), the physical and
        the CRLF ("virtual") size in the name so Dovecot need not read a
        file to learn its size, already seen (no renames during the runs),
        named so that Dovecot numbers them in corpus order.

        @return: C{{address: home directory}}.
        """
        homes = {}
        for u, addr in enumerate(self.users):
            home = os.path.join(root, addr)
            homes[addr] = home
            maildir = os.path.join(home, "Maildir")
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(maildir, sub), exist_ok=True)
            for n in range(1, self.messageCount + 1):
                data = self.message(u, n)
                onDisk = data.replace(b"\r\n", b"\n")
                name = (
                    f"{1_500_000_000 + n}.M{n:06d}P{u + 1}.bench,"
                    f"S={len(onDisk)},W={len(data)}:2,S"
                )
                with open(os.path.join(maildir, "cur", name), "wb") as f:
                    f.write(onDisk)
        if uid is not None:
            chownTree(root, uid, gid)
        return homes


def chownTree(root, uid, gid):
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


def standard():
    """
    The standard corpus: 20 users x 50 messages.
    """
    return Corpus(STANDARD_USERS, STANDARD_MESSAGES, SEED, PASSWORD)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["files", "maildir", "summary"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--users", type=int, default=STANDARD_USERS)
    parser.add_argument("--messages", type=int, default=STANDARD_MESSAGES)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    corpus = Corpus(args.users, args.messages, args.seed)
    if args.action == "summary":
        print(corpus.summary())
        return 0
    if not args.directory:
        parser.error("a directory is needed")
    if args.action == "files":
        corpus.writeFiles(args.directory)
    else:
        corpus.writeMaildirs(args.directory)
    print(corpus.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
