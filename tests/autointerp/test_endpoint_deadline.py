"""The total deadline of a chat request holds to half a second, retries included, whatever
the server does: it drips its status line or its headers one byte every 0.1 s (each byte
resets the socket's timeout), sends part of a body and stalls just before the deadline,
or drips a chunked body. Each call ends within --timeout + 0.5 s with one EndpointError
line naming the URL."""

import threading
import time

import pytest
from conftest import serving  # pytest puts tests/ on sys.path
from formats.test_hub_deadline import Dripping  # pytest puts tests/ on sys.path

from minisae.autointerp.endpoint import EndpointError, OpenAIChat

DEADLINE, MARGIN = 1.5, 0.5
MSGS = [{"role": "user", "content": "Is it yes or no?"}]
GOOD = b'{"choices": [{"message": {"role": "assistant", "content": "Yes"}}]}'


class Slow(Dripping):
    """POST /MODE/v1/chat/completions, slow in MODE's way."""
    stop = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.split("/")[1]
        if mode == "status":
            return self.drip(b"HTTP/1.1 200 OK" + b" " * 10_000)
        if mode == "headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            return self.drip(b"X-Pad: " + b"a" * 10_000)
        self.send_response(200)
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            return self.drip(b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in b" " * 1000 + GOOD))
        self.send_header("Content-Length", str(len(GOOD)))
        self.end_headers()
        if mode == "late-stall":
            self.stop.wait(DEADLINE - 0.3)
            self.drip(GOOD[:1])
            self.stop.wait(30)
        else:
            self.wfile.write(GOOD)


@pytest.fixture(scope="module")
def server():
    with serving(Slow) as url:
        yield url


@pytest.mark.parametrize("mode", ["status", "headers", "late-stall", "chunked"])
def test_a_slow_server_is_cut_off_at_the_deadline(server, mode):
    c = OpenAIChat(f"{server}/{mode}/v1", "m", retries=3, backoff=0.05, timeout=DEADLINE)
    t0 = time.monotonic()
    with pytest.raises(EndpointError) as e:
        c.complete(MSGS)
    took = time.monotonic() - t0
    assert took < DEADLINE + MARGIN, f"{mode}: {took:.2f} s for a deadline of {DEADLINE} s"
    text = str(e.value)
    assert text.startswith(f"{c.url}: failed after 1 attempt(s) (timed out") and "\n" not in text, text


def test_a_prompt_answer_within_the_deadline_is_read(server):
    c = OpenAIChat(f"{server}/fine/v1", "m", retries=0, timeout=DEADLINE)
    for _ in range(3):  # each request's timer is cancelled: none cuts a later one
        assert c.complete(MSGS) == "Yes"
    time.sleep(DEADLINE)
    assert c.complete(MSGS) == "Yes"
