"""SimCLR as lightly's CIFAR-10 benchmark trains it, in plain PyTorch (the peer of accuracy_vs_lightly.py).

lightly 1.6's benchmark (docs/source/getting_started/benchmarks/cifar10_benchmark.py, `SimCLRModel`),
without PyTorch Lightning:

- backbone: `ResNetGenerator("resnet-18", width)` (3x3 stem conv stride 1, no max-pool) built as the
  benchmark builds it, `nn.Sequential(*children[:-1], nn.AdaptiveAvgPool2d(1))`: the stem's ReLU is
  a call in `ResNet.forward`, not a child module, so this backbone has no ReLU after the stem's
  BatchNorm. Kept as lightly has it.
- head: `SimCLRProjectionHead(dim, dim, 128)` (Linear, BatchNorm, ReLU, Linear with bias).
- loss: `NTXentLoss()` (temperature 0.5, lightly's default, which the benchmark keeps).
- views: `SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)`: random resized crop
  (scale 0.08-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8,
  grayscale 0.2, ImageNet mean/std normalisation; each view goes through the model on its own.
- optimizer: SGD, learning rate 0.06 x B/128, momentum 0.9, weight decay 5e-4 on every parameter,
  `CosineAnnealingLR(T_max=epochs)` stepped once per epoch (Lightning's default interval).
- data: shuffled, `drop_last=True`.

torch, torchvision and lightly are imported here only, never by simclr_keras.
"""

import time

import numpy as np
import torch
from lightly.loss import NTXentLoss
from lightly.models import ResNetGenerator
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image

BASE_LEARNING_RATE = 0.06  # per 128 images
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TEMPERATURE = 0.5
PROJECTION_DIM = 128


def build_backbone(width_multiplier):
    """lightly's CIFAR ResNet-18 without its classifier: float images [B, 3, 32, 32] -> [B, D, 1, 1]."""
    resnet = ResNetGenerator("resnet-18", width=width_multiplier)
    return torch.nn.Sequential(*list(resnet.children())[:-1], torch.nn.AdaptiveAvgPool2d(1))


def backbone_output_dim(width_multiplier):
    return 8 * int(64 * width_multiplier)  # lightly's ResNet: base = int(64 * width), last group 8 x base


class SimCLRPeer(torch.nn.Module):
    def __init__(self, width_multiplier):
        super().__init__()
        dim = backbone_output_dim(width_multiplier)
        self.backbone = build_backbone(width_multiplier)
        self.projection_head = SimCLRProjectionHead(dim, dim, PROJECTION_DIM)

    def forward(self, images):
        return self.projection_head(self.backbone(images).flatten(start_dim=1))  # z: [B, 128]


class ImageFiles(torch.utils.data.Dataset):
    """(two views, index) of each image file, as lightly's folder dataset reads them (PIL, RGB)."""

    def __init__(self, paths, transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index


def train(paths, width_multiplier, epochs, batch_size, seed, workers=0, device="cpu"):
    """Pretrains a `SimCLRPeer` on the image files; returns (backbone, timing).

    timing: `start_time` and `end_time` (Unix time: the loop's start, before the first batch is read,
    and the end of the last optimizer step), `step_seconds` (each step, batch reading included),
    `data_seconds` (the part of them spent waiting for batches).
    """
    torch.manual_seed(seed)
    model = SimCLRPeer(width_multiplier).to(device)
    criterion = NTXentLoss(temperature=TEMPERATURE)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=BASE_LEARNING_RATE * batch_size / 128, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    model.train()
    step_seconds = []
    start_time = time.time()
    data_seconds = 0.0  # of step_seconds, waiting for the loader (file reading and augmentation)
    previous = time.perf_counter()
    for _ in range(epochs):
        for (view0, view1), _ in loader:
            data_seconds += time.perf_counter() - previous
            loss = criterion(model(view0.to(device)), model(view1.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device != "cpu":
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_seconds.append(now - previous)
            previous = now
        scheduler.step()
    end_time = time.time()
    timing = {"start_time": start_time, "end_time": end_time, "step_seconds": step_seconds}
    timing.update(data_seconds=data_seconds, last_loss=float(loss.detach()))
    return model.backbone, timing


def encode(backbone, images, batch_size=500, device="cpu"):
    """h of uint8 images [N, H, W, 3], preprocessed as lightly's benchmark tests (ToTensor, ImageNet
    mean/std), BatchNorm in inference mode; float32 [N, D]."""
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)
    backbone.eval()
    blocks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            block = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            block = (block.float() / 255 - mean) / std  # [B, 3, H, W]
            blocks.append(backbone(block.to(device)).flatten(start_dim=1).cpu().numpy())
    return np.concatenate(blocks).astype(np.float32)
