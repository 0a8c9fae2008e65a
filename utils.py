"""What the scripts share: user errors, flags, the device, seeded random numbers of their own, atomic file
writes, the run lock, image grids and figures.

The checkpoint format is checkpoint.py's."""
import argparse
import contextlib
import csv
import ctypes
import errno
import io
import json
import math
import os
import sys
import tempfile

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from data import DataError


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def str2bool(value):
    """'True'/'False' as the original scripts take them; a bare switch means True."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_bool_flag(parser, name, help, default=False):
    """`--name True`, `--name False` (the paper's command lines) and a bare `--name` all work."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False", help=help)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default said once: argparse's "(default: X)" is added only where the
    flag's own help names no default and the default is a value (a None default is described in the
    help text, or means "not given")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def show_progress():
    """Progress bars only where someone watches them: a terminal. Written into a log file, every bar
    redraw is a carriage-return frame that buries the results under fragments; there a script prints
    one line per epoch or per stage instead. AWS_PROGRESS=1 (or 0) overrides, for tests that follow a
    run through its bar."""
    forced = os.environ.get("AWS_PROGRESS")
    if forced is not None:
        return forced not in ("", "0")
    return sys.stderr.isatty()


def progress_bar(iterable=None, **kwargs):
    """tqdm, drawn only where show_progress() says so; kwargs as tqdm's (disable=True still disables)."""
    kwargs["disable"] = kwargs.get("disable", False) or not show_progress()
    return tqdm(iterable, **kwargs)


def pick_device(device="auto", gpu=None):
    if gpu is not None:
        device = f"cuda:{gpu}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this PyTorch sees no CUDA device")
    if device.startswith("cuda"):
        # Every batch of a run has one shape: let cuDNN time its convolution kernels once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    return torch.device(device)


@contextlib.contextmanager
def isolated_rng(seed):
    """Random numbers of their own, seeded with seed, for a measurement taken amid training: the
    caller's streams (the CPU's and every CUDA device's torch.manual_seed reseeds) go on after the
    block as if it had not run, so a run's steps, and exact resume, are as without the measurement."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def keep_freed_memory():
    """Ask glibc to keep freed blocks of up to 32 MB for reuse rather than unmap them.

    A training step frees and reallocates every activation; by default glibc returns blocks
    over 128 KB to the system and the next step page-faults them back in, zeroed. Keeping
    them makes a CPU step about 10 % faster (tests/benchmark.py). No effect off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 * 2 ** 20)  # glibc's largest on 64-bit systems
    mallopt(m_trim_threshold, 2 ** 31 - 1)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a directory; the rename still stands
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What an OSError of a write means, in the words a user needs.
_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EIO: "input/output error (a failing disk, or a network mount that went away)",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "file too large for this file system"}


class WriteError(UserError):
    """A file that could not be written: the message names it, the cause, and what is intact."""

    def __init__(self, path, error):
        self.path = path
        cause = _CAUSES.get(error.errno, error.strerror or str(error))
        intact = (f"the previous {os.path.basename(path)} is whole" if os.path.exists(path) else
                  "nothing was left half-written")
        super().__init__(f"cannot write {path}: {cause}; {intact}")


TMP_SUFFIX = ".tmp"


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    Readers see the old file or the new one, never half of either, even after a SIGKILL. A write
    that fails (a full disk, a read-only or lost file system) removes its temporary file and
    raises WriteError."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a checkpoint is as readable as any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, e) from None
        raise


def remove_stray_temporaries(folder):
    """Delete the temporary files of write_atomically that a killed run left in folder; their names."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(TMP_SUFFIX)]
    except OSError:
        return []
    for n in names:
        os.unlink(os.path.join(folder, n))
    return names


def unwritable_folder(folder):
    """Why folder cannot be made (with its parents) or written to, or None where it can: a file is
    made and removed in it, which no permission bit or read-only mount can fake."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


class RunLock:
    """An advisory lock on a run folder, held while this process lives: the kernel drops it when the
    process ends, however it ends (a SIGKILL too), so a killed run never blocks the next one."""

    NAME = ".train.lock"

    def __init__(self, folder):
        import fcntl
        path = os.path.join(folder, self.NAME)
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"--out {folder} is being written by another training run (process {holder}); "
                            f"wait for it to end, stop it, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()


def serialized(obj):
    """torch.save's bytes, made in memory: a full disk then fails in a plain write, with its errno
    (torch.save into a file turns it into an opaque RuntimeError of its zip writer)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


def nonfinite_floats(parser, args):
    """The float flags given as nan or inf: ([their dests], [one problem line each]).

    argparse's float() takes "nan" and "inf"; NaN passes every comparison a range check makes (each is
    False), and either reaches an optimizer or a solver as a traceback or a NaN loss. Every flag of
    type float counts, those added later too. Callers skip their own range checks of these dests,
    so that each bad flag is named once."""
    floats = {a.dest: "/".join(a.option_strings) for a in parser._actions
              if a.type is float and getattr(args, a.dest, None) is not None}
    nonfinite = [dest for dest in floats if not math.isfinite(getattr(args, dest))]
    return nonfinite, [f"{floats[dest]} must be a finite number, got {getattr(args, dest)}" for dest in nonfinite]


def add_release_flags(parser, flags):
    """The original release's flags that this code has no use for, {"--name": (argparse keywords, why)}:
    accepted, so that its command lines run, with a one-line note when given (note_release_flags)."""
    g = parser.add_argument_group("the original release's flags, accepted without effect")
    for name, (kwargs, why) in flags.items():
        g.add_argument(name, default=None, help=why, **kwargs)
    parser.set_defaults(release_flags={name: why for name, (_, why) in flags.items()})


def note_release_flags(args):
    for name, why in (vars(args).pop("release_flags", None) or {}).items():
        if vars(args).pop(name.lstrip("-").replace("-", "_")) is not None:
            print(f"note: {name} (the original release's) is accepted and has no effect: {why}", file=sys.stderr)


def run_main(parser, check_args, run, argv=None):
    """A script's main: parse and check the flags, then run(args). A UserError or DataError (the
    user's input, not a bug) is one line on stderr and exit code 1, not a traceback."""
    args = parser.parse_args(argv)
    note_release_flags(args)
    check_args(args, parser)
    try:
        return run(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def to_unit_interval(images):
    """Images in [-1, 1] (the generator's tanh) as float32 in [0, 1] on the CPU, what image writers take."""
    return images.float().cpu().add(1).div(2).clamp(0, 1)


def save_grid(images, path, nrow=10):
    """Images in [-1, 1] as one PNG grid."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buf = io.BytesIO()
    save_image(to_unit_interval(images), buf, nrow=nrow, format="png")
    write_atomically(path, lambda f: f.write(buf.getvalue()))


def pyplot(purpose):
    """matplotlib's pyplot drawing into files only, or None, said once, where it is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: pip install matplotlib for {purpose}", file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def write_figure(fig, plt, path, say=True):
    """fig as a PNG at path (atomically), then closed."""
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    if say:
        print(f"figure: {path}")


def write_metrics_csv(path, history):
    """The whole metric history as CSV (rewritten each epoch, so it always matches the checkpoint)."""
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))  # some epochs have more (--quality-every)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    write_atomically(path, lambda f: f.write(buf.getvalue().encode()))


def write_json(path, obj):
    write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def append_jsonl(path, obj):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:
        raise WriteError(path, e) from None
