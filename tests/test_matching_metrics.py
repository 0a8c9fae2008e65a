"""matching_metrics.py: the graded wake/sleep distance against its definition computed by hand, its
permutation null's behaviour where the truth is known, and the block diagnostics on networks whose
answer is known (G inverting F exactly, a constant G, F inverting G exactly)."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import matching_metrics as mm
from models import ModelConfig, Networks


def _batches(x, B):
    """A (N, d) tensor as a list of one-layer state batches [x_b]."""
    return [[b] for b in x.split(B)]


def _by_hand(x, y):
    """H by its formula, sample by sample, standardizing by the pooled mean and sd."""
    pooled = torch.cat([x, y]).double()
    z = (pooled - pooled.mean(0)) / pooled.std(0)
    zx, zy, d = z[:len(x)], z[len(x):], x.shape[1]
    dist = lambda a, b: ((a - b).pow(2).sum() / d).sqrt().item()
    across = np.mean([dist(a, b) for a in zx for b in zy])
    within_x = np.mean([dist(a, b) for i, a in enumerate(zx) for j, b in enumerate(zx) if i != j])
    within_y = np.mean([dist(a, b) for i, a in enumerate(zy) for j, b in enumerate(zy) if i != j])
    return (2 * across - within_x - within_y) / (2 * across)


def test_the_distance_is_its_formula_and_the_p_value_counts_the_permutations():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g) + 0.7
    found = mm.graded_distance(_batches(x, 3), _batches(y, 3), {"h0": [0]}, permutations=50, seed=1)["h0"]
    assert found["distance"] == pytest.approx(_by_hand(x, y), rel=1e-6)
    # the null by hand: every assignment of 4 of the 8 batches to the first kind, its H by the formula
    batches = list(torch.cat([x, y]).split(3))
    null = {c: _by_hand(torch.cat([batches[i] for i in c]), torch.cat([batches[i] for i in range(8) if i not in c]))
            for c in itertools.combinations(range(8), 4)}
    assert found["distance"] == pytest.approx(null[(0, 1, 2, 3)], rel=1e-6)
    assert min(null.values()) <= found["null_95"] <= found["null_99"] <= max(null.values()) + 1e-9
    rng = np.random.default_rng(1)
    drawn = [tuple(np.flatnonzero(rng.permutation([1, 1, 1, 1, 0, 0, 0, 0]))) for _ in range(50)]
    exceed = sum(null[c] >= found["distance"] - 1e-12 for c in drawn)
    assert found["p"] == pytest.approx((1 + exceed) / 51)


def test_two_draws_of_one_distribution_lie_inside_the_null_nine_times_in_ten():
    inside = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(80, 6, generator=g), torch.randn(80, 6, generator=g)
        inside += mm.graded_distance(_batches(x, 10), _batches(y, 10), {"h0": [0]}, 199, seed)["h0"]["p"] > 0.05
    assert inside >= 90


def test_the_distance_grows_with_a_mean_shift_and_leaves_its_null():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(400, 20, generator=g), torch.randn(400, 20, generator=g)
    found = [mm.graded_distance(_batches(x, 40), _batches(noise + shift, 40), {"h0": [0]}, 199)["h0"]
             for shift in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)]
    distances = [f["distance"] for f in found]
    assert all(a < b for a, b in zip(distances, distances[1:]))
    assert found[0]["p"] > 0.05 and all(f["p"] <= 0.01 for f in found[2:])  # 2 / 200: H is symmetric, the swap of all labels ties it
    assert distances[-1] < 1


def test_a_batch_coupled_null_rejects_at_its_level():
    """Each batch shifted by its own offset, as BatchNorm couples a batch: both kinds from one
    distribution of batches, so the whole-batch permutation test rejects about 5 % at level 5 %
    (a sample-wise permutation would reject most of these)."""
    rejected = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randn(16, 1, 4, generator=g).repeat_interleave(8, dim=1).reshape(128, 4)
        x = torch.randn(128, 4, generator=g) + offsets
        rejected += mm.graded_distance(_batches(x[:64], 8), _batches(x[64:], 8), {"h0": [0]}, 99, seed)["h0"]["p"] <= 0.05
    assert rejected <= 16  # 8 % of 200


def test_layers_weigh_alike_in_a_set_whatever_their_size():
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(40, 2, generator=g), torch.randn(40, 200, generator=g)
    found = mm.layer_distances({0: small, 1: big}, [0, 1])
    assert found[0].mean().item() == pytest.approx(found[1].mean().item(), rel=0.1)  # both about 2 (2 * unit variance)
    i, j = 3, 7
    z = (small - small.mean(0)) / small.std(0)
    assert found[0][i, j].item() == pytest.approx((z[i] - z[j]).pow(2).sum().item() / 2, rel=1e-5)


# --- The block diagnostics on networks whose answer is known ------------------------------------------

class _ScaledBlocks(nn.Module):
    """A stand-in for G whose block k is a fixed map of hk (2 x hk, or a constant), in every mode."""

    def __init__(self, constant=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.constant = constant

    def block(self, k, h):
        return torch.full_like(h, 0.3) if self.constant else 2 * h


class _Nets(nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.generator = generator


def _chain(n, seed):
    """State batches [h0, .., h5] with h(k-1) = 2 hk exactly, all of one shape."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        states = [torch.randn(10, 3, generator=g)]
        for _k in range(5):
            states.insert(0, 2 * states[0])
        batches.append(states)
    return batches


def test_generator_fit_is_one_for_a_g_that_inverts_f_and_zero_for_a_constant_g():
    wake, sleep = _chain(4, 0), _chain(4, 1)
    exact = mm.generator_fit(_Nets(_ScaledBlocks()), wake, sleep)
    assert all(r["explained"] == pytest.approx(1) and r["residual_rms_wake"] == pytest.approx(0) for r in exact.values())
    constant = mm.generator_fit(_Nets(_ScaledBlocks(constant=True)), wake, sleep)
    assert all(r["explained"] == pytest.approx(0, abs=1e-12) for r in constant.values())
    h = torch.cat([s[0] for s in wake])  # h0 below a constant 0.3: the residual is h0 - 0.3
    assert constant[1]["residual_rms_wake"] == pytest.approx((h.double() - 0.3).pow(2).mean().sqrt().item())


def test_the_positive_control_is_zero_where_f_inverts_g_exactly():
    """A real G; an F that returns, for each dreamed image, the state G dreamed it from."""
    torch.manual_seed(0)
    nets = Networks(ModelConfig(image_size=32, n_filters=4, noise_dim=5, discriminator=False))
    with torch.no_grad():
        sleep = [[h.detach() for h in nets.generator(torch.randn(8, 5, 1, 1))] for _ in range(4)]
    dreamed_from = {s[0].numpy().tobytes(): s for s in sleep}

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return dreamed_from[x.numpy().tobytes()]

    nets.inference = Oracle()
    found = mm.positive_control(nets, sleep, permutations=19)
    for l in range(1, 6):
        # identical samples: the cross pairs hold the 32 zero distances of each state to itself, which the
        # within pairs leave out, so H = -1 / (32 - 1), 0 up to the estimator's bias (1e-5: float32's products)
        assert found[l]["relative_error"] == 0 and found[l]["distance"] == pytest.approx(-1 / 31, abs=1e-5)
    assert found["top_r2"] == pytest.approx(1)
    nets.inference = Networks(ModelConfig(image_size=32, n_filters=4, noise_dim=5, discriminator=False)).inference
    untrained = mm.positive_control(nets, sleep, permutations=19)
    assert untrained[5]["relative_error"] > 0.5 and untrained["top_r2"] < 0.5


def test_one_block_down_from_a_g_that_dreams_the_wake_chain_matches_it():
    """Wake states with h(k-1) = 2 hk: G's block 2 hk carries the other images' hk onto the same
    distribution, so every descent lies near 0; a G that dreams a constant is far at every layer."""
    wake, start = _chain(6, 0), _chain(6, 1)

    class Scaled(_ScaledBlocks):
        def descend(self, h, k):
            states = [h]
            for j in range(k, 0, -1):
                states.append(self.block(j, states[-1]))
            return states[::-1]

    near = mm.descents_from_wake(_Nets(Scaled()), wake, start, permutations=99)
    assert all(r["p"] > 0.01 for k in near for r in near[k].values())
    assert sorted(near[3]) == ["h0", "h1", "h2"]
    far = mm.descents_from_wake(_Nets(Scaled(constant=True)), wake, start, permutations=99)
    assert all(r["distance"] > 0.25 and r["p"] <= 0.02 for k in far for r in far[k].values())
