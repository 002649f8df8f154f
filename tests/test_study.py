"""The study runner (python -m simclr_keras.study): statistics, verdicts, the plan, stopping, end to end."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from simclr_keras import statistics, study, study_report
from simclr_keras.study_spec import load_study

# Student t quantiles t_{0.975, df} as printed in the usual tables (e.g. NIST/SEMATECH, 1.3.6.7.2).
T_TABLE_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}


def _t_density(t, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + t * t / df) ** (-(df + 1) / 2)


def _simpson(function, low, high, intervals=20000):
    step = (high - low) / intervals
    total = function(low) + function(high)
    total += sum((4 if index % 2 else 2) * function(low + index * step) for index in range(1, intervals))
    return total * step / 3


@pytest.mark.parametrize("df", sorted(T_TABLE_975))
def test_the_t_quantile_matches_the_printed_table(df):
    assert statistics.student_t_quantile(0.975, df) == pytest.approx(T_TABLE_975[df], rel=1e-8)


@pytest.mark.parametrize("df", [2.37, 3.9, 7.5])
def test_the_t_quantile_at_welch_degrees_of_freedom_integrates_the_density(df):
    # Non-integer degrees (what Welch gives): the density integrated from 0 to the quantile is 0.475.
    quantile = statistics.student_t_quantile(0.975, df)
    assert _simpson(lambda t: _t_density(t, df), 0.0, quantile) == pytest.approx(0.475, abs=1e-9)
    assert statistics.student_t_quantile(0.025, df) == pytest.approx(-quantile)


def test_mean_and_sample_std_of_a_hand_computation():
    mean, std = statistics.mean_and_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3))
    assert math.isnan(statistics.mean_and_std([0.7])[1])


def test_welch_interval_of_a_hand_computation():
    # Equal sizes and variances: df = 2 (n - 1) = 4 exactly; s^2 = 1 each, se = sqrt(1/3 + 1/3).
    interval = statistics.welch_interval([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    half_width = T_TABLE_975[4] * math.sqrt(2 / 3)
    assert interval.degrees_of_freedom == pytest.approx(4.0)
    assert (interval.difference, interval.low, interval.high) == pytest.approx((-2.0, -2.0 - half_width, -2.0 + half_width))
    # Unequal: s_a^2 = 1 (n 3), s_b^2 = 20/3 (n 4); se^2 = 1/3 + 5/3 = 2; df = 4 / ((1/3)^2 / 2 + (5/3)^2 / 3).
    interval = statistics.welch_interval([1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0])
    degrees = 4 / ((1 / 3) ** 2 / 2 + (5 / 3) ** 2 / 3)
    assert interval.degrees_of_freedom == pytest.approx(degrees)
    half_width = statistics.student_t_quantile(0.975, degrees) * math.sqrt(2.0)
    assert interval.low == pytest.approx(-5.0 - half_width) and interval.high == pytest.approx(-5.0 + half_width)
    with pytest.raises(ValueError, match="at least two values on each side, received 1 and 3"):
        statistics.welch_interval([1.0], [1.0, 2.0, 3.0])


def test_paired_interval_of_a_hand_computation():
    # d = [1, 2, 3]: mean 2, s_d = 1, se = 1 / sqrt(3), df = 2.
    interval = statistics.paired_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half_width = T_TABLE_975[2] / math.sqrt(3)
    assert (interval.difference, interval.low, interval.high) == pytest.approx((2.0, 2.0 - half_width, 2.0 + half_width))
    assert interval.degrees_of_freedom == 2
    # Student's t with 2 degrees has the closed-form CDF 1/2 + t / (2 sqrt(2 + t^2)): p = 1 - t / sqrt(2 + t^2).
    t = 2.0 * math.sqrt(3)
    assert interval.p_value == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), rel=1e-9)
    # The seed-to-seed spread (10 points) cancels: Welch's interval of the same values is far wider.
    shared_luck = [0.0, 10.0, -10.0]
    paired = statistics.paired_interval([a + 1.0 for a in shared_luck], shared_luck)
    assert (paired.low, paired.high) == (1.0, 1.0)  # every pair differs by exactly 1
    assert statistics.welch_interval([a + 1.0 for a in shared_luck], shared_luck).low < -10
    with pytest.raises(ValueError, match="one baseline value per value, received 3 and 2"):
        statistics.paired_interval([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least two pairs, received 1"):
        statistics.paired_interval([1.0], [2.0])


def test_welch_p_value_is_the_confidence_at_which_the_interval_touches_zero():
    # Equal sizes and variances (df = 4): the interval's low end is 0 exactly when p = 0.05.
    difference = T_TABLE_975[4] * math.sqrt(2 / 3)  # the half-width of [1, 2, 3] against [3, 4, 5]
    interval = statistics.welch_interval([1.0 + difference, 2.0 + difference, 3.0 + difference], [1.0, 2.0, 3.0])
    assert interval.low == pytest.approx(0.0, abs=1e-9) and interval.p_value == pytest.approx(0.05, rel=1e-7)


def test_holm_adjusted_p_values_of_a_hand_computation():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running 0.06.
    adjusted = statistics.holm_adjusted_p_values([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert statistics.holm_adjusted_p_values([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert statistics.holm_adjusted_p_values([]) == []


def _write_study(directory, body, base_flags=("--train_steps=10", "--batch_size=50")):
    base = directory / "base.flags"
    base.write_text("\n".join(base_flags) + "\n")
    path = directory / "studies" / "tiny.toml"
    path.parent.mkdir(exist_ok=True)
    header = f'[study]\nbase_flagfile = "{base}"\nruns_dir = "{directory / "runs"}"\n'
    path.write_text(header + textwrap.dedent(body))
    return load_study(str(path))


TWO_TEMPERATURES = """
    seeds = [0, 1, 2]
    baseline = "t05"
    images_per_second = 100
    [[variations]]
    name = "t05"
    flags = ["--temperature=0.5"]
    [[variations]]
    name = "t01"
    flags = ["--temperature=0.1"]
    [[evaluations]]
    name = "knn"
    protocol = "knn"
    seconds = 60
    [[verdicts]]
    finding = "0.5 beats 0.1"
    metric = "knn_top1"
    order = ["t05", "t01"]
"""


def _records(values):
    """Results-file records of {variation: [knn top-1 per seed]} as the runner writes them."""
    flags = {"t05": ["--temperature=0.5"], "t01": ["--temperature=0.1"]}
    return [
        {"variation": name, "seed": seed, "flags": flags[name], "metrics": {"knn_top1": value}, "train_seconds": 60.0}
        for name, seeds in values.items()
        for seed, value in enumerate(seeds)
    ]


@pytest.mark.parametrize(
    "values, outcome",
    [
        ({"t05": [0.50, 0.52, 0.51], "t01": [0.40, 0.41, 0.42]}, "reproduced"),
        ({"t05": [0.40, 0.41, 0.42], "t01": [0.50, 0.52, 0.51]}, "not reproduced"),
        ({"t05": [0.50, 0.40, 0.45], "t01": [0.44, 0.47, 0.41]}, "within noise"),
        ({"t05": [0.50, 0.52, 0.51], "t01": [0.40]}, "not measured"),
    ],
)
def test_the_verdict_follows_the_interval_of_the_data(tmp_path, values, outcome):
    spec = _write_study(tmp_path, TWO_TEMPERATURES)
    verdict_outcome, _ = study_report.judge(spec.verdicts[0], study_report.values_by_seed(spec, _records(values)))
    assert verdict_outcome == outcome
    assert f"**{outcome}**" in study_report.report_markdown(spec, _records(values))


def _h_and_z_study(tmp_path, h_values, z_of_t05):
    """The two-temperature study with a z metric and the verdict "h > z" on t05; and its records."""
    body = TWO_TEMPERATURES + '[[evaluations]]\nname = "z"\nprotocol = "knn"\n'
    body += '[[verdicts]]\nfinding = "h > z"\nvariation = "t05"\norder = ["knn_top1", "z_top1"]\n'
    records = _records({"t05": h_values, "t01": [0.40, 0.41, 0.42]})
    for record, z in zip(records, [*z_of_t05, 0.9, 0.9, 0.9]):
        record["metrics"]["z_top1"] = z
    return _write_study(tmp_path, body), records


def test_a_verdict_across_metrics_of_one_variation(tmp_path):
    spec, records = _h_and_z_study(tmp_path, [0.50, 0.52, 0.51], [0.30, 0.31, 0.32])
    outcome, comparisons = study_report.judge(spec.verdicts[1], study_report.values_by_seed(spec, records))
    assert outcome == "reproduced" and comparisons[0].interval.difference == pytest.approx(0.20)


def test_the_report_table_and_stale_records(tmp_path):
    spec = _write_study(tmp_path, TWO_TEMPERATURES)
    records = _records({"t05": [0.50, 0.52, 0.51], "t01": [0.40, 0.41, 0.42]})
    # A record of a variation whose flags have since changed in the study file does not count.
    records.append({**records[-1], "seed": 2, "flags": ["--temperature=0.2"], "metrics": {"knn_top1": 0.99}})
    text = study_report.report_markdown(spec, records)
    assert "| t05 (baseline) | `--temperature=0.5` | 3 | 51.00 ± 1.00 |" in text
    assert "| t01 | `--temperature=0.1` | 3 | 41.00 ± 1.00 |" in text
    half_width = 100 * T_TABLE_975[4] * math.sqrt(2 * 0.01**2 / 3)
    assert f"| t01 | -10.00 [{-10 - half_width:+.2f}, {-10 + half_width:+.2f}] |" in text
    # The shared flags as the runs receive them: the base flagfile as a --flagfile flag.
    assert f"- Base flags: `--flagfile={tmp_path / 'base.flags'}`\n" in text


def test_h_vs_z_of_the_same_runs_is_judged_with_the_paired_interval(tmp_path):
    # The seeds differ by 10 points, h and z of a seed by 3, 2 and 2: Welch's interval would span zero.
    spec, records = _h_and_z_study(tmp_path, [0.50, 0.60, 0.40], [0.47, 0.58, 0.38])
    outcome, (comparison,) = study_report.judge(spec.verdicts[1], study_report.values_by_seed(spec, records))
    # d = [0.03, 0.02, 0.02]: mean 0.07 / 3, s_d = sqrt(((0.02/3)^2 + 2 (0.01/3)^2) / 2), df = 2.
    mean, std = 0.07 / 3, math.sqrt(((0.02 / 3) ** 2 + 2 * (0.01 / 3) ** 2) / 2)
    half_width = T_TABLE_975[2] * std / math.sqrt(3)
    assert comparison.paired and outcome == "reproduced"
    assert (comparison.interval.low, comparison.interval.high) == pytest.approx((mean - half_width, mean + half_width))
    assert statistics.welch_interval([0.50, 0.60, 0.40], [0.47, 0.58, 0.38]).low < 0
    # Seeds are paired by number: a seed with only one of the two metrics is left out.
    del records[1]["metrics"]["z_top1"]
    _, (comparison,) = study_report.judge(spec.verdicts[1], study_report.values_by_seed(spec, records))
    assert comparison.interval.difference == pytest.approx(0.025) and comparison.interval.degrees_of_freedom == 1
    text = study_report.report_markdown(spec, records)
    assert "knn_top1 − z_top1 = +2.50 [" in text and "] paired over seeds (" in text


def test_each_report_states_the_multiple_comparisons_and_holm_verdicts(tmp_path):
    body = TWO_TEMPERATURES + textwrap.dedent(
        """
        [[variations]]
        name = "t02"
        flags = ["--temperature=0.2"]
        [[verdicts]]
        finding = "0.5 beats 0.2"
        metric = "knn_top1"
        order = ["t05", "t02"]
        """
    )
    spec = _write_study(tmp_path, body)
    values = {"t05": [0.50, 0.52, 0.51], "t01": [0.46, 0.49, 0.47], "t02": [0.47, 0.49, 0.46]}
    records = _records({name: values[name] for name in ("t05", "t01")})
    records += [{**records[0], "variation": "t02", "seed": seed, "flags": ["--temperature=0.2"],
                 "metrics": {"knn_top1": value}} for seed, value in enumerate(values["t02"])]  # fmt: skip
    text = study_report.report_markdown(spec, records)
    # Each pair alone: p between 0.025 and 0.05, so its 95% interval excludes zero. Holm over the two
    # (hand computation): the smaller p doubled is above 0.05, so neither is rejected.
    p_values = [statistics.welch_interval(values["t05"], values[other]).p_value for other in ("t01", "t02")]
    assert all(0.025 < p < 0.05 for p in p_values)
    for finding in ("0.5 beats 0.1", "0.5 beats 0.2"):
        assert f"- **{finding}** on `knn_top1`: **reproduced** (Holm: within noise)." in text
    assert text.count("(as the paper; Holm: within noise)") == 2
    # With one of the two far apart, its p is tiny: Holm doubles it (still < 0.05) and keeps the other's as is.
    records[3:6] = [{**record, "metrics": {"knn_top1": value}} for record, value in zip(records[3:6], [0.40, 0.41, 0.42])]
    text = study_report.report_markdown(spec, records)
    assert "- **0.5 beats 0.1** on `knn_top1`: **reproduced** (Holm: reproduced)." in text
    assert "- **0.5 beats 0.2** on `knn_top1`: **reproduced** (Holm: reproduced)." in text
    # 2 differences to the baseline (t01, t02) and 2 judged pairs.
    assert "this report shows 4 intervals at 95% each (2 for the differences to the baseline, 2 for the judged pairs)" in text


def test_a_flag_added_to_the_study_file_after_the_runs_counts_when_the_runs_had_that_setting(tmp_path):
    spec = _write_study(tmp_path, TWO_TEMPERATURES.replace('seeds = [0, 1, 2]', 'seeds = [0, 1, 2]\nflags = ["--train_epochs=3"]'))
    records = _records({"t05": [0.50, 0.52, 0.51], "t01": [0.40, 0.41, 0.42]})
    for record in records:  # run before the study file said --train_epochs=3; their flags.txt had it
        record["settings"] = {"temperature": record["flags"][0].split("=")[1], "train_epochs": "3"}
    records[0]["settings"]["train_epochs"] = "2"  # t05 seed 0 trained 2 epochs: not what the study says
    records[0]["train_seconds"] = 6000.0
    records[1]["flags"] = [*records[1]["flags"], "--batch_size=64"]  # and t05 seed 1 with a flag since removed
    text = study_report.report_markdown(spec, records)
    # t05 keeps seed 2 only, and its train minutes are that run's, not the dropped runs' (issue 27).
    assert "| t05 (baseline) | `--temperature=0.5` | 1 | 51.00 (1 seed) | 1.0 |" in text
    assert "| t01 | `--temperature=0.1` | 3 | 41.00 ± 1.00 | 1.0 |" in text
    assert "(4 of 6 runs)" in text
    assert study.finished_keys(spec, records) == {("t05", 2), ("t01", 0), ("t01", 1), ("t01", 2)}


def test_dirty_records_carry_the_hash_of_the_uncommitted_diff(monkeypatch, tmp_path):
    patch = b"diff --git a/x b/x\n+changed\n"

    def fake_git(*arguments, strip=True):
        answers = {("status", "--porcelain", "--untracked-files=no"): b" M x\n", ("rev-parse", "HEAD"): b"abc123\n"}
        output = patch if arguments == ("diff", "HEAD", "--binary") else answers[arguments]
        return output.decode().strip() if strip else output

    monkeypatch.setattr(study, "_git", fake_git)
    record = study.provenance()
    assert record["dirty"] is True and record["commit"] == "abc123"
    assert record["diff_sha256"] == hashlib.sha256(patch).hexdigest()  # the exact bytes, final newline included
    spec = _write_study(tmp_path, TWO_TEMPERATURES)
    records = [{**r, **record} for r in _records({"t05": [0.50, 0.52, 0.51], "t01": [0.40, 0.41, 0.42]})]
    records[0] = {**records[0], "diff_sha256": None}
    text = study_report.report_markdown(spec, records)
    expected = f"(with uncommitted changes: `git diff HEAD` sha256 {record['diff_sha256'][:12]}; 1 of them recorded"
    assert expected in text


def test_every_committed_report_rebuilds_from_its_results_file(monkeypatch):
    import glob

    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(repository)  # the report names the study file relative to where the command runs
    rebuilt = 0
    for path in sorted(glob.glob("studies/*.toml")):
        spec = load_study(path)
        if os.path.isfile(spec.report_path):
            with open(spec.report_path, encoding="utf-8") as file:
                committed = file.read()
            assert study_report.report_markdown(spec, study.read_results(spec.results_path)) == committed, path
            rebuilt += 1
    assert rebuilt >= 6


def test_a_study_file_naming_a_flag_the_command_does_not_define_is_refused(tmp_path):
    spec = _write_study(tmp_path, TWO_TEMPERATURES.replace("--temperature=0.1", "--head_kind=linear"))
    with pytest.raises(ValueError, match="variation 't01' sets --head_kind, which `python -m simclr_keras.train` does not"):
        study.check_study_flags(spec, study.cli_flag_defaults(study.TRAIN_MODULE), {})


def test_dry_run_estimates_configured_and_measured_costs(tmp_path, capsys):
    spec = _write_study(tmp_path, TWO_TEMPERATURES)
    runs = study.plan_runs(spec, spec.runs_dir)
    # t01 seed 1 has run 5 steps at 2 s a step after two of 30 s (with compilation: not counted).
    log_dir = tmp_path / "runs" / "t01" / "seed_1"
    log_dir.mkdir(parents=True)
    times = [0.0, 30.0, 60.0, 62.0, 64.0]
    log_dir.joinpath("train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "time": t}) + "\n" for i, t in enumerate(times)))
    keys = study.finished_keys(spec, _records({"t05": [0.5]}))  # t05 seed 0 is in the results
    defaults = {"train_steps": 0, "train_epochs": 100, "batch_size": 512, "dataset": "cifar10", "max_train_examples": 0}
    total = study.print_plan(spec, runs, keys, defaults)
    lines = capsys.readouterr().out.splitlines()
    row = {tuple(line.split()[:2]): line for line in lines[2:-1]}
    assert "done (in results)" in row[("t05", "0")]
    # Configured: 10 steps x 50 images / 100 images/s = 5 s, + 30 s start-up, + knn 60 s + 30 s = 125 s.
    assert "0/10" in row[("t05", "1")] and "2.1 min" in row[("t05", "1")] and "configured 100 images/s" in row[("t05", "1")]
    # Measured from t01 seed 1's log: 2 s/step; seed 1 resumes at step 5: 5 x 2 + 30 + 90 = 130 s.
    assert "resume at step 5" in row[("t01", "1")] and "5/10" in row[("t01", "1")] and "2.2 min" in row[("t01", "1")]
    # 10 x 2 + 30 + 90 = 140 s for the other seeds of t01.
    assert "measured 2.000 s/step (t01 seed 1)" in row[("t01", "0")] and "2.3 min" in row[("t01", "0")]
    assert total == pytest.approx(125 + 125 + 140 + 130 + 140)


CHILD = """
import signal, sys, time
received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
print("started", flush=True)
while not received:
    time.sleep(0.05)
time.sleep(0.5)  # a second SIGTERM in this time would be recorded too
print("terms", len(received), flush=True)
sys.exit(143)
"""


def test_max_hours_sends_one_sigterm_to_the_running_command_and_starts_nothing_after(tmp_path):
    stopper = study.Stopper(max_hours=1.5 / 3600)
    log_path = tmp_path / "child.log"
    started = time.time()
    status, seconds, stopped = study.run_command([sys.executable, "-c", CHILD], str(log_path), stopper)
    assert (status, stopped) == (143, True)
    assert 1.4 < time.time() - started < 10
    assert "terms 1" in log_path.read_text()
    # Past the deadline, the runner starts no further run.
    spec = _write_study(tmp_path, TWO_TEMPERATURES)
    assert study.run_study(spec, study.plan_runs(spec, spec.runs_dir), stopper) == (0, [], "--max_hours")
    assert not os.path.exists(spec.runs_dir)


def _run_study(path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "simclr_keras.study", str(path), *flags], capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_a_tiny_study_end_to_end_then_rerun_skips_what_is_finished(cifar10_500, tmp_path):
    base = [f"--dataset=folder:{cifar10_500}", "--width_multiplier=0.125", "--batch_size=100", "--train_steps=2",
            "--warmup_epochs=0", "--eval_batch_size=100", "--checkpoint_every_n_steps=1"]  # fmt: skip
    spec = _write_study(
        tmp_path,
        TWO_TEMPERATURES.replace("[0, 1, 2]", "[0, 1]")
        + '[[evaluations]]\nname = "probe"\nprotocol = "probe"\n',
        base,
    )
    result = _run_study(spec.path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = study.read_results(spec.results_path)
    assert sorted((record["variation"], record["seed"]) for record in records) == [
        ("t01", 0), ("t01", 1), ("t05", 0), ("t05", 1)
    ]  # fmt: skip
    for record in records:
        assert record["settings"]["train_steps"] == "2" and record["settings"]["seed"] == str(record["seed"])
        assert record["steps"] == 2 and record["train_seconds"] > 0 and record["version"] == "0.1.0"
        # The kNN is the evaluation command's own result for that run; the probe the training's.
        with open(os.path.join(record["model_dir"], "study_eval_knn.json"), encoding="utf-8") as file:
            assert record["metrics"]["knn_top1"] == json.load(file)["top1"]
        with open(os.path.join(record["model_dir"], "eval_results.json"), encoding="utf-8") as file:
            assert record["metrics"]["probe_top1"] == json.load(file)["probe_accuracy"]
    report = open(spec.report_path, encoding="utf-8").read()
    assert "| t05 (baseline) | `--temperature=0.5` | 2 |" in report and os.path.getsize(spec.figure_path) > 1000

    # A second invocation trains and evaluates nothing; one run whose result line is lost is evaluated
    # again from its run directory, without training.
    with open(spec.results_path, "w", encoding="utf-8") as file:
        file.write("".join(json.dumps(record) + "\n" for record in records[1:]))
    state_path = os.path.join(records[0]["model_dir"], study.RUN_STATE)
    state = json.load(open(state_path, encoding="utf-8"))
    del state["evaluations"]["knn"]
    json.dump(state, open(state_path, "w", encoding="utf-8"))
    result = _run_study(spec.path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training in" not in result.stdout
    assert result.stdout.count("(knn)") == 1 and "1 run(s) completed now, 0 of 4 left" in result.stdout
    assert len(study.read_results(spec.results_path)) == 4


def test_every_study_file_loads_and_names_only_flags_the_commands_define():
    import glob

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "studies", "*.toml")))
    assert len(paths) >= 10
    train_defaults = study.cli_flag_defaults(study.TRAIN_MODULE)
    evaluate_defaults = study.cli_flag_defaults(study.EVALUATE_MODULE)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    previous = os.getcwd()
    os.chdir(repository)  # the flagfiles are named relative to the repository root, where the command runs
    try:
        for path in paths:
            spec = load_study(path)
            study.check_study_flags(spec, train_defaults, evaluate_defaults)
            if spec.name == "readme_comparison":  # the README's one-seed table, not a study of a finding
                assert spec.budget and spec.seeds == (0,), path
                continue
            assert spec.budget and len(spec.seeds) == 3 and spec.verdicts, path
    finally:
        os.chdir(previous)
