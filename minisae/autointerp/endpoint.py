"""The chat backend for any OpenAI-compatible endpoint (llama.cpp's server, vLLM, a hosted
API): the same small interface as minisae/autointerp/chat.py's LocalChat, over HTTP with
urllib, a total deadline per request (retries included) and every answer checked before
it is read: an unreachable server or an answer we cannot read is one EndpointError,
'<URL>: <what was wrong>'. The deadline holds to a fraction of a second whatever the server
does (minisae/models/http.py's stream: each read waits at most what is left of it, and a timer
shuts a connection that drips its headers or body past it).
"""

import json
import math
import os
import sys
import time
import urllib.request

import torch

from minisae.autointerp.chat import binary_prob
from minisae.models.http import Deadline, HTTPFailure, stream


class EndpointError(ValueError):
    """An OpenAI-compatible endpoint was unreachable or gave an answer we cannot read: one
    line, '<URL>: <what was wrong>' (a ValueError: the command line prints it as one)."""


MAX_ANSWER_BYTES = 16 << 20  # a chat completion with logprobs: kilobytes, not a stream without end


def check_answer(url: str, raw: bytes) -> dict:
    """The chat completion in `raw`, or EndpointError naming what is wrong with it. Checked:
    choices[0].message is an object whose content is a string (or null); logprobs, if
    present, is {"content": [entry, ...]} (or null), and every entry and each of its
    top_logprobs has a string token and a logprob that is a number <= 0 (a log-probability:
    -inf is probability 0; NaN, +inf or > 0 cannot be one)."""
    def bad(what):
        return EndpointError(f"{url}: answered something that is not a chat completion ({what}): {raw[:160]!r}")

    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"malformed JSON: {e}") from None
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad("no choices[0]")
    choice = choices[0]
    if not isinstance(choice.get("message"), dict):
        raise bad(f"choices[0].message is {type(choice.get('message')).__name__}, not an object")
    if not isinstance(choice["message"].get("content"), (str, type(None))):
        raise bad("message.content is not a string")
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return answer
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), (list, type(None))):
        raise bad("logprobs.content is not a list")
    for entry in logprobs.get("content") or []:
        alts = entry.get("top_logprobs") if isinstance(entry, dict) else None
        if not isinstance(alts, (list, type(None))):
            raise bad("top_logprobs is not a list")
        for e in [entry, *(alts or [])]:
            lp = e.get("logprob") if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("token"), str):
                raise bad("a logprobs entry without a string token")
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 0:
                raise bad(f"logprob {lp!r:.40} of token {e['token']!r:.40} is not a log-probability (a number <= 0)")
    return answer


class OpenAIChat:
    """POST {endpoint}/chat/completions; endpoint like http://localhost:8080/v1.
    The API key, if any, is read from the environment variable api_key_env."""

    def __init__(self, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, temperature: float = 0.0, seed: int = 0,
                 top_logprobs: int = 10):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http(s) URL like http://localhost:8080/v1, got {endpoint!r}")
        if not model:
            raise ValueError("--api-model is required with --endpoint (the model name the server expects)")
        if not 0 < timeout < math.inf or retries < 0:
            raise ValueError(f"timeout must be positive and retries >= 0, got {timeout}, {retries}")
        endpoint = endpoint.rstrip("/")
        self.url = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
        self.model, self.key = model, os.environ.get(api_key_env) or None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.temperature, self.seed, self.top_logprobs = temperature, seed, top_logprobs
        self.hard_answers = 0  # answers scored from the text, for want of logprobs

    def post(self, payload: dict, url: str = None, check=None) -> dict:
        """One chat-completions request, retried on transient failures (no connection, a
        body cut short, 429, 5xx) with exponential back-off, all within `timeout` seconds in
        total; the answer, every field we read checked (check_answer)."""
        body = json.dumps({"model": self.model, **payload}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        url, deadline, t0 = url or self.url, Deadline(self.timeout), time.monotonic()
        for attempt in range(self.retries + 1):
            raw = bytearray()
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                stream(req, deadline, MAX_ANSWER_BYTES, raw.extend)
                return (check or check_answer)(url, bytes(raw))  # check: another protocol's
            except HTTPFailure as e:
                if not e.transient:
                    raise EndpointError(f"{url}: answered {e.what}" if e.status else str(e)) from None
                why = e.what
            wait = self.backoff * 2 ** attempt  # 1, 2, 4, ... x backoff
            if attempt == self.retries or time.monotonic() + wait >= deadline.end:
                raise EndpointError(f"{url}: failed after {attempt + 1} attempt(s) ({why}) in "
                                    f"{time.monotonic() - t0:.1f} s; is the server running and the URL "
                                    "right (e.g. http://localhost:8080/v1)?")
            time.sleep(wait)

    def _ask(self, messages, max_tokens: int, logprobs: bool, stop=()) -> dict:
        payload = {"messages": list(messages), "max_tokens": max_tokens, "temperature": self.temperature,
                   "seed": self.seed}
        if stop:
            payload["stop"] = list(stop)
        if logprobs:
            payload.update(logprobs=True, top_logprobs=self.top_logprobs)
        return self.post(payload)["choices"][0]

    def complete(self, messages, max_tokens: int = 48, seed=None, stop=()) -> str:
        text = self._ask(messages, max_tokens, False, stop)["message"].get("content") or ""
        for s in stop:  # servers stop before a stop string; cut here too for those that do not
            text = text.split(s)[0]
        return text.strip()

    def _answer_p(self, entry) -> float:
        """P(yes) from one generated token's top_logprobs (the alternatives at that position)."""
        alts = entry.get("top_logprobs") or [entry]
        lp = {"yes": -math.inf, "no": -math.inf}
        for a in alts:
            w = str(a.get("token", "")).strip().lower()
            if w in lp:
                lp[w] = float(torch.logaddexp(torch.tensor(lp[w]), torch.tensor(float(a["logprob"]))))
        return binary_prob(lp["yes"], lp["no"])

    def _hard(self, word: str) -> float:
        self.hard_answers += 1
        if self.hard_answers == 1:
            print(f"warning: {self.url} returned no logprobs; scoring its written yes/no answers "
                  "(hard decisions: detection works, simulation correlates 0/1 predictions)", file=sys.stderr)
        w = word.strip().lower().strip(".!")
        return 1.0 if w.startswith("yes") else 0.0 if w.startswith("no") else math.nan

    def yes_prob(self, conversations) -> list:
        out = []
        for messages in conversations:
            choice = self._ask(messages, 1, True)
            content = ((choice.get("logprobs") or {}).get("content")) or []
            out.append(self._answer_p(content[0]) if content else self._hard(choice["message"].get("content") or ""))
        return out

    def line_probs(self, items) -> list:
        """The endpoint writes every line with its answer; we read the logprobs of the answers,
        in order. Lines it skipped get NaN (the scorer leaves them out and counts them)."""
        out = []
        for messages, lines in items:
            *head, last = messages  # the lines go at the end of the last (user) message
            messages = [*head, {"role": last["role"], "content": last["content"] + "\n\n" + "\n".join(lines)}]
            choice = self._ask(messages, 12 * len(lines) + 16, True)
            content = ((choice.get("logprobs") or {}).get("content")) or []
            if content:
                ps = [self._answer_p(e) for e in content if str(e.get("token", "")).strip().lower() in ("yes", "no")]
            else:
                written = (choice["message"].get("content") or "").splitlines()
                ps = [self._hard(w.split()[-1]) for w in written if w.split()]
            out.append((ps + [math.nan] * len(lines))[:len(lines)])
        return out

    # ------------------------------------------------------------ next-token log-probabilities

    def text_logprobs(self, prefix: str, texts) -> list:
        """LocalChat.text_logprobs through the legacy completions protocol (POST
        {endpoint}/completions with echo: the prompt's own token log-probabilities, which
        vLLM and OpenAI-compatible servers with echo give; chat completions never do): per
        text, the logprob of every token that starts at or after the end of the prefix."""
        url = self.url[:-len("/chat/completions")] + "/completions"
        out = []
        for text in texts:
            lp = self.post({"prompt": prefix + text, "max_tokens": 1, "echo": True, "logprobs": 0,
                            "temperature": 0.0}, url, check_echo)["choices"][0]["logprobs"]
            out.append([v for v, at in zip(lp["token_logprobs"], lp["text_offset"]) if at >= len(prefix)])
        return out

    def option_probs(self, conversations, options) -> list:
        """Per conversation, P(option) / sum P(options) from the first answer token's
        top_logprobs; without logprobs, the written answer (1 for it, 0 for the rest)."""
        out = []
        for messages in conversations:
            choice = self._ask(messages, 1, True)
            content = ((choice.get("logprobs") or {}).get("content")) or []
            if content:
                lp = {o: -math.inf for o in options}
                for a in content[0].get("top_logprobs") or [content[0]]:
                    w = str(a.get("token", "")).strip()
                    if w in lp:
                        lp[w] = max(lp[w], float(a["logprob"]))
                v = torch.tensor([lp[o] for o in options], dtype=torch.float64)
                out.append(torch.softmax(v, 0).tolist() if v.max() > -math.inf else [math.nan] * len(options))
            else:
                w = (choice["message"].get("content") or "").strip()
                out.append([float(w.startswith(o)) for o in options])
        return out


def check_echo(url: str, raw: bytes) -> dict:
    """A legacy completion with echoed prompt logprobs: choices[0].logprobs has token_logprobs
    and text_offset, lists of one length (the first logprob may be null: no context)."""
    try:
        answer = json.loads(raw)
        lp = answer["choices"][0]["logprobs"]
        tl, off = lp["token_logprobs"], lp["text_offset"]
        if not isinstance(tl, list) or not isinstance(off, list) or len(tl) != len(off):
            raise ValueError("token_logprobs and text_offset differ")
        lp["token_logprobs"] = [0.0 if v is None else float(v) for v in tl]
        return answer
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise EndpointError(f"{url}: answered something that is not a completion with echoed logprobs "
                            f"(is echo supported?): {type(e).__name__} {e}: {raw[:160]!r}") from None
