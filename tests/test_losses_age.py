"""Age-invariant FR terms (OE-CNN norm regression, GRL age adversary, cross-age
compactness) and the age-invariant teacher recipe: values, gradients,
validation, registry."""
import math
import os

import numpy as np
import pytest
import torch

import kdzoo  # noqa: F401
from kdzoo.losses.age import (AgeAdversarialLoss, AgeNormRegressionLoss,
                              CrossAgeCompactnessLoss, gradient_reversal)
from kdzoo.registry import LOSSES, MODELS
from kdzoo.utils import ConfigError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
RECIPE = os.path.join(ROOT, 'recipes', 'teachers',
                      'iresnet_age_invariant_synthface_age.py')


# ---------------------------------------------------------------- OE-CNN
def reference_norm_regression(emb, ages, scale, offset):
    """Loop over samples in float64 numpy; unknown ages (< 0) skipped."""
    emb, ages = np.asarray(emb, np.float64), np.asarray(ages, np.float64)
    total, count = 0.0, 0
    for x, a in zip(emb, ages):
        if not a >= 0:
            continue
        norm = math.sqrt(sum(v * v for v in x))
        total += (norm - (scale * a + offset)) ** 2
        count += 1
    return total / max(count, 1)


def test_norm_regression_hand_computed():
    # norms 5 and 13 (3-4-0, 5-12-0); targets 1 + 0.1*age = 3 and 9
    emb = torch.tensor([[3.0, 4.0, 0.0], [5.0, 12.0, 0.0]])
    ages = torch.tensor([20, 80])
    loss = AgeNormRegressionLoss(age_scale=0.1, age_offset=1.0)
    # ((5 - 3)^2 + (13 - 9)^2) / 2 = (4 + 16) / 2 = 10
    assert loss(emb, ages).item() == pytest.approx(10.0, abs=1e-5)
    # an unknown age (-1) is ignored: only the first sample counts -> 4
    assert loss(emb, torch.tensor([20, -1])).item() == pytest.approx(
        4.0, abs=1e-5)
    # float ages work the same
    assert loss(emb, ages.float()).item() == pytest.approx(10.0, abs=1e-5)


def test_norm_regression_matches_reference_and_weight():
    emb = torch.randn(7, 5) * 3
    ages = torch.tensor([5, 17, 33, -1, 60, 80, 42])
    expected = reference_norm_regression(emb, ages, 0.05, 9.25)
    loss = AgeNormRegressionLoss()(emb, ages)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    weighted = AgeNormRegressionLoss(loss_weight=0.25)(emb, ages)
    assert weighted.item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_norm_regression_gradient_and_no_known_age():
    emb = torch.randn(4, 6, requires_grad=True)
    ages = torch.tensor([10, 20, 30, 40])
    AgeNormRegressionLoss()(emb, ages).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    # the gradient is radial: d/dx (||x|| - t)^2 = 2 (||x|| - t) x / ||x||
    norm = emb.detach().norm(dim=1, keepdim=True)
    target = 0.05 * ages.float().unsqueeze(1) + 9.25
    radial = 2 * (norm - target) * emb.detach() / norm / 4
    assert torch.allclose(emb.grad, radial, atol=1e-5)
    # no known age: zero loss, zero (finite) gradient, still a graph
    emb.grad = None
    loss = AgeNormRegressionLoss()(emb, torch.full((4, ), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_norm_regression_validation():
    loss = AgeNormRegressionLoss()
    with pytest.raises(ValueError, match='s_emb must be'):
        loss(torch.randn(4, 3, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"ages has shape \(3,\)"):
        loss(torch.randn(4, 8), torch.zeros(3))
    with pytest.raises(ValueError, match='ages must be a real'):
        loss(torch.randn(2, 8), torch.tensor([True, False]))
    with pytest.raises(ConfigError, match='AgeNormRegressionLoss: age_scale'):
        AgeNormRegressionLoss(age_scale=0)
    with pytest.raises(ConfigError, match='age_offset must be .* got -1'):
        AgeNormRegressionLoss(age_offset=-1)
    with pytest.raises(ConfigError, match='loss_weight'):
        AgeNormRegressionLoss(loss_weight=-1)


# ---------------------------------------------------------------- GRL
def reference_adversarial(emb, ages, weights, groups, low, high):
    """CE of the MLP on x_hat, written with numpy and loops."""
    w1, b1, w2, b2 = (np.asarray(w.detach(), np.float64) for w in weights)
    total, count = 0.0, 0
    for x, a in zip(np.asarray(emb, np.float64), np.asarray(ages)):
        if not a >= 0:
            continue
        x = x / np.sqrt((x * x).sum())
        h = np.maximum(w1 @ x + b1, 0.0)
        z = w2 @ h + b2
        g = int(min(max(math.floor((a - low) / (high - low) * groups), 0),
                    groups - 1))
        lse = z.max() + math.log(np.exp(z - z.max()).sum())
        total += lse - z[g]
        count += 1
    return total / max(count, 1)


def _weights(loss):
    first, last = loss.classifier[0], loss.classifier[-1]
    return first.weight, first.bias, last.weight, last.bias


def test_adversarial_age_groups_hand_computed():
    loss = AgeAdversarialLoss(embedding_size=4, num_age_groups=8,
                              age_range=(0, 80))
    ages = torch.tensor([0.0, 9.9, 10.0, 45.0, 79.0, 80.0, 95.0])
    assert loss.age_groups(ages).tolist() == [0, 0, 1, 4, 7, 7, 7]
    loss = AgeAdversarialLoss(embedding_size=4, num_age_groups=3,
                              age_range=(5, 80))  # bins of 25 years
    assert loss.age_groups(torch.tensor([2.0, 29.0, 30.0, 55.0])).tolist() \
        == [0, 0, 1, 2]


def test_adversarial_uniform_classifier_gives_log_groups():
    loss = AgeAdversarialLoss(embedding_size=3, num_age_groups=4, hidden=0)
    with torch.no_grad():  # constant logits: CE = log 4 whatever the age
        loss.classifier[0].weight.zero_()
        loss.classifier[0].bias.zero_()
    value = loss(torch.randn(5, 3), torch.tensor([1, 20, 40, 60, 79]))
    assert value.item() == pytest.approx(math.log(4), abs=1e-6)


def test_adversarial_matches_reference_and_weight():
    loss = AgeAdversarialLoss(embedding_size=6, num_age_groups=5,
                              age_range=(5, 80), hidden=4)
    emb = torch.randn(9, 6) * 4
    ages = torch.tensor([5, 14, 20, 36, -1, 51, 66, 80, 99])
    expected = reference_adversarial(emb, ages, _weights(loss), 5, 5, 80)
    assert loss(emb, ages).item() == pytest.approx(expected, rel=1e-5)
    state = loss.state_dict()
    weighted = AgeAdversarialLoss(embedding_size=6, num_age_groups=5,
                                  age_range=(5, 80), hidden=4,
                                  loss_weight=3.0)
    weighted.load_state_dict(state)
    assert weighted(emb, ages).item() == pytest.approx(3.0 * expected,
                                                       rel=1e-5)


@pytest.mark.parametrize('lam', [1.0, 0.5])
def test_adversarial_gradient_reversal(lam):
    loss = AgeAdversarialLoss(embedding_size=5, num_age_groups=4,
                              age_range=(0, 80), grl_lambda=lam, hidden=3,
                              loss_weight=2.0)
    emb = torch.randn(6, 5) * 2
    ages = torch.tensor([3, 25, 44, 61, 77, 12])
    x = emb.clone().requires_grad_(True)
    loss(x, ages).backward()
    got_x = x.grad.clone()
    got_w = [p.grad.clone() for p in _weights(loss)]

    # the same classifier with plain torch ops, no reversal
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_(True)
                      for p in _weights(loss))
    x_ref = emb.clone().requires_grad_(True)
    x_hat = x_ref / x_ref.norm(dim=1, keepdim=True)
    logits = torch.relu(x_hat @ w1.T + b1) @ w2.T + b2
    groups = torch.tensor([0, 2, 4, 6, 7, 1]) // 2  # 20-year bins
    ce = -(logits.log_softmax(dim=1)[torch.arange(6), groups]).mean()
    (2.0 * ce).backward()
    # the classifier gets the ordinary gradient of its cross-entropy
    for g, ref in zip(got_w, (w1, b1, w2, b2)):
        assert torch.allclose(g, ref.grad, atol=1e-6)
    # the embedding gets -lambda times it
    assert x_ref.grad.abs().sum() > 0
    assert torch.allclose(got_x, -lam * x_ref.grad, atol=1e-6)


def test_gradient_reversal_layer():
    x = torch.randn(3, 2, requires_grad=True)
    y = gradient_reversal(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(6.0).view(3, 2)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(6.0).view(3, 2))


def test_adversarial_lazy_build_unknown_ages_and_state():
    loss = AgeAdversarialLoss()  # embedding_size inferred
    assert loss.classifier is None
    loss.check_shapes(dict(s_emb=torch.Size([2, 16]),
                           ages=torch.Size([2])))
    assert loss.embedding_size == 16
    assert 'classifier.0.weight' in loss.state_dict()
    params = list(loss.parameters())
    assert params and all(p.requires_grad for p in params)
    with pytest.raises(ValueError, match='embedding_size=16'):
        loss.check_shapes(dict(s_emb=torch.Size([2, 32]),
                               ages=torch.Size([2])))
    # all ages unknown: zero loss, graph kept, no NaN
    emb = torch.randn(3, 16, requires_grad=True)
    value = loss(emb, torch.tensor([-1.0, float('nan'), -1.0]))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    # created by the first forward when never checked
    fresh = AgeAdversarialLoss(hidden=0)
    fresh(torch.randn(2, 7), torch.tensor([10, 50]))
    assert fresh.classifier[0].weight.shape == (8, 7)


def test_adversarial_validation():
    loss = AgeAdversarialLoss(embedding_size=8)
    with pytest.raises(ValueError, match='s_emb must be'):
        loss(torch.randn(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"ages has shape \(2, 1\)"):
        loss(torch.randn(2, 8), torch.zeros(2, 1))
    with pytest.raises(ValueError, match='embedding_size=8'):
        loss(torch.randn(2, 9), torch.zeros(2))
    bad = [(dict(num_age_groups=1), 'num_age_groups'),
           (dict(age_range=(80, 0)), 'age_range'),
           (dict(age_range=(-5, 80)), 'age_range'),
           (dict(age_range=5), 'age_range'),
           (dict(grl_lambda=-1), 'grl_lambda'),
           (dict(grl_lambda=float('inf')), 'grl_lambda'),
           (dict(hidden=-2), 'hidden'),
           (dict(embedding_size=0), 'embedding_size'),
           (dict(loss_weight=float('nan')), 'loss_weight')]
    for kwargs, arg in bad:
        with pytest.raises(ConfigError, match=f'AgeAdversarialLoss: {arg}'):
            AgeAdversarialLoss(**kwargs)


# ---------------------------------------------------------------- age gap
def reference_cross_age(emb, labels, ages, scale, gamma):
    """Double loop over pairs in float64 numpy."""
    emb = np.asarray(emb, np.float64)
    num = den = 0.0
    for i in range(len(emb)):
        for j in range(i + 1, len(emb)):
            if labels[i] != labels[j] or not (ages[i] >= 0 and ages[j] >= 0):
                continue
            w = min(abs(float(ages[i]) - float(ages[j])) / scale, 1.0) ** gamma
            cos = emb[i] @ emb[j] / np.linalg.norm(emb[i]) / \
                np.linalg.norm(emb[j])
            num += w * (1 - cos)
            den += w
    return num / den if den else 0.0


def test_cross_age_hand_computed():
    # identity 0: (1,0) age 20 and (0,1) age 40 -> cos 0, gap 20 -> w 0.5;
    # identity 0 again: (1,1) age 80 -> with (1,0): cos 1/sqrt2, w 1 (gap 60
    # capped); with (0,1): cos 1/sqrt2, w 1; identity 1 alone: no pair
    emb = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    ages = torch.tensor([20, 40, 80, 30])
    c = 1 - 1 / math.sqrt(2)
    want = (0.5 * 1 + 1 * c + 1 * c) / (0.5 + 1 + 1)
    loss = CrossAgeCompactnessLoss(age_gap_scale=40.0)
    assert loss(emb, labels, ages).item() == pytest.approx(want, rel=1e-6)
    # gamma=0: every positive pair weighs 1
    flat = CrossAgeCompactnessLoss(gamma=0.0)(emb, labels, ages)
    assert flat.item() == pytest.approx((1 + 2 * c) / 3, rel=1e-6)
    # an unknown age drops its pairs: only (0, 1) is left
    assert loss(emb, labels, torch.tensor([20, 40, -1, 30])).item() == \
        pytest.approx(1.0, rel=1e-6)


def test_cross_age_matches_reference_and_weight():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 2, 0])
    ages = torch.tensor([5, 70, 33, 61, 12, 33, -1, 40, 22, 79, 8, 50])
    for scale, gamma in [(40.0, 1.0), (10.0, 2.0), (100.0, 0.5)]:
        want = reference_cross_age(emb, labels, ages, scale, gamma)
        got = CrossAgeCompactnessLoss(scale, gamma, loss_weight=3.0)(
            emb, labels, ages)
        assert got.item() == pytest.approx(3.0 * want, rel=1e-5)


def test_cross_age_gradient_pulls_positives_together():
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    ages = torch.tensor([10, 70, 20, 60, 30, 40])
    loss = CrossAgeCompactnessLoss()
    torch.autograd.gradcheck(lambda e: loss(e, labels, ages), (emb, ))
    loss(emb, labels, ages).backward()
    # rows without a positive pair get no gradient
    assert emb.grad[4:].abs().max() == 0 and emb.grad[:4].abs().max() > 0
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        before = loss(emb, labels, ages)
        after = loss(emb - 0.1 * emb.grad, labels, ages)
    assert after < before


def test_cross_age_without_pairs_is_zero_with_zero_gradient():
    emb = torch.randn(3, 4, requires_grad=True)
    out = CrossAgeCompactnessLoss()(emb, torch.tensor([0, 1, 2]),
                                    torch.tensor([10, 20, 30]))
    out.backward()
    assert out.item() == 0 and emb.grad.abs().max() == 0
    # same age: weight 0 with gamma > 0 -> no weighted pair either
    out = CrossAgeCompactnessLoss()(emb, torch.tensor([0, 0, 1]),
                                    torch.tensor([10, 10, 30]))
    assert out.item() == 0


def test_cross_age_validation():
    for kwargs, arg in [(dict(age_gap_scale=0), 'age_gap_scale'),
                        (dict(age_gap_scale=float('inf')), 'age_gap_scale'),
                        (dict(gamma=-1), 'gamma'),
                        (dict(loss_weight=-1), 'loss_weight')]:
        with pytest.raises(ConfigError,
                           match=f'CrossAgeCompactnessLoss: {arg}'):
            CrossAgeCompactnessLoss(**kwargs)
    loss = CrossAgeCompactnessLoss()
    with pytest.raises(ValueError, match=r"labels has shape \(3,\).*"
                       r"labels='data.label'"):
        loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long),
             torch.zeros(4))
    with pytest.raises(ValueError, match=r"ages='data.age'"):
        loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long),
             torch.zeros(5))


# ---------------------------------------------------------------- registry
def test_registry_build():
    norm = LOSSES.build(dict(type='AgeNormRegressionLoss', age_scale=0.1,
                             age_offset=2.0, loss_weight=0.5))
    assert isinstance(norm, AgeNormRegressionLoss) and norm.age_scale == 0.1
    adv = LOSSES.build(dict(type='AgeAdversarialLoss', embedding_size=12,
                            num_age_groups=4, age_range=[0, 100]))
    assert isinstance(adv, AgeAdversarialLoss)
    assert adv.classifier[-1].out_features == 4


# ---------------------------------------------------------------- recipe
def _one_step(cfg):
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 3, 32, 32, generator=g)
    data = dict(label=torch.tensor([3, 3, 17, 17, 250, 250, 399, 399]),
                age=torch.randint(5, 81, (8, ), generator=g),
                index=torch.arange(8))
    model.train()
    losses = model.loss(inputs, data)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.student.backbone.parameters())
    return model, losses


def test_recipe_builds_and_trains_one_step():
    from kdzoo.engine.runner import load_recipe
    cfg = load_recipe(RECIPE)
    assert not cfg.model.get('teachers')
    assert cfg.model.student.head.type == 'CosFace'
    _, losses = _one_step(cfg)
    assert set(losses) == {'loss_cls', 'loss_cross_age'}
    assert losses['loss_cross_age'] > 0  # 4 same-identity pairs


def test_oecnn_and_adversary_terms_train_in_a_distiller():
    """The earlier objective (OE-CNN norm + GRL adversary) on the same
    teacher: the adversary's classifier is built by the build-time probe
    and trained."""
    from kdzoo.engine.runner import load_recipe
    cfg = load_recipe(RECIPE)
    cfg.model.distill_losses = dict(
        loss_age_norm=dict(type='AgeNormRegressionLoss',
                           inputs=dict(s_emb='student.embedding',
                                       ages='data.age')),
        loss_age_adv=dict(type='AgeAdversarialLoss',
                          inputs=dict(s_emb='student.embedding',
                                      ages='data.age')))
    model, losses = _one_step(cfg)
    assert set(losses) == {'loss_cls', 'loss_age_norm', 'loss_age_adv'}
    adv = model.distill_losses['loss_age_adv']
    assert adv.embedding_size == 128
    assert any(n.startswith('distill_losses.loss_age_adv.classifier')
               for n, _ in model.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in adv.parameters())


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_moves_and_matches_cpu():
    emb = torch.randn(6, 8)
    ages = torch.tensor([5, 20, -1, 40, 60, 80])
    for cls, kwargs in ((AgeNormRegressionLoss, {}),
                        (AgeAdversarialLoss, dict(embedding_size=8))):
        loss = cls(**kwargs)
        cpu = loss(emb, ages).item()
        gpu = loss.to('cuda')(emb.cuda(), ages.cuda())
        assert gpu.device.type == 'cuda'
        assert gpu.item() == pytest.approx(cpu, rel=1e-4)
