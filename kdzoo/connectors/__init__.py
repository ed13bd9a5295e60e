"""Trainable adapters between student taps and teacher-shaped targets."""
from .conv_reg import ConvReg
from .projectors import BaseConnector, ConvProjector, LinearProjector

__all__ = ['BaseConnector', 'LinearProjector', 'ConvProjector', 'ConvReg']
