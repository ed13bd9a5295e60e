"""Teacher-output cache: keys, storage, serving, and equality with running
the teacher online."""
import glob
import os
import re
import time

import numpy as np
import pytest
import torch
from torch import nn

from kdzoo.engine import load_recipe
from kdzoo.engine.runner import KdzooRunner
from kdzoo.registry import MODELS
from kdzoo.teachers.base import FrozenTeacher
from kdzoo.teachers.cache import (TeacherOutputCache, build_teacher_cache,
                                  dataset_checksum, teacher_checksum)
from kdzoo.utils import ConfigError, DataError
from tiny_runs import STUDENT_BACKBONE, random_teacher, tiny_options

RECIPE = 'recipes/kd/angular_kd_synthface_age.py'


class _Linear(nn.Module):
    def __init__(self, d_in=12, d_out=4):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.embedding_size = d_out

    def forward(self, x):
        return self.fc(x.flatten(1))


def _toy_teacher(seed=0):
    torch.manual_seed(seed)
    return FrozenTeacher(_Linear(), input_size=None)


def _batches(x, batch_size):
    n = len(x)
    for s in range(0, n, batch_size):
        chunk = x[s:s + batch_size]
        valid = len(chunk)
        pad = chunk[-1:].expand(batch_size - valid, *chunk.shape[1:])
        yield torch.cat([chunk, pad]), valid


# ------------------------------------------------------------ storage
def test_build_stores_image_and_mirror_in_dataset_order(tmp_path):
    teacher = _toy_teacher()
    x = torch.randn(7, 3, 2, 2)
    cache = build_teacher_cache(teacher, _batches(x, 3), 7,
                                str(tmp_path / 't.npy'), info={'a': 1})
    assert cache.array.shape == (7, 2, 4)
    # independent values: the linear map applied sample by sample
    w, b = teacher.network.fc.weight, teacher.network.fc.bias
    for i in range(7):
        plain = x[i].flatten() @ w.T + b
        mirror = torch.flip(x[i], dims=[2]).flatten() @ w.T + b
        assert torch.allclose(torch.from_numpy(cache.array[i, 0].copy()),
                              plain, atol=1e-6)
        assert torch.allclose(torch.from_numpy(cache.array[i, 1].copy()),
                              mirror, atol=1e-6)
    got = cache.lookup(torch.tensor([6, 0, 6]), torch.tensor([1, 0, 0]))
    assert torch.equal(got[0], torch.from_numpy(cache.array[6, 1].copy()))
    assert torch.equal(got[1], torch.from_numpy(cache.array[0, 0].copy()))
    assert torch.equal(got[2], torch.from_numpy(cache.array[6, 0].copy()))
    assert os.path.isfile(tmp_path / 't.json')


def test_float16_storage_halves_the_file(tmp_path):
    teacher = _toy_teacher()
    x = torch.randn(8, 3, 2, 2)
    c32 = build_teacher_cache(teacher, _batches(x, 4), 8,
                              str(tmp_path / 'a.npy'))
    c16 = build_teacher_cache(teacher, _batches(x, 4), 8,
                              str(tmp_path / 'b.npy'), dtype='float16')
    assert c16.array.dtype == np.float16
    assert np.allclose(c16.array, c32.array, atol=1e-2)
    with pytest.raises(ConfigError, match='dtype'):
        build_teacher_cache(teacher, _batches(x, 4), 8,
                            str(tmp_path / 'c.npy'), dtype='int8')


def test_failed_build_leaves_no_file(tmp_path):
    teacher = _toy_teacher()

    def broken():
        yield torch.randn(2, 3, 2, 2), 2
        raise RuntimeError('decode failed')

    with pytest.raises(RuntimeError, match='decode failed'):
        build_teacher_cache(teacher, broken(), 4, str(tmp_path / 'x.npy'))
    assert os.listdir(tmp_path) == []
    # a teacher giving NaN is refused, nothing written
    teacher.network.fc.bias.data.fill_(float('nan'))
    with pytest.raises(DataError, match='non-finite'):
        build_teacher_cache(teacher, _batches(torch.randn(2, 3, 2, 2), 2), 2,
                            str(tmp_path / 'y.npy'))
    assert os.listdir(tmp_path) == []
    # fewer samples than declared
    with pytest.raises(DataError, match='expected 5'):
        build_teacher_cache(_toy_teacher(),
                            _batches(torch.randn(2, 3, 2, 2), 2), 5,
                            str(tmp_path / 'z.npy'))
    assert os.listdir(tmp_path) == []


def test_lookup_errors(tmp_path):
    cache = build_teacher_cache(_toy_teacher(),
                                _batches(torch.randn(3, 3, 2, 2), 3), 3,
                                str(tmp_path / 't.npy'))
    with pytest.raises(DataError, match='index 3 out of range.*3 samples'):
        cache.lookup(torch.tensor([0, 3]), torch.tensor([0, 0]))
    with pytest.raises(DataError, match='flip flags'):
        cache.lookup(torch.tensor([0]), torch.tensor([2]))
    np.save(tmp_path / 'bad.npy', np.zeros((3, 4)))
    with pytest.raises(DataError, match=r'shape \(3, 4\).*\(N, 2, D\)'):
        TeacherOutputCache(str(tmp_path / 'bad.npy'))


# ------------------------------------------------------------ keys
def test_teacher_checksum_tracks_weights_and_normalisation():
    a, b = _toy_teacher(0), _toy_teacher(0)
    assert teacher_checksum(a) == teacher_checksum(b)
    assert teacher_checksum(a) != teacher_checksum(_toy_teacher(1))
    b.set_source_normalization(0.0, 255.0)  # the student's input changed
    assert teacher_checksum(a) != teacher_checksum(b)
    c = FrozenTeacher(a.network, mean=127.5, std=127.5)
    assert teacher_checksum(a) != teacher_checksum(c)


def test_teacher_checksum_of_onnx_teachers_in_onnxruntime(tmp_path):
    """An onnxruntime network has no state dict: two ONNX files with other
    weights must still give other cache keys (the file's SHA-256)."""
    from kdzoo.registry import BACKBONES, TEACHERS
    net = BACKBONES.build(dict(type='IResNet', width_mult=0.25,
                               layers=(1, 1, 1, 1), embedding_size=8,
                               input_size=(32, 32))).eval()
    paths = []
    for i in range(2):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * i)
        paths.append(str(tmp_path / f'{i}.onnx'))
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), paths[-1],
                          dynamo=False)

    def teacher(path, runtime='onnxruntime'):
        return TEACHERS.build(dict(type='OnnxTeacher', file=path,
                                   input_size=(32, 32), runtime=runtime))

    a, b = teacher(paths[0]), teacher(paths[1])
    assert a.state_dict() == {} == b.state_dict()
    assert teacher_checksum(a) != teacher_checksum(b)
    assert teacher_checksum(a) == teacher_checksum(teacher(paths[0]))
    # the runtimes' outputs differ in the last float bits: separate caches
    assert teacher_checksum(a) != teacher_checksum(teacher(paths[0],
                                                           'torch'))


def test_dataset_checksum_tracks_pixels_and_order():
    imgs = [np.full((3, 2, 2), i, np.uint8) for i in range(3)]
    key, n = dataset_checksum(imgs)
    assert n == 3
    assert dataset_checksum(list(imgs))[0] == key
    assert dataset_checksum(imgs[::-1])[0] != key
    changed = [im.copy() for im in imgs]
    changed[1][0, 0, 0] = 99
    assert dataset_checksum(changed)[0] != key


# ------------------------------------------------------------ distiller
def _distiller(cache_cfg, stage_tap=False):
    inputs = dict(s_emb=dict(tap='student.embedding', connector='proj'),
                  t_emb='teacher.embedding')
    losses = dict(loss_ang=dict(type='AngularDistillationLoss',
                                inputs=inputs))
    if stage_tap:
        losses['loss_at'] = dict(type='ATLoss', inputs=dict(
            s_feat='student.stage4', t_feat='teacher.stage4'))
    return MODELS.build(dict(
        type='FaceDistiller',
        student=dict(backbone=STUDENT_BACKBONE),
        teachers=dict(teacher=dict(
            type='CheckpointTeacher', checkpoint=_TEACHER_FILE[0],
            backbone=dict(type='IResNet', width_mult=0.25,
                          layers=(1, 2, 2, 1), embedding_size=128,
                          input_size=(32, 32)))),
        connectors=dict(proj=dict(type='LinearProjector', out_features=128)),
        distill_losses=losses, teacher_cache=cache_cfg))


_TEACHER_FILE = []


@pytest.fixture(scope='module', autouse=True)
def _teacher_file(tmp_path_factory):
    _TEACHER_FILE[:] = [random_teacher(
        tmp_path_factory.mktemp('teacher') / 'backbone.pth')]


def test_distiller_validates_the_cache_config():
    with pytest.raises(ConfigError, match="'teachr' is not a teacher.*"
                       "Did you mean: 'teacher'"):
        _distiller(dict(teachers=['teachr']))
    # a cached teacher's tapped map is cached with it
    model = _distiller(dict(teachers=['teacher']), stage_tap=True)
    assert [t.text for t in model.teacher_outputs.cached_taps['teacher']] \
        == ['teacher.stage4']
    with pytest.raises(ConfigError, match=r"no cache given for its tapped "
                       r"feature maps \['teacher.stage4'\]"):
        model.set_teacher_cache('teacher', object())
    with pytest.raises(ConfigError, match='unknown keys'):
        _distiller(dict(teachers=['teacher'], size=3))
    with pytest.raises(ConfigError, match='dtype'):
        _distiller(dict(teachers=['teacher'], dtype='bf16'))
    with pytest.raises(ConfigError, match='list of teacher names'):
        _distiller(dict(teachers='teacher'))
    assert _distiller(dict(teachers='all')).teacher_cache_cfg[
        'teachers'] == ['teacher']


def test_unprepared_cache_is_a_clear_error():
    model = _distiller(dict(teachers=['teacher']))
    data = dict(label=torch.zeros(2, dtype=torch.long),
                index=torch.arange(2), flip=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match='was not prepared.*'
                       'TeacherCacheHook'):
        model.loss(torch.zeros(2, 3, 32, 32), data)


# ------------------------------------------------------------ end to end
_STAGE_LOSS = {'model.distill_losses.loss_at': dict(
    type='ATLoss', loss_weight=100.0,
    inputs=dict(s_feat='student.stage4', t_feat='teacher_fr.stage4'))}


def _runner(tmp_path, cache_dir, cached, name, stage_tap=False):
    options = tiny_options(cache_dir, epochs=1, test=False, **{
        'model.teachers.teacher_fr.checkpoint': _TEACHER_FILE[0]})
    if stage_tap:  # a loss on a feature map inside the teacher
        options.update(_STAGE_LOSS)
    if cached:
        options['model.teacher_cache'] = dict(
            teachers=['teacher_fr'], cache_dir=str(tmp_path / 'tcache'))
    cfg = load_recipe(RECIPE, options, str(tmp_path / name))
    return cfg, KdzooRunner.from_cfg(cfg)


def test_cached_embeddings_equal_the_online_teacher(tmp_path, cache_dir):
    cfg, runner = _runner(tmp_path, cache_dir, True, 'served')
    assert any(h['type'] == 'TeacherCacheHook' for h in cfg.custom_hooks)
    hook = next(h for h in runner.hooks
                if type(h).__name__ == 'TeacherCacheHook')
    hook.before_train(runner)
    model = runner.model
    files = glob.glob(str(tmp_path / 'tcache' / 'teacher_fr_*.npy'))
    assert len(files) == 1
    teacher = model.teachers['teacher_fr']
    flips = set()
    for batch in runner.train_dataloader:  # shuffled, randomly flipped
        data = model.data_preprocessor(batch, True)
        samples = data['data_samples']
        flips.update(samples['flip'].tolist())
        with torch.no_grad():
            online = teacher(data['inputs'])
        served = model.teacher_outputs.embedding(
            'teacher_fr', data['inputs'], samples, use_cache=True)
        assert torch.equal(served, online)  # exact, not approximately
    assert flips == {0, 1}
    # a second run finds the same file instead of rebuilding it
    mtime = os.path.getmtime(files[0])
    _, runner2 = _runner(tmp_path, cache_dir, True, 'served2')
    next(h for h in runner2.hooks
         if type(h).__name__ == 'TeacherCacheHook').before_train(runner2)
    assert os.path.getmtime(files[0]) == mtime
    assert glob.glob(str(tmp_path / 'tcache' / '*.npy')) == files


def test_runs_side_by_side_build_the_cache_once(tmp_path, cache_dir,
                                                monkeypatch):
    """Two runs that need the same cache at the same time (compare --jobs):
    one builds it, the other waits on the lock and reads the same file."""
    import threading
    import kdzoo.engine.teacher_cache_hook as hook_module
    builds = []
    real_build = hook_module.build_teacher_caches

    def counted_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other run to reach the lock
        return real_build(*args, **kwargs)

    monkeypatch.setattr(hook_module, 'build_teacher_caches', counted_build)
    runners = [_runner(tmp_path, cache_dir, True, f'side{i}')[1]
               for i in range(2)]
    errors = []

    def prepare(runner):
        try:
            next(h for h in runner.hooks if type(h).__name__ ==
                 'TeacherCacheHook').before_train(runner)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(builds) == 1
    paths = {r.model.teacher_outputs._caches['teacher_fr'].path
             for r in runners}
    assert len(paths) == 1


def test_exclusive_lock_makes_the_second_holder_wait(tmp_path):
    import threading
    from kdzoo.utils.fileio import exclusive_lock
    lock = str(tmp_path / 'sub' / 'x.lock')  # its folder is created
    entered = threading.Event()

    def second():
        with exclusive_lock(lock):
            entered.set()

    with exclusive_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3)  # blocked while the first holds it
    assert entered.wait(30)
    thread.join(30)


def test_cached_feature_maps_equal_the_online_teacher(tmp_path, cache_dir):
    _, runner = _runner(tmp_path, cache_dir, True, 'maps', stage_tap=True)
    next(h for h in runner.hooks
         if type(h).__name__ == 'TeacherCacheHook').before_train(runner)
    model = runner.model
    files = sorted(os.path.basename(f) for f in
                   glob.glob(str(tmp_path / 'tcache' / '*.npy')))
    # the embedding and the tapped module's output, one file each
    assert len(files) == 2 and files[0].startswith('teacher_fr.layer4_')
    teacher = model.teachers['teacher_fr']
    for batch in runner.train_dataloader:
        data = model.data_preprocessor(batch, True)
        served = model.teacher_outputs.outputs(
            ['teacher_fr'], data['inputs'], data['data_samples'])
        model.recorder.clear()
        with torch.no_grad(), model.recorder.recording():
            online = teacher(data['inputs'])
        assert torch.equal(served['teacher_fr.embedding'], online)
        assert torch.equal(served['teacher_fr.stage4'],
                           model.recorder.get('teacher_fr.stage4'))
        model.recorder.clear()
    # a second run reuses both files
    mtimes = {f: os.path.getmtime(tmp_path / 'tcache' / f) for f in files}
    _, runner2 = _runner(tmp_path, cache_dir, True, 'maps2', stage_tap=True)
    next(h for h in runner2.hooks
         if type(h).__name__ == 'TeacherCacheHook').before_train(runner2)
    assert {f: os.path.getmtime(tmp_path / 'tcache' / f)
            for f in files} == mtimes


def test_tapped_map_file_names_are_plain_and_distinct():
    from kdzoo.engine.teacher_cache_hook import _tap_file_stem
    assert _tap_file_stem('t', 'model.layer4', False) == 't.model.layer4'
    assert _tap_file_stem('t', 'model.layer4', True) == 't.model.layer4.input'
    # ONNX node names hold '/': no sub-folders, and no clash with the
    # name they are flattened to
    slashed = _tap_file_stem('t', 'model.Net/Conv2d_4/Add', False)
    assert re.fullmatch(r't\.model\.Net_Conv2d_4_Add-[0-9a-f]{8}', slashed)
    assert slashed != _tap_file_stem('t', 'model.Net_Conv2d_4_Add', False)
    assert slashed != _tap_file_stem('t', 'model.Net/Conv2d_4/Add', True)


@pytest.mark.parametrize('stage_tap', [False, True],
                         ids=['embedding', 'feature_map'])
def test_cached_training_equals_online_training(tmp_path, cache_dir,
                                                stage_tap):
    """Same seed, same data: the student trained from the cache ends with
    exactly the weights of the student trained with the teacher online
    (with a feature-map term too: its teacher maps come from the cache)."""
    weights = {}
    for cached in (False, True):
        _, runner = _runner(tmp_path, cache_dir, cached, f'run{cached}',
                            stage_tap)
        runner.train()
        weights[cached] = {k: v.clone() for k, v in
                           runner.model.student.state_dict().items()}
    assert weights[True].keys() == weights[False].keys()
    for key in weights[True]:
        assert torch.equal(weights[True][key], weights[False][key]), key


def test_cache_refuses_augmenting_pipelines(tmp_path, cache_dir):
    from kdzoo.engine.teacher_cache_hook import _check_dataset
    _, runner = _runner(tmp_path, cache_dir, True, 'aug')
    dataset = runner.train_dataloader.dataset
    _check_dataset(dataset)  # flip + pack: fine

    class RandomCrop:
        pass

    dataset.pipeline.transforms.insert(0, RandomCrop())
    with pytest.raises(ConfigError, match=r"\['RandomCrop'\].*allows only"):
        _check_dataset(dataset)


def test_file_datasets_are_keyed_by_file_content_without_decoding(
        tmp_path, monkeypatch):
    """ImageFolderFaces and RecordIODataset: same bytes -> same key with no
    image decoded, also after the files get new mtimes or move; other
    bytes (even with the old mtime put back), another decode size ->
    another key; an unchanged dataset is not read again."""
    import shutil

    from PIL import Image

    from kdzoo.datasets import fingerprint, image_folder, recordio
    from kdzoo.datasets.pack import pack_image_folder
    from kdzoo.engine.teacher_cache_hook import dataset_identity
    from kdzoo.registry import DATASETS
    monkeypatch.setenv('KDZOO_CACHE', str(tmp_path / 'cache'))
    rng = np.random.default_rng(0)
    root = tmp_path / 'faces'
    for i in range(3):
        (root / f'id{i}').mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                            ).save(root / f'id{i}' / f'{j}.png')
    pack_image_folder(str(root), str(tmp_path / 'train.rec'),
                      str(tmp_path / 'train.idx'))

    def folder(data_root=root, **kw):
        return DATASETS.build(dict(type='ImageFolderFaces',
                                   data_root=str(data_root), **kw))

    def rec(**kw):
        return DATASETS.build(dict(type='RecordIODataset',
                                   path_imgrec=str(tmp_path / 'train.rec'),
                                   **kw))

    def no_decode(*args, **kwargs):
        raise AssertionError('an image was decoded')

    def no_read(path):
        raise AssertionError(f'{path} was read again')

    keys = {}
    for build in (folder, rec):
        with monkeypatch.context() as m:
            for module in (image_folder, recordio):
                m.setattr(module, 'decode_image', no_decode)
            key, count = dataset_identity(build(), None)
            assert count == 6 and key.startswith('fingerprint:')
            m.setattr(fingerprint, '_file_digest', no_read)
            assert dataset_identity(build(), None)[0] == key
        assert dataset_identity(build(image_size=4), None)[0] != key
        keys[build] = key
    # the same bytes with new mtimes, or copied elsewhere: the same key
    for path in root.glob('*/*.png'):
        os.utime(path, ns=(1, 1))
    assert dataset_identity(folder(), None)[0] == keys[folder]
    copy = shutil.copytree(root, tmp_path / 'moved' / 'faces',
                           copy_function=shutil.copyfile)
    assert dataset_identity(folder(copy), None)[0] == keys[folder]
    # one image rewritten with other pixels: another key
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'id1' / '0.png')
    assert dataset_identity(folder(), None)[0] != keys[folder]
    # the .rec touched: same key; one byte changed (same size, and its
    # modification time put back as `cp -p` does): another
    path = tmp_path / 'train.rec'
    os.utime(path, ns=(1, 1))
    assert dataset_identity(rec(), None)[0] == keys[rec]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))
    assert dataset_identity(rec(), None)[0] != keys[rec]


def test_synthface_key_follows_generation_parameters(cache_dir):
    from kdzoo.engine.teacher_cache_hook import dataset_identity
    from kdzoo.registry import DATASETS

    def synth(**kw):
        return DATASETS.build(dict(type='SynthFaceAge', num_identities=3,
                                   images_per_identity=2, image_size=16,
                                   cache_dir=cache_dir, **kw))
    key = dataset_identity(synth(), None)[0]
    assert dataset_identity(synth(), None)[0] == key
    assert dataset_identity(synth(seed=1), None)[0] != key
