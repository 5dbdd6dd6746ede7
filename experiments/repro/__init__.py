"""The paper's experiments, one command each, and the RESULTS.md report built from them.

Usage, from the repository's root::

    python -m experiments.repro <experiment> [<experiment> ...] [options]
    python -m experiments.repro all        # every experiment, then the report (make reproduce)
    python -m experiments.repro report     # rebuild RESULTS.md from results/*/summary.json
    python -m experiments.repro list       # the experiments and their default settings

Experiments:

* ``table1``: parameter counts and time per optimizer step on the base MLP.
* ``fig2``: SimpleOptimizer, DMOptimizer and RNNProp, all meta-trained on the base MLP, run
  far beyond their 200 meta-training steps.
* ``fig3``: the ablations (bias back in, no aggregation, uniform meta-loss) against the full model.
* ``fig4a``: transfer to LeNet on MNIST against tuned SGD and Adam and the LSTM optimizers.
* ``fig4b``: LeNet on Fashion-MNIST (our stand-in for CIFAR-10) with and without fine-tuning.
* ``fig5a``: a 5-layer MLP with 16x the base MLP's parameters on MNIST, no fine-tuning.
* ``fig5b``: a ResNet-18-style CNN (28x the base MLP) on Fashion-MNIST, with fine-tuning.
* ``fig5b-long``: fig5b's protocol for 2,000 steps x 3 seeds on ResNet-18's layout at width 16
  (1.76x the base MLP), which one CPU core affords.

Outputs, under ``--out`` (default ``results/``), per experiment ``<exp>/``:

* ``<optimizer>_seed<k>.csv``: ``step,train_loss`` (the minibatch loss before each update),
  and ``<optimizer>_seed<k>.json``: that run's settings, test accuracy and wall time. A run
  whose files exist with the same settings is skipped, so an interrupted experiment resumes
  where it stopped (``--force`` reruns). A run in progress holds ``<optimizer>_seed<k>.claim``,
  so several processes can work on one experiment side by side (each takes the next run
  nobody holds; start the same command twice to use two cores).
* ``lr_search.json``, ``finetuned.safetensors`` + ``finetune.json`` (cached likewise).
* ``summary.json``: per optimizer the final training loss (mean of the last
  ``min(500, 10% of the steps)`` steps), test accuracy and wall time, mean and min/max over
  seeds, and the comparisons the paper claims; ``<exp>.png``: training loss against step.

Budget: the defaults are the paper's 10,000 steps and 3 seeds, except where a CPU cannot
afford them; each override is stated in the experiment's ``note``, printed by ``list`` and
written into RESULTS.md. ``--steps``/``--seeds`` replace every default.

The modules, one job each: :mod:`.experiments` (the registry), :mod:`.store` (files, run
claims, locks), :mod:`.learned` (which meta-weights), :mod:`.runner` (running a figure),
:mod:`.table1` (the step-time table), :mod:`.claims` (the verdict rules), :mod:`.report`
(RESULTS.md), :mod:`.plots`, :mod:`.cli`. The package uses the installed library ``l2l_optim``
only through its modules' public functions, and is no part of it.
"""
