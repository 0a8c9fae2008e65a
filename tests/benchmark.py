#!/usr/bin/env python
"""Training-speed benchmark (not collected by pytest). Run it on an otherwise idle machine:

    python tests/benchmark.py --out bench.json              # CPU, and CUDA when present
    python tests/benchmark.py --baseline --epoch            # + the term-by-term step, + a whole epoch
    python tests/benchmark.py --epoch --mnist DIR           # the epoch on DIR/MNIST/raw's test digits

For each of the paper's settings it reports the median time of a training step after warm-up
(float32 in the default alternating order and in the simultaneous one, and bf16 autocast as with
train.py --amp; on CUDA also with TF32 matmuls, without the
finiteness check's host synchronization, and without cuDNN's autotuning), the step's
floating-point operations (counted by torch.utils.flop_counter's formulas) and the fraction of
this machine's dense float32 matrix-multiply rate they achieve, so that a figure means something
on any machine. `--baseline` also times the plain term-by-term evaluation of the losses of
docs/algorithm.md (each loss with its own forward passes, as the original release computes them); `--compile`
the step with the inference and generator networks under torch.compile.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import discriminator_gradients  # noqa: E402
import train  # noqa: E402
from data import TensorBatches  # noqa: E402
from losses import StepConfig  # noqa: E402
from models import ModelConfig, Networks  # noqa: E402
from step import make_optimizers, training_step  # noqa: E402
from utils import keep_freed_memory, pick_device  # noqa: E402

# The paper's command lines (tests/release_command_lines.txt) as step settings.
SETTINGS = {
    "mnist": dict(channels=1, n_filters=32, noise_dim=40, batch=256, argv=[
        "--lr-g", "0.00001", "--lr-d", "0.0001", "--lr-e", "0.0003", "--beta1", "0.64", "--beta2", ".999",
        "--lamda", ".9", "--kl-from-sn"]),
    "mnist-doubly": dict(channels=1, n_filters=32, noise_dim=40, batch=128, argv=[
        "--lr-g", "0.0002", "--lr-d", "0.00001", "--lr-e", "0.0008", "--lr-rd", "0.00001", "--beta1", "0",
        "--beta2", ".9", "--lamda", ".7", "--lamda2", "7", "--kl-from-sn", "--gamma", "0.9"]),
    # The comparison of docs/wake_sleep.md: the same command lines, F learning by classic Wake-Sleep.
    "mnist-wake-sleep": dict(channels=1, n_filters=32, noise_dim=40, batch=256, argv=[
        "--lr-g", "0.00001", "--lr-d", "0.0001", "--lr-e", "0.0003", "--beta1", "0.64", "--beta2", ".999",
        "--lamda", ".9", "--kl-from-sn", "--inference-rule", "wake-sleep"]),
    "mnist-doubly-wake-sleep": dict(channels=1, n_filters=32, noise_dim=40, batch=128, argv=[
        "--lr-g", "0.0002", "--lr-d", "0.00001", "--lr-e", "0.0008", "--lr-rd", "0.00001", "--beta1", "0",
        "--beta2", ".9", "--lamda", ".7", "--lamda2", "7", "--kl-from-sn", "--gamma", "0.9",
        "--inference-rule", "wake-sleep"]),
    "cifar10": dict(channels=3, n_filters=128, noise_dim=100, batch=128, argv=[
        "--lr-g", "0.0002", "--lr-d", "0.00001", "--lr-e", "0.0008", "--lr-rd", "0.00001", "--beta1", "0",
        "--beta2", ".9", "--lamda", ".7", "--lamda2", "7", "--kl-from-sn", "--gamma", "0.9"]),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, product, n=2048, reps=10):
    """Dense float32 matmul FLOP/s of this device through `product(a, b)` (best of reps)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        product(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        product(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def build(name, device, prepare=None):
    s = SETTINGS[name]
    args = train.get_parser().parse_args(s["argv"] + ["--divisive-normalization", "True", "-b", str(s["batch"])])
    cfg = ModelConfig(image_size=32, channels=s["channels"], n_filters=s["n_filters"], noise_dim=s["noise_dim"],
                      divisive_normalization=True, readout=args.gamma < 1,
                      discriminator=args.inference_rule == "adversarial")
    torch.manual_seed(0)
    nets = Networks(cfg).to(device)
    if prepare is not None:
        nets = prepare(nets)
    return nets, make_optimizers(nets, args), StepConfig.from_args(args), s["batch"]


def fast_step(nets, optimizers, x, hp):
    training_step(nets, optimizers, x, hp)


def amp_step(nets, optimizers, x, hp):
    training_step(nets, optimizers, x, dataclasses.replace(hp, amp=True))


def simultaneous_step(nets, optimizers, x, hp):
    # Every gradient at the same weights (--update-order simultaneous): what the default's fresh passes cost.
    training_step(nets, optimizers, x, dataclasses.replace(hp, update_order="simultaneous"))


def autograd_d_step(nets, optimizers, x, hp):
    # D's state gradients by autograd's double backward (--d-gradients autograd), the plain path.
    training_step(nets, optimizers, x, dataclasses.replace(hp, d_gradients="autograd"))


def unchecked_step(nets, optimizers, x, hp):
    # Without the finiteness check's one host synchronization per step: what that check costs.
    training_step(nets, optimizers, x, hp, check_finite=False)


@contextlib.contextmanager
def cuda_flags(**flags):
    """Set torch.backends flags ("matmul.allow_tf32", "cudnn.benchmark") for one measurement."""
    backends = {"matmul": torch.backends.cuda.matmul, "cudnn": torch.backends.cudnn}
    where = {name: (backends[name.split(".")[0]], name.split(".")[1]) for name in flags}
    saved = {name: getattr(obj, attr) for name, (obj, attr) in where.items()}
    for name, (obj, attr) in where.items():
        setattr(obj, attr, flags[name])
    try:
        yield
    finally:
        for name, (obj, attr) in where.items():
            setattr(obj, attr, saved[name])


def compiled(nets):
    # F and G only: D's written-out gradient is a custom autograd.Function that compile would break around.
    nets.inference.compile()
    nets.generator.compile()
    return nets


def baseline_step(nets, optimizers, x, hp):
    from test_training import reference_gradients
    grads, _ = reference_gradients(nets, x, hp, seed=None)
    for name, net in nets.parts().items():
        for p, g in zip(net.parameters(), grads[name]):
            p.grad = g
        optimizers[name].step()


def time_steps(step, nets, optimizers, hp, batch, device, steps, warmup=3):
    x = torch.rand(batch, nets.cfg.channels, 32, 32, device=device) * 2 - 1
    for _ in range(warmup):
        step(nets, optimizers, x, hp)
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step(nets, optimizers, x, hp)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _onednn_linear_flops(x, w, *args, out_val=None, **kwargs):
    # mkldnn._linear_pointwise(X (M, K), [other,] W (N, K), ...): discriminator_gradients._mm's CPU products
    return 2 * x.size(0) * x.size(1) * out_val.size(1)


class _FlopCount(TorchDispatchMode):
    """Adds up the FLOPs of every matmul and convolution that runs, backward passes included.

    (FlopCounterMode's module tracker rejects autograd.grad on leaf tensors, which the
    gradient penalties need; its per-operator formulas are used here without it.)"""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if func._overloadpacket is getattr(torch.ops.mkldnn, "_linear_pointwise", None):
            count = _onednn_linear_flops
        if count is None and func._overloadpacket.__name__.endswith("_"):  # in place: addmm_ counts as addmm
            count = flop_registry.get(getattr(torch.ops.aten, func._overloadpacket.__name__[:-1], None))
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def count_flops(step, nets, optimizers, hp, batch, device):
    x = torch.rand(batch, nets.cfg.channels, 32, 32, device=device) * 2 - 1
    with _FlopCount() as counter:
        step(nets, optimizers, x, hp)
    return counter.flops


def mnist_like_images(n, mnist_root=None):
    """n MNIST-shaped uint8 images: the test digits of an MNIST folder (mnist_root/MNIST/raw) repeated,
    else scikit-learn's digits."""
    from data import load_in_memory
    if mnist_root is not None:  # read as training reads it; a folder that is not one is an error, not a fallback
        digits, source = load_in_memory("mnist", mnist_root, 28, train=False)[0], "real MNIST test digits, repeated"
    else:
        digits, source = load_in_memory("digits", None, 28)[0], "scikit-learn digits, repeated"
    reps = -(-n // len(digits))
    return digits.repeat(reps, 1, 1, 1)[:n], source


def time_epoch(device, n_images, mnist_root=None):
    """A whole epoch of the paper's MNIST setting, resizing and batching included."""
    from data import _resize
    nets, optimizers, hp, batch = build("mnist", device)
    raw, source = mnist_like_images(n_images, mnist_root)
    sync(device)
    t = time.perf_counter()
    images = _resize(raw, 32)  # what make_batches does once per run
    batches = TensorBatches(images, torch.zeros(len(images), dtype=torch.long), batch, device)
    batches.set_epoch(0, 0)
    steps = 0
    for x, _ in batches:
        training_step(nets, optimizers, x, hp)
        steps += 1
    sync(device)
    return {"images": n_images, "data": source, "steps": steps, "seconds": time.perf_counter() - t}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="all", choices=("all", "cpu", "cuda"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median reported)")
    p.add_argument("--baseline", action="store_true", help="also time the term-by-term evaluation")
    p.add_argument("--epoch", action="store_true", help="also time a whole MNIST epoch with data")
    p.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                   help="time only these kinds of step (e.g. fast 'fast, simultaneous'); default: all")
    p.add_argument("--compile", action="store_true", help="also time the step with F and G under torch.compile")
    p.add_argument("--epoch-images", type=int, default=60000)
    p.add_argument("--mnist", default=None, metavar="DIR",
                   help="the epoch's images: the test digits of DIR/MNIST/raw (default: scikit-learn's digits)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    keep_freed_memory()  # as train.py does

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    report = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpu_threads": torch.get_num_threads(), "devices": {}, "results": []}
    for dev in devices:
        device = pick_device(dev)  # as train.py picks it (cuDNN autotuning on CUDA)
        name = torch.cuda.get_device_name(device) if dev == "cuda" else platform.processor() or "cpu"
        # The step's own matrix products (oneDNN on CPUs) set the rate; torch.mm's for comparison.
        rate, mm_rate = matmul_rate(device, discriminator_gradients._mm), matmul_rate(device, torch.mm)
        report["devices"][dev] = {"name": name, "matmul_tflops": rate / 1e12, "torch_mm_tflops": mm_rate / 1e12}
        print(f"{dev} ({name}): float32 matmul {rate / 1e9:.1f} GFLOP/s (torch.mm {mm_rate / 1e9:.1f})")
        # (name, step, backend flags, what to do to the networks first)
        kinds = [("fast", fast_step, {}, None), ("fast+amp", amp_step, {}, None),
                 ("fast, simultaneous", simultaneous_step, {}, None), ("fast, autograd D", autograd_d_step, {}, None)]
        if dev == "cuda":
            kinds += [("fast+tf32", fast_step, {"matmul.allow_tf32": True, "cudnn.allow_tf32": True}, None),
                      ("fast, unchecked", unchecked_step, {}, None),
                      ("fast, no cudnn autotune", fast_step, {"cudnn.benchmark": False}, None)]
        if args.compile:
            kinds.append(("fast+compile", fast_step, {}, compiled))
        if args.baseline:
            kinds.append(("baseline", baseline_step, {}, None))
        if args.kinds:
            kinds = [k for k in kinds if k[0] in args.kinds]
        for setting in args.settings:
            counted = {}
            for kind, step, flags, prepare in kinds:
                with cuda_flags(**flags):
                    nets, optimizers, hp, batch = build(setting, device, prepare)
                    # Compiled networks do the mathematics of "fast" (and the counter cannot see inside them).
                    flops = counted["fast"] if prepare is not None else count_flops(step, nets, optimizers, hp,
                                                                                     batch, device)
                    counted[kind] = flops
                    seconds = time_steps(step, nets, optimizers, hp, batch, device, args.steps)
                row = {"setting": setting, "step": kind, "device": dev, "batch": batch,
                       "ms_per_step": 1e3 * seconds, "steps_per_s": 1 / seconds,
                       "gflop_per_step": flops / 1e9, "fraction_of_matmul_rate": flops / seconds / rate}
                report["results"].append(row)
                print(f"  {setting:13s} {kind:24s} {row['ms_per_step']:8.1f} ms/step {row['steps_per_s']:6.2f} "
                      f"steps/s {row['gflop_per_step']:7.2f} GFLOP {100 * row['fraction_of_matmul_rate']:5.1f}% "
                      f"of matmul")
        if args.epoch:
            epoch = time_epoch(device, args.epoch_images, args.mnist)
            report["devices"][dev]["mnist_epoch"] = epoch
            print(f"  mnist epoch: {epoch['images']} images, {epoch['steps']} steps, {epoch['seconds']:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
