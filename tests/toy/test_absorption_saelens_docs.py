"""Chapter 10's comparison with SAELens (`### Against SAELens`, in 10.4) quotes the file
`python benchmarks/absorption_saelens.py` writes (benchmarks/results/absorption_saelens.json):
its table, rebuilt here from that file, and the numbers its text quotes must appear in the
chapter verbatim; after a re-run, this test prints the table to paste.

And the benchmark's SAELens side is SAELens's Matryoshka training: one step of its
SAETrainer, as the benchmark builds it, on the same weights and batch as one step of
minisae's trainer, gives the same loss, term by term, and the same selected latents; its
learning-rate schedule and dead-latent rule are minisae's, step for step."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = ROOT / "docs" / "10_absorption.md"
RESULTS = ROOT / "benchmarks" / "results" / "absorption_saelens.json"
ONE_THREAD = ROOT / "benchmarks" / "results" / "absorption_saelens_1thread.json"  # --threads 1
NAMES = {"minisae": "minisae", "saelens": "SAELens"}


def results_table(results: dict) -> str:
    """One row per library: means over the seeds, each seed's absorption, samples/s (median
    of the calls) and the speed against SAELens's."""
    lines = ["| library | L0 | FVU | MCC | F1 | absorption rate | absorption by seed | samples/s | speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = results["libraries"]["saelens"]["samples_per_s"]
    for name, side in results["libraries"].items():
        m = side["mean"]
        seeds = " / ".join(f"{r['absorption']:.2f}" for r in side["per_seed"])
        lines.append(f"| {NAMES[name]} | {m['l0']:.2f} | {m['fvu']:.4f} | {m['mcc']:.3f} | {m['f1']:.3f} "
                     f"| {m['absorption']:.3f} | {seeds} | {side['samples_per_s']:,.0f} "
                     f"| {side['samples_per_s'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def quotes(results: dict, one_thread: dict) -> list:
    """The numbers the subsection's text quotes, each in the phrase that quotes it."""
    libs = results["libraries"]
    calls = lambda r, name: r["libraries"][name]["call_seconds"]
    seconds = lambda r, name: ", ".join(f"{s:.0f}" for s in calls(r, name))
    span = lambda r, name: f"{min(calls(r, name)):.1f} to {max(calls(r, name)):.1f} s"
    pairs = [b / a for a, b in zip(calls(results, "minisae"), calls(results, "saelens"))]
    mcc = lambda name: " and ".join(", ".join(f"{r['mcc']:.3f}" for r in libs[name]["per_seed"]).rsplit(", ", 1))
    return [
        f"sae-lens {results['versions']['sae_lens']}, torch {results['versions']['torch']}",
        f"load average {results['loadavg_start'][0]:.1f} at the start and {results['loadavg_end'][0]:.1f} at the end",
        f"minisae's calls took {seconds(results, 'minisae')} s, SAELens's {seconds(results, 'saelens')} s",
        f"anything from {min(pairs):.2f}x to {max(pairs):.2f}x",
        f"minisae trains at {results['ratio']:.2f}x SAELens's samples/s",
        f"({mcc('saelens')} against {mcc('minisae')})",
        (f"minisae trains at {one_thread['ratio']:.2f}x SAELens's samples/s, with calls of "
         f"{span(one_thread, 'minisae')} against {span(one_thread, 'saelens')}"),
    ]


def section(chapter: str) -> str:
    """The text of `### Against SAELens`, which must close 10.4 (just before 10.5)."""
    start = chapter.index("### Against SAELens")
    assert chapter.index("## 10.4") < start < chapter.index("## 10.5"), "the subsection must close 10.4"
    return chapter[start:chapter.index("## 10.5")]


def test_chapter_10_saelens_table_and_numbers_come_from_the_results_file():
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    one_thread = json.loads(ONE_THREAD.read_text(encoding="utf-8"))
    text = section(CHAPTER.read_text(encoding="utf-8"))
    table = results_table(results)
    assert table in text, f"the chapter's SAELens table differs from {RESULTS.name}; it should read:\n{table}"
    prose = " ".join(text.split())  # a quote may wrap over lines
    stale = [q for q in quotes(results, one_thread) if q not in prose]
    assert not stale, f"docs/10_absorption.md no longer quotes {RESULTS.name}: {stale}"
    assert "python benchmarks/absorption_saelens.py" in text
    # the run is the one the chapter describes: both sides fed the same steps and samples
    s = results["settings"]
    assert s["k"] == 4 and s["prefixes"] == [2, 4, 8, 16, 32, 64, 128] and s["samples"] == s["steps"] * s["batch_size"]
    assert all(len(side["per_seed"]) == len(s["seeds"]) for side in results["libraries"].values())
    assert s["threads"] == 2 and one_thread["settings"]["threads"] == 1
    # "the scores are the same" on one thread: the same training, timed differently
    for name, side in results["libraries"].items():
        assert side["mean"] == pytest.approx(one_thread["libraries"][name]["mean"], abs=5e-4)


def benchmark():
    """benchmarks/absorption_saelens.py as a module (it imports benchmarks/timing.py)."""
    pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[formats]')")
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("absorption_saelens", ROOT / "benchmarks" / "absorption_saelens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def both_sides(bench, B=64, seed=5):
    """minisae's Matryoshka SAE with every parameter random (unit decoder rows), the
    benchmark's SAELens SAE with the same weights, a batch, minisae's TrainConfig."""
    from minisae.configs import AbsorptionConfig
    from minisae.sae import make_sae
    cfg = AbsorptionConfig(batch_size=B)
    ours = make_sae(bench.VARIANT, cfg.dim, cfg.n_latents, seed=seed, **bench.SETTINGS[bench.VARIANT])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.W_enc.copy_(torch.randn(ours.W_enc.shape, generator=g) * 0.5)
        ours.b_enc.copy_(torch.randn(ours.b_enc.shape, generator=g) * 0.5)
        ours.b_dec.copy_(torch.randn(ours.b_dec.shape, generator=g) * 0.5)
        ours.unit_norm_decoder_()
    part = ours.activation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bench.saelens_sae(cfg.dim, cfg.n_latents, part.k, part.prefixes, part.aux_coef,
                                   part.threshold_momentum, seed)
    with torch.no_grad():
        theirs.W_enc.copy_(ours.W_enc.T)  # SAELens: pre = (x - b_dec) @ W_enc + b_enc, W_enc (D, F)
        theirs.b_enc.copy_(ours.b_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_dec.copy_(ours.b_dec)
    x = torch.randn(B, cfg.dim, generator=g) * 2  # (B, D)
    return ours, theirs, x, bench.train_config(cfg, 10, seed)


@pytest.mark.formats
@pytest.mark.slow  # importing sae_lens takes seconds
def test_the_benchmarks_saelens_side_is_saelens_matryoshka_loss():
    bench = benchmark()
    from sae_lens import MatryoshkaBatchTopKTrainingSAE

    from minisae.train import Trainer
    ours, theirs, x, tcfg = both_sides(bench)
    assert type(theirs) is MatryoshkaBatchTopKTrainingSAE and theirs.cfg.architecture() == "matryoshka_batchtopk"
    assert theirs.cfg.matryoshka_widths == list(ours.activation.prefixes) and theirs.cfg.k == ours.activation.k
    trainer = bench.saelens_trainer(theirs, iter([x]), tcfg, ours.activation.dead_after)
    out = trainer.step(x)  # SAELens's training step: its training_forward_pass, loss, clipping, Adam
    mine = Trainer(ours, tcfg, log=False)
    from minisae.sparse_decode import loss_function
    _, parts = loss_function(ours)(x, 1.0)  # the step's terms, on the weights before the step
    mine.step(x)
    close = lambda a, b: abs(a.item() - b.item()) <= 1e-5 * max(abs(b.item()), 1e-30)
    assert close(out.loss, mine.losses[0]), (out.loss.item(), mine.losses[0].item())
    inner = sum(v for k, v in out.losses.items() if k.startswith("inner_mse_loss_"))
    assert len([k for k in out.losses if k.startswith("inner_mse_loss_")]) == len(ours.activation.prefixes) - 1
    assert close(out.losses["mse_loss"], parts["recon"]) and close(inner, parts["prefixes"])
    assert out.losses["auxiliary_reconstruction_loss"].item() == 0 == parts["auxk"].item()  # nothing dead at step 0
    code = parts["code"]
    assert set(zip(*out.feature_acts.nonzero().T.tolist())) == set(zip(code.rows.tolist(), code.cols.tolist()))


@pytest.mark.formats
@pytest.mark.slow
def test_the_benchmarks_saelens_schedule_and_dead_rule_are_minisaes():
    bench = benchmark()
    from minisae.train import lr_at
    ours, theirs, _, _ = both_sides(bench)
    tcfg = bench.train_config(bench.AbsorptionConfig(), 585, 0)  # the benchmark's 585 steps
    trainer = bench.saelens_trainer(theirs, iter([]), tcfg, ours.activation.dead_after)
    lrs = []
    for _ in range(585):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: a no-op, in the trainer's order
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([lr_at(s, 585, tcfg) for s in range(585)], rel=1e-6, abs=1e-12)
    window, B, dead_after = trainer.cfg.dead_feature_window, tcfg.batch_size, ours.activation.dead_after
    # steps since a latent last fired -> dead? minisae counts samples, SAELens steps
    assert all((t * B >= dead_after) == (t > window) for t in range(100))
