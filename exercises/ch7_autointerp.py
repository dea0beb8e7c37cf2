"""Exercise for chapter 7 (docs/07_autointerp.md): the paired test against the shuffled control.

Copy this file, fill in the function and check your copy:

    cp exercises/ch7_autointerp.py my_ch7.py
    python -m minisae check my_ch7.py

Every scorer of chapter 7 gives one number per latent for the latent's own explanation,
s_i, and one for another latent's explanation on the same windows (the shuffled control),
c_i. Is the explanation worth more than a random one? The paired differences d_i = s_i - c_i
say so if their mean is further from 0 than chance makes it. Under the null hypothesis
(the explanation is worth no more than the control) each d_i is as likely to be +d_i as
-d_i, so the 2^n ways of flipping the signs are equally likely, and the p-value is the share
of them whose |mean| is at least the observed one. A function that still raises
NotImplementedError is skipped.
"""

import torch  # noqa: F401  (you will need it, or itertools)


def sign_flip_p(d):
    """The exact two-sided sign-flip (paired permutation) test.

        T = |mean_i d_i|
        p = #{e in {+1, -1}^n : |mean_i e_i d_i| >= T} / 2^n

    d (n,) float64, n <= 16  ->  p, a float in (0, 1].

    Count a flip whose |mean| equals T as "at least as extreme" (the observed signs are
    one of the flips, so p > 0; and when every d_i is 0, p = 1). Compare with a small
    tolerance (1e-12): the mean of flipped floats may differ from T in its last bit.
    minisae's version, for n > 16 too, is minisae.autointerp.stats.sign_flip_test.
    """
    raise NotImplementedError
