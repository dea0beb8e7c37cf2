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

MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-random", "smollm2")


def load_model(name: str, weights=None, cache_dir=None):
    """(model, tokenizer) for a model name; `weights` is an optional local weights file."""
    if name == "smollm2":
        from minisae.models.llama import load_smollm2
        return load_smollm2(weights)
    if name.startswith("gpt2") and name in MODEL_NAMES:
        from minisae.models.gpt2 import load_gpt2
        return load_gpt2(name, weights=weights, cache_dir=cache_dir)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
