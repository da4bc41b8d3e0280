"""A small, strict tar reader that yields WebDataset samples by position.

Why not `tarfile`: we need to skip to sample k of a shard without reading the data of
the first k samples (seek on local files), to tell "the archive ends early" apart from
"the archive is garbage", and to spend as little Python per member as possible. The
format subset is what tar writers produce for WebDataset shards: ustar/POSIX headers,
pax extended headers ('x', 'g') and GNU long names ('L').

A WebDataset sample is a run of consecutive members sharing a key: "dir/000123.png" and
"dir/000123.cls" form sample "dir/000123" with fields "png" and "cls".
"""
from __future__ import annotations

from typing import BinaryIO, Iterator, Sequence

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


class TarFormatError(Exception):
    """The archive is truncated or a header is not a tar header."""


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; field = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path


class TarReader:
    """Sequential reader over one tar stream; `seekable` lets skipped data be seeked over."""

    def __init__(self, fileobj: BinaryIO, seekable: bool):
        self._f = fileobj
        self._seekable = seekable

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise TarFormatError(f"archive truncated: wanted {n} bytes, got {len(data)}")
        return data

    def _skip(self, n: int) -> None:
        if self._seekable:
            self._f.seek(n, 1)
        else:
            while n > 0:
                n -= len(self._read(min(n, 1 << 20)))

    def _header(self) -> tuple[str, int, bytes] | None:
        """Next (name, size, typeflag); None at a clean end of archive."""
        block = self._f.read(BLOCK)
        if len(block) == 0 or block.count(0) == BLOCK:
            return None  # end-of-archive marker, or an archive cut exactly at a member boundary
        if len(block) != BLOCK:
            raise TarFormatError("archive truncated inside a header")
        try:
            checksum_ok = _octal(block[148:156]) == sum(block[:148]) + 256 + sum(block[156:])
            size = _octal(block[124:136])
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise TarFormatError("bad header checksum (not a tar archive, or corrupted)")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX: name = prefix/name
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        return name.decode("utf-8", "replace"), size, block[156:157]

    def _entries(self) -> Iterator[tuple[str, int]]:
        """Yield (name, size) of regular members. Before resuming, the caller must consume
        the member's data with `data(size)` or `skip(size)`."""
        long_name = None
        while True:
            header = self._header()
            if header is None:
                return
            name, size, kind = header
            if kind in (b"x", b"L"):
                data = self.data(size)
                long_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode()
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if kind in _REGULAR:
                yield name, size
            else:
                self.skip(size)

    def data(self, size: int) -> bytes:
        """The current member's data (and its padding consumed)."""
        return self._read(-(-size // BLOCK) * BLOCK)[:size]

    def skip(self, size: int) -> None:
        """Pass over the current member's data without reading it where possible."""
        self._skip(-(-size // BLOCK) * BLOCK)

    def samples(self, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield (key, {field: bytes}) for samples number start <= i < stop of the archive.

        The data of the samples before `start` is skipped, not read.
        """
        return self.select([(start, stop)])

    def select(self, ranges: Sequence[tuple[int, int | None]]
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield (key, {field: bytes}) for the samples in sorted, disjoint [start, stop)
        ranges of sample numbers, in order; the data of the samples between is skipped
        (seeked over where possible), so one pass serves many scattered pieces."""
        ranges = list(ranges)
        index, key, fields, keep, r = -1, None, {}, False, 0
        for name, size in self._entries():
            member_key, field = split_key(name)
            if member_key != key:
                if keep:
                    yield key, fields
                index += 1
                key, fields = member_key, {}
                while r < len(ranges) and ranges[r][1] is not None and index >= ranges[r][1]:
                    r += 1
                if r == len(ranges):
                    return
                keep = index >= ranges[r][0]
            if keep:
                fields[field] = self.data(size)
            else:
                self.skip(size)
        if keep:
            yield key, fields


def count_samples(fileobj: BinaryIO, seekable: bool, strict: bool = True) -> int:
    """Number of samples in a tar stream (reads only headers when seekable).

    With strict=False a damaged archive counts the samples before the damage.
    """
    reader = TarReader(fileobj, seekable)
    count, key = 0, None
    try:
        for name, size in reader._entries():
            reader.skip(size)
            member_key = split_key(name)[0]
            if member_key != key:
                count, key = count + 1, member_key
    except TarFormatError:
        if strict:
            raise
    return count
