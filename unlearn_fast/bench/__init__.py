"""Benchmark harness (``unlearn-fast bench ...``).

Each benchmark suite is a module ``unlearn_fast/bench/<name>.py`` defining

    DESCRIPTION = "one line"
    def add_arguments(parser): ...          # optional extra flags
    def run(args, recorder) -> None:        # measure, recorder.add(...) rows
    def auto_provider(op, shape, dtype, device) -> str   # optional: what backend="auto"
                                            # runs for a row (default: the registry's answer)

The CLI discovers suites by module name (``SUITES``), so adding a suite never touches a
shared file beyond this list.  Rows follow one schema (``harness.Row``).
``unlearn-fast bench plot --out DIR`` re-draws the plots of DIR/bench.json.
"""
from __future__ import annotations

SUITES = ("dmk", "linear", "saliency", "multidelete", "eval", "e2e")


def run_bench(args) -> int:
    """``unlearn-fast bench SUITE|all``: run the suites into one Recorder, print each suite's
    wall time, then write results (``--out``)."""
    import gc
    import time

    from unlearn_fast.bench.common import bench_device
    from unlearn_fast.bench.harness import Recorder, check_out_dir, set_malloc_policy

    if args.suite == "plot":
        return replot(args)
    if args.out:
        check_out_dir(args.out)  # a bench.json we could not merge into fails now, not after the run
    device = bench_device(args)
    threads = getattr(args, "threads", None)
    if threads is None and args.quick and device == "cpu":
        # a smoke run on a shared machine: with two threads on loaded cores, OpenMP barriers
        # made the eager loops' times swing by 10x (saliency, e2e, eval; measured)
        threads = 1
    names = list(SUITES) if args.suite == "all" else [args.suite]
    if {"dmk", "linear"} & set(names):
        from unlearn_fast.bench import peers

        peers.report(device)  # which peer kernels run as providers, or why not (once per run)
    # one allocator policy for every timing, whether or not a memory measurement came first
    set_malloc_policy("steady")
    _allow_recompiles()
    rows = []
    start = time.perf_counter()
    try:
        for name in names:
            recorder = Recorder()
            _run_suite(name, args, recorder, device, threads)
            rows += recorder.as_dicts()
            if args.out:
                # each suite's rows land as it ends (merged into the folder's bench.json and
                # summary.md): a long `bench all` stopped midway keeps the suites it finished
                for path in recorder.write(args.out, plot=False):
                    print(f"wrote {path}")
    finally:
        gc.unfreeze()
    print(f"== bench {args.suite}{' --quick' if args.quick else ''}: {time.perf_counter() - start:.1f} s in all",
          flush=True)
    from unlearn_fast.bench.summary import report

    print(report(rows, title=f"bench {args.suite}"), flush=True)
    if args.out and not args.no_plot:
        from unlearn_fast.bench.harness import write_plots

        for path in write_plots(args.out):
            print(f"wrote {path}")
    return 0


def replot(args) -> int:
    """``unlearn-fast bench plot --out DIR``: the summary table and the plots of the rows
    already in DIR/bench.json (after merging results, or a plotting change), measuring
    nothing."""
    import os
    import sys

    from unlearn_fast.bench.harness import read_folder_rows, write_plots
    from unlearn_fast.bench.summary import report

    if not args.out or not os.path.isfile(os.path.join(args.out, "bench.json")):
        print(f"unlearn-fast bench plot: --out must name a folder with a bench.json (got {args.out!r})",
              file=sys.stderr)
        return 2
    try:
        rows = read_folder_rows(args.out)
    except ValueError as exc:
        print(f"unlearn-fast bench plot: {exc}", file=sys.stderr)
        return 2
    print(report(rows, title=f"bench.json in {args.out}"), flush=True)
    for path in write_plots(args.out, rows):
        print(f"wrote {path}")
    return 0


def _run_suite(name, args, recorder, device, threads) -> None:
    import gc
    import importlib
    import time

    from unlearn_fast.bench.common import cpu_threads

    mod = importlib.import_module(f"unlearn_fast.bench.{name}")
    # The harness calls gc.collect() around every memory measurement; scanning torch's,
    # dynamo's and transformers' module objects took 0.2 s a call here (17 of dmk --quick's
    # 21 s).  What is alive now is modules and constants: collections skip it from here on.
    gc.freeze()
    print(f"== bench {name}: {mod.DESCRIPTION}", flush=True)
    t0 = time.perf_counter()
    with cpu_threads(device, threads) as used:
        if device == "cpu":
            recorder.add("cpu_threads", "torch", "env", f"suite={name}", "-", device, "cpu_threads", used)
        mod.run(args, recorder)
    print(f"== bench {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def _allow_recompiles(limit: int = 1024) -> None:
    """The "compile" provider compiles eager once per (shape, dtype, mode) (dynamic=False).
    Past dynamo's default of 8 recompiles per function it would silently run eager code
    instead and report eager's time as torch.compile's."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
            break
