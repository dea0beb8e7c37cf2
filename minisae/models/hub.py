"""Download a file once, check it, keep it in a local cache.

    cached_path(url) -> local path:  <cache>/<host>/<url path>, downloaded on first use
    hub_file(repo, path, revision)   the same for a file of a Hugging Face hub repository,
                                     checked against the sha256 the hub states for it
    stream(request, deadline, ...)   one HTTP request, its answer passed on as it arrives, all of it
                                     by the deadline (the chat client of minisae/autointerp/endpoint.py
                                     uses it too)

The cache is `~/.cache/minisae` (override with the MINISAE_CACHE environment variable or
the `cache_dir` argument). A download streams into `.NAME.PID.part` next to its final
place, is checked (against a pinned sha256 when we know one, the hub's sha256, and
`verify(path)` when the caller knows what the file must hold: a JSON object, a
safetensors header), and only then renamed into place (an atomic rename on one
filesystem): an interrupted, corrupt or wrong download (an HTML error page served as
cfg.json) never leaves a file that a later run would mistake for a good one. A `.part`
file that a killed download left is deleted by the next download into that folder.

Every request has a total deadline (`timeout` seconds for the whole transfer) that holds
to a fraction of a second, whatever the server does: before every read of the body the
socket's timeout is set to what is left of the deadline (at most STALL), so no single
wait outlasts it; and a timer shuts the connection at the deadline, which ends the waits
a timeout cannot bound (a server that drips its status line and headers, or a chunked
body, one byte at a time: each byte resets the socket's timeout). It also has a size cap,
checked against the Content-Length the server announces before anything is stored, and
counted while the body arrives. Every failure is one HTTPFailure, a ValueError whose text
is `<URL>: <what was wrong>`: an HTTP error status, a redirect loop, a refused connection,
the deadline, a body cut short or too long, an answer that is not HTTP at all.
"""

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from minisae.utils import Progress, cache_dir, crash_point, remove_stale

HF = "https://huggingface.co/openai-community"
# sha256 of files we download, to catch corruption and tampering. The Hugging Face LFS oid
# of a file is its sha256; for model.safetensors of openai-community/gpt2 several public
# records agree on this value (548,105,171 bytes). vocab.json / merges.txt: the hashes of
# OpenAI's encoder.json / vocab.bpe, whose git blob ids equal those of the HF files.
# We found no reliable record for the larger GPT-2 sizes, so they are not pinned.
PINNED_SHA256 = {
    f"{HF}/gpt2/resolve/main/model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    f"{HF}/gpt2/resolve/main/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    f"{HF}/gpt2/resolve/main/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

DOWNLOAD_TIMEOUT = 600.0  # seconds for one hub file (SAE weights: up to a few hundred MB)
MODEL_TIMEOUT = 3600.0  # seconds for one model file (GPT-2 XL's weights: 6 GB)
STALL = 60.0  # the longest silence from a server before a download gives up, whatever time is left
CHUNK = 1 << 20  # bytes asked of the socket per read


def default_cache_dir() -> str:
    return str(cache_dir())


class HTTPFailure(ValueError):
    """One request that failed: str(e) is '<URL>: <what was wrong>'. `what` alone, and
    whether trying again may help (`transient`: no connection, the deadline, a body cut
    short, HTTP 429 and 5xx); `status` is the HTTP status if the server answered one."""

    def __init__(self, url: str, what: str, transient: bool, status=None, headers=None):
        super().__init__(f"{url}: {what}")
        self.url, self.what, self.transient, self.status = url, what, transient, status
        self.headers = headers or {}  # those of an error answer (a redirect's Location, ...)


class Deadline:
    """A total time limit for a request and all its waits: left(url) is the seconds that
    remain, or HTTPFailure once none do."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self, url: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise HTTPFailure(url, f"timed out: no complete answer within {self.seconds:g} s", True)
        return left


class Watch:
    """Shuts a request's connection when its deadline passes. The socket's timeout bounds
    one wait; a server that sends a byte now and then (its status line, its headers, a
    chunked body) resets it every time, so only a timer can end the request on time.
    shutdown() wakes a read blocked in another thread (close() would not): the reader sees
    the connection end, and `fired` tells stream that this end was the deadline's."""

    def __init__(self, deadline: Deadline):
        self.sock, self.fired, self.lock = None, False, threading.Lock()
        self.timer = threading.Timer(max(deadline.end - time.monotonic(), 0.0), self.fire)
        self.timer.daemon = True  # never keeps the process alive

    def connected(self, sock):
        """The socket of a new connection (each redirect opens one): the one the timer shuts."""
        with self.lock:
            self.sock = sock
            if self.fired:
                shut(sock)
        return sock

    def fire(self):
        with self.lock:
            self.fired = True
            if self.sock is not None:
                shut(self.sock)


def shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def watched_handlers(watch: Watch) -> list:
    """urllib's HTTP and HTTPS handlers, with every connection's socket handed to `watch`
    as soon as it exists (before the TLS handshake, which a server can drip too)."""
    def connection(cls):
        def make(host, **kwargs):
            conn = cls(host, **kwargs)
            conn._create_connection = lambda *a, **k: watch.connected(socket.create_connection(*a, **k))
            return conn
        return make

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(connection(http.client.HTTPSConnection), req, context=self._context)

    return [HTTP(), HTTPS()]


def stream(request, deadline: Deadline, max_bytes: float, write, label=None, handlers=(), on_headers=None) -> int:
    """Send `request` (a URL or a urllib Request), pass its body to write(chunk) as it
    arrives, and return the number of bytes; HTTPFailure for anything that goes wrong. The
    whole request ends by the deadline (no wait outlasts it, nor STALL); a body longer
    than max_bytes is refused, from its Content-Length when the server states one; `label`
    draws a progress line, on_headers(headers) sees the answer's headers; `handlers` are
    more urllib handlers (one that does not follow redirects)."""
    url = request if isinstance(request, str) else request.full_url
    done, wait, bar = 0, min(deadline.left(url), STALL), None  # wait: the socket's timeout now
    watch = Watch(deadline)
    watch.timer.start()
    try:
        with urllib.request.build_opener(*handlers, *watched_handlers(watch)).open(request, timeout=wait) as r:
            if on_headers:
                on_headers(r.headers)
            head = getattr(request, "method", None) == "HEAD"  # an answer without a body
            total = None if head else content_length(url, r, max_bytes)
            bar = Progress(label, total or 0, "MB", scale=1e6) if label else None
            while True:
                wait = min(deadline.left(url), STALL)
                if watch.sock is not None:
                    watch.sock.settimeout(wait)  # this read ends by the deadline
                chunk = r.read1(CHUNK)  # read1: whatever arrived, so the deadline is checked often
                if not chunk:
                    break
                done += len(chunk)
                if done > max_bytes:
                    raise HTTPFailure(url, f"the answer is longer than the {max_bytes:,.0f} bytes allowed", False)
                try:
                    write(chunk)
                except OSError as e:  # a full disk is not the server's fault: say so
                    raise HTTPFailure(url, f"cannot store the answer: {e}", False) from None
                if bar:
                    bar.update(done)  # redraws twice a second at most
            if watch.fired:  # the end of the body was the timer's shutdown, not the server's
                raise HTTPFailure(url, f"timed out: no complete answer within {deadline.seconds:g} s", True)
            if bar:
                bar.close(done)
                bar = None
    except HTTPFailure:
        raise
    except urllib.error.HTTPError as e:  # an answer, with an error status
        raise http_error(url, e) from None
    except (OSError, http.client.HTTPException) as e:  # no answer, or not an HTTP one
        if watch.fired:  # the timer shut the connection
            raise HTTPFailure(url, f"timed out: no complete answer within {deadline.seconds:g} s", True) from None
        deadline.left(url)  # a wait cut short by the deadline says so
        raise HTTPFailure(url, describe(e, wait), True) from None
    finally:
        watch.timer.cancel()
        if bar:
            print(file=sys.stderr)  # end the progress line: the error gets a line of its own
    if total is not None and done != total:
        raise HTTPFailure(url, f"the answer was cut short: {done:,} of the {total:,} bytes announced", True)
    return done


def content_length(url: str, response, max_bytes: float):
    """The body size the server announces (None if it states none), refused above max_bytes."""
    text = response.headers.get("Content-Length")
    if text is None:
        return None
    if not text.strip().isdigit():
        raise HTTPFailure(url, f"a malformed Content-Length {text[:40]!r}", False)
    if int(text) > max_bytes:
        raise HTTPFailure(url, f"the server announces {int(text):,} bytes, more than the {max_bytes:,.0f} "
                               "allowed for this file", False)
    return int(text)


def http_error(url: str, e: urllib.error.HTTPError) -> HTTPFailure:
    """An error status as one line, with the start of the server's explanation."""
    if 300 <= e.code < 400:  # urllib follows redirects: a 3xx error is one it would not follow
        return HTTPFailure(url, f"HTTP {e.code}: redirected in a loop, too many times or nowhere", False, e.code,
                           e.headers)
    try:
        said = " ".join(e.read(200).decode("utf-8", "replace").split())
    except (OSError, http.client.HTTPException):
        said = ""
    if said.startswith("<"):
        said = ""  # an HTML error page says no more than its status
    return HTTPFailure(url, f"HTTP {e.code} {e.reason}" + (f": {said}" if said else ""),
                       e.code == 429 or e.code >= 500, e.code, e.headers)


def describe(e: BaseException, wait: float) -> str:
    """What a failed connection or a broken answer means, in words (`wait`: the socket's timeout)."""
    reason = getattr(e, "reason", e)  # URLError wraps the socket's error
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out: the server sent nothing for {wait:.3g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running and the URL right?)"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, http.client.IncompleteRead):
        return f"the answer was cut short after {len(e.partial):,} bytes"
    if isinstance(e, http.client.HTTPException):
        return f"not an HTTP answer ({type(e).__name__}: {str(e)[:80]!r})"
    return f"cannot connect ({type(reason).__name__}: {reason})"


def download(url: str, dest, sha256=None, progress: bool = True, timeout: float = DOWNLOAD_TIMEOUT,
             max_bytes=None, verify=None, deadline=None) -> str:
    """Stream `url` to `dest` through `.NAME.PID.part`, within `timeout` seconds in all (or
    by `deadline`, a Deadline shared with the requests before it), at most `max_bytes` and
    the free disk space; check sha256 (if given) and verify(path) (if given: raises
    ValueError saying what the file should be) before the atomic rename. On any failure
    the partial file is deleted and an HTTPFailure names the URL."""
    dest = os.path.abspath(dest)
    folder, name = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(folder, exist_ok=True)
    remove_stale(folder, ".*.part")  # what killed downloads left here
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.part")
    cap = min(max_bytes or float("inf"), shutil.disk_usage(folder).free)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def write(chunk):
                f.write(chunk)
                digest.update(chunk)
                crash_point(f"download:{name}")  # the kill tests stop here, a chunk into the file

            stream(url, deadline or Deadline(timeout), cap, write, label=name if progress else None)
            f.flush()
            os.fsync(f.fileno())
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise HTTPFailure(url, f"sha256 mismatch: expected {sha256}, got {digest.hexdigest()}; the download "
                                   "was deleted (corrupt transfer, or the file changed upstream)", False)
        if verify is not None:
            try:
                verify(tmp)
            except ValueError as e:
                raise HTTPFailure(url, f"not kept in the cache: {str(e).replace(tmp, name)}", False) from None
        os.replace(tmp, dest)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def cached_path(url: str, cache_dir=None, sha256=None, progress: bool = True, timeout: float = MODEL_TIMEOUT) -> str:
    """Local path of `url` in the cache, downloading it first if absent. `sha256` defaults
    to the pinned hash for known URLs."""
    dest = cache_location(url, cache_dir)
    if not os.path.isfile(dest):
        download(url, dest, sha256=sha256 or PINNED_SHA256.get(url), progress=progress, timeout=timeout)
    return dest


def cache_location(url: str, cache_dir=None) -> str:
    """Where `url` is kept: <cache>/<host>/<url path>."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if not segments or any(s in (".", "..") for s in segments) or parts.netloc in (".", ".."):
        raise ValueError(f"cannot cache {url!r}: its path must name a file, without '.' or '..'")
    return os.path.join(cache_dir or default_cache_dir(), parts.netloc or "local", *segments)


# ---------------------------------------------------------------- files of a hub repository
#
#   {endpoint}/{owner}/{name}/resolve/{revision}/{path}      endpoint: $HF_ENDPOINT or https://huggingface.co
#
# The hub answers that URL with a redirect to its storage; for a large (LFS) file the
# answer carries X-Linked-Etag, the file's sha256, which we check the download against.
# Small files kept in git get a git hash there instead (not a sha256): those are unchecked.
# A revision that is a branch ("main") is cached under its name: pass a commit to pin one.

def parse_hub_ref(ref: str) -> tuple:
    """'OWNER/NAME/PATH/IN/REPO@REVISION' -> (repo 'OWNER/NAME', path, revision ('main'
    if absent)); the path may be empty (files at the repository root)."""
    body, _, revision = ref.partition("@")
    parts = [p for p in body.split("/") if p]
    ok = len(parts) >= 2 and all(re.fullmatch(r"[\w.-]+", p) and p not in (".", "..") for p in parts) and \
        re.fullmatch(r"[\w.-]+", revision or "main")
    if not ok:
        raise ValueError(f"bad hub reference {ref!r}; expected OWNER/REPO/PATH[@REVISION], "
                         "e.g. jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or "main"


def hub_url(repo: str, path: str, revision: str = "main") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def hub_sha256(url: str, deadline: Deadline):
    """The sha256 the hub states for the file at `url` (its X-Linked-Etag, read from the
    first answer, before any redirect), or None if it states none. HTTPFailure for a file
    that is not there."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # keep the hub's own answer: the storage host does not repeat the header

    answers = []
    try:
        stream(urllib.request.Request(url, method="HEAD"), deadline, float("inf"), None,
               handlers=[NoRedirect()], on_headers=answers.append)
        headers = answers[0]
    except HTTPFailure as e:
        if e.status in (301, 302, 303, 307, 308):
            headers = e.headers  # the hub's redirect to its storage host: the answer we want
        elif e.status in (401, 403):
            raise HTTPFailure(url, f"{e.what} (a private or gated repository? minisae sends no token)", False,
                              e.status) from None
        elif e.status is not None and e.status < 500:
            raise HTTPFailure(url, f"{e.what} (no such repository, revision or file?)", False, e.status) from None
        else:
            raise
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/")
    etag = etag.strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def hub_file(repo: str, path: str, revision: str = "main", cache_dir=None, progress: bool = True,
             timeout: float = DOWNLOAD_TIMEOUT, max_bytes=None, verify=None) -> str:
    """Local path of one file of a hub repository, downloaded into the cache on first use
    (within `timeout` seconds, at most max_bytes) and checked against the sha256 the hub
    states for it and by verify(path). A cached copy that fails verify (written before
    files were verified) is downloaded again."""
    url = hub_url(repo, path, revision)
    dest = cache_location(url, cache_dir)
    if os.path.isfile(dest) and verify is not None:
        try:
            verify(dest)
        except ValueError:
            os.remove(dest)
    if not os.path.isfile(dest):
        deadline = Deadline(timeout)
        download(url, dest, sha256=hub_sha256(url, deadline), progress=progress, max_bytes=max_bytes,
                 verify=verify, deadline=deadline)
    return dest
