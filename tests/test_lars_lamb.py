"""Tests for lars_lamb.py: hand-computed float64 steps, the ndim rule, zero norms, resume,
the official state."""
import io
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lars_lamb import LAMB, LARS, adapted  # noqa: E402


# ---- references written out with numpy, independent of lars_lamb.py ------------------------------
def lars_ref(p, grads, lr, wd, mom, eta, adapt):
    p, mu = p.copy(), np.zeros_like(p)
    for g in grads:
        d = g + wd * p if adapt else g
        if adapt:
            pn, dn = np.linalg.norm(p), np.linalg.norm(d)
            d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
        mu = mom * mu + d
        p = p - lr * mu
    return p


def lamb_ref(p, grads, lr, wd, b1, b2, eps, adapt):
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if adapt:
            r = r + wd * p
            pn, rn = np.linalg.norm(p), np.linalg.norm(r)
            r = r * (pn / rn if pn > 0 and rn > 0 else 1.0)
        p = p - lr * r
    return p


def run(opt, params, grads):
    """Apply a list of per-step gradient lists (numpy) to torch params through opt."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else torch.from_numpy(g).to(p.dtype)
        opt.step()


# ---- one step, numbers worked out by hand --------------------------------------------------------
def test_lars_one_and_two_steps_by_hand():
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # ||w|| = 5
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt = LARS([w, b], lr=10.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    # step 1: d = g + 0.1 w = [1.5, 0.4], ||d|| = sqrt(2.41); trust = 0.001 * 5 / sqrt(2.41)
    w.grad = torch.tensor([[1.2, 0.0]], dtype=torch.float64)
    b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)  # bias: no decay, no trust ratio
    opt.step()
    q = 0.005 / math.sqrt(2.41)
    mu_w = [1.5 * q, 0.4 * q]
    w1 = [3.0 - 10 * mu_w[0], 4.0 - 10 * mu_w[1]]
    assert w[0].tolist() == pytest.approx(w1, rel=1e-14)
    assert b.tolist() == pytest.approx([1.0 - 5.0, -2.0 - 5.0], rel=1e-14)
    # step 2: zero grad, so d = 0.1 w1 is parallel to w1 and trust * d = 0.001 * w1
    w.grad.zero_()
    b.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    mu_w = [0.9 * mu_w[0] + 0.001 * w1[0], 0.9 * mu_w[1] + 0.001 * w1[1]]
    assert w[0].tolist() == pytest.approx([w1[0] - 10 * mu_w[0], w1[1] - 10 * mu_w[1]], rel=1e-14)
    assert b.tolist() == pytest.approx([-4.0 - 10 * 0.9 * 0.5, -7.0 - 10 * (0.9 * 0.5 + 1.0)],
                                       rel=1e-14)


def test_lamb_one_step_by_hand():
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([2.0], dtype=torch.float64)
    opt = LAMB([w, b], lr=0.1, weight_decay=0.5, eps=1e-6)
    w.grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    b.grad = torch.tensor([-3.0], dtype=torch.float64)
    opt.step()
    # t = 1: m_hat = g and v_hat = g^2, so the Adam direction is g / (|g| + eps)
    r = [1 / (1 + 1e-6) + 0.5 * 3.0, -2 / (2 + 1e-6) + 0.5 * 4.0]
    trust = 5.0 / math.hypot(*r)
    assert w[0].tolist() == pytest.approx([3.0 - 0.1 * trust * r[0], 4.0 - 0.1 * trust * r[1]],
                                          rel=1e-14)
    assert b.tolist() == pytest.approx([2.0 + 0.1 * 3 / (3 + 1e-6)], rel=1e-14)


# ---- several steps against the numpy references; weight decay 0 and > 0; the ndim rule -----------
@pytest.mark.parametrize('wd', [0.0, 0.3])
def test_several_steps_match_reference(wd):
    rng = np.random.default_rng(0)
    shapes = [(3, 2, 2, 2), (4, 3), (4,), ()]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    for exclude in (True, False):
        adapt = [len(s) > 1 or not exclude for s in shapes]
        ps = [torch.tensor(x) for x in init]
        run(LARS(ps, lr=0.7, weight_decay=wd, momentum=0.8, trust_coefficient=0.02,
                 exclude_1d=exclude), ps, grads)
        for i, p in enumerate(ps):
            want = lars_ref(init[i], [g[i] for g in grads], 0.7, wd, 0.8, 0.02, adapt[i])
            np.testing.assert_allclose(p.numpy(), want, rtol=1e-12, atol=1e-14)
        ps = [torch.tensor(x) for x in init]
        run(LAMB(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=wd, exclude_1d=exclude),
            ps, grads)
        for i, p in enumerate(ps):
            want = lamb_ref(init[i], [g[i] for g in grads], 0.05, wd, 0.8, 0.9, 1e-3, adapt[i])
            np.testing.assert_allclose(p.numpy(), want, rtol=1e-12, atol=1e-14)


def test_excluded_params_follow_sgd_and_adam():
    """A 1-d parameter gets neither decay nor trust ratio: LARS is then SGD with momentum,
    LAMB is Adam."""
    torch.manual_seed(0)
    x = torch.randn(7, dtype=torch.float64)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(5)]
    for ours, theirs in [(LARS, lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9)),
                         (LAMB, lambda p: torch.optim.Adam(p, lr=0.3, eps=1e-6))]:
        a, b = x.clone(), x.clone()
        oa, ob = ours([a], lr=0.3, weight_decay=0.1), theirs([b])  # decay must be skipped
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---- zero norms: trust ratio 1, no NaN -----------------------------------------------------------
def test_zero_param_and_zero_grad():
    g = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    # zero param: ||p|| = 0 -> trust 1, decay of 0 is 0
    p = torch.zeros(2, 2, dtype=torch.float64)
    p.grad = g.clone()
    LARS([p], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(p, -0.1 * g, rtol=1e-15, atol=0)
    p = torch.zeros(2, 2, dtype=torch.float64)
    p.grad = g.clone()
    LAMB([p], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(p, -0.1 * g / (g.abs() + 1e-6), rtol=1e-15, atol=0)
    # zero grad and no decay: ||update|| = 0 -> trust 1, parameter unchanged
    for opt in (LARS, LAMB):
        p = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        p.grad = torch.zeros_like(p)
        opt([p], lr=0.1).step()
        assert torch.equal(p, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


# ---- bookkeeping: closure, params without grad, state_dict round trip ----------------------------
def _model_params(dtype):
    torch.manual_seed(1)
    shapes = [(6, 3, 3, 3), (6,), (10, 6), (10,), (), (2, 5, 4)]
    return [torch.randn(s, dtype=dtype) for s in shapes]


@pytest.mark.parametrize('opt', [LARS, LAMB])
def test_closure_and_params_without_grad(opt):
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    unused = torch.nn.Parameter(torch.ones(3, 3))
    o = opt([w, unused], lr=0.1)

    def closure():
        o.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    assert o.step(closure).item() == 5.0
    assert not torch.equal(w.detach(), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(unused.detach(), torch.ones(3, 3)) and unused not in o.state


@pytest.mark.parametrize('opt, kw', [(LARS, dict(lr=0.5, weight_decay=1e-2)),
                                     (LAMB, dict(lr=1e-2, weight_decay=0.05))])
def test_state_dict_round_trip(opt, kw):
    params = _model_params(torch.float32)
    o = opt([{'params': params[:3]}, {'params': params[3:], 'exclude_1d': False}], **kw)
    torch.manual_seed(3)
    run(o, params, [[torch.randn_like(p).numpy() for p in params] for _ in range(3)])
    buf = io.BytesIO()
    torch.save({'params': [p.clone() for p in params], 'opt': o.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    # a fresh optimizer with other settings: everything must come from the checkpoint
    fresh = ckpt['params']
    o2 = opt([{'params': fresh[:3]}, {'params': fresh[3:]}], lr=123.0)
    o2.load_state_dict(ckpt['opt'])
    grads = [[torch.randn_like(p).numpy() for p in params]]
    run(o, params, grads)
    run(o2, fresh, grads)
    for a, b in zip(params, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loads_state_without_our_options():
    """The official MoCo v3 LARS saves groups without exclude_1d and state key 'mu': it loads,
    1-d excluded."""
    params = _model_params(torch.float64)
    o = LARS(params, lr=0.5, weight_decay=1e-2)
    run(o, params, [[torch.randn_like(p).numpy() for p in params]])
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)  # a real file: state_dict() returns live buffers, not copies
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for group in sd['param_groups']:
        del group['exclude_1d']
    fresh = [p.clone() for p in params]
    o2 = LARS(fresh, lr=0.5, exclude_1d=False)
    o2.load_state_dict(sd)
    assert all(adapted(p, g) == (p.ndim > 1) for g in o2.param_groups for p in g['params'])
    grads = [[torch.randn_like(p).numpy() for p in params]]
    run(o, params, grads)
    run(o2, fresh, grads)
    for a, b in zip(params, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
