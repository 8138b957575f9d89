# -*- test-case-name: tests.test_foreign_hashes -*-
"""
The system's crypt(3), for the crypt strings only it computes: yescrypt
(C{$y$}), the default of C{mkpasswd} and of C{/etc/shadow} on Debian 11
and later, Ubuntu 22.04 and Fedora 35, and libxcrypt's other modern
methods (C{$gy$}, C{$7$}).  Dovecot's C{CRYPT} scheme hands a hash to
the same crypt(3), so a passwd-file written with such hashes works there;
here it is libxcrypt's reentrant C{crypt_r}, through C{ctypes} (Python's
own C{crypt} module is gone in 3.13).  C{ctypes} lets go of the GIL
while it runs, and each call has its own work area.
"""

import ctypes
import ctypes.util
import hmac

#: room for a struct crypt_data, zeroed as crypt_r wants it: libxcrypt's
#: is 32 KiB, the older glibc libcrypt's about 128 KiB
_CRYPT_DATA_SIZE = 256 * 1024

#: crypt(3) methods handed to the system's crypt
PREFIXES = ("$y$", "$gy$", "$7$")


def _load():
    for name in ("libcrypt.so.1", ctypes.util.find_library("crypt")):
        if not name:
            continue
        try:
            function = ctypes.CDLL(name).crypt_r
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_char_p
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        return function
    return None


_crypt_r = _load()


def _crypt(password, setting):
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    result = _crypt_r(password, setting, data)
    # libxcrypt answers an unknown method or a malformed setting with a
    # string starting with '*' (or NULL on other systems).
    return None if result is None or result.startswith(b"*") else result


def usable(value):
    """
    Whether the system's crypt(3) computes C{value}'s method, and C{value}
    is a whole hash of it (not one cut off when copied).
    """
    if _crypt_r is None:
        return False
    try:
        encoded = value.encode("ascii")
    except UnicodeEncodeError:
        return False
    made = _crypt(b"", encoded)
    return made is not None and len(made) == len(encoded)


def verify(password, value):
    """
    Whether C{password} (octets) is the one hashed in the crypt string
    C{value}.  Slow by design: call it off the reactor thread.
    """
    if _crypt_r is None or b"\0" in password:
        return False
    encoded = value.encode("ascii")
    made = _crypt(password, encoded)
    return made is not None and hmac.compare_digest(made, encoded)
