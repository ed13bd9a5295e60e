"""Backbones: arcface_torch weight layout, shapes, stage taps, errors."""
import json
import os
import math

import pytest
import torch
from conftest import shared_path

from kdzoo.backbones import (IResNet, MobileFaceNet, OnnxBackbone,
                             TimmBackbone)
from kdzoo.registry import BACKBONES, MODELS
from kdzoo.teachers.adapters import ARCFACE_TORCH_ARCHS
from kdzoo.utils import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures',
                       'arcface_torch_state_dicts.json')
# arcface_torch get_model() names -> kdzoo configs: the table the
# ArcFaceTorchTeacher adapter builds from, checked against the key fixture.
ARCFACE_CONFIGS = ARCFACE_TORCH_ARCHS
TINY_IRESNET = dict(width_mult=0.125, layers=(1, 1, 1, 1), embedding_size=16)
TINY_MBF = dict(width_mult=0.125, blocks=(1, 1, 1, 1), embedding_size=16)


@pytest.fixture(scope='module')
def arcface_state_dicts():
    with open(FIXTURE) as f:
        return json.load(f)


def stage_maps(model, x):
    """Forward ``x`` and return the outputs of ``model.stage_paths``."""
    modules = dict(model.named_modules())
    maps = []
    handles = [modules[p].register_forward_hook(
        lambda _m, _i, out: maps.append(out)) for p in model.stage_paths]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return maps


# ---------------------------------------------------- arcface_torch layout --
@pytest.mark.parametrize('name', list(ARCFACE_CONFIGS))
def test_state_dict_matches_arcface_torch(name, arcface_state_dicts):
    model = BACKBONES.build(ARCFACE_CONFIGS[name])
    expected = arcface_state_dicts[name]
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert got == expected
    # a backbone.pth with these keys/shapes loads strictly
    state = {k: (torch.zeros(s, dtype=torch.long)
                 if k.endswith('num_batches_tracked') else torch.randn(s))
             for k, s in expected}
    model.load_state_dict(state, strict=True)
    key = next(k for k, _ in expected if k.endswith('weight'))
    assert torch.equal(model.state_dict()[key], state[key])


def test_arcface_backbone_file_loads_via_torch_load(tmp_path,
                                                    arcface_state_dicts):
    state = {k: (torch.zeros(s, dtype=torch.long)
                 if k.endswith('num_batches_tracked') else torch.randn(s))
             for k, s in arcface_state_dicts['mbf']}
    path = tmp_path / 'backbone.pth'
    torch.save(state, path)
    model = MobileFaceNet()
    model.load_state_dict(torch.load(path, map_location='cpu',
                                     weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 512)


# ------------------------------------------------------------------ IResNet --
def test_iresnet_forward_and_stage_taps_at_112():
    model = IResNet(depth=18, embedding_size=128).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        maps = stage_maps(model, x)
        emb = model(x)
    assert emb.shape == (2, 128)
    assert [tuple(m.shape) for m in maps] == [
        (2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
    assert model.stage_paths == ('layer1', 'layer2', 'layer3', 'layer4')


@pytest.mark.parametrize('size', [(32, 32), (48, 64)])
def test_iresnet_tiny_shapes_and_strides(size):
    model = IResNet(input_size=size, **TINY_IRESNET)
    h, w = size
    maps = stage_maps(model, torch.randn(3, 3, h, w))
    assert [tuple(m.shape) for m in maps] == [
        (3, c, h // s, w // s) for c, s in zip((8, 16, 32, 64), (2, 4, 8, 16))]
    assert model(torch.randn(3, 3, h, w)).shape == (3, 16)
    assert model.fc.in_features == 64 * (h // 16) * (w // 16)


def test_iresnet_gradients_and_frozen_features_scale():
    model = IResNet(input_size=32, **TINY_IRESNET)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(16))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    model(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.features.weight.grad is None
    assert model.conv1.weight.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'features.weight' not in trainable and 'features.bias' in trainable


def test_iresnet_tiny_trains_and_stays_small():
    model = IResNet(input_size=32, **TINY_IRESNET).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=0.1)
    x = torch.randn(64, 3, 32, 32)
    # the BN-normalised embedding's mean square is ~1 whatever the weights:
    # fit directions instead, which training can change
    target = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        emb = torch.nn.functional.normalize(model(x), dim=1)
        loss = (1 - (emb * target).sum(1)).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_iresnet_width_mult_and_dropout():
    model = IResNet(depth=18, width_mult=0.5, input_size=32, dropout=0.2)
    assert model.conv1.out_channels == 32
    assert model.layer4[0].conv2.out_channels == 256
    assert model.dropout.p == 0.2
    tiny = IResNet(width_mult=0.01, layers=(1, 1, 1, 1), input_size=16)
    assert tiny.conv1.out_channels == 4  # floor of 4 channels


@pytest.mark.parametrize('kwargs, argument', [
    (dict(depth=19), 'depth'),
    (dict(depth=None), 'depth'),
    (dict(layers=(1, 1, 1)), 'layers'),
    (dict(layers=(1, 0, 1, 1)), 'layers'),
    (dict(layers='1111'), 'layers'),
    (dict(input_size=(100, 112)), 'input_size'),
    (dict(input_size=(112,)), 'input_size'),
    (dict(input_size=-16), 'input_size'),
    (dict(width_mult=0), 'width_mult'),
    (dict(embedding_size=0), 'embedding_size'),
    (dict(dropout=1.0), 'dropout'),
])
def test_iresnet_bad_arguments(kwargs, argument):
    with pytest.raises(ConfigError, match=argument):
        IResNet(**kwargs)


def test_iresnet_input_size_error_suggests_a_fix():
    with pytest.raises(ConfigError, match=r'divisible by 16.*\(96, 112\)'):
        IResNet(input_size=(100, 112))


def test_stage_path_lookup():
    model = IResNet(input_size=32, **TINY_IRESNET)
    assert model.stage_path(1) == 'layer1'
    assert model.stage_path(4) == 'layer4'
    for bad in (0, 5, '1'):
        with pytest.raises(ConfigError, match='stage'):
            model.stage_path(bad)


def test_built_through_registries():
    model = MODELS.build(dict(type='IResNet', input_size=32, **TINY_IRESNET))
    assert isinstance(model, IResNet)
    assert model.embedding_size == 16 and model.input_size == (32, 32)
    for name in ('IResNet', 'MobileFaceNet', 'TimmBackbone', 'OnnxBackbone'):
        assert BACKBONES.get(name) is not None
        doc = BACKBONES.get(name).__doc__.strip().splitlines()[0]
        assert doc.endswith('.') or doc.endswith(')'), doc


# ------------------------------------------------------------ MobileFaceNet --
def test_mobilefacenet_forward_and_stage_taps_at_112():
    model = MobileFaceNet(embedding_size=128).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        maps = stage_maps(model, x)
        assert model(x).shape == (2, 128)
    assert model.stage_paths == ('layers.1', 'layers.3', 'layers.5',
                                 'layers.7')
    assert [tuple(m.shape) for m in maps] == [
        (2, 128, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 256, 7, 7)]
    assert model.features.layers[0].layers[0].kernel_size == (7, 7)


@pytest.mark.parametrize('size', [(32, 32), (48, 64)])
def test_mobilefacenet_tiny_shapes(size):
    model = MobileFaceNet(input_size=size, **TINY_MBF)
    h, w = size
    x = torch.randn(3, 3, h, w, requires_grad=True)
    maps = stage_maps(model, x)
    assert [tuple(m.shape[2:]) for m in maps] == [
        (h // s, w // s) for s in (2, 4, 8, 16)]
    assert model.features.layers[0].layers[0].kernel_size == (h // 16,
                                                              w // 16)
    out = model(x)
    assert out.shape == (3, 16)
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_mobilefacenet_width_mult_scales_every_width():
    model = MobileFaceNet(width_mult=0.25, conv_sep_channels=512,
                          input_size=32)
    assert model.layers[0].layers[0].out_channels == 32      # 64*2/4
    assert model.layers[2].layers[0].layers[0].out_channels == 32   # 128/4
    assert model.layers[6].layers[0].layers[0].out_channels == 128  # 512/4
    assert model.conv_sep.layers[0].out_channels == 128
    large = MobileFaceNet(scale=4, blocks=(2, 1, 1, 1), width_mult=0.125,
                          input_size=32)
    assert large(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize('kwargs, argument', [
    (dict(blocks=(1, 4, 6)), 'blocks'),
    (dict(blocks=(1, 4, 0, 2)), 'blocks'),
    (dict(input_size=(112, 120)), 'input_size'),
    (dict(scale=0), 'scale'),
    (dict(width_mult=-1), 'width_mult'),
    (dict(conv_sep_channels=0), 'conv_sep_channels'),
])
def test_mobilefacenet_bad_arguments(kwargs, argument):
    with pytest.raises(ConfigError, match=argument):
        MobileFaceNet(**kwargs)


# ------------------------------------------------------------ TimmBackbone --
@pytest.fixture(scope='module')
def timm_resnet():
    return TimmBackbone('resnet18', embedding_size=32, input_size=64)


def test_timm_cnn_shapes_and_stages(timm_resnet):
    model = timm_resnet
    assert model.stage_paths == ('model.layer1', 'model.layer2',
                                 'model.layer3', 'model.layer4')
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    maps = stage_maps(model, x)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    out = model(x)
    assert out.shape == (2, 32)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert model.stage_path(3) == 'model.layer3'


def test_timm_pretrained_file_trunk_and_whole(tmp_path, timm_resnet):
    trunk = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in timm_resnet.model.state_dict().items()}
    trunk['fc.weight'] = torch.randn(1000, 512)  # classifier keys ignored
    trunk['fc.bias'] = torch.randn(1000)
    path = tmp_path / 'resnet18.pth'
    torch.save(trunk, path)
    model = TimmBackbone('resnet18', embedding_size=32, input_size=64,
                         pretrained_file=str(path))
    assert torch.equal(model.model.conv1.weight, trunk['conv1.weight'])

    whole = tmp_path / 'backbone.pth'
    torch.save(model.state_dict(), whole)
    again = TimmBackbone('resnet18', embedding_size=32, input_size=64,
                         pretrained_file=str(whole))
    assert torch.equal(again.neck[3].weight, model.neck[3].weight)

    bad = tmp_path / 'other.pth'
    torch.save({'conv1.weight': torch.randn(3, 3, 3, 3)}, bad)
    with pytest.raises(Exception, match='conv1.weight'):
        TimmBackbone('resnet18', input_size=64, pretrained_file=str(bad))


def test_timm_vit_tokens():
    model = TimmBackbone('test_vit', embedding_size=24, input_size=112)
    assert model.output_format == 'tokens'
    assert len(model.stage_paths) == 4
    assert model.stage_paths[-1] == 'model.blocks.5'
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 24)


@pytest.mark.parametrize('name', ['resnet19', 'resnet_18'])
def test_timm_unknown_model_suggests_names(name):
    with pytest.raises(ConfigError, match="resnet18"):
        TimmBackbone(name)


def test_timm_refuses_downloads_and_bad_stage_paths():
    with pytest.raises(ConfigError, match='pretrained_file'):
        TimmBackbone('resnet18', input_size=64, pretrained=True)
    with pytest.raises(ConfigError, match='model.layer4'):
        TimmBackbone('resnet18', input_size=64, stage_paths=['model.layer5'])


# ------------------------------------------------------------ OnnxBackbone --
def test_onnx_missing_file_names_path(tmp_path):
    path = str(tmp_path / 'nope.onnx')
    with pytest.raises(ConfigError, match='nope.onnx'):
        OnnxBackbone(path)


@pytest.fixture(scope='module')
def tiny_onnx_file(tmp_path_factory):
    net = IResNet(input_size=32, **TINY_IRESNET).eval()
    path = str(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), path, dynamo=False,
                      input_names=['input'], output_names=['embedding'],
                      dynamic_axes={'input': {0: 'N'}, 'embedding': {0: 'N'}})
    return net, path


def test_onnx_round_trip_of_a_kdzoo_backbone(tiny_onnx_file):
    net, path = tiny_onnx_file
    model = OnnxBackbone(path, input_size=32).eval()
    assert model.embedding_size == 16
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-4)
    names = model.module_names()
    assert names and all(n.startswith('model.') for n in names)
    shapes = model.feature_shapes()
    assert set(shapes) - {'model'} <= set(names) and shapes[names[0]]

    convs = [n for n, s in shapes.items() if len(s) == 4]
    bare = convs[-1][len('model.'):]
    picked = OnnxBackbone(path, input_size=32, stage_paths=[bare])
    assert picked.stage_paths == (convs[-1],)
    maps = stage_maps(picked, torch.randn(2, 3, 32, 32))
    assert maps[0].dim() == 4

    with pytest.raises(ConfigError, match='embedding_size'):
        OnnxBackbone(path, input_size=32, embedding_size=512)
    with pytest.raises(ConfigError, match='stage path'):
        OnnxBackbone(path, input_size=32, stage_paths=['no_such_node'])
    with pytest.raises(ConfigError, match=r'input_size'):
        OnnxBackbone(path, input_size=112)


def test_onnx_in_onnxruntime_matches_the_source_network(tiny_onnx_file):
    net, path = tiny_onnx_file
    model = OnnxBackbone(path, input_size=32, runtime='onnxruntime').eval()
    assert model.session is not None and not hasattr(model, 'model')
    assert list(model.parameters()) == [] and model.onnx_parameters > 0
    assert model.embedding_size == 16 and model.module_names() == ()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        got = model(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    # float32 sums in another order: ~1e-7 relative per term, a few
    # hundred terms per output; 1e-5 of the largest output is ~30x that
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # 'auto' picks onnxruntime without taps and onnx2torch with them
    assert OnnxBackbone(path, input_size=32, runtime='auto').session
    conv = [n for n in OnnxBackbone(path, input_size=32).module_names()
            if 'Conv' in n][-1]
    tapped = OnnxBackbone(path, input_size=32, runtime='auto',
                          stage_paths=[conv])
    assert tapped.session is None and tapped.stage_paths == (conv,)
    # a copy (mmengine deep-copies models, e.g. EMA) restarts its session
    import copy
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x), got)


def test_onnxruntime_refuses_taps_gradients_and_unknown_runtimes(
        tiny_onnx_file):
    _, path = tiny_onnx_file
    with pytest.raises(ConfigError, match=r"stage_paths.*runtime='torch'"):
        OnnxBackbone(path, input_size=32, runtime='onnxruntime',
                     stage_paths=['x'])
    with pytest.raises(ConfigError, match='runtime must be one of'):
        OnnxBackbone(path, input_size=32, runtime='ort')
    model = OnnxBackbone(path, input_size=32, runtime='onnxruntime')
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.raises(ConfigError, match='gives no gradient'):
        model(x)


def test_onnx_teacher_runs_in_onnxruntime_unless_tapped(tiny_onnx_file):
    from kdzoo.registry import TEACHERS
    net, path = tiny_onnx_file
    teacher = TEACHERS.build(dict(type='OnnxTeacher', file=path,
                                  input_size=(32, 32)))
    assert teacher.network.session is not None
    assert teacher.describe()['parameters'] == teacher.network.onnx_parameters
    x = torch.randn(3, 3, 32, 32)  # normalised as the student's batch
    with torch.no_grad():
        ref = net(x)
        got = teacher(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_onnx_sirius_matches_onnxruntime():
    ort = pytest.importorskip('onnxruntime')
    path = shared_path('teachers', 'mobilefacenet_sirius.onnx')
    model = BACKBONES.build(dict(type='OnnxBackbone', file=path)).eval()
    assert model.embedding_size == 192 and model.input_size == (112, 112)
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        ours = model(x).numpy()
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    ref = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert ours.shape == ref.shape == (4, 192)
    assert abs(ours - ref).max() < 1e-3
    # kdzoo evaluate / the eval recipe run it in onnxruntime: the same
    # session, so the same embeddings as onnxruntime called directly
    fast = BACKBONES.build(dict(type='OnnxBackbone', file=path,
                                runtime='onnxruntime'))
    with torch.no_grad():
        assert abs(fast(x).numpy() - ref).max() <= 1e-6 * abs(ref).max()
