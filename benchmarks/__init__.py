"""The benchmark harness: it times the installed ``l2l_optim`` and is no part of it.

Run from the repository's root (``make bench`` runs the first two):

* ``python -m benchmarks.bench``: bandwidth against a copy, whole training steps and
  ``optimizer.step()`` alone against Adam (:mod:`.bench`; the tables in :mod:`.bandwidth`,
  :mod:`.train` and :mod:`.step`, what they share in :mod:`.common`);
* ``python -m benchmarks.meta_throughput``: meta-training throughput, BPTT against ES;
* ``kernel_ab.cpp``: A/B timing of builds of the fused CPU kernel's library in one process;
  ``bash benchmarks/avx512_check.sh`` uses it on an AVX-512 machine.
"""
