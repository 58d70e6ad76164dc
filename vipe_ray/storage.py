"""Storage by URI: results, checkpoints and pose tables on a local disk or an object store.

A :class:`Location` is a pyarrow filesystem and a path on it. Local paths (and ``file://`` URIs) stay plain
local paths, handled exactly as before; ``s3://bucket/prefix`` and ``gs://bucket/prefix`` get pyarrow's S3
and GCS filesystems, configured the way every AWS/Google tool is:

* S3: endpoint from ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto, ...; unset means AWS), credentials from
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``, or ``~/.aws``, or an instance
  role), region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``.
* GCS: Google's default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, workload identity).

A location pickled to a Ray worker carries its endpoint (pyarrow keeps it in the filesystem's options) but
never credentials: every process, the driver and each worker, reads them from its own environment. So every
node needs them (on Kubernetes: the same Secret in every Ray pod, see ``deploy/storage.yaml``).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

#: ``scheme://`` at the start of a URI (``C:\\`` and relative paths do not match).
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: The environment variables an S3 location is configured from (named in error messages).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class StorageError(ValueError):
    """A location that cannot be used (bad URI, missing bucket, no access); the message names the URI."""


def is_uri(target: str | Path) -> bool:
    """Whether ``target`` names an object store (``s3://``, ``gs://``, ...) rather than a local path."""
    match = _URI.match(str(target)) if isinstance(target, str) else None
    return bool(match) and match.group(1).lower() != "file"


@dataclass(frozen=True)
class Location:
    """A file or directory: ``path`` on ``fs``. ``scheme`` is ``""`` for the local disk (``path`` absolute),
    else the URI scheme (``path`` is then ``bucket/key...``, the form pyarrow and Ray's ``storage_filesystem``
    expect)."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        """The local path, or ``scheme://bucket/key``."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, name: str) -> "Location":
        return self.at(posixpath.join(self.path, name))

    def at(self, path: str) -> "Location":
        """Another path on the same filesystem (e.g. a checkpoint path Ray reports)."""
        return Location(self.fs, path, self.scheme)

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise _access_error(self, exc) from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as handle:
                return handle.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _access_error(self, exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        """Write a small text file (local parents are created; object stores have no directories)."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_output_stream(self.path) as handle:
                handle.write(text.encode())
        except OSError as exc:
            raise _access_error(self, exc) from None

    def mkdir(self) -> None:
        """Create a local directory; a no-op on object stores, where a prefix exists once a key is under it."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def subdirs(self) -> list["Location"]:
        """The directories directly under this one (object-store prefixes count), sorted by name."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise _access_error(self, exc) from None
        return sorted((self.at(i.path) for i in infos if i.type == pafs.FileType.Directory), key=lambda x: x.path)

    def download(self, directory: str | Path) -> Path:
        """Copy this file or directory under the local ``directory``; returns the copy's path."""
        target = Path(directory) / self.name
        copy_tree(self, target)
        return target

    def ray_storage(self) -> dict:
        """``storage_path`` and ``storage_filesystem`` for Ray's ``RunConfig`` / ``Tuner.restore``: local
        paths exactly as before (Ray picks the local filesystem), object stores with this filesystem."""
        if self.is_local:
            return {"storage_path": self.path, "storage_filesystem": None}
        return {"storage_path": self.path, "storage_filesystem": self.fs}

    def check_access(self) -> None:
        """Fail early and clearly when an object-store location's bucket is missing or unreachable."""
        if self.is_local:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise _access_error(self, exc) from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: bucket {bucket!r} does not exist{_endpoint_hint(self)}")


def location(target: "str | Path | Location") -> Location:
    """The :class:`Location` of a local path, a ``file://`` URI or an object-store URI (``s3://``, ``gs://``)."""
    if isinstance(target, Location):
        return target
    if not is_uri(target):
        text = str(target)
        if text.startswith("file://"):
            text = pafs.FileSystem.from_uri(text)[1]
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
    scheme = _URI.match(target).group(1).lower()
    try:
        # from_uri reads AWS_ENDPOINT_URL into the filesystem's options, so it travels to Ray workers.
        fs, path = pafs.FileSystem.from_uri(target)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"{target}: not a usable storage URI ({exc})") from None
    path = path.rstrip("/")
    if not path:
        raise StorageError(f"{target}: name a bucket (and optionally a prefix), e.g. {scheme}://BUCKET/PREFIX")
    return Location(fs, path, "gs" if scheme == "gcs" else scheme)


def same_location(a: "str | Path | Location", b: "str | Path | Location") -> bool:
    return location(a).uri == location(b).uri


def _endpoint_hint(loc: Location) -> str:
    if loc.scheme != "s3":
        return ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS (AWS_ENDPOINT_URL is not set)"
    return f" at {endpoint}; endpoint and credentials come from {', '.join(S3_ENV)}"


def _access_error(loc: Location, exc: OSError) -> StorageError:
    return StorageError(f"{loc.uri}: cannot access ({exc}){_endpoint_hint(loc)}")


def copy_tree(source: "str | Path | Location", target: "str | Path | Location") -> None:
    """Copy a file or a directory between any two locations (e.g. seed a bucket with a pose table)."""
    src, dst = location(source), location(target)
    if dst.is_local:  # pyarrow creates no local folders
        (Path(dst.path) if src.is_dir() else Path(dst.path).parent).mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(src.path, dst.path, source_filesystem=src.fs, destination_filesystem=dst.fs)
    except OSError as exc:
        raise _access_error(dst if src.is_local else src, exc) from None
