"""
A database's -wal and -shm files come and go as other processes open and
close it: SQLite removes them when the last connection closes and makes
them again at the next opening.  The check that refuses a database its
user may not write (L{mailgate.store.sqlite.SQLiteEngine.refuseReadOnly},
run by every command and the server before they open it) took a side file
seen there and gone a moment later for one it may not write, and
C{mailgate deliver} refused the message ("cannot open SQLite database ...
to write to it (...-shm)", exit 75): once in the 1,000 deliveries of the
benchmark's load, two at a time.

Here another process makes and removes the -shm file again and again
while this one checks, a bounded number of times.
"""

import subprocess
import sys

from mailgate.errors import ConfigurationError
from mailgate.store import engineFromURL

CHECKS = 20000

#: Makes the file given and removes it again, each for half a millisecond
#: (SQLite's side files last as long as a connection, a delivery's at
#: least), until its standard input closes.
TOGGLE = """
import os, sys, threading, time
path = sys.argv[1]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
while not stop.is_set():
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    time.sleep(0.0005)
    os.unlink(path)
    time.sleep(0.0005)
"""


def test_aSideFileComingAndGoingIsNoRefusal(tmp_path):
    path = tmp_path / "mail.sqlite3"
    engine = engineFromURL(f"sqlite:///{path}")
    path.write_bytes(b"")
    toggler = subprocess.Popen(
        [sys.executable, "-c", TOGGLE, f"{path}-shm"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    refused = []
    try:
        assert toggler.stdout.readline() == "ready\n"
        for _ in range(CHECKS):
            try:
                engine.refuseReadOnly()
            except ConfigurationError as e:
                refused.append(str(e))
    finally:
        toggler.stdin.close()
        toggler.wait(timeout=30)
    assert refused == []
