"""Where wake and sleep states differ, graded, and in which block of G the difference is made
(measure_inference.py records all of it; train.py --matching-every records the distance).

The graded distance. The two-sample test's accuracy (inference_metrics) reads 1.000 for trained and
untrained networks alike: once some linear map separates the samples it cannot say by how much. Beside
it, of wake states X and sleep states Y of a feature set, the normalized energy distance

    H = (2 E|X - Y| - E|X - X'| - E|Y - Y'|) / (2 E|X - Y|),

|.| the Euclidean distance over the set's entries, each entry standardized by the mean and sd of both
samples pooled, each layer's squared distance divided by its number of entries (so that h1's 8,192
entries do not drown h5's 40). Chosen because:
- it is 0 where the two distributions are equal and positive for any difference (energy distance is a
  metric on distributions, Szekely & Rizzo 2013), and it keeps growing after a linear map separates the
  samples: it measures how far apart they lie against how much each varies, on a scale of 0 to 1 that
  reads alike for every layer and model;
- it needs no fit and no tuning: one matrix of distances, after which each permutation of the null costs
  sums over a (batches x batches) table;
- a Frechet distance, the other candidate, needs an 8,192 x 8,192 covariance from a few thousand samples.

The null permutes the wake/sleep labels of whole batches. A batch's states share BatchNorm's statistics
(and G dreams a batch together), so samples of one batch are not exchangeable with the other kind's;
whole batches are, under the hypothesis that wake and sleep match. The p-value is then exact for any
coupling within a batch.
"""
import sys

import numpy as np
import torch

from data import seeded_draw
from inference_metrics import (N_LAYERS, discriminator_separation, eval_mode, feature_sets, sleep_states,
                               wake_sleep_two_sample, wake_states)
from step import training_mode
from utils import isolated_rng

PERMUTATIONS = 999  # the smallest p-value is 1 / 1000, below the 0.01 the matching criterion reads


# --- The graded distance and its null -----------------------------------------------------------------

def layer_distances(samples, layers):
    """{layer: (N, N) float64 squared Euclidean distances between the rows of samples[l] (N, ...)
    standardized per entry by the pooled mean and sd, divided by the layer's number of entries}."""
    found = {}
    for l in layers:
        x = samples[l].flatten(1).double()
        sd = x.std(dim=0)
        z = ((x - x.mean(dim=0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).float()  # a constant entry adds 0
        norms = z.double().pow(2).sum(dim=1)
        # the product in float32, at half the time: H moves by about 1e-6 (tests), the sums in float64
        d2 = norms[:, None] + norms[None, :] - 2 * (z @ z.T).double()
        found[l] = d2.clamp_(min=0).fill_diagonal_(0) / x.shape[1]
    return found


def _energy(S, groups, n_first, n_second):
    """H for each row of groups (P, n_batches; 1 = the first sample's batch) from the batch-sum table S."""
    other = 1 - groups
    within_first = np.einsum("pi,ij,pj->p", groups, S, groups) / (n_first * (n_first - 1))
    within_second = np.einsum("pi,ij,pj->p", other, S, other) / (n_second * (n_second - 1))
    across = np.einsum("pi,ij,pj->p", groups, S, other) / (n_first * n_second)
    return (2 * across - within_first - within_second) / (2 * across)


def graded_distance(first, second, sets=None, permutations=PERMUTATIONS, seed=0):
    """{set: {"distance", "null_95", "null_99", "p"}} of two lists of state batches (each batch a list
    [h0, ..] of tensors, all batches of one size): H of the module docstring per feature set
    (default: feature_sets()), the 95th and 99th percentile of its permutation null, and the
    permutation p-value (1 + #{null >= H}) / (1 + permutations), None for 0 permutations. The
    permutations are seeded by seed."""
    sets = feature_sets() if sets is None else sets
    sizes = {len(b[0]) for b in first + second}
    if len(sizes) != 1 or len(first) < 2 or len(second) < 2:
        raise ValueError(f"needs at least 2 batches of each kind, all of one size; got {len(first)} and "
                         f"{len(second)} of sizes {sorted(sizes)}")
    B, n_batches = sizes.pop(), len(first) + len(second)
    layers = sorted({l for ls in sets.values() for l in ls})
    d2 = layer_distances({l: torch.cat([b[l] for b in first + second]) for l in layers}, layers)
    member = torch.zeros(n_batches * B, n_batches, dtype=torch.float64)
    member[torch.arange(n_batches * B), torch.arange(n_batches).repeat_interleave(B)] = 1
    rng = np.random.default_rng(seed)
    observed = np.zeros((1, n_batches))
    observed[0, :len(first)] = 1
    shuffled = np.stack([rng.permutation(observed[0]) for _ in range(permutations)] or [observed[0]])
    results = {}
    for name, ls in sets.items():
        S = (member.T @ sum(d2[l] for l in ls).sqrt() @ member).numpy()  # summed distances, batch by batch
        n1, n2 = len(first) * B, len(second) * B
        h = float(_energy(S, observed, n1, n2)[0])
        results[name] = {"distance": h, "null_95": None, "null_99": None, "p": None}
        if permutations:
            null = _energy(S, shuffled, n1, n2)
            results[name].update(null_95=float(np.quantile(null, 0.95)), null_99=float(np.quantile(null, 0.99)),
                                 p=float((1 + (null >= h).sum()) / (1 + permutations)))
    return results


def layer_sets(layers):
    """{"h<l>": [l]}: one feature set a layer."""
    return {f"h{l}": [l] for l in layers}


# --- Where the match breaks, block by block -------------------------------------------------------------

@torch.no_grad()
def generator_fit(nets, wake_batches, sleep_batches):
    """{k (1..5): {"explained", "residual_rms_wake", "residual_rms_sleep"}}: how well G's noiseless
    block k of the inferred hk (eval mode: N and all, no noise) predicts the inferred h(k-1).

    explained = 1 - sum over entries of Var(h(k-1) - b_k(hk)) / sum of Var(h(k-1)), variances across
    the wake samples: 1 where G's block gives the inferred layer exactly, 0 where it explains nothing
    of how the layer varies (a constant block). A constant offset does not count against it; the
    residual's root mean square shows it, beside the same on sleep states, where it is G's own noise
    as its ReLU passes it on: the spread G dreams with, to read the inferred spread against."""
    G = nets.generator
    device = next(G.parameters()).device
    found = {}
    with eval_mode(G):
        for k in range(1, N_LAYERS):
            rms = {}
            for kind, batches in (("wake", wake_batches), ("sleep", sleep_batches)):
                target = torch.cat([s[k - 1] for s in batches]).flatten(1).double()
                residual = target - torch.cat([G.block(k, s[k].to(device)).cpu() for s in batches]).flatten(1).double()
                rms[kind] = residual.pow(2).mean().sqrt().item()
                if kind == "wake":
                    total = target.var(dim=0).sum().item()
                    explained = 1 - residual.var(dim=0).sum().item() / total if total > 0 else float("nan")
            found[k] = {"explained": explained, "residual_rms_wake": rms["wake"], "residual_rms_sleep": rms["sleep"]}
    return found


@torch.no_grad()
def descents_from_wake(nets, wake_batches, start_batches, permutations=PERMUTATIONS, seed=0):
    """{k (1..5): {l (< k): graded distance}}: G's descent from the wake states hk of other images
    (start_batches), in training mode (its noise on, as it dreams), against the wake states h_l of
    wake_batches. [k][k-1] is one block down: each block's own share of the mismatch, given a real
    wake state above it; [5][l] is close to the full dream, started from inferred rather than N(z)."""
    G = nets.generator
    device = next(G.parameters()).device
    found = {}
    with training_mode(nets):
        for k in range(1, N_LAYERS):
            dreamed = [[h.cpu() for h in G.descend(s[k].to(device), k)] for s in start_batches]
            found[k] = graded_distance(wake_batches, dreamed, layer_sets(range(k)), permutations, seed)
    return found


@torch.no_grad()
def positive_control(nets, sleep_batches, permutations=PERMUTATIONS, seed=0):
    """F on G's own dreams, where the true cause of each image is known: {l (1..5): {"distance",
    "null_99", "p", "relative_error"}} of F's state h_l of the dreamed image h0 (training mode, as wake
    states are inferred) against the state h_l G dreamed it from, and "top_r2": the fraction of the
    variance of N(z) (G's h5) that F's h5 recovers. relative_error = sqrt(sum |F_l - h_l|^2 / sum |h_l|^2)
    over samples and entries: 0 where F inverts G exactly."""
    F = nets.inference
    device = next(F.parameters()).device
    with training_mode(nets):
        inferred = [[h.cpu() for h in F(s[0].to(device))] for s in sleep_batches]
    layers = range(1, N_LAYERS)
    distance = graded_distance(inferred, sleep_batches, layer_sets(layers), permutations, seed)
    found = {}
    for l in layers:
        f = torch.cat([s[l] for s in inferred]).flatten(1).double()
        h = torch.cat([s[l] for s in sleep_batches]).flatten(1).double()
        found[l] = {**distance[f"h{l}"], "relative_error": ((f - h).pow(2).sum() / h.pow(2).sum()).sqrt().item()}
    found["top_r2"] = (1 - (f - h).pow(2).sum() / (h - h.mean(dim=0)).pow(2).sum()).item()  # l = 5 here
    return found


# --- During training ------------------------------------------------------------------------------------

class MatchingDuringTraining:
    """train.py --matching-every K: wake_sleep_two_sample and graded_distance of fixed training images'
    wake states against fresh dreams, every K epochs, as metrics two_sample_<feature set> and
    distance_<feature set> (metrics.csv, TensorBoard, the curves figure), and D's own AUROC of the same
    wake states above the sleep states as d_auroc: whether training brings wake and sleep together,
    where it stalls, and whether D keeps its ordering (above 0.5) while F opposes it. Its own
    seeded random numbers, BatchNorm's running statistics untouched (wake_states, sleep_states): the
    run's steps, and exact resume, are as without it."""

    N_BATCHES = 10  # 5 pairs fitted, 5 scored: a tenth of measure_inference's cost, a wider interval

    def __init__(self, images, batch_size, device):
        self.images = images.to(device).split(batch_size)
        self.batch_size, self.device = batch_size, device

    @classmethod
    def of_run(cls, images, batch_size, device):
        """For a run's training images (a tensor, or None where they are not held in memory); None,
        said once, where there are fewer than the 4 batches the test needs."""
        n = (len(images) // batch_size if images is not None else 0)
        if n < 4:
            print(f"note: --matching-every needs at least 4 batches of -b {batch_size} training images held "
                  f"in memory (digits, MNIST, CIFAR-10); not measured", file=sys.stderr)
            return None
        return cls(seeded_draw(images, min(n, cls.N_BATCHES) * batch_size, seed=2), batch_size, device)

    def __call__(self, nets):
        with isolated_rng(2):
            wake = wake_states(nets, self.images)
            sleep = sleep_states(nets, len(wake), self.batch_size, self.device)
            separation = discriminator_separation(nets, wake, sleep)  # D's noise on, as in training
        accuracy = wake_sleep_two_sample(wake, sleep, seed=2)
        distance = graded_distance(wake, sleep, permutations=0)  # the null is measure_inference.py's
        return {**{f"two_sample_{name}": r["accuracy"] for name, r in accuracy.items()},
                **{f"distance_{name}": r["distance"] for name, r in distance.items()},
                **({"d_auroc": separation["auroc"]} if separation else {})}
