"""Margin heads: values against independent references, gradients, dtypes."""
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import kdzoo  # noqa: F401  (registers everything)
from kdzoo.heads import ArcFace, BaseMarginHead, CosFace, CurricularFace
from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError

HEAD_TYPES = (ArcFace, CosFace, CurricularFace)


def at(deg, r=1.0):
    """A 2-D vector at angle ``deg`` degrees with norm ``r``."""
    a = math.radians(deg)
    return [r * math.cos(a), r * math.sin(a)]


def head_2d(cls, centres_deg, centre_norm=3.0, **kw):
    """A head with 2-D centres at the given angles (norm irrelevant)."""
    head = cls(num_classes=len(centres_deg), embedding_size=2, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([at(d, centre_norm)
                                        for d in centres_deg]))
    return head


# ------------------------------------------------- independent references
def ref_cos(emb, weight):
    emb, weight = emb.double(), weight.double()
    return (emb / emb.norm(dim=1, keepdim=True)) @ \
        (weight / weight.norm(dim=1, keepdim=True)).t()


def ref_arcface(emb, weight, labels, s, m):
    """Explicit angles: theta = acos(cos), then cos(theta + m); where
    theta + m > pi, the linear fallback cos(theta) - sin(pi - m) * m."""
    cos = ref_cos(emb, weight)
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        theta = torch.acos(cos[i, y])
        if theta + m <= math.pi:
            out[i, y] = torch.cos(theta + m)
        else:
            out[i, y] = cos[i, y] - math.sin(math.pi - m) * m
    return s * out


def ref_curricular(emb, weight, labels, s, m, t):
    """Loop version: for each row, hard negatives (cos_j > cos(theta_y + m))
    become cos_j * (t + cos_j); the target gets the ArcFace margin."""
    cos = ref_cos(emb, weight)
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        theta = torch.acos(cos[i, y])
        ctm = torch.cos(theta + m)
        for j in range(cos.shape[1]):
            if j != y and cos[i, j] > ctm:
                out[i, j] = cos[i, j] * (t + cos[i, j])
        out[i, y] = ctm if theta + m <= math.pi else \
            cos[i, y] - math.sin(math.pi - m) * m
    return s * out


# ------------------------------------------------------------- values
def test_arcface_tiny_2class_by_hand():
    # Centres at 0 deg and 90 deg; the embedding at 30 deg (norm 2, so the
    # normalisation matters), label 0, s = 64, m = 0.5:
    #   cos th0 = cos 30deg = 0.8660254, cos th1 = cos 60deg = 0.5
    #   target = cos(pi/6 + 0.5) = cos(1.0235988) = 0.5202960 -> 33.298945
    #   other  = 64 * 0.5 = 32
    head = head_2d(ArcFace, [0, 90])
    emb = torch.tensor([at(30, 2.0)])
    y = torch.tensor([0])
    torch.testing.assert_close(head(emb, y),
                               torch.tensor([[33.298945, 32.0]]),
                               rtol=0, atol=1e-4)
    # without labels: plain s*cos
    torch.testing.assert_close(head(emb),
                               torch.tensor([[64 * 0.8660254, 32.0]]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(head.cosine(emb),
                               torch.tensor([[0.8660254, 0.5]]),
                               rtol=0, atol=1e-6)


def test_arcface_fallback_by_hand():
    # Embedding at 170 deg from its centre (label 0): theta + m =
    # 2.9670597 + 0.5 = 3.467 > pi, so cos th0 = cos 170deg = -0.9848078 <=
    # cos(pi - 0.5) = -0.8775826 and the target uses the fallback:
    #   cos th - sin(pi - 0.5) * 0.5 = -0.9848078 - 0.4794255 * 0.5
    #                                = -1.2245205 -> 64 * that = -78.369313
    # (cos(theta + m) itself would be -0.9475015: *larger* than at 170 deg,
    # which is why the fallback exists.) Non-target: 64 * cos 80deg.
    head = head_2d(ArcFace, [0, 90])
    out = head(torch.tensor([at(170)]), torch.tensor([0]))
    torch.testing.assert_close(
        out, torch.tensor([[-78.369313, 64 * math.cos(math.radians(80))]]),
        rtol=0, atol=1e-4)


def test_arcface_matches_explicit_angle_reference():
    head = ArcFace(num_classes=7, embedding_size=4)
    y = torch.randint(0, 7, (64,))
    emb = torch.randn(64, 4)
    emb[:16] = -head.weight.detach()[y[:16]] + 0.002 * torch.randn(16, 4)
    ref = ref_arcface(emb, head.weight, y, 64.0, 0.5)
    # both branches occur in this draw
    theta = torch.acos(ref_cos(emb, head.weight).gather(1, y[:, None]))
    assert (theta + 0.5 > math.pi).any() and (theta + 0.5 <= math.pi).any()
    torch.testing.assert_close(head(emb, y).double(), ref, rtol=0, atol=1e-4)


def test_arcface_gradient_is_differentiable_form_not_straight_through():
    # In float64, d logit_y / d cos_y must equal the derivative of the
    # explicit-angle reference: s * sin(theta + m) / sin(theta), not s.
    head = ArcFace(num_classes=3, embedding_size=2, m=0.5).double()
    cos_y = torch.tensor([0.3, -0.5, -0.95], dtype=torch.float64,
                         requires_grad=True)
    cos = torch.zeros(3, 3, dtype=torch.float64)
    cos = cos.scatter(1, torch.arange(3)[:, None], cos_y[:, None])
    out = head.margin_cosine(cos, torch.arange(3)).diagonal()
    (grad,) = torch.autograd.grad(out.sum(), cos_y)
    theta = torch.acos(cos_y.detach())
    expected = torch.sin(theta + 0.5) / torch.sin(theta)
    # the last one is in the fallback region: slope 1
    expected[2] = 1.0
    torch.testing.assert_close(grad, expected)
    assert not torch.allclose(grad[:2], torch.ones(2, dtype=torch.float64))


def test_arcface_easy_margin():
    head = head_2d(ArcFace, [0, 90], easy_margin=True)
    out = head(torch.tensor([at(30), at(120)]), torch.tensor([0, 0]))
    assert out[0, 0].item() == pytest.approx(33.298945, abs=1e-4)
    # cos 120deg < 0: no margin, no fallback
    assert out[1, 0].item() == pytest.approx(64 * -0.5, abs=1e-4)


def test_cosface_by_hand_and_reference():
    # cos 30deg - 0.35 = 0.8660254 - 0.35 = 0.5160254 -> 64 * = 33.025626
    head = head_2d(CosFace, [0, 90])
    out = head(torch.tensor([at(30, 5.0)]), torch.tensor([0]))
    torch.testing.assert_close(out, torch.tensor([[33.025626, 32.0]]),
                               rtol=0, atol=1e-4)
    head = CosFace(num_classes=6, embedding_size=4, s=30.0, m=0.4)
    emb, y = torch.randn(16, 4), torch.randint(0, 6, (16,))
    ref = 30.0 * (ref_cos(emb, head.weight) - 0.4 * F.one_hot(y, 6))
    torch.testing.assert_close(head(emb, y).double(), ref, rtol=0, atol=1e-4)


def test_curricularface_two_steps_by_hand():
    # Centres at 0, 60, 90 deg; s = 1, m = 0.5, momentum = 0.1.
    # Step 1 batch: a at 30 deg (label 0), b at 150 deg (label 2).
    #   cos_y: a 0.8660254, b cos 60deg = 0.5; mean r1 = 0.6830127
    #   t1 = 0.1 * 0.6830127 + 0.9 * 0 = 0.06830127 (updated before use)
    #   a: target cos(30deg + 0.5) = 0.5202960; j=1 (60deg, cos 0.8660254)
    #      > 0.5202960 is hard -> 0.8660254 * (0.06830127 + 0.8660254)
    #      = 0.8091506; j=2 (cos 0.5 < 0.5202960) stays 0.5
    #   b: target cos(60deg + 0.5) = 0.0235966; j=0 (-0.8660254) and j=1
    #      (cos 90deg = 0) are easy, unchanged
    # Step 2 batch: a alone. r2 = 0.8660254,
    #   t2 = 0.1 * 0.8660254 + 0.9 * 0.06830127 = 0.14807368
    #   a: j=1 -> 0.8660254 * (0.14807368 + 0.8660254) = 0.8782356
    head = head_2d(CurricularFace, [0, 60, 90], s=1.0, m=0.5, momentum=0.1)
    head.train()
    assert head.t.item() == 0.0
    a, b = at(30, 2.0), at(150, 0.5)
    out1 = head(torch.tensor([a, b]), torch.tensor([0, 2]))
    assert head.t.item() == pytest.approx(0.06830127, abs=1e-6)
    torch.testing.assert_close(
        out1, torch.tensor([[0.5202960, 0.8091506, 0.5],
                            [-0.8660254, 0.0, 0.0235966]]),
        rtol=0, atol=1e-5)
    out2 = head(torch.tensor([a]), torch.tensor([0]))
    assert head.t.item() == pytest.approx(0.14807368, abs=1e-6)
    torch.testing.assert_close(out2,
                               torch.tensor([[0.5202960, 0.8782356, 0.5]]),
                               rtol=0, atol=1e-5)

    # eval mode: no update, but the current t is used
    head.eval()
    out3 = head(torch.tensor([a]), torch.tensor([0]))
    assert head.t.item() == pytest.approx(0.14807368, abs=1e-6)
    torch.testing.assert_close(out3, out2)
    # training mode without labels: plain s*cos, no update
    head.train()
    torch.testing.assert_close(
        head(torch.tensor([a])),
        torch.tensor([[0.8660254, 0.8660254, 0.5]]), rtol=0, atol=1e-6)
    assert head.t.item() == pytest.approx(0.14807368, abs=1e-6)


def test_curricularface_matches_loop_reference_and_default_momentum():
    head = CurricularFace(num_classes=9, embedding_size=3)
    assert head.momentum == 0.01 and head.t.item() == 0.0
    emb, y = torch.randn(32, 3), torch.randint(0, 9, (32,))
    out = head(emb, y)
    cos = ref_cos(emb, head.weight)
    r = cos.gather(1, y[:, None]).mean().item()
    assert head.t.item() == pytest.approx(0.01 * r, abs=1e-6)
    ref = ref_curricular(emb, head.weight, y, 64.0, 0.5, head.t.item())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)


def test_curricularface_t_in_state_dict():
    head = CurricularFace(num_classes=4, embedding_size=3, momentum=0.5)
    assert 't' in head.state_dict()
    head(torch.randn(8, 3), torch.randint(0, 4, (8,)))
    state = head.state_dict()
    other = CurricularFace(num_classes=4, embedding_size=3)
    assert other.t.item() == 0.0
    other.load_state_dict(state)
    assert other.t.item() == head.t.item() != 0.0


def test_curricularface_ddp_uses_global_mean(tmp_path):
    """Two gloo ranks with different batches end up with the same t,
    momentum * (mean over the union of both batches)."""
    script = textwrap.dedent('''
        import os, sys, torch, torch.distributed as dist
        from kdzoo.heads import CurricularFace
        rank = int(sys.argv[1])
        dist.init_process_group('gloo', rank=rank, world_size=2)
        torch.manual_seed(0)
        head = CurricularFace(num_classes=5, embedding_size=3, momentum=0.5)
        emb = torch.randn(7, 3)
        y = torch.randint(0, 5, (7,))
        n = 3 if rank == 0 else 7  # different batch sizes on the ranks
        cos = head.cosine(emb).gather(1, y[:, None])
        head(emb[:n] if rank == 0 else emb, y[:n] if rank == 0 else y)
        if rank == 1:
            # global mean over 3 + 7 samples, computed locally
            glob = (cos[:3].sum() + cos.sum()) / 10
            assert abs(head.t.item() - 0.5 * glob.item()) < 1e-6, \\
                (head.t.item(), 0.5 * glob.item())
        out = [torch.zeros(1), torch.zeros(1)]
        dist.all_gather(out, head.t.clone())
        assert out[0].item() == out[1].item()
        dist.destroy_process_group()
        print('OK', rank)
    ''')
    path = tmp_path / 'ddp_t.py'
    path.write_text(script)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
               OMP_NUM_THREADS='1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    procs = [subprocess.Popen([sys.executable, str(path), str(rank)],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f'OK {rank}' in out


# ---------------------------------------------------------- gradients
@pytest.mark.parametrize('cls', HEAD_TYPES)
def test_gradients_flow_and_are_finite(cls):
    head = cls(num_classes=10, embedding_size=16)
    emb = torch.randn(8, 16, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    losses = head.loss(emb, y)
    assert set(losses) == {'loss_cls'} and losses['loss_cls'].dim() == 0
    losses['loss_cls'].backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('cls', HEAD_TYPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_no_nan_at_cos_plus_minus_one(cls, dtype):
    head = cls(num_classes=4, embedding_size=8).to(dtype)
    head.train()
    y = torch.tensor([0, 1, 2, 3])
    w = head.weight.detach()
    # exactly on its centre (cos = 1), opposite it (cos = -1), and scaled
    emb = torch.stack([w[0], -w[1], 5 * w[2], -0.1 * w[3]]).clone()
    emb.requires_grad_(True)
    logits = head(emb, y)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(head(emb)).all()
    loss = head.loss(emb, y)['loss_cls']
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all()
    cos = head.cosine(emb.detach())
    assert cos.max() < 1 and cos.min() > -1


def test_zero_embedding_is_finite():
    head = ArcFace(num_classes=3, embedding_size=4)
    emb = torch.zeros(2, 4, requires_grad=True)
    head.loss(emb, torch.tensor([0, 1]))['loss_cls'].backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize('cls', (ArcFace, CurricularFace))
def test_gradcheck_float64(cls):
    head = cls(num_classes=5, embedding_size=4).double().eval()
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    assert torch.autograd.gradcheck(lambda e: head(e, y), (emb,))


# -------------------------------------------------------------- dtypes
@pytest.mark.parametrize('cls', HEAD_TYPES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(cls, dtype):
    head = cls(num_classes=20, embedding_size=32).eval()
    emb = torch.randn(8, 32)
    y = torch.randint(0, 20, (8,))
    ref = head(emb.to(dtype).float(), y)
    out = head(emb.to(dtype), y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # and close to the fp32 result on the unrounded embedding
    tol = 64 * (4e-3 if dtype == torch.float16 else 3e-2)
    torch.testing.assert_close(out, head(emb, y), rtol=0, atol=tol)
    # the whole head cast to low precision still computes in float32
    low = cls(num_classes=20, embedding_size=32).eval()
    low.load_state_dict(head.state_dict())
    low = low.to(dtype)
    out_low = low(emb.to(dtype), y)
    assert out_low.dtype == torch.float32 and torch.isfinite(out_low).all()
    torch.testing.assert_close(out_low, head(emb, y), rtol=0, atol=tol)


@pytest.mark.parametrize('cls', HEAD_TYPES)
def test_cpu_bf16_autocast_matches_fp32(cls):
    head = cls(num_classes=20, embedding_size=32).eval()
    emb = torch.randn(8, 32, requires_grad=True)
    y = torch.randint(0, 20, (8,))
    ref = head(emb, y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(emb, y)
        loss = head.loss(emb, y)['loss_cls']
        plain = head(emb)
    assert out.dtype == plain.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(plain, head(emb), rtol=0, atol=1e-4)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize('cls', HEAD_TYPES)
def test_cuda_fp16_autocast(cls):
    head = cls(num_classes=100, embedding_size=64).cuda().train()
    emb = torch.randn(32, 64, device='cuda', requires_grad=True)
    y = torch.randint(0, 100, (32,), device='cuda')
    ref = cls(num_classes=100, embedding_size=64).cuda().eval()
    ref.load_state_dict(head.state_dict())
    with torch.autocast('cuda', dtype=torch.float16):
        feats = torch.nn.functional.linear(emb, torch.eye(64, device='cuda'))
        assert feats.dtype == torch.float16
        loss = head.loss(feats, y)['loss_cls']
        out = ref(feats, y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    torch.testing.assert_close(out, ref(emb.detach(), y), rtol=0, atol=0.3)


# -------------------------------------------------------------- errors
@pytest.mark.parametrize('cls', HEAD_TYPES)
def test_bad_labels(cls):
    head = cls(num_classes=10, embedding_size=4)
    emb = torch.randn(3, 4)
    with pytest.raises(ConfigError, match=r'num_classes=10'):
        head(emb, torch.tensor([0, 1, 10]))
    with pytest.raises(ConfigError, match=r'\[0, 10\)'):
        head.loss(emb, torch.tensor([-1, 1, 2]))
    with pytest.raises(ValueError, match=r'shape \(3,\)'):
        head(emb, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r'shape \(3,\)'):
        head(emb, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='integer'):
        head(emb, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match='embedding_size=4'):
        head(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    # int32 labels are fine
    assert head(emb, torch.tensor([0, 1, 9], dtype=torch.int32)).shape == \
        (3, 10)


@pytest.mark.parametrize('kw', [
    dict(num_classes=0), dict(num_classes=-3), dict(num_classes=2.5),
    dict(embedding_size=0), dict(s=0.0), dict(m=-0.1),
    dict(m=float('nan')), dict(eps=0.0)])
@pytest.mark.parametrize('cls', HEAD_TYPES)
def test_bad_config(cls, kw):
    args = dict(num_classes=5, embedding_size=4)
    args.update(kw)
    with pytest.raises(ConfigError, match=next(iter(kw))):
        cls(**args)


def test_angle_margin_and_momentum_ranges():
    with pytest.raises(ConfigError, match='radians'):
        ArcFace(num_classes=3, embedding_size=2, m=3.5)
    with pytest.raises(ConfigError, match='momentum'):
        CurricularFace(num_classes=3, embedding_size=2, momentum=1.5)


# ------------------------------------------------------ registry, docs
def test_registry_build_and_layout():
    for name in ('ArcFace', 'CosFace', 'CurricularFace'):
        head = HEADS.build(dict(type=name, num_classes=11, embedding_size=6))
        assert isinstance(head, BaseMarginHead)
        assert head.weight.shape == (11, 6)
        assert head.weight.std().item() == pytest.approx(0.01, rel=0.5)
        doc = type(head).__doc__.strip().splitlines()[0]
        assert doc.endswith('.') and len(doc) < 90
    assert ArcFace(3, 2).s == 64.0 and ArcFace(3, 2).m == 0.5
    assert CosFace(3, 2).m == 0.35 and CurricularFace(3, 2).m == 0.5
