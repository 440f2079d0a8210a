"""Where the files a later step or another node reads live: the storage (``--storage URI`` / DDPS_STORAGE).

Without a storage, everything lives under DDPS_HOME, as on one machine. With one — an object store URI
``s3://bucket/prefix`` or ``gs://bucket/prefix`` (opened by ``pyarrow.fs.FileSystem.from_uri``, the filesystem
layer Ray Train itself uses) or an absolute folder (an NFS/EFS mount) — these live under it::

    <storage>/checkpoints/   base, stage 1, stage 2 and head checkpoints, each with its .sha256 sidecar
    <storage>/features/      feature caches (also kept in each node's DDPS_HOME, where they are memory-mapped)
    <storage>/ray/           Ray Train's run state and training-state checkpoints; ray/tune/ a sweep's Tune state
    <storage>/states/        single-process trainings' states (ddps train-base / train), removed once finished
    <storage>/spool/         metrics a worker could not send while MLflow was down, replayed by the driver

and DDPS_HOME becomes a per-node cache (datasets, the Hub cache, the MLflow spool) that a node may or may not
have. An S3-compatible server's endpoint is the URI's ``?endpoint_override=http://host:port`` or the usual
``AWS_ENDPOINT_URL``; credentials come from the usual AWS chain (environment, instance role), never the URI.

A file in an object store is a :class:`StoragePath`: the few methods of ``pathlib.Path`` that ddps uses on a
checkpoint (exists, read_bytes, write_bytes, name, with_name, ``/``), so the code that reads and writes
checkpoints takes either. ``str()`` of one is its full URI (query included), which any process reopens with
:func:`location`. An object is written in one PUT: it appears whole or not at all, as a rename does locally.

Core layer: pyarrow and the standard library only, never ray or mlflow.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ddps.errors import ConfigError, reason
from ddps.paths import cache_dir, writable_folder

STORAGE_VAR = "DDPS_STORAGE"
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")
SCHEMES = ("s3", "gs")  # object stores whose URI is scheme://bucket/key (what StoragePath rebuilds)
FOLDER_HINT = "give a writable absolute --storage folder, or s3://bucket/prefix"


class StoragePath:
    """A file or folder in an object store: a pyarrow filesystem, a path on it (``bucket/prefix/...``), and
    the URI's scheme and query (endpoint and other options) that reopen it in another process."""

    def __init__(self, filesystem, path: str, scheme: str, query: str = ""):
        self.fs, self.path, self.scheme, self.query = filesystem, path.rstrip("/"), scheme, query

    @classmethod
    def from_uri(cls, uri: str) -> "StoragePath":
        import pyarrow.fs
        parts = urlsplit(uri)
        if parts.scheme not in SCHEMES:
            raise ConfigError(f"{uri!r}: storage URIs are {' or '.join(f'{s}://bucket/prefix' for s in SCHEMES)} "
                              f"(or an absolute folder), not {parts.scheme}://")
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"location {uri!r} cannot be opened ({reason(e).splitlines()[0]}); give s3://bucket/"
                              f"prefix (endpoint: ?endpoint_override=http://host:port or AWS_ENDPOINT_URL), "
                              f"gs://bucket/prefix, or an absolute folder") from None
        except OSError as e:  # pyarrow asks the store for the bucket's region when the URI does not say it
            raise ConfigError(f"location {uri!r}: the store does not answer ({reason(e).splitlines()[0]}); check the "
                              f"endpoint and the credentials") from None
        return cls(filesystem, path, parts.scheme, parts.query)

    # ---- what pathlib.Path has --------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):  # pickled as its URI (a Ray task's argument): the filesystem is rebuilt there
        return (StoragePath.from_uri, (str(self),))

    def __truediv__(self, name: str) -> "StoragePath":
        return StoragePath(self.fs, posixpath.join(self.path, str(name)), self.scheme, self.query)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "StoragePath":
        return StoragePath(self.fs, posixpath.dirname(self.path), self.scheme, self.query)

    def with_name(self, name: str) -> "StoragePath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "StoragePath":
        return self.parent / (self.stem + suffix)

    def _type(self):
        import pyarrow.fs
        return self.fs.get_file_info(self.path).type, pyarrow.fs.FileType

    def exists(self) -> bool:
        kind, types = self._type()
        return kind != types.NotFound

    def is_file(self) -> bool:
        kind, types = self._type()
        return kind == types.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        """One object, written whole: an object store makes it visible only once complete."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.path)

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.create_dir(self.path, recursive=parents)

    def iterdir(self) -> list["StoragePath"]:
        import pyarrow.fs
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return [StoragePath(self.fs, info.path, self.scheme, self.query) for info in infos]

    def download(self, target: Path) -> Path:
        """A local copy at ``target``, written to a temporary name first and renamed."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with self.fs.open_input_stream(self.path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def upload(self, source: Path) -> None:
        with open(source, "rb") as src, self.fs.open_output_stream(self.path) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


Location = Path | StoragePath


def is_uri(value) -> bool:
    return isinstance(value, StoragePath) or "://" in str(value)


def location(value: str | os.PathLike | StoragePath) -> Location:
    """A checkpoint's place from a string: a URI (``s3://…``) is a StoragePath, anything else a local Path."""
    if isinstance(value, (StoragePath, Path)):
        return value
    return StoragePath.from_uri(str(value)) if is_uri(value) else Path(value)


def check_storage(uri: str, probe: bool = True) -> str:
    """``uri`` as the storage, checked before any compute: no credentials in it (they would be logged with the
    config), a folder must be absolute and writable, an object store must answer (its bucket exists, the
    credentials are accepted); else one ConfigError line. The URI, stripped of a trailing '/'."""
    uri = str(uri).strip().rstrip("/")
    if not uri:
        raise ConfigError("--storage is empty: give s3://bucket/prefix, gs://bucket/prefix or an absolute folder")
    if not is_uri(uri):
        if not os.path.isabs(uri):
            raise ConfigError(f"--storage {uri!r} is a relative folder; every node must find it at the same path: "
                              f"give an absolute folder (an NFS mount) or s3://bucket/prefix")
        writable_folder(Path(uri), "--storage folder", FOLDER_HINT)
        return uri
    options = dict(parse_qsl(urlsplit(uri).query))
    if any(key in options for key in SECRET_OPTIONS) or urlsplit(uri).password:
        raise ConfigError("--storage: credentials do not belong in the URI (it is logged with every run); give them "
                          "as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role")
    root = StoragePath.from_uri(uri)
    if not root.path.strip("/"):
        raise ConfigError(f"--storage {uri!r} names no bucket: give s3://bucket/prefix")
    if probe:
        bucket = root.path.split("/")[0]
        try:
            found = StoragePath(root.fs, bucket, root.scheme, root.query).exists()
        except OSError as e:
            raise ConfigError(f"--storage {uri}: the store does not answer ({reason(e).splitlines()[0]}); check the "
                              f"endpoint and the credentials") from None
        if not found:
            raise ConfigError(f"--storage {uri}: bucket {bucket!r} does not exist (or these credentials cannot see "
                              f"it); create it first")
    return uri


def storage_uri() -> str | None:
    """The storage this process uses: DDPS_STORAGE (set by --storage, handed to every Ray worker), or None."""
    return os.environ.get(STORAGE_VAR) or None


def use_storage(uri: str | None) -> str | None:
    """Make ``uri`` (checked) this process's storage and that of the Ray workers it starts; None: unchanged."""
    if uri:
        os.environ[STORAGE_VAR] = check_storage(uri)
    return storage_uri()


def folder(kind: str) -> Location:
    """Where files of ``kind`` (checkpoints, features, ray) live: under the storage when there is one, else
    under DDPS_HOME."""
    uri = storage_uri()
    if uri is None:
        return cache_dir(kind)
    if not is_uri(uri):
        return writable_folder(Path(uri) / kind, "storage folder", FOLDER_HINT)
    return StoragePath.from_uri(uri) / kind


def ray_storage(kind: str = "ray") -> tuple[str, object | None]:
    """Ray's ``storage_path`` and ``storage_filesystem`` for its run state under ``kind``: the storage's
    filesystem (its endpoint and options included, which a bare URI string would lose) and the path on it."""
    place = folder(kind)
    if isinstance(place, StoragePath):
        return place.path, place.fs
    return str(place), None


@contextlib.contextmanager
def local_copy(path: Location):
    """A local file with ``path``'s content and name, for what only reads local files (an MLflow artifact upload):
    ``path`` itself when local, else a download into a temporary folder removed afterwards."""
    path = location(path)
    if not isinstance(path, StoragePath):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ddps-") as tmp:
        yield path.download(Path(tmp) / path.name)


def fetch(shared: Location | None, local: Path) -> bool:
    """Copy ``shared`` to ``local`` when the local copy is missing and the storage has it; whether it did."""
    if shared is None or local.exists() or not shared.exists():
        return False
    if isinstance(shared, StoragePath):
        shared.download(local)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        shutil.copyfile(shared, tmp)
        os.replace(tmp, local)
    return True


def publish(local: Path, shared: Location | None) -> None:
    """Copy ``local`` to ``shared`` unless the storage has it already (content-addressed: same name, same bytes)."""
    if shared is None or shared.exists():
        return
    if isinstance(shared, StoragePath):
        shared.upload(local)
    else:
        tmp = shared.with_name(f".{shared.name}.{os.getpid()}.part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, shared)
