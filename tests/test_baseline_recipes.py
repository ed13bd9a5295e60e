"""Every baseline and LIAAD recipe (and the age-invariant teacher recipe)
builds, validates its taps/connectors and
takes a training step; its loss values on fixed inputs match the stored golden
values (a regression guard, as torchdistill keeps; each loss's correctness is
checked against independent references in its own test file).

Regenerate the golden file after an intended change with
``KDZOO_UPDATE_GOLDEN=1 python -m pytest tests/test_baseline_recipes.py``.
"""
import glob
import json
import os

import pytest
import torch

import kdzoo  # noqa: F401  (registers everything)
from kdzoo.engine.runner import load_recipe
from kdzoo.registry import BACKBONES, HEADS, MODELS
from kdzoo.utils import atomic_write_json

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'recipes', 'baselines', '*.py'))
                 + glob.glob(os.path.join(ROOT, 'recipes', 'liaad', '*.py'))
                 + [os.path.join(ROOT, 'recipes', 'teachers',
                                 'iresnet_age_invariant_synthface_age.py')])
GOLDEN = os.path.join(os.path.dirname(__file__), 'fixtures',
                      'baseline_loss_golden.json')
TEACHER_RECIPE = os.path.join(ROOT, 'recipes', 'teachers',
                              'iresnet_synthface_age.py')


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
    """A teacher run dir with seeded random backbone.pth / head.pth."""
    cfg = load_recipe(TEACHER_RECIPE)
    torch.manual_seed(123)
    out = tmp_path_factory.mktemp('teacher')
    backbone = BACKBONES.build(cfg.model.student.backbone)
    head = HEADS.build(cfg.model.student.head)
    torch.save(backbone.state_dict(), out / 'backbone.pth')
    torch.save(head.state_dict(), out / 'head.pth')
    return str(out)


def _build(recipe, teacher_dir):
    cfg = load_recipe(recipe)
    options = {}
    for name, teacher in (cfg.model.get('teachers') or {}).items():
        if teacher is None:
            continue
        options[f'model.teachers.{name}.checkpoint'] = \
            f'{teacher_dir}/backbone.pth'
        if teacher.get('head') is not None:
            options[f'model.teachers.{name}.head_checkpoint'] = \
                f'{teacher_dir}/head.pth'
    for name, loss in cfg.model.distill_losses.items():
        if loss is not None and 'head_checkpoint' in loss:
            options[f'model.distill_losses.{name}.head_checkpoint'] = \
                f'{teacher_dir}/head.pth'
    cfg = load_recipe(recipe, options)
    torch.manual_seed(0)
    return cfg, MODELS.build(cfg.model)


def _batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = cfg.model.student.backbone.input_size
    # 4 identities x 2 images: every relation loss has positives
    labels = torch.tensor([3, 3, 17, 17, 250, 250, 399, 399])
    inputs = torch.randn(8, 3, *size, generator=g)
    data = dict(label=labels, age=torch.randint(0, 80, (8,), generator=g),
                index=torch.tensor([48, 49, 272, 273, 4000, 4001, 6398, 6399]))
    return inputs, data


def _step(model, cfg):
    inputs, data = _batch(cfg)
    model.train()
    torch.manual_seed(2)
    losses = model.loss(inputs, data)
    return losses, inputs


def _golden():
    if not os.path.isfile(GOLDEN):
        return {}
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize('recipe', RECIPES,
                         ids=[os.path.basename(r)[:-3] for r in RECIPES])
def test_recipe_builds_trains_one_step_and_matches_golden(recipe,
                                                          teacher_dir):
    cfg, model = _build(recipe, teacher_dir)
    names = [k for k, v in cfg.model.distill_losses.items() if v is not None]
    assert names, 'a distillation recipe must distil'
    losses, _ = _step(model, cfg)
    for key in names:
        key = key if key.startswith('loss') else f'loss_{key}'
        assert key in losses, f'{key} missing from {sorted(losses)}'
    values = {k: float(v.detach()) for k, v in losses.items()}
    name = os.path.basename(recipe)[:-3]
    if os.environ.get('KDZOO_UPDATE_GOLDEN'):
        golden = _golden()
        golden[name] = values
        atomic_write_json(GOLDEN, dict(sorted(golden.items())))
    else:
        expected = _golden().get(name)
        assert expected is not None, \
            f'{name}: no golden values; regenerate with KDZOO_UPDATE_GOLDEN=1'
        assert sorted(values) == sorted(expected), name
        for key, value in values.items():
            assert value == pytest.approx(expected[key], rel=1e-4,
                                          abs=1e-6), f'{name}.{key}'
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    student_grads = [p.grad for p in model.student.backbone.parameters()
                     if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    for p in model.teachers.parameters():  # empty for the teacher recipe
        assert p.grad is None


def test_golden_file_lists_exactly_the_recipes():
    names = sorted(os.path.basename(r)[:-3] for r in RECIPES)
    assert sorted(_golden()) == names, \
        'recipes changed: regenerate with KDZOO_UPDATE_GOLDEN=1'
