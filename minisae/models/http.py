"""One HTTP request, its answer passed on as it arrives, all of it by a deadline.

    stream(request, deadline, max_bytes, write)   one request, its body passed to write(chunk) as it
                                                  arrives (the downloads of minisae/models/hub.py and
                                                  the chat client of minisae/autointerp/endpoint.py)
    Deadline(seconds)                             a total time limit, shared by requests and waits
    HTTPFailure                                   any way a request can fail, as one line

Every request has a total deadline (Deadline(seconds) for the whole transfer) that holds
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

import http.client
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

from minisae.utils import Progress

STALL = 60.0  # the longest silence from a server before a download gives up, whatever time is left
CHUNK = 1 << 20  # bytes asked of the socket per read


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
