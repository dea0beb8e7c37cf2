"""The models' linear layer: nn.Linear, y = x W^T + b, with the product for a few rows
written the other way round on a CPU.

Writing text one token at a time multiplies a few rows by every weight of the model:
`steer` runs its unsteered, steered and control continuations as one batch of three.
For 2 to 4 rows, torch's CPU product x W^T is 2-7x slower than the same numbers computed
as (W x^T)^T, which reads W once at nearly the memory's rate (SmolLM2's and GPT-2's
shapes, torch 2.13; one row and five or more are as fast either way, or faster as x W^T):

    y = x W^T + b          x (R, in), W (out, in)        the reference, F.linear
      = (W x^T)^T + b      W x^T (out, R)                 R = 2..4 rows, on a CPU

The two orders of summation differ in the last bits (tests/models/test_linear.py: both
against float64, to the same tolerance). Anything else (more rows, an accelerator,
autocast, mixed dtypes) takes F.linear unchanged, so a forward over whole contexts gives
the same bits as before.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = range(2, 5)  # rows for which (W x^T)^T is the faster product on a CPU


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias): x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows in FEW_ROWS and x.device.type == "cpu" and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu")):
        y = (weight @ x.reshape(rows, -1).T).T.contiguous()  # (R, out)
        y = y.reshape(*x.shape[:-1], weight.shape[0])  # (..., out)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict), its product by `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
