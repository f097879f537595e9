"""The benchmark harness itself: malloc policy scoping, the row schema, result files,
plots, the summary, peer listing, and a tiny run of every bench/profile subcommand
through the real CLI entry point (no timing assertions beyond the malloc check, which
compares a 100x effect with a 5x margin)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from unlearn_fast.bench import harness


# --------------------------------------------------------------------------- step 1: malloc
def test_rss_malloc_policy_is_scoped_to_the_measurement():
    seen = []

    def fn():
        seen.append(harness.malloc_policy)
        return torch.ones(1 << 20)

    harness.peak_memory(fn, "cpu")
    if harness.malloc_policy == "unsupported":
        pytest.skip("libc is not glibc: no malloc policy to scope")
    assert seen == ["rss"]
    assert harness.malloc_policy == "steady"


_TIMING_SCRIPT = """
import statistics, sys, time, torch
from unlearn_fast.bench import harness

def median(reps=30, nbytes=8 * 2**20):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x = torch.empty(nbytes // 4)
        x.fill_(1.0)
        del x
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

if harness._glibc() is None:
    print("SKIP")
    sys.exit(0)
median(5)  # warm-up: glibc's dynamic threshold settles
before = median()
harness.peak_memory(lambda: torch.ones(1 << 20), "cpu")
after = median()
print(before, after)
"""


def test_timing_after_a_memory_measurement_is_not_slower():
    """Under the RSS policy every 8 MiB allocation is a fresh mmap the kernel zeroes page by
    page (~100x slower here); the policy must end with the measurement.  Run in a fresh
    interpreter: the heap of a long test session (every test module imported) makes the
    allocation timings depend on what ran before."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TIMING_SCRIPT], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    if out == ["SKIP"]:
        pytest.skip("libc is not glibc")
    before, after = map(float, out[-2:])
    assert after < 5 * before + 1e-3, (before, after)


def test_tensor_peak_memory_replays_allocations_in_order():
    """The largest running total of live tensor bytes, not the sum of allocations: a
    tensor freed before the next one is allocated does not add up."""
    before = torch.empty(1 << 18)  # live before the call, freed inside it: not counted

    def fn():
        nonlocal before
        a = torch.empty(1 << 20)
        b = torch.empty(2 << 20)  # peak here: a + b = 12 MiB
        del a, before
        c = torch.empty(1 << 20)  # 8 + 4 MiB again: not above the peak
        return b, c

    assert harness.tensor_peak_memory(fn, "cpu") == 3 * 4 * (1 << 20)


def test_tensor_peak_memory_sees_the_native_kernels_buffers():
    """The tensor-level peak must see what the C++ kernels allocate (it would flatter the
    fused path if it did not): token_stats' (rows, V) chunk buffer comes from ATen, the DMK
    gradient (>= 8 MiB) from an mmap of our own that reports itself to the profiler."""
    from unlearn_fast import backends, dual_masked_kl, token_stats

    if not backends.availability("cpp").available:
        pytest.skip(backends.availability("cpp").reason)
    n, h, v = 64, 16, 4099
    hidden, weight = torch.randn(n, h), torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():
        token_stats(hidden, weight, targets, backend="cpp")  # warm-up: first-call allocations
        peak = harness.tensor_peak_memory(lambda: token_stats(hidden, weight, targets, backend="cpp"), "cpu")
    assert peak >= n * v * 4

    student = torch.randn(256, 3 * 4096).requires_grad_()  # a 12 MiB gradient
    teacher = torch.randn(256, 3 * 4096)

    def dmk_grad():
        return torch.autograd.grad(dual_masked_kl(student, teacher, backend="cpp"), student)[0]

    dmk_grad()
    assert harness.tensor_peak_memory(dmk_grad, "cpu") >= student.numel() * 4


def test_rss_peak_counts_a_gradient_the_buffer_cache_would_reuse():
    """After a warm-up the DMK gradient's mapping sits in the C++ buffer cache; reusing it
    would not raise the RSS, so the RSS peak must empty the cache first."""
    from unlearn_fast import backends, dual_masked_kl

    if not backends.availability("cpp").available:
        pytest.skip(backends.availability("cpp").reason)
    student = torch.randn(256, 3 * 4096).requires_grad_()  # a 12 MiB gradient
    teacher = torch.randn(256, 3 * 4096)

    def dmk_grad():
        return torch.autograd.grad(dual_masked_kl(student, teacher, backend="cpp"), student)[0]

    dmk_grad()
    assert harness.peak_memory(dmk_grad, "cpu") >= 0.9 * student.numel() * 4


# --------------------------------------------------------------------------- schema and files
def _row(**over):
    row = dict(op="dual_masked_kl", provider="eager", mode="fwd", shape="N=8,V=16", dtype="float32", device="cpu",
               metric="time_median_s", value=0.5, version="0", timestamp="2026-01-01T00:00:00+00:00")
    row.update(over)
    return row


def test_validate_rows_accepts_good_rows():
    harness.validate_rows([_row(), _row(value=3)])
    harness.validate_rows([])


@pytest.mark.parametrize("bad, message", [
    ({"drop": "metric"}, "lacks fields ['metric']"),
    ({"value": "fast"}, "value must be a number"),
    ({"value": None}, "value must be a number"),
    ({"shape": 2048}, "field shape must be a string"),
    ({"provider": None}, "field provider must be a string"),
])
def test_validate_rows_rejects_bad_rows(bad, message):
    row = _row()
    if "drop" in bad:
        del row[bad.pop("drop")]
    row.update(bad)
    with pytest.raises(ValueError, match=r"row 1: |row 1 lacks") as info:
        harness.validate_rows([_row(), row])
    assert message in str(info.value)


def _recorder(n_shapes=3, providers=("eager", "cpp")):
    rec = harness.Recorder(quiet=True)
    for i, n in enumerate((64, 128, 256)[:n_shapes]):
        eager = None
        for p in providers:
            t = 0.01 * (i + 1) * (1.0 if p == "eager" else 0.25)
            rec.add_timing("dual_masked_kl", p, "fwd", f"N={n},V=1000", "float32", "cpu", [t, t * 1.1, t * 0.9],
                           peak_bytes=(i + 1) * 2**20, eager_median=eager)
            eager = eager or t
    return rec


def test_recorder_write_round_trips_and_merges(tmp_path):
    import csv
    import json

    rec = _recorder()
    rec.write(str(tmp_path), plot=False)
    rows = json.loads((tmp_path / "bench.json").read_text())
    harness.validate_rows(rows)
    assert rows == rec.as_dicts()
    with open(tmp_path / "bench.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["metric"] for r in csv_rows] == [r["metric"] for r in rows]
    assert [float(r["value"]) for r in csv_rows] == pytest.approx([r["value"] for r in rows])
    assert list(csv_rows[0]) == list(harness.SCHEMA_FIELDS)
    # a second run into the same folder adds its rows to the first run's
    second = harness.Recorder(quiet=True)
    second.add("cross_entropy", "eager", "fwd", "N=4,H=2,V=8", "float32", "cpu", "time_median_s", 1.0)
    second.write(str(tmp_path), plot=False)
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert merged == rows + second.as_dicts()
    assert "cross_entropy" in (tmp_path / "summary.md").read_text()
    # a bench.json that is not ours is neither merged nor overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "bench.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="move it away or choose another --out"):
        second.write(str(other), plot=False)
    with pytest.raises(ValueError, match="not a bench.json"):
        harness.check_out_dir(str(other))
    assert (other / "bench.json").read_text() == "[1, 2]"


# --------------------------------------------------------------------------- plots
def test_parse_shape():
    from unlearn_fast.bench.plots import parse_shape

    assert parse_shape("N=2048,V=32000,algo=gram") == {"N": 2048, "V": 32000, "algo": "gram"}
    assert parse_shape("") == {}
    assert parse_shape("256MiB") == {"256MiB": ""}


def test_line_and_bar_plots(tmp_path):
    from unlearn_fast.bench.plots import plot_rows, sweeps

    rows = _recorder().as_dicts()
    # the V sweep at N=64, and an op at a single shape (bars only)
    for v in (2000, 4000):
        rows += [_row(shape=f"N=64,V={v}", provider=p, value=0.1 * v / 1000) for p in ("eager", "cpp")]
    rows += [_row(op="topk_mask", shape="tensors=3,weights=99", provider=p) for p in ("eager", "cpp")]
    groups = sweeps(rows)
    assert ("dual_masked_kl", "N", "fwd", "float32", "V=1000") in groups
    assert ("dual_masked_kl", "V", "fwd", "float32", "N=64") in groups
    assert not any(key[0] == "topk_mask" for key in groups)
    names = {os.path.basename(p) for p in plot_rows(rows, str(tmp_path))}
    assert {"lines_dual_masked_kl_vs_N_fwd_float32_V1000.png", "lines_dual_masked_kl_vs_V_fwd_float32_N64.png",
            "topk_mask_time_median_s.png"} <= names
    # every dual_masked_kl case lies on a line: no bar chart for it
    assert "dual_masked_kl_time_median_s.png" not in names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_plot_axes_and_ratio_labels(tmp_path, monkeypatch):
    from unlearn_fast.bench import plots

    figures = {}

    def keep(plt, fig, path):  # record what was drawn instead of only writing it
        ax = fig.axes[0]
        figures[os.path.basename(path)] = (ax.get_yscale(), ax.get_ylim(), [t.get_text() for t in ax.texts],
                                           ax.get_title())
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    # a 1.25x gap: linear axis from 0, labelled with eager / cpp; a 100x gap: log axis
    rows = [_row(op="e2e_siu", shape="V=151936,H=3584", provider="eager", value=10.0),
            _row(op="e2e_siu", shape="V=151936,H=3584", provider="cpp", value=8.0),
            _row(op="e2e_siu", shape="V=151936,H=3584", provider="eager", metric="peak_mem_bytes", value=800.0),
            _row(op="e2e_siu", shape="V=151936,H=3584", provider="cpp", metric="peak_mem_bytes", value=200.0),
            _row(op="eval_scores", shape="model=wide", provider="per_metric_eager", value=5.0),
            _row(op="eval_scores", shape="model=wide", provider="fused", value=0.05)]
    plots.plot_rows(rows, str(tmp_path))
    scale, ylim, texts, title = figures["e2e_siu_time_median_s.png"]
    assert scale == "linear" and ylim[0] == 0 and texts == ["1.25x"] and "eager time / this" in title
    scale, _, texts, _ = figures["e2e_siu_peak_mem_bytes.png"]
    assert scale == "linear" and texts == ["0.25x"]
    scale, _, texts, title = figures["eval_scores_time_median_s.png"]
    assert scale == "log" and texts == ["100.00x"] and "per_metric_eager" in title
    assert plots._ratio_text(0.00017321) == "0.00017x" and plots._ratio_text(1.2649) == "1.26x"
    assert plots._case_label("model=wide-head-V151936,N=16,B=16,T=35", "float32", "fwd").split("\n") == [
        "model=wide-head-V151936,N=16,", "B=16,T=35", "float32", "fwd"]


def test_bench_plot_redraws_a_folder(tmp_path, capsys):
    from unlearn_fast.bench.harness import write_atomic_json
    from unlearn_fast.cli import main

    assert main(["bench", "plot", "--out", str(tmp_path)]) == 2  # no bench.json there
    assert "bench.json" in capsys.readouterr().err
    rows = [_row(op="topk_mask", shape="tensors=3", provider=p, value=v) for p, v in (("eager", 2.0), ("cpp", 1.0))]
    write_atomic_json(str(tmp_path / "bench.json"), rows)
    assert main(["bench", "plot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "topk_mask_time_median_s.png").stat().st_size > 1000
    assert "topk_mask" in capsys.readouterr().out
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


# --------------------------------------------------------------------------- summary
def test_summary_flags_auto_slower_than_eager():
    from unlearn_fast.bench.summary import SLOWER, summarize, to_markdown

    rows = [_row(provider="eager", value=0.010), _row(provider="cpp", value=0.020),
            _row(provider="eager", shape="N=8,V=32", value=0.010), _row(provider="cpp", shape="N=8,V=32", value=0.004),
            _row(provider="eager", shape="N=4,V=4", value=0.010), _row(provider="cpp", shape="N=4,V=4", value=0.050),
            _row(provider="eager", metric="peak_mem_bytes", value=100.0),
            _row(provider="cpp", metric="peak_mem_bytes", value=25.0)]
    # auto runs cpp except at N=4 (routed to eager, as modality.py does for small batches)
    lines = summarize(rows, lambda op, shape, dtype, device: "eager" if shape == "N=4,V=4" else "cpp")
    by_shape = {ln["shape"]: ln for ln in lines}
    assert by_shape["N=8,V=16"]["flag"] == SLOWER
    assert by_shape["N=8,V=16"]["ratio"] == pytest.approx(0.5)
    assert by_shape["N=8,V=16"]["mem_ratio"] == pytest.approx(0.25)
    assert by_shape["N=8,V=32"]["flag"] == "" and by_shape["N=8,V=32"]["ratio"] == pytest.approx(2.5)
    assert by_shape["N=4,V=4"]["flag"] == "" and by_shape["N=4,V=4"]["auto_ratio"] == pytest.approx(1.0)
    text = to_markdown(lines)
    assert text.count(SLOWER) == 1
    assert "1 case(s) where backend=\"auto\" is slower than eager:" in text


def test_summary_memory_columns():
    """The tensor-level ratio where a suite measured it; no RSS ratio when both peaks are
    under 1 MiB (allocator noise: 0.3 MiB "is 10x" 0.03 MiB)."""
    from unlearn_fast.bench.summary import summarize, to_markdown

    mib = float(2**20)
    rows = [_row(provider="eager", value=0.010), _row(provider="fused", value=0.005),
            _row(provider="eager", metric="peak_mem_bytes", value=10 * mib),
            _row(provider="fused", metric="peak_mem_bytes", value=3 * mib),
            _row(provider="eager", metric="peak_mem_tensor_bytes", value=8 * mib),
            _row(provider="fused", metric="peak_mem_tensor_bytes", value=2 * mib),
            _row(provider="eager", shape="B=1", value=0.010), _row(provider="cpp", shape="B=1", value=0.005),
            _row(provider="eager", shape="B=1", metric="peak_mem_bytes", value=0.03 * mib),
            _row(provider="cpp", shape="B=1", metric="peak_mem_bytes", value=0.3 * mib)]
    lines = summarize(rows, lambda *a: None)
    by_shape = {ln["shape"]: ln for ln in lines}
    assert by_shape["N=8,V=16"]["mem_ratio"] == pytest.approx(0.3)
    assert by_shape["N=8,V=16"]["tensor_mem_ratio"] == pytest.approx(0.25)
    assert not by_shape["N=8,V=16"]["mem_tiny"] and by_shape["B=1"]["mem_tiny"]
    assert by_shape["B=1"]["tensor_mem_ratio"] is None
    table = to_markdown(lines).splitlines()
    assert "| 0.30x | 0.25x |" in next(t for t in table if "N=8,V=16" in t)
    assert "| <1 MiB both | - |" in next(t for t in table if "B=1" in t)


def test_failed_cases_are_rows_and_listed_in_the_summary(tmp_path, capsys):
    rec = harness.Recorder(quiet=True)
    rec.add("cross_entropy", "eager", "fwd", "N=8", "float32", "cpu", "time_median_s", 0.1)
    rec.failure("cross_entropy", "cpp", "fwd", "N=8", "float32", "cpu", MemoryError("out of memory"))
    assert "cross_entropy cpp fwd N=8 float32 failed: MemoryError: out of memory" in capsys.readouterr().out
    rec.write(str(tmp_path), plot=False)
    text = (tmp_path / "summary.md").read_text()
    assert "1 case(s) failed" in text and "- cross_entropy cpp fwd N=8 float32 cpu" in text
    clean = harness.Recorder(quiet=True)
    clean.add("cross_entropy", "eager", "fwd", "N=8", "float32", "cpu", "time_median_s", 0.1)
    clean.write(str(tmp_path / "clean"), plot=False)
    assert "0 case(s) failed." in (tmp_path / "clean" / "summary.md").read_text()


def test_summary_default_auto_is_the_registry_choice():
    from unlearn_fast import backends
    from unlearn_fast.bench.summary import registry_auto, suite_auto_lookup

    assert registry_auto("dual_masked_kl", "N=8,V=16", "float32", "cpu") == \
        backends.resolve("dual_masked_kl", "auto", "cpu")
    assert registry_auto("no_such_op", "", "float32", "cpu") is None
    lookup = suite_auto_lookup()
    # similarity_matching_loss runs eager on the CPU for B * B <= 65536 when asked for auto
    assert lookup("similarity_kl", "B=256,D=256", "float32", "cpu") == "eager"
    assert lookup("similarity_kl", "B=1024,D=256", "float32", "cpu") == \
        backends.resolve("similarity_matching", "auto", "cpu")
    assert lookup("eval_scores", "N=8", "float32", "cpu") == "fused"
    assert lookup("generation", "N=8", "float32", "cpu") is None


# --------------------------------------------------------------------------- peers
def test_peers_absent_on_cpu_with_a_reason():
    from unlearn_fast.bench import peers

    status = peers.peer_status("cpu")
    assert set(status) == {"liger_kl", "liger_jsd", "liger_flce", "cce"}
    for name, why in status.items():
        assert why and "needs a CUDA device" in why, (name, why)
    for peer in peers.PEERS:
        if importlib.util.find_spec(peer.module) is None:
            assert f"pip install {peer.pip}" in status[peer.name]


def test_a_peer_that_cannot_load_never_stops_a_run(monkeypatch, tmp_path, capsys):
    """Pretend every peer runs here: its package is missing, so building it fails; the
    suites report that and measure everything else."""
    import json

    from unlearn_fast import cli
    from unlearn_fast.bench import peers

    if any(importlib.util.find_spec(m) for m in ("liger_kernel", "cut_cross_entropy")):
        pytest.skip("a peer package is installed here")
    monkeypatch.setattr(peers, "why_unavailable", lambda peer, device: None)
    out = tmp_path / "out"
    assert cli.main(["bench", "dmk", "--quick", "--dtypes", "float32", "--no-plot", "--out", str(out)]) == 0
    assert cli.main(["bench", "linear", "--quick", "--ops", "cross_entropy", "--modes", "fwd", "--no-plot",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("liger_kl", "liger_jsd", "liger_flce", "cce"):
        assert f"{name} unavailable: ModuleNotFoundError" in text
    providers = {(r["op"], r["provider"]) for r in json.loads((out / "bench.json").read_text())}
    assert {("dual_masked_kl", "eager"), ("cross_entropy", "eager")} <= providers
    assert not any(peers.is_peer(p) for _, p in providers)


def test_linear_mia_sequences_cover_every_token():
    """bench linear's MIA references score SEQ_LEN-token sequences; the CPU cases have fewer
    tokens than one sequence, and a partial last sequence must count too."""
    from unlearn_fast.bench import linear as bl

    for n in (64, bl.SEQ_LEN, bl.SEQ_LEN + 44):
        values, valid = torch.arange(float(n)), torch.arange(n) % 3 != 0
        seqs = bl._per_sequence(values, valid)
        assert [len(s) for s in seqs] == [int(valid[i:i + bl.SEQ_LEN].sum()) for i in range(0, n, bl.SEQ_LEN)]
        assert torch.equal(torch.cat(seqs), values[valid])


# --------------------------------------------------------------------------- the CLI, every subcommand
@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """Every suite, --quick, one after the other into one folder (their rows merge)."""
    from unlearn_fast import cli
    from unlearn_fast.bench import SUITES

    out = tmp_path_factory.mktemp("bench")
    for i, suite in enumerate(SUITES):
        plot = ["--no-plot"] if i < len(SUITES) - 1 else []  # the last one plots every row
        assert cli.main(["bench", suite, "--quick", "--dtypes", "float32", "--out", str(out), *plot]) == 0, suite
    return out


def test_bench_every_suite_through_the_cli(bench_dir):
    import json

    rows = json.loads((bench_dir / "bench.json").read_text())
    harness.validate_rows(rows)
    ops = {r["op"] for r in rows if r["metric"] == "time_median_s"}
    assert {"dual_masked_kl", "cross_entropy", "fused_linear_dmk", "token_stats_mia", "fisher_accumulate",
            "topk_mask", "similarity_mse", "similarity_kl", "modality_decoupling", "eval_scores", "generation",
            "e2e_siu", "e2e_npo", "e2e_ga_kl"} <= ops
    threads = {r["shape"]: r["value"] for r in rows if r["metric"] == "cpu_threads"}
    assert threads and set(threads.values()) == {1.0}  # --quick on the CPU: one intra-op thread
    # the e2e suite times what a user gets by default (backend="auto") beside eager and cpp
    e2e_providers = {r["provider"] for r in rows if r["op"] == "e2e_npo" and r["metric"] == "time_median_s"}
    assert {"eager", "cpp", "auto"} <= e2e_providers


def test_bench_writes_plots_and_summary(bench_dir):
    names = os.listdir(bench_dir)
    assert any(n.startswith("lines_dual_masked_kl_vs_N_") for n in names)
    assert any(n.startswith("lines_dual_masked_kl_vs_V_") for n in names)
    assert "cross_entropy_time_median_s.png" in names and "e2e_siu_peak_mem_bytes.png" in names
    summary = (bench_dir / "summary.md").read_text()
    assert "| op | mode | shape |" in summary
    for op in ("dual_masked_kl", "cross_entropy", "topk_mask", "similarity_kl", "eval_scores", "e2e_npo"):
        assert f"| {op} |" in summary
    e2e_line = next(ln for ln in summary.splitlines() if ln.startswith("| e2e_npo |"))
    assert "| auto |" in e2e_line  # the auto column shows the e2e "auto" provider's ratio
    assert "slower than eager" in summary


PROFILE_SIZES = ["--tokens", "48", "--vocab", "300", "--hidden", "40", "--layers", "1", "--batch", "40",
                 "--dim", "24", "--steps", "1"]


def test_profile_every_op_writes_a_chrome_trace(tmp_path, capsys):
    import json

    from unlearn_fast import cli
    from unlearn_fast.bench.profile import CASES

    for op in CASES:
        assert cli.main(["profile", op, *PROFILE_SIZES, "--out", str(tmp_path)]) == 0, op
        trace = tmp_path / f"{op}_auto_cpu.trace.json"
        events = json.loads(trace.read_text())["traceEvents"]
        assert events, op
        assert "Self CPU" in (tmp_path / f"{op}_auto_cpu.table.txt").read_text(), op  # the kernel table
    assert capsys.readouterr().out.count("Chrome trace:") == len(CASES)


def test_profile_rejects_a_bad_size_and_a_file_as_out(tmp_path, capsys):
    from unlearn_fast import cli

    assert cli.main(["profile", "dmk", "--tokens", "0"]) == 2
    assert "--tokens must be at least 1" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert cli.main(["profile", "dmk", "--out", str(tmp_path / "f")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_gpu_suite_script_matches_the_cli():
    """benchmarks/gpu_suite.sh: valid bash, runs every suite by default, and every flag it
    passes to `unlearn-fast bench` / `profile` exists."""
    import re
    import shutil
    import subprocess

    from unlearn_fast.bench import SUITES
    from unlearn_fast.cli import build_parser

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_suite.sh")
    text = open(path).read()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", path], check=True)
    default = re.search(r"\$\{SUITES:-([^}]*)\}", text).group(1).split()
    assert sorted(default) == sorted(SUITES)
    parser = build_parser()
    parser.parse_args(["bench", "dmk", "--out", "x", "--no-compile"])
    profile = re.search(r"unlearn_fast profile (.*?)\\\n(.*?)>", text, re.S)
    argv = (profile.group(1) + profile.group(2)).replace('"$out/profile"', "x").split()
    parser.parse_args(["profile", *argv])


def test_e2e_method_selection(tmp_path):
    import json

    from unlearn_fast import cli

    assert cli.main(["bench", "e2e", "--quick", "--e2e-methods", "npo", "--backends", "cpp", "--no-plot",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["op"] for r in rows if r["metric"] == "time_median_s"} == {"e2e_npo"}
    assert {r["provider"] for r in rows if r["metric"] == "time_median_s"} == {"eager", "cpp"}
    with pytest.raises(ValueError, match="--e2e-methods"):
        cli.main(["bench", "e2e", "--quick", "--e2e-methods", "nope", "--no-plot"])


def test_cpu_peak_memory_counts_a_returned_tensor():
    # the RSS is read while the result is alive: a short call used to finish between two
    # samples, and its returned tensor went uncounted (33 of 40 times at 1 MiB)
    from unlearn_fast.bench.harness import peak_memory

    nbytes = 4 * 2**20
    for _ in range(5):
        assert peak_memory(lambda: torch.ones(nbytes // 4)) >= 0.9 * nbytes


def test_a_cpu_case_too_big_for_memory_is_skipped_not_killed(monkeypatch, tmp_path, capsys):
    """On the CPU an allocation past the available memory does not raise: the OOM killer
    ends the run.  bench linear estimates what an eager case needs and records it as
    failed instead; the fused providers, which need a fraction, still run."""
    import json

    from unlearn_fast import cli
    from unlearn_fast.bench import harness

    monkeypatch.setattr(harness, "available_cpu_memory", lambda: 2**20)  # 1 MiB free
    out = tmp_path / "out"
    assert cli.main(["bench", "linear", "--quick", "--device", "cpu", "--ops", "cross_entropy", "--modes", "fwd",
                     "--no-plot", "--out", str(out)]) == 0
    assert "cross_entropy eager fwd N=512,H=256,V=4099 float32 failed: MemoryError" in capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())
    failed = {r["provider"] for r in rows if r["metric"] == "failed"}
    timed = {r["provider"] for r in rows if r["metric"] == "time_median_s" and r["op"] == "cross_entropy"}
    assert failed == {"eager"} and "cpp" in timed and "eager" not in timed


def test_memory_check_passes_what_fits():
    from unlearn_fast.bench import harness

    free = harness.available_cpu_memory()
    assert free is None or free > 0
    harness.check_fits_in_memory(2**20, "cpu", "a small case")  # fits anywhere this suite runs
    harness.check_fits_in_memory(2**60, "cuda", "a GPU case")  # CUDA raises its own OOM
    if free is not None:  # Linux: /proc/meminfo
        with pytest.raises(MemoryError, match="needs about"):
            harness.check_fits_in_memory(2**60, "cpu", "an exabyte")
