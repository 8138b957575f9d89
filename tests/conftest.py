"""
Shared fixtures: real SQLite stores in a temporary directory.
"""

import pytest

from mailgate.testing import memoryStore


@pytest.fixture
def dbpath(tmp_path):
    return tmp_path / "mail.sqlite3"


@pytest.fixture
def store(dbpath):
    """
    A synchronous store on a real SQLite file (WAL, synchronous=FULL).
    """
    s = memoryStore(f"sqlite:///{dbpath}")
    yield s
    s.close()
