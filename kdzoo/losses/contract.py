"""The loss plugin contract as a check anyone can run on a loss.

``check_contract(loss)`` builds inputs from the loss's argument names (as
``tools/bench_losses.py`` does) and checks what every kdzoo loss promises:
its own ``check_shapes`` accepts them; the result is a finite scalar; it is
linear in ``loss_weight``; no gradient reaches a teacher-side input while
the student side gets a finite one. kdzoo's tests run it on every
registered loss; run it on yours in one line of your own tests::

    from kdzoo.losses.contract import check_contract
    check_contract(MyLoss())

Argument names map to inputs: ``*logits*`` B×C, ``*emb*`` B×D,
``*feat*``/``*_map`` B×C×H×W, ``labels`` (pairs of one identity),
``ages``, ``indices``; give others (or other shapes) in ``inputs``.
"""
from typing import Dict, Optional

import torch

from .base import BaseDistillLoss

__all__ = ['example_inputs', 'check_contract']

BATCH, DIM, CLASSES, FEAT = 8, 16, 10, (4, 6, 6)


def example_inputs(loss: BaseDistillLoss,
                   inputs: Optional[Dict[str, torch.Tensor]] = None,
                   seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs for every required argument of ``loss`` (and those given in
    ``inputs``), from the argument names; floating ones require grad."""
    g = torch.Generator().manual_seed(seed)
    given = dict(inputs or {})
    values = {}
    for name, param in loss.input_signature().parameters.items():
        if name in given:
            values[name] = given.pop(name)
        elif param.default is not param.empty:
            continue
        elif 'logits' in name:
            values[name] = torch.randn(BATCH, CLASSES, generator=g) * 4
        elif 'emb' in name:
            values[name] = torch.randn(BATCH, DIM, generator=g)
        elif 'feat' in name or name.endswith('_map'):
            values[name] = torch.randn(BATCH, *FEAT, generator=g).relu()
        elif name == 'labels':
            values[name] = torch.arange(BATCH) // 2  # pairs: positives exist
        elif name == 'ages':
            values[name] = torch.tensor([5, 60, 20, 75, 10, 50, 30, 80])
        elif name == 'indices':
            values[name] = torch.arange(BATCH)
        else:
            raise ValueError(
                f'{type(loss).__name__}: no example input for argument '
                f'{name!r}; give it: example_inputs(loss, inputs={{{name!r}: '
                '...}})')
    if given:
        raise ValueError(f'{type(loss).__name__} takes no argument(s) '
                         f'{sorted(given)}')
    for value in values.values():
        if value.is_floating_point():
            value.detach_().requires_grad_(True)
    return values


def check_contract(loss: BaseDistillLoss,
                   inputs: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Raise ``AssertionError`` naming the loss and the broken promise."""
    name = type(loss).__name__
    assert isinstance(loss, BaseDistillLoss), (
        f'{name} must subclass kdzoo.losses.BaseDistillLoss')
    values = example_inputs(loss, inputs)
    loss.check_shapes({k: v.shape for k, v in values.items()})
    training, weight = loss.training, loss.loss_weight
    loss.eval()  # no running statistics move between the calls below

    def call(w):
        loss.loss_weight = w
        torch.manual_seed(0)  # losses that sample (CRD) draw the same
        return loss(**values)

    try:
        one = call(1.0)
        assert one.dim() == 0 and bool(torch.isfinite(one)), (
            f'{name}: not a finite scalar: {one}')
        three = call(3.0)
        # one multiplication by 3 in float32: a relative error of 2^-23
        assert torch.allclose(three, 3.0 * one, rtol=1e-6, atol=1e-7), (
            f'{name}: not linear in loss_weight ({one} -> {three})')
        assert call(0.0).item() == 0.0, f'{name}: loss_weight=0 is not 0'
        out = call(1.0)
        assert out.requires_grad, (
            f'{name}: no gradient reached the student side (the result '
            'does not depend on any input that requires grad)')
        out.backward()
    finally:
        loss.loss_weight = weight
        loss.train(training)
    teacher = set(type(loss).teacher_arg_names())
    student = []
    for arg, value in values.items():
        if not value.requires_grad:
            continue
        if arg in teacher:
            assert value.grad is None, f'{name}: gradient reached {arg}'
        else:
            student.append(arg)
            if value.grad is not None:
                assert bool(torch.isfinite(value.grad).all()), (
                    f'{name}: non-finite gradient on {arg}')
    assert any(values[a].grad is not None for a in student), (
        f'{name}: no gradient reached the student side ({student})')
