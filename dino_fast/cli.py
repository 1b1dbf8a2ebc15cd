"""The ``dino-fast`` command.

Each subcommand lives with the code it drives and exposes ``main(argv: list[str]) -> int``;
this module only dispatches, importing the subcommand's module on demand.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("dino_fast.train.loop", "main", "pretrain (method.name: dino): --config configs/X.yaml key=value ..."),
    "knn": ("dino_fast.eval.knn", "main", "weighted k-NN evaluation of a checkpoint"),
    "linear": ("dino_fast.eval.linear", "main", "linear-probe evaluation of a checkpoint (frozen backbone)"),
    "attention": ("dino_fast.viz.attention", "main", "PNG of the last block's CLS attention per head"),
    "make-dataset": ("dino_fast.data.builtin", "main", "generate the built-in labelled image dataset"),
    "write-beton": ("dino_fast.data.ffcv_writer", "main", "write an image folder to an FFCV .beton file"),
    "bench": ("bench.__main__", "main", "run the benchmarks of bench/ (loss|ema|attention|loader|step|all)"),
}


def _usage() -> str:
    lines = ["usage: dino-fast COMMAND [ARGS...]", "", "commands:"]
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<14}{help_}")
    lines.append("")
    lines.append("Run 'dino-fast COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dino-fast`` console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"dino-fast: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    if module.startswith("bench"):
        # bench/ lives at the repository root, next to the installed package (editable installs).
        import os

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isfile(os.path.join(root, "bench", "__main__.py")):
            print("dino-fast bench runs the benchmarks of a source checkout (bench/ beside dino_fast/), and "
                  f"{root} has none: clone the repository and install it with `pip install -e .`", file=sys.stderr)
            return 2
        if root not in sys.path:
            sys.path.insert(0, root)
    fn = getattr(importlib.import_module(module), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
