"""`lm --one-pass` (minisae.pipeline.sweep.train_in_one_pass) against the sweep one SAE at a
time (train_and_evaluate): on stored activations of a tiny random GPT-2, every variant's
SAE comes out the same, row for row (the timings aside) and weight for weight."""

import pytest
import torch

from minisae.configs import SweepConfig
from minisae.models.gpt2 import GPT2, GPT2Config
from minisae.pipeline import evaluate
from minisae.pipeline.activations import collect_activations
from minisae.pipeline.hooked_sae import HookedSAE
from minisae.pipeline.store import load_activations
from minisae.pipeline.sweep import train_and_evaluate, train_in_one_pass

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = [("relu", "sparsity_coef", 1.0), ("gated", "sparsity_coef", 1.0), ("topk", "k", 4),
        ("jumprelu", "sparsity_coef", 0.2), ("batchtopk", "k", 4), ("topk", "k", 8)]
TIMES = ("train_seconds", "eval_seconds")


def test_a_sweep_in_one_pass_equals_the_sweep_one_at_a_time(tmp_path):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, d_model=16, n_ctx=32, vocab_size=50)).eval()
    hook = "blocks.1.hook_resid_post"
    collect_activations(model, torch.randint(0, 50, (40, 12)), hook, tmp_path / "acts.npy", model_name="tiny",
                        corpus={}, batch_size=8, seed=3, verbose=False)
    acts, meta = load_activations(tmp_path / "acts.npy", model_name="tiny", hook=hook)
    heldout = torch.randint(0, 50, (4, 12))  # (N, T)
    base = evaluate.baselines(model, heldout, hook, meta["mean"], max_norm=meta["max_norm"], verbose=False,
                              with_sinks=True)
    cfg = SweepConfig(model="tiny", tokens=12 * 64, batch_size=64, expansion=2, lr=1e-2, out=tmp_path, one_pass=True)
    names = [f"{v}-{k}{x}" for v, k, x in KEYS]
    together = train_in_one_pass(cfg, model, acts, meta, heldout, base, KEYS, [f"one-{n}" for n in names])
    for key, name, row in zip(KEYS, names, together):
        alone = train_and_evaluate(cfg, model, acts, meta, heldout, base, *key, name=f"alone-{name}")
        assert row["sae"] == f"saes/one-{name}" and alone["sae"] == f"saes/alone-{name}"
        strip = lambda r: {k: v for k, v in r.items() if k not in TIMES + ("sae",)}
        assert strip(row) == strip(alone), key
        a, b = (HookedSAE.load(tmp_path / "saes" / f"{which}-{name}").sae.state_dict() for which in ("one", "alone"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), key
    l0_k4, l0_k8 = (r["l0"] for r in together if r["variant"] == "topk")
    assert 3 < l0_k4 <= 4 < l0_k8 <= 8  # each SAE its own k: no SAE took another's place
