"""A code f (B, F) as the training loop sees it: which latents fired, and its L0.

The readable reference (minisae/sae.py) computes the code as a dense tensor; the fast
path (minisae/sparse_decode.py) keeps only its selected entries. The loop asks a code two
questions, the same for both, so it never needs to know which it holds:

    code.fired()    (F,) bool   latents with a positive value in some sample (dead-latent counters)
    code.l0()       float       mean number of active latents per sample (metrics.l0)
    code.to_dense() (B, F)      the code as a dense tensor
"""

from typing import NamedTuple

import torch

from minisae import metrics


class DenseCode(NamedTuple):
    """A code stored as the dense (B, F) tensor the reference computes."""
    f: torch.Tensor

    def to_dense(self):
        return self.f

    def fired(self):
        return self.f.amax(0) > 0  # codes are >= 0: (f > 0).any(0), in one pass

    def l0(self) -> float:
        return metrics.l0(self.f)


class SparseCode(NamedTuple):
    """A code (B, F) stored as its selected entries, rows sorted: rows (N,), cols (N,),
    vals (N,) = the code's values there (>= 0, some may be 0), and the dense shape."""
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple

    def to_dense(self):
        f = self.vals.new_zeros(self.shape)  # (B, F)
        return f.index_put((self.rows, self.cols), self.vals)

    def fired(self):
        """(F,) bool, in one pass over the N entries."""
        hits = torch.zeros(self.shape[1], dtype=torch.int32, device=self.vals.device)
        return hits.index_add_(0, self.cols, (self.vals > 0).int()) > 0

    def l0(self) -> float:
        return (self.vals > 0).sum().item() / self.shape[0]  # metrics.l0 of to_dense(), without building it
