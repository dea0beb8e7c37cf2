"""Command line: `python -m minisae toy|lm|layers|features|steer|links ...`."""

import argparse
import sys
from pathlib import Path


# (command, module, help): modules with add_arguments(parser) and run_cli(args)
COMMANDS = [
    ("layers", "layers", "one SAE per layer: L0, FVU and loss recovered against depth"),
    ("features", "features", "max-activating examples and logit lens of SAE latents (terminal + HTML)"),
    ("steer", "steer", "generate text while adding a latent's decoder direction at the SAE's hook"),
    ("links", "links", "cross-layer feature links: decoder cosines and ablation edges"),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisae")
    sub = p.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="every SAE variant on synthetic features + the superposition figures")
    toy.add_argument("--out", type=Path, default=Path("figures"))
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--quick", action="store_true", help="a short run (tests use it)")

    lm = sub.add_parser("lm", help="a sparsity sweep of SAE variants on a language model's activations")
    lm.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-random, smollm2")
    lm.add_argument("--weights", type=Path, help="a local weights file (safetensors or GGUF) instead of the download")
    lm.add_argument("--layer", type=int, default=6)
    lm.add_argument("--site", default="resid_pre", help="resid_pre, attn_out, resid_mid, mlp_out, resid_post")
    lm.add_argument("--tokens", type=int, default=4_000_000, help="training tokens per SAE")
    lm.add_argument("--collect-tokens", type=int, help="tokens of activations to store (default: --tokens, "
                    "capped by the corpus); SAEs make several passes when --tokens is larger")
    lm.add_argument("--variants", default="relu,gated,topk", help="comma-separated, from relu,gated,topk,jumprelu,batchtopk")
    lm.add_argument("--sweep", action="append", help="VARIANT:KNOB=V1,V2,... e.g. topk:k=16,32,64 (repeatable)")
    lm.add_argument("--expansion", type=int, default=8, help="latents = expansion x d_model")
    lm.add_argument("--batch-size", type=int, default=4096)
    lm.add_argument("--lr", type=float, default=4e-4)
    lm.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens for the evaluation")
    lm.add_argument("--ctx-len", type=int, default=128)
    lm.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the LM and the SAE forward")
    lm.add_argument("--text", nargs="+", help="your own text files instead of the offline corpus")
    lm.add_argument("--out", type=Path, default=Path("runs/lm"))
    lm.add_argument("--seed", type=int, default=0)

    # the other commands: each module defines its own arguments and runner; only the one
    # being run is imported
    argv = sys.argv[1:] if argv is None else list(argv)
    for name, module, help_text in COMMANDS:
        parser = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:
            __import__(f"minisae.{module}", fromlist=["add_arguments"]).add_arguments(parser)
    args = p.parse_args(argv)
    if args.command == "toy":
        from minisae import toy as toy_job
        toy_job.run(args.out, seed=args.seed, quick=args.quick)
    elif args.command == "lm":
        from minisae import lm as lm_job
        lm_job.run(args.model, weights=args.weights, layer=args.layer, site=args.site, tokens=args.tokens,
                   collect_tokens=args.collect_tokens, variants=args.variants.split(","), sweep=args.sweep,
                   out=args.out, expansion=args.expansion, batch_size=args.batch_size, lr=args.lr,
                   eval_tokens=args.eval_tokens, ctx_len=args.ctx_len, bf16=args.bf16, text=args.text,
                   seed=args.seed)
    else:
        module = {name: module for name, module, _ in COMMANDS}[args.command]
        __import__(f"minisae.{module}", fromlist=["run_cli"]).run_cli(args)


if __name__ == "__main__":
    main()
