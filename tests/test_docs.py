"""The README stays true: its quick start is the example that tests/test_train.py runs, its torchrun example runs
on two gloo processes as written, and it names every option of the public losses."""
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import infigw.functional as F

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_quick_start_is_the_first_example_of_docs_training():
    training = (ROOT / "docs" / "training.md").read_text()
    assert _python_blocks(README)[0] == _python_blocks(training)[0], (
        "README.md's first Python block must equal docs/training.md's first one (tests/test_train.py runs that)")


@pytest.mark.parametrize("name", ["gld_loss", "uld_loss", "infigfusion_loss"])
def test_the_readme_names_every_option_of_the_public_losses(name):
    documented = README + (ROOT / "docs" / "training.md").read_text() + (ROOT / "docs" / "distributed.md").read_text()
    options = [p for p in inspect.signature(getattr(F, name)).parameters if p not in ("student_logits", "teacher_logits")]
    missing = [option for option in options if not re.search(rf"\b{option}(=|`|,)", documented)]
    assert not missing, f"{name}: options not named in README.md or docs/: {missing}"


def test_every_linked_document_exists():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


TORCHRUN_BLOCKS = [block for block in _python_blocks((ROOT / "docs" / "distributed.md").read_text())
                   if block.startswith("# torchrun --nproc_per_node 2")]


def test_the_readme_distributed_example_is_one_of_docs_distributed():
    assert any(block.startswith("# torchrun") for block in _python_blocks(README))
    for block in _python_blocks(README):
        if block.startswith("# torchrun"):
            assert block in TORCHRUN_BLOCKS, "README.md's torchrun example must be one of docs/distributed.md's"


@pytest.mark.parametrize("block", TORCHRUN_BLOCKS, ids=lambda block: block.split()[3])
def test_the_torchrun_examples_run_as_written(block, tmp_path):
    script = tmp_path / block.split()[3]
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("rank") >= 2, done.stdout
