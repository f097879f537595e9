"""Benchmark harness (``unlearn-fast bench ...``).

Each benchmark suite is a module ``unlearn_fast/bench/<name>.py`` defining

    DESCRIPTION = "one line"
    def add_arguments(parser): ...          # optional extra flags
    def run(args, recorder) -> None:        # measure, recorder.add(...) rows

The CLI discovers suites by module name (``SUITES``), so adding a suite never touches a
shared file beyond this list.  Rows follow one schema (``harness.Row``).
"""
SUITES = ("dmk", "linear", "saliency", "multidelete", "eval", "e2e")
