"""
Reading Dovecot's passwd-file (mailgate.importers.passwdfile), without a
store: what each line becomes, and why a line is refused.
"""

from mailgate.importers.passwdfile import PasswdAccount, RefusedLine, dovecotQuota, readPasswdFile


def test_eachLineBecomesAnAccountOrARefusalWithItsNumber():
    lines = [
        "# moved from mail1",
        "",
        "alice:{SHA512-CRYPT}$6$x$y:1000:1000:Alice \udce9:/home/alice::userdb_quota_rule=*:storage=1024",
        "Bob@Example.NET:secret:1000:1000::/home/bob::",
        "alice:{PLAIN}again:::::",
        "carol::::::",
        "dave:{PLAIN}d::::::nologin",
        "erin:{PLAIN}e::::::userdb_quota_rule=*:storage=10%",
        "fr\udcffank:{PLAIN}f:::::",
    ]
    read = list(readPasswdFile(lines, domain="example.org", scheme="PLAIN"))
    assert read[:2] == [
        PasswdAccount(3, "alice@example.org", "{SHA512-CRYPT}$6$x$y", {"octets": 1 << 20}),
        PasswdAccount(4, "bob@example.net", "{PLAIN}secret", {}),
    ]
    assert read[2:] == [
        RefusedLine(5, "alice@example.org is on line 3 already (that line is the one kept)"),
        RefusedLine(6, "carol@example.org has no password"),
        # Imported disabled (mailgate user disable), without a reason.
        PasswdAccount(7, "dave@example.org", "{PLAIN}d", {}, disabled="", refusedBy="nologin"),
        RefusedLine(8, "erin@example.org: quota rule '*:storage=10%' is not one mailgate can keep"),
        RefusedLine(9, "the user name or password hash is not UTF-8 text"),
    ]


def test_aBareNameNeedsADomain():
    assert list(readPasswdFile(["alice:{PLAIN}a"])) == [RefusedLine(1, "'alice' has no domain: give --domain")]


def test_quotaRulesInDovecotsUnits():
    assert dovecotQuota("userdb_quota_rule=*:storage=2G:messages=10k") == {"octets": 2 << 30, "messages": 10240}
    assert dovecotQuota("quota_rule=?:bytes=5000") == {"octets": 5000}
    assert dovecotQuota("userdb_quota_rule=*:ignore") == {"octets": 0, "messages": 0}
    assert dovecotQuota("userdb_quota_rule=Trash:storage=+100M userdb_mail=maildir:~/Maildir") == {}


def test_aLineWhoseNameMayHoldThePasswordIsRefusedWithoutShowingIt():
    """
    A line without a C{:} after the name (fields separated by a space or
    a tab, or a password alone) has its password in the name field: it is
    refused without the name being shown, on the terminal of whoever runs
    the import.
    """
    lines = ["bob@example.org {PLAIN}s3cret-a", "bob2@example.org\t{PLAIN}s3cret-b", "{PLAIN}s3cret-c",
             "carol@example.org {PLAIN}s3cret-d:1000:1000::/home/carol::"]
    for domain in (None, "example.org"):
        read = list(readPasswdFile(lines, domain=domain))
        assert [r.number for r in read] == [1, 2, 3, 4] and all(isinstance(r, RefusedLine) for r in read), read
        assert not any("s3cret" in r.reason.lower() for r in read), read


def test_aDomainInUnicodeIsItsASCIIForm():
    """
    A passwd-file's user (or --domain) in a domain written in Unicode is
    the user of its ASCII form, the one mail to that address reaches and
    logins with it log in as (the line was refused as an invalid domain).
    """
    lines = ["alice@Bücher.example:{PLAIN}a", "bob:{PLAIN}b"]
    assert list(readPasswdFile(lines, domain="xn--bcher-kva.example")) == [
        PasswdAccount(1, "alice@xn--bcher-kva.example", "{PLAIN}a", {}),
        PasswdAccount(2, "bob@xn--bcher-kva.example", "{PLAIN}b", {}),
    ]


def test_ofANameOnTwoLinesInEitherCaseTheLowerCaseOneIsKept():
    """
    Dovecot's passwd-file finds the name logged in with lower-cased
    (auth_username_format = %Lu, its default) as the file writes it: of
    Alice@Example.org and alice@example.org, the user logs in with the
    second line's password, whichever comes first; the first line is kept
    where none or both are in lower case.  (Before, the first line was
    kept, and the user's password was refused after the move.)
    """
    lines = [
        "Alice@Example.org:{PLAIN}never:::::",
        "bob:{PLAIN}bobs:::::",
        "alice@example.org:{PLAIN}hers:::::",
        "BOB:{PLAIN}unreached:::::",
        "Carol@example.org:{PLAIN}first:::::",
        "CAROL@example.org:{PLAIN}second:::::",
        "alice@example.org:{PLAIN}third:::::",
    ]
    assert list(readPasswdFile(lines, domain="example.org")) == [
        RefusedLine(1, "alice@example.org is on line 3 too, in lower case, the line Dovecot logs them in with "
                       "(it looks up the name logged in with lower-cased): that line is the one kept"),
        PasswdAccount(2, "bob@example.org", "{PLAIN}bobs", {}),
        PasswdAccount(3, "alice@example.org", "{PLAIN}hers", {}),
        RefusedLine(4, "bob@example.org is on line 2 already (that line is the one kept)"),
        PasswdAccount(5, "carol@example.org", "{PLAIN}first", {}),
        RefusedLine(6, "carol@example.org is on line 5 already (that line is the one kept)"),
        RefusedLine(7, "alice@example.org is on line 3 already (that line is the one kept)"),
    ]


def test_nologinAndFailAccountsAreReadDisabledWithTheirReason():
    """
    Dovecot refuses the logins of an account with nologin (its reason=
    the client's -ERR) or fail: read as accounts to import disabled.
    The extra fields are split at spaces, as Dovecot splits them.
    """
    read = list(readPasswdFile([
        "a:{PLAIN}a::::::nologin=y reason=Moved",
        "b:{PLAIN}b::::::fail=y",
        "c:{PLAIN}c::::::userdb_quota_rule=*:storage=1M nologin",
        "d:{PLAIN}d::::::reason=unused",
    ], domain="example.org"))
    assert [(a.address, a.disabled, a.refusedBy) for a in read] == [
        ("a@example.org", "Moved", "nologin"),
        ("b@example.org", "", "fail"),
        ("c@example.org", "", "nologin"),
        ("d@example.org", None, None),
    ]
    assert read[2].quota == {"octets": 1 << 20}
