"""AdaFace, MagFace and PartialFC heads: values against independent
references, EMA statistics, gradients, sharding, and a 2-process gloo run."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdzoo.heads import partial_fc as pfc_module
from kdzoo.heads.adaface import AdaFace
from kdzoo.heads.arcface import ArcFace
from kdzoo.heads.base import BaseMarginHead
from kdzoo.heads.cosface import CosFace
from kdzoo.heads.magface import MagFace
from kdzoo.heads.partial_fc import PartialFC
from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError

# the heads this file covers (ArcFace, CosFace, CurricularFace: test_heads.py)
HEADS_HERE = (AdaFace, MagFace, PartialFC)


def at(deg, r=1.0):
    """A 2-D vector at angle ``deg`` degrees with norm ``r``."""
    a = math.radians(deg)
    return [r * math.cos(a), r * math.sin(a)]


def head_2d(cls, centres_deg, **kw):
    head = cls(num_classes=len(centres_deg), embedding_size=2, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([at(d, 3.0) for d in centres_deg]))
    return head


# ------------------------------------------------- independent references
def ref_cos(emb, weight):
    emb, weight = emb.double(), weight.double()
    return (emb / emb.norm(dim=1, keepdim=True)) @ \
        (weight / weight.norm(dim=1, keepdim=True)).t()


def ref_adaface(emb, weight, labels, s, m, h, mu, sigma, eps):
    """Scalar loop with Python's math module."""
    cos = ref_cos(emb, weight).clamp(-1 + eps, 1 - eps).tolist()
    norms = emb.double().norm(dim=1).tolist()
    out = []
    for row, y, n in zip(cos, labels.tolist(), norms):
        n = min(max(n, 0.001), 100.0)
        z = min(max(h * (n - mu) / (sigma + eps), -1.0), 1.0)
        theta = min(max(math.acos(row[y]) - m * z, eps), math.pi - eps)
        logits = [s * c for c in row]
        logits[y] = s * (math.cos(theta) - (m + m * z))
        out.append(logits)
    return torch.tensor(out, dtype=torch.float64)


def ref_ema(norms, mu, sigma, alpha):
    """numpy: EMA with the unbiased (ddof=1) std of the clipped norms."""
    n = np.clip(np.asarray(norms, dtype=np.float64), 0.001, 100)
    return (alpha * n.mean() + (1 - alpha) * mu,
            alpha * n.std(ddof=1) + (1 - alpha) * sigma)


def ref_magface(emb, weight, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45,
                u_m=0.8, lambda_g=35.0, easy_margin=True):
    """Explicit angles, one row at a time; returns (logits, loss_mag)."""
    cos = ref_cos(emb, weight)
    out = s * cos.clone()
    gs = []
    for i, y in enumerate(labels.tolist()):
        a = emb[i].double().norm().clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        c = cos[i, y]
        theta = torch.acos(c)
        if easy_margin:
            t = torch.cos(theta + m) if c > 0 else c
        else:
            t = torch.cos(theta + m) if theta + m <= math.pi else \
                c - torch.sin(math.pi - m) * m
        out[i, y] = s * t
        gs.append(a / u_a ** 2 + 1 / a)
    return out, lambda_g * torch.stack(gs).mean()


def ref_margin_logits(emb, weight, labels, s, margin, m):
    """ArcFace (explicit angle, linear fallback past pi) or CosFace."""
    cos = ref_cos(emb, weight)
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        c = cos[i, y]
        if margin == 'cosface':
            out[i, y] = c - m
            continue
        theta = torch.acos(c)
        out[i, y] = torch.cos(theta + m) if theta + m <= math.pi else \
            c - math.sin(math.pi - m) * m
    return s * out


# ================================================================ AdaFace
def test_adaface_two_samples_by_hand():
    # Centres at 0 and 90 deg; s = 1, m = 0.4, h = 0.333, t_alpha = 0.5,
    # eps = 1e-3. a at 30 deg with norm 20 (label 0), b at 150 deg with
    # norm 40 (label 1, theta_b = 60 deg).
    #   batch mean 30, unbiased std sqrt((10^2 + 10^2) / 1) = 14.1421356
    #   mu = 0.5*30 + 0.5*20 = 25, sigma = 0.5*14.1421356 + 0.5*100
    #      = 57.0710678 (updated before use)
    #   z_a = 0.333*(20-25)/(57.0710678+0.001) = -0.0291736
    #     target_a = cos(pi/6 + 0.4*0.0291736) - (0.4 - 0.4*0.0291736)
    #              = cos(0.5352682) - 0.3883305 = 0.4718013
    #   z_b = 0.333*15/57.0720678 = 0.0875209
    #     target_b = cos(pi/3 - 0.0350084) - 0.4350084 = 0.0949972
    #   non-targets: a: cos 60 = 0.5; b: cos 150 = -0.8660254
    head = head_2d(AdaFace, [0, 90], s=1.0, m=0.4, h=0.333, t_alpha=0.5)
    head.train()
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    emb = torch.tensor([at(30, 20.0), at(150, 40.0)])
    out = head(emb, torch.tensor([0, 1]))
    assert head.batch_mean.item() == pytest.approx(25.0, abs=1e-5)
    assert head.batch_std.item() == pytest.approx(57.0710678, abs=1e-5)
    torch.testing.assert_close(
        out, torch.tensor([[0.4718013, 0.5], [-0.8660254, 0.0949972]]),
        rtol=0, atol=1e-5)
    # without labels: s*cos, no update
    torch.testing.assert_close(
        head(emb), torch.tensor([[0.8660254, 0.5], [-0.8660254, 0.5]]),
        rtol=0, atol=1e-5)
    assert head.batch_mean.item() == pytest.approx(25.0, abs=1e-5)
    # eval mode: no update, current statistics used
    head.eval()
    torch.testing.assert_close(head(emb, torch.tensor([0, 1])), out)
    assert head.batch_std.item() == pytest.approx(57.0710678, abs=1e-5)


def test_adaface_matches_loop_reference_over_steps():
    head = AdaFace(num_classes=7, embedding_size=5, t_alpha=0.3).train()
    mu, sigma = 20.0, 100.0
    for step in range(3):
        # norms from ~0 to beyond the 100 clip, so z hits both clips
        emb = torch.randn(12, 5) * torch.linspace(0.0005, 150, 12)[:, None]
        y = torch.randint(0, 7, (12,))
        mu, sigma = ref_ema(emb.double().norm(dim=1).numpy(), mu, sigma, 0.3)
        out = head(emb, y)
        assert head.batch_mean.item() == pytest.approx(mu, rel=1e-5)
        assert head.batch_std.item() == pytest.approx(sigma, rel=1e-5)
        ref = ref_adaface(emb, head.weight.detach(), y, 64.0, 0.4, 0.333,
                          mu, sigma, 1e-3)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)


def test_adaface_default_and_h_zero_is_cosface_like():
    head = AdaFace(num_classes=4, embedding_size=3)
    assert (head.s, head.m, head.h, head.t_alpha, head.eps) == \
        (64.0, 0.4, 0.333, 0.01, 1e-3)
    # h = 0: z = 0, g_angle = 0, g_add = m: CosFace with m
    head = AdaFace(num_classes=4, embedding_size=3, h=0.0).eval()
    emb, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    cos = ref_cos(emb, head.weight).clamp(-1 + 1e-3, 1 - 1e-3)
    ref = 64.0 * (cos - 0.4 * F.one_hot(y, 4))
    torch.testing.assert_close(head(emb, y).double(), ref, rtol=0,
                               atol=1e-4)


def test_adaface_single_sample_batch_keeps_std_finite():
    head = AdaFace(num_classes=3, embedding_size=4, t_alpha=0.5).train()
    emb = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # norm 5
    out = head(emb, torch.tensor([1]))
    assert torch.isfinite(out).all()
    assert head.batch_mean.item() == pytest.approx(12.5)
    assert head.batch_std.item() == 100.0  # undefined std: unchanged
    head(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert head.batch_mean.item() == pytest.approx(12.5)


def test_adaface_gradient_ignores_norm_and_state_dict():
    head = AdaFace(num_classes=6, embedding_size=8).train()
    emb = (torch.randn(10, 8) * 10).requires_grad_(True)
    y = torch.randint(0, 6, (10,))
    losses = head.loss(emb, y)
    assert set(losses) == {'loss_cls'}
    losses['loss_cls'].backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0
    # the norm is detached: the loss depends on the direction only, so the
    # gradient is orthogonal to each embedding
    radial = (emb.grad * emb.detach()).sum(1) / emb.detach().norm(dim=1)
    assert radial.abs().max() < 1e-5 * emb.grad.norm(dim=1).max()
    state = head.state_dict()
    assert {'batch_mean', 'batch_std'} <= set(state)
    other = AdaFace(num_classes=6, embedding_size=8)
    other.load_state_dict(state)
    assert other.batch_mean.item() == head.batch_mean.item() != 20.0


def test_adaface_extremes_are_finite():
    head = AdaFace(num_classes=4, embedding_size=8).train()
    w = head.weight.detach()
    emb = torch.stack([w[0] * 1e4, -w[1], torch.zeros(8), w[3] * 1e-6])
    emb.requires_grad_(True)
    loss = head.loss(emb, torch.arange(4))['loss_cls']
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


# ================================================================ MagFace
def test_magface_by_hand():
    # Centres at 0 and 90 deg; s = 1; defaults l_a=10, u_a=110, l_m=0.45,
    # u_m=0.8, lambda_g=35; slope (0.8-0.45)/100 = 0.0035. All label 0:
    #   a at 30 deg, norm 60: m = 0.0035*50 + 0.45 = 0.625,
    #     target cos(pi/6 + 0.625) = cos(1.1485988) = 0.4097660
    #   b at 120 deg, norm 5 -> a = 10, m = 0.45; cos 120 = -0.5 < 0:
    #     easy margin leaves -0.5
    #   c at 60 deg, norm 200 -> a = 110, m = 0.8:
    #     target cos(pi/3 + 0.8) = cos(1.8471976) = -0.2728952
    #   loss_mag = 35 * mean(60/110^2 + 1/60, 10/110^2 + 1/10,
    #                        110/110^2 + 1/110) = 1.6407254
    head = head_2d(MagFace, [0, 90], s=1.0)
    emb = torch.tensor([at(30, 60.0), at(120, 5.0), at(60, 200.0)])
    y = torch.tensor([0, 0, 0])
    out = head(emb, y)
    torch.testing.assert_close(
        out, torch.tensor([[0.4097660, 0.5], [-0.5, 0.8660254],
                           [-0.2728952, 0.8660254]]), rtol=0, atol=1e-5)
    losses = head.loss(emb, y)
    assert set(losses) == {'loss_cls', 'loss_mag'}
    assert losses['loss_mag'].item() == pytest.approx(1.6407254, abs=1e-5)
    assert losses['loss_cls'].item() == pytest.approx(
        F.cross_entropy(out, y).item(), abs=1e-6)
    torch.testing.assert_close(
        head(emb), torch.tensor([[0.8660254, 0.5], [-0.5, 0.8660254],
                                 [0.5, 0.8660254]]), rtol=0, atol=1e-5)


def test_magface_matches_reference_both_margin_modes():
    for easy in (True, False):
        head = MagFace(num_classes=6, embedding_size=4, easy_margin=easy)
        y = torch.randint(0, 6, (40,))
        emb = torch.randn(40, 4) * torch.linspace(1, 150, 40)[:, None]
        # some near-opposite their centre: the non-easy fallback branch
        emb[:10] = -head.weight.detach()[y[:10]] * 3000 + torch.randn(10, 4)
        ref, ref_mag = ref_magface(emb, head.weight.detach(), y,
                                   easy_margin=easy)
        out = head(emb, y)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)
        mag = head.loss(emb, y)['loss_mag']
        assert mag.item() == pytest.approx(ref_mag.item(), rel=1e-5)


def test_magface_regulariser_gradient_on_the_norm():
    # d/d emb of lambda_g*mean g(a) = lambda_g/B * (1/u_a^2 - 1/a^2) * e/|e|
    # inside [l_a, u_a]; zero outside (the clamp)
    head = MagFace(num_classes=3, embedding_size=4)
    emb = torch.randn(4, 4)
    emb = emb / emb.norm(dim=1, keepdim=True) * \
        torch.tensor([[5.0], [20.0], [80.0], [300.0]])
    emb.requires_grad_(True)
    head.loss(emb, torch.tensor([0, 1, 2, 0]))['loss_mag'].backward()
    a = emb.detach().norm(dim=1, keepdim=True)
    expected = 35.0 / 4 * (1 / 110.0 ** 2 - 1 / a ** 2) * emb.detach() / a
    expected[[0, 3]] = 0.0
    torch.testing.assert_close(emb.grad, expected, rtol=1e-4, atol=1e-7)
    assert head.weight.grad is None


def test_magface_gradients_flow():
    head = MagFace(num_classes=5, embedding_size=8)
    emb = (torch.randn(6, 8) * 30).requires_grad_(True)
    losses = head.loss(emb, torch.randint(0, 5, (6,)))
    (losses['loss_cls'] + losses['loss_mag']).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0
    # the CE alone reaches the norm through m(a) (not detached). Scaling
    # an embedding changes no cosine, only a: the radial component of the
    # CE gradient is dCE/da = dCE/dm * m'(a) (zero were a detached), here
    # checked against a central difference along the embedding in float64.
    # Each embedding lies halfway between its target centre and the next
    # class's: both cosines equal, so the margin leaves the target behind
    # (p_y < 1/2) and dCE/dm is O(s), not the rounding noise of a
    # saturated softmax (p_y = 1 - 1e-25 at cos_y = 1).
    head64 = MagFace(num_classes=5, embedding_size=8).double()
    y = torch.arange(6) % 5
    w = F.normalize(head64.weight.detach(), dim=1)
    direction = F.normalize(w[y] + w[(y + 1) % 5], dim=1)
    norms = torch.linspace(30.0, 90.0, 6, dtype=torch.float64)  # in [l_a, u_a]
    emb2 = (direction * norms[:, None]).requires_grad_(True)
    assert (head64.cosine(emb2.detach()).gather(1, y[:, None]) > 0).all()
    head64.loss(emb2, y)['loss_cls'].backward()
    radial = (emb2.grad * direction).sum(1)

    def loss_with_row_scaled(i, scale):
        e = emb2.detach().clone()
        e[i] *= scale
        with torch.no_grad():
            return head64.loss(e, y)['loss_cls'].item()
    delta = 1e-6
    for i in range(6):
        # float64 rounding: ~eps64 * CE / (delta * |e|) ~ 1e-10 << 3e-2
        fd = (loss_with_row_scaled(i, 1 + delta) -
              loss_with_row_scaled(i, 1 - delta)) / (2 * delta * norms[i])
        assert radial[i].item() == pytest.approx(fd.item(), rel=1e-6)
        assert abs(radial[i].item()) > 1e-2


# ============================================================== PartialFC
@pytest.mark.parametrize('margin,m,ref_cls', [('arcface', 0.5, ArcFace),
                                              ('cosface', 0.4, CosFace)])
def test_partial_fc_single_process_equals_margin_head(margin, m, ref_cls):
    head = PartialFC(num_classes=9, embedding_size=6, margin=margin, m=m)
    assert (head.rank, head.world_size, head.num_local) == (0, 1, 9)
    assert head.weight.shape == (9, 6)
    ref = ref_cls(num_classes=9, embedding_size=6, m=m)
    ref.load_state_dict(head.state_dict())
    emb = torch.randn(16, 6)
    emb[:4] = -head.weight.detach()[:4] * 5  # ArcFace fallback rows
    y = torch.cat([torch.arange(4), torch.randint(0, 9, (12,))])
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    loss = head.loss(e1, y)
    assert set(loss) == {'loss_cls'} and head.last_index is None
    loss = loss['loss_cls']
    ref_loss = ref.loss(e2, y)['loss_cls']
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    # and the explicit-angle reference
    ref2 = F.cross_entropy(
        ref_margin_logits(emb, head.weight.detach(), y, 64.0, margin, m), y)
    assert loss.item() == pytest.approx(ref2.item(), abs=1e-4)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad, rtol=1e-4,
                               atol=1e-6)
    # forward without / with labels: the local shard (all of it here)
    torch.testing.assert_close(head(emb), ref(emb))
    torch.testing.assert_close(head(emb, y), ref(emb, y))


def test_partial_fc_sampling_keeps_positives_and_matches_subset_ce():
    head = PartialFC(num_classes=50, embedding_size=8, sample_rate=0.2,
                     margin='arcface').double()
    assert head.num_sample == 10
    w = head.weight.detach()
    seen = []
    for y in (torch.tensor([3, 3, 17, 42, 0, 17]), torch.arange(0, 45, 3)):
        emb = torch.randn(len(y), 8, dtype=torch.float64, requires_grad=True)
        head.zero_grad()
        loss = head.loss(emb, y)['loss_cls']
        index = head.last_index
        positives = sorted(set(y.tolist()))
        assert index.tolist() == sorted(index.tolist())
        assert set(positives) <= set(index.tolist())
        assert len(index) == max(len(positives), 10)
        seen.append(index)
        # reference: CE over the sampled columns, labels remapped by hand
        cols = index.tolist()
        y_sub = torch.tensor([cols.index(c) for c in y.tolist()])
        e_ref = emb.detach().clone().requires_grad_(True)
        w_ref = w[index].clone().requires_grad_(True)
        ref = F.cross_entropy(
            ref_margin_logits(e_ref, w_ref, y_sub, 64.0, 'arcface', 0.5),
            y_sub)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(emb.grad, e_ref.grad)
        grad = head.weight.grad
        torch.testing.assert_close(grad[index], w_ref.grad)
        others = torch.ones(50, dtype=torch.bool)
        others[index] = False
        assert (grad[others] == 0).all()
    # 15 positives > 10 samples: exactly the positives
    assert seen[1].tolist() == list(range(0, 45, 3))
    # negatives are random: another draw differs
    head.loss(torch.randn(6, 8, dtype=torch.float64),
              torch.tensor([3, 3, 17, 42, 0, 17]))
    assert head.last_index.tolist() != seen[0].tolist()


@pytest.mark.parametrize('world,sizes,starts', [
    (4, [3, 3, 2, 2], [0, 3, 6, 8]), (3, [4, 3, 3], [0, 4, 7]),
    (10, [1] * 10, list(range(10)))])
def test_partial_fc_shard_layout(monkeypatch, world, sizes, starts):
    split = np.array_split(np.arange(10), world)
    assert [len(s) for s in split] == sizes
    assert [int(s[0]) for s in split] == starts
    for rank in range(world):
        monkeypatch.setattr(pfc_module, 'get_dist_info', lambda: (rank, world))
        head = PartialFC(num_classes=10, embedding_size=4, sample_rate=0.5)
        assert head.num_local == sizes[rank]
        assert head.class_start == starts[rank]
        assert head.weight.shape == (sizes[rank], 4)
        assert head.num_classes == 10
        assert head.num_sample == max(1, int(0.5 * sizes[rank]))


def test_partial_fc_validation(monkeypatch):
    with pytest.raises(ConfigError, match='sample_rate'):
        PartialFC(num_classes=5, embedding_size=4, sample_rate=0.0)
    with pytest.raises(ConfigError, match='sample_rate'):
        PartialFC(num_classes=5, embedding_size=4, sample_rate=1.5)
    with pytest.raises(ConfigError, match="margin.*'sphere'"):
        PartialFC(num_classes=5, embedding_size=4, margin='sphere')
    with pytest.raises(ConfigError, match='radians'):
        PartialFC(num_classes=5, embedding_size=4, m=3.5)
    PartialFC(num_classes=5, embedding_size=4, margin='cosface', m=3.5)
    with pytest.raises(ConfigError, match='num_classes'):
        PartialFC(num_classes=0, embedding_size=4)
    monkeypatch.setattr(pfc_module, 'get_dist_info', lambda: (0, 4))
    with pytest.raises(ConfigError, match=r'num_classes must be >= the '
                                          r'world size \(4\).*got 3'):
        PartialFC(num_classes=3, embedding_size=4)
    head = PartialFC(num_classes=8, embedding_size=4)
    monkeypatch.setattr(pfc_module, 'get_dist_info', lambda: (0, 1))
    with pytest.raises(RuntimeError, match='rank 0 of 4'):
        head.loss(torch.randn(2, 4), torch.tensor([0, 1]))
    # labels are checked against the global num_classes
    head = PartialFC(num_classes=8, embedding_size=4)
    with pytest.raises(ConfigError, match='num_classes=8'):
        head.loss(torch.randn(2, 4), torch.tensor([0, 8]))


def test_partial_fc_ddp_ignore_params():
    head = PartialFC(num_classes=5, embedding_size=4)
    names = dict(head.named_parameters())
    assert PartialFC.ddp_ignore_params == ('weight',)
    assert set(PartialFC.ddp_ignore_params) <= set(names)


def test_partial_fc_two_rank_gloo_equals_full_softmax(tmp_path):
    """2 gloo ranks, uneven shards (3 + 2 classes) and uneven batches
    (3 + 5 samples): loss, embedding and centre gradients equal a
    float64 single-process full softmax on the global batch; sampled
    centres match a subset softmax; AdaFace statistics are global."""
    script = textwrap.dedent('''
        import math, sys, torch, torch.distributed as dist
        import torch.nn.functional as F
        from kdzoo.heads.adaface import AdaFace
        from kdzoo.heads.partial_fc import PartialFC
        from kdzoo.utils import ConfigError
        rank, init = int(sys.argv[1]), sys.argv[2]
        dist.init_process_group('gloo', init_method=init, rank=rank,
                                world_size=2)

        def ref_logits(emb, w, y, s, margin, m):
            cos = F.normalize(emb, dim=1) @ F.normalize(w, dim=1).t()
            out = cos.clone()
            for i, c in enumerate(y.tolist()):
                x = cos[i, c]
                if margin == 'cosface':
                    out[i, c] = x - m
                    continue
                th = torch.acos(x)
                out[i, c] = torch.cos(th + m) if th + m <= math.pi else \\
                    x - math.sin(math.pi - m) * m
            return s * out

        def close(a, b, what):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), \\
                (what, rank, a, b)

        torch.manual_seed(0)
        C, D = 5, 4
        W = torch.randn(C, D, dtype=torch.float64)
        emb_all = torch.randn(8, D, dtype=torch.float64)
        emb_all[0] = -W[4] * 2 + 0.05  # fallback row (theta + m > pi)
        y_all = torch.tensor([4, 0, 3, 1, 2, 4, 0, 3])
        lo, hi = (0, 3) if rank == 0 else (3, 8)
        for margin, m in (('arcface', 0.5), ('cosface', 0.4)):
            head = PartialFC(C, D, margin=margin, m=m).double()
            n_loc, start = head.num_local, head.class_start
            assert (n_loc, start) == ((3, 0) if rank == 0 else (2, 3))
            with torch.no_grad():
                head.weight.copy_(W[start:start + n_loc])
            emb = emb_all[lo:hi].clone().requires_grad_(True)
            loss = head.loss(emb, y_all[lo:hi])['loss_cls']
            loss.backward()
            e = emb_all.clone().requires_grad_(True)
            w = W.clone().requires_grad_(True)
            ref = F.cross_entropy(ref_logits(e, w, y_all, 64.0, margin, m),
                                  y_all)
            ref.backward()
            close(loss, ref, 'loss')
            total = loss.detach().clone()
            dist.all_reduce(total)
            close(total, 2 * ref.detach(), 'summed loss')
            # x world size (DDP averaging compensation), see the docstring
            close(emb.grad / 2, e.grad[lo:hi], 'emb grad')
            close(head.weight.grad, w.grad[start:start + n_loc], 'w grad')
            # no labels: local batch against the local shard
            plain = head(emb_all[lo:hi])
            assert plain.shape == (hi - lo, n_loc)
            close(plain, 64.0 * F.normalize(emb_all[lo:hi], dim=1)
                  @ F.normalize(W[start:start + n_loc], dim=1).t(), 'plain')

        # sampling: 40 classes, 20 per rank, 10 sampled per rank
        torch.manual_seed(1)
        W = torch.randn(40, D, dtype=torch.float64)
        torch.manual_seed(2 + rank)  # ranks draw different negatives
        y_all = torch.tensor([0, 5, 5, 21, 39, 22, 7, 30])
        head = PartialFC(40, D, sample_rate=0.5).double()
        start = head.class_start
        with torch.no_grad():
            head.weight.copy_(W[start:start + 20])
        emb = emb_all[lo:hi].clone().requires_grad_(True)
        loss = head.loss(emb, y_all[lo:hi])['loss_cls']
        loss.backward()
        cols = head.last_index + start
        assert len(cols) == 10
        both = [torch.zeros(10, dtype=torch.long) for _ in range(2)]
        dist.all_gather(both, cols)
        cols = torch.cat(both)
        assert set(y_all.tolist()) <= set(cols.tolist())
        y_sub = torch.tensor([cols.tolist().index(c) for c in y_all.tolist()])
        e = emb_all.clone().requires_grad_(True)
        w = W[cols].clone().requires_grad_(True)
        ref = F.cross_entropy(ref_logits(e, w, y_sub, 64.0, 'arcface', 0.5),
                              y_sub)
        ref.backward()
        close(loss, ref, 'sampled loss')
        close(emb.grad / 2, e.grad[lo:hi], 'sampled emb grad')
        mine = slice(0, 10) if rank == 0 else slice(10, 20)
        close(head.weight.grad[head.last_index], w.grad[mine],
              'sampled w grad')
        assert head.weight.grad.abs().sum(1).gt(0).sum() <= 10

        try:
            PartialFC(1, D)
            raise AssertionError('num_classes < world size accepted')
        except ConfigError as err:
            assert 'num_classes' in str(err) and 'world size (2)' in str(err)

        # AdaFace: EMA of the global batch statistics (3 + 5 norms)
        ada = AdaFace(5, D, t_alpha=0.5).train()
        norms = torch.tensor([1., 2., 3., 10., 20., 30., 40., 50.])
        x = F.normalize(torch.randn(8, D), dim=1) * norms[:, None]
        ada(x[lo:hi], torch.zeros(hi - lo, dtype=torch.long))
        mu = 0.5 * norms.double().mean() + 10.0
        sd = 0.5 * norms.double().std() + 50.0
        assert abs(ada.batch_mean.item() - mu.item()) < 1e-4, ada.batch_mean
        assert abs(ada.batch_std.item() - sd.item()) < 1e-4, ada.batch_std
        dist.destroy_process_group()
        print('OK', rank)
    ''')
    path = tmp_path / 'pfc_gloo.py'
    path.write_text(script)
    init = 'file://' + str(tmp_path / 'rendezvous')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    procs = [subprocess.Popen([sys.executable, str(path), str(rank), init],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f'OK {rank}' in out


# ======================================================== shared behaviour
@pytest.mark.parametrize('cls', HEADS_HERE)
def test_low_precision_and_autocast_give_float32(cls):
    head = cls(num_classes=6, embedding_size=8).eval()
    emb = torch.randn(5, 8) * 20
    y = torch.randint(0, 6, (5,))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(emb.bfloat16(), y)
        loss = head.loss(emb.bfloat16(), y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for value in loss.values():
        assert value.dtype == torch.float32 and torch.isfinite(value)


@pytest.mark.parametrize('cls', HEADS_HERE)
def test_registry_and_base_contract(cls):
    head = HEADS.build(dict(type=cls.__name__, num_classes=11,
                            embedding_size=6))
    assert isinstance(head, cls) and isinstance(head, BaseMarginHead)
    assert head.weight.shape == (11, 6)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.5)
    doc = cls.__doc__.strip().splitlines()[0]
    assert doc.endswith('.') and len(doc) < 90
    emb, y = torch.randn(3, 6), torch.tensor([0, 5, 10])
    assert head(emb).shape == head(emb, y).shape == (3, 11)
    with pytest.raises(ValueError, match='embedding_size=6'):
        head(torch.randn(3, 5), y)
    with pytest.raises(ConfigError, match='num_classes=11'):
        head.loss(emb, torch.tensor([0, 1, 11]))


@pytest.mark.parametrize('cls,kw,name', [
    (AdaFace, dict(m=3.5), 'm'), (AdaFace, dict(m=-0.1), 'm'),
    (AdaFace, dict(h=-1.0), 'h'), (AdaFace, dict(t_alpha=1.5), 't_alpha'),
    (AdaFace, dict(eps=0.5), 'eps'), (AdaFace, dict(s=0), 's'),
    (MagFace, dict(l_a=0.0), 'l_a'), (MagFace, dict(u_a=5.0), 'u_a'),
    (MagFace, dict(l_m=0.9), 'u_m'), (MagFace, dict(u_m=4.0), 'u_m'),
    (MagFace, dict(lambda_g=-1.0), 'lambda_g'),
    (MagFace, dict(num_classes=0), 'num_classes'),
    (PartialFC, dict(embedding_size=0), 'embedding_size'),
    (PartialFC, dict(s=-1.0), 's')])
def test_bad_config(cls, kw, name):
    args = dict(num_classes=5, embedding_size=4)
    args.update(kw)
    with pytest.raises(ConfigError, match=rf'{cls.__name__}: {name}\b'):
        cls(**args)


def test_magface_loss_mag_logged_by_distiller():
    """FaceDistiller sums every key of head.loss(); loss_mag is logged."""
    from mmengine.optim import OptimWrapper
    from kdzoo.distillers import FaceDistiller
    from toy_models import toy_batch  # noqa: F401  (registers ToyNet)
    for head, keys in ((dict(type='MagFace'), {'loss_cls', 'loss_mag'}),
                       (dict(type='PartialFC', sample_rate=0.5),
                        {'loss_cls'})):
        head.update(num_classes=5, embedding_size=8)
        model = FaceDistiller(student=dict(
            backbone=dict(type='ToyNet', width=4, embedding_size=8),
            head=head))
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        log_vars = model.train_step(toy_batch(), optim)
        assert set(log_vars) == {'loss'} | keys
        assert log_vars['loss'].item() == pytest.approx(
            sum(log_vars[k].item() for k in keys), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize('cls', HEADS_HERE)
def test_cuda_fp16_autocast(cls):
    head = cls(num_classes=50, embedding_size=32).cuda().train()
    emb = (torch.randn(16, 32, device='cuda') * 20).requires_grad_(True)
    y = torch.randint(0, 50, (16,), device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        feats = F.linear(emb, torch.eye(32, device='cuda'))
        assert feats.dtype == torch.float16
        losses = head.loss(feats, y)
        out = head(feats, y)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    sum(losses.values()).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    if cls is AdaFace:
        assert head.batch_mean.device.type == 'cuda'
        assert head.batch_mean.item() != 20.0
