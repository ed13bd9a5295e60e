"""Teacher adapters for arcface_torch, TFace and timm weight files.

Each third-party layout is checked against a second, plain implementation
written here from the published source (insightface arcface_torch
``backbones/iresnet.py``; Tencent TFace ``torchkit/backbone/model_irse.py``;
timm itself): its ``state_dict`` is saved the way those projects save it,
loaded through the adapter, and both networks must give the same embedding
on a fixed input.
"""
import json
import math
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import kdzoo  # noqa: F401  (registers everything)
from kdzoo.backbones import TFaceIR
from kdzoo.registry import BACKBONES, TEACHERS
from kdzoo.teachers import base as teacher_base
from kdzoo.teachers.adapters import (ArcFaceTorchTeacher, TFaceTeacher,
                                     TimmTeacher)
from kdzoo.utils import CheckpointError, ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures',
                       'arcface_torch_state_dicts.json')
EMB = 16  # small embeddings keep the saved files small


# ------------------------------------------------------ reference networks --
class RefArcBlock(nn.Module):
    """arcface_torch IBasicBlock: BN, conv, BN, PReLU, conv(stride), BN."""

    def __init__(self, cin, c, stride, downsample):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-05)
        self.conv1 = nn.Conv2d(cin, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, eps=1e-05)
        self.prelu = nn.PReLU(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class RefArcIResNet(nn.Module):
    """arcface_torch IResNet at 112×112 (fc over 512·7·7)."""

    def __init__(self, layers, num_features):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (c, n) in enumerate(zip((64, 128, 256, 512), layers), 1):
            down = nn.Sequential(nn.Conv2d(cin, c, 1, 2, bias=False),
                                 nn.BatchNorm2d(c, eps=1e-05))
            blocks = [RefArcBlock(cin, c, 2, down)]
            blocks += [RefArcBlock(c, c, 1, None) for _ in range(n - 1)]
            setattr(self, f'layer{i}', nn.Sequential(*blocks))
            cin = c
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class RefSE(nn.Module):
    """TFace SEModule(channels, 16)."""

    def __init__(self, channels):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // 16, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // 16, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class RefTFaceUnit(nn.Module):
    """TFace BasicBlockIR / BottleneckIR (+ ``se_block`` for IR-SE)."""

    def __init__(self, cin, depth, stride, bottleneck, se):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(cin, depth, (1, 1), stride, bias=False),
                nn.BatchNorm2d(depth))
        if bottleneck:
            r = depth // 4
            self.res_layer = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, r, (1, 1), (1, 1), 0, bias=False),
                nn.BatchNorm2d(r), nn.PReLU(r),
                nn.Conv2d(r, r, (3, 3), (1, 1), 1, bias=False),
                nn.BatchNorm2d(r), nn.PReLU(r),
                nn.Conv2d(r, depth, (1, 1), stride, 0, bias=False),
                nn.BatchNorm2d(depth))
        else:
            self.res_layer = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, depth, (3, 3), (1, 1), 1, bias=False),
                nn.BatchNorm2d(depth), nn.PReLU(depth),
                nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
                nn.BatchNorm2d(depth))
        if se:
            self.res_layer.add_module('se_block', RefSE(depth))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class RefTFaceBackbone(nn.Module):
    """TFace Backbone(input_size, ...) with given unit counts; ``cells`` is
    the final map's side (7 at 112×112; TFace has only 7 and 14)."""

    def __init__(self, units, bottleneck=False, se=False, emb=512, cells=7):
        super().__init__()
        widths = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64),
            nn.PReLU(64))
        out = widths[-1]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(out), nn.Dropout(0.4), nn.Flatten(),
            nn.Linear(out * cells * cells, emb),
            nn.BatchNorm1d(emb, affine=False))
        modules, cin = [], 64
        for depth, n in zip(widths, units):
            for j in range(n):
                modules.append(RefTFaceUnit(cin, depth, 2 if j == 0 else 1,
                                            bottleneck, se))
                cin = depth
        self.body = nn.Sequential(*modules)

    def forward(self, x):
        return self.output_layer(self.body(self.input_layer(x)))


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BN statistics, so any mis-wiring shows."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith('running_var'):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.dim() > 1:
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith('weight'):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:  # biases, running means
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))


def pixels(n=2, size=112, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


class _Exploit:
    """Pickled payload that would create ``path`` if it were executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil_file(tmp_path):
    marker = str(tmp_path / 'exploit_ran')
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Exploit(marker)}, f,
                    protocol=2)
    return str(path), marker


# ---------------------------------------------------------------- fixtures --
@pytest.fixture(scope='module')
def arc_r18(tmp_path_factory):
    """An arcface_torch r18 ``backbone.pth`` (bare state dict) and its net."""
    torch.manual_seed(0)
    ref = randomize(RefArcIResNet((2, 2, 2, 2), EMB))
    path = tmp_path_factory.mktemp('arcface') / 'backbone.pth'
    torch.save(ref.state_dict(), path)
    return str(path), ref


# IR_18 at 112×112 (TFace's size); IR_SE_18 at 32×32 to save CPU time
TFACE_SIZES = {False: 112, True: 32}


@pytest.fixture(scope='module')
def tface_ir18(tmp_path_factory):
    """TFace IR_18 / IR_SE_18 backbone files and their reference nets."""
    torch.manual_seed(0)
    out = {}
    root = tmp_path_factory.mktemp('tface')
    for se in (False, True):
        ref = randomize(RefTFaceBackbone((2, 2, 2, 2), se=se, emb=EMB,
                                         cells=TFACE_SIZES[se] // 16),
                        seed=int(se))
        path = root / f'Backbone_IR{"_SE" if se else ""}_18_Epoch_1.pth'
        torch.save(ref.state_dict(), path)
        out[se] = (str(path), ref)
    return out


@pytest.fixture
def log_lines(monkeypatch):
    """Lines the teachers log through mmengine's print_log."""
    lines = []
    monkeypatch.setattr(teacher_base, 'print_log',
                        lambda msg, **kw: lines.append(msg))
    return lines


# ---------------------------------------------------------- arcface_torch --
def test_arcface_torch_r18_matches_reference(arc_r18, log_lines):
    path, ref = arc_r18
    teacher = TEACHERS.build(dict(type='ArcFaceTorchTeacher', arch='r18',
                                  checkpoint=path, embedding_size=EMB))
    img = pixels(n=1)
    # arcface_torch's own preprocessing: RGB, (x/255 - 0.5) / 0.5
    x = (img / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert_same(teacher(x), ref(x))
    # a student batch normalised as (x-127.5)/128 is converted to the
    # teacher's input before its network runs
    teacher.set_source_normalization(127.5, 128.0)
    assert_same(teacher.adapt_input((img - 127.5) / 128.0), x)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.stage_paths == ('layer1', 'layer2', 'layer3', 'layer4')
    assert len(log_lines) == 1 and log_lines[0] == teacher.summary()


def test_arcface_torch_describe(arc_r18, log_lines):
    path, ref = arc_r18
    teacher = ArcFaceTorchTeacher(arch='r18', checkpoint=path,
                                  embedding_size=EMB)
    n = sum(p.numel() for p in ref.parameters())
    assert teacher.describe() == dict(
        teacher='ArcFaceTorchTeacher r18', parameters=n,
        embedding_size=EMB, input_size=(112, 112), mean=[127.5] * 3,
        std=[127.5] * 3, source=path)
    assert teacher.summary() == (
        f'teacher ArcFaceTorchTeacher r18: {n / 1e6:.1f}M parameters, '
        f'embedding {EMB}, input 112×112 RGB (x-127.5)/127.5, from {path}')
    assert log_lines == [teacher.summary()]


def test_arcface_torch_mbf_loads_published_keys(tmp_path):
    with open(FIXTURE) as f:
        layout = json.load(f)['mbf']  # arcface_torch get_model('mbf') keys
    g = torch.Generator().manual_seed(3)
    state = OrderedDict(
        (k, torch.zeros(s, dtype=torch.long) if k.endswith('tracked')
         else torch.rand(s, generator=g) + 0.5) for k, s in layout)
    path = tmp_path / 'backbone.pth'
    torch.save(state, path)
    teacher = ArcFaceTorchTeacher('mbf', str(path))
    loaded = teacher.network.state_dict()
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert teacher.embedding_size == 512
    assert teacher.stage_paths == ('layers.1', 'layers.3', 'layers.5',
                                   'layers.7')


def test_arcface_torch_errors(arc_r18, tmp_path):
    path, ref = arc_r18
    with pytest.raises(ConfigError, match=r"arch 'r52' is not an arcface_"
                       r"torch backbone; use one of r18, r34, r50, r100, "
                       r"r200, mbf, mbf_large\. Did you mean: 'r50'"):
        ArcFaceTorchTeacher('r52', path)
    with pytest.raises(ConfigError, match='needs checkpoint='):
        ArcFaceTorchTeacher('r18', '')
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match=r"file not found: '.*nope"):
        ArcFaceTorchTeacher('r18', missing)
    # the file's fc is 16 wide; the default embedding_size is 512
    with pytest.raises(CheckpointError,
                       match=r'shape mismatch for fc.weight: file '
                             r'\(16, 25088\), model \(512, 25088\)'):
        ArcFaceTorchTeacher('r18', path)
    # an r18 file is not an r34
    with pytest.raises(CheckpointError,
                       match=r'missing keys \(\d+\): layer1.2.bn1.weight'):
        ArcFaceTorchTeacher('r34', path, embedding_size=EMB)


# ------------------------------------------------------------------- TFace --
@pytest.mark.parametrize('se', [False, True])
def test_tface_ir18_matches_reference(tface_ir18, se, log_lines):
    path, ref = tface_ir18[se]
    size = TFACE_SIZES[se]
    teacher = TEACHERS.build(dict(type='TFaceTeacher', depth=18, se=se,
                                  checkpoint=path, embedding_size=EMB,
                                  input_size=size))
    assert list(teacher.network.state_dict()) == list(ref.state_dict())
    # TFace: RGB, Normalize(0.5, 0.5)
    x = (pixels(n=1, size=size, seed=2) - 127.5) / 127.5
    mods = dict(teacher.network.named_modules())
    maps, ref_maps = [], []
    hooks = [mods[p].register_forward_hook(lambda m, i, o: maps.append(o))
             for p in teacher.stage_paths]
    hooks += [ref.body[k].register_forward_hook(
        lambda m, i, o: ref_maps.append(o)) for k in (1, 3, 5, 7)]
    with torch.no_grad():
        got = teacher(x)
        want = ref(x)
    for h in hooks:
        h.remove()
    assert_same(got, want)
    assert teacher.stage_paths == ('body.1', 'body.3', 'body.5', 'body.7')
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, size // s, size // s)
        for c, s in zip((64, 128, 256, 512), (2, 4, 8, 16))]
    for m, r in zip(maps, ref_maps):
        assert_same(m, r)
    name = 'IR_SE_18' if se else 'IR_18'
    assert teacher.describe()['teacher'] == f'TFaceTeacher {name}'
    assert teacher.describe()['std'] == [127.5] * 3
    assert log_lines == [teacher.summary()]


def test_tface_ir_se_50_keys_and_shapes_match_reference():
    # the Backbone_IR_SE_50 layout: keys, order and shapes
    ref = RefTFaceBackbone((3, 4, 14, 3), se=True)
    ours = TFaceIR(depth=50, se=True)
    want = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == want
    assert ours.stage_paths == ('body.2', 'body.6', 'body.20', 'body.23')
    # TFace calls its 100-layer net IR_101
    assert TFaceIR(depth=101, units=(1, 1, 1, 1), input_size=32).depth == 100


def test_tface_bottleneck_unit_matches_reference():
    # depth 152/200 use bottleneck units 256..2048 wide; one unit per stage
    # keeps this small while covering the layout and the projection shortcut
    ref = randomize(RefTFaceBackbone((1, 1, 1, 1), bottleneck=True, se=True,
                                     emb=EMB, cells=2))
    ours = TFaceIR(depth=152, se=True, units=(1, 1, 1, 1),
                   embedding_size=EMB, input_size=32)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        assert_same(ours(x), want)
        stage3 = ref.body[:3](ref.input_layer(x))
        assert_same(ours.forward_from_stage(stage3, 3), want)


def test_tface_errors(tface_ir18, tmp_path):
    path, ref = tface_ir18[False]
    state = ref.state_dict()
    state['body.0.res_layer.6.weight'] = state.pop(
        'body.0.res_layer.1.weight')
    renamed = tmp_path / 'renamed.pth'
    torch.save(state, renamed)
    with pytest.raises(CheckpointError) as e:
        TFaceTeacher(depth=18, checkpoint=str(renamed), embedding_size=EMB)
    msg = str(e.value)
    assert 'missing keys (1): body.0.res_layer.1.weight' in msg
    assert 'unexpected keys (1): body.0.res_layer.6.weight' in msg
    assert repr(str(renamed)) in msg
    # an IR file is not an IR-SE one: the SE weights are missing
    with pytest.raises(CheckpointError,
                       match=r'missing keys \(16\): body.0.res_layer.se_block'
                             r'.fc1.weight'):
        TFaceTeacher(depth=18, se=True, checkpoint=path, embedding_size=EMB)
    with pytest.raises(ConfigError, match=r'depth must be one of \[18, 34, '
                       r'50, 100, 152, 200\].*got 19'):
        TFaceTeacher(depth=19, checkpoint=path)
    with pytest.raises(ConfigError, match=r'input_size \(100, 100\) must be '
                       'divisible by 16'):
        TFaceTeacher(depth=18, checkpoint=path, input_size=100)
    with pytest.raises(CheckpointError, match='file not found'):
        TFaceTeacher(depth=18, checkpoint=str(tmp_path / 'missing.pth'))
    # DDP-saved files (module. prefix) load as well
    wrapped = tmp_path / 'ddp.pth'
    torch.save({'module.' + k: v for k, v in ref.state_dict().items()},
               wrapped)
    loaded = TFaceTeacher(depth=18, checkpoint=str(wrapped),
                          embedding_size=EMB).network.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(loaded[key], value), key


# -------------------------------------------------------------------- timm --
@pytest.fixture(scope='module')
def timm_ref(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    ref = randomize(timm.create_model('resnet10t', pretrained=False,
                                      num_classes=EMB))
    path = tmp_path_factory.mktemp('timm') / 'resnet10t.pth'
    torch.save(ref.state_dict(), path)
    return str(path), ref


IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def test_timm_round_trip(timm_ref, log_lines):
    path, ref = timm_ref
    teacher = TEACHERS.build(dict(type='TimmTeacher', model_name='resnet10t',
                                  checkpoint=path, input_size=32))
    d = teacher.describe()
    assert d['embedding_size'] == EMB  # from the file's fc
    assert d['input_size'] == (32, 32)
    assert d['mean'] == pytest.approx(IMAGENET_MEAN)
    assert d['std'] == pytest.approx(IMAGENET_STD)
    assert d['parameters'] == sum(p.numel() for p in ref.parameters())
    assert d['source'] == path
    assert teacher.summary().startswith(
        'teacher TimmTeacher resnet10t: ')
    assert teacher.summary().endswith(
        f'input 32×32 RGB (x-[123.7, 116.3, 103.5])/[58.4, 57.12, 57.38], '
        f'from {path}')
    assert log_lines == [teacher.summary()]
    assert teacher.stage_paths == ('layer1', 'layer2', 'layer3', 'layer4')
    img = pixels(size=32, seed=4)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (img - mean) / std
    with torch.no_grad():
        assert_same(teacher(x), ref(x))
        # num_classes=0: the pooled features; the file's fc is dropped
        pooled = TimmTeacher('resnet10t', path, num_classes=0,
                             input_size=32)
        assert pooled.embedding_size == 512
        assert_same(pooled(x), ref.forward_head(ref.forward_features(x),
                                                pre_logits=True))


def test_timm_wrapped_file_and_errors(timm_ref, tmp_path):
    path, ref = timm_ref
    wrapped = tmp_path / 'wrapped.pth'
    torch.save({'state_dict': {'module.' + k: v
                               for k, v in ref.state_dict().items()}},
               wrapped)
    loaded = TimmTeacher('resnet10t', str(wrapped),
                         input_size=32).network.state_dict()
    assert len(loaded) == len(ref.state_dict())
    for (key, value), mine in zip(ref.state_dict().items(), loaded.values()):
        assert torch.equal(mine, value), key
    with pytest.raises(CheckpointError, match=r"TimmTeacher checkpoint file "
                       r"not found: '.*absent\.pth'"):
        TimmTeacher('resnet10t', str(tmp_path / 'absent.pth'))
    with pytest.raises(ConfigError, match=r"unknown timm model_name "
                       r"'resnet10x'\. Did you mean: .*'resnet10t'"):
        TimmTeacher('resnet10x', path)
    with pytest.raises(ConfigError, match='pretrained=True would download'):
        TimmTeacher('resnet10t', path, pretrained=True)
    with pytest.raises(CheckpointError,
                       match=r'shape mismatch for fc.weight: file '
                             r'\(16, 512\), model \(3, 512\)'):
        TimmTeacher('resnet10t', path, num_classes=3, input_size=32)
    with pytest.raises(CheckpointError, match=r'missing keys \(30\): '
                       r'layer1\.0\.conv3\.weight'):
        TimmTeacher('resnet14t', path, input_size=32)
    with pytest.raises(ConfigError, match='num_classes must be None'):
        TimmTeacher('resnet10t', path, num_classes=-1)


# --------------------------------------------------- unsafe files refused --
@pytest.mark.parametrize('cfg', [
    dict(type='ArcFaceTorchTeacher', arch='r18'),
    dict(type='TFaceTeacher', depth=18),
    dict(type='TimmTeacher', model_name='resnet10t'),
    dict(type='CheckpointTeacher', backbone=dict(type='IResNet', depth=18)),
])
def test_pickled_code_is_refused(cfg, tmp_path):
    path, marker = evil_file(tmp_path)
    with pytest.raises(CheckpointError,
                       match=r'holds pickled Python objects.*'
                             r'weights_only=True'):
        TEACHERS.build(dict(cfg, checkpoint=path))
    assert not os.path.exists(marker)


def test_checkpoint_teacher_describes_itself(tmp_path, log_lines):
    cfg = dict(type='IResNet', width_mult=0.125, layers=(1, 1, 1, 1),
               embedding_size=8, input_size=32)
    backbone = BACKBONES.build(cfg)
    path = tmp_path / 'backbone.pth'
    torch.save(backbone.state_dict(), path)
    teacher = TEACHERS.build(dict(type='CheckpointTeacher', backbone=cfg,
                                  checkpoint=str(path)))
    assert teacher.describe() == dict(
        teacher='CheckpointTeacher IResNet',
        parameters=sum(p.numel() for p in backbone.parameters()),
        embedding_size=8, input_size=(32, 32), mean=[127.5] * 3,
        std=[128.0] * 3, source=str(path))
    assert log_lines == [teacher.summary()]
    assert teacher.summary().startswith('teacher CheckpointTeacher IResNet: ')
    assert ' input 32×32 RGB (x-127.5)/128, from ' in teacher.summary()
