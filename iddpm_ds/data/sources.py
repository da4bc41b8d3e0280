"""Shard sources: patterns, lists and index files -> an exact list of (url, sample count).

Every rank resolves the same source to the same `ShardList` without talking to the
others, so all of them can plan an epoch identically. Counts come from the index file
(written by `iddpm-shards`); local shards without an index are counted by reading
their tar headers; remote shards need an index.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence
from urllib.parse import unquote, urljoin, urlparse

from braceexpand import braceexpand

from .errors import EmptySourceError, PipeNotAllowedError, ShardNotFoundError
from .http import HttpOptions, HttpReader, fetch, is_http
from .tario import count_samples

INDEX_FORMAT = "iddpm_ds-shards-v1"
"""Value of the "format" key of index files written by `iddpm-shards`."""
INDEX_NAME = "index.json"
"""File name of the index the writer puts next to its shards."""
_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class ShardList:
    """The resolved shards of one split, in canonical order, with exact sample counts."""

    urls: tuple[str, ...]
    """Openable urls: local paths, http(s) urls or `pipe:` commands."""
    counts: tuple[int, ...]
    """Samples in each shard."""
    class_names: tuple[str, ...] | None = None
    """Class names by label id, when an index provides them."""
    image_size: int | None = None
    """Side of the stored images when the writer resized them (None: original sizes)."""
    names: tuple[str, ...] = field(default=())
    """Urls as the user wrote them (for messages and logs)."""
    http: HttpOptions = field(default=HttpOptions())
    """Retries and timeouts of http(s) reads (not part of the fingerprint)."""

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        """Hash of names and counts: a saved data position only applies to the same list."""
        text = json.dumps([list(self.names or self.urls), list(self.counts)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "s3://"))


def openable_url(url: str, allow_pipe: bool) -> str:
    """Local path for local/`file:` urls; http(s) urls as they are (read by http.py); a
    `pipe:` command for pipe and s3 urls.

    `pipe:` runs a shell command, so it (and s3://, which needs one) is refused unless the
    spec opts in with allow_pipe.
    """
    scheme = urlparse(url).scheme
    if url.startswith("file:"):
        return unquote(urlparse(url).path)
    if not is_remote(url):
        if scheme and len(scheme) > 1:  # one letter: a Windows drive, not a scheme
            raise EmptySourceError(f"unsupported shard url scheme {scheme!r} in {url!r}; use a "
                                   "local path, file:, pipe:, http(s):// or s3://")
        return url
    if is_http(url):
        return url
    if not allow_pipe:
        raise PipeNotAllowedError(
            f"shard url {url!r} needs a shell command (pipe:); set data.allow_pipe: true to "
            "allow the spec to run commands")
    if url.startswith("pipe:"):
        return url
    return f"pipe:aws s3 cp --quiet {shlex.quote(url)} -"


def open_url(url: str, http: HttpOptions = HttpOptions()) -> tuple[BinaryIO, bool]:
    """Open an openable url for reading -> (file object, seekable)."""
    if is_http(url):
        return HttpReader(url, http), False
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen  # runs the command; checks its exit status on close

        # Slurm's SIGTERM reaches every process of the step: a killed command would turn the
        # rest of its shard into replaced samples. Like the workers (worker_signals.py), the
        # command ends when its reader closes the pipe (SIGPIPE), or at SIGKILL. An ignored
        # signal stays ignored across exec, so the whole command inherits it.
        return gopen(f"pipe:trap '' TERM; {url[5:]}", "rb"), False
    return open(url, "rb", buffering=_READ_BUFFER), True


def expand(source: str | Sequence[str]) -> list[str]:
    """Brace-expand a pattern or each entry of a list; order preserved, duplicates kept."""
    items = [source] if isinstance(source, str) else list(source)
    return [url for item in items for url in braceexpand(item)]


def is_index(source: str | Sequence[str]) -> bool:
    return isinstance(source, str) and source.split("#", 1)[0].endswith(".json")


def resolve(source: str | Sequence[str], allow_pipe: bool, split: str,
            http: HttpOptions = HttpOptions()) -> ShardList:
    """Resolve a spec's shard source to a checked ShardList (raises DataError subclasses).

    `split` picks the split of an index file without a "#split" suffix; `http` is how
    http(s) reads (the index's and later the shards') retry and time out.
    """
    if is_index(source):
        shards = load_index(source, split, allow_pipe, http)
    else:
        names = expand(source)
        if not names:
            raise EmptySourceError(f"shard source {source!r} expands to no shards")
        urls = [openable_url(name, allow_pipe) for name in names]
        _check_local_exist(urls, names)
        counts = _sibling_index_counts(urls) or [_count(u, n) for u, n in zip(urls, names)]
        shards = ShardList(tuple(urls), tuple(counts), names=tuple(names), http=http)
    if shards.total == 0:
        raise EmptySourceError(f"shard source {source!r} holds {len(shards.urls)} shards "
                               "but no samples")
    return shards


def _check_local_exist(urls: Sequence[str], names: Sequence[str]) -> None:
    for url, name in zip(urls, names):
        if not is_remote(url) and os.path.isdir(url):
            raise EmptySourceError(_folder_hint(Path(url), name))
    missing = [name for url, name in zip(urls, names)
               if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardNotFoundError(f"{len(missing)} of {len(urls)} shard files are missing: "
                                 f"{', '.join(missing[:3])}{more}")


def _folder_hint(folder: Path, name: str) -> str:
    """A source that names a folder: say what to name instead."""
    if (folder / INDEX_NAME).is_file():
        return (f"{name!r} is a folder; name its index file instead: "
                f"{os.path.join(name, INDEX_NAME)}")
    tars = sorted(p.name for p in folder.glob("*.tar"))
    if tars:
        return (f"{name!r} is a folder of {len(tars)} .tar files ({tars[0]} .. {tars[-1]}) "
                "without an index; name them with a brace pattern (dir/train-{000000..000009}"
                ".tar) or write an index with `iddpm-shards index`")
    return (f"no .tar shards in folder {name!r}; write some there with iddpm-shards "
            f"(e.g. `iddpm-shards folder IMAGES -o {name}`)")


def _count(url: str, name: str) -> int:
    if is_remote(url):
        raise EmptySourceError(
            f"remote shard {name!r} has no known sample count: pass the index file written by "
            "iddpm-shards (or `iddpm-shards index`) instead of a pattern")
    with open(url, "rb", buffering=_READ_BUFFER) as fh:
        # A damaged archive counts the samples before the damage; reading logs the rest.
        return count_samples(fh, seekable=True, strict=False)


def _sibling_index_counts(urls: Sequence[str]) -> list[int] | None:
    """Counts from an index.json next to local shards that lists all of them, if any."""
    if any(is_remote(url) for url in urls):
        return None
    folders = {os.path.dirname(os.path.abspath(url)) for url in urls}
    if len(folders) != 1:
        return None
    path = Path(folders.pop()) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        known = {os.path.abspath(path.parent / s["url"]): int(s["samples"])
                 for part in index["splits"].values() for s in part["shards"]}
        return [known[os.path.abspath(url)] for url in urls]
    except (KeyError, TypeError, ValueError):
        return None


def load_index(source: str, split: str, allow_pipe: bool,
               http: HttpOptions = HttpOptions()) -> ShardList:
    """Read an index file ("path.json" or "path.json#split", local or http(s)); shard urls
    relative to it."""
    path_text, _, wanted = source.partition("#")
    text, base = _index_text(path_text, http)
    try:
        index = json.loads(text)
        splits = index["splits"]
    except (ValueError, KeyError, TypeError) as err:
        raise EmptySourceError(f"{path_text!r} is not an iddpm-shards index: {err}") from err
    name = wanted or split
    if not wanted and name not in splits and len(splits) == 1:
        name = next(iter(splits))  # a single-split index serves any reader
    if name not in splits:
        raise EmptySourceError(f"index {path_text!r} has no split {name!r} "
                               f"(splits: {sorted(splits)})")
    entries = splits[name]["shards"]
    if not entries:
        raise EmptySourceError(f"split {name!r} of index {path_text!r} lists no shards")
    names = [_join(base, e["url"]) for e in entries]
    urls = [openable_url(n, allow_pipe) for n in names]
    _check_local_exist(urls, names)
    classes = index.get("class_names")
    return ShardList(tuple(urls), tuple(int(e["samples"]) for e in entries),
                     tuple(classes) if classes else None, index.get("image_size"), tuple(names),
                     http)


def _index_text(path_text: str, http: HttpOptions) -> tuple[str, str]:
    """The index file's text and the base its relative shard urls resolve against."""
    if is_http(path_text):
        try:
            return fetch(path_text, http).decode("utf-8", "replace"), path_text
        except OSError as err:
            raise ShardNotFoundError(f"index {path_text!r} cannot be read: {err}") from None
    if is_remote(path_text):
        raise EmptySourceError(f"index file {path_text!r} must be a local path, file: or "
                               "http(s):// url (its shard urls may be remote)")
    path = Path(openable_url(path_text, allow_pipe=False))
    if not path.is_file():
        raise ShardNotFoundError(f"index file {path_text!r} does not exist "
                                 "(write one with iddpm-shards)")
    return path.read_text(), str(path.parent)


def _join(base: str, url: str) -> str:
    if is_http(base) and not urlparse(url).scheme:
        return urljoin(base, url)  # relative to the index url, as a browser would
    if is_remote(url) or url.startswith("file:") or os.path.isabs(url):
        return url
    return str(Path(base) / url)
