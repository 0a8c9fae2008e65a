"""How well the inference network F infers: measures of a trained model (measure_inference.py runs them).

- Reconstruction: an image x goes up through F to its wake state h_k, then down G's path from layer k
  to an image x_hat (`reconstructions`); `reconstruction_error` is the squared error per pixel. If
  F's posterior and G's generative model agree, G carries what F inferred back to the image.
- Label agreement (digits): whether sample_quality's digit classifier gives x_hat the label of x.
- Wake/sleep two-sample test (`wake_sleep_two_sample`): how well a fresh linear classifier, not D,
  tells wake states F(x) from sleep states G(z), layer by layer, pair by pair and as a whole. The
  algorithm's goal is that it cannot (accuracy 0.5). `null_two_sample` is the same test on wake
  states of two random halves of the training images: what "cannot" looks like at this sample size.
- What differs between wake and sleep states: each layer's statistics (`layer_statistics`), how far
  each layer lies from the layer G would dream below the one above it (`prediction_residuals`: on
  sleep states G's noise, on wake states the spread inference shows), and how well D itself tells them
  apart (`discriminator_separation`).

None of these needs the wake/sleep discriminator: a checkpoint without one is measured the same way.
"""
import contextlib

import numpy as np
import torch

import fid
from data import to_unit_range
from sample_quality import features_and_probabilities
from stats import auroc, mean_interval
from step import training_mode

KS = (5, 4, 3, 2, 1)  # the layer a reconstruction starts from: 5 is the whole hierarchy
N_LAYERS = 6  # h0 (the image) .. h5


# --- Reconstruction ---------------------------------------------------------------------------------

@torch.no_grad()
def reconstructions(nets, x, k):
    """x_hat = G's path from layer k down to the image, started at F's h_k of the images x.

    Both networks in eval mode: F's BatchNorm on its running statistics, so each image's x_hat does
    not depend on the others in its batch, and G without noise. F's sampling noise stays on (F is
    a sampler of the posterior by the model's design, docs/algorithm.md), so x_hat is one sample.
    The networks' modes are restored afterwards."""
    F, G = nets.inference, nets.generator
    with eval_mode(F, G):
        return G.descend(F(x, to_layer=k)[k], k)[0]


@contextlib.contextmanager
def eval_mode(*networks):
    """The networks in eval mode, each put back in its own mode afterwards."""
    modes = [n.training for n in networks]
    for n in networks:
        n.eval()
    try:
        yield
    finally:
        for n, mode in zip(networks, modes):
            n.train(mode)


def reconstruction_error(nets, images, ks=KS):
    """{k: per-image mean squared error per pixel of its reconstruction from layer k (numpy (N,))},
    in the images' own units: [-1, 1], so 0 is exact and 4 the largest possible. `images` is an
    iterable of batches on the networks' device."""
    errors = {k: [] for k in ks}
    for x in images:
        for k in ks:
            errors[k].append((reconstructions(nets, x, k) - x).pow(2).flatten(1).mean(dim=1).cpu())
    return {k: torch.cat(e).double().numpy() for k, e in errors.items()}


def label_agreement(classifier, images, labels):
    """Per image (float, [-1, 1]), whether the digit classifier (sample_quality.DigitClassifier)
    gives it its label: numpy bool (N,). Quantized to 8 bits first, as sample_quality scores samples."""
    x = to_unit_range(fid.to_uint8(images.detach().cpu().float()))
    return features_and_probabilities(classifier, x)[1].argmax(1) == labels.cpu().numpy()


# --- States, as D sees them in training ---------------------------------------------------------------

@torch.no_grad()
def wake_states(nets, images):
    """F's state [h0, .., h5] (CPU tensors) of each batch of images, in training mode: BatchNorm on
    the batch's own statistics, as D sees wake states during training. BatchNorm's running
    statistics are left as they were, so the checkpoint's networks are unchanged."""
    with training_mode(nets):
        return [[h.cpu() for h in nets.inference(x)] for x in images]


@torch.no_grad()
def sleep_states(nets, n_batches, batch_size, device):
    """G's state [h0, .., h5] of n_batches batches of z ~ N(0, I), in training mode (G's noise on),
    as D sees sleep states during training; nothing of the networks changes."""
    with training_mode(nets):
        return [[h.cpu() for h in nets.generator(torch.randn(batch_size, nets.cfg.noise_dim, 1, 1, device=device))]
                for _ in range(n_batches)]


# --- What differs between wake and sleep states ----------------------------------------------------------

def layer_statistics(batches):
    """{layer l (1..5): {"channel_rms", "zeros", "mean", "sd"}} of a list of state batches [h0, .., h5]:
    the mean over samples and pixels of the root mean square over channels (1 where N came last),
    the fraction of entries exactly 0 (what a ReLU removed), the mean entry, and the mean over
    entries of an entry's standard deviation across samples (how much the layer varies)."""
    found = {}
    for l in range(1, N_LAYERS):
        h = torch.cat([states[l] for states in batches]).double()
        found[l] = {"channel_rms": h.pow(2).mean(dim=1).sqrt().mean().item(),
                    "zeros": (h == 0).double().mean().item(), "mean": h.mean().item(),
                    "sd": h.std(dim=0).mean().item()}
    return found


def largest_mean_differences(wake_batches, sleep_batches):
    """{layer l (1..5): max over the layer's entries of |mean over wake states - mean over sleep
    states|}: the largest difference a linear map of the layer can pick up on its own (read it
    against layer_statistics' "sd", how much one entry varies across samples)."""
    return {l: (torch.cat([s[l] for s in wake_batches]).double().mean(dim=0)
                - torch.cat([s[l] for s in sleep_batches]).double().mean(dim=0)).abs().max().item()
            for l in range(1, N_LAYERS)}


@torch.no_grad()
def prediction_residuals(nets, batches):
    """{k (1..5): mean |h_(k-1) - b_k(h_k)| per entry} of a list of state batches, where b_k is G's
    block k without its noise (eval mode): the layer G would dream below h_k, N and all.

    On sleep states this is G's own noise, as the ReLU and N pass it on: the spread of G's dreamed
    layer given the one above. On wake states it is the spread of the inferred layer around the
    layer G would dream from the inferred one above. Where the two differ, G dreams each layer
    given the one above with another spread than inference shows it."""
    G = nets.generator
    device = next(G.parameters()).device
    totals = {k: 0.0 for k in range(1, N_LAYERS)}
    count = 0
    with eval_mode(G):
        for states in batches:
            count += len(states[0])
            for k in totals:
                dreamed = G.block(k, states[k].to(device))
                totals[k] += (states[k - 1].to(device) - dreamed).abs().flatten(1).mean(dim=1).sum().item()
    return {k: t / count for k, t in totals.items()}


@torch.no_grad()
def discriminator_separation(nets, wake_batches, sleep_batches):
    """How well D itself tells the same wake states from sleep states: {"wake", "sleep"} (mean
    scores), "margin" (their difference), "margin_sd" (it over the pooled standard deviation of the
    scores) and "auroc" (the probability that a wake state scores above a sleep state; 0.5 = D
    cannot tell). None for a model without D. D's own noise is on, as in training."""
    D = nets.discriminator
    if D is None:
        return None
    device = next(D.parameters()).device

    def scores(batches):
        return torch.cat([D([h.to(device) for h in states]).double().cpu() for states in batches]).numpy()

    wake, sleep = scores(wake_batches), scores(sleep_batches)
    pooled = np.sqrt((wake.var(ddof=1) + sleep.var(ddof=1)) / 2)
    margin = float(wake.mean() - sleep.mean())
    return {"wake": float(wake.mean()), "sleep": float(sleep.mean()), "margin": margin,
            "margin_sd": margin / pooled if pooled > 0 else float("nan"), "auroc": float(auroc(wake, sleep))}


# --- Two-sample tests --------------------------------------------------------------------------------

def feature_sets():
    """name -> the layers a classifier sees: each layer, each adjacent pair (what one of D's hidden
    blocks sees), the whole state."""
    sets = {f"h{l}": [l] for l in range(N_LAYERS)}
    sets.update({f"h{l},h{l + 1}": [l, l + 1] for l in range(N_LAYERS - 1)})
    sets["whole"] = list(range(N_LAYERS))
    return sets


def _rows(kinds, batches, layers):
    """Features of the given batches of both kinds, the first kind's rows first: (2 * len(batches) * B, D)."""
    return np.concatenate([torch.cat([kind[i][l].flatten(1) for l in layers], dim=1).float().numpy()
                           for kind in kinds for i in batches])


def _is_wake(n_batches, B):
    """The labels of _rows's rows: n_batches wake batches of B, then as many sleep batches."""
    return np.repeat([True, False], n_batches * B)


def _classifier(n_features, n_rows, C, max_components, seed):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # whiten: the components at unit variance, so that the L2 penalty weighs each alike
    pca = PCA(min(max_components, n_features, n_rows), whiten=True, random_state=seed)
    return make_pipeline(StandardScaler(), pca, LogisticRegression(C=C, max_iter=1000))


def wake_sleep_two_sample(wake_batches, sleep_batches, seed=0, C=1.0, max_components=256, level=0.95):
    """How well a fresh classifier tells wake states from sleep states: {feature set: {"accuracy",
    "low", "high"}} (feature_sets; 0.5 = indistinguishable), from lists of batches, each batch a
    list [h0, .., h5] of tensors of B samples, B the same for all and as many batches of each kind.

    Whole batches are held out. In training mode a batch's states share its BatchNorm statistics
    (and G's states are dreamed together), so samples of one batch are not independent: a
    classifier fitted on some samples of a batch could recognise that batch in the others. The
    i-th wake and i-th sleep batch form pair i; a random half of the pairs (seeded) is fitted, the
    other half scored.

    The classifier: standardize, PCA to at most max_components (fitted on the fitting half
    only), L2 logistic regression with a fixed C. Linear after PCA because it is cheap, needs no
    tuning (no hyperparameter search that would need a third split), and is the kind of map D
    itself is (one linear map per adjacent pair, then a nonlinearity): a difference this finds is
    one D could find. And a test that a linear classifier passes at 1.0 is already decisive.

    The interval: per held-out pair, the balanced accuracy (mean of the wake batch's and the sleep
    batch's accuracy); the mean over held-out pairs with its t-interval across pairs. Held-out
    pairs are independent draws given the fitted classifier (F's and G's weights are fixed, and
    nothing couples two batches), so the interval is valid for whole-batch holding out. It answers
    the test's question, whether this classifier beats chance on new batches (the classifier
    two-sample test of Lopez-Paz & Oquab 2017, arXiv:1610.06545), and needs one fit per feature
    set: repeating over R random splits would cost R fits of a PCA of up to tens of thousands of
    features. Its width does not include the variation between fitting halves."""
    if len(wake_batches) != len(sleep_batches) or len(wake_batches) < 4:
        raise ValueError(f"needs as many wake as sleep batches, at least 4 of each (2 to fit, 2 to score); "
                         f"got {len(wake_batches)} and {len(sleep_batches)}")
    sizes = {len(s[0]) for s in wake_batches + sleep_batches}
    if len(sizes) > 1:
        raise ValueError(f"batches of several sizes {sorted(sizes)}")
    B = sizes.pop()
    pairs = np.random.default_rng(seed).permutation(len(wake_batches))
    fit, held = pairs[:len(pairs) // 2], pairs[len(pairs) // 2:]
    kinds = (wake_batches, sleep_batches)
    results = {}
    for name, layers in feature_sets().items():
        X = _rows(kinds, fit, layers)
        clf = _classifier(X.shape[1], len(X), C, max_components, seed).fit(X, _is_wake(len(fit), B))
        del X  # the whole state of thousands of samples is a large array
        right = clf.predict(_rows(kinds, held, layers)) == _is_wake(len(held), B)
        per_batch = right.reshape(2, len(held), B).mean(axis=2)  # (kind, held-out pair)
        r = mean_interval(per_batch.mean(axis=0), level)
        results[name] = {"accuracy": r["mean"], "low": max(0.0, r["low"]), "high": min(1.0, r["high"])}
    return results


def null_two_sample(wake_batches, seed=0, **kwargs):
    """wake_sleep_two_sample between two random halves (seeded, by batch) of wake batches: the
    accuracy of the test where both samples come from one distribution, to read the wake/sleep
    result beside. The images must be a random draw of the training images, not in file order:
    MNIST's file order follows its writers, and halves in file order are told apart (0.63-0.75 on
    an untrained model, docs/evaluation.md). Given twice as many wake batches as the wake/sleep test
    has of each kind, each half is the size of that test's samples."""
    order = np.random.default_rng(seed).permutation(len(wake_batches))
    half = len(order) // 2
    return wake_sleep_two_sample([wake_batches[i] for i in order[:half]],
                                 [wake_batches[i] for i in order[half:2 * half]], seed=seed, **kwargs)
