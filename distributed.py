"""Data-parallel training on several processes: GPUs of one machine or of several, or CPU cores.

    torchrun --nproc_per_node 8 train.py ...                  # one machine, eight GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...

Every process holds the same networks and trains them on its shard of each global batch
(`--batch-size` is the global batch). After the step's one backward pass, each network's gradients
are averaged over the processes by one all_reduce of a flat bucket, before clipping, the finiteness
check and Adam (in the alternating order of updates, as each phase's backward pass ends); so every
process makes the same decisions and takes the same Adam step, and the parameters stay identical
without ever being sent again. DistributedDataParallel is not used: it
averages inside backward through hooks that expect one forward and one backward pass per step, and
it does not support torch.autograd.grad, with which the gradient penalties differentiate D and R
with respect to their inputs (double back-propagation).

Each process draws its own noise (`rank_seed`). Batch statistics are those of the process's shard:
BatchNorm's unless `--sync-bn` (then SyncBatchNorm2d, over the global batch), and always the
minibatch-std features of D and R and the KL term's mean and variance of Layer5.
"""
import copy
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from utils import pick_device

# Seeds of the processes' random streams are this far apart (2^64 / golden ratio, an odd number, so
# that no two of the first 2^63 ranks share a stream).
_RANK_STRIDE = 0x9E3779B97F4A7C15


def rank_seed(seed, rank):
    """The seed of one process's random stream; rank 0 keeps `seed`, so one process alone draws
    exactly what it drew before there were several."""
    return (seed + rank * _RANK_STRIDE) % 2 ** 63


def _env_int(env, name):
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not a whole number") from None


def _place(args, env):
    """(world size, rank, local rank or None): the original's flags where given, else torchrun's environment."""
    world = args.world_size if args.world_size is not None else _env_int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
    rank = args.rank if args.rank is not None else _env_int(env, "RANK") if "RANK" in env else 0
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
    return world, rank, local


def check_flags(args, env=os.environ):
    """(number of processes the run will have, [problems with the distributed flags])."""
    problems = []
    try:
        world, rank, _ = _place(args, env)
    except ValueError as e:
        return 1, [str(e)]
    if args.multiprocessing_distributed:
        # The original's meaning: --world-size counts machines and --rank is this machine's.
        machines, gpus = world, torch.cuda.device_count()
        if gpus == 0:
            problems.append("--multiprocessing-distributed starts one process per CUDA GPU, and this machine has "
                            "none; on CPUs launch processes with torchrun --nproc_per_node N train.py ...")
        if "LOCAL_RANK" in env:
            problems.append("--multiprocessing-distributed inside torchrun: torchrun already starts the processes")
        if args.gpu is not None:
            problems.append("--gpu with --multiprocessing-distributed: each process takes one GPU of its own")
        world = machines * max(gpus, 1)
        if machines < 1 or not 0 <= rank < machines:
            problems.append(f"--world-size {machines} (machines) and --rank {rank} (this machine): "
                            f"need --world-size >= 1 and 0 <= --rank < --world-size")
            return 1, problems
        if machines > 1 and args.dist_url == "env://" and not {"MASTER_ADDR", "MASTER_PORT"} <= set(env):
            problems.append(f"--world-size {machines} machines need --dist-url tcp://HOST:PORT of the first one "
                            f"(or MASTER_ADDR and MASTER_PORT in the environment)")
    else:
        if world < 1 or not 0 <= rank < world:
            problems.append(f"--world-size {world} and --rank {rank}: need --world-size >= 1 and "
                            f"0 <= --rank < --world-size")
            return 1, problems
        if world > 1 and args.dist_url == "env://" and not {"MASTER_ADDR", "MASTER_PORT"} <= set(env):
            problems.append(f"{world} processes meet at --dist-url env://, which needs MASTER_ADDR and MASTER_PORT "
                            f"(torchrun sets them); or give --dist-url tcp://HOST:PORT")
        if args.gpu is not None and "LOCAL_WORLD_SIZE" in env and _env_int(env, "LOCAL_WORLD_SIZE") > 1:
            problems.append("--gpu under torchrun with several processes per machine: each process takes GPU LOCAL_RANK")
    if args.dist_backend == "nccl" and (args.device == "cpu" or not torch.cuda.is_available()):
        problems.append("--dist-backend nccl needs CUDA GPUs; gloo is the backend for CPUs")
    return world, problems


class Group:
    """This process's place among those that train one model together. Alone (world size 1), every
    method is free and communicates nothing, so the training loop reads the same either way."""

    def __init__(self, device, world_size=1, rank=0, sync_bn=False):
        self.device, self.world_size, self.rank, self.sync_bn = device, world_size, rank, sync_bn

    @property
    def is_main(self):
        """Rank 0 alone writes checkpoints, sample grids, metrics and progress bars."""
        return self.rank == 0

    @property
    def active(self):
        return self.world_size > 1

    def _all_reduce(self, values, op=dist.ReduceOp.SUM):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def from_main(self, value):
        """Rank 0's integer on every process (the seed: each process would draw its own)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def broadcast_(self, module):
        """Rank 0's parameters and buffers into every process's copy of `module`, in place."""
        if not self.active:
            return
        with torch.no_grad():
            for t in module.state_dict().values():  # views of the parameters and buffers themselves
                dist.broadcast(t, src=0)

    def average(self, nets, out, names):
        """training_step's hook, after the backward pass of a phase: the gradients of the networks
        `names`, their BatchNorm running statistics (unless --sync-bn keeps them equal already) and
        the metrics `out` (a dict, possibly empty) become their means over the processes, one
        all_reduce per network. Returns the metrics, now those of the global batch (each process's
        shard is equally large)."""
        parts = [nets.parts()[n] for n in names]
        keys = list(out)
        for i, net in enumerate(parts):
            params = list(net.parameters())
            # Which parameters a step reaches depends on the flags alone, never on the data, so a
            # gradient missing here is missing on every process: it is sent as zeros and stays None.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            running = [] if self.sync_bn else [t for m in net.modules() if isinstance(m, nn.BatchNorm2d)
                                               for t in (m.running_mean, m.running_var) if t is not None]
            metrics = [out[k].detach().reshape(1) for k in keys] if i == len(parts) - 1 else []
            tensors = grads + running + metrics
            flat = torch.cat([t.reshape(-1).to(params[0].dtype) for t in tensors])
            dist.all_reduce(flat)
            flat /= self.world_size
            pieces = flat.split([t.numel() for t in tensors])
            for p, avg in zip(params, pieces):
                if p.grad is not None:
                    p.grad.copy_(avg.view_as(p))
            with torch.no_grad():
                for t, avg in zip(running, pieces[len(params):]):
                    t.copy_(avg.view_as(t))
            if metrics:
                out = {k: avg.reshape(()).to(out[k].dtype) for k, avg in zip(keys, pieces[-len(keys):])}
        return out

    def agreed_signal(self, signum):
        """The signal any process caught (the largest number, if several), on every process; None if none did.
        Every process must stop at the same step, or the others would wait for it forever."""
        if not self.active:
            return signum
        agreed = int(self._all_reduce([signum or 0], dist.ReduceOp.MAX)[0])
        return agreed or None

    def all_true(self, flag):
        if not self.active:
            return flag
        return bool(self._all_reduce([float(bool(flag))], dist.ReduceOp.MIN)[0])

    def total(self, number):
        if not self.active:
            return number
        return int(self._all_reduce([number])[0])

    def rng_states(self):
        """Every process's random state, by rank (a checkpoint inside an epoch continues each one)."""
        own = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if not self.active:
            return [own]
        states = [None] * self.world_size
        dist.all_gather_object(states, own)
        return states

    def barrier(self):
        """Wait for every process (e.g. for rank 0's checkpoint to be whole before any process exits,
        since a launcher ends the others when one exits with an error code)."""
        if self.active:
            self._all_reduce([0.0])


def start(args, env=os.environ):
    """Join the run's process group (several processes), or not (one); returns this process's Group.

    Each process takes one GPU: --gpu (the original's manual launch), else LOCAL_RANK (torchrun),
    else its rank modulo the machine's GPUs. Backend: --dist-backend, else nccl on CUDA, gloo on CPU."""
    world, rank, local = _place(args, env)
    if world == 1:
        return Group(pick_device(args.device, args.gpu))
    gpu = None
    if args.device != "cpu" and torch.cuda.is_available():
        gpu = args.gpu if args.gpu is not None else local if local is not None else rank % torch.cuda.device_count()
    device = pick_device(args.device, gpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, init_method=args.dist_url, world_size=world, rank=rank)
    return Group(device, world, rank, sync_bn=args.sync_bn)


def stop():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _SumOverProcesses(torch.autograd.Function):
    """A tensor summed over the processes, differentiably. Every process's loss depends on this
    process's tensor through the sum, so its gradient here is the sum of all the processes' output
    gradients: the same all_reduce again, and differentiable in turn (double back-propagation)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _SumOverProcesses.apply(grad)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes by the statistics of the global batch, every process's shard together.

    torch.nn.SyncBatchNorm runs on GPUs only, and its backward is not differentiable again, which the
    readout's gradient penalty needs (it differentiates the critic R(F4(x)) with respect to the
    image, through F's BatchNorm, and then that gradient's norm with respect to the weights). This one
    is made of a differentiable all_reduce, so autograd derives every order.
    The state dict is BatchNorm2d's: checkpoints do not depend on --sync-bn."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()  # statistics in float32, under --amp too
        count = xf.new_full((1,), xf.numel() / xf.size(1))
        sums = _SumOverProcesses.apply(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = xf - mean.view(1, -1, 1, 1)
        # Two passes (mean, then squares about it) rather than E[x^2] - E[x]^2, which cancels badly.
        var = _SumOverProcesses.apply(centered.pow(2).sum(dim=(0, 2, 3))) / n
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)  # unbiased, as BatchNorm keeps it
        return y.to(x.dtype)


def convert_sync_batchnorm(module):
    """Replace every BatchNorm2d in `module` by a SyncBatchNorm2d holding the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers()).device)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def free_port():
    """A TCP port on the loopback interface that nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_args(args, local_rank, nprocs):
    """The flags of process `local_rank` of --multiprocessing-distributed, in the original's terms:
    --world-size machines of `nprocs` processes each, --rank the machine."""
    args = copy.copy(args)
    machine = args.rank or 0
    args.world_size = (args.world_size or 1) * nprocs
    args.rank = machine * nprocs + local_rank
    args.gpu = local_rank if args.device != "cpu" and torch.cuda.is_available() else None
    args.multiprocessing_distributed = False
    return args


def spawn(worker, args, nprocs):
    """The original's --multiprocessing-distributed: start `nprocs` processes on this machine, each
    running worker(local_rank, args, nprocs), and wait for them all; returns the exit code of the
    first that failed, or 0.

    The workers get Ctrl-C from the terminal themselves, so this launcher ignores it; a SIGTERM sent
    to the launcher alone (a scheduler's) is passed on to them. Either way each worker finishes its
    step and rank 0 saves a checkpoint."""
    if args.dist_url == "env://" and not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())  # one machine
    context = mp.start_processes(worker, args=(args, nprocs), nprocs=nprocs, join=False, start_method="spawn")

    def pass_on(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on)}
    try:
        # The grace period lets the others finish their own exit (rank 0 its checkpoint) once one has ended.
        while not context.join(grace_period=60):
            pass
        return 0
    except mp.ProcessExitedException as e:
        return 128 - e.exit_code if e.exit_code < 0 else e.exit_code
    except mp.ProcessRaisedException as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
