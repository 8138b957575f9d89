"""
URLs that may hold a password (a database's, a POP3 server's to import
from), as errors and log lines may show them: without it.  Apart from
the store and the importers, which both show such URLs and know nothing
of each other.
"""

import re
from urllib.parse import unquote


#: a URL's parameter that holds a password (libpq's password and sslpassword)
_PASSWORD_PARAMETER = r"([?&](?:ssl)?password=)"
#: the same in libpq's other form, C{host=... password=...}: a value to the
#: next space, or quoted (C{password='two words'})
_PASSWORD_KEYWORD = r"((?:^|\s)(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)"


def shownURL(url):
    """
    C{url} as an error or a log line may show it: the password of its
    user, if any, replaced by C{***}.  Read without L{urlsplit}, which
    refuses some of the URLs there are errors to report about.
    """
    # libpq also takes it as a parameter: ?password=..., and the password
    # of the client's TLS key as ?sslpassword=...
    url = re.sub(_PASSWORD_PARAMETER + r"[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, separator, rest = url.partition("://")
    if not separator:
        # Not a URL: perhaps libpq's keyword/value string, which psql takes
        # and mailgate refuses, quoting it ("host=db password=...").
        return re.sub(_PASSWORD_KEYWORD, r"\1***", url, flags=re.IGNORECASE)
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userInfo, at, host = rest[:end].rpartition("@")
    if not at or ":" not in userInfo:
        return url
    user = userInfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{rest[end:]}"


def withoutPassword(text, url):
    """
    C{text}, an error about connecting to C{url}, with the URL's password
    taken out wherever it shows.  libpq quotes what it cannot read of a
    URL: the password itself when it holds a bare C{%} or a space
    (C{invalid percent-encoded token: "50%off"}), or the whole URL; that
    text goes to standard error and, at the server's start, into its log.
    """
    text = text.replace(url, shownURL(url))
    for password in sorted(_passwordsIn(url), key=len, reverse=True):
        # Only where it stands as a token of its own: a short password
        # (say "p") taken out of the words around it too ("***ort 5432")
        # mangled the reason and showed, by what it blanked, what the
        # password is.
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", "***", text)
    return text


def hasPassword(url):
    """
    Whether C{url} gives a password (C{user:PASSWORD@}, or C{?password=}).
    """
    return bool(_passwordsIn(url))


def _passwordsIn(url):
    """
    The password C{url} gives, as written and percent-decoded, in its user
    part and in a C{password=} parameter.
    """
    found = {value for _, value in re.findall(_PASSWORD_PARAMETER + r"([^&#]*)", url, flags=re.IGNORECASE)}
    scheme, separator, rest = url.partition("://")
    if separator:
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        userInfo, at, _ = rest[:end].rpartition("@")
        if at and ":" in userInfo:
            found.add(userInfo.partition(":")[2])
    found |= {unquote(password) for password in found}
    return {password for password in found if password}
