"""A study file (TOML): the runs of a study and how they are judged. `simclr_keras.study` runs it.

    [study]
    title = "Temperature (SimCLR Table 5)"
    base_flagfile = "configs/study_cpu.flags"   # relative to the working directory
    flags = ["--train_epochs=2"]                 # every run, after the flagfile
    seeds = [0, 1, 2]
    baseline = "t0.5"                            # the variation the others are compared with
    budget = "quarter-width ResNet-18, 2 epochs, ..."   # stated in the report
    images_per_second = 300                      # training speed assumed by --dry_run until measured
    runs_dir = "runs/studies/NAME"               # default; each run in RUNS_DIR/VARIATION/seed_S

    [[variations]]                               # one axis ...
    name = "t0.1"
    flags = ["--temperature=0.1"]

    [grid]                                       # ... or a grid: every combination, named flag=value,...
    temperature = [0.1, 0.5]
    batch_size = [256, 512]

    [[evaluations]]                              # knn, linear, finetune (python -m simclr_keras.evaluate) or
    name = "knn"                                 # probe (the run's own eval_results.json)
    protocol = "knn"
    flags = ["--max_train_examples=10000"]
    seconds = 60                                 # assumed cost until measured
    variations = ["..."]                         # optional: only these variations

    [[verdicts]]                                 # the paper's direction, best first
    finding = "nonlinear > linear > none (Fig. 8)"
    metric = "linear_top1"                       # EVALUATION_top1 or EVALUATION_top5
    order = ["nonlinear", "linear", "none"]

    [[verdicts]]                                 # or metrics of one variation, best first
    finding = "h > z"
    variation = "nonlinear"
    order = ["linear_top1", "linear_z_top1"]

A variation's flags come after the study's, so they win; every run gets --seed and --model_dir last.
"""

import dataclasses
import itertools
import os
import tomllib

PROTOCOLS = ("knn", "linear", "finetune", "probe")
STUDY_KEYS = {
    "title", "description", "budget", "base_flagfile", "flags", "seeds", "baseline", "runs_dir",
    "images_per_second", "overhead_seconds", "notes",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variation:
    name: str
    flags: tuple
    images_per_second: float | None = None  # the study's when None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    name: str
    protocol: str
    flags: tuple = ()
    seconds: float = 60.0
    variations: tuple | None = None  # None: every variation

    def applies_to(self, variation_name):
        return self.variations is None or variation_name in self.variations


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The paper's direction, best first: variations on one metric, or (with `variation`) metrics of one variation."""

    finding: str
    metric: str | None
    order: tuple
    variation: str | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    path: str
    name: str
    title: str
    description: str
    budget: str
    base_flagfile: str | None
    flags: tuple
    seeds: tuple
    baseline: str
    runs_dir: str
    images_per_second: float
    overhead_seconds: float
    variations: tuple
    evaluations: tuple
    verdicts: tuple
    notes: tuple = ()

    @property
    def results_path(self):
        """STUDY_DIR/results/NAME.jsonl, beside the study file."""
        return os.path.join(os.path.dirname(self.path), "results", f"{self.name}.jsonl")

    @property
    def report_path(self):
        return os.path.join(os.path.dirname(self.path), f"{self.name}.md")

    @property
    def figure_path(self):
        return os.path.join(os.path.dirname(self.path), f"{self.name}.png")

    def variation(self, name):
        return next(variation for variation in self.variations if variation.name == name)

    def metric_names(self):
        """EVALUATION_top1 of every evaluation, in file order (the report's columns)."""
        return [f"{evaluation.name}_top1" for evaluation in self.evaluations]


def _flag_list(where, value):
    if not isinstance(value, list) or not all(isinstance(item, str) and item.startswith("--") for item in value):
        raise ValueError(f"{where} must be a list of \"--name=value\" strings, received {value!r}.")
    return tuple(value)


def _grid_variations(grid):
    """Every combination of the grid's flag values, named "flag=value,flag=value"."""
    if not grid or not all(isinstance(values, list) and values for values in grid.values()):
        raise ValueError(f"[grid] maps flag names to non-empty lists of values, received {grid!r}.")
    variations = []
    for combination in itertools.product(*grid.values()):
        pairs = list(zip(grid, combination))
        name = ",".join(f"{flag}={_flag_value(value)}" for flag, value in pairs)
        variations.append(Variation(name, tuple(f"--{flag}={_flag_value(value)}" for flag, value in pairs)))
    return variations


def _flag_value(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _variations(document):
    if ("variations" in document) == ("grid" in document):
        raise ValueError("a study names its variations in [[variations]] or in [grid], exactly one of them.")
    if "grid" in document:
        return _grid_variations(document["grid"])
    variations = []
    for index, table in enumerate(document["variations"]):
        if not isinstance(table.get("name"), str) or not table["name"] or "/" in table["name"]:
            raise ValueError(f"[[variations]] {index + 1} needs a name without '/', received {table.get('name')!r}.")
        variations.append(
            Variation(table["name"], _flag_list(f"variation {table['name']!r} flags", table.get("flags", [])), table.get("images_per_second"))
        )
    return variations


def _evaluations(document, variation_names):
    evaluations = []
    for table in document.get("evaluations", []):
        name, protocol = table.get("name", table.get("protocol")), table.get("protocol")
        if protocol not in PROTOCOLS:
            raise ValueError(f"evaluation {name!r}: protocol must be one of {', '.join(PROTOCOLS)}, received {protocol!r}.")
        only = table.get("variations")
        unknown = sorted(set(only or ()) - set(variation_names))
        if unknown:
            raise ValueError(f"evaluation {name!r} names variations the study does not have: {', '.join(unknown)}.")
        flags = _flag_list(f"evaluation {name!r} flags", table.get("flags", []))
        if protocol == "probe" and flags:
            raise ValueError(f"evaluation {name!r}: the probe is measured by training; it takes no flags, received {list(flags)}.")
        evaluations.append(Evaluation(name, protocol, flags, float(table.get("seconds", 60.0)), tuple(only) if only else None))
    if not evaluations:
        raise ValueError("a study needs at least one [[evaluations]] entry (knn, linear, finetune or probe).")
    if len({evaluation.name for evaluation in evaluations}) != len(evaluations):
        raise ValueError(f"evaluation names must differ, received {[evaluation.name for evaluation in evaluations]}.")
    return evaluations


def _verdicts(document, variation_names, metric_names):
    verdicts = []
    for table in document.get("verdicts", []):
        order, metric, variation = table.get("order", []), table.get("metric"), table.get("variation")
        if variation is not None:  # metrics of one variation, e.g. linear evaluation of h against z
            if variation not in variation_names or len(order) < 2 or not set(order) <= set(metric_names):
                raise ValueError(
                    f"verdict {table.get('finding')!r}: with variation (one of {variation_names}, received "
                    f"{variation!r}), order lists two or more metrics of {metric_names}, received {order!r}."
                )
            verdicts.append(Verdict(str(table.get("finding", " > ".join(order))), None, tuple(order), variation))
            continue
        if metric not in metric_names:
            raise ValueError(f"verdict {table.get('finding')!r}: metric must be one of {metric_names}, received {metric!r}.")
        if len(order) < 2 or not set(order) <= set(variation_names):
            raise ValueError(
                f"verdict {table.get('finding')!r}: order must list two or more of the variations {variation_names}, "
                f"received {order!r}."
            )
        verdicts.append(Verdict(str(table.get("finding", " > ".join(order))), metric, tuple(order)))
    return verdicts


def load_study(path):
    """Reads and checks a study file; raises ValueError naming the entry that is wrong."""
    with open(path, "rb") as file:
        try:
            document = tomllib.load(file)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from error
    settings = document.get("study", {})
    unknown = sorted(set(settings) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"[study] has unknown keys {unknown}; known: {sorted(STUDY_KEYS)}.")
    name = os.path.splitext(os.path.basename(path))[0]
    variations = _variations(document)
    variation_names = [variation.name for variation in variations]
    if len(set(variation_names)) != len(variation_names):
        raise ValueError(f"variation names must differ, received {variation_names}.")
    seeds = settings.get("seeds", [0])
    if not seeds or not all(isinstance(seed, int) and seed >= 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"[study] seeds must be distinct integers >= 0, received {seeds!r}.")
    baseline = settings.get("baseline", variation_names[0])
    if baseline not in variation_names:
        raise ValueError(f"[study] baseline={baseline!r} is not one of the variations {variation_names}.")
    evaluations = _evaluations(document, variation_names)
    metric_names = [f"{evaluation.name}_{kind}" for evaluation in evaluations for kind in ("top1", "top5")]
    images_per_second = float(settings.get("images_per_second", 300.0))
    if not images_per_second > 0:
        raise ValueError(f"[study] images_per_second must be > 0, received {images_per_second}.")
    return Study(
        path=path,
        name=name,
        title=settings.get("title", name),
        description=settings.get("description", ""),
        budget=settings.get("budget", ""),
        base_flagfile=settings.get("base_flagfile"),
        flags=_flag_list("[study] flags", settings.get("flags", [])),
        seeds=tuple(seeds),
        baseline=baseline,
        runs_dir=settings.get("runs_dir", os.path.join("runs", "studies", name)),
        images_per_second=images_per_second,
        overhead_seconds=float(settings.get("overhead_seconds", 30.0)),
        variations=tuple(variations),
        evaluations=tuple(evaluations),
        verdicts=tuple(_verdicts(document, variation_names, metric_names)),
        notes=tuple(settings.get("notes", [])),
    )
