"""Every way an OpenAI-compatible endpoint can answer badly ends as one EndpointError line,
'<URL>: <what was wrong>', within the client's total deadline; through `explain` it is the
command line's one `minisae: error:` line with exit status 2.

A local server on 127.0.0.1 answers POST /MODE/v1/chat/completions: MODE is an error
status, a refused or closed connection, a stalled or dripping server, a status line that
is not HTTP, a body cut short or announced as huge, a redirect loop, or a 200 whose JSON
is wrong in one place (message a string or null, content an int, a logprob missing, NaN,
+inf or > 0, logprobs.content a string, ...). A seeded Hypothesis search then mutates a
valid answer at random."""

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import serving  # pytest puts tests/ on sys.path
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisae.autointerp.endpoint import EndpointError, OpenAIChat

MSGS = [{"role": "user", "content": "Is it yes or no?"}]
TOKEN = {"token": "Yes", "logprob": -0.1, "top_logprobs": [{"token": "Yes", "logprob": -0.1},
                                                          {"token": "No", "logprob": -2.5}]}
GOOD = {"choices": [{"message": {"role": "assistant", "content": "Yes"}, "logprobs": {"content": [TOKEN]}}]}


def with_change(path, value):
    """GOOD with the field at `path` (keys and indices) set to `value` (DROP: removed)."""
    answer = copy.deepcopy(GOOD)
    *head, last = path
    node = answer
    for k in head:
        node = node[k]
    if value is DROP:
        del node[last]
    else:
        node[last] = value
    return json.dumps(answer).encode()


DROP = object()
LOGPROBS = ("choices", 0, "logprobs")
ENTRY = (*LOGPROBS, "content", 0)
BODIES = {  # mode -> the JSON a 200 answer carries, and what the error line says
    "message-string": (with_change(("choices", 0, "message"), "Yes"), "message is str"),
    "message-null": (with_change(("choices", 0, "message"), None), "message is NoneType"),
    "content-int": (with_change(("choices", 0, "message", "content"), 7), "content is not a string"),
    "no-choices": (b'{"choices": []}', "no choices[0]"),
    "not-an-object": (b"[1, 2, 3]", "no choices[0]"),
    "logprob-missing": (with_change((*ENTRY, "logprob"), DROP), "logprob None"),
    "logprob-inf": (with_change((*ENTRY, "logprob"), float("inf")), "logprob inf"),
    "logprob-positive": (with_change((*ENTRY, "logprob"), 5.0), "logprob 5.0"),
    "logprob-nan": (with_change((*ENTRY, "top_logprobs", 1, "logprob"), float("nan")), "logprob nan"),
    "logprob-string": (with_change((*ENTRY, "logprob"), "-0.1"), "logprob '-0.1'"),
    "logprobs-content-string": (with_change((*LOGPROBS, "content"), "Yes"), "logprobs.content is not a list"),
    "top-logprobs-string": (with_change((*ENTRY, "top_logprobs"), "Yes"), "top_logprobs is not a list"),
    "token-int": (with_change((*ENTRY, "token"), 3), "without a string token"),
    "truncated-json": (json.dumps(GOOD).encode()[:40], "malformed JSON"),
    "not-utf8": (b'{"choices": "\xff\xfe"}', "malformed JSON"),
}
STATUS = {"400": "answered HTTP 400", "401": "answered HTTP 401", "404": "answered HTTP 404",
          "500": "failed after 2 attempt(s) (HTTP 500", "503": "failed after 2 attempt(s) (HTTP 503"}


class Endpoint(BaseHTTPRequestHandler):
    fuzz = b""
    stop = threading.Event()

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.split("/")[1]
        if mode in STATUS:
            return self.send(int(mode), b'{"error": {"message": "no"}}')
        if mode in BODIES:
            return self.send(200, BODIES[mode][0])
        if mode == "fuzz":
            return self.send(200, self.fuzz)
        if mode == "garbage":
            return self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        if mode == "close":
            return
        if mode == "stall":
            self.stop.wait(10)
            return
        if mode == "redirect":
            self.send_response(307)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body = json.dumps(GOOD).encode()
        self.send_response(200)
        if mode == "truncated":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body[:20])
        if mode == "huge":
            self.send_header("Content-Length", str(10 ** 12))
            self.end_headers()
            return self.wfile.write(body)
        self.end_headers()  # drip: no Content-Length, one byte every 0.2 s
        for b in body:
            if self.stop.wait(0.2):
                return
            self.wfile.write(bytes([b]))
            self.wfile.flush()

    def send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    with serving(Endpoint) as url:
        yield url


def client(server, mode, **kw):
    return OpenAIChat(f"{server}/{mode}/v1", "m", **{"retries": 1, "backoff": 0.01, "timeout": 1.0, **kw})


def refused_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


TRANSPORT = {"garbage": "not an HTTP answer", "close": "closed the connection", "stall": "timed out",
             "drip": "timed out", "truncated": "cut short", "huge": "announces 1,000,000,000,000 bytes",
             "redirect": "redirected in a loop"}


@pytest.mark.parametrize("mode, says", [*STATUS.items(), *TRANSPORT.items(), *((m, s) for m, (_, s) in BODIES.items())])
def test_a_bad_answer_is_one_line_naming_the_url(server, mode, says):
    c = client(server, mode)
    t0 = time.monotonic()
    for ask in (lambda: c.complete(MSGS), lambda: c.yes_prob([MSGS]), lambda: c.line_probs([(MSGS, ["1. a:"])])):
        with pytest.raises(EndpointError) as e:
            ask()
        text = str(e.value)
        assert text.startswith(f"{c.url}: ") and says in text and "\n" not in text, text
    assert isinstance(e.value, ValueError)  # what the command line prints as one line
    assert time.monotonic() - t0 < 3 * 2.5  # each request within its 1 s deadline, plus one wait at most


def test_a_refused_connection(server):
    c = OpenAIChat(f"{refused_url()}/v1", "m", retries=2, backoff=0.01, timeout=1.0)
    with pytest.raises(EndpointError, match=r"^http://127\.0\.0\.1:\d+/v1/chat/completions: failed after 3 "
                                            r"attempt\(s\) \(connection refused"):
        c.complete(MSGS)


def test_the_timeout_covers_the_retries_and_their_back_off(server):
    """--timeout 1 with 3 retries of back-off 1, 2, 4 s: about 1 s, not 4 x 1 + 7 s."""
    c = client(server, "stall", retries=3, backoff=1.0)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"failed after 1 attempt\(s\) \(timed out: no complete answer within 1 s"):
        c.complete(MSGS)
    assert time.monotonic() - t0 < 2.0
    c = client(server, "500", retries=3, backoff=0.4)  # 0.4 + 0.8 s of back-off fit in 1.5 s, 1.6 s more do not
    c.timeout = 1.5
    with pytest.raises(EndpointError, match=r"failed after 3 attempt\(s\) \(HTTP 500"):
        c.complete(MSGS)


def test_an_unlikely_but_valid_answer_is_read(server):
    """-inf (probability 0) and logprob 0 are log-probabilities; a null content is an empty reply."""
    Endpoint.fuzz = with_change((*ENTRY, "top_logprobs"), [{"token": "Yes", "logprob": 0},
                                                           {"token": "No", "logprob": float("-inf")}])
    assert client(server, "fuzz").yes_prob([MSGS]) == [1.0]
    Endpoint.fuzz = with_change(("choices", 0, "message", "content"), None)
    assert client(server, "fuzz").complete(MSGS) == ""


def test_explain_with_a_bad_endpoint_is_one_line_exit_2(server, tmp_path, monkeypatch, capsys, gpt2):
    """Through the command line: the endpoint's error is `minisae: error: URL: ...`, status 2,
    and nothing is written."""
    from minisae.autointerp import explain
    from minisae.cli import entry
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    sae = make_sae("relu", 64, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    HookedSAE(sae.eval(), "gpt2-random", "blocks.1.hook_resid_post", 30.0).save(tmp_path / "sae")
    contexts = torch.randint(8, 500, (8, 32), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 50256
    tok = type("Tok", (), {"decode": staticmethod(lambda ids: "".join(f" t{i}" for i in ids))})()
    monkeypatch.setattr(explain, "load_with_model", lambda path, *a, **k: (HookedSAE.load(path), gpt2, tok))
    monkeypatch.setattr(explain, "load_text", lambda src, tok, name: contexts)  # no download, no corpus
    for mode, says in (("logprob-inf", "logprob inf"), ("message-null", "message is NoneType"), ("stall", "timed out")):
        code = entry(["explain", "--sae", str(tmp_path / "sae"), "--endpoint", f"{server}/{mode}/v1", "--api-model",
                      "m", "--timeout", "1", "--retries", "1", "--n-latents", "1", "--n-explain", "2", "--n-score",
                      "1", "--window", "8", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if "error" in x]
        assert code == 2 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"minisae: error: {server}/{mode}/v1/chat/completions: ") and says in lines[0]
        assert not (tmp_path / "out").exists()


FIELDS = [("choices",), ("choices", 0), ("choices", 0, "message"), ("choices", 0, "message", "content"),
          LOGPROBS, (*LOGPROBS, "content"), ENTRY, (*ENTRY, "token"), (*ENTRY, "logprob"), (*ENTRY, "top_logprobs"),
          (*ENTRY, "top_logprobs", 0), (*ENTRY, "top_logprobs", 1, "logprob")]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=st.one_of(VALUES, st.just(DROP)), cut=st.none() | st.integers(0, 300))
def test_fuzz_answers(server, field, value, cut):
    """Any one field replaced (or dropped), or the body cut anywhere: a probability in [0, 1]
    (or NaN for an answer that is neither yes nor no), or one EndpointError naming the URL."""
    try:
        body = with_change(field, value)
    except (IndexError, KeyError, TypeError):
        body = json.dumps(GOOD).encode()
    Endpoint.fuzz = body[:cut] if cut is not None else body
    c = client(server, "fuzz", retries=0)
    try:
        (p,) = c.yes_prob([MSGS])
        text = c.complete(MSGS)
    except EndpointError as e:
        assert str(e).startswith(f"{c.url}: ") and "\n" not in str(e)
    else:
        assert p != p or 0.0 <= p <= 1.0
        assert isinstance(text, str)
