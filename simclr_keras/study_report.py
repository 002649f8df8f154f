"""The report of a study: mean +- std over seeds, differences to the baseline with 95% Welch intervals,
the verdict on each of the paper's findings, and a figure. Everything comes from the results file."""

import dataclasses
import os

from simclr_keras import statistics

CONFIDENCE = 0.95
REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, NOT_MEASURED = "reproduced", "not reproduced", "within noise", "not measured"


def metric_values(study, records):
    """{variation: {metric: [value per seed]}} of the records, in the order of the study's seeds.

    A seed's latest record counts. Records of variations the study no longer has, or whose flags
    differ from what the study now runs for them (an edited study file), are left out.
    """
    latest = {}
    current_flags = {variation.name: list(variation_flags(study, variation)) for variation in study.variations}
    for record in records:
        if current_flags.get(record["variation"]) == record["flags"] and record["seed"] in study.seeds:
            latest[(record["variation"], record["seed"])] = record
    values = {}
    for variation in study.variations:
        by_metric = values.setdefault(variation.name, {})
        for seed in study.seeds:
            record = latest.get((variation.name, seed))
            for metric, value in (record or {}).get("metrics", {}).items():
                if value is not None:
                    by_metric.setdefault(metric, []).append(value)
    return values


def variation_flags(study, variation):
    """The flags a run of `variation` gets after the base flagfile (before --seed and --model_dir)."""
    return (*study.flags, *variation.flags)


@dataclasses.dataclass(frozen=True)
class Comparison:
    better: str
    worse: str
    interval: statistics.Interval | None  # mean(better) - mean(worse); None with fewer than 2 seeds a side
    outcome: str  # "as the paper", "opposite", "within noise" or "not measured"


def judge(verdict, values):
    """(outcome, [Comparison]) of a verdict: each neighbouring pair of its order, better minus worse.

    Its items are variations compared on verdict.metric, or, with verdict.variation, metrics of that
    variation (unpaired over seeds, which is conservative for two measurements of the same encoders).
    A pair goes the paper's way when its whole 95% interval is above 0, the opposite way when it is
    below 0, and is within noise otherwise. The finding is reproduced when every pair goes the paper's
    way, not reproduced when any goes the opposite way, and within noise otherwise.
    """
    def seeds(item):  # a variation's values of the metric, or (with verdict.variation) a metric's values
        if verdict.variation is not None:
            return values.get(verdict.variation, {}).get(item, [])
        return values.get(item, {}).get(verdict.metric, [])

    comparisons = []
    for better, worse in zip(verdict.order, verdict.order[1:]):
        better_values, worse_values = seeds(better), seeds(worse)
        if len(better_values) < 2 or len(worse_values) < 2:
            comparisons.append(Comparison(better, worse, None, NOT_MEASURED))
            continue
        interval = statistics.welch_interval(better_values, worse_values, CONFIDENCE)
        outcome = "as the paper" if interval.low > 0 else "opposite" if interval.high < 0 else WITHIN_NOISE
        comparisons.append(Comparison(better, worse, interval, outcome))
    outcomes = {comparison.outcome for comparison in comparisons}
    if NOT_MEASURED in outcomes:
        return NOT_MEASURED, comparisons
    if "opposite" in outcomes:
        return NOT_REPRODUCED, comparisons
    if outcomes == {"as the paper"}:
        return REPRODUCED, comparisons
    return WITHIN_NOISE, comparisons


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


def _results_table(study, values, records_by_variation):
    metrics = study.metric_names()
    header = ["variation", "flags", "seeds", *[f"{metric} (%)" for metric in metrics], "train min (mean)"]
    rows = []
    for variation in study.variations:
        by_metric = values[variation.name]
        seeds = max((len(by_metric.get(metric, [])) for metric in metrics), default=0)
        seconds = [record["train_seconds"] for record in records_by_variation.get(variation.name, [])]
        minutes = f"{sum(seconds) / len(seconds) / 60:.1f}" if seconds else "–"
        name = variation.name + (" (baseline)" if variation.name == study.baseline else "")
        flags = " ".join(f"`{flag}`" for flag in variation.flags) or "(base)"
        rows.append([name, flags, str(seeds), *[_mean_std(by_metric.get(metric, [])) for metric in metrics], minutes])
    return _table(header, rows)


def _difference_table(study, values):
    metrics = study.metric_names()
    header = ["variation", *[f"{metric}: difference [95% interval] (points)" for metric in metrics]]
    rows = []
    baseline = values[study.baseline]
    for variation in study.variations:
        if variation.name == study.baseline:
            continue
        cells = []
        for evaluation, metric in zip(study.evaluations, metrics):
            mine, theirs = values[variation.name].get(metric, []), baseline.get(metric, [])
            if not (evaluation.applies_to(variation.name) and evaluation.applies_to(study.baseline)):
                cells.append("not evaluated")
            elif len(mine) < 2 or len(theirs) < 2:
                cells.append("needs 2+ seeds")
            else:
                cells.append(_interval_text(statistics.welch_interval(mine, theirs, CONFIDENCE)))
        rows.append([variation.name, *cells])
    return _table(header, rows)


def _verdict_lines(study, values):
    lines = []
    for verdict in study.verdicts:
        outcome, comparisons = judge(verdict, values)
        details = "; ".join(
            f"{comparison.better} − {comparison.worse} = "
            + (_interval_text(comparison.interval) if comparison.interval else "–")
            + f" ({comparison.outcome})"
            for comparison in comparisons
        )
        where = f"`{verdict.metric}`" if verdict.variation is None else f"`{verdict.variation}`"
        lines.append(f"- **{verdict.finding}** on {where}: **{outcome}**. {details}.")
    return lines or ["(the study file names no finding to judge)"]


def _provenance(records):
    commits = sorted({record.get("commit") or "unknown" for record in records})
    dirty = any(record.get("dirty") for record in records)
    versions = sorted({record.get("version") or "unknown" for record in records})
    return (
        f"package version {', '.join(versions)}; commit {', '.join(commit[:10] for commit in commits)}"
        + (" (with uncommitted changes)" if dirty else "")
    )


def report_markdown(study, records):
    """The report's Markdown text, from the records of the results file."""
    values = metric_values(study, records)
    kept = [record for record in records if record["variation"] in values and record["seed"] in study.seeds]
    records_by_variation = {}
    for record in kept:
        records_by_variation.setdefault(record["variation"], []).append(record)
    planned = len(study.variations) * len(study.seeds)
    lines = [
        f"# {study.title}",
        "",
        *([study.description, ""] if study.description else []),
        f"- Study file: `{study.path}`; results: `{study.results_path}` ({len(kept)} of {planned} runs).",
        f"- Budget: {study.budget or 'not stated'}",
        "- Base flags: " + (" ".join(f"`{flag}`" for flag in _base_flags(study)) or "none (each variation names its own)"),
        f"- Seeds: {', '.join(map(str, study.seeds))}; baseline: `{study.baseline}`.",
        f"- Measured with {_provenance(kept)}." if kept else "- Nothing measured yet.",
        *[f"- Note: {note}" for note in study.notes],
        "",
        "## Accuracy: mean ± standard deviation over seeds (%)",
        "",
        *_results_table(study, values, records_by_variation),
        "",
        "\"train min\" is the wall time of the training commands, including any time they waited for or were "
        "paused by other work on the machine: a cost estimate, not a speed measurement (those are in `benchmarks/`).",
        "",
        f"## Difference to the baseline `{study.baseline}`, with Welch's 95% t interval over seeds",
        "",
        *_difference_table(study, values),
        "",
        "## Verdicts",
        "",
        "A pair goes the paper's way when its whole 95% interval is above zero, the opposite way when it is below, "
        "and is within noise otherwise; a finding is reproduced when every pair goes the paper's way.",
        "",
        *_verdict_lines(study, values),
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
