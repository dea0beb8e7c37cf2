"""Download a file once, check it, keep it in a local cache.

    cached_path(url) -> local path:  <cache>/<host>/<url path>, downloaded on first use
    hub_file(repo, path, revision)   the same for a file of a Hugging Face hub repository,
                                     checked against the sha256 the hub states for it

The cache is `~/.cache/minisae` (override with the MINISAE_CACHE environment variable or
the `cache_dir` argument). A download streams into a temporary file next to its final
place, is checked against a pinned sha256 when we know one, and only then renamed into
place (an atomic rename on one filesystem): an interrupted or corrupt download never
leaves a file that a later run would mistake for a good one. A file already in the cache
is not hashed again, since only verified (or unpinned) downloads are ever renamed there.
"""

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from minisae.utils import Progress

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


def default_cache_dir() -> str:
    from minisae.utils import cache_dir
    return str(cache_dir())


def download(url: str, dest, sha256=None, progress: bool = True, timeout: float = 60) -> str:
    """Stream `url` to `dest` through a temporary file; check sha256 (if given) before the
    atomic rename. On any failure the temporary file is deleted and the error re-raised."""
    dest = os.path.abspath(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".download-", suffix=".part")
    name = os.path.basename(dest)
    try:
        digest, done, bar = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            bar = Progress(name, total, "MB", scale=1e6) if progress else None
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if bar:
                    bar.update(done)  # redraws twice a second at most
        if bar:
            bar.close(done)
        if total and done != total:
            raise OSError(f"download of {url} stopped after {done} of {total} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; "
                             "the download was deleted (corrupt transfer, or the file changed upstream)")
        os.replace(tmp, dest)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def cached_path(url: str, cache_dir=None, sha256=None, progress: bool = True) -> str:
    """Local path of `url` in the cache, downloading it first if absent. `sha256` defaults
    to the pinned hash for known URLs."""
    dest = cache_location(url, cache_dir)
    if not os.path.isfile(dest):
        download(url, dest, sha256=sha256 or PINNED_SHA256.get(url), progress=progress)
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


def hub_sha256(url: str, timeout: float = 60):
    """The sha256 the hub states for the file at `url` (its X-Linked-Etag, read from the
    first answer, before any redirect), or None if it states none. ValueError for a file
    that is not there."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # keep the hub's own answer: the storage host does not repeat the header

    try:
        response = urllib.request.build_opener(NoRedirect).open(urllib.request.Request(url, method="HEAD"),
                                                                timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise ValueError(f"{url}: HTTP {e.code} {e.reason} (no such repository, revision or file?)") from None
        response = e
    etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").removeprefix("W/")
    etag = etag.strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


def hub_file(repo: str, path: str, revision: str = "main", cache_dir=None, progress: bool = True) -> str:
    """Local path of one file of a hub repository, downloaded into the cache on first use
    and checked against the sha256 the hub states for it."""
    url = hub_url(repo, path, revision)
    dest = cache_location(url, cache_dir)
    if not os.path.isfile(dest):
        download(url, dest, sha256=hub_sha256(url), progress=progress)
    return dest
