"""Face backbones: IResNet, MobileFaceNet, TFace IR/IR-SE, any timm model,
ONNX files."""
from .base import BaseBackbone
from .iresnet import IBasicBlock, IResNet, IRESNET_BLOCKS
from .mobilefacenet import MobileFaceNet
from .onnx_backbone import OnnxBackbone
from .tface_irse import TFaceIR
from .timm_backbone import TimmBackbone

__all__ = ['BaseBackbone', 'IResNet', 'IBasicBlock', 'IRESNET_BLOCKS',
           'MobileFaceNet', 'TFaceIR', 'TimmBackbone', 'OnnxBackbone']
