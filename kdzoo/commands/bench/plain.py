"""The plain-PyTorch reference loop ``kdzoo bench`` compares against."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import (CLIP_GRAD_MAX_NORM, COSFACE_M, COSFACE_S, OPTIMIZER,
                     PRECISIONS)


# ------------------------------------------------------------ plain loop
def cosface_loss(emb: torch.Tensor, weight: torch.Tensor,
                 labels: torch.Tensor, s: float = COSFACE_S,
                 m: float = COSFACE_M) -> torch.Tensor:
    """CosFace (Wang et al., CVPR 2018, arXiv 1801.09414, Eq. 4) written
    out: cross-entropy of ``s·(cos θ_j − m·[j = y])``, in float32."""
    cos = F.linear(F.normalize(emb.float(), dim=1),
                   F.normalize(weight.float(), dim=1))
    margin = F.one_hot(labels, cos.shape[1]).to(cos.dtype) * m
    return F.cross_entropy(s * (cos - margin), labels)


class PlainLoop:
    """The reference training step in plain PyTorch (no mmengine, no kdzoo
    wrapper on the step path): normalise, backbone under autocast, inline
    CosFace head, backward (GradScaler under AMP), clip, SGD step."""

    def __init__(self, backbone: nn.Module, head_weight: torch.Tensor,
                 device: torch.device, precision: str,
                 channels_last: bool = False):
        self.backbone = backbone.to(device).train()
        self.weight = nn.Parameter(head_weight.to(device))
        self.device = device
        self.amp_dtype = getattr(torch, PRECISIONS[precision]) \
            if PRECISIONS[precision] else None
        self.channels_last = channels_last
        self.params = [p for p in self.backbone.parameters()
                       if p.requires_grad] + [self.weight]
        sgd = {k: v for k, v in OPTIMIZER.items() if k != 'type'}
        self.optimizer = torch.optim.SGD(self.params, **sgd)
        # as mmengine's AmpOptimWrapper: dynamic loss scaling under any AMP
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=precision != 'fp32')

    def loss(self, data: dict) -> torch.Tensor:
        x = data['inputs'].to(self.device, non_blocking=True)
        x = (x.float() - 127.5) / 128.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = data['data_samples']['label'].to(self.device,
                                                  non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            emb = self.backbone(x)
        return cosface_loss(emb, self.weight, labels)

    def step(self, data: dict) -> torch.Tensor:
        loss = self.loss(data)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD_MAX_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()
