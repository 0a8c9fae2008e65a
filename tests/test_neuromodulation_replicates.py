"""neuromodulation.py's replicates (issue 42): each run draws its images from its own seed, a given
--seed reproduces a run's records to the bit, and every experiment writes a control record beside
the trained one."""
import json

import torch

import neuromodulation as nm
import neuromodulation_experiments as ex
from checkpoint import load_checkpoint, save_checkpoint
from conftest import make_checkpoint
from test_neuromodulation import SMALL

# What differs between two runs of the script that draw the same images with the same networks.
NOT_DRAWN = ("time", "flags", "checkpoint", "image_seed_from")


def _of_seed(path, seed, folder):
    """The checkpoint at `path` as a run of `seed` would have written it: the same networks, so
    that what differs between the two is the seed alone."""
    state = load_checkpoint(path)
    state["seed"] = seed
    folder.mkdir()
    save_checkpoint(str(folder / "checkpoint.pth.tar"), state)
    return str(folder / "checkpoint.pth.tar")


def _setup(path, *flags):
    return nm.setup(nm.get_parser().parse_args(["--path", str(path), *SMALL, *flags]))


def _run(path, out, *flags):
    assert nm.main(["--path", str(path), "--out", str(out), *SMALL, *flags]) == 0
    return [{k: v for k, v in r.items() if k not in NOT_DRAWN} for r in json.loads((out / "records.json").read_text())]


def test_runs_of_two_seeds_draw_different_images(mnist_root, tmp_path):
    first = make_checkpoint(tmp_path / "run0", "mnist", mnist_root)
    second = _of_seed(first, 1, tmp_path / "run1")
    s0, s1 = _setup(first), _setup(second)
    assert (s0.seed, s0.seed_from, s1.seed, s1.seed_from) == (0, "run", 1, "run")
    inputs0, inputs1 = dict(ex.novelty_inputs(s0)), dict(ex.novelty_inputs(s1))
    assert list(inputs0) == list(inputs1)
    for name in inputs0:
        assert not torch.equal(inputs0[name], inputs1[name]), name
    assert not torch.equal(ex.oddball_familiar(s0), ex.oddball_familiar(s1))
    records = [_run(path, tmp_path / f"out{i}", "--experiments", "wake-sleep") for i, path in enumerate((first, second))]
    assert [r[0]["image_seed"] for r in records] == [0, 1]
    assert records[0][0]["signal"] != records[1][0]["signal"]  # the same networks, other images


def test_a_given_seed_reproduces_a_runs_records_and_every_experiment_has_its_controls(mnist_root, tmp_path):
    """The seed-1 run's own records made again by --seed 1: every value equal, every experiment. And
    each experiment's records of the trained networks stand beside those of the same networks at
    initialization and of an early checkpoint: the same conditions, the same measures."""
    run = _of_seed(make_checkpoint(tmp_path / "run0", "mnist", mnist_root), 1, tmp_path / "run1")
    early = make_checkpoint(tmp_path / "early", "mnist", mnist_root, "--epochs", "2")
    own = _run(run, tmp_path / "own", "--early", early)
    assert json.dumps(own) == json.dumps(_run(run, tmp_path / "given", "--seed", "1", "--early", early))
    assert json.loads((tmp_path / "given" / "records.json").read_text())[0]["image_seed_from"] == "--seed"
    for experiment in nm.EXPERIMENTS:
        of = {label: [r for r in own if r["experiment"] == experiment and r["networks"] == label]
              for label in ("trained", "initialization", "early")}
        where = [[(r.get("condition"), r.get("axis"), r.get("level")) for r in rs] for rs in of.values()]
        assert where[0] and where[0] == where[1] == where[2], experiment
        measures = [[e["measure"] for r in rs for e in r.get("effects", [])] for rs in of.values()]
        assert measures[0] and measures[0] == measures[1] == measures[2], experiment
        names = [e["effect"] for r in of["initialization"] for e in r.get("effects", [])]
        assert all(name.startswith(f"{experiment} | initialization | ") for name in names), experiment
    trained, untrained = (next(r for r in own if r["experiment"] == "wake-sleep" and r["networks"] == label)
                          for label in ("trained", "initialization"))
    assert untrained["networks_steps"] == 0 and trained["signal"] != untrained["signal"]  # other networks
