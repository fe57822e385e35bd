"""Evaluation of a backbone: frozen features, weighted kNN, top-k accuracy, a classifier's scores,
and the gradient-spike monitor of pretraining.

The paper's metric is linear probing (train_linear.py); kNN on frozen features
(Wu et al. 2018, as DINO) is the cheap monitor that pretraining logs every epoch; fine-tuning scores
its classifier with `evaluate`. All of it runs under torchrun: each process embeds or scores its own
share, and the results are gathered.
`SpikeMonitor` watches what the paper watches while training: the gradient norm of the first layer,
without a host sync per step.
"""
import collections
import math
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def extract_features(model, loader, device, amp_dtype=None):
    """Backbone features of every image of `loader` (eval mode, no grad) ->
    ((N, D) float32, (N,) int64), on the CPU. Under torchrun the loader is expected to use a
    DistributedSampler(shuffle=False): each rank embeds every world_size-th image, and the gather
    below interleaves them back into dataset order."""
    model = getattr(model, 'module', model)              # unwrap DDP
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = model.forward_features(images)            # (B, D)
        feats.append(f.float())
        labels.append(target.to(device))
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    if _distributed() and isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        world = dist.get_world_size()
        # DistributedSampler(shuffle=False) gives rank r the indices r, r + W, r + 2W, ...
        # (padded to equal length by repeating the first ones), so stacking (W, n, D) -> (n, W, D)
        # restores dataset order.
        all_f = [torch.empty_like(feats) for _ in range(world)]
        all_l = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_f, feats)
        dist.all_gather(all_l, labels)
        n = len(loader.dataset)
        feats = torch.stack(all_f, 1).flatten(0, 1)[:n]
        labels = torch.stack(all_l, 1).flatten(0, 1)[:n]
    return feats.cpu(), labels.cpu()


@torch.no_grad()
def knn_neighbours(train_feats, query_feats, k):
    """Each query's k most cosine-similar training features, most similar first: the neighbours
    that vote in `knn_predict` (and that labs/look.py draws).
    (N, D), (Q, D) -> similarities (Q, k), indices into train_feats (Q, k); k at most N."""
    train_feats = F.normalize(train_feats.float(), dim=1)     # (N, D)
    query_feats = F.normalize(query_feats.float(), dim=1)     # (Q, D)
    k = min(k, train_feats.shape[0])
    chunk = max(1, 2 ** 24 // max(1, train_feats.shape[0]))   # bound the (chunk, N) matrix
    sims, idxs = [], []
    for q in query_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)         # (q, k)
        sims.append(sim)
        idxs.append(idx)
    return torch.cat(sims), torch.cat(idxs)


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=20, T=0.07):
    """Weighted kNN (Wu et al. 2018, as used by DINO): each query's k most cosine-similar training
    features vote for their labels with weight exp(sim / T).
    (N, D), (N,), (Q, D) -> class scores (Q, C)."""
    sim, idx = knn_neighbours(train_feats, query_feats, k)   # (Q, k) each
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    votes.scatter_add_(1, train_labels.to(sim.device)[idx], (sim / T).exp())
    return votes


def knn_top1(model, train_loader, val_loader, num_classes, device, amp_dtype=None):
    """kNN top-1 (%) of the val images against the labelled train images, on `model`'s features."""
    train_f, train_l = extract_features(model, train_loader, device, amp_dtype)
    val_f, val_l = extract_features(model, val_loader, device, amp_dtype)
    scores = knn_predict(train_f.to(device), train_l.to(device), val_f.to(device), num_classes)
    return accuracy(scores.cpu(), val_l)[0]


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Percentage of rows of output (B, C) whose target (B,) is among the k highest scores,
    for each k. k larger than C counts as C (with 3 classes, top-5 is 100%)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices                              # (B, maxk)
    correct = pred == target[:, None]                                    # (B, maxk)
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100.0 for k in topk]


@torch.no_grad()
def evaluate(model, batches, device, amp_dtype=None):
    """Top-1, top-5 (%) and mean cross-entropy of `model` over (inputs, target) batches,
    in eval mode. Under torchrun the sums are all-reduced: give each rank its own share of the
    images, each image once (a padded DistributedSampler would count its few repeated
    images twice). The sums stay on the device until the end: one sync, not three a batch."""
    model.eval()
    # loss, top-1 hits, top-5 hits, images: float64 keeps the counts exact up to 2^53 images
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for inputs, target in batches:
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(inputs)
        output = output.float()
        hits = output.topk(min(5, output.shape[1]), dim=1).indices == target[:, None]  # (B, 5)
        sums[0] += F.cross_entropy(output, target, reduction='sum')
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        sums[3] += len(target)
    if _distributed():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return dict(top1=100 * top1 / n, top5=100 * top5 / n, loss=loss / n)


class SpikeMonitor:
    """The paper's instability signal (Sec. 4.1, Fig. 4): a spike of the gradient norm of the first
    layer (the patch projection, or a ResNet's conv1) precedes each dip of the training curve,
    and the last block's follows it.

        spikes = SpikeMonitor(backbone)
        spikes.record()          # every step, right after scaler.step(optimizer): no sync
        row = spikes.summary()   # at a logged step: one sync for all the steps since the last

    A step's norm is a spike when it exceeds `factor` x the median of the `window` finite norms
    before it. The first `warmup` norms are neither checked nor kept: the large gradients of the
    first steps would raise the median, and with it the threshold, for a whole window; checking
    starts once 10 norms after them were seen.
    Non-finite norms, of the steps the fp16 GradScaler skips, are dropped: never a spike, never in
    the median, None in the row. A layer without gradient (a frozen patch projection) gives None."""

    def __init__(self, backbone, window=100, factor=10.0, warmup=20, first_step=0):
        vit = hasattr(backbone, 'blocks')
        self.layers = dict(grad_first=backbone.patch_embed.proj if vit else backbone.conv1,
                           grad_last=backbone.blocks[-1] if vit else backbone.layer4[-1])
        self.factor, self.warmup = factor, warmup
        self.history = {k: collections.deque(maxlen=window) for k in self.layers}  # finite norms
        self.seen = dict.fromkeys(self.layers, 0)           # finite norms so far, per layer
        self.pending = []      # per step since the last summary: {layer: 0-dim norm or None}
        self.steps = first_step  # the global index of the next recorded step (resumed runs)

    @torch.no_grad()
    def record(self):
        """Queues this step's gradient norms, computed on their device without waiting for them."""
        norms = {}
        for k, layer in self.layers.items():
            grads = [p.grad for p in layer.parameters() if p.grad is not None]
            norms[k] = torch.nn.utils.get_total_norm(grads) if grads else None
        self.pending.append(norms)

    def summary(self):
        """The norms since the last summary -> {'grad_first', 'grad_last': the latest step's,
        'grad_first_max', 'grad_last_max': the largest} and, if a step since then had one,
        {'spike': its layer, 'spike_ratio': norm / running median, 'spike_step': the step's
        global index, from 0}: the largest spike of the interval."""
        queued = [t.float() for norms in self.pending for t in norms.values() if t is not None]
        values = iter(torch.stack(queued).tolist() if queued else [])   # the one sync
        row = {f'{k}{end}': None for k in self.layers for end in ('', '_max')}
        spike = {}
        for norms in self.pending:
            for k, t in norms.items():
                v = None if t is None else next(values)
                # the latest step's norm; None without gradient or if inf/nan (a skipped step)
                row[k] = v if v is not None and math.isfinite(v) else None
                if row[k] is None:
                    continue
                row[k + '_max'] = max(row[k + '_max'] or 0.0, row[k])
                ratio = self._ratio_to_median(k, row[k])
                if ratio > self.factor and ratio > spike.get('spike_ratio', 0.0):
                    spike = dict(spike=k, spike_ratio=ratio, spike_step=self.steps)
            self.steps += 1
        self.pending = []
        return {**row, **spike}

    def _ratio_to_median(self, k, v):
        """v / the median of layer k's previous `window` finite norms after the warmup (0 before
        10 of them, or without a scale: a median of 0); v then joins them."""
        self.seen[k] += 1
        if self.seen[k] <= self.warmup:
            return 0.0
        past = self.history[k]
        median = statistics.median(past) if len(past) >= 10 else 0.0
        past.append(v)
        return v / median if median > 0 else 0.0
