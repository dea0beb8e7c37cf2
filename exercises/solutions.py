"""Reference solutions to exercises/ch2_sae.py, ch3_variants.py, ch7_autointerp.py,
ch10_absorption.py and ch11_circuits.py: minisae's own code (minisae/sae.py,
minisae/variants.py, minisae/autointerp/stats.py, minisae/matryoshka.py, the first-order
term of minisae/interp/attribution.py) in the exercises' signatures; the adapters are the
`ref_*` functions at the end of minisae/grading/exercises.py.

    python -m minisae check exercises/solutions.py      # every exercise passes
"""

from minisae.grading.exercises import ref_JumpReLUFn as JumpReLUFn  # noqa: F401  minisae.variants._JumpReLUFn
from minisae.grading.exercises import ref_attribution_edge as attribution_edge  # noqa: F401  interp/attribution.py
from minisae.grading.exercises import ref_auxk_loss as auxk_loss  # noqa: F401  minisae.variants.auxk_loss
from minisae.grading.exercises import ref_encode as encode  # noqa: F401  SAE.encode with a ReLU
from minisae.grading.exercises import ref_gated_forward as gated_forward  # noqa: F401  SAE.encode with variants.Gated
from minisae.grading.exercises import ref_l1_loss as l1_loss  # noqa: F401  ReLU.loss_terms, decoder norms folded in
from minisae.grading.exercises import ref_matryoshka_loss as matryoshka_loss  # noqa: F401  recon + "prefixes"
from minisae.grading.exercises import ref_sign_flip_p as sign_flip_p  # noqa: F401  autointerp.stats.sign_flip_test
from minisae.grading.exercises import ref_topk_activation as topk_activation  # noqa: F401  variants.TopK.forward
