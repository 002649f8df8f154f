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
    # keras 3.15.1 and matplotlib 3.11.2 need Python 3.11; tensorflow 2.21.0 has wheels up to 3.13.
    python_requires=">=3.11,<3.14",
    # Pinned to versions that install together (tested on Python 3.11). One TensorFlow wheel for
    # every machine: `tensorflow` runs on CPUs as it is, and the `and-cuda` extra adds NVIDIA's CUDA
    # libraries from pip, as TensorFlow's install guide recommends; never tensorflow-cpu beside it.
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorflow-datasets==4.9.10",
        "absl-py==2.5.1",
        # tf.summary needs it, and tensorflow 2.21 no longer installs it.
        "tensorboard==2.21.0",
        # simclr_keras.plots: the PNGs training and evaluation write (Agg canvas, no display needed).
        "matplotlib==3.11.2",
        # TFDS's download-and-prepare imports it on every Python, though its metadata asks for it only below 3.9.
        "importlib_resources==7.1.0",
        # The progress bar of `python -m simclr_keras.prepare_data` (TFDS draws its own with it too).
        "tqdm==4.70.1",
        # TFDS downloads with it; simclr_keras.dataset_sources checks the source is reachable with it.
        "requests==2.34.2",
    ],
    extras_require={
        # A GPU machine: `pip install -e ".[and-cuda]"` (TensorFlow's own extra: CUDA and cuDNN wheels).
        "and-cuda": ["tensorflow[and-cuda]==2.21.0"],
        # nbclient runs the notebooks in an ipykernel kernel (tests/test_notebooks.py); the serving API
        # builds the docs' real gRPC request (tests/test_export.py).
        "test": [
            "pytest==9.2.0", "hypothesis==6.170.15", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
            "tensorflow-serving-api==2.21.0",
        ],
        # For docs/serving.md's gRPC client.
        "serving": ["tensorflow-serving-api==2.21.0"],
        # benchmarks/train_throughput.py's PyTorch peer only; never needed to train or evaluate.
        # On x86_64 pip takes torch 2.14.1 and torchvision 0.29.1 as one matching pair.
        "bench": ["torch==2.14.1", "torchvision==0.29.1", "lightly==1.6.0"],
    },
)
