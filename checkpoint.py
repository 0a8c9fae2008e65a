"""The checkpoint format: what a run saves, how it is written, read and turned back into networks.

A checkpoint is a dict of tensors and plain data (torch.save; read back with weights_only=True, so
opening one never runs code): the model's constructor arguments ("model", a ModelConfig as a dict)
beside the state dicts, so every script rebuilds the networks from the file alone; the flags of the
run; the optimizers; the history; and, for a run stopped inside an epoch, its random state. Every
write is atomic (utils.write_atomically): the file on disk is always a whole checkpoint.
"""
import os
import pickle
import re
import warnings
import zipfile

import torch

from data import DATASETS, DataError, channels_of
from models import ModelConfig, Networks
from utils import UserError, add_bool_flag, isolated_rng, serialized, write_atomically

CHECKPOINT_NAME = "checkpoint.pth.tar"
FORMAT = "adversarial-wake-sleep"
FORMAT_VERSION = 1



class CheckpointError(UserError):
    pass


def checkpoint_state(args, nets, optimizers, seed, epoch, step, history, partial=None, probe=None, skipped=0,
                     rngs=None):
    """Everything a run needs to continue, as tensors and plain data (loads with weights_only=True).

    `partial` (the epoch's metric sums and skipped steps so far) marks a state inside an epoch; `rngs`
    is then every process's random state by rank (distributed.Group.rng_states), by default this one's."""
    state = {
        "model": nets.cfg.to_dict(),
        "config": {k: v for k, v in vars(args).items()},
        "seed": seed,
        "epoch": epoch,  # epochs completed
        "step": step,  # steps done inside epoch `epoch` (0 at an epoch boundary)
        "networks": nets.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "history": history,
        "probe": probe,
        "skipped_steps": skipped,  # non-finite steps skipped in the whole run (--skip-nonfinite)
    }
    if partial is not None:  # inside an epoch: the random state is no longer a function of (seed, epoch)
        rngs = rngs or [{"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}]
        state["rng"] = rngs[0]
        if len(rngs) > 1:
            state["rng_by_rank"] = rngs
        state["partial"] = partial
    return state


def _on_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, state):
    # Tensors go to the CPU, so that a checkpoint written on a GPU loads on a machine without one.
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **_on_cpu(state)}
    write_atomically(path, lambda f: f.write(serialized(state)))


def resolve_checkpoint_path(path):
    """A checkpoint file, or a run folder holding checkpoint.pth.tar."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    return path


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# torch.save's older format (_use_new_zipfile_serialization=False) is a sequence of pickles, the first this number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
HEAD_BYTES = 64  # read to tell the kinds of file apart


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint of this project with weights_only=True; anything else is a CheckpointError
    that says what the file is: empty, a cut-off or damaged zip archive, a pickle that needs other
    Python objects, a pickle or zip of something else, or not a PyTorch file at all (text, other bytes).

    weights_only rebuilds tensors and plain containers only: a file that would need other
    Python objects (and so could run code while being unpickled) is refused before any runs."""
    path = resolve_checkpoint_path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"{path} is empty (a write that never finished?)")
    if head.startswith(ZIP_MAGIC) or ZIP_MAGIC.startswith(head):
        _check_zip(path)
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickles before refusing them; the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load fails on foreign bytes in many ways: KeyError, RuntimeError, EOFError ...
        raise CheckpointError(_unreadable(path, head, e)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not an adversarial wake-sleep checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    missing = [k for k in ("model", "networks") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is damaged: it lacks {', '.join(missing)}")
    try:
        ModelConfig.from_dict(state["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None
    return state


def _check_zip(path):
    """Refuse a zip archive that is cut off, damaged or holds no pickle of torch.save's.

    torch.load looks for neither: a cut-off copy fails in opaque ways, and it never compares the
    checksums, so a flipped bit in the weights would load without a word."""
    if not zipfile.is_zipfile(path):
        # A zip archive keeps its directory at the end, the first thing a cut-off copy loses.
        raise CheckpointError(f"{path} is truncated: a zip archive without its end "
                              f"(a copy or write that never finished?)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            bad = archive.testzip() if pickles else None  # the name of the first member whose CRC differs
    except Exception as e:  # a damaged local header or stream: BadZipFile, zlib.error, EOFError ...
        raise CheckpointError(f"{path} is damaged: its zip archive cannot be read ({_describe(e)})") from None
    if not pickles:
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)")
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: {bad} in it fails its checksum (a bad copy, or a failing disk?)")


class _NeedsGlobal(pickle.UnpicklingError):
    def __init__(self, name):
        super().__init__(name)
        self.name = name


class _PlainData(pickle.Unpickler):
    """Reads a pickle as far as plain data goes and runs nothing in it: every global (the only way a
    pickle reaches code) is refused with its name."""

    def find_class(self, module, name):
        raise _NeedsGlobal(f"{module}.{name}")


def _unreadable(path, head, error):
    """Why torch.load(weights_only=True) failed on `path` (neither empty nor a cut-off or damaged zip
    archive), told by what the file is: the message about other Python objects only for a pickle that
    needs them, as the original release's checkpoints do (an argparse Namespace)."""
    # torch's weights-only unpickler names the first global it refuses; any other failure is the file's.
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if head.startswith(ZIP_MAGIC):
        if refused:
            return _needs_globals(path, refused.group(1))
        protocol = _zip_pickle_protocol(path)
        if protocol is not None and protocol >= 4:
            return _protocol_message(path, protocol)
        return f"{path} is damaged: {_describe(error)}"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a binary pickle's first opcode, PROTO 2..5
        with open(path, "rb") as f:
            try:
                first = _PlainData(f).load()
            except _NeedsGlobal as e:
                return _needs_globals(path, e.name)
            except Exception as e:  # cut off (EOFError) or garbled (UnpicklingError, ValueError ...)
                return f"{path} is not a PyTorch checkpoint but a truncated or damaged Python pickle ({_describe(e)})"
        if isinstance(first, int) and first == LEGACY_MAGIC:
            if refused:
                return _needs_globals(path, refused.group(1))
            if head[1] >= 4:
                return _protocol_message(path, head[1])
            return (f"{path} is truncated or damaged: a PyTorch file of torch.save's older (non-zip) format that "
                    f"cannot be read to its end ({_describe(error)})")
        return f"{path} is a Python pickle (pickle.dump's, not torch.save's format), not a PyTorch checkpoint"
    text = _text_start(head)
    if text is not None:
        return f"{path} is not a PyTorch checkpoint (it starts with text: {text!r})"
    return f"{path} is not a PyTorch checkpoint (it starts with unknown bytes {head[:8].hex(' ')})"


def _needs_globals(path, culprit):
    return (f"{path} needs Python objects beyond tensors and plain data ({culprit}) that only a full unpickling "
            f"could rebuild, and a full unpickling can run arbitrary code: refused. "
            f"(The original release's checkpoints pickle an argparse Namespace.)")


def _protocol_message(path, protocol):
    return (f"{path} is a PyTorch file pickled with protocol {protocol}, which torch.load cannot read without "
            f"a full unpickling (one that could run code): save it again with torch.save's default protocol")


def _zip_pickle_protocol(path):
    """The pickle protocol of a torch.save zip archive's data.pkl (its second byte), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            with archive.open(name) as f:
                start = f.read(2)
    except Exception:  # _check_zip read it whole a moment ago; nothing more to say if it now fails
        return None
    return start[1] if len(start) == 2 and start[0] == 0x80 else None


def _text_start(head):
    """The first characters of `head` if it reads as text (UTF-8, printable), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # only a character cut in two by the end of `head` is forgiven
            return None
        text = head[:e.start].decode("utf-8")
    if not text or not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return text[:40]


def _describe(error):
    """An exception as "Class: the first line of its message" (a cut-off pickle's EOFError has none)."""
    cls = type(error)
    name = cls.__name__ if cls.__module__ in ("builtins", "_pickle") else f"{cls.__module__}.{cls.__name__}"
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else "the data ends too soon" if isinstance(error, EOFError) else "no detail"
    return f"{name}: {detail}"


def _as_flag(field, value):
    """A model-config field's value as the flag that sets it."""
    if field == "readout":
        return "--gamma below 1 (a readout discriminator)" if value else "--gamma 1 (no readout discriminator)"
    if field == "discriminator":
        return "--inference-rule " + ("adversarial" if value else "wake-sleep")
    if field == "channels":
        return "a 1-channel --dataset (mnist, digits)" if value == 1 else "a 3-channel --dataset (cifar10, folders)"
    return f"--{field.replace('_', '-')} {value}"


def check_architecture(saved: ModelConfig, requested: dict, advice="drop those flags or give the checkpoint's"):
    """Refuse flags that contradict the checkpoint's architecture, in the flags' words, naming each."""
    diffs = [k for k, v in requested.items() if v is not None and getattr(saved, k) != v]
    if diffs:
        raise CheckpointError("this checkpoint was trained with " + ", ".join(_as_flag(k, getattr(saved, k))
                                                                              for k in diffs)
                              + "; the flags say " + ", ".join(_as_flag(k, requested[k]) for k in diffs)
                              + f": {advice}")


def networks_from_checkpoint(state, device="cpu"):
    """Rebuild the networks from a checkpoint alone (its model config is plain data)."""
    cfg = ModelConfig.from_dict(state["model"])
    nets = Networks(cfg)
    try:
        nets.load_state_dict(state["networks"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its own model config: {str(e).splitlines()[0]}") from None
    return nets.to(device)


def add_checkpoint_flags(parser):
    """--path and the dataset flags of a script that evaluates a checkpoint (dataset_of reads them)."""
    parser.add_argument("--path", required=True, help="checkpoint file, or the run folder holding checkpoint.pth.tar")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="default: the one the model was trained on")
    parser.add_argument("-d", "--data", default=None, metavar="DIR", help="dataset root (default: the run's)")


def dataset_of(path, state, args):
    """(dataset, data root) of add_checkpoint_flags' flags, by default the run's own, refused in one line
    where neither says which dataset or the root is not a folder."""
    config = state.get("config") or {}
    dataset, data = args.dataset or config.get("dataset"), args.data or config.get("data")
    if dataset not in DATASETS:
        raise UserError(f"{path} does not say which dataset it was trained on; pass --dataset")
    if dataset != "digits" and not (data and os.path.isdir(data)):
        raise DataError(f"--data {data} is not a folder (pass the root that holds the {dataset} dataset)")
    return dataset, data


def add_architecture_flags(parser):
    """Architecture flags of scripts that read a checkpoint. Each defaults to None: the checkpoint
    alone defines the networks, and only the flags the user gave are checked against it."""
    g = parser.add_argument_group("architecture (optional: checked against the checkpoint)")
    g.add_argument("--image-size", type=int, default=None, help="image side S")
    g.add_argument("--n-filters", type=int, default=None, help="channels of Layer1")
    g.add_argument("--noise-dim", type=int, default=None, help="units of Layer5")
    add_bool_flag(g, "--divisive-normalization", "divisive normalization (a bare switch means True)", default=None)


def load_networks(path, device, args=None):
    """Checkpoint (file or run folder) -> (state, networks on device), refusing architecture flags
    in args (see add_architecture_flags; args.dataset gives the channels) that contradict it."""
    state = load_checkpoint(path)
    if args is not None:
        dataset = getattr(args, "dataset", None)
        check_architecture(ModelConfig.from_dict(state["model"]), {
            "image_size": args.image_size, "n_filters": args.n_filters, "noise_dim": args.noise_dim,
            "divisive_normalization": args.divisive_normalization,
            "channels": channels_of(dataset) if dataset else None})
    return state, networks_from_checkpoint(state, device)


def initial_networks(cfg, seed, device):
    """The networks a run of this model and seed starts from (train.py: torch.manual_seed(seed), then
    Networks(cfg)), untrained: the reference row of a measure, what it reads before any learning. The
    caller's random numbers go on as if this had not run."""
    with isolated_rng(seed):
        return Networks(cfg).to(device)
