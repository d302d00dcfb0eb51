"""Verified download against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from seqexp.data.download import download
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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
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
