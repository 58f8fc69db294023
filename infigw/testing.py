"""Synthetic LLM-like logits for tests, benchmarks and examples.

Real next-token logits are not Gaussian noise: token base rates follow a Zipf law, each position has a few
dominant candidates well above the bulk, consecutive positions are correlated, and the bulk has heavy tails.
:func:`llm_like_logits` reproduces these four traits; :func:`logit_pair` builds (student, teacher) pairs with
a controlled degree of structural similarity, from identical to independent.

Everything is drawn on the CPU from one ``torch.Generator`` and then cast and moved, so a seed gives the same
logits on every device and for every dtype (up to the final rounding).
"""
import math
import re
from typing import Optional, Tuple, Union

import torch

from .checks import check_count

__all__ = ["SIMILARITY_LEVELS", "llm_like_logits", "logit_pair", "parse_similarity"]

#: The similarity levels used by the benchmarks, from most to least similar.
SIMILARITY_LEVELS = (
    "identical",
    "relabelled",
    "perturbed-0.1",
    "perturbed-0.3",
    "perturbed-0.6",
    "independent",
)

_PERTURBED = re.compile(r"perturbed-(\d+(?:\.\d*)?|\.\d+)")


def _make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int when no generator is given, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _heavy_tailed(shape, tail: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance Gaussian scale mixture with log-normal scales (``tail = 0`` is Gaussian)."""
    scale = torch.exp(tail * torch.randn(shape, generator=gen) - tail * tail)
    return torch.randn(shape, generator=gen) * scale


def llm_like_logits(
    batch: int,
    seq_len: int,
    vocab: int,
    *,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    zipf_exponent: float = 1.0,
    num_dominant: int = 3,
    dominant_gap: float = 6.0,
    correlation: float = 0.8,
    persistence: float = 0.5,
    noise_scale: float = 1.5,
    tail: float = 0.5,
) -> torch.Tensor:
    """Logits of shape ``(batch, seq_len, vocab)`` with the statistics of a language model's outputs.

    Per position ``t`` of sequence ``b`` and token ``v``::

        logit[b, t, v] = base[v] + noise_scale * h[b, t, v]          (then the dominant tokens are raised)
        base[v]        = -zipf_exponent * log(rank[v]),  centred      (Zipf base rates, random rank order)
        h[b, t]        = correlation * h[b, t-1] + sqrt(1 - correlation^2) * e[b, t]
                                                                       (AR(1) over positions, unit variance)
        e              = z * exp(tail * z' - tail^2)                  (heavy-tailed: log-normal scale mixture)

    Then ``num_dominant`` tokens per position, drawn from the Zipf distribution, are set to
    ``max_v logit[b, t, v] + dominant_gap * (num_dominant - j) / num_dominant * (1 + |z|/4)`` for the j-th
    one (j = 0 highest). Each dominant token is kept from the previous position with probability
    ``persistence`` (a Markov chain of topics), otherwise redrawn. Tokens are ranked by a random permutation,
    so token ids carry no frequency information.

    Args:
        batch, seq_len, vocab: output shape, positive ints.
        seed: seed of the private CPU generator (ignored when ``generator`` is given).
        generator: a CPU ``torch.Generator`` to draw from (advanced by the call).
        dtype: floating dtype of the result (float32, float16, bfloat16 or float64).
        device: device of the result; the draw itself always happens on the CPU.
        zipf_exponent: slope of the log base rates against log rank (>= 0).
        num_dominant: dominant tokens per position (>= 0; 0 disables them).
        dominant_gap: logit margin of the first dominant token over the rest of the row (>= 0).
        correlation: AR(1) coefficient of the noise between consecutive positions, in [0, 1).
        persistence: probability that a dominant token carries over to the next position, in [0, 1].
        noise_scale: standard deviation of the per-position noise (>= 0).
        tail: log-normal scale-mixture parameter of the noise (0 = Gaussian, larger = heavier tails; >= 0).

    Returns:
        Tensor ``(batch, seq_len, vocab)`` of ``dtype`` on ``device``; deterministic given the seed.
    """
    batch, seq_len, vocab = (check_count(v, n) for n, v in
                             (("batch", batch), ("seq_len", seq_len), ("vocab", vocab)))
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(num_dominant, bool) or not isinstance(num_dominant, int) or num_dominant < 0:
        raise ValueError(f"num_dominant must be an int >= 0, got {num_dominant!r}")
    if not 0.0 <= correlation < 1.0:
        raise ValueError(f"correlation must be in [0, 1), got {correlation!r}")
    if not 0.0 <= persistence <= 1.0:
        raise ValueError(f"persistence must be in [0, 1], got {persistence!r}")
    for name, value in (("zipf_exponent", zipf_exponent), ("dominant_gap", dominant_gap),
                        ("noise_scale", noise_scale), ("tail", tail)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    gen = _make_generator(seed, generator)

    ranks = torch.randperm(vocab, generator=gen) + 1
    base = -zipf_exponent * torch.log(ranks.to(torch.float64))
    base = (base - base.mean()).to(torch.float32)

    innovations = _heavy_tailed((batch, seq_len, vocab), tail, gen)
    noise = torch.empty_like(innovations)
    noise[:, 0] = innovations[:, 0]
    innovation_weight = math.sqrt(1.0 - correlation * correlation)
    for t in range(1, seq_len):
        noise[:, t] = correlation * noise[:, t - 1] + innovation_weight * innovations[:, t]
    logits = base + noise_scale * noise

    if num_dominant > 0:
        zipf = torch.softmax(base, dim=0)
        fresh_tokens = torch.multinomial(zipf, batch * seq_len * num_dominant, replacement=True,
                                         generator=gen).view(batch, seq_len, num_dominant)
        fresh = torch.rand(batch, seq_len, num_dominant, generator=gen) >= persistence
        fresh[:, 0] = True
        # Carry each slot's token forward from its last redraw (a Markov chain, vectorised with cummax).
        positions = torch.arange(seq_len).view(1, seq_len, 1)
        last_draw = torch.where(fresh, positions, torch.zeros_like(positions)).cummax(dim=1).values
        tokens = fresh_tokens.gather(1, last_draw)
        steps = torch.arange(num_dominant, 0, -1, dtype=torch.float32) / num_dominant
        jitter = 1.0 + torch.randn(batch, seq_len, num_dominant, generator=gen).abs() / 4
        raised = logits.amax(dim=-1, keepdim=True) + dominant_gap * steps * jitter
        # amax: a token drawn twice at one position keeps its highest value, deterministically.
        logits = logits.scatter_reduce(-1, tokens, raised, reduce="amax")

    return logits.to(device=device, dtype=dtype)


def parse_similarity(similarity: str) -> Tuple[str, float]:
    """Split a similarity level into (kind, eps): "perturbed-0.3" -> ("perturbed", 0.3), eps in [0, 1]."""
    if similarity in ("identical", "relabelled", "independent"):
        return similarity, {"identical": 0.0, "relabelled": 0.0, "independent": 1.0}[similarity]
    match = _PERTURBED.fullmatch(similarity) if isinstance(similarity, str) else None
    if match is None or not 0.0 <= float(match.group(1)) <= 1.0:
        raise ValueError("similarity must be 'identical', 'relabelled', 'perturbed-<eps>' with eps in [0, 1] "
                         f"or 'independent', got {similarity!r}")
    return "perturbed", float(match.group(1))


def logit_pair(
    batch: int,
    seq_len: int,
    vocab: int,
    *,
    similarity: str,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    **logit_options,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (student, teacher) pair of LLM-like logits, both ``(batch, seq_len, vocab)``, at a similarity level.

    The teacher is ``llm_like_logits(...)``; ``other`` is an independent draw with the same options. Levels:

    - ``"identical"``: student = teacher.
    - ``"relabelled"``: student = teacher with its vocabulary permuted (one random permutation, shared by
      all positions). Any graph distance over vocabulary nodes that ignores node identity (GW, GLD with
      ``nodes="vocab"``) is exactly invariant to it, as long as no two logits tie at the top-k boundary.
    - ``"perturbed-<eps>"``, eps in [0, 1]: student = cos(θ)·teacher + sin(θ)·other with θ = eps·π/2,
      a variance-preserving interpolation from the teacher (eps = 0) to an independent draw (eps = 1).
    - ``"independent"``: student = other.

    ``logit_options`` are passed to :func:`llm_like_logits` (both draws). Deterministic given the seed;
    the teacher depends only on the seed and options, not on the similarity level.
    """
    kind, eps = parse_similarity(similarity)
    gen = _make_generator(seed, generator)
    options = dict(logit_options, dtype=torch.float32, device="cpu")
    teacher = llm_like_logits(batch, seq_len, vocab, generator=gen, **options)
    if kind == "identical":
        student = teacher.clone()
    elif kind == "relabelled":
        student = teacher[..., torch.randperm(vocab, generator=gen)]
    else:
        other = llm_like_logits(batch, seq_len, vocab, generator=gen, **options)
        theta = eps * math.pi / 2
        student = other if kind == "independent" else math.cos(theta) * teacher + math.sin(theta) * other
    return (student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype))
