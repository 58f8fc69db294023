"""infigw.merge: method math on hand-computed tensors, streaming == in-memory bit for bit, bad inputs."""
import json
import math

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from infigw.merge import (  # noqa: E402
    LEGACY_METHODS,
    METHODS,
    DareTies,
    MergePlan,
    Rsaf,
    TensorStats,
    Ties,
    get_method,
    keep_count,
    merge_safetensors,
    merge_state_dicts,
    parse_size,
    rsaf_keep_ratios,
)
from infigw.merge.__main__ import main as cli_main  # noqa: E402
from infigw.merge.sparsify import MagnitudeSelector  # noqa: E402

ALL_METHODS = sorted(METHODS) + ["average"]  # "dare" (deprecated) is tested on its own


def _vec(values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def _assert_equal(actual, expected, what):
    assert torch.equal(actual, expected), (
        f"{what}: max |diff| = {(actual.double() - expected.double()).abs().max().item()}\n"
        f"actual   {actual}\nexpected {expected}"
    )


# ------------------------------------------------------------------------------------------- method math


def test_average_and_task_arithmetic_by_hand():
    base = _vec([1.0, 2.0, 3.0])
    models = [_vec([2.0, 2.0, 5.0]), _vec([0.0, 4.0, 3.0])]
    _assert_equal(merge_state_dicts(base, models, "average")["w"], torch.tensor([1.0, 3.0, 4.0]), "average")
    out = merge_state_dicts(base, models, "task_arithmetic", weights=[1.0, 1.0], scale=0.5)["w"]
    _assert_equal(out, torch.tensor([1.0, 3.0, 4.0]), "task arithmetic 0.5·(Δ1+Δ2)")
    # negative weights subtract a task vector (mergekit allows any sign)
    out = merge_state_dicts(base, models, "task_arithmetic", weights=[1.0, -1.0])["w"]
    _assert_equal(out, torch.tensor([3.0, 0.0, 5.0]), "Δ1 − Δ2")


def test_ties_trim_elect_sign_disjoint_mean_by_hand():
    base = _vec([1.0, 1.0, 1.0, 1.0])
    deltas = [[3.0, -2.0, 0.5, 1.0], [-1.0, -3.0, 0.2, 2.0], [-4.0, 1.0, 0.1, -0.5]]
    models = [{"w": base["w"] + torch.tensor(d)} for d in deltas]
    # density 0.5 of 4 entries keeps k = ⌊2⌋ per model: T1=[3,-2,0,0], T2=[0,-3,0,2], T3=[-4,1,0,0];
    # elected sign of the sum [-1,-4,0,2] = [-,-,+ (zero vote),+]; disjoint means of agreeing entries:
    # [-4, -2.5, 0 (nobody agrees: divisor 0 counts as 1), 2]
    out = merge_state_dicts(base, models, "ties", density=0.5, weights=[1.0, 1.0, 1.0])["w"]
    _assert_equal(out, torch.tensor([-3.0, -1.5, 1.0, 3.0]), "TIES")
    # normalize=False: the disjoint sum
    out = merge_state_dicts(base, models, Ties(density=0.5, weights=[1.0] * 3, normalize=False))["w"]
    _assert_equal(out, torch.tensor([-3.0, -4.0, 1.0, 3.0]), "TIES, normalize false")


def test_zero_sign_vote_elects_plus():
    base = _vec([0.0, 0.0])
    models = [_vec([2.0, -1.0]), _vec([-2.0, 1.0])]  # exactly opposite: Σ w·Δ = 0 everywhere
    out = merge_state_dicts(base, models, "ties", density=1.0, weights=[1.0, 1.0])["w"]
    _assert_equal(out, torch.tensor([2.0, 1.0]), "zero vote: the positive deltas are kept")
    out = merge_state_dicts(base, models, Ties(density=1.0, weights=[1.0, 1.0], consensus_method="count"))["w"]
    _assert_equal(out, torch.tensor([2.0, 1.0]), "zero count: the positive deltas are kept")


@pytest.mark.parametrize("chunk_elems", [1, 3, 100])
def test_magnitude_keeps_exactly_k_lowest_index_first(chunk_elems):
    base = {"w": torch.zeros(2, 3)}
    models = [{"w": torch.tensor([[0.5, -1.0, 1.0], [1.0, -1.0, 0.25]])}]
    # k = ⌊0.5·6⌋ = 3 of the four entries with |Δ| = 1 (threshold 1): the first three in flat order
    out = merge_state_dicts(base, models, "ties", density=0.5, chunk_elems=chunk_elems)["w"]
    _assert_equal(out, torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, 0.0]]), f"exact k, chunk {chunk_elems}")


def test_keep_count_floors_like_mergekit():
    assert [keep_count(0.2, 10), keep_count(0.29, 10), keep_count(1e-9, 10), keep_count(1.0, 7),
            keep_count(0.0, 7)] == [2, 2, 1, 7, 0]


@pytest.mark.parametrize("numel,chunk", [(1, 1), (1000, 1000), (1009, 331), (4096, 1024)])
def test_radix_threshold_equals_kthvalue(numel, chunk):
    g = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=g).abs()
    values[:: 7] = 0.0  # many exact ties at zero
    values[1::11] = values[-1]  # and a repeated (mostly non-zero) value
    for k in sorted({1, min(2, numel), numel // 3 + 1, numel // 2 + 1, numel}):
        selector = MagnitudeSelector()
        for start in range(0, numel, chunk):
            selector.add_high(values[start : start + chunk])
        selector.choose_bucket(k, track_sums=True)
        for start in range(0, numel, chunk):
            selector.add_low(values[start : start + chunk])
        expected = torch.kthvalue(values, numel - k + 1).values.item()
        assert selector.threshold() == expected, f"k={k}: radix {selector.threshold()} vs kthvalue {expected}"
        above = values > expected
        assert selector.count_above() == int(above.sum()), f"k={k}: entries above the threshold"
        assert selector.sum_above() == pytest.approx(values[above].double().sum().item(), rel=1e-12, abs=1e-12)


def test_dare_l1_rescale_and_seed():
    n, density, c = 200_000, 0.1, 0.5
    base = {"w": torch.zeros(n)}
    models = [{"w": torch.full((n,), c)}]
    out = merge_state_dicts(base, models, "dare_linear", density=density, weights=[1.0], seed=3)["w"]
    kept = out != 0
    # mergekit's rule: the kept entries are scaled so that the L1 norm of the delta is unchanged
    assert out.double().sum().item() == pytest.approx(n * c, rel=1e-6), "L1 norm of the delta preserved"
    _assert_equal(out[kept], torch.full_like(out[kept], out[kept][0].item()), "one factor per tensor")
    assert out[kept][0].item() == pytest.approx(c * n / int(kept.sum()), rel=1e-6)
    frac_sd = math.sqrt(density * (1 - density) / n)
    assert abs(kept.double().mean().item() - density) < 6 * frac_sd, f"kept fraction {kept.double().mean()}"
    again = merge_state_dicts(base, models, "dare_linear", density=density, weights=[1.0], seed=3)["w"]
    other = merge_state_dicts(base, models, "dare_linear", density=density, weights=[1.0], seed=4)["w"]
    _assert_equal(again, out, "DARE with the same seed")
    assert not torch.equal(other, out), "a different seed must give a different mask"


@pytest.mark.parametrize("chunk_elems", [7, 1000])
def test_dare_masks_are_mergekits_random_stream(chunk_elems):
    """mergekit seeds torch's global generator and draws torch.bernoulli(full(density)) per tensor (sorted
    names) and per model, in the working dtype (bf16 stays bf16): the same masks, whatever the chunking."""
    g = torch.Generator().manual_seed(0)
    names = ["b.weight", "a.weight", "c.bias"]  # processed in sorted order
    base = {n: torch.randn(5, 9, generator=g).bfloat16() for n in names}
    models = [{n: (t.float() + torch.randn(t.shape, generator=g)).bfloat16() for n, t in base.items()}
              for _ in range(2)]
    densities, seed = [0.3, 0.7], 123
    out = merge_state_dicts(base, models, "dare_linear", density=densities, weights=[1.0, 1.0], rescale=False,
                            dtype=None, seed=seed, chunk_elems=chunk_elems)
    torch.manual_seed(seed)
    for name in sorted(names):
        deltas = []
        for model, density in zip(models, densities):
            mask = torch.bernoulli(torch.full(base[name].shape, density, dtype=torch.bfloat16))
            deltas.append((model[name] - base[name]) * mask)
        expected = base[name] + (deltas[0] + deltas[1])
        _assert_equal(out[name], expected, f"{name}: masks from the seeded global stream")


def test_dare_ties_sums_agreeing_deltas_not_their_mean():
    """The trial's defect: DARE with sign election averaged the survivors, which ~doubles the merged delta."""
    base = _vec([0.0, 0.0])
    models = [_vec([2.0, -1.0]), _vec([-1.0, -3.0]), _vec([4.0, 5.0])]
    # density 1 keeps everything; signs of the sums [5, 1] are +,+; agreeing sums [6, 5]
    out = merge_state_dicts(base, models, DareTies(density=1.0, weights=[1.0] * 3))["w"]
    _assert_equal(out, torch.tensor([6.0, 5.0]), "DARE-TIES")
    n, c = 100_000, 0.25
    base = {"w": torch.zeros(n)}
    models = [{"w": torch.full((n,), c)}, {"w": torch.full((n,), c)}]
    out = merge_state_dicts(base, models, "dare_ties", density=0.1, weights=[0.5, 0.5], seed=1)["w"]
    assert out.double().mean().item() == pytest.approx(c, rel=1e-5), "E[merged Δ] = Σ w_m Δ_m"
    with pytest.warns(FutureWarning, match="'dare' is deprecated: use 'dare_ties' with density = 1 - drop_rate"):
        legacy = merge_state_dicts(base, models, "dare", drop_rate=0.9, elect_sign=True, seed=1)["w"]
    _assert_equal(legacy, out, "legacy dare --elect-sign = dare_ties, weights 1/K, density 1 − p")


def test_linear_averages_the_weights_not_the_deltas():
    base = _vec([100.0, 100.0])  # the layout only
    models = [_vec([1.0, 2.0]), _vec([3.0, 6.0])]
    _assert_equal(merge_state_dicts(base, models, "linear", weights=[1.0, 3.0])["w"], torch.tensor([2.5, 5.0]),
                  "linear")
    out = merge_state_dicts(base, models, "linear", weights=[1.0, 3.0], normalize=False)["w"]
    _assert_equal(out, torch.tensor([10.0, 20.0]), "linear, normalize false")
    with pytest.raises(ValueError, match="weights sum to 0"):
        merge_state_dicts(base, models, "linear", weights=[1.0, -1.0])


def test_working_dtype_and_out_dtype():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, generator=g).bfloat16()}
    models = [{"w": (base["w"].float() + torch.randn(64, generator=g) * 0.01).bfloat16()} for _ in range(3)]
    weights = [0.3, 0.3, 0.3]
    in_bf16 = merge_state_dicts(base, models, "task_arithmetic", weights=weights, dtype="bfloat16")["w"]
    stacked = torch.stack([m["w"] - base["w"] for m in models]) * torch.tensor(weights, dtype=torch.bfloat16)[:, None]
    _assert_equal(in_bf16, base["w"] + stacked.sum(0), "bf16 arithmetic op for op (mergekit's)")
    in_fp32 = merge_state_dicts(base, models, "task_arithmetic", weights=weights, out_dtype="float32")["w"]
    exact = base["w"].double() + sum(w * (m["w"].double() - base["w"].double()) for w, m in zip(weights, models))
    assert in_fp32.dtype == torch.float32 and (in_fp32.double() - exact).abs().max() < 1e-6
    with pytest.raises(ValueError, match="dtype: expected one of"):
        merge_state_dicts(base, models, "average", dtype="int8")


def test_rsaf_keep_ratios_formula_and_bounds():
    r = rsaf_keep_ratios([1.0, 3.0], [0.0, 1.0])
    expected = [0.2 * (1 + math.tanh(0.5)), 0.2 * (1 + math.tanh(1.5)) / 2]
    assert r == pytest.approx(expected, rel=1e-12)
    assert rsaf_keep_ratios([0.0, 0.0], [0.0, 0.0]) == [0.2, 0.2]
    g = torch.Generator().manual_seed(0)
    rates = (torch.rand(500, generator=g) * 10).pow(3).tolist()
    skews = (torch.randn(500, generator=g) * 20).tolist()
    for r_min, r_max in [(0.05, 0.5), (0.1, 0.15), (0.3, 0.3)]:
        ratios = rsaf_keep_ratios(rates, skews, r0=0.4, beta=3.0, r_min=r_min, r_max=r_max)
        assert all(r_min <= x <= r_max for x in ratios), f"ratios outside [{r_min}, {r_max}]"
        assert min(ratios) == r_min or r_min == r_max


def test_tensor_stats_skewness_matches_population_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5000, generator=g, dtype=torch.float64).exp()
    stats = TensorStats(a.numel(), 1.0, [a.sum().item()], [(a**2).sum().item()], [(a**3).sum().item()])
    centred = a - a.mean()
    expected = (centred**3).mean() / (centred**2).mean() ** 1.5
    assert stats.skewness()[0] == pytest.approx(expected.item(), rel=1e-9)
    constant = TensorStats(4, 1.0, [4.0], [4.0], [4.0])
    assert constant.skewness() == [0.0]


@pytest.mark.parametrize("chunk_elems", [10_000, 64])
def test_rsaf_merge_against_explicit_formula(chunk_elems):
    g = torch.Generator().manual_seed(2)
    shape = (40, 30)
    base = {"w": torch.randn(shape, generator=g)}
    scales = [0.01, 0.05, 0.2]
    models = [{"w": base["w"] + s * torch.randn(shape, generator=g) ** 3} for s in scales]
    out = merge_state_dicts(base, models, "rsaf", chunk_elems=chunk_elems)["w"]

    deltas = [(m["w"] - base["w"]).double() for m in models]
    rates = [d.abs().sum().item() / (base["w"].double().abs().sum().item() + 1e-12) for d in deltas]
    skews = []
    for d in deltas:
        c = d.abs() - d.abs().mean()
        skews.append(((c**3).mean() / (c**2).mean() ** 1.5).item())
    ratios = rsaf_keep_ratios(rates, skews)
    expected = base["w"].clone()
    n = base["w"].numel()
    for d, rate, ratio in zip(deltas, rates, ratios):
        assert 0.05 <= ratio <= 0.5
        d32 = d.float()
        k = keep_count(ratio, n)
        threshold = torch.kthvalue(d32.abs().flatten(), n - k + 1).values
        mask = d32.abs() >= threshold
        assert mask.sum().item() == k, "continuous deltas: exactly k entries kept"
        expected += (rate / sum(rates)) * torch.where(mask, d32, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_method_option_validation():
    with pytest.raises(ValueError, match=r"density\[0\] \(kept fraction\) must lie in \[0, 1\]"):
        merge_state_dicts(_vec([0.0]), [_vec([1.0])], "ties", density=1.5)
    with pytest.raises(ValueError, match="drop_rate must lie in"):
        get_method("dare", drop_rate=1.0)
    with pytest.raises(ValueError, match="r_min .* must not exceed r_max"):
        Rsaf(r_min=0.6, r_max=0.5)
    with pytest.raises(ValueError, match="method: expected one of"):
        get_method("nope")
    with pytest.raises(TypeError, match="method 'ties': got an unexpected keyword argument 'drop_rate'"):
        get_method("ties", drop_rate=0.5)
    with pytest.raises(ValueError, match="weights has 1 entries, expected one per model"):
        merge_state_dicts(_vec([0.0]), [_vec([1.0]), _vec([2.0])], "average", weights=[1.0])
    with pytest.raises(ValueError, match="weights are all 0"):
        merge_state_dicts(_vec([0.0]), [_vec([1.0])], "task_arithmetic", weights=[0.0])
    assert sorted(METHODS) == ["dare_linear", "dare_ties", "linear", "rsaf", "task_arithmetic", "ties"]
    assert sorted(LEGACY_METHODS) == ["average", "dare"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(17) == 17
    with pytest.raises(ValueError, match="shard size"):
        parse_size("five")


def test_custom_method_plugs_in():
    class Second:
        name, needs_stats = "second", False

        def plan(self, num_models, stats):
            return MergePlan(weights=[0.0, 1.0])

    base, models = _vec([1.0, 1.0]), [_vec([5.0, 5.0]), _vec([2.0, 3.0])]
    _assert_equal(merge_state_dicts(base, models, Second())["w"], torch.tensor([2.0, 3.0]), "custom method")

    class Trimmed(Second):
        def plan(self, num_models, stats):
            return MergePlan(weights=[0.5, 0.5], sparsification="magnitude", density=[0.5, 0.5])

    _assert_equal(merge_state_dicts(base, models, Trimmed())["w"], torch.tensor([3.0, 2.0]), "magnitude, no stats")

    class Broken(Second):
        def plan(self, num_models, stats):
            return {"weights": [1.0, 1.0]}

    with pytest.raises(TypeError, match=r"plan\(\) must return a MergePlan, got dict"):
        merge_state_dicts(base, models, Broken())


# ------------------------------------------------------------------------------------------- state dicts


def test_state_dict_single_model_inputs_untouched_and_buffers_copied():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 3, generator=g).bfloat16(), "pos": torch.arange(6), "flag": torch.tensor(True)}
    model = {"w": (base["w"].float() + torch.randn(6, 3, generator=g)).bfloat16(), "pos": torch.arange(6),
             "flag": torch.tensor(True)}
    snapshot = {k: v.clone() for k, v in model.items()}
    out = merge_state_dicts(base, [model], "average", chunk_elems=4)
    _assert_equal(out["w"], model["w"], "K=1 average returns the model")
    assert out["w"].dtype == torch.bfloat16
    _assert_equal(out["pos"], base["pos"], "integer buffer copied")
    assert out["pos"].data_ptr() != base["pos"].data_ptr(), "output must not alias the base"
    for k in model:
        _assert_equal(model[k], snapshot[k], f"input {k} unchanged")


def test_tied_weights_stay_tied():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(8, 4, generator=g)
    base = {"embed": emb, "lm_head": emb, "b": torch.zeros(4)}
    models = []
    for _ in range(2):
        e = emb + torch.randn(8, 4, generator=g)
        models.append({"embed": e, "lm_head": e, "b": torch.randn(4, generator=g)})
    out = merge_state_dicts(base, models, "dare_linear", density=0.5)
    assert out["embed"] is out["lm_head"], "tied names must share one merged tensor"
    models[1]["lm_head"] = models[1]["lm_head"] + 1.0
    with pytest.raises(ValueError, match="'embed' and 'lm_head' are tied in the base but differ"):
        merge_state_dicts(base, models, "average")


def test_state_dict_bad_inputs():
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        merge_state_dicts(base, [], "average")
    with pytest.raises(ValueError, match=r"model 0: tensor 'w' has shape \[3, 2\], base has \[2, 3\]"):
        merge_state_dicts(base, [{"w": torch.zeros(3, 2)}], "average")
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        merge_state_dicts(base, [{"w": [0.0]}], "average")


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("culprit", ["base", "model 1"])
def test_non_finite_errors_name_the_model_and_the_tensor(method, culprit):
    g = torch.Generator().manual_seed(9)
    base = {"a": torch.randn(4, 5, generator=g), "w": torch.randn(4, 5, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    target = base if culprit == "base" else models[1]
    target["w"] = target["w"].clone()
    target["w"][2, 3] = float("inf")
    options = {"weights": [0.5, 0.5]} if method not in ("rsaf", "average") else {}
    if method == "linear" and culprit == "base":  # linear reads only the models; the base gives the layout
        assert merge_state_dicts(base, models, method, chunk_elems=5, **options)["w"].isfinite().all()
        return
    with pytest.raises(ValueError, match=rf"^{culprit}: tensor 'w' has inf/NaN values"):
        merge_state_dicts(base, models, method, chunk_elems=5, **options)


def test_overflow_of_finite_inputs_is_reported_as_such():
    base, models = _vec([0.0]), [_vec([3e38])]
    with pytest.raises(ValueError, match="tensor 'w': merged values overflow torch.float32 although every input"):
        merge_state_dicts(base, models, "task_arithmetic", weights=[2.0])


def test_parameters_give_plain_tensors():
    layer = torch.nn.Linear(3, 2)
    base = dict(layer.named_parameters())
    models = [{k: torch.nn.Parameter(v.detach() + 1.0) for k, v in base.items()}]
    out = merge_state_dicts(base, models, "average")
    for name, t in out.items():
        assert type(t) is torch.Tensor and not t.requires_grad and t.grad_fn is None, name


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: merge_state_dicts([torch.zeros(1)], [_vec([0.0])]), TypeError, "base: expected a state dict"),
        (lambda: merge_state_dicts(_vec([0.0]), _vec([1.0])), TypeError, "models: expected a sequence of state"),
        (lambda: merge_state_dicts(_vec([0.0]), "ab"), TypeError, "models: expected a sequence of state dicts"),
        (lambda: merge_state_dicts(_vec([0.0]), [[1.0]]), TypeError, r"models\[0\]: expected a state dict"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "ties", scale="x"), TypeError,
         r"ties: scale \(lambda\) must be a finite number, got 'x'"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])] * 2, "average", weights="ab"), TypeError,
         "task_arithmetic: weights: expected a number or a sequence of numbers, got 'ab'"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "rsaf", r0="a"), TypeError,
         "rsaf: r0 must be a finite number, got 'a'"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "average", chunk_elems=0), ValueError,
         "chunk_elems must be a positive integer, got 0"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "average", chunk_elems=-1), ValueError,
         "chunk_elems must be a positive integer, got -1"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "average", seed=-1), ValueError, "seed must be"),
        (lambda: merge_state_dicts(_vec([0.0]), [_vec([1.0])], "average", device="tpu"), ValueError,
         "device: expected 'cpu', 'cuda'"),
    ],
)
def test_argument_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="device: 'cuda' was requested but no CUDA device is available"):
        merge_state_dicts(_vec([0.0]), [_vec([1.0])], "average", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_cuda_merge_equals_cpu(method):
    base, models = _tiny_states(3)
    options = {"weights": [0.5, 0.3, 0.2]} if method not in ("rsaf", "average") else {}
    cpu = merge_state_dicts(base, models, method, chunk_elems=40, dtype=None, **options)
    gpu = merge_state_dicts(base, models, method, chunk_elems=40, dtype=None, device="cuda", **options)
    for name, t in cpu.items():
        assert gpu[name].device.type == "cpu"
        torch.testing.assert_close(gpu[name], t, rtol=0, atol=0, msg=f"{method}: {name}")


# ------------------------------------------------------------------------------------------- streaming


def _write_checkpoint(directory, state, shard_names=None):
    """HF layout: one model.safetensors, or shards + index when ``shard_names`` maps tensor -> file."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "tiny"}')
    (directory / "pytorch_model.bin").write_bytes(b"stale weights that must not be copied")
    if shard_names is None:
        safetensors_torch.save_file(state, str(directory / "model.safetensors"))
        return
    for file in sorted(set(shard_names.values())):
        part = {k: v for k, v in state.items() if shard_names[k] == file}
        safetensors_torch.save_file(part, str(directory / file))
    index = {"metadata": {}, "weight_map": shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_checkpoint(directory):
    if not (directory / "model.safetensors.index.json").exists():
        return safetensors_torch.load_file(str(directory / "model.safetensors"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(safetensors_torch.load_file(str(directory / file)))
    assert set(state) == set(index["weight_map"])
    return state


def _tiny_states(num_models, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(33, 7, generator=g).bfloat16(),
        "layer.0.w": torch.randn(19, 5, generator=g),
        "layer.0.b": torch.randn(5, generator=g).half(),
        "layer.1.w": torch.randn(3, 2, 4, generator=g),
        "scale": torch.tensor(0.75),
        "position_ids": torch.arange(11).reshape(1, 11),
        "empty": torch.zeros(0, 3),
        "fp8.weight": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
        "fp64.weight": torch.randn(9, generator=g, dtype=torch.float64),
    }
    models = []
    for m in range(num_models):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=g) * (0.05 * (m + 1))
                sd[k] = (v.float() + noise).to(v.dtype)
            else:
                sd[k] = v.clone()
        models.append(sd)
    return base, models


SHARDS = {"embed.weight": "a.safetensors", "layer.0.w": "a.safetensors", "layer.0.b": "b.safetensors",
          "layer.1.w": "b.safetensors", "scale": "b.safetensors", "position_ids": "a.safetensors",
          "empty": "b.safetensors", "fp8.weight": "a.safetensors", "fp64.weight": "b.safetensors"}


def _write_set(tmp_path, base, models):
    _write_checkpoint(tmp_path / "base", base, SHARDS)
    dirs = []
    for i, sd in enumerate(models):
        dirs.append(tmp_path / f"m{i}")
        _write_checkpoint(dirs[-1], sd, SHARDS if i % 2 else None)
    return tmp_path / "base", dirs


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("num_models", [1, 3])
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, method, num_models):
    base, models = _tiny_states(num_models)
    base_dir, dirs = _write_set(tmp_path, base, models)
    options = {"weights": [0.7, -0.2, 0.5][:num_models]} if method not in ("rsaf", "average") else {}
    if method in ("ties", "dare_ties", "dare_linear"):
        options["density"] = 0.4
    expected = merge_state_dicts(base, models, method, seed=7, chunk_elems=40, **options)
    out = merge_safetensors(base_dir, dirs, tmp_path / "out", method, seed=7, chunk_elems=40, max_shard_size=300,
                            **options)
    merged = _load_checkpoint(out)
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert merged[name].dtype == t.dtype, f"{name}: dtype {merged[name].dtype} vs {t.dtype}"
        _assert_equal(merged[name], t, f"{method}: {name}")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).stat().st_size <= 300 + 1024 for f in files), "shard size"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}'
    assert not (out / "pytorch_model.bin").exists(), "weight files of the base must not be copied"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary dir left behind"


def test_cli_matches_api(tmp_path, capsys):
    base, models = _tiny_states(2, seed=1)
    base_dir, dirs = _write_set(tmp_path, base, models)
    argv = ["--base", str(base_dir), "--models", *map(str, dirs), "--out", str(tmp_path / "cli"),
            "--method", "ties", "--density", "0.3", "--no-progress", "--shard-size", "1KB"]
    assert cli_main(argv) == 0
    api = merge_safetensors(base_dir, dirs, tmp_path / "api", "ties", density=0.3, max_shard_size="1KB")
    cli_state, api_state = _load_checkpoint(tmp_path / "cli"), _load_checkpoint(api)
    for name in api_state:
        _assert_equal(cli_state[name], api_state[name], f"CLI vs API {name}")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main([a if a != str(tmp_path / "cli") else str(tmp_path / "x") for a in argv] + ["--drop-rate", "0.5"])
    assert "--drop-rate does not apply to --method ties" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and str(tmp_path / "cli") in err


def test_cli_deprecated_dare_warns_and_maps_to_dare_linear(tmp_path, capsys):
    base, models = _tiny_states(2, seed=3)
    base_dir, dirs = _write_set(tmp_path, base, models)
    old = ["--base", str(base_dir), "--models", *map(str, dirs), "--out", str(tmp_path / "old"), "--method", "dare",
           "--drop-rate", "0.6", "--no-progress"]
    assert cli_main(old) == 0
    assert "warning: merge method 'dare' is deprecated: use 'dare_linear' with density = 1 - drop_rate = 0.4" in (
        capsys.readouterr().err)
    new = merge_safetensors(base_dir, dirs, tmp_path / "new", "dare_linear", density=0.4, weights=[0.5, 0.5])
    old_state, new_state = _load_checkpoint(tmp_path / "old"), _load_checkpoint(new)
    for name in new_state:
        _assert_equal(old_state[name], new_state[name], f"deprecated dare vs dare_linear {name}")


def _corrupt(kind, tmp_path, base, models):
    """Apply one bad-input case to the written set; return (model dirs, expected error type, message regex)."""
    base_dir, dirs = _write_set(tmp_path, base, models)
    if kind == "names":
        sd = dict(models[0])
        sd["extra.weight"] = sd.pop("layer.0.b").float()
        _write_checkpoint(tmp_path / "bad", sd)
        return [tmp_path / "bad"] + dirs[1:], ValueError, r"tensor names differ .*missing \['layer.0.b'\].*extra"
    if kind == "shape":
        sd = dict(models[0], **{"layer.0.w": torch.zeros(5, 19)})
        _write_checkpoint(tmp_path / "bad", sd)
        return [tmp_path / "bad"] + dirs[1:], ValueError, r"'layer.0.w' has shape \[5, 19\], base has \[19, 5\]"
    if kind == "dtype":
        sd = dict(models[0], position_ids=models[0]["position_ids"].int())
        _write_checkpoint(tmp_path / "bad", sd)
        message = r"'position_ids' has dtype torch.int32, base has torch.int64; only floating tensors"
        return [tmp_path / "bad"] + dirs[1:], ValueError, message
    if kind == "missing_dir":
        return dirs + [tmp_path / "nope"], FileNotFoundError, r"directory .*nope.* does not exist"
    if kind == "missing_shard":
        (dirs[1] / "b.safetensors").unlink()
        return dirs, FileNotFoundError, r"shard .*b.safetensors.* listed in model.safetensors.index.json is missing"
    if kind == "no_weights":
        (tmp_path / "empty_dir").mkdir()
        return [tmp_path / "empty_dir"], FileNotFoundError, "holds neither model.safetensors nor"
    if kind == "buffer_differs":  # only found while merging, after the temporary directory exists
        sd = dict(models[1], position_ids=models[1]["position_ids"] + 1)
        _write_checkpoint(tmp_path / "bad", sd)
        return dirs[:1] + [tmp_path / "bad"] + dirs[2:], ValueError, r"'position_ids' has non-float dtype .* differs"
    if kind == "corrupt":
        (dirs[0] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
        return dirs, ValueError, r"model.safetensors.* is not a valid safetensors file"
    if kind == "truncated":
        path = dirs[1] / "a.safetensors"
        path.write_bytes(path.read_bytes()[:-8])
        return dirs, ValueError, r"a.safetensors.* is not a valid safetensors file: .*do not fit"
    if kind == "no_models":
        return [], ValueError, "at least one fine-tuned model"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["names", "shape", "dtype", "missing_dir", "missing_shard", "no_weights", "corrupt", "truncated",
     "buffer_differs", "no_models"],
)
def test_streaming_bad_inputs_leave_no_output(tmp_path, kind):
    base, models = _tiny_states(3, seed=2)
    dirs, error, message = _corrupt(kind, tmp_path, base, models)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        merge_safetensors(tmp_path / "base", dirs, out, "rsaf", chunk_elems=64)
    assert not out.exists(), "a failed merge must not leave an output directory"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary dir left behind"


def test_streaming_refuses_existing_output(tmp_path):
    base, models = _tiny_states(1)
    base_dir, dirs = _write_set(tmp_path, base, models)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_safetensors(base_dir, dirs, tmp_path / "out", "average")
