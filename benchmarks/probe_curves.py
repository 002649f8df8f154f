"""The online probe's cross-entropy of two runs against the global step, with their learning rate.

    python benchmarks/probe_curves.py --before=OLD/train_log.jsonl --after=NEW/train_log.jsonl \
        --output=benchmarks/results/quickstart_probe_after/probe_loss_before_after.png

Thin lines are the logged per-step values, thick ones their 10-step trailing mean; the dotted line is
chance (ln 10 for CIFAR-10).
"""

import math

from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simclr_keras.plots import moving_average, read_train_log

flags.DEFINE_string("before", None, "train_log.jsonl of the run before the change.", required=True)
flags.DEFINE_string("after", None, "train_log.jsonl of the run after it.", required=True)
flags.DEFINE_string("output", "probe_loss_before_after.png", "PNG to write.")
flags.DEFINE_integer("num_classes", 10, "Classes of the probe (chance is ln of it).")
FLAGS = flags.FLAGS


def main(_):
    figure = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rate_axes = axes.twinx()
    for label, path, colour in (("before", FLAGS.before, "tab:red"), ("after", FLAGS.after, "tab:blue")):
        records = read_train_log(path)
        steps = [record["step"] for record in records]
        losses = [record["probe_loss"] for record in records]
        axes.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
        axes.plot(steps, moving_average(losses, 10), color=colour, linewidth=2, label=f"probe cross-entropy, {label}")
    rate_axes.plot(steps, [record["learning_rate"] for record in records], color="grey", label="learning rate")
    axes.axhline(math.log(FLAGS.num_classes), color="black", linestyle=":", label=f"chance, ln {FLAGS.num_classes}")
    axes.set_xlabel("step")
    axes.set_ylabel("probe cross-entropy (training batch)")
    rate_axes.set_ylabel("learning rate")
    axes.legend(loc="upper right")
    rate_axes.legend(loc="lower left")
    axes.set_title("Online probe during the quickstart (configs/quickstart.flags)")
    figure.savefig(FLAGS.output, dpi=100, facecolor="white")
    print(FLAGS.output)


if __name__ == "__main__":
    app.run(main)
