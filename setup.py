"""simclr_keras: SimCLR contrastive self-supervised learning for Keras 3 / TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="simclr_keras",
    version="0.1.0",
    description=(
        "SimCLR (Chen et al., ICML 2020) for Keras 3 / TensorFlow: augmentations, "
        "ResNet backbones, NT-Xent, LARS and a training command line."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["simclr_keras", "simclr_keras.*"]),
    python_requires=">=3.10,<3.13",
    # Pinned to versions that install together on Python 3.11; tensorflow-cpu keeps CPU-only
    # machines small. On a GPU machine install `tensorflow[and-cuda]==2.21.0` beside it.
    install_requires=[
        "tensorflow-cpu==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        "absl-py==2.5.1",
        # tf.summary needs it, and tensorflow 2.21 no longer installs it.
        "tensorboard==2.21.0",
        # simclr_keras.plots: the PNGs training and evaluation write (Agg canvas, no display needed).
        "matplotlib==3.11.2",
    ],
    extras_require={
        # nbclient runs the notebooks in an ipykernel kernel (tests/test_notebooks.py).
        "test": ["pytest==9.2.0", "hypothesis==6.170.15", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
        # For the README's gRPC client (Serving section). Its metadata requires the full `tensorflow` wheel
        # (572 MB), which pip then installs over tensorflow-cpu's files; beside tensorflow-cpu prefer
        # `pip install --no-deps tensorflow-serving-api==2.21.0` (grpcio and protobuf 7 are already there).
        "serving": ["tensorflow-serving-api==2.21.0"],
        # benchmarks/train_throughput.py's PyTorch peer only; never needed to train or evaluate.
        # On x86_64 pip takes torch 2.14.1 and torchvision 0.29.1 as one matching pair.
        "bench": ["torch==2.14.1", "torchvision==0.29.1", "lightly==1.6.0"],
    },
)
