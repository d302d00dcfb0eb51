"""Verified download against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from seqexp.data.download import cache_name, download
from seqexp.errors import UserError

PAYLOAD = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200
GOOD = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    """Serves /good, /tampered (one byte flipped) and /truncated (promises more than it sends)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, length = PAYLOAD, len(PAYLOAD)
            if self.path == "/tampered":
                body = b"X" + PAYLOAD[1:]
            elif self.path == "/truncated":
                body = PAYLOAD[: len(PAYLOAD) // 2]
            elif self.path != "/good":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)  # shutdown() waits a poll
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_good_download_is_verified_and_cached(server, tmp_path):
    dest = tmp_path / "cache" / "input.txt"
    assert download(f"{server}/good", dest, GOOD, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["input.txt"]
    # second call: verified copy on disk, no request (a dead URL proves it)
    assert download("http://127.0.0.1:9/none", dest, GOOD, progress=False) == dest


@pytest.mark.parametrize("path,match", [("tampered", "checksum mismatch"), ("truncated", "cut off|checksum")])
def test_bad_download_leaves_nothing_that_looks_complete(server, tmp_path, path, match):
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(UserError, match=match):
        download(f"{server}/{path}", dest, GOOD, progress=False)
    assert leftovers(dest.parent) == []


def test_offline_error_names_url_and_data_path(tmp_path):
    with pytest.raises(UserError, match=r"http://127\.0\.0\.1:9/x.*data\.path"):
        download("http://127.0.0.1:9/x", tmp_path / "x", GOOD, progress=False, timeout=2)


def test_stale_cached_copy_is_replaced(server, tmp_path):
    dest = tmp_path / "input.txt"
    dest.write_bytes(b"old and wrong")
    download(f"{server}/good", dest, GOOD, progress=False)
    assert dest.read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- retries
@pytest.fixture
def flaky(monkeypatch):
    """A server whose /flaky fails the first `fail` requests (`how`: 503, reset, cut, timeout),
    then serves PAYLOAD. Yields (base url, settings dict, request log)."""
    settings, seen = {"fail": 0, "how": "503"}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            if self.path == "/missing":
                self.send_error(404)
                return
            if len(seen) <= settings["fail"]:
                how = settings["how"]
                if how == "503":
                    self.send_error(503)
                elif how == "reset":  # close the connection without an answer
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)
                elif how == "cut":  # promise everything, send half, hang up
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                elif how == "timeout":
                    threading.Event().wait(1.0)  # longer than the client's timeout
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()  # shutdown() waits a poll
    yield f"http://127.0.0.1:{httpd.server_address[1]}", settings, seen
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("how", ["503", "reset", "cut", "timeout"])
def test_transient_errors_are_retried_from_the_start(flaky, tmp_path, how):
    base, settings, seen = flaky
    settings.update(fail=2, how=how)
    dest = tmp_path / "cache" / "input.txt"
    assert download(f"{base}/flaky", dest, GOOD, progress=False, timeout=0.3) == dest
    assert dest.read_bytes() == PAYLOAD and len(seen) == 3  # two failures, then a whole new download
    assert leftovers(dest.parent) == ["input.txt"]  # no partial file, no lock file


def test_retries_are_bounded_and_end_in_one_line(flaky, tmp_path):
    base, settings, seen = flaky
    settings.update(fail=100, how="503")
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(UserError, match=r"HTTP 503.*tried 3 times.*data\.path") as e:
        download(f"{base}/flaky", dest, GOOD, progress=False, retries=2)
    assert "\n" not in str(e.value) and len(seen) == 3
    assert leftovers(dest.parent) == []


def test_permanent_errors_fail_at_once(flaky, tmp_path):
    base, settings, seen = flaky
    with pytest.raises(UserError, match=r"/missing \(HTTP 404 .*data\.path") as e:
        download(f"{base}/missing", tmp_path / "x", GOOD, progress=False)
    assert "\n" not in str(e.value) and seen == ["/missing"]


@pytest.mark.parametrize("url,name", [
    ("https://h/a/corpus.txt?x=1", "corpus.txt"), ("https://h/", "D"), ("https://h/a/..", "D"),
    ("https://h/a/.", "D"), ("https://h/.bashrc", "D"), ("https://h/%2e%2e", "D"), ("https://h/a%2F..%2F..%2Fx", "x"),
])
def test_cache_names_stay_in_the_cache(url, name):
    assert cache_name(url, "D") == name


def test_char_data_from_a_url_with_a_dotdot_name_writes_in_the_cache(flaky, tmp_path):
    from seqexp.data.char import CharData

    CharData(seed=0, source=f"{flaky[0]}/x/..", sha256=GOOD, cache_dir=str(tmp_path / "c"), batch_size=2, seq_len=8)
    assert leftovers(tmp_path) == ["c"] and leftovers(tmp_path / "c" / "char") == ["corpus.txt"]


def test_concurrent_downloads_of_one_file_fetch_it_once(flaky, tmp_path):
    base, settings, seen = flaky
    settings.update(fail=1, how="503")  # the first try fails: the other caller must still wait, not fetch
    dest = tmp_path / "cache" / "input.txt"
    results = []
    threads = [threading.Thread(target=lambda: results.append(download(f"{base}/flaky", dest, GOOD, progress=False)))
               for _ in range(3)]  # flock: separate open files conflict like separate processes
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [dest] * 3 and len(seen) == 2  # one failed try, one download, for all three
    assert leftovers(dest.parent) == ["input.txt"]
