"""kdzoo.heads: margin-based classification heads (class centres + margin).

All heads share :class:`BaseMarginHead`'s contract: ``weight`` of shape
``(num_classes, embedding_size)``, ``cosine(emb)``, ``forward(emb)`` giving
``s·cos θ``, ``forward(emb, labels)`` giving the margin logits, and
``loss(emb, labels)`` giving ``dict(loss_cls=...)``, all in float32.
"""
from .adaface import AdaFace
from .arcface import ArcFace, arc_margin
from .base import BaseMarginHead
from .cosface import CosFace
from .curricularface import CurricularFace
from .magface import MagFace
from .partial_fc import PartialFC

__all__ = ['BaseMarginHead', 'ArcFace', 'CosFace', 'CurricularFace',
           'AdaFace', 'MagFace', 'PartialFC', 'arc_margin']
