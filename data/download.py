"""Fetch and unpack nature_12K.zip safely: resumable download, verified size, zip-slip and
zip-bomb checks, extraction into a temporary folder renamed into place, one downloader per
machine (the others wait on a file lock and reuse its result)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from filelock import FileLock
from tqdm import tqdm

from .errors import DatasetError
from .folder import resolve_folders

DEFAULT_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
# SHA-256 of files whose digest is known; checked when present, else the size the server
# announced is what is verified.
KNOWN_SHA256: dict[str, str] = {}
MAX_UNPACKED_BYTES = 64 * 2**30  # far above iNat-12K's ~3.7 GB; anything larger is refused
MAX_RATIO = 200  # unpacked/packed bytes of one member; JPEGs barely compress, bombs reach 1000+
CHUNK = 1 << 20
RETRIES = 3


def has_dataset(path: Path) -> bool:
    try:
        resolve_folders(path)
    except DatasetError:
        return False
    return True


def lock_path(target: Path) -> Path:
    """The lock file for target, in the temporary folder (never left beside the data: a failed
    download used to leave nature_12K.lock in the working folder); one per user and folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "")
    digest = hashlib.sha1(os.fsencode(target.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"inat12k-{user}-{digest}.lock"


@contextlib.contextmanager
def writable_lock(target: Path, fix: str):
    """The file lock beside target (one process unpacks or downloads, the others wait), or one
    line naming the folder when it cannot be written (a read-only share, a parent without
    permission)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".{target.name}.write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        lock = FileLock(str(lock_path(target)))
        lock.acquire()
    except OSError as error:
        raise DatasetError(f"cannot write in '{target.parent}' ({error.strerror or error}); {fix}") from None
    try:
        yield
    finally:
        lock.release()


def ensure_dataset(data_dir: str | os.PathLike, url: str = DEFAULT_URL, download: bool = True,
                   keep_zip: bool = False, timeout: float = 30.0) -> Path:
    """A folder holding the data set: data_dir itself, the folder a .zip data_dir unpacks to,
    or data_dir after downloading url into it."""
    path = Path(data_dir).expanduser()
    if path.suffix.lower() == ".zip" and path.is_file():
        target = path.with_suffix("")
        if not has_dataset(target):
            with writable_lock(target, f"unzip '{path}' into a writable folder and pass that as --data_dir"):
                if not has_dataset(target):
                    extract_zip(path, target)
        return target
    if has_dataset(path) or not download:
        resolve_folders(path)  # raises the precise reason when it is not usable
        return path
    with writable_lock(path, "pass a --data_dir in a folder you can write to"):
        if has_dataset(path):  # another process finished it while we waited
            return path
        if path.exists() and any(path.iterdir()):
            raise DatasetError(f"data_dir '{path}' exists but holds no train/ and val/; empty it or pick a new "
                               "--data_dir so the data set can be downloaded there")
        zip_path = path.with_name(path.name + ".zip")
        if not zip_path.is_file():
            fetch(url, zip_path, timeout)
        try:
            extract_zip(zip_path, path)
        except DatasetError:
            zip_path.unlink(missing_ok=True)  # a bad download must not be trusted next time
            raise
        if not keep_zip:
            zip_path.unlink(missing_ok=True)
    return path


def fetch(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download url to dest through dest.part, resuming with HTTP Range after a cut."""
    part = dest.with_name(dest.name + ".part")
    how_to = (f"download {url} by hand and pass --data_dir pointing at the zip or the folder it unzips to")
    total = None
    for attempt in range(1, RETRIES + 1):
        try:
            total = _fetch_once(url, part, timeout)
        except urllib.error.HTTPError as error:
            raise DatasetError(f"download of {url} failed: HTTP {error.code} {error.reason}; {how_to}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            if attempt == RETRIES:
                raise DatasetError(f"download of {url} failed ({reason}); check the network and run again "
                                   f"(it resumes), or {how_to}") from None
            if part.exists():  # say so only when there is something to resume
                print(f"download interrupted ({reason}); resuming (try {attempt + 1} of {RETRIES})", file=sys.stderr)
            time.sleep(min(2 ** attempt, 10) * 0.1)
            continue
        if total is None or part.stat().st_size >= total:
            break
        print(f"download stopped at {part.stat().st_size:,} of {total:,} bytes; resuming", file=sys.stderr)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DatasetError(f"download of {url} stopped at {size:,} of {total:,} bytes; run again to resume")
    expected = KNOWN_SHA256.get(url)
    if expected and sha256(part) != expected:
        part.unlink()
        raise DatasetError(f"download of {url} has the wrong SHA-256 (corrupt or changed); run again, or {how_to}")
    os.replace(part, dest)


def _fetch_once(url: str, part: Path, timeout: float) -> int | None:
    """One request from where part ends; returns the full size if the server says it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to send: part is already whole
            return have
        raise
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        content_range = response.headers.get("Content-Range", "")
        total = None
        if content_range and "/" in content_range and not content_range.endswith("*"):
            total = int(content_range.rsplit("/", 1)[1])
        elif length is not None:
            total = have + int(length)
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"downloading {PurePosixPath(url).name}", disable=None) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DatasetError(f"zip member '{name}' would be written outside the target folder; refusing this zip")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(f"zip member '{name}' is a symbolic link; refusing this zip")
    if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > CHUNK:
        raise DatasetError(f"zip member '{name}' unpacks {info.file_size / info.compress_size:.0f}x its packed size "
                           "(a zip bomb?); refusing this zip")


def extract_zip(zip_path: Path, target: Path) -> None:
    """Check every member, then unpack into a temporary sibling folder and rename it to target,
    so an interrupted unzip never leaves a folder that looks complete."""
    tmp = target.with_name(f".{target.name}.extracting-{os.getpid()}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(f"cannot unpack '{zip_path}' into '{target}': it exists and is not an empty folder; "
                           "move it away or unzip by hand")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            for info in members:
                _check_member(info)
            unpacked = sum(info.file_size for info in members)
            packed = sum(info.compress_size for info in members)
            # Many small members can each stay under the per-member check: look at the whole too.
            if unpacked > 64 * CHUNK and unpacked > MAX_RATIO * max(packed, 1):
                raise DatasetError(f"'{zip_path}' unpacks {unpacked / max(packed, 1):.0f}x its packed size in all "
                                   f"({unpacked / 2**20:.0f} MiB from {packed / 2**20:.1f} MiB; a zip bomb?); refusing this zip")
            free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
            if unpacked > MAX_UNPACKED_BYTES or unpacked > free:
                raise DatasetError(f"'{zip_path}' unpacks to {unpacked / 2**30:.1f} GiB but only "
                                   f"{free / 2**30:.1f} GiB are free (limit {MAX_UNPACKED_BYTES / 2**30:.0f} GiB); "
                                   "free some space or unzip it elsewhere and pass --data_dir")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for info in tqdm(members, desc=f"extracting {zip_path.name}", unit="file", disable=None):
                archive.extract(info, tmp)  # member names were checked above
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"'{zip_path}' is not a valid zip ({error}); delete it and download again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not has_dataset(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"'{zip_path}' does not hold a data set (train/ and val/ class folders, or "
                           "inaturalist_12K/); check the file or --data_url")
    if target.exists():
        target.rmdir()  # empty (checked by the caller); a non-empty one makes this fail loudly
    os.replace(tmp, target)
