"""Command line: ``python -m l2l_optim <command> [args]`` (also installed as ``l2l-optim``).

Commands:
    meta-fit    meta-train an optimizer net (l2l_optim.meta)
    bench       step-time benchmark (l2l_optim.bench)
    meta-es     meta-training by ES on the task population (l2l_optim.meta.es)
    meta-bench  meta-training throughput, BPTT against ES (l2l_optim.meta.throughput)
    reproduce   the paper's experiments (l2l_optim.repro)
    weights     list the shipped weights and their metadata
"""

from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it; imported only when used
COMMANDS = {
    "meta-fit": "l2l_optim.meta",
    "bench": "l2l_optim.bench",
    "meta-bench": "l2l_optim.meta.throughput",
    "meta-es": "l2l_optim.meta.es",
    "reproduce": "l2l_optim.repro.cli",
    "weights": "l2l_optim.weights",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
