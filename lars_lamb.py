"""LARS and LAMB: the layer-wise adaptive optimizers of the MoCo v3 paper.

MoCo v3 (Chen, Xie, He, ICCV 2021) trains ResNet-50 with LARS and compares LAMB,
the Adam counterpart of LARS, with AdamW for ViT (its Fig. 3: LAMB is more sensitive to the learning
rate, so ViT keeps AdamW). LARS is You, Gitman, Ginsburg 2017, "Large Batch Training of
Convolutional Networks"; LAMB is You et al. 2020, "Large Batch Optimization for Deep Learning:
Training BERT in 76 Minutes".

Both scale each tensor's update by a trust ratio ||p|| / ||update||. Following the official MoCo v3
LARS, a parameter with p.ndim <= 1 (biases, BatchNorm/LayerNorm gains and shifts) gets neither
weight decay nor the trust ratio (`adapted`); a group with `exclude_1d=False` applies both to every
parameter. One plain loop per tensor, as the official code: a multi-tensor version measured no
faster on CPU (bench.py), see BENCHMARKS.md.
"""
import torch


def adapted(p, group):
    """Does p get weight decay and the trust ratio? Not biases and norm parameters (ndim <= 1),
    as the official LARS; a group saved without `exclude_1d` (the official optimizer state)
    excludes them too."""
    return p.ndim > 1 or not group.get('exclude_1d', True)


def trust_ratio(p, update, coef):
    """coef * ||p|| / ||update||, or 1 when either norm is 0 (torch.where: no host sync)."""
    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
    ok = (p_norm > 0) & (u_norm > 0)
    return torch.where(ok, coef * p_norm / u_norm, torch.ones_like(p_norm))


class LARS(torch.optim.Optimizer):
    """LARS with the official MoCo v3 semantics, bit for bit.

    For an adapted parameter:  d = g + wd * p;  d *= eta * ||p|| / ||d||  (1 if a norm is 0).
    Other parameters:  d = g.  Then  mu = momentum * mu + d;  p -= lr * mu.
    The state key 'mu' matches the official code, so its optimizer state loads here.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001,
                 exclude_1d=True):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f'invalid LARS settings: lr={lr} weight_decay={weight_decay} '
                             f'momentum={momentum} trust_coefficient={trust_coefficient}')
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if adapted(p, group):
                    d = d.add(p, alpha=group['weight_decay'])
                    d = d.mul(trust_ratio(p, d, group['trust_coefficient']))
                state = self.state[p]
                if 'mu' not in state:
                    # as the official code: the first step gives mu = d
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(group['momentum']).add_(d)
                p.add_(mu, alpha=-group['lr'])
        return loss


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2020, Algorithm 2) with bias-corrected Adam moments.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    r = m_hat / (sqrt(v_hat) + eps);  for an adapted parameter: r += wd * p;
    r *= ||p|| / ||r|| (1 if a norm is 0);  p -= lr * r.
    The step count t is kept per parameter (a python int: no device sync).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 exclude_1d=True):
        if lr < 0 or weight_decay < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f'invalid LAMB settings: lr={lr} betas={betas} eps={eps} '
                             f'weight_decay={weight_decay}')
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if 'step' not in state:
                    state.update(step=0, exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state['step'] += 1
                m, v, t = state['exp_avg'], state['exp_avg_sq'], state['step']
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group['eps'])
                r = (m / (1 - b1 ** t)).div_(denom)
                if adapted(p, group):
                    r.add_(p, alpha=group['weight_decay'])
                    r.mul_(trust_ratio(p, r, 1.0))
                p.add_(r, alpha=-group['lr'])
        return loss
