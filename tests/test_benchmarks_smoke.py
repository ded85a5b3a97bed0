"""Smoke tests of the benchmarks on the 2-D task with tiny sizes (a few seconds each)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import convergence, throughput  # noqa: E402
from benchmarks.common import first_crossing, read_curve, step_interp  # noqa: E402


def test_curve_helpers():
    assert first_crossing([0.0, 1.0, 2.0], [0.1, 0.5, 0.9], 0.5) == 1.0
    assert first_crossing([0.0, 1.0], [0.1, 0.2], 0.5) is None
    out = step_interp([0.0, 1.0, 2.0], [0.1, 0.5, 0.9], [0.0, 0.5, 1.0, 1.9, 2.5])
    assert out[:4] == [0.1, 0.1, 0.5, 0.5] and math.isnan(out[4])


def toy_args(toy_cache, *args: str) -> list[str]:
    """A one-seed quick 2-D benchmark on the cached base model, plus ``args``."""
    return ["--task", "toy2d", "--quick", "--seeds", "1", *args, "--set", f"model.cache_dir={toy_cache}",
            "--set", "model.pretrain_steps=1500", "--set", "eval.samples_per_prompt=128"]


def test_convergence_toy_budget_and_table(tmp_path, toy_cache):
    stem = tmp_path / "conv"
    work = tmp_path / "runs"
    rc = convergence.main(toy_args(toy_cache, "--budget-s", "0.4", "--algos", "flow_grpo,awm",
                                   "--out", str(stem), "--work-dir", str(work), "--keep-runs"))
    assert rc == 0
    table = stem.with_suffix(".md").read_text()
    assert "| flow_grpo |" in table and "| awm |" in table and stem.with_suffix(".png").stat().st_size > 0
    data = json.loads(stem.with_suffix(".json").read_text())
    for algo in ("flow_grpo", "awm"):
        curve = read_curve(work / f"{algo}_seed0_lr0.001", "eval/rewarded_fraction")
        # the budget ended the run on the first epoch whose cumulative time reached it
        assert data["curves"][algo][0]["ended"] == "budget"
        rows = [json.loads(x) for x in (work / f"{algo}_seed0_lr0.001" / "metrics.jsonl").read_text().split("\n") if x]
        spent = [r["perf/epoch_s"] for r in rows if "perf/epoch_s" in r]
        assert sum(spent) >= 0.4 > sum(spent[:-1])
        assert curve.seconds[0] == 0.0 and curve.samples[0] == 0 and curve.values == data["curves"][algo][0]["values"]
        # the trainer's own budget stopped it, with a final evaluation and the cost counters
        summary = json.loads((work / f"{algo}_seed0_lr0.001" / "summary.json").read_text())
        assert summary["stopped_by"] == "max_wall_s" and "eval/rewarded_fraction" in rows[-1]
        last = rows[-1]
        assert curve.rows[0] == 0 and curve.rows[-1] == last["perf/network_rows_fwd"] + last["perf/network_rows_bwd"]
        assert curve.flops[0] == 0 and curve.flops[-1] == rows[-1]["perf/flops"] > 0
    for measure in ("time", "samples", "rows", "flops"):
        assert f"speed-up vs Flow-GRPO ({measure})" in table


def test_convergence_sample_budget(tmp_path, toy_cache, monkeypatch):
    stem, work = tmp_path / "conv", tmp_path / "runs"
    rc = convergence.main(toy_args(toy_cache, "--budget-samples", "256", "--algos", "flow_grpo,advantageflow",
                                   "--out", str(stem), "--work-dir", str(work), "--keep-runs"))
    assert rc == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["budget_s"] == 0 and data["budget_samples"] == 256
    for algo in ("flow_grpo", "advantageflow"):
        curve = data["curves"][algo][0]
        # 128 samples per epoch: the budget ends both runs after epoch 2, evaluated there
        assert curve["ended"] == "budget" and curve["epochs"] == 2 and curve["samples"] == [0, 256]
    assert "256 samples of training" in stem.with_suffix(".md").read_text()
    assert "| advantageflow | 0 | budget | 256 |" in stem.with_suffix(".md").read_text()  # per-run table
    # a saved run re-rendered with a note on where it ran
    assert convergence.main(["--from-json", str(stem.with_suffix(".json")), "--out", str(tmp_path / "again"),
                             "--note", "Ran on machine X."]) == 0
    assert "Re-rendered with `" in (tmp_path / "again.md").read_text()
    assert "Ran on machine X." in (tmp_path / "again.md").read_text()
    from benchmarks.common import command_line

    monkeypatch.setattr(sys, "argv", ["benchmarks/convergence.py", "--note", "a b", "--x", "--note=c d"])
    assert command_line(hide=("--note",)).endswith("--note NOTE --x --note=NOTE")

    # The same runs imported as runs made outside the benchmark (`--import-runs`) give the same
    # curves and the same table rows; a run without summary.json is reported as unfinished.
    runs = {a: {"0": str(next(work.glob(f"{a}_seed0_lr*")))} for a in ("flow_grpo", "advantageflow")}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"runs": runs, "protocol": "made by the benchmark above"}))
    imported = tmp_path / "imported"
    assert convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(imported)]) == 0
    got = json.loads(imported.with_suffix(".json").read_text())
    for algo in runs:
        for key in ("values", "samples", "rows", "flops", "seconds"):
            assert got["curves"][algo][0][key] == data["curves"][algo][0][key]
        assert got["curves"][algo][0]["seed"] == 0 and got["curves"][algo][0]["ended"] == "max_samples"
    table_rows = [{line.split(" | ")[0]: line.split(" | ", 2)[2]
                   for line in p.with_suffix(".md").read_text().split("Per run")[0].splitlines()
                   if line.startswith(("| flow_grpo |", "| advantageflow |"))} for p in (stem, imported)]
    assert table_rows[0] == table_rows[1] and len(table_rows[0]) == 2
    assert "made by the benchmark above" in imported.with_suffix(".md").read_text()
    assert "| advantageflow | 0 | max_samples | 256 |" in imported.with_suffix(".md").read_text()  # per-run table
    # a method's curves carried over from that result file (its run folders may be gone), renamed
    carried = tmp_path / "carried"
    manifest.write_text(json.dumps({"runs": {"flow_grpo": runs["flow_grpo"]}, "carry": {
        "results": str(imported.with_suffix(".json")), "methods": {"advantageflow": "advantageflow@earlier"}}}))
    assert convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(carried)]) == 0
    again = json.loads(carried.with_suffix(".json").read_text())
    assert again["curves"]["advantageflow@earlier"] == got["curves"]["advantageflow"]
    assert again["lrs"]["advantageflow@earlier"] == got["lrs"]["advantageflow"]
    assert "| advantageflow@earlier | 0 | max_samples | 256 |" in carried.with_suffix(".md").read_text()
    manifest.write_text(json.dumps({"runs": {"flow_grpo": runs["flow_grpo"]}, "carry": {
        "results": str(imported.with_suffix(".json")), "methods": {"advantageflow": "flow_grpo"}}}))
    with pytest.raises(SystemExit, match=r"seeds \[0\]\) is both imported and carried"):
        convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(carried)])
    # ... but a carried method joins new seeds of the same method (its first seed's folder gone)
    manifest.write_text(json.dumps({"runs": {"flow_grpo": {"1": runs["flow_grpo"]["0"]}}, "carry": {
        "results": str(imported.with_suffix(".json")), "methods": {"flow_grpo": "flow_grpo"}}}))
    assert convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(carried)]) == 0
    joined = json.loads(carried.with_suffix(".json").read_text())
    assert [c["seed"] for c in joined["curves"]["flow_grpo"]] == [0, 1]
    assert joined["curves"]["flow_grpo"][0]["values"] == joined["curves"]["flow_grpo"][1]["values"]
    assert list(joined["imported"]["flow_grpo"]) == ["0", "1"]
    assert "carried_from" in joined["imported"]["flow_grpo"]["0"]
    assert "| flow_grpo | 0,1 |" in carried.with_suffix(".md").read_text()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["advantageflow"]["0"], unfinished)
    (unfinished / "summary.json").unlink()
    manifest.write_text(json.dumps({"runs": {"flow_grpo": runs["flow_grpo"],
                                             "advantageflow@cut": {"1": str(unfinished)}}}))
    assert convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(imported)]) == 0
    assert "- advantageflow@cut seed 1: unfinished (epoch 2)" in imported.with_suffix(".md").read_text()
    # a run resumed to more epochs keeps its earlier summary until it ends: still unfinished
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["advantageflow"]["0"], resumed)
    summary = json.loads((resumed / "summary.json").read_text())
    (resumed / "summary.json").write_text(json.dumps({**summary, "epochs": 1}))
    manifest.write_text(json.dumps({"runs": {"flow_grpo": runs["flow_grpo"], "advantageflow": {"0": str(resumed)}}}))
    assert convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(imported)]) == 0
    assert "- advantageflow seed 0: unfinished (epoch 2)" in imported.with_suffix(".md").read_text()
    # a run of another algorithm, or an unknown method, is refused with the reason
    for bad, reason in (({"awm": runs["flow_grpo"]}, "ran algo 'flow_grpo'"), ({"grpo": runs["flow_grpo"]}, "unknown")):
        manifest.write_text(json.dumps({"runs": bad}))
        try:
            convergence.main(["--task", "toy2d", "--import-runs", str(manifest), "--out", str(imported)])
        except SystemExit as err:
            assert reason in str(err), err
        else:
            raise AssertionError(f"{bad} was imported")


@pytest.mark.two_cores
def test_convergence_workers_and_resume(tmp_path, toy_cache):
    """Two worker processes give the same curves as one (sample budget: deterministic runs), and
    ``--resume`` reuses every finished run from the ledger instead of training again."""
    common = toy_args(toy_cache, "--budget-samples", "256", "--lr-factors", "1", "--algos", "flow_grpo,flow_grpo_fast")
    one, two = tmp_path / "one", tmp_path / "two"
    assert convergence.main([*common, "--out", str(one)]) == 0
    assert convergence.main([*common, "--out", str(two), "--workers", "2"]) == 0
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (one, two))
    for method in ("flow_grpo", "flow_grpo_fast"):
        assert a["curves"][method][0]["values"] == b["curves"][method][0]["values"]
        assert a["curves"][method][0]["rows"] == b["curves"][method][0]["rows"]
    # the Fast preset trains on its SDE window only: fewer backward rows than Flow-GRPO
    assert a["curves"]["flow_grpo_fast"][0]["rows"][-1] < a["curves"]["flow_grpo"][0]["rows"][-1]
    ledger = one.with_suffix(".runs.jsonl").read_text().splitlines()
    assert len(ledger) == 1 + 2  # the settings, then one line per finished run
    # a resumed benchmark trains nothing (the ledger gains no line) and renders the same result
    rc = convergence.main([*common, "--out", str(one), "--resume"])
    assert rc == 0 and one.with_suffix(".runs.jsonl").read_text().splitlines() == ledger
    assert json.loads(one.with_suffix(".json").read_text())["curves"] == a["curves"]
    # other settings: refused, not mixed
    try:
        convergence.main([*common, "--set", "eval.samples_per_prompt=64", "--out", str(one), "--resume"])
    except SystemExit as err:
        assert "other settings" in str(err)
    else:
        raise AssertionError("a ledger made with other settings was reused")


def test_cpu_bounds_sets_the_main_jobs_counted_flops_against_the_machines_peak(tmp_path):
    """`benchmarks/cpu_bounds.py`: the network's FLOPs per row are the FLOP counter's (forward +
    backward about 3x forward), a real one-epoch run of the main job (made small) reports the
    trainer's own `perf/flops`, and the report's lower bound is FLOPs / sgemm peak."""
    from benchmarks import cpu_bounds

    peak = cpu_bounds.sgemm_peak()
    net = cpu_bounds.network_rates(fwd_batch=2, train_batch=2)
    fwd, both = net["forward"]["flops_per_row"], net["forward+backward"]["flops_per_row"]
    assert 1e8 < fwd < 2e8 and 2.5 * fwd < both < 3.5 * fwd  # the shipped DiT: 140 MFLOP forward
    epoch = cpu_bounds.main_job_epoch(("train.prompts_per_epoch=2", "train.group_size=4", "sampler.steps=2"))
    assert epoch["flops"] > 0 and epoch["epoch_s"] >= epoch["rollout_s"] > 0
    res = {"date": "today", "threads": 1, "machine": {"cpu": "cpu", "torch": "t", "mkl_cbwr": None, "mkl_branch": None},
           "sgemm_flop_per_s": peak, "network": net, "main_job_epoch": epoch, "main_job_epochs": 36}
    text = cpu_bounds.write_report(res, tmp_path / "bounds")
    bound = 36 * epoch["flops"] / peak / 60
    assert f"at the sgemm peak (lower bound)** | **{bound:.1f} min**" in text
    assert json.loads((tmp_path / "bounds.json").read_text())["main_job_epoch"] == epoch


def test_throughput_toy_counts_network_rows(tmp_path, toy_cache):
    stem = tmp_path / "thr"
    rc = throughput.main([
        "--models", "toy_mlp", "--algos", "advantageflow,flow_grpo,diffusion_nft", "--memory", "none",
        "--repeats", "1", "--steps", "6", "--out", str(stem),
        "--toy-model", f"cache_dir={toy_cache}", "--toy-model", "pretrain_steps=1500",
    ])
    assert rc == 0
    text = stem.with_suffix(".md").read_text()
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| toy_mlp |") and "x |" in line}
    assert set(rows) == {"advantageflow", "flow_grpo", "diffusion_nft"}
    for cells in rows.values():
        assert float(cells[4]) == 6.0  # one network row per sampling step and image (Euler, SDE, DPM++2M)
    # AdvantageFlow: one draw with gradient; its first step uses theta as the old policy and
    # one no-grad pass of the reference (lambda_ref > 0).
    assert float(rows["advantageflow"][7]) == 1.0 and float(rows["advantageflow"][8]) == 1.0
    # Flow-GRPO trains on int(0.99 * 6) = 5 of its 6 SDE steps, each with a reference pass (beta > 0).
    assert float(rows["flow_grpo"][7]) == 5.0 and float(rows["flow_grpo"][8]) == 5.0


def test_run_diagnostics_reports_each_runs_fall_and_window_means(tmp_path):
    from benchmarks import run_diagnostics

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": e, "stats/x0_mse": float(e)} for e in range(1, 7)]
    rows[1]["eval/strict"], rows[3]["eval/strict"], rows[5]["eval/strict"] = 0.2, 0.5, 0.3
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stem = tmp_path / "diag"
    assert run_diagnostics.main([f"A={run}", "--out", str(stem), "--stats", "stats/x0_mse", "--smooth", "3"]) == 0
    text = stem.with_suffix(".md").read_text()
    assert "- **A**: 2: 0.200, 4: 0.500, 6: 0.300 (best 0.500, last 0.300, fall 0.200)" in text
    assert "- A: 1: 2, 4: 5" in text  # means of epochs 1-3 and 4-6
    assert stem.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="LABEL=RUN_DIR"):
        run_diagnostics.main([str(run), "--out", str(stem)])


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi here: the script would start")
def test_convergence_gpu_script_refuses_a_machine_without_a_gpu(tmp_path):
    """`benchmarks/convergence_gpu.sh` stops before starting anything where no NVIDIA GPU answers."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", str(root / "benchmarks" / "convergence_gpu.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)}, timeout=60)
    assert done.returncode == 1 and "no NVIDIA GPU" in done.stdout
    assert not list(tmp_path.iterdir())  # no result files written


def test_pretrain_scaling_pool_recipe_and_report(tmp_path):
    """`benchmarks/pretrain_scaling.py`: the pool is the pretraining corpus (uint8 renders,
    prompts that tokenize back), deterministic per seed; a recipe trains from it and its final
    evaluation is the main job's (96 slots x 9) plus CFG 3; the report tabulates it."""
    from advantageflow.models.dit import VOCAB
    from benchmarks import pretrain_scaling as ps

    pixels, tokens = ps.render_pool(6, seed=3, workers=1)
    again, _ = ps.render_pool(6, seed=3, workers=1)
    assert pixels.shape == (6, 3, 32, 32) and pixels.dtype == torch.uint8 and tokens.shape == (6, 12)
    assert torch.equal(pixels, again) and not torch.equal(pixels, ps.render_pool(6, seed=4, workers=1)[0])
    assert all(VOCAB[int(tokens[i, 0])] in ("a", "an", "one", "two", "three", "four") for i in range(6))
    tiny = "--width 32 --depth 1 --heads 2 --batch-size 4 --warmup 2 --conv-channels 4"
    assert ps.training_flops_per_image(ps.recipe_args(tiny)) > 0
    assert ps.training_flops_per_image(ps.recipe_args("--arch unet --conv-channels 24 --depth 3")) > \
        ps.training_flops_per_image(ps.recipe_args(""))
    pool = tmp_path / "pool.pt"
    torch.save((pixels, tokens), pool)
    jsonl = tmp_path / "evals.jsonl"
    ps.train_recipe("tiny", tiny, str(pool), "cpu", 1e9, 0, str(jsonl), str(tmp_path / "assets"), max_images=50)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows[-1]["final"] and rows[-1]["steps"] == 20 and rows[-1]["images"] == 80  # one block of 20 steps
    assert 0 <= rows[-1]["strict"] <= 1 and "strict_cfg3" in rows[-1] and "strict_se" in rows[-1]
    meta = json.loads((tmp_path / "assets" / "tiny" / "config.json").read_text())
    assert meta["pretrain"]["steps_done"] == 20 and meta["pretrain"]["final_loss"] == rows[-1]["loss"]
    out = tmp_path / "report"
    ps.write_report(rows, out, 6, {"tiny": 1e9}, {"tiny": tiny})
    assert "| tiny |" in out.with_suffix(".md").read_text()


def test_main_job_sweep_report_reads_real_runs(tmp_path):
    """`benchmarks/main_job_sweep_report.py` tabulates a real (tiny) ShapesEval run: the gain at
    each evaluation is that run's `eval/strict` minus its base; the GPU script refuses without
    a variants file or a GPU, writing nothing."""
    import subprocess

    from benchmarks import main_job_sweep_report as report

    run = tmp_path / "runs" / "tiny_s0"
    args = ["train", "seed=0", "train.epochs=2", "train.prompts_per_epoch=2", "train.group_size=4",
            "eval.every=1", "eval.num_prompts=6", "eval.samples_per_prompt=1", "log.progress=false",
            "log.tensorboard=false", "--run-dir", str(run)]
    subprocess.run([sys.executable, "-m", "advantageflow", *args], check=True, capture_output=True, cwd=REPO)
    runs = report.read_runs(tmp_path / "runs")
    evals = runs["tiny_s0"]
    assert [e["epoch"] for e in evals] == [0, 1, 2] and "eval/strict/counting" in evals[0]
    row = report.table(runs).splitlines()[2]
    gain = evals[2]["eval/strict"] - evals[0]["eval/strict"]
    assert row.startswith("| tiny | 0 | 1: ") and f"2: {gain:+.3f}" in row and row.endswith(f"| {gain:+.3f} |")
    (tmp_path / "out").mkdir()
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    script = str(REPO / "benchmarks" / "main_job_sweep_gpu.sh")
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "VARIANTS=FILE" in done.stdout
    (tmp_path / "v.txt").write_text("a train.lr=1e-4\n")
    env["VARIANTS"] = str(tmp_path / "v.txt")
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "no NVIDIA GPU" in done.stdout
    assert not list((tmp_path / "out").iterdir())


def test_count_errors_reads_the_surplus_of_drawn_objects():
    """`benchmarks/count_errors.py`: clean renders of the counting prompts count exactly; renders
    with one more object of the asked shape show a surplus of +1 on every image."""
    import random

    from advantageflow.tasks.shapes.grammar import ObjectSpec, SceneSpec, eval_slots
    from advantageflow.tasks.shapes.scene import render_specs
    from benchmarks import count_errors

    specs = [s for s in eval_slots() if s.tag == "counting"]
    clean, _ = render_specs(specs, random.Random(0))
    exact = count_errors.count_errors_of_images(clean, specs)["counting"]
    assert exact.row()[:3] == ["0.000", "1.000", "0.000"] and exact.row()[4] == "1.000"
    more = [SceneSpec(s.tag, (ObjectSpec(s.objects[0].shape, s.objects[0].color, s.objects[0].count + 1),))
            for s in specs if s.objects[0].count < 4]
    extra, _ = render_specs(more, random.Random(1))
    asked = [s for s in specs if s.objects[0].count < 4]
    surplus = count_errors.count_errors_of_images(extra, asked)["counting"]
    assert surplus.surplus == [1] * len(asked) and surplus.row()[4] == "0.000"
    table = count_errors.report({"m": {"counting": surplus}}, 1)
    assert "| m | counting | 0.000 | 0.000 | 1.000 | +1.00 | 0.000 |" in table


def test_convergence_reports_the_guard_metric_beside_the_final_value(tmp_path):
    """ShapesEval's table shows each method's final ``eval/overdrawn`` and its change, read from
    the runs' evaluation rows; results saved without it keep the table as it was."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": 0, "eval/strict": 0.4, "eval/overdrawn": 0.1},
            {"epoch": 1, "perf/epoch_s": 2.0, "samples": 128},
            {"epoch": 1, "eval/strict": 0.7, "eval/overdrawn": 0.6, "samples": 128}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = convergence.TASKS["shapes"]
    curve = read_curve(run, spec.metric, spec.guard)
    assert curve.values == [0.4, 0.7] and curve.guard == [0.1, 0.6]
    assert read_curve(run, spec.metric).guard == [] and read_curve(run, spec.metric, "eval/missing").guard == []
    results = {"flow_grpo": [curve], "advantageflow": [curve]}
    lrs = {"flow_grpo": 1e-4, "advantageflow": 1e-4}
    table, _ = convergence.summarize("shapes", spec, results, lrs, 0.6, 0.4, 0.0, [0])
    header, _, first = table.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in first.split("|")]))
    assert cells["final eval/overdrawn"].startswith("0.600") and cells["eval/overdrawn change"].startswith("0.500")
    results["advantageflow"] = [convergence.Curve(**{**curve.__dict__, "guard": []})]
    assert "overdrawn" not in convergence.summarize("shapes", spec, results, lrs, 0.6, 0.4, 0.0, [0])[0]


def test_group_signal_reports_each_tag_and_a_group_of_one_holds_no_signal(tmp_path):
    """`benchmarks/group_signal.py` on the shipped DiT with tiny sizes: one row per tag, values in
    their ranges; a group of one image is never mixed and has no within-group variance."""
    from benchmarks import group_signal

    assert group_signal.main(["dit=asset:", "--group", "2", "--prompts", "2", "--steps", "2",
                              "--out", str(tmp_path / "g")]) == 0
    rows = [line for line in (tmp_path / "g.md").read_text().splitlines() if line.startswith("| dit |")]
    assert [row.split(" | ")[1] for row in rows] == list(group_signal.TAGS)
    for row in rows:
        strict, var, mixed, exact, evar, pvar = (float(x) for x in row.strip("| ").split(" | ")[2:])
        assert 0 <= exact <= strict <= 1 and mixed in (0.0, 0.5, 1.0) and pvar >= 0
        assert 0 <= var <= 0.25 and 0 <= evar <= 0.25
    from advantageflow.tasks.shapes.grammar import splits
    from benchmarks.count_errors import load_policy

    specs = [s for s in splits()[0] if s.tag == "counting"][:2]
    one = group_signal.group_stats(load_policy("asset:"), specs, group=1, steps=2, seed=0)
    assert one["strict_var"] == one["exact_var"] == one["mixed"] == one["partial_var"] == 0


def test_update_fit_measures_a_step_and_leaves_the_policy_as_it_found_it():
    """`benchmarks/update_fit.py` with tiny sizes on the shipped DiT: a zero learning rate moves
    no fit; a real step moves them; the policy's weights and trainable set are restored after."""
    from advantageflow.tasks.shapes.grammar import splits
    from benchmarks import update_fit
    from benchmarks.count_errors import load_policy

    policy = load_policy("asset:")
    before = {n: p.detach().clone() for n, p in policy.net.named_parameters()}
    specs = [s for s in splits()[0] if s.tag == "color_attr"][:2]
    still = update_fit.measure(policy, specs, group=4, steps=1, seed=0, lr=0.0)
    assert all(still[0][k] == 0 for k in ("A_pos", "A_neg", "B_pos", "B_neg"))
    assert still[0]["reward_B_after"] == still[0]["reward_B_before"]
    moved = update_fit.measure(policy, specs, group=4, steps=2, seed=0, only="blocks")
    assert len(moved) == 2 and any(abs(moved[-1][k]) > 1e-4 for k in ("A_pos", "A_neg"))
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in policy.net.named_parameters())
