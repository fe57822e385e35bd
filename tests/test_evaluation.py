"""evaluation.evaluate (exact sums, one sync) and SpikeMonitor on hand-made gradient sequences:
a tiny model whose .grad is set by hand, so every norm, median and ratio is known exactly."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402


class Tiny(nn.Module):
    """The two layers SpikeMonitor watches on a ViT: patch_embed.proj and the last block."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(4, 1, bias=False)
        self.blocks = nn.ModuleList([nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False)])


def set_norms(model, first, last):
    """Gradients of L2 norm `first` (patch projection) and `last` (last block): 4 entries of
    norm / 2 each; None leaves a layer without gradient."""
    for layer, norm in ((model.patch_embed.proj, first), (model.blocks[-1], last)):
        layer.weight.grad = None if norm is None else torch.full_like(layer.weight, norm / 2)


def feed(spikes, model, norms):
    """record() once per (first, last) pair."""
    for first, last in norms:
        set_norms(model, first, last)
        spikes.record()


@pytest.fixture
def tiny():
    model = Tiny()
    return model, evaluation.SpikeMonitor(model, window=100, factor=10.0, warmup=20)


WARMUP = [(100.0, 300.0)] * 20          # the first steps' large norms: never in the median


def test_a_jump_after_warmup_is_a_spike_with_its_ratio_and_step(tiny):
    model, spikes = tiny
    feed(spikes, model, WARMUP)
    assert 'spike' not in spikes.summary()
    feed(spikes, model, [(1.0, 3.0), (2.0, 3.0)] * 5)               # steps 20-29: the scale
    row = spikes.summary()
    assert row == dict(grad_first=2.0, grad_last=3.0, grad_first_max=2.0, grad_last_max=3.0)
    feed(spikes, model, [(1.0, 3.0), (20.0, 3.0), (2.0, 3.0)])    # steps 30, 31, 32
    row = spikes.summary()
    # median of 1, 2, ..., 1, 2, 1 (11 norms) = 1: 20x at step 31. Had the warm-up's 100s stayed
    # in the window, the median would be 100 and nothing a spike.
    assert row == dict(grad_first=2.0, grad_last=3.0, grad_first_max=20.0, grad_last_max=3.0,
                       spike='grad_first', spike_ratio=20.0, spike_step=31)
    # the next summary starts afresh; the spike joined the median's window (still 2)
    feed(spikes, model, [(2.0, 3.0)])
    assert spikes.summary() == dict(grad_first=2.0, grad_last=3.0, grad_first_max=2.0,
                                    grad_last_max=3.0)


def test_the_largest_spike_of_the_interval_is_reported(tiny):
    model, spikes = tiny
    feed(spikes, model, WARMUP + [(2.0, 1.0)] * 10 + [(30.0, 1.0), (2.0, 50.0), (2.0, 1.0)])
    row = spikes.summary()
    assert (row['spike'], row['spike_ratio'], row['spike_step']) == ('grad_last', 50.0, 31)
    assert row['grad_first_max'] == 100.0 and row['grad_last'] == 1.0


def test_no_spike_within_warmup_nor_before_10_norms_after_it(tiny):
    model, spikes = tiny
    feed(spikes, model, [(1.0, 3.0)] * 5 + [(100.0, 300.0)] + [(1.0, 3.0)] * 14)
    row = spikes.summary()
    assert 'spike' not in row and row['grad_first_max'] == 100.0 and row['grad_last_max'] == 300.0
    feed(spikes, model, [(1.0, 3.0)] * 9 + [(100.0, 3.0)])           # 9 norms: no scale yet
    assert 'spike' not in spikes.summary()


def test_a_resumed_run_counts_steps_globally():
    model = Tiny()
    spikes = evaluation.SpikeMonitor(model, warmup=0, first_step=780)
    feed(spikes, model, [(1.0, 3.0)] * 10 + [(20.0, 3.0)])
    assert spikes.summary()['spike_step'] == 790


@pytest.mark.parametrize('bad', [math.inf, math.nan])
def test_a_skipped_fp16_step_is_dropped_not_logged(tiny, bad):
    """inf/nan gradients (a step GradScaler skipped): None in the row, no spike, and kept out
    of the median: the next real jump is measured against the finite norms alone."""
    model, spikes = tiny
    feed(spikes, model, WARMUP)
    spikes.summary()
    feed(spikes, model, [(1.0, 3.0)] * 13 + [(2.0, 3.0)] * 12 + [(bad, bad)])
    row = spikes.summary()
    json.dumps(row, allow_nan=False)                               # no NaN, no Infinity
    assert row == dict(grad_first=None, grad_last=None, grad_first_max=2.0, grad_last_max=3.0)
    feed(spikes, model, [(bad, 3.0)] * 5 + [(15.0, 3.0)])
    row = spikes.summary()
    # the median of the 25 finite norms is 1 (with the 6 bad ones it would be 2: no spike)
    assert row == dict(grad_first=15.0, grad_last=3.0, grad_first_max=15.0, grad_last_max=3.0,
                       spike='grad_first', spike_ratio=15.0, spike_step=51)


def test_a_frozen_layer_gives_none(tiny):
    model, spikes = tiny
    model.patch_embed.proj.weight.requires_grad_(False)         # the paper's frozen projection
    feed(spikes, model, [(None, 3.0)] * 30 + [(None, 40.0)])
    row = spikes.summary()
    assert row == dict(grad_first=None, grad_last=40.0, grad_first_max=None, grad_last_max=40.0,
                       spike='grad_last', spike_ratio=40.0 / 3.0, spike_step=30)


def test_record_reads_no_value_and_summary_syncs_once(monkeypatch):
    """record() runs on meta tensors, which hold no values: any .item(), .tolist(), .cpu() or
    Python comparison of a norm would raise there. summary() copies all the norms at once."""
    with torch.device('meta'):
        model = Tiny()
    spikes = evaluation.SpikeMonitor(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for _ in range(3):
        spikes.record()
    assert all(t.device.type == 'meta' for norms in spikes.pending for t in norms.values())

    model, copies = Tiny(), []
    spikes = evaluation.SpikeMonitor(model)
    feed(spikes, model, [(1.0, 2.0)] * 3)
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: copies.append(t.shape) or tolist(t))
    monkeypatch.setattr(torch.Tensor, 'item', lambda t: pytest.fail('.item() syncs'))
    assert spikes.summary()['grad_last'] == 2.0
    assert copies == [torch.Size([6])]                  # 3 steps x 2 layers, one copy


def test_evaluate_sums_exactly_with_one_sync(monkeypatch):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(8, 7)
    x, y = torch.randn(50, 8, generator=g), torch.randint(0, 7, (50,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]     # 16, 16, 16, 2
    with torch.no_grad():
        out = model(x)
    top5 = (out.topk(5, dim=1).indices == y[:, None]).any(dim=1)
    top1_hits, top5_hits = int((out.argmax(1) == y).sum()), int(top5.sum())
    monkeypatch.setattr(torch.Tensor, 'item', lambda t: pytest.fail('.item() in the loop'))
    stats = evaluation.evaluate(model, batches, torch.device('cpu'))
    assert stats['top1'] == 100 * top1_hits / 50 and stats['top5'] == 100 * top5_hits / 50
    assert stats['loss'] == pytest.approx(F.cross_entropy(out, y).tolist(), rel=1e-6)
