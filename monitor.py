"""What a run shows while and after it trains: TensorBoard curves (where the package is installed),
the last sample grid, a figure of the curves, and a closing summary with the evaluation commands.

None of it is needed to continue or evaluate a run (the checkpoint and metrics.csv are), so a
failure here is said once and training goes on.
"""
import os
import sys

from sample_quality import DATASETS_MEASURED
from utils import WriteError, pyplot, save_grid, to_unit_interval, write_figure

GRID_NAME, CURVES_NAME = "samples.png", "curves.png"


class TensorBoard:
    """Event files in the run folder (`tensorboard --logdir RUN`) when `tensorboard` is importable."""

    def __init__(self, folder, enabled=True):
        self.writer = None
        if not enabled:  # a process other than rank 0
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package; without it, nothing changes
            return
        try:
            self.writer = SummaryWriter(log_dir=folder)
        except OSError as e:
            self._failed(e)

    def _failed(self, error):
        self.writer = None
        print(f"warning: TensorBoard events cannot be written ({error}); training goes on without them",
              file=sys.stderr)

    def scalars(self, step, metrics):
        """metrics: {name: float}, at the global step."""
        if self.writer is None:
            return
        try:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        except OSError as e:
            self._failed(e)

    def images(self, epoch, images):
        """A grid of images in [-1, 1], (N, C, S, S)."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid
        try:
            self.writer.add_image("samples", make_grid(to_unit_interval(images), nrow=10), epoch)
            self.writer.flush()
        except OSError as e:
            self._failed(e)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def plot_curves(history, path):
    """The wake and sleep scores and the losses per epoch (history: metrics.csv's rows) as a PNG.
    Returns False, having said how to get it, when matplotlib is not installed."""
    plt = pyplot(f"a figure of the curves ({os.path.basename(path)})")
    if plt is None:
        return False
    epochs = [int(r["epoch"]) for r in history]
    col = lambda k: [float(r[k]) for r in history]  # noqa: E731
    measured = [r for r in history if r.get("fd") not in (None, "")]  # --quality-every's epochs
    matched = [r for r in history if r.get("two_sample_whole") not in (None, "")]  # --matching-every's
    graded = [r for r in matched if r.get("distance_whole") not in (None, "")]
    n = 3 + bool(measured) + bool(matched) + bool(graded)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4))
    has_d = any(col("d_wake")) or any(col("d_sleep"))
    if has_d:
        axes[0].plot(epochs, col("d_wake"), label="D(wake)")
        axes[0].plot(epochs, col("d_sleep"), label="D(sleep)")
        if all(r.get("signal_heldout") not in (None, "") for r in history):  # recording.NoveltyGap's
            axes[0].plot(epochs, col("signal_train"), "--", label="D(wake), fixed training images")
            axes[0].plot(epochs, col("signal_heldout"), "--", label="D(wake), fixed held-out images")
        axes[1].plot(epochs, col("loss_d"), label="L_D (with penalties)")
        axes[1].set_title("discriminator loss")
    else:  # no D scored a state: Wake-Sleep, or gamma 0
        axes[0].text(0.5, 0.5, "no wake/sleep discriminator", ha="center", va="center", transform=axes[0].transAxes)
        axes[1].plot(epochs, col("loss_f"), label="L_F (with Wake-Sleep: sleep prediction)")
        axes[1].set_title("inference loss")
    axes[0].set_title("wake/sleep discriminator scores")
    axes[2].plot(epochs, col("loss_g"), label="L_G")
    axes[2].set_title("generator loss")
    if any(col("loss_r")):
        axes[2].plot(epochs, col("loss_r"), label="L_R")
        axes[2].set_title("generator and readout losses")
    if measured:
        axes[3].plot([int(r["epoch"]) for r in measured], [float(r["fd"]) for r in measured], "o-", label="fd")
        axes[3].set_title("sample quality (classifier fd, lower is better)")
    if matched:
        ax, at = axes[3 + bool(measured)], [int(r["epoch"]) for r in matched]
        for name in [f"h{l},h{l + 1}" for l in range(5)] + ["h5"]:
            ax.plot(at, [float(r[f"two_sample_{name}"]) for r in matched], "o-", ms=3, label=name)
        if all(r.get("d_auroc") not in (None, "") for r in matched):  # recorded since D's ordering mattered
            ax.plot(at, [float(r["d_auroc"]) for r in matched], "k--", label="D's AUROC, wake above sleep")
        ax.axhline(0.5, color="k", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_title("wake/sleep two-sample accuracy (0.5: matched)")
    if graded:  # the accuracy's rows before the distance was recorded have none
        ax, at = axes[-1], [int(r["epoch"]) for r in graded]
        for name in [f"h{l}" for l in range(6)]:
            ax.plot(at, [float(r[f"distance_{name}"]) for r in graded], "o-", ms=3, label=name)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title("wake/sleep graded distance (0: matched)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(fig, plt, path, say=False)
    return True


def finish(args, history, samples):
    """After the last epoch: the sample grid and the curves in the run folder, then the summary.
    `samples`: G's images of the run's fixed noise, in [-1, 1]."""
    out = args.out
    made = {}
    for name, write in ((GRID_NAME, lambda p: save_grid(samples, p)), (CURVES_NAME, lambda p: plot_curves(history, p))):
        path = os.path.join(out, name)
        try:
            if write(path) is not False:
                made[name] = path
        except WriteError as e:
            print(f"warning: {e}", file=sys.stderr)
    print(summary(args, made))


def summary(args, made):
    """Where the run's files are, and the commands that evaluate it, with its own paths (the
    scripts read the dataset and its folder from the checkpoint)."""
    out = args.out
    quality = " --classifier-fd" if args.dataset in DATASETS_MEASURED else ""
    lines = [f"run folder {out}:",
             f"  checkpoint  {os.path.join(out, 'checkpoint.pth.tar')}",
             f"  metrics     {os.path.join(out, 'metrics.csv')}"]
    lines += [f"  {'samples' if name == GRID_NAME else 'curves':<11} {path}" for name, path in made.items()]
    lines += ["evaluate it:",
              f"  python generate_and_save_imgs.py --path {out} --n-images 10000{quality}",
              f"  python SVM_classify_from_model.py --path {out}",
              f"  python measure_inference.py --path {out}"]
    return "\n".join(lines)
