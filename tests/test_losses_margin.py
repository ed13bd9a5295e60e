"""MarginDistillationLoss and AdaDistillLoss: values against loop
references, centre updates, gradients, validation, registry."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdzoo.heads.arcface import ArcFace
from kdzoo.losses.margin import AdaDistillLoss, MarginDistillationLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import CheckpointError, ConfigError


class NotATensor:
    """A custom class: pickling it into a weights file must be refused."""

    def __init__(self):
        self.payload = 'code'


def write_head(tmp_path, weight, key='weight', name='head.pth', **extra):
    path = tmp_path / name
    torch.save({key: weight, **extra}, str(path))
    return str(path)


# ------------------------------------------------ independent references
def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def ce(logits, y):
    mx = max(logits)
    lse = mx + math.log(sum(math.exp(z - mx) for z in logits))
    return lse - logits[y]


def ref_margin_distillation(s_emb, t_emb, W, labels, s, m_max, m_min):
    """Plain-python loop version of the MarginDistillation loss; W is C×D."""
    S = [unit(r) for r in s_emb.tolist()]
    T = [unit(r) for r in t_emb.tolist()]
    Wn = [unit(r) for r in W.tolist()]
    ys = labels.tolist()
    d = [dot(T[i], Wn[y]) for i, y in enumerate(ys)]
    d_max = max(d)
    if d_max > 0:
        m = [(m_max - m_min) / d_max * di + m_min for di in d]
    else:
        m = [m_min] * len(d)
    total = 0.0
    for i, y in enumerate(ys):
        logits = [s * dot(S[i], w) for w in Wn]
        logits[y] = s * math.cos(math.acos(dot(S[i], Wn[y])) + m[i])
        total += ce(logits, y)
    return total / len(ys), m


def ref_ada_update(centers, s_emb, t_emb, labels, alpha):
    """Sequential (batch-order) EMA of the centres; returns (C×D, alphas)."""
    W = [list(r) for r in centers.tolist()]
    S = [unit(r) for r in s_emb.tolist()]
    T = [unit(r) for r in t_emb.tolist()]
    alphas = []
    for i, y in enumerate(labels.tolist()):
        a = max(-1.0, min(1.0, dot(S[i], T[i])))
        if alpha == 'weighted':
            lam = min(max(dot(unit(W[y]), T[i]), 1e-6), 1.0)
            a = a * lam
        a = min(max(a, 1e-6), 1.0)
        W[y] = [a * w + (1 - a) * t for w, t in zip(W[y], T[i])]
        alphas.append(a)
    return torch.tensor(W, dtype=torch.float64), alphas


def ref_ada_loss(W, s_emb, labels, s, m, margin):
    Wn = [unit(r) for r in W.tolist()]
    S = [unit(r) for r in s_emb.tolist()]
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        logits = [s * dot(S[i], w) for w in Wn]
        c = dot(S[i], Wn[y])
        if margin == 'arcface':
            logits[y] = s * math.cos(math.acos(c) + m)
        else:
            logits[y] = s * (c - m)
        total += ce(logits, y)
    return total / len(labels)


# ================================================= MarginDistillationLoss
@pytest.fixture
def tiny():
    """C=5, D=4, B=3 with a teacher that is close to its centres."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 3])
    t_emb = W[labels] * 2.0 + 0.4 * torch.randn(3, 4, generator=g)
    s_emb = torch.randn(3, 4, generator=g)
    return W, s_emb, t_emb, labels


def test_md_matches_loop_reference(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    loss = MarginDistillationLoss(write_head(tmp_path, W), s=16.0,
                                  m_max=0.5, m_min=0.2)
    expected, m_ref = ref_margin_distillation(s_emb, t_emb, W, labels,
                                              16.0, 0.5, 0.2)
    assert loss(s_emb, t_emb, labels).item() == pytest.approx(expected,
                                                              rel=1e-5)
    m = loss.margins(t_emb, labels)
    assert m.tolist() == pytest.approx(m_ref, abs=1e-6)
    assert max(m.tolist()) == pytest.approx(0.5, abs=1e-6)  # at D_max
    # the buffer holds the normalised teacher centres, C×D
    assert torch.allclose(loss.centers, F.normalize(W, dim=1))
    assert not loss.centers.requires_grad and not list(loss.parameters())
    assert 'centers' in loss.state_dict()


def test_md_hand_computed_margins_and_dmax_guard(tmp_path):
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = MarginDistillationLoss(write_head(tmp_path, W), m_max=0.5,
                                  m_min=0.2)
    # d = (1, sqrt3/2, -1) -> D_max = 1 -> m = 0.3 d + 0.2
    t = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 1])
    m = loss.margins(t, labels).tolist()
    assert m == pytest.approx([0.5, 0.3 * math.sqrt(3) / 2 + 0.2, -0.1],
                              abs=1e-6)
    # every teacher sample on the wrong side: D_max <= 0 -> all m_min
    t_bad = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    assert loss.margins(t_bad, torch.tensor([0, 1])).tolist() == \
        pytest.approx([0.2, 0.2])
    # student on its centre, m = 0.5, s=64, C=2 with the other centre at 90°:
    # target 64 cos(0.5), non-target 0 -> CE = log(1 + e^{-64 cos .5})
    s_emb = torch.tensor([[3.0, 0.0]])
    t_emb = torch.tensor([[1.0, 0.0]])
    got = loss(s_emb, t_emb, torch.tensor([0])).item()
    assert got == pytest.approx(math.log1p(math.exp(-64 * math.cos(0.5))),
                                rel=1e-4, abs=1e-12)
    assert math.isfinite(got)


def test_md_kdzoo_head_pth_and_kernel_layouts(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    head = ArcFace(num_classes=5, embedding_size=4)
    with torch.no_grad():
        head.weight.copy_(W)
    # what ExportStudentHook writes: the head's CPU state dict
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    ref = MarginDistillationLoss(write_head(tmp_path, state['weight']))
    from_head = MarginDistillationLoss(
        str(_save(tmp_path / 'head_export.pth', state)))
    # TFace / CurricularFace / AdaDistill layout: ``kernel`` D×C
    from_kernel = MarginDistillationLoss(
        write_head(tmp_path, W.t().contiguous(), key='kernel', name='k.pth'))
    # a full run checkpoint nested under state_dict with a prefix
    nested = _save(tmp_path / 'run.pth', {'state_dict': {
        'student.head.weight': W, 'student.backbone.fc.weight':
        torch.randn(4, 8)}})
    from_nested = MarginDistillationLoss(str(nested))
    # 'weight' stored D×C, disambiguated by embedding_size
    from_t = MarginDistillationLoss(
        write_head(tmp_path, W.t().contiguous(), name='t.pth'),
        embedding_size=4)
    expected = ref(s_emb, t_emb, labels)
    for other in (from_head, from_kernel, from_nested, from_t):
        assert torch.allclose(other.centers, ref.centers)
        assert other(s_emb, t_emb, labels).item() == pytest.approx(
            expected.item(), rel=1e-6)


def _save(path, obj):
    torch.save(obj, str(path))
    return path


def test_md_gradient_student_only(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    loss = MarginDistillationLoss(write_head(tmp_path, W))
    s = s_emb.clone().requires_grad_(True)
    t = t_emb.clone().requires_grad_(True)
    loss(s, t, labels).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    # student exactly on its centre (cos = 1): finite gradient
    s2 = W[labels].clone().requires_grad_(True)
    loss(s2, t_emb, labels).backward()
    assert torch.isfinite(s2.grad).all()


def test_md_loss_weight_linear(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    path = write_head(tmp_path, W)
    base = MarginDistillationLoss(path)(s_emb, t_emb, labels).item()
    for w in (0.0, 0.5, 3.0):
        got = MarginDistillationLoss(path, loss_weight=w)(s_emb, t_emb,
                                                           labels).item()
        assert got == pytest.approx(w * base, rel=1e-6, abs=1e-9)


def test_md_file_errors(tmp_path, tiny):
    W = tiny[0]
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match='nope.pth'):
        MarginDistillationLoss(missing)
    unsafe = write_head(tmp_path, W, name='unsafe.pth', obj=NotATensor())
    with pytest.raises(CheckpointError, match='unsafe.pth'):
        MarginDistillationLoss(unsafe)
    both = _save(tmp_path / 'both.pth', {'weight': W, 'kernel': W.t()})
    with pytest.raises(CheckpointError, match='both'):
        MarginDistillationLoss(str(both))
    none = _save(tmp_path / 'none.pth', {'bias': torch.zeros(5)})
    with pytest.raises(CheckpointError, match='class-centre'):
        MarginDistillationLoss(str(none))
    with pytest.raises(ConfigError, match='embedding_size'):
        MarginDistillationLoss(write_head(tmp_path, W), embedding_size=7)


def test_md_validation(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    path = write_head(tmp_path, W)
    loss = MarginDistillationLoss(path)
    with pytest.raises(ValueError, match='s_emb.*LinearProjector'):
        loss(torch.randn(3, 6), t_emb, labels)
    with pytest.raises(ValueError, match='t_emb'):
        loss(s_emb, torch.randn(3, 6), labels)
    with pytest.raises(ValueError, match='labels'):
        loss(s_emb, t_emb, torch.tensor([0, 5, 1]))  # C = 5
    with pytest.raises(ValueError, match='labels'):
        loss(s_emb, t_emb, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='labels'):
        loss(s_emb, t_emb, labels.float())
    with pytest.raises(ValueError, match='s_emb'):
        loss.check_shapes(dict(s_emb=torch.Size([2, 8]),
                               t_emb=torch.Size([2, 4]),
                               labels=torch.Size([2])))
    loss.check_shapes(dict(s_emb=torch.Size([2, 4]), t_emb=torch.Size([2, 4]),
                           labels=torch.Size([2])))
    for kw, arg in ((dict(s=0), 's'), (dict(m_min=-0.1), 'm_min'),
                    (dict(m_max=0.1, m_min=0.2), 'm_max'),
                    (dict(m_max=4.0), 'm_max'),
                    (dict(loss_weight=-1), 'loss_weight')):
        with pytest.raises(ConfigError, match=rf'\b{arg} must'):
            MarginDistillationLoss(path, **kw)
    with pytest.raises(ConfigError, match='head_checkpoint'):
        MarginDistillationLoss(None)


def test_md_registry(tmp_path, tiny):
    path = write_head(tmp_path, tiny[0])
    loss = LOSSES.build(dict(type='MarginDistillationLoss',
                             head_checkpoint=path, m_max=0.4))
    assert isinstance(loss, MarginDistillationLoss) and loss.m_max == 0.4


# ========================================================= AdaDistillLoss
def ada_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 3, 1, 0, 1])  # class 1 three times
    t_emb = torch.randn(5, 4, generator=g)
    s_emb = t_emb + 0.7 * torch.randn(5, 4, generator=g)
    return s_emb, t_emb, labels


@pytest.mark.parametrize('alpha', ['weighted', 'plain'])
def test_ada_center_update_matches_loop(alpha):
    s_emb, t_emb, labels = ada_batch()
    loss = AdaDistillLoss(num_classes=5, embedding_size=4, alpha=alpha)
    with torch.no_grad():  # centres roughly aligned so lam is not clamped
        loss.centers.copy_(torch.randn(5, 4) + t_emb[[3, 0, 0, 1, 0]])
    before = loss.centers.clone().double()
    expected, alphas = ref_ada_update(before, s_emb, t_emb, labels, alpha)
    loss.train()
    loss(s_emb, t_emb, labels)
    assert torch.allclose(loss.centers.double(), expected, atol=1e-6)
    assert loss.last_alpha == pytest.approx(sum(alphas) / len(alphas),
                                            abs=1e-6)
    assert torch.equal(loss.centers[[2, 4]].double(), before[[2, 4]])


@pytest.mark.parametrize('margin,m', [('arcface', 0.45), ('cosface', 0.35)])
def test_ada_loss_matches_reference(margin, m):
    s_emb, t_emb, labels = ada_batch(3)
    loss = AdaDistillLoss(5, 4, s=16.0, m=m, margin=margin)
    start = loss.centers.clone().double()
    W, _ = ref_ada_update(start, s_emb, t_emb, labels, 'weighted')
    expected = ref_ada_loss(W, s_emb, labels, 16.0, m, margin)
    got = loss(s_emb, t_emb, labels).item()  # update first, then logits
    assert got == pytest.approx(expected, rel=1e-5)
    # eval mode: logits on the current centres, no update
    loss.eval()
    frozen = loss.centers.clone()
    got_eval = loss(s_emb, t_emb, labels).item()
    assert torch.equal(loss.centers, frozen)
    assert got_eval == pytest.approx(
        ref_ada_loss(frozen.double(), s_emb, labels, 16.0, m, margin),
        rel=1e-5)


def test_ada_init_state_and_eval_no_update():
    torch.manual_seed(0)
    loss = AdaDistillLoss(num_classes=50, embedding_size=8)
    assert loss.centers.shape == (50, 8)
    assert abs(loss.centers.std().item() - 0.01) < 0.003
    assert 'centers' in loss.state_dict() and not list(loss.parameters())
    assert math.isnan(loss.last_alpha)
    torch.manual_seed(0)
    again = AdaDistillLoss(num_classes=50, embedding_size=8)
    assert torch.equal(again.centers, loss.centers)  # global RNG
    loss.eval()
    before = loss.centers.clone()
    loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 1, 2]))
    assert torch.equal(loss.centers, before) and math.isnan(loss.last_alpha)
    # round trip through a state dict
    other = AdaDistillLoss(num_classes=50, embedding_size=8)
    other.load_state_dict(loss.state_dict())
    assert torch.equal(other.centers, loss.centers)


def test_ada_gradient_student_only():
    s_emb, t_emb, labels = ada_batch()
    loss = AdaDistillLoss(5, 4)
    s = s_emb.clone().requires_grad_(True)
    t = t_emb.clone().requires_grad_(True)
    loss(s, t, labels).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None and not loss.centers.requires_grad


def test_ada_loss_weight_linear():
    s_emb, t_emb, labels = ada_batch()
    loss = AdaDistillLoss(5, 4).eval()
    base = loss(s_emb, t_emb, labels).item()
    for w in (0.0, 0.25, 2.0):
        other = AdaDistillLoss(5, 4, loss_weight=w).eval()
        other.load_state_dict(loss.state_dict())
        assert other(s_emb, t_emb, labels).item() == pytest.approx(
            w * base, rel=1e-6, abs=1e-9)


def test_ada_validation():
    for kw, arg in ((dict(margin='foo'), 'margin'), (dict(alpha='x'), 'alpha'),
                    (dict(num_classes=0), 'num_classes'),
                    (dict(embedding_size=2.5), 'embedding_size'),
                    (dict(s=-1), 's'), (dict(m=4.0), 'm'),
                    (dict(init_std=0), 'init_std')):
        args = {**dict(num_classes=5, embedding_size=4), **kw}
        with pytest.raises(ConfigError, match=rf'\b{arg} must'):
            AdaDistillLoss(**args)
    AdaDistillLoss(5, 4, margin='cosface', m=4.0)  # cosine margin: no bound
    loss = AdaDistillLoss(5, 4)
    with pytest.raises(ValueError, match='s_emb.*LinearProjector'):
        loss(torch.randn(2, 8), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='t_emb'):
        loss(torch.randn(2, 4), torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='labels'):
        loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 9]))


def test_ada_registry():
    loss = LOSSES.build(dict(type='AdaDistillLoss', num_classes=7,
                             embedding_size=3, margin='cosface', m=0.35,
                             alpha='plain'))
    assert isinstance(loss, AdaDistillLoss)
    assert (loss.margin, loss.alpha, loss.m) == ('cosface', 'plain', 0.35)


def test_ada_ddp_all_reduce_averages(monkeypatch):
    """With world size 2 the centres are all-reduced (mean) after update."""
    import kdzoo.losses.margin as mod
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(op)
        tensor.add_(torch.ones_like(tensor))  # the other rank's centres

    monkeypatch.setattr(mod, 'world_size', lambda: 2)
    monkeypatch.setattr(mod.dist, 'all_reduce', fake_all_reduce)
    s_emb, t_emb, labels = ada_batch()
    loss = AdaDistillLoss(5, 4)
    expected, _ = ref_ada_update(loss.centers.clone().double(), s_emb, t_emb,
                                 labels, 'weighted')
    loss(s_emb, t_emb, labels)
    assert len(calls) == 1
    assert torch.allclose(loss.centers.double(), (expected + 1) / 2,
                          atol=1e-6)
    loss.eval()
    loss(s_emb, t_emb, labels)
    assert len(calls) == 1  # no sync without an update


@pytest.mark.gpu
def test_margin_losses_on_cuda(tmp_path, tiny):
    W, s_emb, t_emb, labels = tiny
    md = MarginDistillationLoss(write_head(tmp_path, W))
    cpu = md(s_emb, t_emb, labels).item()
    md = md.to('cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        got = md(s_emb.cuda().half(), t_emb.cuda(), labels.cuda())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(cpu, rel=1e-2)
    s_emb, t_emb, labels = ada_batch()
    ada = AdaDistillLoss(5, 4)
    ref = AdaDistillLoss(5, 4)
    ref.load_state_dict(ada.state_dict())
    cpu = ref(s_emb, t_emb, labels).item()
    ada = ada.to('cuda')
    got = ada(s_emb.cuda(), t_emb.cuda(), labels.cuda()).item()
    assert got == pytest.approx(cpu, rel=1e-4)
    assert torch.allclose(ada.centers.cpu(), ref.centers, atol=1e-6)
