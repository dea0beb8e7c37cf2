"""A one-vs-rest logistic-regression probe, and k-sparse probing of SAE latents (the first-letter
task of minisae/interp/first_letter.py uses both, with the 26 letters as its C classes).

The probe: one logistic regression per class, one against the rest (SAEBench's), on x (N, D)
    z   = (x - mu) / s                  mu the training mean, s the mean norm: a shift and a
                                        scalar, so w_l is a direction of the activation space
    s_l = w_l . z + c_l                 (C,) scores;  prediction argmax_l s_l
    L_l = sum_n omega_n BCE(s_l(x_n), [y_n = l]) + lam/2 ||w_l||^2,  omega = 1/(2 n_pos) on the
          class's examples and 1/(2 n_neg) on the others (balanced), fitted full batch by L-BFGS
    accuracy = P(argmax = y) on held-out examples; per class, that class's recall (and F1).
    p_l = w_l / ||w_l||                 the class's probe direction

k-sparse probing (Gurnee et al. 2023; SAEBench), on the SAE codes f (N, F) of the training examples
    delta_{l,i} = mean(f_i | y = l) - mean(f_i | y != l);   S_l(k) = the k largest delta_{l,.}
    the same logistic regression on f[:, S_l(k)] alone; F1 of s > 0 on the held-out examples
    main latents M_l = S_l(k*): k grows from 1 while the TRAINING F1 rises by more than
    `jump` (first-letter: split_f1_jump, 0.03) at each step (SAEBench's feature-splitting rule
    reads the held-out F1; we keep the held-out examples out of every choice)
"""

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- logistic regression

def logits(X, W, c):
    """X (N, K) shared by the C problems, or (C, N, K) one per problem -> scores (C, N)."""
    return (W @ X.T if X.ndim == 2 else torch.einsum("cnk,ck->cn", X, W)) + c[:, None]


def fit_logistic(X, T, l2: float, steps: int = 300):
    """C balanced binary logistic regressions at once: (W (C, K), c (C,)) minimising, for each
    problem l, sum_n omega_n BCE(s_ln, T_ln) + l2/2 ||W_l||^2 (full batch, L-BFGS, X's dtype).
    X (N, K) or (C, N, K); T (C, N) bool targets."""
    T = T.to(X.dtype)
    n_pos = T.sum(1, keepdim=True)  # (C, 1)
    omega = torch.where(T > 0, 0.5 / n_pos.clamp_min(1), 0.5 / (T.shape[1] - n_pos).clamp_min(1))  # (C, N)
    W = torch.zeros(T.shape[0], X.shape[-1], dtype=X.dtype, requires_grad=True)  # (C, K)
    c = torch.zeros(T.shape[0], dtype=X.dtype, requires_grad=True)  # (C,)
    opt = torch.optim.LBFGS([W, c], max_iter=steps, history_size=20, tolerance_grad=1e-11,
                            tolerance_change=1e-20, line_search_fn="strong_wolfe")  # until it stops moving

    def closure():  # the problems are independent: their sum has each one's optimum
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(logits(X, W, c), T, reduction="none")  # (C, N)
        loss = (omega * bce).sum() + l2 / 2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), c.detach()


def f1_scores(pred, truth):
    """(C,) F1 of boolean predictions (C, N) against targets (C, N); 0 where undefined."""
    tp = (pred & truth).sum(1).double()
    return 2 * tp / (pred.sum(1) + truth.sum(1)).clamp_min(1).double()


def one_hot(y, C: int):
    """(C, N) bool: [y_n = l]."""
    return y[None, :] == torch.arange(C)[:, None]


# ---------------------------------------------------------------- the probe

def train_probe(x, y, C: int, l2: float, steps: int) -> dict:
    """The probe on training activations x (N, D), labels y (N,) in 0..C-1."""
    mu, s = x.mean(0), x.norm(dim=1).mean()  # (D,), scalar
    W, c = fit_logistic((x - mu) / s, one_hot(y, C), l2, steps)
    return {"W": W, "c": c, "mu": mu, "s": s, "dirs": W / W.norm(dim=1, keepdim=True)}  # dirs (C, D)


def probe_scores(probe, x):
    return logits((x - probe["mu"]) / probe["s"], probe["W"], probe["c"])  # (C, N)


def probe_report(scores, y, names) -> dict:
    """Held-out accuracy, overall and per class (recall, F1, count), each class under its name
    (names[l] for class l)."""
    pred = scores.argmax(0)  # (N,)
    truth, hit = one_hot(y, len(names)), one_hot(pred, len(names))
    f1 = f1_scores(hit, truth)
    per = {L: {"n_test": int(truth[l].sum()), "accuracy": (pred[y == l] == l).double().mean().item()
               if truth[l].any() else None, "f1": f1[l].item()} for l, L in enumerate(names)}
    return {"accuracy": (pred == y).double().mean().item(), "per_class": per}


# ---------------------------------------------------------------- k-sparse probing of SAE latents

def mean_difference(f, y, C: int):
    """(C, F): mean code on a class's examples minus the mean on the other examples."""
    onehot = one_hot(y, C).to(f.dtype)  # (C, N)
    total = onehot @ f  # (C, F) sums per class
    n = onehot.sum(1, keepdim=True)  # (C, 1)
    return total / n.clamp_min(1) - (f.sum(0) - total) / (len(y) - n).clamp_min(1)


def k_sparse(f_train, y_train, f_test, y_test, C: int, max_k: int, l2: float, steps: int) -> dict:
    """Per k in 1..max_k, per class: the latents S_l(k) and the F1 of a probe on them alone."""
    top = mean_difference(f_train, y_train, C).topk(max_k, dim=1).indices  # (C, max_k)
    T_train, T_test = one_hot(y_train, C), one_hot(y_test, C)
    out = {"latents": top, "f1_train": [], "f1_test": []}
    for k in range(1, max_k + 1):
        X_train, X_test = (f.T[top[:, :k]].transpose(1, 2) for f in (f_train, f_test))  # (C, N, k)
        W, c = fit_logistic(X_train, T_train, l2, steps)
        out["f1_train"].append(f1_scores(logits(X_train, W, c) > 0, T_train))  # (C,)
        out["f1_test"].append(f1_scores(logits(X_test, W, c) > 0, T_test))
    return out


def main_latents(latents, f1_train, jump: float) -> list:
    """Per class, S_l(k*): grow k while the training F1 rises by more than `jump` each step."""
    main = []
    for l in range(latents.shape[0]):
        k, best = 1, f1_train[0][l].item()
        while k < len(f1_train) and f1_train[k][l].item() > best + jump:
            best, k = f1_train[k][l].item(), k + 1
        main.append(latents[l, :k].tolist())
    return main
