"""Tiny models registered from a test module, as a user plugin would be."""
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.registry import BACKBONES, HEADS


@BACKBONES.register_module(force=True)
class ToyNet(nn.Module):
    """Two conv stages + linear embedding (test-only)."""

    def __init__(self, width=4, embedding_size=8, input_size=(16, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.fc = nn.Linear(2 * width, embedding_size)
        self.embedding_size = embedding_size
        self.input_size = tuple(input_size)
        self.stage_paths = ('bn1', 'conv2')

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@HEADS.register_module(force=True)
class ToyHead(nn.Module):
    """Linear classifier with cross-entropy (test-only)."""

    def __init__(self, num_classes=5, embedding_size=8):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes)

    def forward(self, emb, labels=None):
        return self.fc(emb)

    def loss(self, emb, labels):
        return dict(loss_cls=F.cross_entropy(self.fc(emb), labels))


def toy_batch(n=4, size=16, classes=5):
    inputs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    data_samples = dict(label=torch.arange(n) % classes,
                        age=torch.full((n,), 30), index=torch.arange(n))
    return dict(inputs=inputs, data_samples=data_samples)
