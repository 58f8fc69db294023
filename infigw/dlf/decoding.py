"""DLF decoding with Hugging Face ``transformers`` causal LMs (``pip install infigw[hf]``); usage in docs/dlf.md.

* :class:`DLFLogitsProcessor`: give it to ``large_model.generate(logits_processor=[...])``. It runs the small base
  and the experts incrementally (their own KV caches) on the ids ``generate`` passes it, and replaces the large
  model's scores by the log-probabilities of the DLF-fused distribution. Greedy search, sampling (with every HF
  warper), ``num_return_sequences`` and beam search work.
* :func:`dlf_generate`: a self-contained batched loop (greedy or temperature sampling, stop at EOS) that also
  returns the chosen α per step.

How the processor follows ``generate``, which only passes it ``(input_ids, scores)``:
* Rows. ``num_return_sequences`` and ``num_beams`` repeat every prompt row (``repeat_interleave``): the prompt mask
  is expanded the same way at the first call, and the small models' caches are built on the expanded rows. Beam
  search reorders rows between steps: each row's prefix is matched to the row it extends, and the small models'
  caches and masks are reordered alike (ours: ``generate`` does not give a logits processor the beam indices; rows
  with equal prefixes have equal states, so any match is exact).
* Attention mask: required, the one given to ``generate``. The processor cannot see the mask ``generate`` builds,
  and a mask guessed from pad ids changes the output silently when the guess is wrong.
* Vocabulary. Models sharing a tokenizer often pad their output layers differently (Qwen2.5-7B has 152064 logits,
  Qwen2.5-0.5B 151936, their tokenizer 151665 tokens). With ``tokenizer=`` (a list of tokenizers is checked to be
  one vocabulary) or ``vocab_size=``, every model's logits are cut to that size before fusing, and the columns
  beyond it get -inf (ours: they are no tokens). Without either, the widths must be equal.
* Output: log-probabilities (the fused logits minus their logsumexp), which is what beam search adds to its beam
  scores; greedy search and the sampling warpers (temperature, top-k, top-p) are shift-invariant.
* Logits processors that ``generate`` runs before this one may mask tokens with -inf (``min_new_tokens``,
  ``bad_words_ids``): they stay masked. Assisted (speculative) generation is refused: it calls processors on
  shorter prefixes than the ones already seen.

Positions follow HF's convention for left padding (``cumsum(mask) − 1``, pad positions set to 1), so greedy
output matches ``generate`` of the large model when α = 0 (``grid=(0.0,)``).
"""
from __future__ import annotations

import inspect
import math
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from ..checks import check_count, check_temperature
from .common import DEFAULT_GRID, candidate_alphas
from .search import dlf_search


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "infigw.dlf decoding helpers need Hugging Face transformers; install the extra: pip install infigw[hf]"
        ) from exc
    return transformers


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """HF's positions for left padding: cumsum(mask) − 1, pad positions set to 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _describe(x) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _full_mask(prompt_mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The prompt mask extended by ones for every generated token (as ``generate`` does)."""
    generated = ids.shape[1] - prompt_mask.shape[1]
    return torch.cat([prompt_mask, prompt_mask.new_ones(ids.shape[0], generated)], dim=1)


MASK_REQUIRED = (
    "attention_mask is required: pass the mask given to generate (the tokenizer's attention_mask; "
    "torch.ones_like(input_ids) when no prompt is padded)"
)


def _prompt_mask(mask, ids: torch.Tensor) -> torch.Tensor:
    """``mask`` checked against the prompt ``ids`` and repeated like ``generate`` repeats the prompts
    (``num_return_sequences`` × ``num_beams`` rows each); int64 on the ids' device."""
    if mask is None:
        raise ValueError(MASK_REQUIRED)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be a (batch, length) bool or integer tensor, got {_describe(mask)}")
    rows, length = ids.shape
    if mask.shape[1] != length or mask.shape[0] == 0 or rows % mask.shape[0]:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not fit the prompt input_ids of shape {(rows, length)} "
            "(generate repeats each prompt row num_return_sequences × num_beams times)"
        )
    mask = mask.to(device=ids.device, dtype=torch.long)
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask must hold 0/1 with at least one 1 per row")
    return mask.repeat_interleave(rows // mask.shape[0], dim=0)


def _shared_vocab_size(tokenizer, vocab_size: Optional[int]) -> Optional[int]:
    """The number of token ids the models share: from ``vocab_size`` or the tokenizer(s), checked to agree."""
    if vocab_size is not None:
        check_count(vocab_size, "vocab_size")
    if tokenizer is None:
        return vocab_size
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    if not tokenizers or not all(hasattr(t, "get_vocab") for t in tokenizers):
        raise TypeError("tokenizer must be a Hugging Face tokenizer or a non-empty list of them (one per model)")
    vocab = tokenizers[0].get_vocab()
    for i, other in enumerate(tokenizers[1:], 1):
        other_vocab = other.get_vocab()
        if other_vocab != vocab:
            differ = len(vocab.items() ^ other_vocab.items())
            raise ValueError(
                f"tokenizer[{i}] differs from tokenizer[0] ({differ} (token, id) pairs are not shared): DLF fuses "
                "logits id by id and needs models that share one tokenizer"
            )
    size = max(vocab.values()) + 1
    if vocab_size is not None and vocab_size != size:
        raise ValueError(f"vocab_size={vocab_size} but the tokenizer has ids 0..{size - 1}")
    return size


class _IncrementalLM:
    """One causal LM fed a growing id sequence: only the ids it has not seen yet when caching."""

    def __init__(self, model, use_cache: bool):
        self.model = model
        self.use_cache = use_cache
        arguments = inspect.signature(model.forward).parameters
        # transformers 5.x names the cache argument and output field `cache`; older releases `past_key_values`
        self.cache_name = "cache" if "cache" in arguments else "past_key_values"
        # only the last position's logits are used: where the model can, compute only those (a prompt's are
        # length × vocabulary floats per row); the argument's name changed in transformers 4.50
        self.last_only = {name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in arguments}
        self.cache = None
        self.seen = 0

    @torch.no_grad()
    def last_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = self.seen if self.use_cache else 0
        out = self.model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=_position_ids(mask)[:, start:],
            use_cache=self.use_cache,
            **{self.cache_name: self.cache},
            **self.last_only,
        )
        if self.use_cache:
            self.cache = getattr(out, self.cache_name)
            self.seen = ids.shape[1]
        return out.logits[:, -1, :]

    def select_rows(self, source: torch.Tensor) -> None:
        """Row r continues row ``source[r]`` (beam search reordered the rows)."""
        if self.cache is None:
            return
        if not hasattr(self.cache, "reorder_cache"):  # a legacy tuple cache, whose layout varies by model
            raise TypeError(
                f"{type(self.model).__name__} returned a {type(self.cache).__name__} cache, which DLF cannot reorder "
                "for beam search: use a model that returns a transformers Cache, or use_cache=False"
            )
        self.cache.reorder_cache(source)


class DLFLogitsProcessor:
    """Replace a large model's next-token scores by DLF-fused log-probabilities (callable ``(input_ids, scores)``).

    small_base, experts: HF causal LMs sharing the large model's tokenizer. attention_mask: the prompt mask given to
    ``generate``. tokenizer: the shared tokenizer, or a list of every model's tokenizer (checked equal), or
    vocab_size: the number of shared token ids; either is needed when the models' logit widths differ (padded
    vocabularies). grid, mode, backend: as :func:`infigw.dlf.dlf_search`. use_cache=False recomputes every prefix.
    ``reset(mask)`` before reusing the object for another batch. ``alphas`` / ``active_experts`` collect the
    chosen (rows, T) coefficients / (rows,) experts per step, in the row order of that step.
    """

    def __init__(
        self,
        small_base,
        experts: Sequence,
        attention_mask: torch.Tensor,
        *,
        tokenizer=None,
        vocab_size: Optional[int] = None,
        grid: Sequence[float] = DEFAULT_GRID,
        mode: str = "single",
        backend: str = "auto",
        use_cache: bool = True,
    ):
        _require_transformers()
        experts = list(experts)
        if not experts:
            raise ValueError("experts is empty: DLF needs at least one fine-tuned small expert")
        candidate_alphas(len(experts), grid, mode)  # bad grid or mode: fail here, not at the first step
        self.small_base = small_base
        self.experts = experts
        self.vocab_size = _shared_vocab_size(tokenizer, vocab_size)
        self.grid, self.mode, self.backend, self.use_cache = grid, mode, backend, use_cache
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor) -> None:
        """Forget the decoded batch; ``attention_mask`` is the next prompt's mask."""
        if attention_mask is None:
            raise ValueError(MASK_REQUIRED)
        self.prompt_mask = attention_mask
        self._mask: Optional[torch.Tensor] = None  # prompt mask of the current rows (expanded, reordered)
        self._ids: Optional[torch.Tensor] = None  # the ids the small models have seen
        self._models = [_IncrementalLM(m, self.use_cache) for m in [self.small_base, *self.experts]]
        self.alphas: List[torch.Tensor] = []
        self.active_experts: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._follow(input_ids)
        mask = _full_mask(self._mask, input_ids)
        small, *experts = [m.last_logits(input_ids, mask) for m in self._models]
        return self.fuse(scores, small, experts)

    def _follow(self, ids: torch.Tensor) -> None:
        """Bring the small models' rows to those of ``ids``: expand the prompt mask at the first call, later
        match every row's prefix to the row it extends (beam search reorders rows) and reorder the caches."""
        if self._ids is None:
            self._mask = _prompt_mask(self.prompt_mask, ids)
        else:
            rows, seen = self._ids.shape
            if ids.shape[0] != rows or ids.shape[1] <= seen:
                raise ValueError(
                    f"input_ids of shape {tuple(ids.shape)} do not extend the {rows} rows × {seen} ids seen so far: "
                    "call reset(attention_mask) before another batch (assisted generation is not supported)"
                )
            prefix = ids[:, :seen]
            if not torch.equal(prefix, self._ids):
                same = (prefix.unsqueeze(1) == self._ids.unsqueeze(0)).all(-1)  # (row, previous row)
                if not bool(same.any(1).all()):
                    raise ValueError(
                        "input_ids do not extend the sequences seen so far: call reset(attention_mask) before "
                        "another batch"
                    )
                source = same.int().argmax(1)
                self._mask = self._mask.index_select(0, source)
                for model in self._models:
                    model.select_rows(source)
        self._ids = ids

    def fuse(self, scores: torch.Tensor, small: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        """DLF log-probabilities (rows, scores' width) from one step's logits of every model."""
        width = scores.shape[-1]
        size = self.vocab_size or width
        named = [("the large model's scores", scores), ("small_base", small)]
        named += [(f"experts[{i}]", e) for i, e in enumerate(experts)]
        for name, logits in named:
            if self.vocab_size is None and logits.shape[-1] != width:
                raise ValueError(
                    f"vocabulary widths differ: the large model's scores have {width} columns, {name} "
                    f"{logits.shape[-1]}; models that pad their vocabularies differently (Qwen2.5-7B 152064 vs "
                    "Qwen2.5-0.5B 151936) need tokenizer= (the shared tokenizer) or vocab_size="
                )
            if logits.shape[-1] < size:
                raise ValueError(f"{name} has {logits.shape[-1]} logits per token, fewer than the {size} shared ids")
        result = dlf_search(
            scores[:, :size], small[:, :size], [e[:, :size] for e in experts],
            grid=self.grid, mode=self.mode, backend=self.backend,
        )
        self.alphas.append(result.alpha)
        if result.expert is not None:
            self.active_experts.append(result.expert)
        return torch.nn.functional.pad(result.logits.log_softmax(-1), (0, width - size), value=-math.inf)


class DLFGeneration(NamedTuple):
    """sequences (rows, prompt + new); alphas (rows, new, T); experts (rows, new) active expert ("single" mode) or
    None. rows = batch × num_return_sequences."""

    sequences: torch.Tensor
    alphas: torch.Tensor
    experts: Optional[torch.Tensor]


def dlf_generate(
    large_model,
    small_base,
    experts: Sequence,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    tokenizer=None,
    vocab_size: Optional[int] = None,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    backend: str = "auto",
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
) -> DLFGeneration:
    """Decode a batch with DLF: greedy (``do_sample=False``) or sampling from ``softmax(fused / temperature)``.

    attention_mask: the prompts' mask; when omitted it is derived only where that is exact (``pad_token_id`` given
    and absent from every prompt: all ones), else it is an error. ``num_return_sequences`` samples per prompt
    (sampling only), in ``generate``'s row order. Sequences that emitted an EOS id are padded with ``pad_token_id``
    (required with ``eos_token_id``); the loop stops when all have finished or after ``max_new_tokens``.
    tokenizer, vocab_size, grid, mode, backend, use_cache: as :class:`DLFLogitsProcessor`.
    """
    _require_transformers()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) int64 tensor, got {_describe(input_ids)}")
    check_count(max_new_tokens, "max_new_tokens")
    check_count(num_return_sequences, "num_return_sequences")
    if do_sample:
        check_temperature(temperature)
    elif num_return_sequences > 1:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy search returns one sequence)")
    eos = None
    if eos_token_id is not None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required with eos_token_id (it fills finished sequences)")
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(eos_ids, device=input_ids.device)
    if attention_mask is None and pad_token_id is not None and not bool((input_ids == pad_token_id).any()):
        attention_mask = torch.ones_like(input_ids)
    mask = _prompt_mask(attention_mask, input_ids).repeat_interleave(num_return_sequences, dim=0)
    ids = input_ids.repeat_interleave(num_return_sequences, dim=0)

    large = _IncrementalLM(large_model, use_cache)
    processor = DLFLogitsProcessor(
        small_base, experts, mask, tokenizer=tokenizer, vocab_size=vocab_size, grid=grid, mode=mode,
        backend=backend, use_cache=use_cache,
    )
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        fused = processor(ids, large.last_logits(ids, _full_mask(mask, ids)))
        if do_sample:
            token = torch.multinomial((fused / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = fused.argmax(-1)
        if eos is not None:
            token = token.masked_fill(finished, pad_token_id)
            finished |= torch.isin(token, eos)
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
        if eos is not None and bool(finished.all()):
            break
    alphas = torch.stack(processor.alphas, dim=1)
    chosen = torch.stack(processor.active_experts, dim=1) if processor.active_experts else None
    return DLFGeneration(ids, alphas, chosen)
