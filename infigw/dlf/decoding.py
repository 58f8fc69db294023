"""DLF decoding with Hugging Face ``transformers`` causal LMs that share one tokenizer (``pip install infigw[hf]``).

* :class:`DLFLogitsProcessor` — a logits processor: give it to ``large_model.generate(logits_processor=[...])``;
  it runs the small base and the experts incrementally (own KV caches) on the same ids and replaces the large
  model's scores by the DLF-fused logits. All HF samplers/stopping criteria then apply.
* :func:`dlf_generate` — a self-contained batched loop (large base + small base + experts, KV caches, greedy or
  temperature sampling, stop at EOS) that also returns the chosen α per step.

Left-padded batches: pass the prompt ``attention_mask``; position ids follow HF's convention
(``cumsum(mask) − 1``, pad positions set to 1), so greedy output matches ``generate`` of the large model when
α = 0 (``grid=(0.0,)``).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from .common import DEFAULT_GRID
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


class _IncrementalLM:
    """One causal LM fed a growing id sequence: only the ids it has not seen yet when caching."""

    def __init__(self, model, use_cache: bool):
        self.model = model
        self.use_cache = use_cache
        self.cache = None
        self.seen = 0

    @torch.no_grad()
    def last_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = self.seen if self.use_cache else 0
        if ids.shape[1] <= start:
            raise ValueError(
                f"input_ids has {ids.shape[1]} tokens but {self.seen} were already processed; call reset() "
                "before decoding a new batch"
            )
        out = self.model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=_position_ids(mask)[:, start:],
            past_key_values=self.cache,
            use_cache=self.use_cache,
        )
        if self.use_cache:
            self.cache = out.past_key_values
            self.seen = ids.shape[1]
        return out.logits[:, -1, :]


def _full_mask(prompt_mask: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Prompt mask extended by ones for every generated token (as HF generate does)."""
    if prompt_mask is None:
        return torch.ones_like(ids)
    if prompt_mask.shape[0] != ids.shape[0] or prompt_mask.shape[1] > ids.shape[1]:
        raise ValueError(
            f"attention_mask of shape {tuple(prompt_mask.shape)} does not fit input_ids of shape {tuple(ids.shape)}"
        )
    extra = ids.shape[1] - prompt_mask.shape[1]
    return torch.cat([prompt_mask.to(ids.device), prompt_mask.new_ones(ids.shape[0], extra)], dim=1)


class DLFLogitsProcessor:
    """Replace a large model's next-token scores by DLF-fused logits (callable ``(input_ids, scores)``).

    small_base, experts: HF causal LMs with the large model's vocabulary layout. attention_mask: the prompt
    mask (left padding) of the batch about to be decoded; ``reset(mask)`` before reusing the object for another
    batch. ``alphas`` / ``active_experts`` collect the chosen (B, T) coefficients / (B,) experts per step.
    Greedy decoding and sampling only: beam search reorders rows, and the small models' caches are not reordered.
    """

    def __init__(
        self,
        small_base,
        experts: Sequence,
        attention_mask: Optional[torch.Tensor] = None,
        grid: Sequence[float] = DEFAULT_GRID,
        mode: str = "single",
        backend: str = "auto",
        use_cache: bool = True,
    ):
        _require_transformers()
        experts = list(experts)
        if not experts:
            raise ValueError("experts is empty: DLF needs at least one fine-tuned small expert")
        self.small_base = small_base
        self.experts = experts
        self.grid, self.mode, self.backend, self.use_cache = grid, mode, backend, use_cache
        self.reset(attention_mask)

    def reset(self, attention_mask: Optional[torch.Tensor] = None) -> None:
        self.prompt_mask = attention_mask
        self._models = [_IncrementalLM(m, self.use_cache) for m in [self.small_base, *self.experts]]
        self.alphas: List[torch.Tensor] = []
        self.active_experts: List[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = _full_mask(self.prompt_mask, input_ids)
        small, *experts = [m.last_logits(input_ids, mask) for m in self._models]
        result = dlf_search(scores, small, experts, grid=self.grid, mode=self.mode, backend=self.backend)
        self.alphas.append(result.alpha)
        if result.expert is not None:
            self.active_experts.append(result.expert)
        return result.logits


class DLFGeneration(NamedTuple):
    """sequences (B, prompt + new); alphas (B, new, T); experts (B, new) active expert ("single" mode) or None."""

    sequences: torch.Tensor
    alphas: torch.Tensor
    experts: Optional[torch.Tensor]


def dlf_generate(
    large_model,
    small_base,
    experts: Sequence,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    backend: str = "auto",
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
) -> DLFGeneration:
    """Decode a batch with DLF: greedy (``do_sample=False``) or sampling from ``softmax(fused / temperature)``.

    Sequences that emitted an EOS id are padded with ``pad_token_id`` (required with ``eos_token_id``); the loop
    stops when all have finished or after ``max_new_tokens``. ``use_cache=False`` recomputes every prefix.
    """
    _require_transformers()
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) int64 tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    eos = None
    if eos_token_id is not None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is required with eos_token_id (it fills finished sequences)")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)

    large = _IncrementalLM(large_model, use_cache)
    processor = DLFLogitsProcessor(small_base, experts, attention_mask, grid, mode, backend, use_cache)
    ids = input_ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        fused = processor(ids, large.last_logits(ids, _full_mask(attention_mask, ids)))
        if do_sample:
            probs = (fused / temperature).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
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
