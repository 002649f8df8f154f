"""The report of a study: mean +- std over seeds, differences to the baseline with 95% t intervals
(Welch's between variations, paired between two measurements of the same runs), the verdict on each
of the paper's findings beside its Holm-adjusted one, and a figure. Everything comes from the results file."""

import dataclasses
import os

from simclr_keras import statistics

CONFIDENCE = 0.95
REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, NOT_MEASURED = "reproduced", "not reproduced", "within noise", "not measured"
AS_THE_PAPER, OPPOSITE = "as the paper", "opposite"


def flag_setting(argument):
    """(name, value string) of one command-line flag: "--x=v" is ("x", "v"); a boolean "--x" is
    ("x", "true") and "--nox" ("x", "false"), as absl writes them to a run's flags.txt."""
    name, equals, value = argument.lstrip("-").partition("=")
    if equals:
        return name, value
    return (name[2:], "false") if name.startswith("no") else (name, "true")


def _same_value(recorded, given):
    if recorded is None:
        return False
    try:
        return float(recorded) == float(given)
    except ValueError:
        return recorded == given


def record_counts(study, variation, record):
    """Whether a results record measures `variation` as the study file now describes it.

    It does when it ran with the flags the study now gives the variation; or, for a study file edited
    after its runs, when every flag it ran with is still given and each flag given since states a
    setting the run already had (its recorded flags.txt settings; e.g. `--train_epochs=3` added where
    the base flagfile then said 3). A flag changed or removed, or a --flagfile added, does not count.
    """
    if record["variation"] != variation.name or record["seed"] not in study.seeds:
        return False
    current = list(variation_flags(study, variation))
    if record["flags"] == current:
        return True
    settings = record.get("settings") or {}
    added = [flag_setting(flag) for flag in current if flag not in record["flags"]]
    return bool(settings) and all(flag in current for flag in record["flags"]) and all(
        name != "flagfile" and _same_value(settings.get(name), value) for name, value in added
    )


def counted_records(study, records):
    """{(variation, seed): record}: each seed's latest record that counts (`record_counts`), in study order."""
    latest = {}
    for variation in study.variations:
        for record in records:  # file order: a later record of the same seed replaces an earlier one
            if record_counts(study, variation, record):
                latest[(variation.name, record["seed"])] = record
    keys = [(variation.name, seed) for variation in study.variations for seed in study.seeds]
    return {key: latest[key] for key in keys if key in latest}


def values_by_seed(study, records):
    """{variation: {metric: {seed: value}}} of the counted records (missing metrics left out)."""
    values = {variation.name: {} for variation in study.variations}
    for (name, seed), record in counted_records(study, records).items():
        for metric, value in record.get("metrics", {}).items():
            if value is not None:
                values[name].setdefault(metric, {})[seed] = value
    return values


def metric_values(study, records):
    """{variation: {metric: [value per seed]}} of the counted records, in the order of the study's seeds."""
    return {
        name: {metric: list(by_seed.values()) for metric, by_seed in by_metric.items()}
        for name, by_metric in values_by_seed(study, records).items()
    }


def variation_flags(study, variation):
    """The flags a run of `variation` gets after the base flagfile (before --seed and --model_dir)."""
    return (*study.flags, *variation.flags)


@dataclasses.dataclass(frozen=True)
class Comparison:
    better: str
    worse: str
    interval: statistics.Interval | None  # mean(better) - mean(worse); None with fewer than 2 seeds a side
    outcome: str  # "as the paper", "opposite", "within noise" or "not measured"
    paired: bool = False  # two metrics of the same runs: the paired interval over the seeds both have


def _direction(interval):
    return AS_THE_PAPER if interval.low > 0 else OPPOSITE if interval.high < 0 else WITHIN_NOISE


def compare(verdict, values, better, worse):
    """The Comparison better - worse of a verdict, from {variation: {metric: {seed: value}}}.

    Variations on verdict.metric are different runs: Welch's interval. Metrics of one variation
    (verdict.variation) are two measurements of the same encoders: the paired interval over the
    seeds that have both, which the seed-to-seed spread does not widen.
    """
    if verdict.variation is not None:
        by_metric = values.get(verdict.variation, {})
        better_seeds, worse_seeds = by_metric.get(better, {}), by_metric.get(worse, {})
        seeds = [seed for seed in better_seeds if seed in worse_seeds]
        if len(seeds) < 2:
            return Comparison(better, worse, None, NOT_MEASURED, paired=True)
        interval = statistics.paired_interval(
            [better_seeds[seed] for seed in seeds], [worse_seeds[seed] for seed in seeds], CONFIDENCE
        )
        return Comparison(better, worse, interval, _direction(interval), paired=True)
    better_values = list(values.get(better, {}).get(verdict.metric, {}).values())
    worse_values = list(values.get(worse, {}).get(verdict.metric, {}).values())
    if len(better_values) < 2 or len(worse_values) < 2:
        return Comparison(better, worse, None, NOT_MEASURED)
    interval = statistics.welch_interval(better_values, worse_values, CONFIDENCE)
    return Comparison(better, worse, interval, _direction(interval))


def finding_outcome(outcomes):
    """A finding's verdict from its pairs' outcomes: reproduced when every pair goes the paper's way."""
    outcomes = set(outcomes)
    if NOT_MEASURED in outcomes:
        return NOT_MEASURED
    if OPPOSITE in outcomes:
        return NOT_REPRODUCED
    return REPRODUCED if outcomes == {AS_THE_PAPER} else WITHIN_NOISE


def judge(verdict, values):
    """(outcome, [Comparison]) of a verdict: each neighbouring pair of its order, better minus worse.

    `values` is `values_by_seed`'s. A pair goes the paper's way when its whole 95% interval is above
    0, the opposite way when it is below 0, and is within noise otherwise; the finding's outcome is
    `finding_outcome` of its pairs.
    """
    comparisons = [compare(verdict, values, better, worse) for better, worse in zip(verdict.order, verdict.order[1:])]
    return finding_outcome(comparison.outcome for comparison in comparisons), comparisons


def holm_outcomes(comparisons, alpha=1.0 - CONFIDENCE):
    """The outcome of each measured Comparison (in order) when the family of all of them is adjusted
    by Holm's step-down method: a pair keeps its direction only if its adjusted p-value is <= alpha."""
    measured = [comparison for comparison in comparisons if comparison.interval is not None]
    adjusted = iter(statistics.holm_adjusted_p_values([comparison.interval.p_value for comparison in measured]))
    outcomes = []
    for comparison in comparisons:
        if comparison.interval is None:
            outcomes.append(NOT_MEASURED)
        else:
            outcomes.append(comparison.outcome if next(adjusted) <= alpha else WITHIN_NOISE)
    return outcomes


def _percent(value):
    return f"{100 * value:.2f}"


def _mean_std(values):
    if not values:
        return "–"
    mean, std = statistics.mean_and_std(values)
    return f"{_percent(mean)} ± {_percent(std)}" if len(values) > 1 else f"{_percent(mean)} (1 seed)"


def _interval_text(interval):
    return f"{100 * interval.difference:+.2f} [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _base_flags(study):
    """The flags every run shares: the base flagfile (if the study has one), then the study's flags."""
    return ([f"--flagfile={study.base_flagfile}"] if study.base_flagfile else []) + list(study.flags)


def _results_table(study, values, counted):
    metrics = study.metric_names()
    header = ["variation", "flags", "seeds", *[f"{metric} (%)" for metric in metrics], "train min (mean)"]
    rows = []
    for variation in study.variations:
        by_metric = values[variation.name]
        seeds = max((len(by_metric.get(metric, [])) for metric in metrics), default=0)
        seconds = [record["train_seconds"] for (name, _), record in counted.items() if name == variation.name]
        minutes = f"{sum(seconds) / len(seconds) / 60:.1f}" if seconds else "–"
        name = variation.name + (" (baseline)" if variation.name == study.baseline else "")
        flags = " ".join(f"`{flag}`" for flag in variation.flags) or "(base)"
        rows.append([name, flags, str(seeds), *[_mean_std(by_metric.get(metric, [])) for metric in metrics], minutes])
    return _table(header, rows)


def _difference_cells(study, values):
    """{variation: [cell per metric]} of the differences to the baseline; and how many are intervals."""
    cells, intervals = {}, 0
    baseline = values[study.baseline]
    for variation in study.variations:
        if variation.name == study.baseline:
            continue
        row = cells.setdefault(variation.name, [])
        for evaluation, metric in zip(study.evaluations, study.metric_names()):
            mine, theirs = values[variation.name].get(metric, []), baseline.get(metric, [])
            if not (evaluation.applies_to(variation.name) and evaluation.applies_to(study.baseline)):
                row.append("not evaluated")
            elif len(mine) < 2 or len(theirs) < 2:
                row.append("needs 2+ seeds")
            else:
                row.append(_interval_text(statistics.welch_interval(mine, theirs, CONFIDENCE)))
                intervals += 1
    return cells, intervals


def _difference_table(study, cells):
    header = ["variation", *[f"{metric}: difference [95% interval] (points)" for metric in study.metric_names()]]
    return _table(header, [[name, *row] for name, row in cells.items()])


def _judged(study, values_of_seeds):
    """[(verdict, outcome, [Comparison], Holm outcome, [Holm outcome per pair])], Holm over all pairs."""
    judged = [(verdict, *judge(verdict, values_of_seeds)) for verdict in study.verdicts]
    holm = iter(holm_outcomes([comparison for _, _, comparisons in judged for comparison in comparisons]))
    result = []
    for verdict, outcome, comparisons in judged:
        pair_outcomes = [next(holm) for _ in comparisons]
        result.append((verdict, outcome, comparisons, finding_outcome(pair_outcomes), pair_outcomes))
    return result


def _verdict_lines(judged):
    lines = []
    for verdict, outcome, comparisons, holm_outcome, pair_outcomes in judged:
        details = "; ".join(
            f"{comparison.better} − {comparison.worse} = "
            + (_interval_text(comparison.interval) if comparison.interval else "–")
            + (" paired over seeds" if comparison.paired else "")
            + f" ({comparison.outcome}"
            + (f"; Holm: {pair_outcome})" if pair_outcome != comparison.outcome else ")")
            for comparison, pair_outcome in zip(comparisons, pair_outcomes)
        )
        where = f"`{verdict.metric}`" if verdict.variation is None else f"`{verdict.variation}`"
        lines.append(f"- **{verdict.finding}** on {where}: **{outcome}** (Holm: {holm_outcome}). {details}.")
    return lines or ["(the study file names no finding to judge)"]


def _multiple_comparisons(judged, difference_intervals):
    """The caveat: how many intervals the report shows, and what Holm's adjustment is over."""
    pairs = sum(comparison.interval is not None for _, _, comparisons, _, _ in judged for comparison in comparisons)
    if not difference_intervals + pairs:
        return (
            "Multiple comparisons: none are made here. With fewer than two seeds a side this report shows no interval, "
            "and a difference of single runs is no evidence either way."
        )
    text = (
        f"Multiple comparisons: this report shows {difference_intervals + pairs} intervals at 95% each "
        f"({difference_intervals} for the differences to the baseline, {pairs} for the judged pairs). Even with no "
        "real difference anywhere, about 1 in 20 of them would exclude zero by chance, so a single interval's verdict "
        "is weaker than it looks."
    )
    if pairs:
        text += (
            f" Each verdict's \"Holm\" outcome adjusts the judged pairs ({pairs}) together by Holm's step-down "
            "method (family-wise error 5%): a pair keeps its direction only if its adjusted p-value is at most 0.05."
        )
    return text


def _provenance(records):
    commits = sorted({record.get("commit") or "unknown" for record in records})
    versions = sorted({record.get("version") or "unknown" for record in records})
    text = f"package version {', '.join(versions)}; commit {', '.join(commit[:10] for commit in commits)}"
    dirty = [record for record in records if record.get("dirty")]
    if not dirty:
        return text
    hashes = sorted({record["diff_sha256"][:12] for record in dirty if record.get("diff_sha256")})
    unhashed = sum(not record.get("diff_sha256") for record in dirty)
    parts = ([f"`git diff HEAD` sha256 {', '.join(hashes)}"] if hashes else []) + (
        [f"{unhashed} of them recorded before the diff's hash was stored"] if unhashed else []
    )
    return f"{text} (with uncommitted changes: {'; '.join(parts)})"


def report_markdown(study, records):
    """The report's Markdown text, from the records of the results file."""
    counted = counted_records(study, records)
    values, values_of_seeds = metric_values(study, records), values_by_seed(study, records)
    difference_cells, difference_intervals = _difference_cells(study, values)
    judged = _judged(study, values_of_seeds)
    planned = len(study.variations) * len(study.seeds)
    lines = [
        f"# {study.title}",
        "",
        *([study.description, ""] if study.description else []),
        f"- Study file: `{study.path}`; results: `{study.results_path}` ({len(counted)} of {planned} runs).",
        f"- Budget: {study.budget or 'not stated'}",
        "- Base flags: " + (" ".join(f"`{flag}`" for flag in _base_flags(study)) or "none (each variation names its own)"),
        f"- Seeds: {', '.join(map(str, study.seeds))}; baseline: `{study.baseline}`.",
        f"- Measured with {_provenance(list(counted.values()))}." if counted else "- Nothing measured yet.",
        *[f"- Note: {note}" for note in study.notes],
        "",
        "## Accuracy: mean ± standard deviation over seeds (%)",
        "",
        *_results_table(study, values, counted),
        "",
        "\"train min\" is the wall time of the training commands, including any time they waited for or were "
        "paused by other work on the machine: a cost estimate, not a speed measurement (those are in `benchmarks/`).",
        "",
        f"## Difference to the baseline `{study.baseline}`, with Welch's 95% t interval over seeds",
        "",
        *_difference_table(study, difference_cells),
        "",
        "## Verdicts",
        "",
        "A pair goes the paper's way when its whole 95% interval is above zero, the opposite way when it is below, "
        "and is within noise otherwise; a finding is reproduced when every pair goes the paper's way. Pairs of "
        "variations use Welch's interval; two metrics of one variation (the same encoders measured two ways) use "
        "the paired interval over the seeds that have both.",
        "",
        *_verdict_lines(judged),
        "",
        _multiple_comparisons(judged, difference_intervals),
        "",
        f"![{study.name}]({os.path.basename(study.figure_path)})",
        "",
    ]
    return "\n".join(lines)


def write_report(study, records):
    """Writes STUDY_DIR/NAME.md and NAME.png; returns their paths."""
    from simclr_keras import plots

    values = metric_values(study, records)
    with open(study.report_path, "w", encoding="utf-8") as file:
        file.write(report_markdown(study, records))
    plots.save_study_figure(
        values, [variation.name for variation in study.variations], study.metric_names(), study.baseline,
        study.figure_path, study.title,
    )  # fmt: skip
    return study.report_path, study.figure_path
