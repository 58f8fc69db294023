"""The option codes and the CUDA k limit exist once per language: csrc/contract.h and infigw/contract.py.
This test parses the header and keeps the two equal (names, codes, and the limit)."""
import re
from pathlib import Path

from infigw import contract

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "contract.h").read_text()
TABLES = {"Values": contract.VALUES, "Nodes": contract.NODES, "GraphNorm": contract.NORMS}


def _names(table: str):
    match = re.search(rf"k{table}Names\[\]\s*=\s*\{{([^}}]*)\}}", HEADER)
    assert match, f"k{table}Names not found in csrc/contract.h"
    return re.findall(r'"([^"]+)"', match.group(1))


def _enum(name: str):
    match = re.search(rf"enum {name}\s*:\s*int\s*\{{([^}}]*)\}}", HEADER)
    assert match, f"enum {name} not found in csrc/contract.h"
    return {key: int(value) for key, value in re.findall(r"(k\w+)\s*=\s*(\d+)", match.group(1))}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def test_option_names_and_codes_agree():
    enums = {"Values": ("ValuesMode", "kValues"), "Nodes": ("NodesMode", "kNodes"), "GraphNorm": ("GraphNorm", "kNorm")}
    for table, python in TABLES.items():
        names = _names(table)
        assert {name: code for code, name in enumerate(names)} == python, f"{table}: csrc/contract.h {names}"
        enum_name, prefix = enums[table]
        assert _enum(enum_name) == {prefix + _camel(name): code for name, code in python.items()}, enum_name


def test_cuda_k_limit_agrees():
    match = re.search(r"kCudaMaxK\s*=\s*(\d+)", HEADER)
    assert match and int(match.group(1)) == contract.CUDA_MAX_K
