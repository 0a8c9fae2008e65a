"""Faults injected one by one: signals, kills, damaged checkpoints, bad arguments, NaNs, bad data.

Each test checks what the program did and that nothing was lost that should not be."""
import argparse
import io
import multiprocessing
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
import data
import losses
import train
import utils
from conftest import ROOT, TINY, make_checkpoint, write_cifar10, write_mnist
from models import ModelConfig

# Runs below: 160 images in batches of 4, 40 steps an epoch, enough for a signal to land mid-epoch.
N_TRAIN, BATCH = 160, 4
STEPS = N_TRAIN // BATCH
# Runs that fail between epochs (a full disk) need no steps to speak of: four an epoch.
FEW_STEPS_BATCH = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here and in the subprocesses: the same arithmetic in both (so runs match bit for
    bit), and no threads spinning against each other on a shared machine (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# AWS_PROGRESS=1: the bar is drawn into the pipe too, so the tests can follow the steps done.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_PROGRESS": "1"}


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("faults_mnist"), n_train=N_TRAIN, n_test=20)


def common_args(root, out, epochs=2, batch=BATCH):
    # On the CPU also where there is a GPU: resumed runs are compared with uninterrupted ones to the bit,
    # which cuDNN's autotuned kernels and atomic additions do not promise.
    return TINY + ["--dataset", "mnist", "--data", root, "-b", str(batch), "--epochs", str(epochs),
                   "--probe-folds", "0", "--seed", "0", "--out", str(out), "--device", "cpu"]


def start_without_training(args, group):
    """In place of train.train: the run as far as its start (flags, data, the run folder claimed: locked,
    cleared of stray temporaries, config.json; the networks), and no epoch."""
    train.Run(args, group).board.close()  # its TensorBoard writer, if any, keeps a thread until closed
    return 0


@pytest.fixture(scope="module")
def straight_run(small_mnist, tmp_path_factory):
    """An uninterrupted two-epoch run, the reference for the resumed ones (in-process: no start-up cost)."""
    out = tmp_path_factory.mktemp("straight")
    assert train.main(common_args(small_mnist, out) + ["--save-every", "1"]) == 0
    return out


def same_training_state(a, b):
    assert set(a["networks"]) == set(b["networks"])
    for k in a["networks"]:
        assert torch.equal(a["networks"][k], b["networks"][k]), k
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        for i in sa:
            assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]), (name, i)
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


def one_error_line(err):
    """The message of a refused run: a single `error: ...` line and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- Interruption -------------------------------------------------------------------------------

def start_training(argv):
    """A training subprocess and a live copy of its stderr (the progress bar shows the steps done)."""
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    return proc, err, reader


def wait_for_steps(proc, err, n, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = re.findall(rf"\| (\d+)/{STEPS} \[", "".join(err))  # tqdm's "| 3/40 [00:01<..."
        if done and int(done[-1]) >= n:
            return
        assert proc.poll() is None, "".join(err)
        time.sleep(0.05)
    raise AssertionError("training made no progress:\n" + "".join(err))


def test_sigterm_mid_epoch_saves_and_resume_matches_uninterrupted_run(small_mnist, straight_run, tmp_path):
    """The whole path once, with the signal a scheduler sends (SLURM, docker stop); that Ctrl-C's SIGINT
    takes the same path is test_both_signals_ask_the_loop_to_stop_after_the_step's."""
    sig = signal.SIGTERM
    argv = common_args(small_mnist, tmp_path)
    proc, err, reader = start_training(argv)
    wait_for_steps(proc, err, 2)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 128 + sig
    reader.join(timeout=10)
    err = "".join(err)
    ckpt = tmp_path / "checkpoint.pth.tar"
    assert f"--resume {ckpt}" in err and "Traceback" not in err

    state = load_checkpoint(ckpt)
    # Saved inside an epoch (the first, unless this machine stalled the test for a whole epoch).
    assert state["partial"] is not None and 0 < state["step"] < STEPS, (state["epoch"], state["step"])
    resumed = subprocess.run([sys.executable, "train.py", *argv, "--resume", str(ckpt)], cwd=ROOT,
                             env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ckpt}: {state['epoch']} epochs and {state['step']} steps" in resumed.stdout
    same_training_state(load_checkpoint(straight_run), load_checkpoint(ckpt))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_both_signals_ask_the_loop_to_stop_after_the_step(sig, capsys):
    previous = signal.getsignal(sig)
    with train.Interrupt() as interrupt:
        assert interrupt.signal is None
        os.kill(os.getpid(), sig)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert interrupt.signal == sig
    assert signal.getsignal(sig) is previous  # the handler is the caller's again
    assert f"{signal.Signals(sig).name}: stopping after this step" in capsys.readouterr().err


def test_second_signal_exits_at_once_and_abandons_the_write_cleanly(tmp_path, capsys):
    with train.Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert interrupt.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert "interrupt again to exit at once" in capsys.readouterr().err

    # The KeyboardInterrupt may land inside a checkpoint write: the old file stays, the temporary goes.
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(path, {"epoch": 1})

    def half_then_interrupted(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        utils.write_atomically(path, half_then_interrupted)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def numbered_checkpoint(i):
    """A checkpoint of 8 MB whose every weight is i: a mix of two writes would show."""
    return {"model": ModelConfig().to_dict(), "networks": {"weights": torch.full((2_000_000,), float(i))}, "i": i}


def keep_writing_checkpoints(path, first):
    for i in range(first, first + 10 ** 6):
        save_checkpoint(path, numbered_checkpoint(i))


def test_sigkill_during_checkpoint_writes_leaves_the_last_one_readable(tmp_path):
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint(path, numbered_checkpoint(-1))
    rng = random.Random(0)
    seen = set()
    for round_ in range(8):
        before = os.stat(path).st_ino
        writer = multiprocessing.get_context("fork").Process(target=keep_writing_checkpoints,
                                                             args=(path, round_ * 10 ** 6))
        writer.start()
        deadline = time.time() + 30
        while os.stat(path).st_ino == before and time.time() < deadline:  # each rename is a new file
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.1))  # then kill it at a random moment of a later write
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        state = load_checkpoint(path)  # whole: one of the writes, never part of one
        assert torch.all(state["networks"]["weights"] == state["i"])
        seen.add(state["i"] // 10 ** 6)
    assert seen == set(range(8))  # every round had written at least once before its kill
    # A kill mid-write may leave its temporary file behind, never a damaged checkpoint.
    assert all(name == "checkpoint.pth.tar" or name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_save_every_keeps_epoch_copies(straight_run):
    for epoch in (1, 2):
        assert load_checkpoint(straight_run / f"checkpoint_epoch{epoch}.pth.tar")["epoch"] == epoch


# --- Damaged, foreign and unsafe checkpoints ----------------------------------------------------

class RunsCode:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flip_a_bit_of_the_weights(blob):
    """A zip checkpoint with one bit flipped in the middle of its largest member (the weights): a bad
    copy, which torch.load itself reads without a word (it never compares the zip's checksums)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    # The member's data follows its local header: 30 bytes, then its name and extra field.
    name_length, extra_length = struct.unpack("<HH", blob[member.header_offset + 26:member.header_offset + 30])
    at = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]


def damaged_checkpoints(folder, good):
    """{name: (path of a file that --resume must refuse in one line, what the line must say)}. Only the
    pickles that need other globals are told so; every other file is told what it is instead."""
    blob = good.read_bytes()
    state = torch.load(good, weights_only=True)
    files = {f"truncated at {n}": (blob[:n], "truncated") for n in (1, 4, 100, 5000, len(blob) // 2, len(blob) - 1)}
    files["empty"] = (b"", "empty")
    files["text"] = (b"epoch 3, loss 0.1\nthis is not a checkpoint\n",
                     "is not a PyTorch checkpoint (it starts with text: 'epoch 3, loss 0.1\\nthis")
    files["hello"] = (b"hello\n", "is not a PyTorch checkpoint (it starts with text: 'hello\\n')")  # echo hello >
    files["unknown bytes"] = (b"\x89PNG\r\n\x1a\n" + bytes(100),
                              "is not a PyTorch checkpoint (it starts with unknown bytes 89 50 4e 47 0d 0a 1a 0a)")
    files["a bit flipped"] = (flip_a_bit_of_the_weights(blob), "fails its checksum")
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("notes.txt", "a zip archive, but not torch.save's")
    files["zip of other files"] = (other_zip.getvalue(), "is a zip archive but not a PyTorch checkpoint")
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # torch.save's older, non-zip format
    files["legacy format truncated"] = (legacy.getvalue()[:len(legacy.getvalue()) // 2],
                                        "is truncated or damaged: a PyTorch file of torch.save's older (non-zip)")
    files["plain pickle"] = (pickle.dumps({"epoch": 3}), "is a Python pickle (pickle.dump's, not torch.save's")
    paths = {}
    for name, (content, says) in files.items():
        paths[name] = (folder / (name.replace(" ", "_") + ".pth.tar"), says)
        paths[name][0].write_bytes(content)
    marker = str(folder / "code_ran")
    # RunsCode pickles as a call of open(): the global named is the function the file would call.
    runs_code = "open) that only a full unpickling could rebuild, and a full unpickling can run arbitrary code: refused"
    paths["pickle that runs code"] = (folder / "evil_pickle.pth.tar", runs_code)
    with open(paths["pickle that runs code"][0], "wb") as f:
        pickle.dump({"format": FORMAT, "payload": RunsCode(marker)}, f)
    paths["torch file that runs code"] = (folder / "evil_torch.pth.tar", runs_code)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "payload": RunsCode(marker)},
               paths["torch file that runs code"][0])
    paths["legacy torch file that runs code"] = (folder / "evil_legacy.pth.tar", runs_code)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "payload": RunsCode(marker)},
               paths["legacy torch file that runs code"][0], _use_new_zipfile_serialization=False)
    paths["release checkpoint"] = (folder / "release.pth.tar", "(argparse.Namespace) that only a full unpickling")
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "args": argparse.Namespace(lr=1e-4)},
               paths["release checkpoint"][0])  # as the original release's checkpoints hold their flags
    paths["foreign torch file"] = (folder / "foreign.pth.tar", "not an adversarial wake-sleep checkpoint")
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, paths["foreign torch file"][0])
    paths["other format version"] = (folder / "version99.pth.tar", "format version 99")
    torch.save({**state, "format_version": 99}, paths["other format version"][0])
    return paths, marker


def test_damaged_foreign_and_unsafe_checkpoints_are_refused_in_one_line(small_mnist, straight_run, tmp_path, capsys):
    paths, marker = damaged_checkpoints(tmp_path, straight_run / "checkpoint.pth.tar")
    # torch.load alone would take the flipped bit for a weight: the checksum is this project's check.
    assert torch.load(paths["a bit flipped"][0], weights_only=True)["epoch"] == 2
    for name, (path, says) in paths.items():
        assert train.main(common_args(small_mnist, tmp_path / "out") + ["--resume", str(path)]) == 1, name
        line = one_error_line(capsys.readouterr().err)
        assert str(path) in line and says in line, (name, line)
        assert ("arbitrary code" in line) == ("runs code" in name or name == "release checkpoint"), (name, line)
    assert not os.path.exists(marker), "unpickling ran the file's code"
    assert not os.path.exists(tmp_path / "out")  # refused before any work


def test_a_checkpoint_in_torch_saves_older_format_loads(straight_run, tmp_path):
    state = torch.load(straight_run / "checkpoint.pth.tar", weights_only=True)
    torch.save(state, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pth.tar")
    assert loaded["epoch"] == 2 and loaded["networks"].keys() == state["networks"].keys()
    assert all(torch.equal(loaded["networks"][k], v) for k, v in state["networks"].items())


def test_checkpoint_of_another_architecture_is_refused(small_mnist, straight_run, tmp_path, capsys):
    argv = common_args(small_mnist, tmp_path) + ["--resume", str(straight_run), "--n-filters", "8"]
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "trained with --n-filters 4; the flags say --n-filters 8" in line and "new run" in line


def test_a_gamma_1_checkpoint_resumed_with_a_readout_says_which_flag(small_mnist, straight_run, tmp_path, capsys):
    argv = common_args(small_mnist, tmp_path) + ["--resume", str(straight_run), "--gamma", "0.5"]
    assert train.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "trained with --gamma 1 (no readout discriminator)" in line and "--gamma below 1" in line


# --- Bad arguments ------------------------------------------------------------------------------

def bad_arguments(tmp_path):
    """(flags replacing the defaults of a good run, what the message must name)."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "no_images" / "train" / "class0").mkdir(parents=True)
    cases = [
        (["--image-size", "40"], "--image-size"), (["--image-size", "16"], "--image-size"),
        (["--gamma", "1.5"], "--gamma"), (["--gamma", "-0.1"], "--gamma"),
        (["--n-filters", "0"], "--n-filters"), (["--noise-dim", "-1"], "--noise-dim"),
        (["--epochs", "0"], "--epochs"),
        (["--lr-g", "0"], "--lr-g"), (["--lr-d", "-0.0001"], "--lr-d"), (["--lr-e", "0"], "--lr-e"),
        (["--lr-rd", "0"], "--lr-rd"),
        (["--batch-size", "0"], "--batch-size"), (["--batch-size", "1"], "--batch-size"),
        (["--batch-size", str(N_TRAIN + 1)], "--batch-size"),
        (["--data", str(tmp_path / "nowhere")], "--data"),
        (["--dataset", "folder", "--data", str(tmp_path / "no_images")], "--data"),
        (["--dataset", "folder", "--data", str(tmp_path)], "--data"),  # no train/ inside
        (["--out", str(tmp_path / "a_file" / "run")], "--out"),
        (["--resume", str(tmp_path / "missing.pth.tar")], "--resume"),
        (["--save-every", "-1"], "--save-every"), (["--skip-nonfinite", "-2"], "--skip-nonfinite"),
        (["--quality-every", "-1"], "--quality-every"),
        (["--dataset", "cifar10", "--quality-every", "2"], "--quality-every"),  # a digit classifier's measure
        (["--classes", "0", "10"], "--classes 10: mnist has the labels 0 .. 9"), (["--classes", "-1"], "--classes -1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda"))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "read_only").mkdir(mode=0o500)
        cases.append((["--out", str(tmp_path / "read_only" / "run")], "--out"))
    return cases


def test_every_bad_argument_is_refused_before_any_work(small_mnist, tmp_path, capsys):
    out = tmp_path / "out"
    for flags, named in bad_arguments(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            train.main(common_args(small_mnist, out) + flags)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (flags, err)
        message = err.strip().splitlines()[-1]  # argparse's "train.py: error: ..."
        assert "error:" in message and named in message, (flags, err)
        assert not out.exists(), flags  # nothing written before the refusal


def test_non_finite_float_flags_are_refused_by_name(small_mnist, tmp_path, capsys):
    """argparse's float() reads "nan" and "inf": every float flag refuses them as argparse refuses (exit 2),
    naming the flag once, before any work (a NaN learning rate was a traceback from Adam)."""
    out = tmp_path / "out"
    floats = {a.option_strings[0] for a in train.get_parser()._actions if a.type is float}
    assert {"--lr-g", "--lr-d", "--lr-e", "--lr-rd", "--gamma", "--lamda", "--lamda2", "--beta1", "--beta2", "--wd",
            "--gradient-clipping"} <= floats
    for flag in sorted(floats):
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as exit_:
                train.main(common_args(small_mnist, out) + [f"{flag}={value}"])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and "Traceback" not in err, (flag, value, err)
            message = err.strip().splitlines()[-1]
            # One problem, said once: not also "must be positive" or "must lie in [0, 1]".
            assert f"error: {flag}" in message and f"must be a finite number, got {value}" in message, message
            assert message.count("must") == 1, message
    assert not out.exists()


# --- Divergence ---------------------------------------------------------------------------------

def nan_at(monkeypatch, calls_to_spoil, on_spoil=lambda: None):
    """Make the generator's prediction loss NaN at the given steps (counted over the run)."""
    real, count = losses.generator_prediction_loss, [0]

    def spoiled(*args, **kwargs):
        count[0] += 1
        loss = real(*args, **kwargs)
        if count[0] in calls_to_spoil:
            on_spoil()
            return loss * float("nan")
        return loss

    monkeypatch.setattr(losses, "generator_prediction_loss", spoiled)


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(small_mnist, straight_run, tmp_path, capsys,
                                                            monkeypatch):
    ckpt = tmp_path / "checkpoint.pth.tar"
    on_disk = {}
    nan_at(monkeypatch, {STEPS + 3}, on_spoil=lambda: on_disk.update(before=ckpt.read_bytes()))
    assert train.main(common_args(small_mnist, tmp_path)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss_g" in line and "epoch 2, step 3" in line, line

    assert ckpt.read_bytes() == on_disk["before"]  # the last good checkpoint was not written over
    assert load_checkpoint(ckpt)["epoch"] == 1
    good = load_checkpoint(tmp_path / "nonfinite_state.pth.tar")
    assert (good["epoch"], good["step"]) == (1, 2)
    assert all(torch.isfinite(t).all() for t in good["networks"].values() if t.is_floating_point())
    # The bad step left no trace: BatchNorm counted, and Adam stepped, for the good steps only.
    assert good["networks"]["inference.norms.0.num_batches_tracked"] == STEPS + 2
    assert all(s["step"] == STEPS + 2 for s in good["optimizers"]["generator"]["state"].values())

    monkeypatch.undo()  # resuming from the saved state finishes the run
    assert train.main(common_args(small_mnist, tmp_path) + ["--resume", str(tmp_path / "nonfinite_state.pth.tar")]) == 0
    assert load_checkpoint(ckpt)["epoch"] == 2


def test_skip_nonfinite_skips_up_to_n_steps_then_stops(small_mnist, tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, {3, 5})
    argv = common_args(small_mnist, tmp_path, epochs=1) + ["--skip-nonfinite", "1"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "skipped epoch 1, step 3: non-finite loss_g" in err
    assert "epoch 1, step 5" in one_error_line(err)
    good = load_checkpoint(tmp_path / "nonfinite_state.pth.tar")
    assert good["step"] == 4 and good["partial"]["skipped"] == 1 and good["skipped_steps"] == 1
    assert good["networks"]["inference.norms.0.num_batches_tracked"] == 3


# --- Damaged data -------------------------------------------------------------------------------

def write_pngs(folder, n, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def write_corrupt_png(path, rng):
    """A PNG whose signature and header are whole and whose compressed pixels are damaged: it opens, and
    fails as it is decoded."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    blob = bytearray(buf.getvalue())
    pixels = blob.index(b"IDAT") + 4
    for i in range(pixels + 8, pixels + 72):
        blob[i] ^= 0x55
    path.write_bytes(bytes(blob))
    with Image.open(path) as image, pytest.raises(Exception):
        image.convert("RGB")


def training_batch_sizes(monkeypatch):
    """A list that gets the size of every batch the training steps from now on."""
    sizes, real = [], train.training_step

    def recording(nets, optimizers, x, hp, **kwargs):
        sizes.append(len(x))
        return real(nets, optimizers, x, hp, **kwargs)

    monkeypatch.setattr(train, "training_step", recording)
    return sizes


def test_an_unreadable_image_leaves_its_batch_one_image_short(tmp_path, capsys, monkeypatch):
    """One corrupt PNG among eleven good ones, in batches of four: every step trains, the corrupt image's
    batch with three images; the file is named once, and counted."""
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "data" / "train" / "class0", 6, rng)
    write_pngs(tmp_path / "data" / "train" / "class1", 5, rng)
    write_corrupt_png(tmp_path / "data" / "train" / "class1" / "corrupt.png", rng)
    sizes = training_batch_sizes(monkeypatch)
    argv = TINY + ["--dataset", "folder", "--data", str(tmp_path / "data"), "-b", "4", "--epochs", "1", "-j", "0",
                   "--probe-folds", "0", "--seed", "0", "--out", str(tmp_path / "run")]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert sorted(sizes) == [3, 4, 4]  # all three steps, and N - 1 = 11 images seen
    assert len(re.findall(r"skipping unreadable image \S*corrupt\.png", err)) == 1, err
    assert "epoch 1: skipped 1 unreadable images" in err, err
    assert not re.search(r"epoch 1: skipped \d+ (non-finite )?steps", err), err  # no step was skipped
    state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1 and state["history"][0]["steps"] == 3


def test_unreadable_images_of_every_kind_are_named_once_and_counted(tmp_path, capsys):
    """A text file posing as a PNG, a cut-off PNG, a corrupt PNG, and a file whose decoder raises an error
    other than PIL's usual ones (its TIFF plugin raises TypeError on a tag of the wrong type): each left
    out of its batch alone, named once an epoch, and counted."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "train"
    write_pngs(folder / "class0", 7, rng)
    write_pngs(folder / "class1", 6, rng)
    (folder / "class0" / "text.png").write_bytes(b"this is not an image")
    whole = (folder / "class1" / "0.png").read_bytes()
    (folder / "class1" / "truncated.png").write_bytes(whole[:len(whole) // 2])
    write_corrupt_png(folder / "class1" / "corrupt.png", rng)
    batches = data.FolderBatches(str(folder), 32, 8, "cpu", workers=0)  # 16 files: two batches of eight
    real_loader = batches.dataset.loader

    def loader(path):
        if path.endswith("class0/6.png"):
            raise TypeError("'IFDRational' object cannot be interpreted as an integer")
        return real_loader(path)

    batches.dataset.loader = loader
    unreadable = ("text.png", "truncated.png", "corrupt.png", "6.png")
    for epoch in range(2):
        batches.set_epoch(0, epoch)
        sizes = [len(x) for x, _ in batches]
        assert sum(sizes) == 16 - 4 and len(sizes) == len(batches) == 2  # no batch lost, however they fall
        assert batches.skipped == 4
        err = capsys.readouterr().err
        for name in unreadable:
            assert len(re.findall(rf"skipping unreadable image \S*/{re.escape(name)}: ", err)) == 1, (name, err)
    assert "TypeError: 'IFDRational'" in err


@pytest.mark.parametrize("dataset, victim", [("mnist", "MNIST/raw/train-labels-idx1-ubyte"),
                                             ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                             ("cifar10", "cifar-10-batches-py/data_batch_2")])
def test_truncated_dataset_file_is_named(dataset, victim, tmp_path, capsys):
    root = (write_mnist if dataset == "mnist" else write_cifar10)(tmp_path / "data")
    path = os.path.join(root, victim)
    with open(path, "rb") as f:
        whole = f.read()
    for size in (0, 5, len(whole) - 3):
        with open(path, "wb") as f:
            f.write(whole[:size])
        argv = TINY + ["--dataset", dataset, "--data", root, "-b", "4", "--out", str(tmp_path / "out")]
        assert train.main(argv) == 1
        assert path in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("dataset, victim", [("mnist", "MNIST/raw/train-labels-idx1-ubyte"),
                                             ("cifar10", "cifar-10-batches-py/data_batch_4")])
def test_missing_dataset_file_is_named(dataset, victim, tmp_path, monkeypatch):
    root = (write_mnist if dataset == "mnist" else write_cifar10)(tmp_path)
    os.remove(os.path.join(root, victim))

    def offline(*args, **kwargs):
        raise RuntimeError("no network in the tests")

    monkeypatch.setattr(data.datasets, "MNIST" if dataset == "mnist" else "CIFAR10", offline)
    with pytest.raises(data.DataMissing, match=os.path.basename(victim)):
        data.load_in_memory(dataset, root, 32)


# --- The file system: full disks, read-only folders, two runs in one folder ----------------------

class FailingFile:
    """A file whose writes fail with `code` once `budget` bytes are written (0: the first write), or
    whose fsync fails (budget None): the first, a middle or the last write of a file."""

    def __init__(self, f, code, budget):
        self.f, self.code, self.budget = f, code, budget

    def write(self, data):
        if self.budget is not None and len(data) > self.budget:
            self.f.write(bytes(memoryview(data)[:self.budget]))
            raise OSError(self.code, os.strerror(self.code))
        if self.budget is not None:
            self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def failing_writes(monkeypatch, code, budget, name="checkpoint.pth.tar", after=0):
    """From the (after+1)-th write of `name` on, its temporary file fails as FailingFile says."""
    real_fdopen, real_fsync, seen = os.fdopen, os.fsync, {"writes": 0, "fail": False}

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + name):
            seen["writes"] += 1
            if seen["writes"] > after:
                seen["fail"] = True
                return FailingFile(f, code, budget)
        seen["fail"] = False
        return f

    def fsync(fd):
        if seen["fail"] and budget is None:
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(utils.os, "fdopen", fdopen)
    monkeypatch.setattr(utils.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_full_disk_during_a_checkpoint_write_stops_in_one_line_and_loses_nothing(where, small_mnist, tmp_path,
                                                                                   capsys, monkeypatch):
    import errno
    budget = {"first": 0, "middle": 50_000, "last": None}[where]
    failing_writes(monkeypatch, errno.ENOSPC, budget, after=1)  # epoch 1's checkpoint is written, epoch 2's fails
    assert train.main(common_args(small_mnist, tmp_path, epochs=3, batch=FEW_STEPS_BATCH)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {tmp_path}/checkpoint.pth.tar: no space left on device" in line
    assert "checkpoint.pth.tar holds epoch 1" in line and "--resume" in line
    assert load_checkpoint(tmp_path)["epoch"] == 1  # whole, and the last one written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
def test_a_read_only_file_system_and_a_failing_sample_grid(small_mnist, tmp_path, capsys, monkeypatch):
    import errno
    failing_writes(monkeypatch, errno.EROFS, 0, name="config.json")
    assert train.main(common_args(small_mnist, tmp_path / "ro", epochs=1)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "config.json: read-only file system; nothing was left half-written" in line
    monkeypatch.undo()

    # A sample grid is not worth stopping for: said once, and the run goes on.
    failing_writes(monkeypatch, errno.EIO, 0, name="imgs_epoch")
    argv = common_args(small_mnist, tmp_path / "grid", epochs=2, batch=FEW_STEPS_BATCH) + ["--save-imgs"]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("training goes on without sample grids") == 1 and "input/output error" in err
    assert load_checkpoint(tmp_path / "grid")["epoch"] == 2


def test_stray_temporary_files_of_a_killed_run_are_removed_and_named(small_mnist, tmp_path, capsys, monkeypatch):
    tmp_path.joinpath("gen_images").mkdir()
    stray = [tmp_path / ".checkpoint.pth.tar.k2x9q1ab.tmp", tmp_path / "gen_images" / ".imgs_epoch3.png.a1b2c3d4.tmp"]
    for f in stray:
        f.write_bytes(b"half a checkpoint")
    monkeypatch.setattr(train, "train", start_without_training)  # a run's start claims its folder
    assert train.main(common_args(small_mnist, tmp_path, epochs=1)) == 0
    err = capsys.readouterr().err
    assert "removed 2 temporary file(s)" in err and all(str(f) in err for f in stray)
    assert not any(f.exists() for f in stray)


def test_a_second_run_in_a_live_runs_folder_is_refused_until_that_run_dies(small_mnist, tmp_path, capsys,
                                                                          monkeypatch):
    proc, err, _ = start_training(common_args(small_mnist, tmp_path, epochs=1000))
    monkeypatch.setattr(train, "train", start_without_training)  # the lock is taken, or refused, at the start
    try:
        wait_for_steps(proc, err, 2)
        assert train.main(common_args(small_mnist, tmp_path, epochs=1)) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"is being written by another training run (process {proc.pid})" in line
    finally:
        proc.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        proc.wait()
    assert train.main(common_args(small_mnist, tmp_path, epochs=1)) == 0  # the lock was taken: the run started


def test_gzipped_mnist_is_read_as_it_is(small_mnist, tmp_path):
    import gzip
    import shutil
    raw = os.path.join(small_mnist, "MNIST", "raw")
    zipped = tmp_path / "MNIST" / "raw"
    zipped.mkdir(parents=True)
    for name in os.listdir(raw):
        with open(os.path.join(raw, name), "rb") as src, gzip.open(zipped / (name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain, gz = data.load_in_memory("mnist", small_mnist, 32), data.load_in_memory("mnist", str(tmp_path), 32)
    assert all(torch.equal(a, b) for a, b in zip(plain, gz))
    # A cut-off .gz is named, as a cut-off plain file is.
    victim = zipped / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz"):
        data.load_in_memory("mnist", str(tmp_path), 32)


def test_the_original_releases_flags_are_accepted_with_a_note(small_mnist, tmp_path, capsys, monkeypatch):
    import generate_and_save_imgs as gen
    import SVM_classify_from_model as svm
    # The note is said, and the flag dropped, before any work: the run's start is enough to show it.
    monkeypatch.setattr(train, "train", start_without_training)
    assert train.main(common_args(small_mnist, tmp_path, epochs=1) + ["--detailed-logging"]) == 0
    assert "note: --detailed-logging (the original release's) is accepted and has no effect" in capsys.readouterr().err
    run = os.path.dirname(make_checkpoint(tmp_path / "run", "mnist", small_mnist))  # as train.py writes it
    assert gen.main(["--path", run, "--n-images", "4", "--noise-type", "fixed"]) == 0
    assert "note: --noise-type" in capsys.readouterr().err
    assert svm.main(["--path", run, "--n-folds", "2", "--epochs", "1", "--lr", "1", "--opt", "sgd",
                     "--wd", "0.001", "--lr-schedule", "--nonlinear"]) == 0
    assert capsys.readouterr().err.count("note: ") == 5
    # Every flag of the release's train.py is one of ours (taken from its parser, written out here).
    release = ["-d", "--data", "--dataset", "--image-size", "-j", "--workers", "--seed", "--gpu",
               "--multiprocessing-distributed", "--world-size", "--rank", "--dist-url", "--dist-backend", "--resume",
               "-b", "--batch-size", "--lr-g", "--lr-d", "--learning-rate-discriminator", "--lr-e", "--lr-rd", "--wd",
               "--weight-decay", "--beta1", "--beta2", "--epochs", "--gamma", "--noise-dim", "--n-filters", "--lamda",
               "--lamda2", "--save-imgs", "--gradient-clipping", "--kl-from-sn", "--scale-gen-surprisal-by-D",
               "--prioritized-replay", "--divisive-normalization", "--spectral-norm", "--detailed-logging",
               "--lr-decay"]
    ours = {s for a in train.get_parser()._actions for s in a.option_strings}
    assert not set(release) - ours
