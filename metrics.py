"""Evaluation apart from training: per-layer linear decoding of class labels."""
import warnings

import numpy as np
import torch
from tqdm import tqdm

from models import LAYER_NAMES


@torch.no_grad()
def layer_features(inference, batches, progress=True):
    """Run F once over every image: ([float32 (N, D_l) for l = 0..5], int labels (N,)).

    Eval mode (BatchNorm running statistics); F's sampling noise stays on, as in the paper."""
    was_training = inference.training
    inference.eval()
    feats, labels = [[] for _ in LAYER_NAMES], []
    for x, y in tqdm(batches, desc="features", disable=not progress, leave=False):
        for l, h in enumerate(inference(x)):
            feats[l].append(h.flatten(1).float().cpu())
        labels.append(y.cpu())
    inference.train(was_training)
    return [torch.cat(f).numpy() for f in feats], torch.cat(labels).numpy()


def linear_probe(features, labels, n_folds=10, alpha=1e-4, epochs=5, seed=0, progress=True):
    """k-fold accuracy of a linear SVM (hinge loss, SGD, elastic net) on standardized features.

    Returns {layer name: {"mean": .., "std": .., "folds": [..]}}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    folds = min(n_folds, counts[counts > 0].min())
    if folds < 2:
        raise ValueError(f"{n_folds}-fold probing needs at least 2 images of each class")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(labels)), labels))
    results = {}
    bar = tqdm(total=len(LAYER_NAMES) * len(splits), desc="probe", unit="fit", disable=not progress, leave=False)
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


def format_probe(results):
    return "\n".join(f"{name:>7}: {100 * r['mean']:.2f} +/- {100 * r['std']:.2f} %" for name, r in results.items())
