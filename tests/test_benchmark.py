"""The benchmark runs end to end (a short --quick run on the CPU) and writes the results other tools read,
with the provenance (nice_ext/provenance.py) that results files carry."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DEVICES, ROOT

OP_KEYS = {"op", "pass", "dtype", "batch", "dim", "fused_ms", "reference_ms", "compiled_ms", "fused_gbps"}
STEP_KEYS = {"variant", "batch", "ms_per_step", "samples_per_s", "peak_mem_mb"}


def test_quick_cpu_benchmark_writes_its_results(tmp_path):
    # its output piped into `head -1`: the reader leaves after the table's first line, and the results
    # files are written all the same (they had been lost to a BrokenPipeError at the table's next line)
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "benchmarks/bench_coupling.py", "--device", "cpu", "--quick",
                                 "--min-run-time", "0.01", "--out", str(tmp_path)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        first_line = proc.stdout.readline()
        proc.stdout.close()
        returncode = proc.wait(timeout=600)
        stderr.seek(0)
        said = stderr.read()
    assert returncode == 0 and "Traceback" not in said, said[-3000:]
    assert first_line.startswith("# nice_ext benchmark:"), first_line
    with open(tmp_path / "CPU_{}_cores.json".format(os.cpu_count())) as f:
        written = json.load(f)
    for key in ("device", "cpu", "torch", "cuda", "commit", "date", "command", "copy_gbps", "cpu_threads"):
        assert key in written, key
    assert written["copy_gbps"] > 0 and "--quick" in written["command"]
    ops = written["ops"]
    assert {(r["op"], r["pass"]) for r in ops} == {(op, p) for op in ("coupling", "affine_coupling", "scale_prior")
                                                   for p in ("fwd", "bwd", "fwd+bwd")}
    for row in ops:
        assert OP_KEYS <= set(row) and row["fused_ms"] > 0 and row["reference_ms"] > 0 and row["fused_gbps"] > 0
    assert [r["op"] for r in written["call_cost"]] == ["coupling", "affine_coupling", "scale_prior"]
    for row in written["call_cost"]:
        assert all(row[f"{impl}_{what}_us"] > 0 for impl in ("fused", "reference") for what in ("fwd", "fwd_bwd"))
    steps = {r["variant"]: r for r in written["train_step"]}
    assert {"seed-masked-eager", "seed-masked-eager-default-adam", "reference-eager", "fused-eager",
            "fused-eager-overlap", "reference-eager-affine", "fused-eager-affine"} <= set(steps)
    for row in steps.values():
        assert STEP_KEYS <= set(row) and row["ms_per_step"] > 0
    markdown = (tmp_path / "CPU_{}_cores.md".format(os.cpu_count())).read_text()
    assert "| fused-eager | 200 |" in markdown and "Median over entries" in markdown
    assert (tmp_path / "CPU_{}_cores.png".format(os.cpu_count())).read_bytes()[:4] == b"\x89PNG"
    assert "| coupling | fwd | float32 | 256 | 784 |" in markdown
    assert "| one call at batch 1 (host cost) |" in markdown


def test_a_failing_train_step_variant_is_reported_and_the_others_still_run(monkeypatch):
    """A variant that fails (on a GPU: a capture that a driver refuses, say) is a result of the run, in the
    JSON and in the table, not the end of a run that has already timed the ops."""
    bench = load_script("bench_coupling")
    small_nice = bench.NICE

    def broken_seed_model(*args, **kwargs):
        raise RuntimeError("the seed-style model could not be built")

    monkeypatch.setattr(bench, "SeedMaskedNICE", broken_seed_model)
    monkeypatch.setattr(bench, "NICE", lambda dim, layers, hidden, width, **kw: small_nice(dim, 2, 1, 8, **kw))
    monkeypatch.setattr(bench, "timeit", lambda fn, min_run_time: (fn(), (1.0, 0.9, 1.1))[1])
    failures = []
    rows = bench.train_step_variants(torch.device("cpu"), 4, True, 0.01, failures)
    assert [(f["variant"], f["batch"]) for f in failures] == [("seed-masked-eager-default-adam", 4),
                                                              ("seed-masked-eager", 4)]
    assert failures[0]["error"] == "RuntimeError: the seed-style model could not be built"
    assert [r["variant"] for r in rows] == ["reference-eager", "fused-eager", "fused-eager-overlap", "fused-eager-bf16",
                                            "reference-eager-affine", "fused-eager-affine"]
    result = dict(device="cpu", torch="", cuda=None, commit="", date="", command="", copy_gbps=1.0, ops=[],
                  call_cost=[], train_step=rows, train_step_failures=failures,
                  summary=dict(median_speedup_vs_reference=1.0, median_speedup_vs_compiled=1.0,
                               largest_batch_median_pct_of_copy=1.0))
    table = bench.markdown(result)
    assert "| fused-eager | 4 | 1.00 (0.90-1.10) |" in table and table.count("| - |") == len(rows)
    assert "| seed-masked-eager | 4 | failed: RuntimeError: the seed-style model could not be built |" in table


def test_every_entry_times_a_compiled_reference(monkeypatch, capsys):
    """Each per-op entry compiles the reference afresh: with one compilation allowed per code object, as
    dynamo's recompile limit allows 8, every entry still compiles once (the full benchmark has 12 entries
    per op; past the limit its compiled column had been the eager reference's time)."""
    import torch._dynamo

    bench = load_script("bench_coupling")
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend, **kw))
    monkeypatch.setattr(bench, "op_sizes", lambda quick: [(3, 10), (5, 12), (7, 14)])
    monkeypatch.setattr(bench, "timeit", lambda fn, min_run_time: (fn(), (1.0, 1.0, 1.0))[1])
    # (dynamo's own patch: monkeypatch's undo left the setting unreadable for the tests after this one)
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = bench.bench_ops(torch.device("cpu"), False, [torch.float32], 0.01)
    torch._dynamo.reset()
    entries = 3 * 3  # ops x sizes
    assert len(rows) == entries * 3 and all(r["compiled_ms"] == 1.0 for r in rows)
    assert len(compiled_graphs) >= entries
    # each entry's times are logged as it is done (a run stopped short still tells them)
    assert ("  scale_prior float32 7x14 (fused / reference / compiled): fwd 1.0000 / 1.0000 / 1.0000 ms; "
            "bwd 1.0000 / 1.0000 / 1.0000 ms; fwd+bwd 1.0000 / 1.0000 / 1.0000 ms") in capsys.readouterr().err.splitlines()


def test_figures_against_steps_runs_and_says_what_it_measured():
    result = subprocess.run([sys.executable, "benchmarks/figures_vs_steps.py", "--steps", "20", "--rounds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("figures alone: ") and " s; steps alone: " in lines[0]
    assert lines[1].startswith("steps while the figures are drawn: ") and "(a tenth of it)" in lines[1]
    refused = subprocess.run([sys.executable, "benchmarks/figures_vs_steps.py", "--steps", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--steps and --rounds must be positive" in refused.stderr


def test_provenance_names_this_checkouts_commit_and_no_other(tmp_path, monkeypatch):
    from nice_ext import provenance

    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # a copy of the tree without git metadata
        assert provenance.source_commit() == os.environ.get("NICE_EXT_COMMIT", "unknown")
        return
    assert provenance.source_commit().startswith(head.stdout.strip())
    # installed inside some other repository (a project's virtual environment), the commit is not ours
    other = tmp_path / "project"
    (other / "site-packages").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.setattr(provenance, "SOURCE_ROOT", str(other / "site-packages"))
    monkeypatch.setenv("NICE_EXT_COMMIT", "abc1234")
    assert provenance.source_commit() == "abc1234"
    monkeypatch.delenv("NICE_EXT_COMMIT")
    assert provenance.source_commit() == "unknown"
    assert provenance.device_name(torch.device("cpu")) == f"CPU ({os.cpu_count()} cores)"


def load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_of_other_cuda_kernels_than_the_defaults_get_their_own_files():
    bench = load_script("bench_coupling")
    device = {"device": "NVIDIA H100 80GB HBM3"}
    stem = os.path.join("out", "NVIDIA_H100_80GB_HBM3")
    assert bench.results_stem("out", device) == stem  # a CPU run records no versions
    def versions(coupling, scale_prior, affine_coupling):
        return {**device, "cuda_kernels": dict(coupling=coupling, scale_prior=scale_prior,
                                               affine_coupling=affine_coupling)}

    assert bench.results_stem("out", versions(2, 2, 2)) == stem  # the defaults
    assert bench.results_stem("out", versions(1, 1, 1)) == stem + "_kernels_v1"
    assert bench.results_stem("out", versions(1, 2, 1)) == stem + "_kernels_coupling_v1_scale_prior_v2_affine_coupling_v1"
    assert bench.results_stem("out", versions(2, 1, 1)) == stem + "_kernels_coupling_v2_scale_prior_v1_affine_coupling_v1"
    assert bench.kernel_versions_text({"coupling": 1, "scale_prior": 2}) == "coupling version 1, scale_prior version 2"
    assert bench.kernel_versions_text(2) == "version 2"  # results written before the per-op switch


def test_bad_cuda_kernel_versions_are_a_usage_error():
    result = subprocess.run([sys.executable, "benchmarks/bench_coupling.py", "--cuda-kernels", "coupling=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --cuda-kernels: CUDA kernel versions are '1', '2' or per op" in result.stderr


def test_op_dtypes_are_chosen_by_name():
    bench = load_script("bench_coupling")
    assert bench.dtypes_argument("float64,bfloat16,float64") == [torch.float64, torch.bfloat16]
    result = subprocess.run([sys.executable, "benchmarks/bench_coupling.py", "--dtypes", "float32,int8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --dtypes: unknown dtype 'int8': choose from float32, float64, bfloat16, float16" in result.stderr


def test_step_profile_counts_the_operators_of_each_setting(tmp_path):
    """benchmarks/profile_step.py on the CPU: the paper model's step has one ReLU per hidden layer (4 x 5)
    and none with --fuse-bias-relu, whose hidden layers are _addmm_activation calls; per step, whatever
    the number of steps profiled."""
    profile = load_script("profile_step")
    cpu = torch.device("cpu")
    plain = profile.profile_variant("fused-eager", cpu, batch=4, steps=2, warmup=1)
    fused = profile.profile_variant("fused-eager-fuse-bias-relu", cpu, batch=4, steps=1, warmup=1)
    assert plain["names"]["aten::relu"]["count"] == 20 and "aten::_addmm_activation" not in plain["names"]
    assert fused["names"]["aten::_addmm_activation"]["count"] == 20 and "aten::relu" not in fused["names"]
    assert plain["names"]["aten::mm"]["count"] == fused["names"]["aten::mm"]["count"] == 47
    assert plain["names"]["aten::addmm"]["count"] == 24 and fused["names"]["aten::addmm"]["count"] == 4
    for result in (plain, fused):
        assert result["wall_us"] > 0 and result["event_us"] > 0 and result["busy_us"] is None
        assert result["events_per_step"] == sum(entry["count"] for entry in result["names"].values())
    assert profile.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.75)]) == 4
    out = tmp_path / "profiles" / "step.md"  # (its folder made)
    result = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--device", "cpu", "--batch", "2",
                             "--steps", "1", "--variants", "fused-eager-fuse-bias-relu", "--top", "3",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table == result.stdout[:len(table)] and "--variants fused-eager-fuse-bias-relu" in table
    assert "| fused-eager-fuse-bias-relu |" in table and table.count("| aten::") == 3


def test_a_variant_sets_the_matmul_settings_it_names_and_restores_them():
    bench = load_script("bench_coupling")
    with bench.matmul_settings("fused-graphed-tf32-cublaslt"):
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
    assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublas
    with bench.matmul_settings("fused-eager"):
        assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError, match="unknown training-step variant 'fused-eager-tf23'"):
        bench.make_train_step("fused-eager-tf23", torch.rand(2, 784))


def test_step_profile_summary_of_device_events_counts_two_streams_once():
    """The GPU branch of the summary, on made-up events: kernels on two streams that overlap count once in
    the busy time and twice in the sum; CPU events are left out."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    profile = load_script("profile_step")

    def event(name, start, end, device_type=DeviceType.CUDA):
        return type("Event", (), dict(name=name, device_type=device_type, time_range=Interval(start, end),
                                      self_cpu_time_total=1000.0))()

    events = [event("gemm", 0, 10), event("weight_gemm", 5, 15), event("relu", 20, 22), event("gemm", 30, 40),
              event("weight_gemm", 30, 38), event("aten::mm", 0, 40, DeviceType.CPU)]
    summary = profile.summarize(events, steps=2, on_device=True)
    assert summary["events_per_step"] == 2.5 and summary["event_us"] == (10 + 10 + 2 + 10 + 8) / 2
    assert summary["busy_us"] == (15 + 2 + 10) / 2
    assert summary["names"]["gemm"] == dict(count=1, us=10) and "aten::mm" not in summary["names"]
    on_cpu = profile.summarize(events, steps=2, on_device=False)
    assert on_cpu["names"] == {"aten::mm": dict(count=0.5, us=500.0)} and on_cpu["busy_us"] is None


@pytest.mark.parametrize("args, message", [
    (["--variants", "fused-eager,fused-eagr"], "unknown variant(s) fused-eagr"),
    (["--variants", "fused-graphed-tf32"], "graphed, tf32 and cublaslt variants need --device cuda"),
    (["--variants", "fused-eager-cublaslt"], "graphed, tf32 and cublaslt variants need --device cuda"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--out", "/dev/null/step.md"], "/dev/null"),  # before any profile runs
])
def test_step_profile_refuses_what_it_cannot_do(args, message):
    result = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--device", "cpu", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    status = 1 if "--out" in args else 2  # (a file system's refusal, not a usage error)
    assert result.returncode == status and message in result.stderr and "Traceback" not in result.stderr
    assert "us per step" not in result.stderr  # refused before any profile ran


def test_kernel_profile_calls_are_valid_and_its_summary_reads_ncu_csv(tmp_path):
    """benchmarks/profile_kernels.py runs under ncu on a GPU (check_cuda.sh ncu); here its calls run on the
    CPU kernels at a small batch, and its summary reads a log in ncu's --csv layout."""
    profile = load_script("profile_kernels")
    names = []
    for name, version, fn in profile.calls(torch.float32, batch=4, device="cpu"):
        with torch.no_grad():
            outputs = fn()
        assert all(torch.isfinite(t).all() for t in outputs), name
        names.append(name)
    assert len(names) == 28 and "v2 coupling bwd 4 x 3072 float32" in names and "v2 affine_coupling fwd 4 x 784 float32" in names
    kernel = "void nice_ext::(anonymous namespace)::coupling_update_rows_kernel<c10::BFloat16, 8>(const c10::BFloat16 *, long)"
    header = '"ID","Process ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [f'"{i}","1","{kernel}","(256, 1, 1)","(528, 1, 1)","Command line profiler metrics","{metric}","{unit}","{value}"'
            for i, metric, unit, value in [(0, "gpu__time_duration.sum", "us", "140.10"),
                                           (0, "l1tex__t_sector_hit_rate.pct", "%", "61.2"),
                                           (1, "gpu__time_duration.sum", "us", "9.5")]]
    log = tmp_path / "ncu.csv"
    log.write_text("==PROF== Connected to process 1\n" + "\n".join([header] + rows) + "\n==PROF== Disconnected\n")
    table = profile.summarize(str(log)).splitlines()
    assert table[0].startswith("| ID | kernel | time |") and len(table) == 4
    assert table[2].startswith("| 0 | coupling_update_rows_kernel<c10::BFloat16, 8> | 140.10 us |")
    assert "61.2 %" in table[2] and table[3].startswith("| 1 |")


@pytest.mark.parametrize("device", DEVICES)
def test_provenance_records_the_cuda_kernel_versions_on_cuda(device):
    from nice_ext import ops, provenance

    fields = provenance.record(torch.device(device), "a command")
    if device == "cuda":
        assert fields["cuda_kernels"] == ops.cuda_kernel_versions()
        with ops.use_cuda_kernels(coupling=2):
            assert provenance.record(torch.device(device), "a command")["cuda_kernels"]["coupling"] == 2
    else:
        assert "cuda_kernels" not in fields  # the CPU kernels have one generation


def test_kernel_version_comparison_times_each_version_in_turns(monkeypatch, tmp_path, capsys):
    """benchmarks/compare_kernel_versions.py with its timer replaced by one that notes which version each op
    runs at each call and answers a time per version: the turns alternate, every entry's passes are timed
    under both versions, and the speed-ups and the verdicts follow from the times."""
    from nice_ext import ops

    compare = load_script("compare_kernel_versions")
    answers = {"coupling": {1: 2.0, 2: 1.0}, "scale_prior": {1: 1.0, 2: 4.0}, "affine_coupling": {1: 3.0, 2: 2.0}}
    seen = []

    def timer(call, min_run_time):
        versions = ops.cuda_kernel_versions()
        op = current_op[0]
        seen.append((op, versions[op]))
        assert {o: v for o, v in versions.items() if o != op} == {o: v for o, v in before.items() if o != op}
        return answers[op][versions[op]], 0.0, 0.0

    current_op = [None]
    before = ops.cuda_kernel_versions()  # every other op keeps its version while one op's are timed
    real_op_cases = compare.op_cases

    def op_cases(op, *args):
        current_op[0] = op
        return real_op_cases(op, *args)

    monkeypatch.setattr(compare, "timeit", timer)
    monkeypatch.setattr(compare, "op_cases", op_cases)
    monkeypatch.setattr(compare.ops, "cuda_kernels_run_on_cpu_tensors", lambda: True)  # let --device cpu through
    result = compare.main(["--device", "cpu", "--sizes", "3x10,2x7", "--dtypes", "float32,float64", "--rounds", "3",
                           "--min-run-time", "0.01", "--out", str(tmp_path)])
    assert ops.cuda_kernel_versions() == before
    # each entry's times are logged as it is done (a run stopped short still tells them)
    assert ("  coupling float32 3x10: fwd v1 2.0000 ms, v2 1.0000 ms (2.00x); bwd v1 2.0000 ms, v2 1.0000 ms (2.00x)"
            in capsys.readouterr().err.splitlines())
    # per entry and pass: 1 2, 2 1, 1 2
    entries = 3 * 2 * 2 * 2
    assert [v for _, v in seen] == [1, 2, 2, 1, 1, 2] * entries
    rows = result["rows"]
    assert len(rows) == entries and {(r["op"], r["pass"]) for r in rows} == {
        (op, p) for op in ops.CUDA_KERNEL_OPS for p in ("fwd", "bwd")}
    for r in rows:
        assert (r["v1_ms"], r["v2_ms"]) == (answers[r["op"]][1], answers[r["op"]][2])
        assert r["v2_speedup"] == pytest.approx(answers[r["op"]][1] / answers[r["op"]][2])
        assert r["v1_gbps"] > 0 and r["v2_gbps"] > 0
    summary = result["summary"]
    defaults = ops.default_cuda_kernel_versions()
    assert {op: s["faster_version"] for op, s in summary.items()} == {"coupling": 2, "scale_prior": 1,
                                                                      "affine_coupling": 2}
    assert summary["scale_prior"]["v2_speedup_geomean"] == pytest.approx(0.25)
    assert summary["coupling"]["largest_batch"] == 3
    assert {op: s["default_version"] for op, s in summary.items()} == defaults
    assert "cuda_kernels" not in result and result["command"].startswith("python benchmarks/compare_kernel_versions.py")
    written = json.loads((tmp_path / f"CPU_{os.cpu_count()}_cores_kernel_versions.json").read_text())
    assert written["rows"] == rows
    table = (tmp_path / f"CPU_{os.cpu_count()}_cores_kernel_versions.md").read_text()
    assert "| coupling | fwd | float32 | 3 | 10 | 2.0000 (2.0000-2.0000) | 1.0000 (1.0000-1.0000) |" in table
    assert "| scale_prior | 0.25x | 0.25x (3 rows) | version 1 | version 2 |" in table


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "the CPU kernels have one version"),
    (["--sizes", "4x1"], "a coupling needs at least 2 features"),
    (["--sizes", "4by784"], "sizes are BATCHxFEATURES"),
    (["--ops", "coupling,prior"], "unknown op 'prior'"),
    (["--rounds", "0"], "argument --rounds: must be positive"),
])
def test_kernel_version_comparison_refuses_what_it_cannot_do(args, message):
    result = subprocess.run([sys.executable, "benchmarks/compare_kernel_versions.py", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def write_scores(path, ll_nats):
    """A scores file as ``evaluate --scores FILE.csv`` writes it (MNIST's 784 features in [0, 1])."""
    from nice_ext.data import bits_per_dim

    path.write_text("index,ll_nats,bits_per_dim\n" + "".join(
        f"{i},{ll:.6f},{bits_per_dim(ll, 784, (0.0, 1.0)):.6f}\n" for i, ll in enumerate(ll_nats)))
    return str(path)


def test_score_comparison_counts_what_it_says(tmp_path):
    compare = load_script("compare_scores")
    rng = np.random.default_rng(0)
    own, other = rng.integers(0, 20, 300).astype(float), rng.integers(5, 30, 200).astype(float)  # many ties
    pairs = own[:, None] - other[None, :]
    assert compare.auroc(own, other) == pytest.approx(((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size)
    assert compare.auroc(np.array([3.0]), np.array([1.0, 2.0])) == 1.0
    assert compare.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    own_file, other_file = write_scores(tmp_path / "own.csv", own), write_scores(tmp_path / "other.csv", other)
    figure, record = tmp_path / "hist.png", tmp_path / "numbers.json"
    result = subprocess.run([sys.executable, "benchmarks/compare_scores.py", own_file, other_file, "--labels", "A",
                             "B", "--out", str(figure), "--json", str(record)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert figure.stat().st_size > 0
    numbers = json.loads(record.read_text())
    assert numbers["auroc"] == round(compare.auroc(own, other), 4)
    assert numbers["other_above_own_median"] == round(float((other > np.median(own)).mean()), 4)
    assert numbers["other_above_own_5th_percentile"] == round(float((other > np.percentile(own, 5)).mean()), 4)
    assert numbers["A"]["images"] == 300 and numbers["B"]["mean_ll_nats"] == round(other.mean(), 2)
    assert numbers["A"]["percentiles"]["50"]["ll_nats"] == round(float(np.median(own)), 2)
    low = numbers["B"]["percentiles"]["5"]  # the 5th percentile image: the most bits/dim but 5 %
    assert (low["ll_nats"], low["bits_per_dim"]) == (round(float(np.percentile(other, 5)), 2), round(float(
        np.percentile([(-ll + 784 * np.log(256)) / (784 * np.log(2)) for ll in other], 95)), 4))
    assert numbers["command"].startswith("python benchmarks/compare_scores.py ") and numbers["commit"]
    assert f"| A | 300 | {own.mean():.2f} |" in result.stdout
    (tmp_path / "bad.csv").write_text("index,score\n0,1.0\n")
    for bad, message in [("bad.csv", "not a scores file of python -m nice_ext.evaluate --scores"),
                         ("missing.csv", "No such file or directory")]:
        result = subprocess.run([sys.executable, "benchmarks/compare_scores.py", str(tmp_path / bad), own_file],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and message in result.stderr, result.stderr
