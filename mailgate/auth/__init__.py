"""
Authentication: password hashing, credential checkers and the realm that
turns an authenticated user into a maildrop avatar.
"""
