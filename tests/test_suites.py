"""Every shipped suite (recipes/suites/) loads, and each of its runs resolves
to a recipe that passes config validation once the teachers it names exist
(so `kdzoo compare` cannot fail half-way on a typo in a suite)."""
import glob
import os

import pytest
import torch

import kdzoo  # noqa: F401
from kdzoo.engine.runner import load_recipe
from kdzoo.commands.compare import _resolve_recipe, _substitute, load_suite
from kdzoo.commands.compare_grid import grid_suite
from kdzoo.engine.validate import validate_config
from kdzoo.registry import BACKBONES, HEADS
from conftest import shared_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SUITES = sorted(glob.glob(os.path.join(ROOT, 'recipes', 'suites', '*.py')))


@pytest.mark.parametrize('suite_path', SUITES,
                         ids=[os.path.basename(s)[:-3] for s in SUITES])
def test_suite_runs_resolve_and_validate(suite_path, tmp_path):
    suite = load_suite(suite_path)
    if 'real_faces' in suite_path:  # pretrained teachers and real data
        shared_path('teachers')
        shared_path('data', 'train', 'celeba299')
    run_dirs = {}
    for run in suite['runs']:
        where = f'{suite_path}: run {run["name"]!r}'
        options = _substitute(dict(run.get('cfg_options') or {}), run_dirs,
                              where, set())
        recipe = _resolve_recipe(run['recipe'], suite_path)
        run_dir = tmp_path / run['name']
        cfg = load_recipe(recipe, options, str(run_dir))
        validate_config(cfg)
        if run.get('role') == 'teacher' and cfg.get('train_dataloader'):
            # what a finished teacher run leaves for the runs after it
            run_dir.mkdir()
            student = cfg.model.student
            torch.save(BACKBONES.build(student.backbone).state_dict(),
                       run_dir / 'backbone.pth')
            torch.save(HEADS.build(student.head).state_dict(),
                       run_dir / 'head.pth')
        run_dirs[run['name']] = str(run_dir)
    assert run_dirs
    if suite.get('grid'):  # every grid point resolves and validates too
        derived = grid_suite(suite, suite_path, str(tmp_path / 'grid'))
        assert len(derived.runs) == len(derived.grid_plan) > 0
        for run in derived.runs:
            cfg = load_recipe(_resolve_recipe(run['recipe'], suite_path),
                              dict(run['cfg_options']),
                              str(tmp_path / 'grid' / run['name']))
            validate_config(cfg)
            for key, value in run['cfg_options'].items():
                if not isinstance(value, dict):
                    assert _lookup(cfg, key) == value, (run['name'], key)


def _lookup(cfg, key):
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return node
