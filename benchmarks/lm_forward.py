"""Forward-pass throughput of minisae's GPT-2 against Hugging Face `transformers`.

Scope: CPU tokens/s of one forward pass (no gradients) of a GPT-2-small-sized model on
random weights (speed does not depend on the values), batch 8 x 128 tokens by default,
in fp32 and in bfloat16 autocast; ours both as a full forward to logits and stopped
early at a middle hook point, which is how minisae collects SAE training activations.
HF's GPT2LMHeadModel runs with its default (sdpa) attention and cannot stop early.
Both models load the same weights, and the script prints their largest logit
difference as a check. Median of a few repeats after a warm-up; on a shared machine
single timings vary by up to 2x, so compare the ratios from one run, not across runs.
Needs `transformers`.

    python benchmarks/lm_forward.py [--batch 8] [--ctx 128] [--repeats 5] [--device auto]
"""

import argparse
import os
import tempfile
from contextlib import nullcontext

import torch

from minisae.models.gpt2 import CONFIGS, GPT2, load_weights_
from minisae.models.safetensors import save_safetensors
from timing import table, timed_in, tokens_per_second  # benchmarks/timing.py


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stop-at", default="blocks.6.hook_resid_pre")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args()
    from minisae.utils import resolve_device
    device = resolve_device(args.device)
    import transformers

    cfg = CONFIGS["gpt2"]
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model,
                                        n_positions=cfg.n_ctx, vocab_size=cfg.vocab_size)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:  # same weights for both, via an HF-layout checkpoint
        path = os.path.join(tmp, "model.safetensors")
        save_safetensors(path, {k: v.clone() for k, v in hf.state_dict().items()})
        ours = load_weights_(GPT2(cfg), path).eval().to(device)
    hf = hf.to(device)

    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    n_tokens = idx.numel()
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    runs = {  # label -> (function, precision context)
        "minisae full forward": (lambda: ours(idx), nullcontext),
        f"minisae stop at {args.stop_at}": (lambda: ours(idx, stop_at=args.stop_at), nullcontext),
        "transformers full forward": (lambda: hf(idx).logits, nullcontext),
        "minisae full forward, bf16": (lambda: ours(idx), bf16),
        f"minisae stop at {args.stop_at}, bf16": (lambda: ours(idx, stop_at=args.stop_at), bf16),
        "transformers full forward, bf16": (lambda: hf(idx).logits, bf16),
    }
    with torch.inference_mode():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
        results = {}
        for label, (fn, precision) in runs.items():
            results[label] = tokens_per_second(timed_in(precision, fn), n_tokens, args.repeats, device)

    print(f"GPT-2 small (random weights) on {device}, batch {args.batch} x {args.ctx} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"max |logit difference| minisae vs transformers (fp32): {diff:.2e}\n")
    print(table([(label, tps) for label, tps in results.items()], ("run", "tokens/s")))
    print("\nratios (minisae / transformers, full forward):")
    print(f"  fp32 {results['minisae full forward'] / results['transformers full forward']:.2f}x   "
          f"bf16 {results['minisae full forward, bf16'] / results['transformers full forward, bf16']:.2f}x")
    print(f"stopping at {args.stop_at} vs full forward (minisae): "
          f"fp32 {results[f'minisae stop at {args.stop_at}'] / results['minisae full forward']:.2f}x   "
          f"bf16 {results[f'minisae stop at {args.stop_at}, bf16'] / results['minisae full forward, bf16']:.2f}x")


if __name__ == "__main__":
    main()
