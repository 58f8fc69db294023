"""The README stays true: its quick start is the example that tests/test_train.py runs, and it names every option of
the public losses."""
import inspect
import re
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
