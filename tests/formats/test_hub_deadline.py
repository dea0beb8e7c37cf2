"""The total deadline of a hub download holds to half a second, whatever the server does.

A server on 127.0.0.1 answers cfg.json slowly in four ways: it drips its status line, or
its headers, one byte every 0.1 s (each byte resets the socket's timeout, so only the
deadline's timer ends the request); it sends part of a body and then stalls just before
the deadline (one more socket wait of the full timeout would double it); or it drips a
chunked body one byte at a time. Each download ends within the deadline + 0.5 s, with one
error line naming the URL, and leaves nothing in the cache, no `.part` file either."""

import http.server
import threading
import time

import pytest
from conftest import serving  # pytest puts tests/ on sys.path
import torch

from minisae import formats
from minisae.cli import entry
from minisae.models.http import Deadline, HTTPFailure, stream
from minisae.models.hub import hub_url

DEADLINE, MARGIN, DRIP = 1.5, 0.5, 0.1
BODY = b'{"d_in": 8, "d_sae": 16, "architecture": "standard"}'


class Dripping(http.server.BaseHTTPRequestHandler):
    """A handler that can write its answer one byte every DRIP seconds (`drip`), until the
    client gives up or `stop` is set (also the chat endpoint's slow server)."""
    protocol_version = "HTTP/1.1"
    stop = threading.Event()

    def log_message(self, *args):
        pass

    def drip(self, data: bytes):
        for b in data:
            if self.stop.wait(DRIP):
                return
            try:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
            except OSError:  # the client gave up: what the test wants
                return


class Slow(Dripping):
    """/t/MODE/resolve/main/sae/FILE, slow in MODE's way for every request."""
    stop = threading.Event()

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        mode = self.path.split("/")[2]
        if mode == "status":  # the status line, a byte at a time, without end
            self.drip(b"HTTP/1.1 200 OK" + b" " * 10_000)
            return
        if mode == "headers":  # a good status line, then one header that never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.drip(b"X-Pad: " + b"a" * 10_000)
            return
        self.send_response(200)
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head:  # one-byte chunks ('1\r\nX\r\n'), dripped, far more than the deadline allows
                self.drip(b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in BODY * 20))
            return
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if mode == "late-stall" and not head:  # half the body just before the deadline, then silence
            self.stop.wait(DEADLINE - 0.3)
            self.drip(BODY[:1])
            self.stop.wait(30)


@pytest.fixture(scope="module")
def server():
    with serving(Slow) as url:
        yield url


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    return server


MODES = ["status", "headers", "late-stall", "chunked"]


@pytest.mark.parametrize("mode", MODES)
def test_the_deadline_holds_through_convert(hub, tmp_path, capsys, mode):
    url = hub_url(f"t/{mode}", "sae/cfg.json")
    t0 = time.monotonic()
    assert entry(["convert", f"hf:t/{mode}/sae", str(tmp_path / "out"), "--timeout", str(DEADLINE)]) == 2
    took = time.monotonic() - t0
    assert took < DEADLINE + MARGIN, f"{mode}: {took:.2f} s for a deadline of {DEADLINE} s"
    err = capsys.readouterr().err.strip().splitlines()  # a progress line of the body, then the error
    assert [line for line in err if "error" in line] == err[-1:], err
    assert err[-1].startswith(f"minisae: error: {url}: timed out"), err
    assert not (tmp_path / "out").exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # nothing cached, no .part


@pytest.mark.parametrize("mode", MODES)
def test_stream_ends_at_its_deadline(server, mode):
    """One GET through stream(): the HTTPFailure says 'timed out' and names the URL."""
    url = f"{server}/t/{mode}/resolve/main/sae/cfg.json"
    got = bytearray()
    t0 = time.monotonic()
    with pytest.raises(HTTPFailure) as e:
        stream(url, Deadline(DEADLINE), 1e9, got.extend)
    assert time.monotonic() - t0 < DEADLINE + MARGIN
    assert str(e.value).startswith(f"{url}: timed out") and e.value.transient


def test_a_fast_answer_is_not_cut(server, tmp_path, monkeypatch, random_sae):
    """The timer of a finished request never fires on the next one (a good file, twice)."""
    folder = tmp_path / "sae"
    formats.save(random_sae("relu", 8, 16, dtype=torch.float32), folder, model="gpt2", hook="blocks.1.hook_resid_post")
    data = (folder / "cfg.json").read_bytes()

    class Good(Slow):
        def answer(self, head):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Good)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cfg.json"
        for _ in range(2):
            got = bytearray()
            assert stream(url, Deadline(0.5), 1e6, got.extend) == len(data) and bytes(got) == data
        time.sleep(0.6)  # past both deadlines: their timers were cancelled, nothing fires late
    finally:
        httpd.shutdown()
        httpd.server_close()
