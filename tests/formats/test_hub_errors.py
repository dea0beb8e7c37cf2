"""Every way a hub download can go wrong ends as one line naming the URL, exit status 2,
and nothing in the cache but verified files.

A local server on 127.0.0.1 stands in for the hub. `convert hf:t/MODE/sae OUT` asks it for
MODE's sae/cfg.json and sae/sae_weights.safetensors; MODE names what goes wrong with one of
them (an error status, a body cut short, a huge Content-Length, a redirect loop, a stalled
or dripping server, a status line that is not HTTP, an HTML page where a file should be,
a connection closed without an answer, or no server at all), the other file is served
as it should be. A seeded Hypothesis search then answers cfg.json with random statuses,
headers and bodies; a download killed half-way (minisae.utils.crash_point) leaves a
`.part` file that the next run removes."""

import hashlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import serving  # pytest puts tests/ on sys.path
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisae import formats
from minisae.cli import entry
from minisae.models.hub import hub_url

FILES = ("cfg.json", "sae_weights.safetensors")


class Hub(http.server.BaseHTTPRequestHandler):
    """/t/MODE/resolve/main/sae/FILE: the good file, unless MODE is 'FAULT-FILE' for this FILE."""
    good = {}  # file name -> bytes
    fuzz = None  # (status, content_length, body) for /t/fuzz/.../cfg.json
    stop = threading.Event()

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        mode, name = self.path.split("/")[2], self.path.rsplit("/", 1)[1]
        fault = mode.rsplit("-", 1)[0] if mode.endswith("-" + name.split(".")[0]) else None
        body = self.good.get(name, b"")
        if mode == "fuzz" and name == "cfg.json":
            status, length, body = self.fuzz
            self.send_response(status)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        if fault in ("404", "500", "503"):
            return self.send_error(int(fault))
        if fault == "redirect":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if fault == "garbage":
            return self.wfile.write(b"HELLO THERE\r\n\r\n")
        if fault == "close":
            return  # the connection closes without a word
        if fault == "stall":
            self.stop.wait(10)
            return
        self.send_response(200)
        if fault == "html":
            body = b"<!DOCTYPE html><html><body>Rate limited, try later</body></html>"
        if fault == "huge":
            self.send_header("Content-Length", str(10 ** 15))
        elif fault != "drip":
            self.send_header("Content-Length", str(len(body)))
        if name.endswith(".safetensors") and fault != "html":
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.end_headers()
        if head:
            return
        if fault == "truncated":
            return self.wfile.write(body[:len(body) // 2])
        if fault == "drip":
            for b in body[:50]:
                if self.stop.wait(0.2):
                    return
                self.wfile.write(bytes([b]))
                self.wfile.flush()
            return
        self.wfile.write(body[:64] if fault == "huge" else body)


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_sae_module):
    folder = tmp_path_factory.mktemp("hub") / "sae"
    formats.save(random_sae_module, folder, model="gpt2", hook="blocks.1.hook_resid_post")
    Hub.good = {name: (folder / name).read_bytes() for name in FILES}
    with serving(Hub) as url:
        yield url


@pytest.fixture(scope="module")
def random_sae_module():
    from conftest import _random_sae
    return _random_sae("relu", 8, 16, dtype=torch.float32)


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server)
    monkeypatch.setenv("MINISAE_CACHE", str(tmp_path / "cache"))
    return server


def cached(tmp_path):
    """Every file in the cache, by name (temporaries included)."""
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def error_line(err: str) -> str:
    """The one error line, last on stderr (after the progress line of a finished file)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [i for i, x in enumerate(lines) if "error" in x] == [len(lines) - 1], err
    return lines[-1]


# (mode, what the line says); MODE = FAULT-FILE: the fault hits that file
CASES = [
    ("404-cfg", "HTTP 404 Not Found"),
    ("500-cfg", "HTTP 500"),
    ("503-sae_weights", "HTTP 503"),
    ("truncated-cfg", "cut short"),
    ("truncated-sae_weights", "cut short"),
    ("huge-cfg", "announces 1,000,000,000,000,000 bytes"),
    ("huge-sae_weights", "announces 1,000,000,000,000,000 bytes"),
    ("redirect-cfg", "redirected in a loop"),
    ("garbage-cfg", "not an HTTP answer"),
    ("close-sae_weights", "closed the connection"),
    ("stall-cfg", "timed out"),
    ("drip-sae_weights", "timed out"),
    ("html-cfg", "not kept in the cache"),
    ("html-sae_weights", "not kept in the cache"),
]


@pytest.mark.parametrize("mode, says", CASES)
def test_a_bad_hub_answer_is_one_line_and_caches_nothing(hub, tmp_path, capsys, mode, says):
    fault_file = next(f for f in FILES if mode.endswith("-" + f.split(".")[0]))
    url = hub_url(f"t/{mode}", f"sae/{fault_file}")
    t0 = time.monotonic()
    assert entry(["convert", f"hf:t/{mode}/sae", str(tmp_path / "out"), "--timeout", "1"]) == 2
    assert time.monotonic() - t0 < 4  # the deadline of 1 s, plus one wait at most
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"minisae: error: {url}: ") and says in line, line
    assert not (tmp_path / "out").exists()  # nothing half-written
    # only files that passed their checks are cached, no temporary
    assert cached(tmp_path) == (["cfg.json"] if fault_file != "cfg.json" else [])


@pytest.mark.slow  # a real process: python and torch start in seconds
def test_no_server_at_all(tmp_path):
    """The command of the bug report: HF_ENDPOINT where nothing listens, in a real process."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "MINISAE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "minisae", "convert", "hf:a/b/c", str(tmp_path / "x")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    line = error_line(done.stderr)
    assert line.startswith(f"minisae: error: http://127.0.0.1:{port}/a/b/resolve/main/c/cfg.json: connection refused")
    assert not (tmp_path / "x").exists() and cached(tmp_path) == []


def test_a_cfg_json_over_the_cap_is_not_read_whole(hub, tmp_path, monkeypatch):
    """No Content-Length: the cap is counted as the body arrives (cfg.json's cap, made small)."""
    monkeypatch.setattr(formats, "MAX_CFG_BYTES", 4096)
    Hub.fuzz = (200, None, b'{"d_in": 8, "pad": "' + b" " * 100_000 + b'"}')
    with pytest.raises(ValueError, match=re.escape(hub_url("t/fuzz", "sae/cfg.json")) + ": the answer is longer"):
        formats.resolve("hf:t/fuzz/sae")
    assert cached(tmp_path) == []


def test_a_cached_file_that_fails_its_check_is_fetched_again(hub, tmp_path):
    """An HTML page an older version cached as cfg.json is replaced by the real file."""
    url = hub_url("t/fine", "sae/cfg.json")
    poisoned = tmp_path / "cache" / url.split("//")[1]
    poisoned.parent.mkdir(parents=True)
    poisoned.write_text("<html>502 Bad Gateway</html>")
    folder = formats.resolve("hf:t/fine/sae")
    assert (folder / "cfg.json").read_bytes() == Hub.good["cfg.json"]


STATUSES = st.sampled_from([200, 200, 200, 204, 301, 400, 403, 404, 418, 429, 500, 502, 503])
BODIES = st.one_of(st.just(None), st.binary(max_size=300), st.sampled_from([
    b'{"d_in": 8}', b"[1, 2]", b"null", b'{"a": ' * 50, b"<html>oops</html>", b"\xff\xfe{}", b"{}"]))
LENGTHS = st.sampled_from(["ok", None, "short", "long", "garbage", "-5"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUSES, body=BODIES, length=LENGTHS)
def test_fuzz_cfg_answers(hub, tmp_path, status, body, length):
    """Any answer for cfg.json: the SAE's folder, or one ValueError naming the URL; the cache
    never holds a cfg.json that is not a JSON object, nor a temporary."""
    if body is None:  # the good cfg.json, with a fuzzed status and Content-Length
        body = Hub.good["cfg.json"]
    n = {"ok": str(len(body)), None: None, "short": str(max(len(body) - 3, 0)), "long": str(len(body) + 7),
         "garbage": "12ab", "-5": "-5"}[length]
    Hub.fuzz = (status, n, body)
    cache = tmp_path / "cache"
    for p in sorted(cache.rglob("*"), reverse=True) if cache.exists() else []:  # a fresh cache per example
        p.unlink() if p.is_file() else p.rmdir()
    url = hub_url("t/fuzz", "sae/cfg.json")
    try:
        folder = formats.resolve("hf:t/fuzz/sae", timeout=5)
    except ValueError as e:
        assert str(e).startswith(f"{url}: "), str(e)
        assert "\n" not in str(e)
    else:
        assert status == 200 and isinstance(json.loads((folder / "cfg.json").read_bytes()), dict)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]
    if (cache / url.split("//")[1]).exists():
        assert isinstance(json.loads((cache / url.split("//")[1]).read_bytes()), dict)


@pytest.mark.slow  # a real process: python and torch start in seconds
def test_a_killed_download_leaves_a_part_file_the_next_run_removes(hub, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINISAE_CRASH_AT": "download:sae_weights.safetensors"}
    args = [sys.executable, "-m", "minisae", "convert", "hf:t/fine/sae", str(tmp_path / "out")]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parts = [p for p in cached(tmp_path) if p.endswith(".part")]
    assert len(parts) == 1 and not (tmp_path / "out").exists()
    env.pop("MINISAE_CRASH_AT")
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert cached(tmp_path) == sorted(FILES)  # the stale .part is gone
    sae, meta = formats.load(tmp_path / "out")
    assert meta["hook"] == "blocks.1.hook_resid_post"


def test_the_test_server_is_quiet_when_a_client_hangs_up(capfd):
    """The fake hub of these tests must not print a traceback of its own when minisae
    hangs up on a bad answer (it would land in the stderr the tests read)."""
    import urllib.request

    written = threading.Event()

    class Endless(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(10_000):  # far more than the socket buffers hold
                    self.wfile.write(b"x" * 4096)
            finally:
                written.set()

    with serving(Endless) as url:
        with urllib.request.urlopen(url + "/f", timeout=5) as r:
            r.read(10)
            r.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # hang up mid-answer
        assert written.wait(10)
        time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err
