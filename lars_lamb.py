"""LARS and LAMB: the layer-wise adaptive optimizers of the MoCo v3 paper.

MoCo v3 (Chen, Xie, He, ICCV 2021) trains ResNet-50 with LARS and compares LAMB, the Adam counterpart of
LARS, with AdamW for ViT (its Fig. 3: LAMB is more sensitive to the learning rate, so ViT keeps AdamW).
LARS is You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks"; LAMB is You et al.
2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes".

Both scale each tensor's update by a trust ratio ||p|| / ||update||. Following the official MoCo v3 LARS, a
parameter with p.ndim <= 1 (biases, BatchNorm/LayerNorm gains and shifts) gets neither weight decay nor the
trust ratio; the per-group option `exclude_1d=False` applies both to every parameter of that group.

`foreach=False` runs the readable per-parameter loop, which is the specification; the default
(`foreach=None` or `True`) runs the same arithmetic, in the same order, on lists of tensors with
`torch._foreach_*` ops: bit-identical to the loop on CPU; on CUDA most ops launch once per list instead of
once per tensor (the per-tensor norms may round differently there). Neither path syncs with the host: zero norms are handled with `torch.where`.
"""
import torch


def _trust(num, den, coef):
    """coef * num / den where both norms are > 0, else 1 (no host sync). Works on 0-d or 1-d norms."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, coef * num / den, torch.ones_like(num))


def _buckets(group):
    """Params of a group that have a grad, by (device, dtype), split into adapted / plain lists.

    Adapted params get weight decay and the trust ratio; foreach ops want one device and dtype per list.
    """
    out = {}
    for p in group['params']:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError('LARS/LAMB do not support sparse gradients')
        adapt = p.ndim > 1 or not group['exclude_1d']
        out.setdefault((p.device, p.dtype, adapt), []).append(p)
    return out


class _Adaptive(torch.optim.Optimizer):
    """Shared plumbing: closure, defaults for old state dicts, choice of the loop or foreach path."""

    def __setstate__(self, state):
        # Lets an optimizer state saved without our options (e.g. the official MoCo v3 LARS) load.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault('exclude_1d', True)
            group.setdefault('foreach', None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for (_, _, adapt), params in _buckets(group).items():
                if group['foreach'] is False:
                    for p in params:
                        self._single(group, p, adapt)
                else:
                    self._multi(group, params, adapt)
        return loss


class LARS(_Adaptive):
    """LARS with the official MoCo v3 semantics.

    For an adapted parameter (p.ndim > 1):  d = g + wd * p;  d *= eta * ||p|| / ||d||  (1 if a norm is 0).
    Other parameters:  d = g.  Then  mu = momentum * mu + d;  p -= lr * mu.
    The state key 'mu' matches the official code, so its optimizer state loads here.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001,
                 exclude_1d=True, foreach=None):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f'invalid LARS settings: lr={lr} weight_decay={weight_decay} '
                             f'momentum={momentum} trust_coefficient={trust_coefficient}')
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d, foreach=foreach)
        super().__init__(params, defaults)

    def _single(self, group, p, adapt):
        d = p.grad
        if adapt:
            if group['weight_decay'] != 0:
                d = d.add(p, alpha=group['weight_decay'])
            pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            d = d * _trust(pn, dn, group['trust_coefficient'])
        state = self.state[p]
        if 'mu' not in state:
            state['mu'] = torch.zeros_like(p)  # as the official code: the first step gives mu = d
        mu = state['mu']
        mu.mul_(group['momentum']).add_(d)
        p.add_(mu, alpha=-group['lr'])

    def _multi(self, group, params, adapt):
        d = [p.grad for p in params]
        if adapt:
            if group['weight_decay'] != 0:
                d = torch._foreach_add(d, params, alpha=group['weight_decay'])
            # Stack the per-tensor norms so the trust ratios cost a few kernels, not a few per tensor.
            pn = torch.stack(torch._foreach_norm(params))
            dn = torch.stack(torch._foreach_norm(d))
            d = torch._foreach_mul(d, _trust(pn, dn, group['trust_coefficient']).unbind())
        for p in params:
            if 'mu' not in self.state[p]:
                self.state[p]['mu'] = torch.zeros_like(p)
        mu = [self.state[p]['mu'] for p in params]
        torch._foreach_mul_(mu, group['momentum'])
        torch._foreach_add_(mu, d)
        torch._foreach_add_(params, mu, alpha=-group['lr'])


class LAMB(_Adaptive):
    """LAMB (You et al. 2020, Algorithm 2) with bias-corrected Adam moments.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    r = m_hat / (sqrt(v_hat) + eps);  for an adapted parameter: r += wd * p;  r *= ||p|| / ||r|| (1 if a
    norm is 0);  p -= lr * r.  The step count t is kept per parameter (a python int: no device sync).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 exclude_1d=True, foreach=None):
        if lr < 0 or weight_decay < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f'invalid LAMB settings: lr={lr} betas={betas} eps={eps} '
                             f'weight_decay={weight_decay}')
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        exclude_1d=exclude_1d, foreach=foreach)
        super().__init__(params, defaults)

    def _init_state(self, p):
        state = self.state[p]
        if 'step' not in state:
            state['step'] = 0
            state['exp_avg'] = torch.zeros_like(p)
            state['exp_avg_sq'] = torch.zeros_like(p)
        state['step'] += 1
        return state

    def _single(self, group, p, adapt):
        (b1, b2), g = group['betas'], p.grad
        state = self._init_state(p)
        m, v, t = state['exp_avg'], state['exp_avg_sq'], state['step']
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(group['eps'])
        r = (m / (1 - b1 ** t)).div_(denom)
        if adapt:
            if group['weight_decay'] != 0:
                r.add_(p, alpha=group['weight_decay'])
            pn, rn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)
            r.mul_(_trust(pn, rn, 1.0))
        p.add_(r, alpha=-group['lr'])

    def _multi(self, group, params, adapt):
        (b1, b2), g = group['betas'], [p.grad for p in params]
        states = [self._init_state(p) for p in params]
        m = [s['exp_avg'] for s in states]
        v = [s['exp_avg_sq'] for s in states]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        # Bias corrections are python floats per tensor (steps may differ if a grad was once missing).
        denom = torch._foreach_div(v, [1 - b2 ** s['step'] for s in states])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group['eps'])
        r = torch._foreach_div(m, [1 - b1 ** s['step'] for s in states])
        torch._foreach_div_(r, denom)
        del denom
        if adapt:
            if group['weight_decay'] != 0:
                torch._foreach_add_(r, params, alpha=group['weight_decay'])
            pn = torch.stack(torch._foreach_norm(params))
            rn = torch.stack(torch._foreach_norm(r))
            torch._foreach_mul_(r, _trust(pn, rn, 1.0).unbind())
        torch._foreach_add_(params, r, alpha=-group['lr'])
