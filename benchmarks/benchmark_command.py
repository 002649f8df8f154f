"""The training command every benchmark times: ResNet-18 (CIFAR stem), 512-512-128 head, no evaluation."""

import sys

# The learning rates the benchmarks train with: SGD as the earlier tables, LARS as configs/quickstart.flags.
LEARNING_RATES = {"sgd": 0.1, "lars": 1.0}


def training_command(
    data_dir, batch_size, steps, precision, model_dir, width_multiplier=1.0, extra_flags=(), optimizer="sgd"
):
    """`python -m simclr_keras.train ...` as a list, for `subprocess.run`; enough images for `steps`."""
    return [
        sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{data_dir}",
        f"--max_train_examples={batch_size * (steps + 2)}", "--image_size=32", "--backbone=resnet18",
        f"--width_multiplier={width_multiplier}", "--proj_layers=2", "--proj_dim=128", f"--batch_size={batch_size}",
        f"--train_steps={steps}", f"--optimizer={optimizer}", f"--learning_rate={LEARNING_RATES[optimizer]}",
        "--warmup_epochs=0", "--weight_decay=1e-4", "--momentum=0.9", "--temperature=0.5",
        "--color_jitter_strength=0.5", "--nouse_blur",
        f"--precision={precision}", "--eval_split=", f"--checkpoint_every_n_steps={10**9}",
        f"--model_dir={model_dir}", *extra_flags,
    ]  # fmt: skip
