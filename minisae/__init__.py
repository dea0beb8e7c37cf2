"""minisae: sparse autoencoders for interpreting language models, written to be read.

Shape convention, used in trailing comments everywhere in the package:

    B  batch (samples, or contexts for a language model)
    T  positions in a context
    D  width of the activation the SAE reads (d_model for a residual stream)
    F  number of SAE latents (the dictionary size)
    K  k of a TopK SAE
    V  vocabulary size
    G  number of ground-truth features in a toy dataset

Importing minisae is cheap: it imports nothing heavy. Use the submodules:
`minisae.sae`, `minisae.train`, `minisae.metrics`, ...
"""

__version__ = "0.1.0"
