"""How well does an SAE recover features we know? Metrics against the ground truth of
synthetic data (toy_models/sparse_features.py): true codes c (N, G) and directions
g (G, D), against the SAE's codes f (N, F) and decoder rows W_dec (F, D).

    matching     a one-to-one assignment of features to latents, m: feature -> latent,
                 maximising the total similarity sum_i S[i, m(i)] (Hungarian algorithm,
                 `linear_sum_assignment`); with F < G some features stay unmatched (-1)
    MCC          mean correlation coefficient (Hyvarinen & Morioka 2016; for SAEs Song et
                 al. 2025, "Position: ... Prioritize Feature Consistency in SAEs"):
                 S[i, j] = |Pearson corr(c_i, f_j)| over the samples, matched one to one,
                 MCC = (1/G) sum_i S[i, m(i)]  (an unmatched feature counts 0).
                 `mcc_decoder` is the same with S[i, j] = |cos(g_i, W_dec_j)|, the
                 definition SAELens's synthetic evals use; it needs no samples
    uniqueness   each feature's best latent b(i) = argmax_j cos(g_i, W_dec_j);
                 uniqueness = |{b(i)}| / G: 1 when every feature has its own latent
    detection    latent m(i) as a detector of feature i: fired = f_m(i) != 0, truth =
                 c_i > 0; precision TP/(TP+FP), recall TP/(TP+FN), F1 their harmonic
                 mean (0 when undefined), per feature; SAELens reports the mean
    absorption   for a parent p with children K(p) (a child fires only with its parent):
                 over the samples where p and one of its children k are active,
                     A_p = #{ f_m(p) = 0  and  f_m(k) != 0 } / #{ c_p > 0 and c_k > 0 }:
                 the parent's latent is silent because the child's latent carries the
                 parent direction (Chanin et al. 2024, "A is for Absorption"). The truth
                 itself (f = c) scores 0; samples where p fires alone cannot show it
    splitting    each latent's best feature a(j) = argmax_i cos(g_i, W_dec_j), kept
                 when that cosine is > threshold; n_i = #{j : a(j) = i}; n_i > 1: feature
                 i is split over several latents (Bricken et al. 2023, "feature splitting")
"""

import numpy as np
import torch

from minisae.metrics import cosine_matrix


def linear_sum_assignment(cost):
    """The one-to-one matching of rows to columns of cost (n, m) with the least total
    cost, min(n, m) pairs: (rows, cols) int arrays, rows increasing (as scipy's).

    Kuhn-Munkres with potentials, O(n^2 m) (the e-maxx formulation of Jonker-Volgenant
    shortest augmenting paths), for n <= m (else solve the transpose). Potentials u (rows),
    v (columns) keep every reduced cost a[i, j] - u[i] - v[j] >= 0 and are 0 on matched
    pairs. Row i is added by growing a tree of tight edges from it (Dijkstra on reduced
    costs: minv[j] the cheapest way to reach column j, way[j] the column before it) until
    it reaches a free column, then the matching flips along the path. Index 0 is a
    virtual column; p[j] is the row (1-based) matched to column j, 0 = free."""
    a = np.asarray(cost, dtype=np.float64)  # (n, m)
    if not np.isfinite(a).all():
        raise ValueError("the cost matrix must be finite")
    transposed = a.shape[0] > a.shape[1]
    if transposed:
        a = a.T
    n, m = a.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials, (n+1,), (m+1,)
    p = np.zeros(m + 1, dtype=np.int64)  # (m+1,) row matched to each column
    way = np.zeros(m + 1, dtype=np.int64)  # (m+1,) previous column on the path
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)  # (m+1,)
        used = np.zeros(m + 1, dtype=bool)  # (m+1,) columns in the tree
        while True:  # grow the tree until it reaches a free column
            used[j0] = True
            i0, free = p[j0], ~used[1:]  # free: (m,)
            cur = a[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            better = free & (cur < minv[1:])
            minv[1:][better], way[1:][better] = cur[better], j0
            j1 = 1 + np.argmin(np.where(free, minv[1:], np.inf))  # the closest column outside the tree
            delta = minv[j1]
            u[p[used]] += delta  # shift potentials: the tree's edges stay tight
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # flip the matching along the path back to the virtual column
            j1 = way[j0]
            p[j0], j0 = p[j1], j1
    cols = np.nonzero(p[1:])[0]  # matched columns (0-based)
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def match(similarity) -> torch.Tensor:
    """m (G,): the latent matched to each feature, maximising the total similarity
    (G, F); -1 for features left unmatched when F < G."""
    rows, cols = linear_sum_assignment(-similarity.double().cpu().numpy())
    m = torch.full((similarity.shape[0],), -1, dtype=torch.long)  # (G,)
    m[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return m


def correlation_matrix(c, f):
    """Pearson correlations (G, F) between the columns of c (N, G) and f (N, F); 0 for a
    constant column (a feature never active, a latent never firing)."""
    c, f = c.double() - c.double().mean(0), f.double() - f.double().mean(0)  # (N, G), (N, F)
    cn, fn = c.norm(dim=0), f.norm(dim=0)  # (G,), (F,)
    corr = (c.T @ f) / (cn[:, None] * fn[None, :]).clamp_min(1e-30)  # (G, F)
    return corr * (cn[:, None] > 1e-12) * (fn[None, :] > 1e-12)


def matched_mean(similarity):
    """(mean over features of the matched similarity, m (G,))."""
    m = match(similarity)
    got = similarity[torch.arange(len(m)), m.clamp_min(0)] * (m >= 0)  # (G,)
    return got.mean().item(), m


def mcc(c, f):
    """(MCC of the codes, m (G,) their one-to-one matching)."""
    return matched_mean(correlation_matrix(c, f).abs())


def mcc_decoder(truth, W_dec):
    """(MCC of the directions g (G, D) and decoder rows (F, D), m (G,))."""
    return matched_mean(cosine_matrix(truth.double(), W_dec.double()).abs())


def uniqueness(truth, W_dec) -> float:
    best = cosine_matrix(truth, W_dec).argmax(1)  # (G,) each feature's best latent
    return best.unique().numel() / truth.shape[0]


def matched_fires(f, m):
    """(N, G): whether the latent matched to each feature fires (False if unmatched)."""
    return (f[:, m.clamp_min(0)] != 0) & (m >= 0)


def detection(c, f, m) -> dict:
    """Precision, recall, F1 (G,) of latent m(i) as a detector of feature i (0 where
    unmatched or undefined)."""
    truth = c > 0  # (N, G)
    fired = matched_fires(f, m)  # (N, G)
    tp = (fired & truth).sum(0).double()  # (G,)
    precision = tp / fired.sum(0).clamp_min(1)  # (G,)
    recall = tp / truth.sum(0).clamp_min(1)  # (G,)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-30)  # (G,)
    return {"precision": precision, "recall": recall, "f1": f1}


def absorption(c, f, parents: dict, m) -> dict:
    """A_p per parent (None where the parent never fired with a child) and their mean.
    parents: {parent: [children]}; m (G,) the feature -> latent matching."""
    fired = matched_fires(f, m)  # (N, G)
    per_parent = {}
    for p, kids in parents.items():
        absorbed, count = 0, 0
        for k in kids:
            both = (c[:, p] > 0) & (c[:, k] > 0)  # (N,) parent and this child active
            absorbed += (both & ~fired[:, p] & fired[:, k]).sum().item()
            count += both.sum().item()
        per_parent[p] = absorbed / count if count else None
    rates = [r for r in per_parent.values() if r is not None]
    return {"per_parent": per_parent, "mean": sum(rates) / len(rates) if rates else None}


def splitting(truth, W_dec, threshold: float = 0.5) -> torch.Tensor:
    """n (G,): latents whose best feature is i with cosine > threshold."""
    cos = cosine_matrix(truth, W_dec)  # (G, F)
    best, best_cos = cos.argmax(0), cos.max(0).values  # (F,), (F,)
    return torch.bincount(best[best_cos > threshold], minlength=truth.shape[0])  # (G,)


@torch.no_grad()
def truth_report(c, f, truth, W_dec, parents: dict) -> dict:
    """Every number above for one SAE: codes f (N, F) of samples whose truth is c (N, G).
    The matching for detection and absorption is MCC's (by the codes)."""
    mcc_codes, m = mcc(c, f)
    det = detection(c, f, m)
    n_split = splitting(truth, W_dec)  # (G,)
    absorbed = absorption(c, f, parents, m)
    return {"mcc": mcc_codes, "mcc_decoder": mcc_decoder(truth, W_dec)[0], "uniqueness": uniqueness(truth, W_dec),
            "precision": det["precision"].mean().item(), "recall": det["recall"].mean().item(),
            "f1": det["f1"].mean().item(), "absorption": absorbed["mean"],
            "absorption_per_parent": absorbed["per_parent"],
            "split_frac": (n_split > 1).float().mean().item(),
            "latents_per_tracked_feature": n_split[n_split > 0].float().mean().item() if (n_split > 0).any() else 0.0,
            "matching": m.tolist()}
