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


@pytest.mark.parametrize("name", ["gld_loss", "uld_loss", "infigfusion_loss", "fused_linear_gld_loss",
                                  "fused_linear_uld_loss", "fused_linear_infigfusion_loss"])
def test_the_readme_names_every_option_of_the_public_losses(name):
    documented = README + "".join((ROOT / "docs" / page).read_text()
                                  for page in ("training.md", "distributed.md", "fused_linear.md"))
    inputs = ("student_logits", "teacher_logits", "student_hidden", "lm_head_weight")
    options = [p for p in inspect.signature(getattr(F, name)).parameters if p not in inputs]
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


def test_the_fused_linear_trainer_drop_in_trains_as_written(tmp_path):
    """docs/fused_linear.md's FusedFusionTrainer, exactly as printed, inside a real transformers Trainer."""
    pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    import torch
    from transformers import TrainingArguments, default_data_collator

    from infigw.train.toy import tiny_llama

    blocks = [block for block in _python_blocks((ROOT / "docs" / "fused_linear.md").read_text())
              if "class FusedFusionTrainer" in block]
    assert len(blocks) == 1, "docs/fused_linear.md must hold one FusedFusionTrainer example"
    assert blocks == [block for block in _python_blocks(README) if "class FusedFusionTrainer" in block], (
        "README.md's FusedFusionTrainer must be docs/fused_linear.md's")
    namespace = {}
    exec(compile(blocks[0], "docs/fused_linear.md", "exec"), namespace)
    ids = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})
    trainer = namespace["FusedFusionTrainer"](
        model=tiny_llama(97, seed=0), teacher_model=tiny_llama(97, hidden=64, seed=1),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                               logging_steps=1, report_to=[], save_strategy="no", use_cpu=True),
        train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), trainer.state.log_history
