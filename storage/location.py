"""Where a store lives: one URL (local path or fsspec URL) → a filesystem, a root path, a zarr store.

Every side file of a run (manifest, sample index, lock) goes through the same fsspec filesystem as
the zarr arrays, so a local path, ``file://``, ``memory://`` and ``s3://`` take one code path.
Atomic small-file writes: temp file + ``os.replace`` on a local disk; a single ``put`` elsewhere
(object stores make a single put atomic; a non-object remote filesystem such as sftp does not, which
is why clipscope stores belong on a local/shared disk or an object store).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clipscope.errors import ConfigError, EnvironmentFault


def is_url(url: str) -> bool:
    """True for ``scheme://…`` strings, False for plain local paths."""
    return "://" in url


def normalize_url(url: str | os.PathLike[str]) -> str:
    """Absolute local path (Ray workers elsewhere must see the same path) or the URL without a trailing /."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ConfigError(f"store url must be a non-empty path or URL string, got {url!r}")
    if is_url(url):
        scheme, rest = url.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise ConfigError(f"store url must name a location after the scheme, got {url!r}")
        return f"{scheme}://{rest}"
    return os.path.abspath(os.path.expanduser(url))


class Location:
    """A normalised store URL with its storage options; filesystem handles are created lazily.

    Pickles to (url, storage_options): the filesystem is rebuilt on the other side.
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url = normalize_url(url)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigError(
                f"storage_options must be a dict or None, got {type(storage_options).__name__}"
            )
        if storage_options and not is_url(self.url):
            raise ConfigError(
                f"storage_options apply to fsspec URLs only, got a local path {self.url!r}; "
                "use a URL such as file:///path"
            )
        self.storage_options = dict(storage_options) if storage_options else None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def is_local_path(self) -> bool:
        return not is_url(self.url)

    def _fsspec_options(self) -> dict[str, Any]:
        opts = dict(self.storage_options or {})
        if self.url.startswith(("file://", "local://")):
            # LocalFileSystem does not create parent folders on write unless asked; zarr needs it.
            opts.setdefault("auto_mkdir", True)
        return opts

    def _resolve(self) -> None:
        if self.is_local_path:
            self._fs, self._root = LocalFileSystem(), self.url
        else:
            require_protocol(self.url)
            self._fs, self._root = fsspec.core.url_to_fs(self.url, **self._fsspec_options())

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._resolve()
        return self._fs  # type: ignore[return-value]

    @property
    def root(self) -> str:
        if self._root is None:
            self._resolve()
        return self._root  # type: ignore[return-value]

    @property
    def on_local_disk(self) -> bool:
        """True when files are plain files on this machine (atomic rename and O_EXCL available)."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *relative: str) -> str:
        """Filesystem path of a key inside the store."""
        return posixpath.join(self.root, *relative) if relative else self.root

    def child_url(self, *relative: str) -> str:
        """URL (or local path) of a key inside the store, for messages and for pyarrow/fsspec users."""
        return posixpath.join(self.url, *relative)

    def zarr_store(self, *, read_only: bool):
        """A zarr v3 store object for this location (LocalStore for paths, FsspecStore for URLs)."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local_path:
            return LocalStore(self.url, read_only=read_only)
        return FsspecStore.from_url(
            self.url, storage_options=self._fsspec_options(), read_only=read_only
        )

    # --- small files -----------------------------------------------------------------------------

    def exists(self, *relative: str) -> bool:
        return self.fs.exists(self.path(*relative))

    def read_bytes(self, *relative: str) -> bytes | None:
        """Contents of a file in the store, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(*relative))
        except FileNotFoundError:
            return None

    def write_bytes_atomic(self, data: bytes, *relative: str) -> None:
        """Replace a file so that readers see either the old or the new contents, never a torn file."""
        target = self.path(*relative)
        if self.on_local_disk:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, *relative: str) -> bool:
        """Delete a file; False when it was not there."""
        try:
            self.fs.rm_file(self.path(*relative))
        except FileNotFoundError:
            return False
        return True

    def list_names(self, *relative: str) -> list[str]:
        """Base names of the entries of a folder of the store (empty when the folder is absent)."""
        folder = self.path(*relative)
        # Listings of remote filesystems are cached per instance; other writers may have added files.
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = []
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            if name and str(entry).rstrip("/") != folder.rstrip("/"):
                names.append(name)
        return sorted(names)


def require_protocol(url: str, what: str = "store") -> None:
    """ConfigError naming the URL and the package to install when fsspec cannot handle its scheme."""
    if not is_url(url):
        return
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        raise ConfigError(f"{what} {url}: {err} (install it into clipscope's environment)") from None
    except ValueError:
        raise ConfigError(f"{what} {url}: fsspec knows no {protocol}:// file system") from None


def check_writable_target(url: str, flag: str, *, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is
    needed (or the reverse), a missing parent folder (files only), a read-only file system or no
    write permission (`EnvironmentFault`), a URL whose file system package is missing."""
    if is_url(url):
        require_protocol(url, flag)
        return
    path = os.path.abspath(os.path.expanduser(url))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file; it must name a folder (new or existing)")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a folder; it must name a file")
    parent = os.path.dirname(path)
    if not folder and not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: its folder does not exist; create {parent} first")
    existing = path if folder and os.path.exists(path) else parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise EnvironmentFault(f"{flag} {path}: the file system of {existing} is read-only; write elsewhere")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentFault(f"{flag} {path}: no permission to write in {existing}; fix it or write elsewhere")
