"""The validation suite and its protocol: learned weights against tuned and tuning-free peers.

* :mod:`.suite`: the tasks (none of them in the meta-training population).
* :mod:`.peers`: Adam, SGD, scheduled AdamW, Schedule-Free AdamW, Prodigy; grids and search.
* :mod:`.protocol`: the runs, the baseline cache and :func:`evaluate`.
* :mod:`.report`: the table, the plot and ``l2l-optim eval``.
"""

from __future__ import annotations

from .protocol import EvalResult, TaskResult, baseline_entry, evaluate, geometric_mean
from .report import format_table, main, plot_results
from .results import merge_results
from .suite import SuiteTask, default_suite, get_suite

__all__ = ["evaluate", "EvalResult", "TaskResult", "baseline_entry", "geometric_mean", "merge_results",
           "format_table", "plot_results", "main", "SuiteTask", "default_suite", "get_suite"]
