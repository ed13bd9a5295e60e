"""docs/extending.md runs as printed: each file block is written to the
path its first line names, the project is laid out beside a stand-in kdzoo
checkout (its recipes, and a random teacher where the main job writes its
own), and the printed commands run; the recipe trains at the tests' tiny
size (``tiny_options``), everything else as printed. Each component is also
checked on its own: the loss against an independent loop, the backbone's
stages and ``forward_from_stage``, the teacher adapter against the traced
network."""
import importlib
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_runs import TEACHER_BACKBONE, as_cli, random_teacher, tiny_options

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
DOC = os.path.join(ROOT, 'docs', 'extending.md')


def _blocks(lang):
    with open(DOC) as f:
        text = f.read()
    return re.findall(rf'```{lang}\n(.*?)```', text, flags=re.S)


def _file_blocks():
    """{relative path: source} of the python blocks naming their file."""
    files = {}
    for block in _blocks('python'):
        first = block.splitlines()[0]
        if first.startswith('# my_project/'):
            files[first[2:].strip()] = block
    return files


@pytest.fixture(scope='module')
def project(tmp_path_factory, cache_dir):
    """work/kdzoo (stand-in checkout) and work/my_project from the page."""
    work = tmp_path_factory.mktemp('work')
    checkout = work / 'kdzoo'
    (checkout / 'work_dirs' / 'quickstart' / 'teacher').mkdir(parents=True)
    os.symlink(os.path.join(ROOT, 'recipes'), checkout / 'recipes')
    random_teacher(checkout / 'work_dirs' / 'quickstart' / 'teacher' /
                   'backbone.pth')
    files = _file_blocks()
    assert set(files) == {
        'my_project/my_kd/losses.py', 'my_project/my_kd/backbones.py',
        'my_project/my_kd/teachers.py', 'my_project/make_teacher.py',
        'my_project/my_recipe.py', 'my_project/tests/test_my_losses.py'}
    for rel, source in files.items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    (work / 'my_project' / 'my_kd' / '__init__.py').write_text('')
    return work / 'my_project'


def _run(args, cwd, **env):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=600)


def _kdzoo():
    return [sys.executable, '-m', 'kdzoo.cli']


@pytest.fixture(scope='module')
def my_kd(project):
    sys.path.insert(0, str(project))
    try:
        yield {name: importlib.import_module(f'my_kd.{name}')
               for name in ('losses', 'backbones', 'teachers')}
    finally:
        sys.path.remove(str(project))


def test_the_printed_commands_run_and_train_the_recipe(project, cache_dir):
    commands = _blocks('bash')
    assert 'cd my_project\npython make_teacher.py\n' \
        'PYTHONPATH=. kdzoo train my_recipe.py\n' in commands
    made = _run([sys.executable, 'make_teacher.py'], project)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (project / 'teacher.pt').is_file()

    trained = _run(_kdzoo() + ['train', 'my_recipe.py', '--cfg-options']
                   + as_cli(tiny_options(cache_dir)), project,
                   PYTHONPATH='.')
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = project / 'work_dirs' / 'my_recipe'
    results = json.loads((run / 'results.json').read_text())
    assert 0 <= results['metrics']['cross_age/accuracy'] <= 100
    logs = sorted(run.glob('*/vis_data/scalars.json'))
    last = json.loads(logs[-1].read_text().splitlines()[-1])
    # the added loss trains beside the base recipe's angular term
    assert last['loss_sim'] > 0 and last['loss_ang'] > 0

    assert 'PYTHONPATH=. kdzoo list losses --import my_kd.losses\n' \
        in commands
    listed = _run(_kdzoo() + ['list', 'losses', '--import', 'my_kd.losses'],
                  project, PYTHONPATH='.')
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert 'SimilarityMatrixKD' in listed.stdout
    missing = _run(_kdzoo() + ['list', 'losses', '--import', 'my_kd.nope'],
                   project, PYTHONPATH='.')
    assert missing.returncode == 2
    assert 'my_kd.nope' in missing.stderr and 'PYTHONPATH' in missing.stderr
    assert 'Traceback' not in missing.stderr


def test_the_printed_contract_test_passes(project):
    ran = _run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                'tests/test_my_losses.py'], project, PYTHONPATH='.')
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert '1 passed' in ran.stdout


def test_the_loss_matches_a_loop_and_keeps_the_teacher_side_frozen(my_kd):
    loss = my_kd['losses'].SimilarityMatrixKD(loss_weight=3.0)
    torch.manual_seed(0)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    value = loss(s, t)

    def cosine(a, b):
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))
    sn, tn = s.detach().numpy(), t.detach().numpy()
    squared = [(cosine(sn[i], sn[j]) - cosine(tn[i], tn[j])) ** 2
               for i, j in itertools.product(range(5), repeat=2)]
    expected = 3.0 * sum(squared) / len(squared)
    # float64 inputs are computed in float64: rounding of 25 terms
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    value.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None
    assert loss(s, s.detach() * 2).item() == pytest.approx(0, abs=1e-6)
    loss.check_shapes({'s_emb': torch.Size([8, 64]),
                       't_emb': torch.Size([8, 128])})
    with pytest.raises(ValueError, match='same batch'):
        loss.check_shapes({'s_emb': torch.Size([8, 64]),
                           't_emb': torch.Size([4, 128])})


def test_the_backbone_stages_and_forward_from_stage(my_kd):
    net = my_kd['backbones'].TinyFaceNet(width=8, embedding_size=16).eval()
    x = torch.randn(3, 3, 32, 32)
    shapes = net.feature_shapes(batch_size=1)
    assert [shapes[p][1:] for p in net.stage_paths] == [
        (8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    outputs = {}
    hooks = [net.get_submodule(p).register_forward_hook(
        lambda m, i, o, k=k: outputs.__setitem__(k, o))
        for k, p in enumerate(net.stage_paths, 1)]
    with torch.no_grad():
        full = net(x)
    for h in hooks:
        h.remove()
    assert full.shape == (3, 16)
    for stage in range(1, 5):
        with torch.no_grad():
            rest = net.forward_from_stage(outputs[stage], stage)
        torch.testing.assert_close(rest, full, rtol=0, atol=0)


def test_the_teacher_adapter_serves_the_traced_network(my_kd, tmp_path):
    from kdzoo.registry import BACKBONES
    from kdzoo.utils import ConfigError
    TorchScriptTeacher = my_kd['teachers'].TorchScriptTeacher
    net = BACKBONES.build(TEACHER_BACKBONE).eval()
    file = str(tmp_path / 'teacher.pt')
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(file)
    teacher = TorchScriptTeacher(file=file, input_size=(32, 32))
    teacher.train()
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.describe()['embedding_size'] == 128
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), net(x))
    with pytest.raises(ConfigError, match='file not found'):
        TorchScriptTeacher(file=str(tmp_path / 'nope.pt'))


def test_the_readme_plugin_example_trains(tmp_path, cache_dir):
    """README's plugin example, its two blocks as printed, run from a
    folder that has kdzoo's recipes where the example expects them."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('## Writing a loss plugin'):]
    blocks = re.findall(r'```python\n(.*?)```', section, flags=re.S)[:2]
    assert [b.splitlines()[0] for b in blocks] == ['# my_kd/losses.py',
                                                    '# my_recipe.py']
    assert 'PYTHONPATH=. kdzoo train my_recipe.py' in section
    os.symlink(os.path.join(ROOT, 'recipes'), tmp_path / 'recipes')
    (tmp_path / 'my_kd').mkdir()
    (tmp_path / 'my_kd' / 'losses.py').write_text(blocks[0])
    (tmp_path / 'my_recipe.py').write_text(blocks[1])
    teacher = tmp_path / 'work_dirs' / 'quickstart' / 'teacher'
    teacher.mkdir(parents=True)
    random_teacher(teacher / 'backbone.pth')
    trained = _run(_kdzoo() + ['train', 'my_recipe.py', '--work-dir',
                               'work_dirs/my_recipe', '--cfg-options']
                   + as_cli(tiny_options(cache_dir, test=False)), tmp_path,
                   PYTHONPATH='.')
    assert trained.returncode == 0, trained.stderr[-3000:]
    logs = sorted((tmp_path / 'work_dirs' / 'my_recipe').glob(
        '*/vis_data/scalars.json'))
    last = json.loads(logs[-1].read_text().splitlines()[-1])
    # the plugin replaced the recipe's angular term: 1 - cos in [0, 2]
    assert 'loss_ang' in last and 0 <= last['loss_ang'] <= 2
