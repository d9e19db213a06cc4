"""Download and extraction against a local HTTP server on 127.0.0.1 only."""

import io
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import trainA
from conftest import ROOT, TINY_ARGS, assert_one_line_error, make_dataset, run_main
from data import DatasetError, ensure_dataset
from data.download import extract_zip


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> bytes:
    root = make_dataset(tmp_path_factory.mktemp("src") / "nature_12K", train_per_class=8, test_per_class=3, nested=True)
    return zip_folder(root / "inaturalist_12K")


class Server:
    """Serves self.files with Range support; can cut a response half-way or go slowly."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.cut_first = False
        self.delay = 0.0
        self.gate = threading.Event()  # responses wait until it is set (set unless a test clears it)
        self.gate.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range", "")))
                server.gate.wait(120)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_first:
                    server.cut_first = False
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                for i in range(0, len(payload), 16384):
                    self.wfile.write(payload[i:i + 16384])
                    time.sleep(server.delay)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[str]:
        return [rng for p, rng in self.requests if p == path]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_download_extract_and_train(server, dataset_zip, tmp_path):
    server.files["/nature_12K.zip"] = dataset_zip
    data_dir = tmp_path / "fresh" / "nature_12K"
    out = tmp_path / "runs"
    code = trainA.main(["--data_dir", str(data_dir), "--data_url", server.url("/nature_12K.zip"), "-e", "1",
                        "--output_dir", str(out), *TINY_ARGS])
    assert code == 0
    assert (data_dir / "inaturalist_12K" / "train" / "fungi").is_dir()
    assert not list(data_dir.parent.glob("*.zip*"))  # zip and .part removed unless --keep_zip
    assert not list(data_dir.parent.glob(".*extracting*"))
    assert len(server.gets("/nature_12K.zip")) == 1
    # A second run finds the data and downloads nothing.
    assert ensure_dataset(data_dir, server.url("/nature_12K.zip")) == data_dir
    assert len(server.gets("/nature_12K.zip")) == 1


def test_cut_off_transfer_is_resumed_with_a_range_request(server, dataset_zip, tmp_path):
    server.files["/d.zip"] = dataset_zip
    server.cut_first = True
    data_dir = ensure_dataset(tmp_path / "d", server.url("/d.zip"), keep_zip=True)
    ranges = server.gets("/d.zip")
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert (tmp_path / "d.zip").read_bytes() == dataset_zip
    assert (data_dir / "inaturalist_12K" / "val" / "insecta").is_dir()


def test_a_part_file_left_by_a_killed_run_is_resumed(server, dataset_zip, tmp_path):
    server.files["/d.zip"] = dataset_zip
    (tmp_path / "d.zip.part").write_bytes(dataset_zip[:1000])
    ensure_dataset(tmp_path / "d", server.url("/d.zip"), keep_zip=True)
    assert server.gets("/d.zip") == ["bytes=1000-"]
    assert (tmp_path / "d.zip").read_bytes() == dataset_zip


def test_zip_path_as_data_dir_is_extracted_next_to_it(dataset_zip, tmp_path):
    (tmp_path / "nature_12K.zip").write_bytes(dataset_zip)
    assert ensure_dataset(tmp_path / "nature_12K.zip", download=False) == tmp_path / "nature_12K"
    assert (tmp_path / "nature_12K" / "inaturalist_12K" / "train").is_dir()


def evil_zip(path: Path, name: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("inaturalist_12K/train/a/x.jpg", b"x")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if symlink else "owned")
    return path


@pytest.mark.parametrize("name,symlink,needle", [
    ("../evil.txt", False, "outside the target folder"),
    ("inaturalist_12K/../../evil.txt", False, "outside the target folder"),
    ("/tmp/evil-absolute.txt", False, "outside the target folder"),
    ("inaturalist_12K/train/a/link.jpg", True, "symbolic link"),
])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, name, symlink, needle):
    archive = evil_zip(tmp_path / "evil.zip", name, symlink)
    with pytest.raises(DatasetError, match=needle):
        extract_zip(archive, tmp_path / "out" / "data")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "out" / "data").exists()
    assert not list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else True


def test_zip_bomb_member_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inaturalist_12K/train/a/bomb.jpg", b"\0" * (20 * 2**20))
    with pytest.raises(DatasetError, match="zip bomb"):
        extract_zip(tmp_path / "bomb.zip", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_corrupt_download_is_one_line_and_leaves_no_data_folder(server, tmp_path):
    server.files["/bad.zip"] = b"PK\x03\x04 this is not really a zip" * 100
    url = server.url("/bad.zip")
    result = run_main("trainA.py", "--data_dir", str(tmp_path / "bad"), "--data_url", url, "-e", "1", *TINY_ARGS)
    assert_one_line_error(result, "is not a valid zip", "download again")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.zip").exists()
    assert not list(tmp_path.glob(".bad.extracting*"))


def test_unreachable_url_fails_with_one_line(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_main("trainA.py", "--data_dir", str(tmp_path / "x"), "--data_url",
                        f"http://127.0.0.1:{port}/nature_12K.zip", "-e", "1", *TINY_ARGS)
    assert_one_line_error(result, "download of http://127.0.0.1", "failed", "--data_dir")


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(DatasetError, match="HTTP 404"):
        ensure_dataset(tmp_path / "x", server.url("/missing.zip"))
    assert not list(tmp_path.iterdir())  # no x.lock (or anything else) left beside the data after a failure


def test_two_processes_starting_together_download_once(server, dataset_zip, tmp_path):
    """The overlap is made, not hoped for: the server holds the download until both processes
    have looked for the data set and found none; then one downloads and the other, waiting on the
    lock, finds it there."""
    server.files["/n.zip"] = dataset_zip
    server.gate.clear()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import data.download as d\n"
            "real, seen = d.has_dataset, []\n"
            "def watched(path):\n"
            "    seen.append(real(path))\n"
            "    if len(seen) == 1: print('looked', flush=True)\n"
            "    return seen[-1]\n"
            "d.has_dataset = watched\n"
            "d.ensure_dataset(sys.argv[2], sys.argv[3]); print(seen, flush=True)\n")
    args = [sys.executable, "-c", code, str(ROOT), str(tmp_path / "n"), server.url("/n.zip")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "looked"
    server.gate.set()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    downloader, waiter = sorted(out.strip() for out, _ in results)
    assert downloader.startswith("[False, False") and waiter == "[False, True]", results  # looked, waited, found
    assert len(server.gets("/n.zip")) == 1
    assert (tmp_path / "n" / "inaturalist_12K" / "train").is_dir()
