"""Every script's --help says each flag's default once, and its output into a log holds no progress-bar frames."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train.py", "generate_and_save_imgs.py", "SVM_classify_from_model.py", "measure_inference.py",
           "neuromodulation.py", "neuromodulation_summary.py", "sample_quality.py", "experiments/matching.py",
           "experiments/rule_comparison.py", "experiments/step_vs_release.py"]


def flag_entries(help_text):
    """The help text of each flag: from a line that starts with an option to the next such line."""
    entries, current = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return [" ".join(e) for e in entries]


def test_flag_entries_split_a_help_text_by_flag():
    text = "options:\n  -h, --help  show\n  --a A       first (default: 1)\n              more\n  --b B       second\n"
    assert flag_entries(text) == ["  -h, --help  show", "  --a A       first (default: 1)               more",
                                  "  --b B       second"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_each_default_once(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    entries = flag_entries(out)
    assert len(entries) > 2, out
    doubled = [e for e in entries if len(re.findall(r"default", e, flags=re.IGNORECASE)) > 1]
    assert not doubled, "\n".join(doubled)
    assert "(default: None)" not in out


def test_a_log_file_holds_no_progress_bar_frames(mnist_root, tmp_path):
    """Training, sampling and the probe with their output in a file: one line per epoch or stage, no
    carriage-return frames of a progress bar."""
    from conftest import TINY
    env = {k: v for k, v in os.environ.items() if k != "AWS_PROGRESS"}
    env["OMP_NUM_THREADS"] = "1"
    log = tmp_path / "log.txt"
    commands = [["train.py", *TINY, "--dataset", "mnist", "--data", mnist_root, "-b", "16", "--epochs", "2",
                 "--probe-folds", "2", "--seed", "0", "--out", str(tmp_path), "--device", "cpu"],
                ["generate_and_save_imgs.py", "--path", str(tmp_path), "--n-images", "40", "-b", "20",
                 "--out", str(tmp_path / "samples")],
                ["SVM_classify_from_model.py", "--path", str(tmp_path), "-b", "20", "--n-folds", "2", "--epochs", "1"]]
    with open(log, "wb") as f:
        for argv in commands:
            subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                           check=True, timeout=300)
    text = log.read_bytes()
    assert b"\r" not in text, text.decode()[-2000:]
    lines = text.decode().splitlines()
    assert sum(line.startswith("epoch=") for line in lines) == 2, "\n".join(lines)  # one line per epoch


def test_ci_runs_the_readme_s_set_up_and_both_requirement_files_list_the_same_packages():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme[readme.index("## Set up"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    install = next(c for c in commands if c.startswith("pip install"))
    test = next(c for c in commands if "pytest" in c)
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert install.replace("pip install", "python -m pip install --quiet --disable-pip-version-check") in ci
    assert test in ci.splitlines()
    txt = [l.strip() for l in open(os.path.join(ROOT, "requirements.txt")) if l.strip() and not l.startswith("#")]
    yaml = [l.strip()[2:] for l in open(os.path.join(ROOT, "requirements.yaml")) if l.startswith("      - ")]
    assert txt == yaml and any(p.startswith("pytest") for p in txt)
