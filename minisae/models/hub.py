"""Download a file once, check it, keep it in a local cache.

    cached_path(url) -> local path:  <cache>/<host>/<url path>, downloaded on first use
    hub_file(repo, path, revision)   the same for a file of a Hugging Face hub repository,
                                     checked against the sha256 the hub states for it

The cache is `~/.cache/minisae` (override with the MINISAE_CACHE environment variable or
the `cache_dir` argument). A download streams into `.NAME.PID.part` next to its final
place, is checked (against a pinned sha256 when we know one, the hub's sha256, and
`verify(path)` when the caller knows what the file must hold: a JSON object, a
safetensors header), and only then renamed into place (an atomic rename on one
filesystem): an interrupted, corrupt or wrong download (an HTML error page served as
cfg.json) never leaves a file that a later run would mistake for a good one. A `.part`
file that a killed download left is deleted by the next download into that folder.

Every request goes through minisae/models/http.py's stream: a total deadline that holds
to a fraction of a second whatever the server does, a size cap, and one HTTPFailure
('<URL>: <what was wrong>') for anything that goes wrong.
"""

import hashlib
import os
import re
import shutil
import urllib.parse
import urllib.request

from minisae.models.http import Deadline, HTTPFailure, stream
from minisae.utils import cache_dir, crash_point, remove_stale

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


def default_cache_dir() -> str:
    return str(cache_dir())


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
