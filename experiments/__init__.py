"""Experiments run on the installed ``l2l_optim``, no part of it: :mod:`.repro`, the paper's
experiments and RESULTS.md (``make reproduce``, or ``python -m experiments.repro`` from the
repository's root)."""
