"""Webdataset input: shard URL expansion, streaming tar reading, image decoding, shard writing.

A webdataset shard is a tar whose members are grouped into samples by key: the member path up
to the first dot of its basename (``dir/000123.jpg`` → key ``dir/000123``, suffix ``jpg``);
consecutive members with the same key form one sample, exactly as ``webdataset`` groups them.

The store reserves a shard's rows from its sample count before any image is decoded, and a
sample's row is ``block start + index_in_shard``. So counting (`shard_counts.py`) and reading
(`iter_shard_samples`) walk the tar with one function, `walk_tar_groups`, and agree on every
archive, including truncated and corrupt ones:

* a member whose header, data or padding is cut off, an invalid header, or an archive that ends
  without its end-of-archive marker ends the walk; the sample in progress at that point is
  dropped (more of its members may have been lost) and the reason is reported, never raised;
* errors that are not about the archive's bytes (a missing file, a network failure) raise
  `DataError`, so the caller can retry the shard.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import lzma
import os
import re
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import braceexpand
import fsspec
from PIL import Image

from clipscope.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
TEXT_SUFFIX = "txt"
LABEL_SUFFIX = "cls"
JSON_SUFFIX = "json"
NPY_EXTENSION = "npy"

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
# webdataset's split of a member path into key and suffix (tariterators.base_plus_ext).
_KEY_SUFFIX_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset skips metadata members such as ``__index__`` (tariterators.tar_file_iterator).
_META_RE = re.compile(r"__[^/]*__($|/)")
# Local protocols where checking existence costs nothing, so expand_urls can fail early.
_CHEAP_PROTOCOLS = ("file", "local", "memory")
# Errors that mean "these bytes are not a (complete) tar archive", as opposed to I/O failures.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", _ZSTD_MAGIC)
# The start of the reason a walk gives when the bytes are not a tar archive at all (no header read).
NOT_A_TAR = "not a readable tar archive"


class UnreadableShardError(DataError):
    """A shard's bytes are not a tar archive (empty, random, unknown compression): retrying cannot help."""

    retryable = False


# ----------------------------------------------------------------------------------------------
# URL expansion


def is_url(spec: str) -> bool:
    """True for fsspec URLs (``scheme://…``) and webdataset ``pipe:`` commands."""
    return spec.startswith("pipe:") or bool(_URL_RE.match(spec))


def expand_urls(
    specs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Expand shard specs into a deduplicated, deterministically ordered list of shard URLs.

    Each spec may hold several specs joined by ``::`` (as in webdataset) and brace patterns
    (``shards/{000..009}.tar``). Local items may be files, directories (every ``*.tar`` inside,
    sorted) or globs (sorted); they come back as absolute paths and must exist. fsspec URLs are
    kept as given, except that globs and URLs ending in ``/`` are listed, and ``file://`` /
    ``memory://`` URLs are checked for existence; ``pipe:`` commands are kept as given.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    urls: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
        if not isinstance(spec, str) or not spec.strip():
            raise DataError(f"shard spec must be a non-empty string, got {spec!r}")
        for part in spec.split("::"):
            for item in braceexpand.braceexpand(part.strip()):
                for url in _expand_item(item, storage_options):
                    if url not in seen:
                        seen.add(url)
                        urls.append(url)
    if not urls:
        raise DataError(f"no shards found for {list(specs)!r}")
    return urls


def _expand_item(item: str, storage_options: dict[str, Any] | None) -> list[str]:
    if item.startswith("pipe:"):
        return [item]
    if is_url(item):
        return _expand_fsspec_url(item, storage_options)
    path = os.path.abspath(os.path.expanduser(item))
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "*.tar")) if os.path.isfile(p))
        if not found:
            raise DataError(f"directory {item} holds no *.tar shards")
        return found
    if _GLOB_CHARS.search(item):
        found = sorted(os.path.abspath(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError(f"no shard files match {item}")
        return found
    raise DataError(f"shard file not found: {item}")


def _expand_fsspec_url(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    protocol, _ = fsspec.core.split_protocol(url)
    cheap = protocol in _CHEAP_PROTOCOLS
    listing = bool(_GLOB_CHARS.search(url)) or url.endswith("/")
    if not cheap and not listing:
        return [url]  # a remote file: checked when it is opened, not with a request per shard here
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot list {url}: {exc}") from exc
    if _GLOB_CHARS.search(path):
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not found:
            raise DataError(f"no shard files match {url}")
        return [fs.unstrip_protocol(p) for p in found]
    if url.endswith("/") or fs.isdir(path):
        found = sorted(p for p in fs.glob(path.rstrip("/") + "/*.tar") if not fs.isdir(p))
        if not found:
            raise DataError(f"directory {url} holds no *.tar shards")
        return [fs.unstrip_protocol(p) for p in found]
    if not fs.exists(path):
        raise DataError(f"shard file not found: {url}")
    return [url]


# ----------------------------------------------------------------------------------------------
# Opening shards


@contextlib.contextmanager
def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """Open a shard for binary reading: a local path, an fsspec URL or a ``pipe:`` command.

    A missing file or a failure to open raises `DataError` naming the URL.
    """
    if url.startswith("pipe:"):
        with _open_pipe(url) as stream:
            yield stream
        return
    try:
        if is_url(url):
            opened = fsspec.open(url, "rb", **(storage_options or {})).open()
        else:
            opened = open(url, "rb")
    except FileNotFoundError as exc:
        raise DataError(f"shard not found: {url}") from exc
    except OSError as exc:
        raise DataError(f"cannot open shard {url}: {exc}") from exc
    except ImportError as exc:  # s3:// without s3fs, gs:// without gcsfs
        raise DataError(f"cannot read {url}: {exc} (install it into clipscope's environment)") from None
    with opened:
        yield opened


@contextlib.contextmanager
def _open_pipe(url: str) -> Iterator[IO[bytes]]:
    # The command is the user's own shell command, as in webdataset's gopen.
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
    stdout = proc.stdout
    if stdout is None:
        raise DataError(f"cannot read the output of {url}")
    try:
        yield stdout
    except BaseException:
        stdout.close()
        proc.kill()  # the reader stopped early; the command's output is no longer wanted
        proc.wait()
        raise
    while stdout.read(1 << 16):
        pass  # let the command finish writing (tar padding) instead of dying of SIGPIPE
    stdout.close()
    status = proc.wait()
    if status != 0:
        # A failed command (a download error, say) is worth retrying, unlike a corrupt tar.
        raise DataError(f"{url} exited with status {status}")


def _head(stream: IO[bytes], n: int) -> bytes:
    """The first n bytes of a freshly opened stream, leaving it at the start (b"" if unknowable)."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        return peek(n)[:n]
    if stream.seekable():
        head = stream.read(n)
        stream.seek(0)
        return head
    return b""


def _is_compressed(stream: IO[bytes]) -> bool:
    head = stream.read(6)
    stream.seek(0)
    return any(head.startswith(magic) for magic in _COMPRESSED_MAGIC)


# ----------------------------------------------------------------------------------------------
# Walking a tar as webdataset samples


@dataclass
class TarGroup:
    """One sample's members: suffix → data (None when the walk did not read it)."""

    key: str
    members: dict[str, bytes | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class _HeaderTracingTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: it treats a missing or cut header as a normal end."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            info = super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.clipscope_header_error = exc  # type: ignore[attr-defined]
            raise
        tf.clipscope_header_error = None  # type: ignore[attr-defined]
        return info


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's (key, lower-case suffix) of a tar member path; None for skipped members."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META_RE.match(name):
        return None
    match = _KEY_SUFFIX_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def walk_tar_groups(
    stream: IO[bytes], *, read: Callable[[str], bool], seek: bool = False
) -> Generator[TarGroup, None, str | None]:
    """Yield the samples of a tar in order; return None if the archive is complete, else why not.

    ``read(suffix)`` says which members' data to read; the others are skipped. ``seek=True``
    skips by seeking (header-only scan of an uncompressed, seekable stream); otherwise the
    stream is read sequentially (any stream, compressed or not). Both give the same groups.
    """
    try:
        if seek:
            tf = tarfile.TarFile(fileobj=stream, mode="r", tarinfo=_HeaderTracingTarInfo)
        else:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderTracingTarInfo)
    except _ARCHIVE_ERRORS as exc:
        return f"{NOT_A_TAR} ({exc})"
    current: TarGroup | None = None
    headers = 0
    try:
        while True:
            info = tf.next()
            tf.members = []  # keep memory flat on huge shards; we never look members up
            if info is None:
                break
            headers += 1
            if not info.isreg():
                continue
            split = split_member_name(info.name)
            if split is None:
                continue
            key, suffix = split
            if current is None or current.key != key:
                # Emit the finished sample before touching this member's data, so a cut inside
                # the data loses the same samples whether the walk reads or seeks past it.
                if current is not None:
                    yield current
                current = TarGroup(key)
            data = None
            if read(suffix):
                member = tf.extractfile(info)
                assert member is not None  # regular files always have a data stream
                data = member.read()
            if suffix in current.members:
                current.problems.append(f"duplicate member {info.name!r}")
            else:
                current.members[suffix] = data
    except _ARCHIVE_ERRORS as exc:
        return f"{exc} at byte {tf.offset}" if headers else f"{NOT_A_TAR} ({exc})"
    error = getattr(tf, "clipscope_header_error", None)
    if not isinstance(error, tarfile.EOFHeaderError):
        if isinstance(error, tarfile.EmptyHeaderError):
            return f"archive ends at byte {tf.offset} without an end-of-archive marker"
        if not headers:
            return f"{NOT_A_TAR} ({error or 'unreadable header'})"
        return f"{error or 'unreadable header'} at byte {tf.offset}"
    if current is not None:
        yield current
    return None


def walk_tar_url(
    url: str,
    *,
    read: Callable[[str], bool],
    seek: bool,
    storage_options: dict[str, Any] | None = None,
) -> Generator[TarGroup, None, str | None]:
    """`walk_tar_groups` over a URL; seeks only where the stream allows it.

    zstd-compressed shards (``.tar.zst``, recognised by their magic bytes) are read through the
    ``zstandard`` package; tarfile itself reads gzip, bzip2 and xz.
    """
    with open_shard(url, storage_options) as stream:
        if _head(stream, len(_ZSTD_MAGIC)) == _ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                return f"{NOT_A_TAR} (zstd-compressed; install the zstandard package to read .tar.zst shards)"
            stream = zstandard.ZstdDecompressor().stream_reader(stream, closefd=False)
            seek = False
        can_seek = seek and stream.seekable() and not _is_compressed(stream)
        walker = walk_tar_groups(stream, read=read, seek=can_seek)
        try:
            reason = yield from walker
        except OSError as exc:
            raise DataError(f"I/O error while reading shard {url}: {exc}") from exc
    return reason


def truncation_message(samples: int, reason: str) -> str:
    """The shard-level error text for an archive that stopped early (or was never a tar)."""
    if samples == 0 and reason.startswith(NOT_A_TAR):
        return reason
    return f"truncated after {samples} samples: {reason}"


# ----------------------------------------------------------------------------------------------
# Raw samples


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample of a shard; ``error`` is set when the sample cannot be used.

    ``meta_error`` flags a bad ``cls`` or ``json`` member: the image is still usable, the bad
    metadata is dropped (label / caption None where they came from it).
    """

    key: str
    index_in_shard: int
    image_bytes: bytes | None
    label: int | None
    caption: str | None
    meta: dict | None
    error: str | None
    meta_error: str | None = None
    # Every other member read (e.g. ``mask.png``, ``latent.npy``): suffix → bytes (masks, latents).
    extra: dict[str, bytes] = field(default_factory=dict)


def _wanted_suffix(suffix: str) -> bool:
    last = suffix.rsplit(".", 1)[-1]
    return suffix in (TEXT_SUFFIX, LABEL_SUFFIX, JSON_SUFFIX) or last in IMAGE_EXTENSIONS or last == NPY_EXTENSION


def _pick_image(members: dict[str, bytes | None]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    # Compound suffixes such as ``0.jpg``: first in tar order.
    for suffix, data in members.items():
        if suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return data
    return None


def raw_sample_from_group(group: TarGroup, index: int) -> RawSample:
    """Build a `RawSample` from a walked group whose wanted members were read."""
    problems = list(group.problems)
    meta_problems: list[str] = []
    members = group.members
    image = _pick_image(members)
    if image is None:
        problems.append("no image member")
    meta: dict | None = None
    if members.get(JSON_SUFFIX) is not None:
        try:
            parsed = json.loads(members[JSON_SUFFIX])  # type: ignore[arg-type]
        except ValueError as exc:
            meta_problems.append(f"json member is not valid JSON ({exc})")
        else:
            if isinstance(parsed, dict):
                meta = parsed
            else:
                meta_problems.append(f"json member is not an object, got {type(parsed).__name__}")
    label: int | None = None
    if members.get(LABEL_SUFFIX) is not None:
        text = members[LABEL_SUFFIX].decode("utf-8", "replace").strip()  # type: ignore[union-attr]
        try:
            label = int(text)
        except ValueError:
            meta_problems.append(f"cls member is not an integer, got {text[:40]!r}")
    elif meta is not None:
        label = _int_or_none(meta.get("label"))
    caption: str | None = None
    if members.get(TEXT_SUFFIX) is not None:
        caption = members[TEXT_SUFFIX].decode("utf-8", "replace")  # type: ignore[union-attr]
    elif meta is not None:
        for name in ("caption", "text"):
            if isinstance(meta.get(name), str):
                caption = meta[name]
                break
    return RawSample(
        key=group.key,
        index_in_shard=index,
        image_bytes=image,
        label=label,
        caption=caption,
        meta=meta,
        error="; ".join(problems) if problems else None,
        meta_error="; ".join(meta_problems) if meta_problems else None,
        extra={suffix: data for suffix, data in members.items()
               if data is not None and data is not image and suffix not in (TEXT_SUFFIX, LABEL_SUFFIX, JSON_SUFFIX)},
    )


def _int_or_none(value: Any) -> int | None:
    # A JSON label may also be a class name; only integers are class indices.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


class ShardSamples(Iterator[RawSample]):
    """Iterator over a shard's samples that records, instead of raising, why it stopped early.

    After exhaustion, ``error`` is None for a complete shard, else one line for the shard's error
    list ("truncated after N samples: <reason>", or the mismatch with ``expected_count``);
    ``samples_read`` is the number of samples yielded; ``lost`` the number of the shard's samples
    that were not yielded (0 for a complete shard, None when unknowable: a truncated archive whose
    tail is gone); ``unreadable`` is True when the bytes are not a tar archive at all.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        expected_count: int | None = None,
    ) -> None:
        if expected_count is not None and (not isinstance(expected_count, int) or expected_count < 0):
            raise ConfigError(f"expected_count must be an integer ≥ 0 or None, got {expected_count!r}")
        self.url = url
        self.expected_count = expected_count
        self.samples_read = 0
        self.error: str | None = None
        self.lost: int | None = 0
        self.unreadable = False
        self.finished = False
        self._samples = self._generate(storage_options)

    def __iter__(self) -> ShardSamples:
        return self

    def __next__(self) -> RawSample:
        return next(self._samples)

    def close(self) -> None:
        """Stop early and release the shard's file."""
        self._samples.close()

    def __enter__(self) -> ShardSamples:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _generate(self, storage_options: dict[str, Any] | None) -> Generator[RawSample, None, None]:
        walker = walk_tar_url(self.url, read=_wanted_suffix, seek=False, storage_options=storage_options)
        expected = self.expected_count
        try:
            while True:
                try:
                    group = next(walker)
                except StopIteration as stop:
                    if stop.value is not None:
                        self.error = truncation_message(self.samples_read, stop.value)
                        self.unreadable = self.samples_read == 0 and stop.value.startswith(NOT_A_TAR)
                        self.lost = (expected - self.samples_read
                                     if expected is not None and expected > self.samples_read else None)
                    break
                if expected is not None and self.samples_read == expected:
                    # Rows were reserved for `expected` samples only; count the rest so the loss is known.
                    extra = 1 + sum(1 for _ in walker)
                    self.lost = extra
                    self.error = (
                        f"shard holds {expected + extra} samples but {expected} were counted for it "
                        f"(stale index or img2dataset stats?); the last {extra} were skipped"
                    )
                    break
                sample = raw_sample_from_group(group, self.samples_read)
                self.samples_read += 1
                yield sample
        finally:
            walker.close()
        if self.error is None and expected is not None and self.samples_read < expected:
            self.error = f"shard ended after {self.samples_read} of the {expected} samples counted for it"
            self.lost = expected - self.samples_read
        self.finished = True


def iter_shard_samples(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    expected_count: int | None = None,
) -> ShardSamples:
    """Iterate a shard's samples in tar order, ``index_in_shard`` = 0, 1, 2, ….

    Order and number match `shard_counts.shard_sample_count`'s scan exactly. A truncated or
    corrupt archive yields the samples before the break and then stops, with the reason in the
    returned iterator's ``error``; it never raises for bad bytes. With ``expected_count`` the
    iterator never yields ``index_in_shard ≥ expected_count`` and reports a mismatch in ``error``.
    """
    return ShardSamples(url, storage_options=storage_options, expected_count=expected_count)


# ----------------------------------------------------------------------------------------------
# Decoding


class _ImageBytes(io.BytesIO):
    # PIL puts repr(fp) in its messages; the default repr holds a memory address.
    def __repr__(self) -> str:
        return "<image bytes>"


def decode_image(image_bytes: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image; any failure raises `DataError` with PIL's message."""
    try:
        with Image.open(_ImageBytes(image_bytes)) as image:
            return image.convert("RGB")
    except Exception as exc:  # PIL raises many unrelated types for bad bytes
        raise DataError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def decode_or_error(raw: RawSample) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) for a usable sample, else (None, an error line naming the sample key)."""
    if raw.error is not None:
        return None, f"sample {raw.key}: {raw.error}"
    if raw.image_bytes is None:
        return None, f"sample {raw.key}: no image member"
    try:
        return decode_image(raw.image_bytes), None
    except DataError as exc:
        return None, f"sample {raw.key}: {exc}"


# ----------------------------------------------------------------------------------------------
# Writing shards

_IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "ppm": "PPM"}


def _encode_member(suffix: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Image.Image):
        fmt = _IMAGE_FORMATS.get(suffix.rsplit(".", 1)[-1])
        if fmt is None:
            raise ConfigError(f"a PIL image needs an image suffix {IMAGE_EXTENSIONS}, got {suffix!r}")
        buffer = io.BytesIO()
        image = value.convert("RGB") if fmt in ("JPEG", "PPM", "BMP") and value.mode not in ("RGB", "L") else value
        image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buffer.getvalue()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise ConfigError(f"member {suffix!r} must be bytes, str, int, a PIL image or JSON data, got bool")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if suffix == JSON_SUFFIX or suffix.endswith(".json"):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise ConfigError(
        f"member {suffix!r} must be bytes, str, int, a PIL image or (for json) JSON data, "
        f"got {type(value).__name__}"
    )


def _write_tar(out: IO[bytes], samples: Iterable[dict[str, Any]]) -> int:
    count = 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
                raise ConfigError(f"__key__ must be a non-empty string without '.' in its basename, got {key!r}")
            for suffix, value in sample.items():
                if suffix.startswith("__") or value is None:
                    continue
                data = _encode_member(suffix, value)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0  # fixed metadata → same bytes for the same samples
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
            count += 1
    return count


def write_shard(
    path: str, samples: Iterable[dict[str, Any]], *, storage_options: dict[str, Any] | None = None
) -> int:
    """Write samples as a webdataset tar (local path or fsspec URL); return how many were written.

    Each sample is a dict with ``__key__`` and suffix → value (bytes; a PIL image for image
    suffixes; int for ``cls``; str for ``txt``; dict/list for ``json``); members are written in
    the dict's order, None values skipped. Same samples → same bytes (fixed mtime, uid, gid,
    mode). Local files are written to a temporary name and renamed, so a crash never leaves a
    half-written shard under the final name.
    """
    if path.startswith("pipe:"):
        raise ConfigError(f"write_shard cannot write to a pipe: URL, got {path!r}")
    if is_url(path):
        with fsspec.open(path, "wb", **(storage_options or {})) as out:
            return _write_tar(out, samples)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tar")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a shard is a normal file
        with os.fdopen(fd, "wb") as out:
            count = _write_tar(out, samples)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return count


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
