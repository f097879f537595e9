"""The ``unlearn-fast`` command.

    unlearn-fast info                       backends, availability, and why not
    unlearn-fast bench SUITE|all [--quick] [--out DIR]
    unlearn-fast bench plot --out DIR       re-draw the plots of DIR/bench.json
    unlearn-fast run ...                    unlearning methods end to end (methods/cli.py)
    unlearn-fast eval ...                   the evaluation engine (metrics/cli.py)
    unlearn-fast profile OP                 torch.profiler trace of one op (bench/profile.py)

Subcommands other than ``info`` and ``bench`` live in their own modules, each with
``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

# subcommand -> (module, help)
_COMMANDS = {
    "run": ("unlearn_fast.methods.cli", "run unlearning methods end to end"),
    "eval": ("unlearn_fast.metrics.cli", "evaluate a model on forget/retain sets"),
    "profile": ("unlearn_fast.bench.profile", "profile one op with torch.profiler"),
}


def _cmd_info(args) -> int:
    import torch

    from unlearn_fast import __version__, backends
    from unlearn_fast.memory import cpu_buffer_cache_info
    import unlearn_fast.ops  # noqa: F401  (registers the ops)
    from unlearn_fast.ops import registry_all  # noqa: F401

    table = backends.info()
    if args.json:
        print(json.dumps({"version": __version__, "backends": table}, indent=1))
        return 0
    print(f"unlearn_fast {__version__}  torch {torch.__version__}  python {platform.python_version()}  "
          f"cuda available: {torch.cuda.is_available()}")
    native = backends.native_cpu()
    if native is not None:
        bi = native.build_info()
        cache = cpu_buffer_cache_info()
        print(f"C++ extension: openmp={bi['openmp']} threads={bi['openmp_threads']} simd={bi['simd']} "
              f"buffer cache limit={cache['limit_bytes'] / 2**20:.0f} MiB (unlearn_fast.memory)")
    native_cuda = backends.native_cuda()
    if native_cuda is not None:
        ci = native_cuda.build_info()
        print(f"CUDA extension: toolkit={ci['cuda_toolkit']} runtime={ci['cuda_runtime']} driver={ci['cuda_driver']} "
              f"archs={ci['archs']} devices={ci['device_count']}")
    print(f"{'backend':<8} {'available':<10} {'devices':<10} reason")
    for name, row in table.items():
        print(f"{name:<8} {'yes' if row['available'] else 'no':<10} {','.join(row['devices']):<10} {row['reason']}")
        print(f"{'':<8} ops: {', '.join(row['ops']) or '-'}")
    return 0


def _cmd_bench(args) -> int:
    from unlearn_fast.bench import run_bench

    return run_bench(args)


def _add_suite_arguments(parser: argparse.ArgumentParser, suites) -> None:
    """Suite-specific flags: each suite module may define ``add_arguments(parser)``."""
    for name in suites:
        mod = importlib.import_module(f"unlearn_fast.bench.{name}")
        if hasattr(mod, "add_arguments"):
            group = parser.add_argument_group(f"suite {name}")
            mod.add_arguments(group)


def build_parser() -> argparse.ArgumentParser:
    from unlearn_fast.bench import SUITES

    parser = argparse.ArgumentParser(prog="unlearn-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list backends, what is available, and why not")
    p.add_argument("--json", action="store_true", help="print the same information as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="benchmark fused ops against eager (speed, peak memory)")
    p.add_argument("suite", choices=list(SUITES) + ["all", "plot"],
                   help="a suite, all of them, or 'plot': re-draw the plots of --out DIR's bench.json")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, a few seconds per suite (no torch.compile provider)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.csv and plots")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backends", default=None, help="comma-separated providers to run (default: all available)")
    p.add_argument("--dtypes", default=None, help="comma-separated dtypes (float32,bfloat16)")
    p.add_argument("--no-plot", action="store_true", help="write bench.json / bench.csv only, no PNG plots")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(eager) provider")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads for every suite (default: torch's; 1 with --quick on the CPU)")
    _add_suite_arguments(p, SUITES)
    p.set_defaults(func=_cmd_bench)

    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
