"""Command line: ``python -m l2l_optim <command> [args]`` (also installed as ``l2l-optim``).

Commands:
    meta-fit    meta-train an optimizer net (l2l_optim.meta)
    bench       step-time benchmark (l2l_optim.bench)
    reproduce   the paper's experiments (l2l_optim.repro)
    weights     list the shipped weights and their metadata
    eval        the validation suite: learned optimizer vs tuned Adam and SGD (l2l_optim.evaluate)
"""

from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it; imported only when used
COMMANDS = {
    "meta-fit": "l2l_optim.meta",
    "bench": "l2l_optim.bench",
    "reproduce": "l2l_optim.repro.cli",
    "weights": "l2l_optim.weights",
    "eval": "l2l_optim.evaluate",
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
