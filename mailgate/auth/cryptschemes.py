"""
passlib's checkers of the crypt(3) strings it computes (MD5-, SHA256-,
SHA512- and DES-CRYPT), for L{mailgate.auth.foreign}.

A module of their own so that they are imported, once, at the first
crypt(3) string checked: passlib (and Python's C{crypt} module under it)
costs every start that imports L{mailgate.auth.foreign} (the server, each
run of the admin command) some 15 ms, and only users imported with such a
hash need it.  An import runs its module once, under the import system's
lock, so the warning filter below is set and restored once even when two
threads check a hash at the same time.
"""

import warnings

with warnings.catch_warnings():
    # passlib uses Python's crypt module where there is one (deprecated in
    # 3.11, gone in 3.13, where passlib computes the same hashes itself).
    warnings.simplefilter("ignore", DeprecationWarning)
    from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

#: the checkers, in the order a string is offered to them
HANDLERS = (md5_crypt, sha256_crypt, sha512_crypt, des_crypt)
