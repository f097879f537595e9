"""Benchmark harness (``unlearn-fast bench ...``).

Each benchmark suite is a module ``unlearn_fast/bench/<name>.py`` defining

    DESCRIPTION = "one line"
    def add_arguments(parser): ...          # optional extra flags
    def run(args, recorder) -> None:        # measure, recorder.add(...) rows
    def auto_provider(op, shape, dtype, device) -> str   # optional: what backend="auto"
                                            # runs for a row (default: the registry's answer)

The CLI discovers suites by module name (``SUITES``), so adding a suite never touches a
shared file beyond this list.  Rows follow one schema (``harness.Row``).
"""
from __future__ import annotations

SUITES = ("dmk", "linear", "saliency", "multidelete", "eval", "e2e")


def run_bench(args) -> int:
    """``unlearn-fast bench SUITE|all``: run the suites into one Recorder, print each suite's
    wall time, then write results (``--out``)."""
    import importlib
    import time

    from unlearn_fast.bench.common import bench_device, cpu_threads
    from unlearn_fast.bench.harness import Recorder

    device = bench_device(args)
    threads = getattr(args, "threads", None)
    if threads is None and args.quick and device == "cpu":
        # a smoke run on a shared machine: with two threads on loaded cores, OpenMP barriers
        # made the eager loops' times swing by 10x (saliency, e2e, eval; measured)
        threads = 1
    names = list(SUITES) if args.suite == "all" else [args.suite]
    recorder = Recorder()
    modules = {}
    start = time.perf_counter()
    for name in names:
        mod = modules[name] = importlib.import_module(f"unlearn_fast.bench.{name}")
        print(f"== bench {name}: {mod.DESCRIPTION}", flush=True)
        t0 = time.perf_counter()
        with cpu_threads(device, threads) as used:
            if device == "cpu":
                recorder.add("cpu_threads", "torch", "env", f"suite={name}", "-", device, "cpu_threads", used)
            mod.run(args, recorder)
        print(f"== bench {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"== bench {args.suite}{' --quick' if args.quick else ''}: {time.perf_counter() - start:.1f} s in all",
          flush=True)
    if args.out:
        for path in recorder.write(args.out, plot=not args.no_plot):
            print(f"wrote {path}")
    return 0
