"""Unpacking an uploaded model folder (.tar, .tar.gz, .zip) without trusting the archive.

Members are read one at a time and written by this code, never by `extractall`, so every
rule holds for every byte written:

- a member's name must stay inside the destination: no absolute path, drive or UNC name, no
  `..` component, no backslash (a Windows separator the POSIX checks would not see);
- only regular files and folders: a symlink, hardlink, device or FIFO member is refused,
  even one that points inside the folder, as a later member could write through it;
- no name twice (a second copy would silently replace the first, checked one);
- at most `MAX_MEMBERS` members, each and all together at most `limit` bytes, and at most
  `MAX_RATIO` times the archive's own size plus `RATIO_SLACK`: a bomb is stopped after that
  many bytes, however its headers describe it, since the sizes counted are the bytes read.

A refusal raises a Problem naming the member; the caller removes the half-written folder.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from app.errors import Problem
from app.upload_stream import too_large

MAX_MEMBERS = 10_000  # an HF folder holds tens of files; sharded checkpoints a few hundred
# Weights barely compress (1.1x) and tokenizer JSON about 4x: 100x is only ever reached by
# repeated bytes, the stuff of bombs. The slack lets a tiny archive of configs expand freely.
MAX_RATIO = 100
RATIO_SLACK = 16 * 2**20
MAX_NAME = 1024  # bytes of a member's path; the filesystem would refuse longer anyway
CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def kind(head: bytes) -> str | None:
    """'zip', 'tar' or 'tar.gz' from a file's first 512 bytes; None for anything else."""
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head.startswith(GZIP_MAGIC):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":  # POSIX and GNU tar headers
        return "tar"
    return None


def unsafe_member(name: str, why: str) -> Problem:
    detail = f"archive member '{name[:200]}' {why}; nothing was stored"
    return Problem(422, "unsafe-archive-member", "Unsafe archive member", detail, member=name[:200])


def invalid_archive(why: str) -> Problem:
    return Problem(422, "invalid-archive", "Invalid archive", f"the archive cannot be read: {why}")


def bomb(archive_bytes: int, written: int, member: str) -> Problem:
    detail = (f"the archive expands to more than {MAX_RATIO} times its {archive_bytes:,} bytes (at least {written:,} "
              f"bytes by member '{member[:200]}'): refused as a decompression bomb; nothing was stored")
    return Problem(413, "archive-bomb", "Decompression bomb", detail, member=member[:200])


def too_many_members() -> Problem:
    detail = f"the archive has more than {MAX_MEMBERS:,} members; an HF model folder has far fewer"
    return Problem(413, "archive-too-many-members", "Too many archive members", detail, limit=MAX_MEMBERS)


def safe_name(name: str) -> PurePosixPath:
    """The member's relative path, or a problem saying why it could leave the folder."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise unsafe_member(name, f"has a name longer than {MAX_NAME} bytes")
    if "\\" in name or "\x00" in name:
        raise unsafe_member(name, "has a backslash or NUL in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise unsafe_member(name, "has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise unsafe_member(name, "has a '..' component: it would be written outside the model folder")
    if not parts:
        raise unsafe_member(name, "has an empty name")
    return PurePosixPath(*parts)


class _Writer:
    """Writes members under `dest`, counting members and bytes against the limits."""

    def __init__(self, dest: Path, limit: int, archive_bytes: int, check_member) -> None:
        self.dest, self.limit, self.archive_bytes, self.check_member = dest, limit, archive_bytes, check_member
        self.members = 0
        self.written = 0
        self.names: set[PurePosixPath] = set()
        self.files: list[PurePosixPath] = []
        self.dest.mkdir(parents=True, exist_ok=True)

    def count(self, name: str) -> PurePosixPath:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise too_many_members()
        return safe_name(name)

    def folder(self, relative: PurePosixPath, name: str) -> None:
        self._target(relative, name).mkdir(parents=True, exist_ok=True)

    def file(self, relative: PurePosixPath, name: str, source: BinaryIO) -> None:
        if relative in self.names:
            raise unsafe_member(name, "appears twice in the archive")
        self.names.add(relative)
        self.check_member(name, relative)
        target = self._target(relative, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        first = True
        with open(target, "xb") as out:
            while chunk := source.read(CHUNK):
                if first:
                    self.check_member(name, relative, chunk[:16])
                    first = False
                self.written += len(chunk)
                if self.written > self.limit:
                    raise too_large(self.limit, f"the archive's content (at member '{name[:200]}')")
                if self.written > MAX_RATIO * self.archive_bytes + RATIO_SLACK:
                    raise bomb(self.archive_bytes, self.written, name)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the folder is published
        self.files.append(relative)

    def _target(self, relative: PurePosixPath, name: str) -> Path:
        target = self.dest.joinpath(*relative.parts)
        # A folder member named like an earlier file (or the reverse) would make mkdir or open
        # fail; the resolved check is a second line behind safe_name.
        if not target.resolve().is_relative_to(self.dest.resolve()):
            raise unsafe_member(name, "would be written outside the model folder")
        return target


def extract(archive: Path, archive_kind: str, dest: Path, limit: int, check_member=None) -> list[PurePosixPath]:
    """Unpack `archive` into `dest`; return the files written, relative to `dest`.

    `check_member(name, relative, head=None)` may refuse a member by its name (head None) and
    then by its first bytes, before any more of it is written."""
    writer = _Writer(dest, limit, max(1, archive.stat().st_size), check_member or (lambda *args: None))
    try:
        if archive_kind == "zip":
            _extract_zip(archive, writer)
        else:
            _extract_tar(archive, archive_kind == "tar.gz", writer)
    except OSError as exc:  # a member over an earlier file's name, or a full disk
        raise invalid_archive(f"a member cannot be written ({exc.strerror or exc})") from None
    return writer.files


class _CountedStream:
    """The tar stream as tarfile reads it, decompressed here and counted: tarfile buffers some
    members whole (pax and GNU long-name headers) before yielding anything, so the bound must
    hold below it too. Reads are capped, so no single read decompresses more than a chunk."""

    def __init__(self, raw: BinaryIO, writer: _Writer) -> None:
        self.raw, self.writer, self.read_bytes = raw, writer, 0
        # tar adds a 512-byte header and up to 511 bytes of padding per member, and pads the end
        self.bound = writer.limit + 1024 * (MAX_MEMBERS + 20)

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.read_bytes += len(chunk)
        if self.read_bytes > self.bound:
            raise too_large(self.writer.limit, "the archive's content")
        if self.read_bytes > MAX_RATIO * self.writer.archive_bytes + RATIO_SLACK:
            raise bomb(self.writer.archive_bytes, self.read_bytes, "(tar stream)")
        return chunk


def _extract_tar(archive: Path, gzipped: bool, writer: _Writer) -> None:
    try:
        with open(archive, "rb") as raw, (gzip.GzipFile(fileobj=raw) if gzipped else raw) as stream:
            # Stream mode ("r|"): members are read in order, never by seeking to offsets that
            # the headers claim.
            with tarfile.open(fileobj=_CountedStream(stream, writer), mode="r|") as tar:  # type: ignore[arg-type]
                for member in tar:
                    _tar_member(tar, member, writer)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise invalid_archive(f"{type(exc).__name__}: {exc}") from None


def _tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    relative = writer.count(member.name)
    if member.issym() or member.islnk():
        link = "symlink" if member.issym() else "hardlink"
        raise unsafe_member(member.name, f"is a {link} (to '{member.linkname[:200]}'); links are refused")
    if member.isdir():
        writer.folder(relative, member.name)
        return
    if not member.isreg() or member.issparse():
        raise unsafe_member(member.name, "is not a regular file or folder (a device, FIFO or sparse file)")
    source = tar.extractfile(member)
    assert source is not None  # a regular member always has data
    writer.file(relative, member.name, source)


def check_zip_entries(archive: Path) -> None:
    """Refuse a zip of too many members from its end record, before zipfile builds an entry per
    member (millions of 46-byte entries would be gigabytes of ZipInfo objects)."""
    with open(archive, "rb") as raw:
        end = zipfile._EndRecData(raw)  # type: ignore[attr-defined]  # private, but stable since Python 2
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:  # type: ignore[attr-defined]
        raise too_many_members()


def _extract_zip(archive: Path, writer: _Writer) -> None:
    try:
        check_zip_entries(archive)
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _zip_member(zf, info, writer)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, zlib.error) as exc:
        raise invalid_archive(f"{type(exc).__name__}: {exc}") from None


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, writer: _Writer) -> None:
    relative = writer.count(info.filename)
    # The Unix mode, where the archiver recorded one; some record only permission bits
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise unsafe_member(info.filename, "is a symlink; links are refused")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise unsafe_member(info.filename, "is not a regular file or folder (a device or FIFO)")
    if info.flag_bits & 0x1:
        raise invalid_archive(f"member '{info.filename[:200]}' is encrypted")
    if info.is_dir():
        writer.folder(relative, info.filename)
        return
    # zipfile stops at the size the header states and checks the CRC at the end; the writer
    # counts the bytes it is actually given, so a header that lies either way gains nothing.
    with zf.open(info) as source:
        writer.file(relative, info.filename, source)
