# -*- test-case-name: tests.test_import_unusual_maildirs -*-
"""
Message files that Dovecot's zlib plugin stored compressed.

A Dovecot with C{mail_plugins = zlib} and C{plugin { zlib_save = gz }}
(or C{bz2}, C{lz4}, C{zstd}; C{xz} in versions before 2.3.14) writes each
new message file compressed, under the same kind of name as any other
(C{...,S=283,W=293}, both sizes the message's own), and serves it over
POP3 decompressed.  It tells such a file by its first octets, never by
its name (L{detect}, Dovecot's C{compression_detect_handler}), and so
does an import: the gzip octets imported as a message would be served
to every client as garbage, under a LIST size that is not Dovecot's.

Decompression is streamed, a block at a time (L{decompressedBlocks}):
a small file may decompress to gigabytes, and the caller stops reading
at its size limit.  Formats Python's standard library cannot read
(Dovecot's own LZ4 framing, Zstandard) are recognised and named, so that
the file is refused rather than imported as it is.

For a maildir a Dovecot without the zlib plugin served, which served
every file as it is stored, the import's C{--decompress=never} reads
none of them decompressed (L{mailgate.importers.FileSource}).

This module holds no mailgate types, so that the importers' package can
use it without an import cycle.
"""

import bz2
import lzma
import os
import re
import zlib

import attr


@attr.s(frozen=True)
class Compression:
    """
    A compression Dovecot recognises.

    @ivar name: its name in Dovecot's C{zlib_save}.
    @ivar decompressor: a function making a new decompressor object
        (C{decompress(data, max_length)}, C{eof}, C{unused_data},
        C{needs_input}), or C{None} where Python has none.
    """

    name = attr.ib()
    decompressor = attr.ib()


class _Gzip:
    """
    zlib's decompressor for gzip data, with the interface of bz2's and
    lzma's: it keeps the input it has not used yet itself (zlib's leaves
    it in C{unconsumed_tail} to be given back) and says when it
    C{needs_input}.
    """

    def __init__(self):
        # 16 + MAX_WBITS: a gzip header and trailer, checked.
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)

    @property
    def eof(self):
        return self._zlib.eof

    @property
    def unused_data(self):
        return self._zlib.unused_data

    @property
    def needs_input(self):
        return not self._zlib.unconsumed_tail

    def decompress(self, data, max_length):
        return self._zlib.decompress(self._zlib.unconsumed_tail + data, max_length)


GZIP = Compression("gz", _Gzip)
BZIP2 = Compression("bz2", bz2.BZ2Decompressor)
XZ = Compression("xz", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ))
LZ4 = Compression("lz4", None)
ZSTD = Compression("zstd", None)

#: Dovecot's own LZ4 header (iostream-lz4.h: LZ4 has no standard one).
_LZ4_MAGIC = b"Dovecot-LZ4\x0d\x2a\x9b\xc5"
#: "BZh", the block size (1 to 9), and the first block's magic (pi).
_BZIP2 = re.compile(rb"BZh[1-9]\x31\x41\x59\x26\x53\x59", re.DOTALL)
#: How many octets L{detect} needs.
MAGIC_LENGTH = len(_LZ4_MAGIC)


def detect(head):
    """
    The compression a file beginning with C{head} (its first
    L{MAGIC_LENGTH} octets, or all of a shorter file) is in, tested as
    Dovecot 2.3's C{compression_detect_handler} tests it; C{None} for a
    message as it is.  A header begins with none of these octets, but a
    message file may: a header-less one beginning C{BZh91AY&SY}, or
    binary junk a delivery stored.  Dovecot tells them the same way (with
    its zlib plugin, it cannot read such a file: L{CorruptData}).
    """
    if head.startswith(b"\x1f\x8b"):
        return GZIP
    if _BZIP2.fullmatch(head[:10]):
        return BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return XZ
    if head.startswith(_LZ4_MAGIC):
        return LZ4
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return ZSTD
    return None


class CorruptData(Exception):
    """
    A file that begins as compressed data does (L{detect}) but does not
    decompress to its end: compressed data cut short (a crash while
    Dovecot wrote it) or damaged, or no compressed data at all, a message
    that happens to begin with those octets (a header-less one beginning
    C{BZh91AY&SY}).  Its first octets cannot tell which: a Dovecot with
    its zlib plugin cannot read any of them, one without it serves each
    as it is stored.

    @ivar compression: the L{Compression} its first octets suggest.
    @ivar reason: why it does not decompress.
    """

    def __init__(self, compression, reason):
        super().__init__(compression, reason)
        self.compression = compression
        self.reason = reason

    def __str__(self):
        name = self.compression.name
        return f"starts like {name} data but is not valid {name} data ({self.reason})"


def decompressedBlocks(fd, compression, blockSize):
    """
    The decompressed content of the file open as C{fd}, from its start,
    in blocks of at most C{blockSize} octets: memory stays bounded
    whatever the file decompresses to (a few blocks of input and output
    at a time), and the caller may stop at any block.  Concatenated
    streams (C{cat a.gz b.gz}) decompress one after the other, as gzip
    and bzip2 read them.

    @raise CorruptData: if the data is damaged, is none of that kind, or
        ends before its end marker.
    @raise OSError: if the file cannot be read.
    """
    decompressor = compression.decompressor()
    offset = 0
    pending = b""
    while True:
        if decompressor.eof:
            # The end of one stream: another may follow.
            pending = decompressor.unused_data + pending
            if not pending:
                pending = os.pread(fd, blockSize, offset)
                offset += len(pending)
                if not pending:
                    return
            decompressor = compression.decompressor()
        atEnd = False
        if not pending and decompressor.needs_input:
            pending = os.pread(fd, blockSize, offset)
            offset += len(pending)
            atEnd = not pending
        try:
            block = decompressor.decompress(pending, blockSize)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
            raise CorruptData(compression, str(e)) from None
        pending = b""
        if block:
            yield block
        elif atEnd and not decompressor.eof:
            raise CorruptData(compression, "the file ends before the compressed data does")
