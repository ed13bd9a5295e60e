"""Face backbones: IResNet, MobileFaceNet, any timm model, ONNX files."""
from .base import BaseBackbone
from .iresnet import IBasicBlock, IResNet, IRESNET_BLOCKS
from .mobilefacenet import MobileFaceNet
from .onnx_backbone import OnnxBackbone
from .timm_backbone import TimmBackbone

__all__ = ['BaseBackbone', 'IResNet', 'IBasicBlock', 'IRESNET_BLOCKS',
           'MobileFaceNet', 'TimmBackbone', 'OnnxBackbone']
