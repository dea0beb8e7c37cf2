"""The models' linear layer: nn.Linear, y = x W^T + b, with the product for a few rows
written the other way round on a CPU.

Writing text one token at a time multiplies a few rows by every weight of the model:
`steer` runs its unsteered, steered and control continuations as one batch of three.
For 2 to 4 rows, torch's CPU product x W^T is up to 7.6x slower than the same numbers
computed as (W x^T)^T, which reads W closer to the memory's rate (SmolLM2's and GPT-2's
shapes, torch 2.13, one and two threads: benchmarks/few_rows_linear.py). One row is as
fast either way; from five rows, and from three where W narrows (out < in, the MLP's
down-projection) on one thread, x W^T is as fast or faster. So:

    y = x W^T + b          x (R, in), W (out, in)        the reference, F.linear
      = (W x^T)^T + b      W x^T (out, R)                 on a CPU, for R = 2, or
                                                          R = 3..4 where out >= in

The two orders of summation differ in the last bits (tests/models/test_linear.py: both
against float64, to the same tolerance). This holds for float32, the models' dtype; in
bfloat16 the other order is the slower one. Anything else (more rows, an accelerator,
autocast, other dtypes) takes F.linear unchanged, so a forward over whole contexts gives
the same bits as before.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def other_order(rows: int, out: int, inp: int) -> bool:
    """Whether (W x^T)^T is the faster product for `rows` rows and W (out, inp) on a CPU."""
    return rows == 2 or (rows in (3, 4) and out >= inp)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias): x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (weight.ndim == 2 and other_order(rows, *weight.shape) and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        y = (weight @ x.reshape(rows, -1).T).T.contiguous()  # (R, out)
        y = y.reshape(*x.shape[:-1], weight.shape[0])  # (..., out)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict), its product by `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
