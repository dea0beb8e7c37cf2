"""A circuit for one prompt: an attribution graph across layers, pruned to what moves one logit.

Residual-stream SAEs at hooks h_1 < ... < h_n, a prompt of T tokens (BOS first). At every
SAE layer k and position t the activation is the sum of its nodes:

    x_k(t) = sum_i f_k,i(t) d_k,i + b_k + e_k(t)      d_k,i = W_dec_k[i] / scale_k,  b_k = b_dec_k / scale_k
    e_k(t) = x_k(t) - x_hat_k(t)                      the error node (where the SAE does not read,
                                                      BOS and sinks, f = 0 and e_k(t) = x_k(t) - b_k)

Nodes (Marks et al. 2024, "Sparse Feature Circuits"; Ameisen et al. 2025, circuit-tracer):

    embedding  x_0(t), the residual stream entering block 0           one per position  (layer 0)
    latent     f_k,i(t) d_k,i, an active latent of SAE k               value f_k,i(t)    (layer k)
    error      e_k(t)                                                  one per position  (layer k)
    logit      the top logits at the last position, the target among them               (layer n+1)

Edges. Every block between h_k and h_k+1 reads and writes the residual stream, so x_k+1
is a function of x_k alone, hence of layer k's nodes: they are the only paths. An edge
from a node u of layer k (vector v_u at position t) to a scalar y of layer k+1 (a latent
code f_k+1,j(s) or a logit) is gradient x activation (attribution patching, Syed et al.
2023), through the model's own blocks between the two hooks:

    A[y, u] = v_u . dy/dx_k(t)         (minisae/interp/attribution.py, per position)

One backward pass per y, batched: dy/dx_k+1(s) = f_j'(pre_j(s)) scale W_enc[j] for a latent
(attribution.slopes), the unembedding's gradient for a logit. Error nodes and embeddings
have no incoming edges: they are held at their values (frozen), as in circuit-tracer.

Total attribution to the target logit. A latent y writes f_y d_y, so a change dv of its
code moves its node by dv / f_y of itself; chaining the edges per unit of the node in the
middle,

    M[y, u] = A[y, u] / f_y   (y a latent),   M[y, u] = A[y, u]   (y a logit)
    total(u) = (w M + w M^2 + ...)[u]          w: 1 at the target logit, 0 elsewhere

which is d logit / d alpha_u in the replacement model: each SAE spliced in at its hook with
its error frozen at the clean value, node u scaled by alpha_u (`replacement_logits`; the
tests check it against finite differences). It predicts the change of the logit when u is
ablated: -total(u), to first order.

Pruning (circuit-tracer's graph.prune_graph, rewritten): normalise each row of |A| to sum 1
(the share of y's input that comes from each u), let influence flow back from the target,

    influence = w An + w An^2 + ...            An[y, u] = |A[y, u]| / sum_u' |A[y, u']|

keep the nodes with the largest influence until they hold `node_threshold` of the total
(embeddings and logits always), then the edges scored An[y, u] (w + influence)[y] in the
graph of kept nodes until `edge_threshold` of the edge score; drop the nodes left without an
outgoing edge (and latents without an incoming one), until nothing changes.
"""

from dataclasses import dataclass, field

import torch

from minisae.interp.attribution import codes, slopes

MAX_GRAPH_BYTES = 2 * 2**30  # one dense adjacency; pruning holds a few more of its size

EMBED = "blocks.0.hook_resid_pre"  # the embeddings: the residual stream entering block 0


@dataclass
class Graph:
    tokens: list  # (T,) prompt token ids, BOS first
    hooks: list  # the SAEs' hooks, in forward order (layer k = hooks[k - 1])
    kind: list  # (N,) per node: "embedding", "latent", "error" or "logit"
    layer: torch.Tensor  # (N,) 0 embedding, 1..n SAE layers, n + 1 logits
    pos: torch.Tensor  # (N,) position in the prompt (logits: T - 1)
    index: torch.Tensor  # (N,) the latent's index, the logit's token id, -1 otherwise
    value: torch.Tensor  # (N,) a latent's code, a logit's value, the norm of an error or embedding vector
    adjacency: torch.Tensor  # (N, N) float64, A[target, source]
    target: int  # the node of the target logit
    probs: torch.Tensor  # (N,) next-token probability of each logit node, 0 elsewhere
    real_total: torch.Tensor = None  # (N,) v_u . d logit / dx_k(t) in the real model (no frozen errors)
    errors: list = field(default_factory=list, repr=False)  # per SAE layer (T, D): the clean e_k
    keeps: list = field(default_factory=list, repr=False)  # per SAE layer (T,): the positions it reads

    def weights(self):
        """w (N,): 1 at the target logit."""
        w = torch.zeros(len(self.kind), dtype=torch.float64)
        w[self.target] = 1.0
        return w

    def per_unit(self):
        """M (N, N): latent rows divided by the latent's code (see the module docstring)."""
        lat = torch.tensor([k == "latent" for k in self.kind])
        div = torch.where(lat, self.value.double(), torch.ones_like(self.value, dtype=torch.float64))
        return self.adjacency / div[:, None]

    def total(self):
        """(N,) each node's total attribution to the target logit, d logit / d alpha_u."""
        return influence(self.per_unit(), self.weights())


def check_hooks(model, hooks):
    names = model.hook_names()
    order = [names.index(h) for h in [EMBED, *hooks]]
    if any(b <= a for a, b in zip(order, order[1:])):
        raise ValueError(f"the SAEs' hooks must come after {EMBED} and each after the one before: {hooks}")


def _cut_forward(model, idx, hooks):
    """A forward pass cut at every hook: there the activation becomes a fresh leaf, so the
    graph from one hook to the next is its own. (logits (1, T, V), ins {hook: act as it
    arrives (1, T, D), a function of the previous leaf}, leaves {hook: (1, T, D)})."""
    ins, leaves = {}, {}

    def cut(name):
        def fn(act):
            ins[name], leaves[name] = act, act.detach().requires_grad_(True)
            return leaves[name]
        return fn

    with torch.enable_grad():
        logits = model(idx, hooks={h: cut(h) for h in [EMBED, *hooks]})  # (1, T, V)
    return logits, ins, leaves


def _grads(out, leaf, seeds, chunk):
    """d(seed_j . out)/d leaf for every seed (J, *out.shape), batched backward passes: (J, *leaf.shape)."""
    parts = [torch.autograd.grad(out, leaf, seeds[c:c + chunk].to(out.dtype), is_grads_batched=True,
                                 retain_graph=True)[0] for c in range(0, len(seeds), chunk)]
    return torch.cat(parts) if parts else seeds.new_zeros(0, *leaf.shape)


def build_graph(model, hsaes, idx, target=None, n_logits: int = 5, chunk: int = 64) -> Graph:
    """The unpruned graph of the prompt idx (1, T) for the hooked SAEs `hsaes` (in forward
    order); target: a token id (None: the top next-token logit at the last position)."""
    hooks = [h.hook for h in hsaes]
    check_hooks(model, hooks)
    T = idx.shape[1]
    logits, ins, leaves = _cut_forward(model, idx, hooks)
    last = logits[0, -1].detach()  # (V,)
    top = last.topk(n_logits).indices.tolist()
    target = top[0] if target is None else int(target)
    logit_ids = top if target in top else top + [target]

    # the nodes of each layer: (kind, pos, index, value, vector (D,))
    layers = [[("embedding", t, -1, v.norm().item(), v) for t, v in enumerate(leaves[EMBED][0].detach())]]
    errors, keeps = [], []
    for hs in hsaes:
        x = leaves[hs.hook][0].detach()  # (T, D)
        f, keep = codes(hs, x[None, 1:])  # (1, T-1, F), (1, T-1): positions 1.., 0 where it does not read
        f = torch.cat([torch.zeros_like(f[:, :1]), f], 1)[0]  # (T, F)
        keep = torch.cat([torch.zeros_like(keep[:, :1]), keep], 1)[0]  # (T,)
        e = x - hs.decode_raw(f).to(x.dtype)  # (T, D): x - x_hat where it reads, x - b elsewhere
        errors.append(e)
        keeps.append(keep)
        d = hs.sae.W_dec.detach() / hs.scale  # (F, D)
        nodes = [("latent", t, i, f[t, i].item(), f[t, i] * d[i]) for t, i in (f > 0).nonzero().tolist()]
        layers.append(nodes + [("error", t, -1, e[t].norm().item(), e[t]) for t in range(T)])
    probs = last.double().softmax(-1)  # (V,)
    layers.append([("logit", T - 1, v, last[v].item(), None) for v in logit_ids])

    offsets = [0]
    for nodes in layers:
        offsets.append(offsets[-1] + len(nodes))
    N = offsets[-1]
    if N * N * 8 > MAX_GRAPH_BYTES:  # the dense (N, N) matrix, and the pruning's copies of it
        raise ValueError(f"the graph has {N:,} nodes: its dense {N:,} x {N:,} adjacency needs "
                         f"{N * N * 8 / 2**30:.1f} GiB (limit {MAX_GRAPH_BYTES / 2**30:.0f} GiB); "
                         "use fewer layers (--layers), a shorter prompt or sparser SAEs")
    A = torch.zeros(N, N, dtype=torch.float64)
    for k in range(len(layers) - 1):  # edges from layer k into layer k + 1
        hook_k = EMBED if k == 0 else hooks[k - 1]
        out = logits if k == len(hsaes) else ins[hooks[k]]  # (1, T, V) or (1, T, D)
        targets = layers[k + 1]
        seeds = torch.zeros(len(targets), *out.shape, dtype=torch.float64)  # (J, 1, T, D|V)
        if k == len(hsaes):  # logits: d logit_v(T-1) / d logits
            for r, (_, _, v, _, _) in enumerate(targets):
                seeds[r, 0, T - 1, v] = 1.0
        else:  # latent j at s: dy/dx_k+1(s) = f_j'(pre_j(s)) scale W_enc[j]; error rows stay 0
            hs = hsaes[k]
            lat = [(r, s, j) for r, (kind, s, j, _, _) in enumerate(targets) if kind == "latent"]
            if lat:
                js = sorted({j for _, _, j in lat})
                slope = slopes(hs, ins[hs.hook][:, 1:].detach(), js)[:, 0]  # (J', T-1)
                col = {j: c for c, j in enumerate(js)}
                for r, s, j in lat:
                    seeds[r, 0, s] = slope[col[j], s - 1] * hs.scale * hs.sae.W_enc[j].detach()
        rows = [r for r in range(len(targets)) if seeds[r].any()]
        G = _grads(out, leaves[hook_k], seeds[rows], chunk)[:, 0].double()  # (J, T, D): dy/dx_k
        vecs = torch.stack([n[4] for n in layers[k]]).double()  # (S, D)
        pos = torch.tensor([n[1] for n in layers[k]])  # (S,)
        edge = torch.einsum("jtd,sd->jts", G, vecs)[:, pos, torch.arange(len(pos))]  # (J, S): v_u . dy/dx_k(t_u)
        A[offsets[k + 1] + torch.tensor(rows, dtype=torch.long)[:, None], offsets[k] + torch.arange(len(pos))] = edge

    flat = [n for nodes in layers for n in nodes]
    layer_of = [k for k, nodes in enumerate(layers) for _ in nodes]
    n_probs = torch.zeros(N, dtype=torch.float64)
    n_probs[offsets[-2]:] = probs[logit_ids]
    graph = Graph(tokens=idx[0].tolist(), hooks=hooks, kind=[n[0] for n in flat], layer=torch.tensor(layer_of),
                  pos=torch.tensor([n[1] for n in flat]), index=torch.tensor([n[2] for n in flat]),
                  value=torch.tensor([n[3] for n in flat], dtype=torch.float64), adjacency=A,
                  target=offsets[-2] + logit_ids.index(target), probs=n_probs, errors=errors, keeps=keeps)
    graph.real_total = _real_total(logits, ins, leaves, hooks, layers, offsets, target, T, N)
    return graph


def _real_total(logits, ins, leaves, hooks, layers, offsets, target, T, N):
    """(N,) v_u . d logit/dx_k(t) in the real model: the gradient chained back through every
    cut (errors not frozen), the first-order prediction of an ablation in the real model."""
    total = torch.zeros(N, dtype=torch.float64)
    g, = torch.autograd.grad(logits[0, T - 1, target], leaves[hooks[-1]], retain_graph=True)  # (1, T, D)
    for k in range(len(hooks), -1, -1):  # layer k = hooks[k - 1], 0 = the embeddings
        vecs = torch.stack([n[4] for n in layers[k]]).double()  # (S, D)
        pos = torch.tensor([n[1] for n in layers[k]])
        total[offsets[k]:offsets[k + 1]] = (g[0, pos].double() * vecs).sum(-1)
        if k > 0:
            below = EMBED if k == 1 else hooks[k - 2]
            g, = torch.autograd.grad(ins[hooks[k - 1]], leaves[below], g, retain_graph=True)
    return total


def replacement_logits(model, hsaes, graph, idx, scale=None):
    """Logits (1, T, V) of the replacement model: each SAE spliced in at its hook, f from the
    activation arriving there (at the clean run's positions), its error frozen at the clean
    e_k; scale {node: alpha} multiplies latent nodes (alpha 0: ablated)."""
    scale = scale or {}
    by_layer = {}
    for u, a in scale.items():
        if graph.kind[u] != "latent":
            raise ValueError(f"node {u} is a {graph.kind[u]} node; only latents are scaled here")
        by_layer.setdefault(int(graph.layer[u]), []).append((int(graph.pos[u]), int(graph.index[u]), a))

    def splice(k, hs):
        def fn(act):  # act (1, T, D)
            x = act[0]
            f = hs.sae.encode(x.to(hs.sae.W_dec.dtype) * hs.scale) * graph.keeps[k - 1][:, None]  # (T, F)
            if k in by_layer:
                f = f.clone()
                for t, i, a in by_layer[k]:
                    f[t, i] = f[t, i] * a
            return (hs.decode_raw(f).to(x.dtype) + graph.errors[k - 1])[None]  # (1, T, D)
        return fn

    return model(idx, hooks={hs.hook: splice(k, hs) for k, hs in enumerate(hsaes, 1)})


# ---------------------------------------------------------------- influence and pruning

def normalize(A):
    """|A| with each row summed to 1 (rows with no input stay 0): An[y, u], the share of y's input from u."""
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def influence(M, w, max_steps: int = 1000):
    """w M + w M^2 + ...: (N,). The graph is a DAG (edges only go up a layer), so the sum ends."""
    step = w @ M
    total = step.clone()
    for _ in range(max_steps):
        if not step.any():
            return total
        step = step @ M
        total += step
    raise ValueError("influence did not end: the adjacency matrix has a cycle")


def threshold_of(scores, fraction: float):
    """The smallest score of the shortest prefix of the scores, sorted down, that holds
    `fraction` of their sum: keeping scores >= it keeps at least that fraction."""
    s = scores.flatten()
    s = s[s > 0].sort(descending=True).values
    if len(s) == 0:
        return float("inf")
    cum = s.cumsum(0) / s.sum()
    i = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype)))
    return s[min(i, len(s) - 1)].item()


@dataclass
class Pruned:
    nodes: torch.Tensor  # (N,) bool: kept nodes
    edges: torch.Tensor  # (N, N) bool: kept edges
    node_influence: torch.Tensor  # (N,) each node's influence on the target (unpruned graph)
    node_step: torch.Tensor  # (N,) bool: the nodes kept by the node threshold alone


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Influence pruning (module docstring): the nodes, then the edges, then the nodes left
    without an outgoing edge (and latents without an incoming one), until nothing changes."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    A, w = graph.adjacency, graph.weights()
    kinds = graph.kind
    fixed = torch.tensor([k in ("embedding", "logit") for k in kinds])  # (N,) always kept
    lat = torch.tensor([k == "latent" for k in kinds])  # (N,)
    node_inf = influence(normalize(A), w)  # (N,)
    nodes = (node_inf >= threshold_of(node_inf[~fixed], node_threshold)) | fixed
    step = nodes.clone()
    kept = A * nodes[:, None] * nodes[None, :]  # (N, N): the graph of kept nodes
    An = normalize(kept)
    score = An * (influence(An, w) + w)[:, None]  # (N, N): edge (y <- u) scored by y's influence
    edges = (score >= threshold_of(score, edge_threshold)) & (score > 0)
    while True:
        before = nodes.clone()
        edges &= nodes[:, None] & nodes[None, :]
        nodes &= fixed | edges.any(0)  # an outgoing edge (column u)
        nodes &= ~lat | edges.any(1)  # a latent also needs an incoming edge (row y)
        if torch.equal(nodes, before):
            return Pruned(nodes, edges, node_inf, step)


def to_json(graph: Graph, pruned: Pruned) -> dict:
    """The pruned graph as plain data: kept nodes (with their total attribution and
    influence) and kept edges (source and target as node ids)."""
    total = graph.total()
    kept = pruned.nodes.nonzero()[:, 0].tolist()
    nodes = [{"id": u, "kind": graph.kind[u], "layer": int(graph.layer[u]), "pos": int(graph.pos[u]),
              "index": int(graph.index[u]), "value": graph.value[u].item(), "total": total[u].item(),
              "influence": pruned.node_influence[u].item()} for u in kept]
    edges = [{"source": u, "target": y, "weight": graph.adjacency[y, u].item()}
             for y, u in pruned.edges.nonzero().tolist()]
    return {"hooks": graph.hooks, "tokens": graph.tokens, "target": graph.target, "nodes": nodes, "edges": edges}
