"""`python -m minisae layers`: the layer-spec parser, the one-pass multi-hook collector against
activations.collect_activations run once per hook (the naive reference), and the command
end to end on gpt2-random (4 layers, random weights, the real GPT-2 vocabulary from
$MINISAE_GPT2_TOKENIZER_DIR), in chunks of two layers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from minisae import formats
from minisae.__main__ import main
from minisae.pipeline.activations import collect_many as collect_layers  # the one-pass collector layers uses
from minisae.pipeline.layers import parse_layers

# small tensors: one thread avoids torch's spin-waiting threads on a busy CPU (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

LM_KEYS = {"variant", "knob", "value", "l0", "fvu", "ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl",
           "loss_recovered_zero", "loss_recovered_mean", "dead_frac", "train_tokens", "train_seconds", "sae"}


def test_parse_layers():
    assert parse_layers("0-29", 30) == list(range(30))
    assert parse_layers("0-29:2", 30) == list(range(0, 30, 2))
    assert parse_layers("1-29:2", 30) == list(range(1, 30, 2))
    assert parse_layers("10,5,0,5", 30) == [0, 5, 10]
    assert parse_layers("3", 4) == [3]
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    for spec, message in (("0-4", "layers 0..3"), ("a-b", "expected e.g."), ("3-1", "no layers"), ("", "expected e.g.")):
        with pytest.raises(ValueError, match=message):
            parse_layers(spec, 4)


def test_collect_layers_matches_one_collection_per_hook(tmp_path):
    from minisae.pipeline.activations import collect_activations
    from minisae.pipeline.store import load_activations
    from minisae.pipeline.rate import RATE_KEYS
    from minisae.models.gpt2 import GPT2, GPT2Config
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=3, n_head=2, d_model=16, n_ctx=32, vocab_size=50)).eval()
    contexts = torch.randint(0, 50, (20, 12))  # (N, T)
    # not in forward order, two sites: the pass must still reach the deepest one
    hooks = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    paths = [tmp_path / f"multi-{h}.npy" for h in hooks]
    metas = collect_layers(model, contexts, hooks, paths, model_name="tiny", corpus={"c": 1},
                           batch_size=8, seed=3, verbose=False)
    for hook, path, meta in zip(hooks, paths, metas):
        ref = collect_activations(model, contexts, hook, tmp_path / f"ref-{hook}.npy", model_name="tiny",
                                  corpus={"c": 1}, batch_size=8, seed=3, verbose=False)
        what = lambda m: {k: v for k, v in m.items() if k != "file" and k not in RATE_KEYS}  # noqa: E731
        assert what(meta) == what(ref)  # the same rows and metadata; only the speed differs
        ours, side = load_activations(path, model_name="tiny", hook=hook)
        theirs, _ = load_activations(tmp_path / f"ref-{hook}.npy")
        assert side == meta and ours.shape == (20 * 11, 16)
        np.testing.assert_array_equal(ours, theirs)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="unknown hook point"):
        collect_layers(model, contexts, ["blocks.3.hook_resid_post"], [tmp_path / "x.npy"], verbose=False)


@pytest.mark.parametrize("args, message", [
    (["--variant", "sparse"], "valid variants"),
    (["--setting", "k=8,16"], "takes one"),
    (["--setting", "k8"], "bad --setting 'k8'; expected KNOB=VALUE"),  # it names the flag given, not --sweep
    (["--tokens", "0"], "must be positive"),
])
def test_bad_input_before_any_work(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        main(["layers", "--model", "gpt2-random", "--out", str(tmp_path), *args])


needs_vocab = pytest.mark.skipif(
    not (os.environ.get("MINISAE_GPT2_TOKENIZER_DIR") and
         (Path(os.environ["MINISAE_GPT2_TOKENIZER_DIR"]) / "encoder.json").exists()),
    reason="set MINISAE_GPT2_TOKENIZER_DIR to a folder with GPT-2's encoder.json + vocab.bpe")


@needs_vocab
@pytest.mark.slow
def test_layers_gpt2_random(tmp_path):
    from minisae.pipeline.store import sidecar_path
    # 16 contexts * 127 tokens * 64 dims * 4 bytes = 0.52 MB per layer: chunks of 2 layers
    main(["layers", "--model", "gpt2-random", "--site", "resid_post", "--variant", "topk", "--setting", "k=8",
          "--tokens", "2048", "--eval-tokens", "256", "--expansion", "2", "--batch-size", "512",
          "--max-disk-gb", "0.0011", "--keep-acts", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "layers_results.json").read_text())
    assert (res["model"], res["site"], res["variant"], res["knob"], res["value"]) == ("gpt2-random", "resid_post", "topk", "k", 8)
    assert [r["layer"] for r in res["rows"]] == [0, 1, 2, 3]
    for r in res["rows"]:
        hook = f"blocks.{r['layer']}.hook_resid_post"
        assert LM_KEYS <= set(r) and r["hook"] == hook
        assert r["l0"] == 8.0  # TopK: exactly k active per token
        sae, meta = formats.load(tmp_path / r["sae"])
        assert meta["hook"] == hook and meta["folded_scale"] == r["scale"] and sae.n_latents == 128
        # each layer's own activations: its sidecar's scale, and a mean of its own
        side = json.loads(sidecar_path(tmp_path / f"acts-gpt2-random-{hook}.npy").read_text())
        assert side["hook"] == hook and side["scale"] == r["scale"] and side["n_tokens"] == 16 * 127
    assert len({r["scale"] for r in res["rows"]}) == 4 and len({r["ce_mean"] for r in res["rows"]}) == 4
    assert len({r["ce_clean"] for r in res["rows"]}) == 1  # one model, one held-out set
    assert (tmp_path / "layers_depth.png").stat().st_size > 1000


@needs_vocab
@pytest.mark.slow
def test_layers_deletes_activations_by_default(tmp_path):
    main(["layers", "--model", "gpt2-random", "--layers", "1,3", "--setting", "k=4", "--tokens", "1024",
          "--eval-tokens", "256", "--expansion", "2", "--batch-size", "512", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "layers_results.json").read_text())
    assert [r["layer"] for r in res["rows"]] == [1, 3] and res["site"] == "resid_post"
    assert not list(tmp_path.glob("acts-*")) and len(list((tmp_path / "saes").glob("*/cfg.json"))) == 2


@needs_vocab
@pytest.mark.slow
def test_layers_in_one_pass_equals_layer_by_layer(tmp_path, capsys):
    """--one-pass: a chunk's SAEs trained together, each on its own layer's batches
    (multi_train own_batches): the same rows (timings aside) and the same weights, bit for
    bit, as layer by layer; with --stack on (the two layers' SAEs stacked), TopK's L0 is
    still exactly k and every row is there."""
    from minisae.pipeline.hooked_sae import HookedSAE
    common = ["layers", "--model", "gpt2-random", "--layers", "1,3", "--setting", "k=4", "--tokens", "1024",
              "--eval-tokens", "256", "--expansion", "2", "--batch-size", "256"]
    runs = {}
    for name, flags in (("alone", []), ("one", ["--one-pass"]), ("stacked", ["--one-pass", "--stack", "on"])):
        main([*common, *flags, "--out", str(tmp_path / name)])
        assert ("2 SAEs in one pass" in capsys.readouterr().err) == bool(flags)
        runs[name] = json.loads((tmp_path / name / "layers_results.json").read_text())["rows"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("train_seconds", "eval_seconds")}  # noqa: E731
    assert [strip(r) for r in runs["one"]] == [strip(r) for r in runs["alone"]]
    for a, b in zip(runs["one"], runs["alone"]):
        sa, sb = (HookedSAE.load(tmp_path / which / r["sae"]).sae.state_dict() for which, r in (("one", a), ("alone", b)))
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["layer"] for r in runs["stacked"]] == [1, 3] and all(r["l0"] == 4.0 for r in runs["stacked"])
