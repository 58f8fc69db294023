"""Backend selection: auto order, explicit choice, the INFIGW_BACKEND override, and the availability report."""
import pytest
import torch

import infigw
from infigw import dispatch


def test_report_names_every_backend_and_torch_is_available():
    report = infigw.backends()
    assert set(report) == set(dispatch.BACKENDS)
    assert report["torch"] == "available"
    assert all(isinstance(reason, str) and reason for reason in report.values())


@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_on_cpu_picks_the_first_available_of_the_cpu_order(op):
    name, implementation = dispatch.resolve(op, "auto", torch.device("cpu"))
    expected = next(b for b in dispatch.AUTO_ORDER["cpu"][op] if infigw.backends()[b] == "available")
    assert name == expected and callable(implementation)


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("INFIGW_BACKEND", "torch")
    assert dispatch.resolve("sorted_gw1d", "auto", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("INFIGW_BACKEND", "cuda")
    with pytest.raises(infigw.BackendUnavailableError, match="runs on CUDA tensors|cuda"):
        dispatch.resolve("sorted_gw1d", "auto", torch.device("cpu"))
    assert dispatch.resolve("sorted_gw1d", "torch", torch.device("cpu"))[0] == "torch"


def test_unknown_op_and_backend():
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.resolve("sinkhorn", "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be"):
        dispatch.resolve("sorted_gw1d", "jax", torch.device("cpu"))


def test_k_limits_steer_auto_and_name_the_limit(monkeypatch):
    monkeypatch.setitem(dispatch._IMPLS, ("cpp", "topk_degrees"), lambda *args: None)
    monkeypatch.setitem(dispatch._MAX_K, ("cpp", "topk_degrees"), 4)
    cpu = torch.device("cpu")
    assert dispatch.resolve("topk_degrees", "auto", cpu, k=4)[0] == "cpp"
    assert dispatch.resolve("topk_degrees", "auto", cpu, k=5)[0] == "torch"
    with pytest.raises(infigw.BackendUnavailableError, match="supports k <= 4"):
        dispatch.resolve("topk_degrees", "cpp", cpu, k=5)
