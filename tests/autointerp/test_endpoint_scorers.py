"""The endpoint path runs the same scorers: OpenAIChat against a real HTTP server on
localhost whose answers come from a tiny random Llama (a LocalChat), on POST
/v1/completions with echo (the prompt's token log-probabilities, for surprisal) and
/v1/chat/completions with top_logprobs (the intruder's answer). Each score through the
endpoint must equal the one the LocalChat gives directly."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from minisae.autointerp import intruder, surprisal
from minisae.autointerp.chat import LocalChat
from minisae.autointerp.endpoint import EndpointError, OpenAIChat
from minisae.models.bpe import BPETokenizer, bytes_to_unicode
from minisae.models.llama import Llama, LlamaConfig

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_chat():
    enc = {c: b for b, c in bytes_to_unicode().items()}  # the 256 bytes, no merges but yes / no
    for t in ("ye", "yes", "no"):
        enc[t] = len(enc)
    specials = {s: len(enc) + j for j, s in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))}
    enc.update(specials)
    tok = BPETokenizer(enc, ["y e", "ye s", "n o"], special_tokens=specials, bos_id=specials["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, d_model=32, d_mlp=64, n_head=4, n_kv_head=2, vocab_size=tok.vocab_size, n_ctx=1024)
    return LocalChat(Llama(cfg).eval(), tok, TEMPLATE, stop_ids=[specials["<|im_end|>"]])


@torch.no_grad()
def echo_completion(chat, payload):
    """A legacy completion with echo: every prompt token, its offset and its logprob."""
    ids = chat.tok.encode(payload["prompt"])
    logp = torch.log_softmax(chat.model(torch.tensor([ids]))[0], -1)  # (T, V)
    pieces = [chat.tok.decode([t]) for t in ids]
    offsets = [sum(len(p) for p in pieces[:j]) for j in range(len(ids))]
    lps = [None] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    return {"choices": [{"text": payload["prompt"], "logprobs": {"tokens": pieces, "token_logprobs": lps,
                                                                  "text_offset": offsets}}]}


@torch.no_grad()
def chat_completion(chat, payload):
    """One generated token with its top_logprobs (the whole vocabulary when asked for it)."""
    logp = torch.log_softmax(chat.model(torch.tensor([chat.encode_chat(payload["messages"])]))[0, -1], -1)  # (V,)
    top = logp.topk(min(payload.get("top_logprobs", 0), len(logp)))
    first = int(logp.argmax())
    entry = {"token": chat.tok.decode([first]), "logprob": float(logp[first]),
             "top_logprobs": [{"token": chat.tok.decode([int(i)]), "logprob": float(v)}
                              for v, i in zip(top.values, top.indices)]}
    return {"choices": [{"message": {"role": "assistant", "content": entry["token"]},
                         "logprobs": {"content": [entry]} if payload.get("logprobs") else None}]}


@pytest.fixture(scope="module")
def served():
    chat = tiny_chat()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.endswith("/chat/completions"):
                body = chat_completion(chat, payload)
            elif self.path.startswith("/noecho"):
                body = {"choices": [{"text": "x"}]}  # a server without echo
            else:
                body = echo_completion(chat, payload)
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield chat, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


TEXTS = ["a cat sat", "the cat ran", "rain fell", "old car"]
LABELS = [1, 1, 0, 0]


def test_surprisal_through_the_endpoint_equals_the_local_score(served):
    chat, url = served
    remote = OpenAIChat(url + "/v1", "tiny", retries=0, timeout=10.0)
    there, here = (c.text_logprobs(surprisal.prefix("cats"), TEXTS) for c in (remote, chat))
    assert [len(t) for t in there] == [len(t) for t in here]
    assert sum(there, []) == pytest.approx(sum(here, []), abs=1e-4)
    here, there = (surprisal.surprisal_score(c, 'the tokens " cat"', TEXTS, LABELS) for c in (chat, remote))
    assert there["gap"] == pytest.approx(here["gap"], abs=1e-4) and there["auroc"] == here["auroc"]


def test_intruder_through_the_endpoint_equals_the_local_score(served):
    chat, url = served
    remote = OpenAIChat(url + "/v1", "tiny", retries=0, timeout=10.0, top_logprobs=chat.tok.vocab_size)
    here, there = (intruder.intruder_score(c, TEXTS[:3], "old car", seed=2) for c in (chat, remote))
    assert there["q"] == pytest.approx(here["q"], abs=1e-4)
    assert there["p_correct"] == pytest.approx(here["p_correct"], abs=1e-4)


def test_an_endpoint_without_echo_is_a_clear_error(served):
    _, url = served
    with pytest.raises(EndpointError, match="echo"):
        OpenAIChat(url + "/noecho/v1", "tiny", retries=0, timeout=10.0).text_logprobs("a\n", ["b"])
