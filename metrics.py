"""Evaluation apart from training: per-layer linear decoding of class labels."""
import warnings

import numpy as np
import torch

from models import LAYER_NAMES
from utils import progress_bar


@torch.no_grad()
def layer_features(inference, batches, progress=True):
    """Run F once over every image: ([float32 (N, D_l) for l = 0..5], int labels (N,)).

    Eval mode (BatchNorm running statistics); F's sampling noise stays on, as in the paper."""
    was_training = inference.training
    inference.eval()
    feats, labels = [[] for _ in LAYER_NAMES], []
    for x, y in progress_bar(batches, desc="features", disable=not progress, leave=False):
        for l, h in enumerate(_sampled_layers(inference, x)):
            feats[l].append(h)
        labels.append(y.cpu())
    inference.train(was_training)
    return [np.concatenate(f) for f in feats], torch.cat(labels).numpy()


def linear_probe(features, labels, n_folds=10, alpha=1e-4, epochs=5, seed=0, progress=True):
    """k-fold accuracy of a linear SVM (hinge loss, SGD, elastic net) on standardized features.

    Returns {layer name: {"mean": .., "std": .., "folds": [..]}}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    splits = _folds(labels, n_folds, seed)
    results = {}
    bar = progress_bar(total=len(LAYER_NAMES) * len(splits), desc="probe", unit="fit", disable=not progress, leave=False)
    for name, X in zip(LAYER_NAMES, features):
        accs = []
        bar.set_postfix(layer=name)
        for train_idx, test_idx in splits:
            scaler = StandardScaler().fit(X[train_idx])
            clf = SGDClassifier(loss="hinge", penalty="elasticnet", alpha=alpha, max_iter=epochs, tol=None,
                                random_state=seed)
            with warnings.catch_warnings():  # a fixed number of passes is the point, not convergence
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(scaler.transform(X[train_idx]), labels[train_idx])
            accs.append(float(clf.score(scaler.transform(X[test_idx]), labels[test_idx])))
            bar.update()
        results[name] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs}
    bar.close()
    return results


def _folds(labels, n_folds, seed):
    """Stratified (train, test) index pairs, at most as many folds as the rarest class has images."""
    from sklearn.model_selection import StratifiedKFold
    counts = np.bincount(labels)
    folds = min(n_folds, counts[counts > 0].min())
    if folds < 2:
        raise ValueError(f"{n_folds}-fold probing needs at least 2 images of each class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


@torch.no_grad()
def _sampled_layers(inference, x):
    return [h.flatten(1).float().cpu().numpy() for h in inference(x)]


def resampled_probe(inference, images, labels, n_folds=10, alpha=1e-4, epochs=5, seed=0, batch_size=512,
                    progress=True):
    """The original release's procedure: like linear_probe, but the inference network samples every
    layer anew for each minibatch of each SGD pass (its noise acts as augmentation), and the
    standardization and the SVM are updated minibatch by minibatch (partial_fit). The held-out fold's
    features are sampled once. `images`: float (N, C, S, S) on the network's device; labels (N,).

    Returns linear_probe's {layer name: {"mean", "std", "folds"}}."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    was_training = inference.training
    inference.eval()
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    splits = _folds(labels, n_folds, seed)
    accs = [[] for _ in LAYER_NAMES]
    for train_idx, test_idx in progress_bar(splits, desc="probe (resampled)", unit="fold", disable=not progress,
                                    leave=False):
        scalers = [StandardScaler() for _ in LAYER_NAMES]
        svms = [SGDClassifier(loss="hinge", penalty="elasticnet", alpha=alpha, random_state=seed)
                for _ in LAYER_NAMES]
        for _ in range(epochs):
            order = rng.permutation(train_idx)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                for X, scaler, svm in zip(_sampled_layers(inference, images[idx]), scalers, svms):
                    scaler.partial_fit(X)
                    svm.partial_fit(scaler.transform(X), labels[idx], classes=classes)
        right = np.zeros(len(LAYER_NAMES))
        for start in range(0, len(test_idx), batch_size):
            idx = test_idx[start:start + batch_size]
            for l, (X, scaler, svm) in enumerate(zip(_sampled_layers(inference, images[idx]), scalers, svms)):
                right[l] += (svm.predict(scaler.transform(X)) == labels[idx]).sum()
        for l in range(len(LAYER_NAMES)):
            accs[l].append(float(right[l] / len(test_idx)))
    inference.train(was_training)
    return {name: {"mean": float(np.mean(a)), "std": float(np.std(a)), "folds": a}
            for name, a in zip(LAYER_NAMES, accs)}


def format_probe(results):
    return "\n".join(f"{name:>7}: {100 * r['mean']:.2f} +/- {100 * r['std']:.2f} %" for name, r in results.items())
