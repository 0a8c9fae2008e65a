"""Data-parallel training on two CPU processes (gloo on loopback) against one process.

Two comparisons, because each process draws its own noise inside every pass:
- exact: two processes end every step with the parameters, bit for bit, of one process that computes
  each shard's gradient with that process's noise and averages them (the all_reduce, the shards,
  clipping after averaging, Adam, BatchNorm statistics, metrics and checkpoints, all at once);
- to a tolerance: with the noise off, --sync-bn, the same sleep noise z, and the minibatch-std weights
  at zero, the averaged gradient of the first step is the gradient of one process on the global batch.
"""
import contextlib
import copy
import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, write_mnist
from PIL import Image

from checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
import data
import distributed
import train
from losses import StepConfig, step_losses
from models import Networks
from step import make_optimizers

WORLD = 2
# 72 images in global batches of 16: four steps, each process training on 8 images a step, and a fifth
# on the last 8 images, 4 each (the partial batch that one process keeps too). The readout
# (gamma < 1) brings in the double back-propagation through F, and a small clipping norm makes the
# clipping act, so that clipping before averaging would show.
# The one-process reference below takes every gradient at the same weights, so these processes do too;
# the alternating order's phases (one all_reduce each) meet a one-process run in the --sync-bn test.
ARGV = TINY + ["-b", "16", "--epochs", "1", "--seed", "11", "--probe-folds", "0", "--gamma", "0.9", "--kl-from-sn",
               "--gradient-clipping", "0.05", "--device", "cpu", "--update-order", "simultaneous"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=72, n_test=20)


@pytest.fixture(scope="module")
def mnist64(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist64"), n_train=64, n_test=20)


@contextlib.contextmanager
def one_thread():
    """Two processes on two cores; and the same arithmetic in them as in this process's reference
    (a convolution's sums are ordered by its threads)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children's torch when it starts
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _worker(local_rank, args, nprocs):
    """One spawned process: train.py's own, recording what it holds after every step and, when asked,
    sending itself SIGTERM after a given step (on rank 1 only)."""
    real, steps, zs = train.training_step, [], []
    signal_at = int(os.environ.get("TEST_SIGNAL_RANK1_AT", "0"))

    def recording(nets, optimizers, x, hp, **kwargs):
        if not steps:
            nets.generator.register_forward_pre_hook(lambda module, inputs: zs.append(inputs[0].clone()))
        out = real(nets, optimizers, x, hp, **kwargs)
        steps.append({"state": {k: v.clone() for k, v in nets.state_dict().items()},
                      "grads": {k: p.grad.clone() for k, p in nets.named_parameters() if p.grad is not None},
                      "out": {k: v.item() for k, v in out.items()}, "z": zs[-1]})
        if local_rank == 1 and len(steps) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    train.training_step = recording
    try:
        train._spawned(local_rank, args, nprocs)
    finally:
        torch.save(steps, os.path.join(args.out, f"steps_rank{local_rank}.pt"))


def spawn(argv, out):
    """Train with WORLD processes started by --multiprocessing-distributed's launcher, meeting at
    the original's --dist-url. Returns (exit code, [each rank's records])."""
    args = train.get_parser().parse_args(argv + ["--out", str(out), "--dist-url",
                                                 f"tcp://127.0.0.1:{distributed.free_port()}"])
    train.check_args(args, train.get_parser())
    with one_thread():
        code = distributed.spawn(_worker, args, WORLD)
    return code, [torch.load(out / f"steps_rank{r}.pt", weights_only=True) for r in range(WORLD)]


def torchrun(argv, out):
    """Train with WORLD processes started by torchrun (environment variables, env://); the progress bar
    drawn into the pipe too (AWS_PROGRESS=1), so that a test can see which ranks draw one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(distributed.free_port()), os.path.join(ROOT, "train.py"),
           *argv, "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def one_process_averaging_shards(argv, images):
    """What WORLD processes compute, in one process: at every step, each process's shard of the
    global batch (DistributedSampler deals the permutation out in turn) gets its gradient with that
    process's random stream; the mean of those gradients (the all_reduce's sum, then divided, as
    the processes do it) is clipped and Adam steps; BatchNorm statistics and metrics are averaged.
    Returns the state and the metrics after every step."""
    with one_thread():
        return _one_process_averaging_shards(argv, images)


def _one_process_averaging_shards(argv, images):
    args = train.get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    nets = Networks(train.model_config(args))
    optimizers = make_optimizers(nets, args)
    hp = StepConfig.from_args(args)
    B, seed = args.batch_size, args.seed
    permuter = torch.Generator().manual_seed(seed * 1_000_003 + data.PERMUTATION_OFFSET)
    order = torch.randperm(len(images), generator=permuter)  # epoch 0
    streams = []
    for r in range(WORLD):
        torch.manual_seed(distributed.rank_seed(train.epoch_seed(seed, 0), r))
        streams.append(torch.get_rng_state())
    history = []
    for step in range(-(-len(images) // B)):  # the last, partial batch too
        batch = order[step * B:(step + 1) * B]
        grads, outs, buffers = [], [], []
        for r in range(WORLD):
            replica = copy.deepcopy(nets)
            torch.set_rng_state(streams[r])
            terms = step_losses(replica, data.to_unit_range(images[batch[r::WORLD]]), hp)
            terms.simultaneous_total(hp.gamma).backward(inputs=list(replica.parameters()))
            out = terms.out
            streams[r] = torch.get_rng_state()
            grads.append([p.grad for p in replica.parameters()])
            outs.append(out)
            buffers.append(dict(replica.named_buffers()))
        for p, shard in zip(nets.parameters(), zip(*grads)):
            p.grad = sum(shard[1:], shard[0].clone()) / WORLD
        with torch.no_grad():
            for name, b in nets.named_buffers():
                kept = [bufs[name] for bufs in buffers]
                b.copy_(sum(kept[1:], kept[0].clone()) / WORLD if "running_" in name else kept[0])
        clipped = max(p.grad.abs().max().item() for p in nets.inference.parameters()) > hp.gradient_clipping
        for net in (nets.discriminator, nets.inference):
            torch.nn.utils.clip_grad_norm_(net.parameters(), hp.gradient_clipping, norm_type="inf")
        for opt in optimizers.values():
            opt.step()
        history.append({"state": {k: v.clone() for k, v in nets.state_dict().items()}, "clipped": clipped,
                        "out": {k: (sum(o[k] for o in outs) / WORLD).item() for k in outs[0]}})
    return history


@pytest.fixture(scope="module")
def two_processes(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    argv = ARGV + ["--dataset", "mnist", "--data", mnist]
    code, ranks = spawn(argv, out)
    assert code == 0
    return argv, out, ranks


def test_two_processes_hold_equal_parameters_equal_to_one_process_averaging_their_shards(two_processes, mnist):
    argv, out, ranks = two_processes
    images, _ = data.load_in_memory("mnist", mnist, 32)
    expected = one_process_averaging_shards(argv, images)
    assert len(ranks[0]) == len(ranks[1]) == len(expected) == 5
    assert all(e["clipped"] for e in expected)  # clipping acted on the averaged gradients
    for step, (a, b, e) in enumerate(zip(*ranks, expected), start=1):
        assert not torch.equal(a["z"], b["z"])  # each process draws its own noise
        for k in e["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (step, k)  # parameters and buffers
            assert torch.equal(a["state"][k], e["state"][k]), (step, k)
        assert a["out"] == b["out"] and a["out"] == pytest.approx(e["out"], rel=1e-6, abs=1e-9), step

    # Rank 0 alone wrote; the checkpoint and metrics are the global ones.
    state = load_checkpoint(out)
    assert all(torch.equal(state["networks"][k], v) for k, v in expected[-1]["state"].items())
    row = state["history"][0]
    for k in train.METRICS:
        assert row[k] == pytest.approx(sum(e["out"][k] for e in expected) / 5, rel=1e-6, abs=1e-9), k
    written = {p.name for p in out.iterdir()}
    events = {n for n in written if n.startswith("events.out.tfevents")}
    assert len(events) == (importlib.util.find_spec("tensorboard") is not None)  # one writer: rank 0's
    pictures = {"samples.png"} | ({"curves.png"} if importlib.util.find_spec("matplotlib") else set())
    assert written - events == {".train.lock", "checkpoint.pth.tar", "config.json", "metrics.csv",
                                "steps_rank0.pt", "steps_rank1.pt"} | pictures


def test_a_signal_to_one_process_stops_both_at_one_step_and_torchrun_resumes_them_exactly(
        two_processes, mnist, tmp_path, monkeypatch, capsys):
    argv, straight, _ = two_processes
    monkeypatch.setenv("TEST_SIGNAL_RANK1_AT", "2")
    code, ranks = spawn(argv, tmp_path)
    assert code == 128 + signal.SIGTERM
    assert len(ranks[0]) == len(ranks[1]) == 2  # rank 0, never signalled, stopped at the same step
    stopped = load_checkpoint(tmp_path)
    assert (stopped["epoch"], stopped["step"]) == (0, 2) and len(stopped["rng_by_rank"]) == WORLD

    # Every process resumes from rank 0's file, with its own random stream: as if never stopped.
    monkeypatch.delenv("TEST_SIGNAL_RANK1_AT")
    shutil.copy(tmp_path / "checkpoint.pth.tar", tmp_path / "stopped.pth.tar")
    done = torchrun(argv + ["--resume", str(tmp_path / "stopped.pth.tar")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch=1 steps=5") == 1 and done.stderr.count("resumed from") == 0
    assert done.stdout.count("resumed from") == 1  # rank 0 alone prints,
    assert done.stderr.count("?it/s]") == 1  # and shows a progress bar (this is its first drawing)
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path)
    for k in a["networks"]:
        assert torch.equal(a["networks"][k], b["networks"][k]), k
    assert a["history"][0]["loss_g"] == b["history"][0]["loss_g"]

    # One process continues the two processes' epoch too (its noise then differs, and it says so).
    capsys.readouterr()
    alone = tmp_path / "alone"
    assert train.main(argv + ["--resume", str(tmp_path / "stopped.pth.tar"), "--out", str(alone)]) == 0
    assert "stopped inside an epoch with 2 processes, not 1" in capsys.readouterr().err
    assert load_checkpoint(alone)["epoch"] == 1


def mbstd_columns(cfg):
    """{weight name: columns that read a minibatch-std feature (the last of each layer's block)}."""
    dims = [c * h * w + 1 for c, h, w in cfg.state_shapes()]
    cols = {f"discriminator.pairs.{l}.weight": [dims[l] - 1, dims[l] + dims[l + 1] - 1] for l in range(5)}
    return {**cols, "readout.linear.weight": [dims[4] - 1]}


def _quiet_start(argv, path):
    """A checkpoint at epoch 0 whose networks draw no noise (sigma 0, DeReLU scales 0) and give
    the minibatch-std features zero weight: what is left couples samples only through BatchNorm."""
    args = train.get_parser().parse_args(argv)
    torch.manual_seed(0)
    nets = Networks(train.model_config(args))
    params = dict(nets.named_parameters())
    with torch.no_grad():
        for net in (nets.inference, nets.generator, nets.discriminator):
            net.sigma.zero_()
        for m in nets.inference.derelu[1:]:
            m.scale.zero_()
        for name, cols in mbstd_columns(nets.cfg).items():
            params[name][:, cols] = 0
    save_checkpoint(path, checkpoint_state(args, nets, make_optimizers(nets, args), args.seed, 0, 0,
                                                       []))
    return nets.cfg


def test_with_sync_bn_and_no_noise_the_averaged_gradient_is_the_global_batch_gradient(mnist64, tmp_path, monkeypatch):
    argv = TINY + ["-b", "16", "--epochs", "1", "--seed", "5", "--probe-folds", "0", "--gamma", "0.9",
                   "--gradient-clipping", "0", "--device", "cpu", "--dataset", "mnist", "--data", mnist64]
    start = tmp_path / "start.pth.tar"
    cfg = _quiet_start(argv, start)  # made by one process, resumed by two
    code, ranks = spawn(argv + ["--resume", str(start), "--sync-bn"], tmp_path / "two")
    assert code == 0

    # One process on the global batch, dreaming from the processes' z (rank 0's rows, then rank 1's).
    real, seen = train.training_step, []

    def same_z(nets, optimizers, x, hp, **kwargs):
        if not seen:
            nets.generator.register_forward_pre_hook(  # the training steps' dreams, not the sample grids'
                lambda module, inputs: (torch.cat([r[len(seen)]["z"] for r in ranks]),) if module.training else None)
        out = real(nets, optimizers, x, hp, **kwargs)
        seen.append({"grads": {k: p.grad.clone() for k, p in nets.named_parameters() if p.grad is not None},
                     "out": {k: v.item() for k, v in out.items()},
                     "state": {k: v.clone() for k, v in nets.state_dict().items()}})
        return out

    monkeypatch.setattr(train, "training_step", same_z)
    assert train.main(argv + ["--resume", str(start), "--out", str(tmp_path / "one")]) == 0

    two, one = ranks[0][0], seen[0]  # the first step, from the same parameters
    assert set(two["grads"]) == set(one["grads"])
    cols = mbstd_columns(cfg)
    for name, g in one["grads"].items():
        keep = torch.ones_like(g, dtype=torch.bool)
        if name in cols:
            keep[:, cols[name]] = False  # these see each process's own batch std
        if g[keep].abs().max() == 0:  # D's output bias: -mean D(W) + mean D(S) does not depend on it
            assert two["grads"][name][keep].abs().max() == 0, name
            continue
        # Float32 sums in another order: about 1e-7 (1e-4 for the image layer's bias, where the L1
        # prediction loss's sign flips at ties). Without --sync-bn the first tensor is off by 0.15.
        error = ((two["grads"][name][keep] - g[keep]).norm() / g[keep].norm()).item()
        assert error < 1e-3, (name, error)
    for k in one["state"]:
        if "running_" in k:  # BatchNorm's statistics are the global batch's
            assert torch.allclose(two["state"][k], one["state"][k], rtol=1e-5, atol=1e-7), k
    assert two["out"] == pytest.approx(one["out"], rel=1e-4, abs=1e-6)


# --- Without processes: shards, flags, seeds -----------------------------------------------------

def test_shards_together_are_the_one_process_batches_and_one_process_keeps_its_order():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 32, 32).contiguous()
    labels = torch.arange(50)

    def epoch(rank, world, batch):
        b = data.TensorBatches(images, labels, batch, "cpu", rank=rank, world_size=world)
        b.set_epoch(7, 3)
        return [y.tolist() for _, y in b]

    alone = epoch(0, 1, 12)
    assert [len(y) for y in alone] == [12, 12, 12, 12, 2]  # the last, partial batch kept
    assert [i for y in alone for i in y] == torch.randperm(50, generator=torch.Generator().manual_seed(
        7 * 1_000_003 + 2 ** 31 + 3)).tolist()
    for world in (2, 3, 4):
        # A process's last share would hold one image (2) or none (3, 4: the shards drop the images
        # that would leave them unequal), so every process takes the four whole steps alone.
        shards = [epoch(r, world, 12 // world) for r in range(world)]
        assert all(len(s) == 4 for s in shards)
        for step, batch in enumerate(alone[:4]):
            assert sorted(i for s in shards for i in s[step]) == sorted(batch), (world, step)


def test_the_last_partial_batch_is_kept_unless_it_holds_one_image():
    def sizes(n, batch, **kwargs):
        b = data.TensorBatches(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n), batch, "cpu", **kwargs)
        b.set_epoch(0, 0)
        assert len(b) == len(list(b))
        return [len(y) for _, y in b]

    assert sizes(50, 12) == [12, 12, 12, 12, 2]
    assert sizes(49, 12) == [12, 12, 12, 12]  # BatchNorm cannot train on one image
    assert sizes(49, 12, min_batch=1) == [12, 12, 12, 12, 1]  # evaluation can
    assert sizes(48, 12) == [12, 12, 12, 12]
    assert sizes(26, 6, rank=1, world_size=2) == [6, 6]  # 13 images a process: one left over, dropped
    assert sizes(26, 5, rank=1, world_size=2) == [5, 5, 3]


def test_the_permutation_and_the_noise_are_drawn_from_different_words():
    # A CPU generator keeps a seed's low 32 bits: a permutation seeded like an epoch's noise would
    # read the noise's own words. Here no epoch's permutation shares its seed with any epoch's noise.
    sampler = data._shards(100, 0, 1, True)
    for seed in (0, 1, 12345):
        noise = {train.epoch_seed(seed, e) % 2 ** 32 for e in range(1000)}
        for epoch in range(1000):
            data._seed_shards(sampler, seed, epoch)
            assert (sampler.seed + sampler.epoch) % 2 ** 32 not in noise


def test_folder_shards_and_unusable_batches(tmp_path):
    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 20 * i + k, dtype=np.uint8)).save(tmp_path / f"c{k}" / f"{i}.png")

    def epoch(rank, world, batch):
        b = data.FolderBatches(str(tmp_path), 32, batch, "cpu", workers=0, rank=rank, world_size=world)
        b.set_epoch(1, 0)
        return [None if x is None else sorted(x[:, 0, 0, 0].tolist()) for x, _ in b]

    alone = epoch(0, 1, 4)
    shards = [epoch(r, 2, 2) for r in range(2)]
    assert len(alone) == len(shards[0]) == len(shards[1]) == 3
    for step, batch in enumerate(alone):
        assert sorted(shards[0][step] + shards[1][step]) == batch

    # A shard batch left with one readable image comes as None, so that both processes skip the step.
    (tmp_path / "c0" / "0.png").write_bytes(b"not an image")
    (tmp_path / "c1" / "0.png").write_bytes(b"not an image")
    shards = [epoch(r, 2, 2) for r in range(2)]
    assert None in shards[0] + shards[1]
    assert len(shards[0]) == len(shards[1]) == 3


def _refusal(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_distributed_flags_are_checked_before_any_work(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    common = TINY + ["--out", str(out), "--device", "cpu"]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    assert "does not divide evenly among the 4 processes" in _refusal(common + ["-b", "18"], capsys)
    assert "fewer than two samples" in _refusal(common + ["-b", "4"], capsys)
    assert "--rank 5" in _refusal(common + ["--rank", "5"], capsys)
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    assert "MASTER_ADDR and MASTER_PORT" in _refusal(common + ["--world-size", "2", "--rank", "0"], capsys)
    assert "gloo is the backend for CPUs" in _refusal(common + ["--dist-backend", "nccl"], capsys)
    if not torch.cuda.is_available():
        assert "torchrun --nproc_per_node" in _refusal(common + ["--multiprocessing-distributed"], capsys)
    assert not out.exists()


def test_multiprocessing_distributed_numbers_processes_as_the_original():
    args = train.get_parser().parse_args(["--multiprocessing-distributed", "--world-size", "3", "--rank", "2"])
    ranks = [distributed.spawned_args(args, i, 4) for i in range(4)]  # the third of three machines of 4 GPUs
    assert [(a.world_size, a.rank) for a in ranks] == [(12, 8), (12, 9), (12, 10), (12, 11)]
    assert not any(a.multiprocessing_distributed for a in ranks)
    assert (args.world_size, args.rank) == (3, 2)  # the launcher's own flags are left alone


def test_each_process_draws_its_own_stream_and_rank_zero_keeps_the_seed():
    seeds = [distributed.rank_seed(train.epoch_seed(5, 2), r) for r in range(64)]
    assert seeds[0] == train.epoch_seed(5, 2)
    assert len(set(seeds)) == 64 and all(0 <= s < 2 ** 63 for s in seeds)


def test_a_batch_one_process_cannot_read_is_skipped_by_both(tmp_path, capfd):
    """Image folders: a shard batch left with one readable image cannot train, so no process trains
    that step (the others would otherwise wait for it in the all_reduce)."""
    root = tmp_path / "data"
    for k in range(2):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i in range(6):
            path = root / "train" / f"c{k}" / f"{i}.png"
            if i < 4:
                Image.fromarray(np.full((8, 8, 3), 30 * i + k, dtype=np.uint8)).save(path)
            else:
                path.write_bytes(b"not an image")

    def usable(seed):  # which of the epoch's three steps both processes can train, as they will see them
        shards = []
        for r in range(WORLD):
            b = data.FolderBatches(str(root / "train"), 32, 2, "cpu", workers=0, rank=r, world_size=WORLD)
            b.set_epoch(seed, 0)
            shards.append([x is not None for x, _ in b])
        return [all(s) for s in zip(*shards)]

    seed = next(s for s in range(100) if 0 < sum(usable(s)) < 3)  # some steps trained, some skipped
    trained = sum(usable(seed))
    capfd.readouterr()
    argv = TINY + ["--dataset", "folder", "--data", str(root), "-b", "4", "--epochs", "1", "-j", "0",
                   "--seed", str(seed), "--probe-folds", "0", "--device", "cpu"]
    code, ranks = spawn(argv, tmp_path / "out")
    assert code == 0
    assert len(ranks[0]) == len(ranks[1]) == trained
    assert load_checkpoint(tmp_path / "out")["history"][0]["steps"] == trained
    err = capfd.readouterr().err
    assert f"skipped {3 - trained} steps (non-finite, or too few readable images on a process)" in err
