"""The fixed parts of the fusion experiment, built once per scale and cached: the data splits, three tokenizers,
two teachers trained on their own domains, and the teachers' outputs on the student's and the held-out texts.

- teacher ``math`` (byte-level BPE): many documents of ``arith`` and ``count``;
- teacher ``lore`` (WordPiece): many documents of ``grammar`` and ``lore``;
- the student (Unigram) learns from a few documents of every domain; all are evaluated on held-out documents of
  every domain. Each teacher is larger and trained longer than the student, on data the student never sees.
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import torch

from infigw.train import FusionCollator, TeacherOutput, shifted_targets
from infigw.train.metrics import bits_per_character
from infigw.train.toy import tiny_llama, train_tokenizer

from . import corpus

CACHE_VERSION = 1  # bump when anything below changes what is cached


@dataclass(frozen=True)
class Scale:
    """Sizes of one experiment scale (the quick one runs in a few minutes on 2 cores)."""
    teacher_docs: int  # per teacher domain
    teacher_steps: int
    teacher_hidden: int
    teacher_layers: int
    student_docs: int  # per domain
    student_steps: int
    student_hidden: int
    student_layers: int
    eval_docs: int  # per domain
    batch: int = 16
    tokenizer_docs: int = 400  # per domain
    max_length: int = 96


QUICK = Scale(teacher_docs=1000, teacher_steps=300, teacher_hidden=64, teacher_layers=2, student_docs=12,
              student_steps=60, student_hidden=32, student_layers=2, eval_docs=30)
FULL = Scale(teacher_docs=3000, teacher_steps=600, teacher_hidden=96, teacher_layers=2, student_docs=16,
             student_steps=120, student_hidden=48, student_layers=2, eval_docs=60)

TEACHERS = {"math": ("bpe", 512, ("arith", "count")), "lore": ("wordpiece", 384, ("grammar", "lore"))}
STUDENT_TOKENIZER = ("unigram", 256)


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    tokenizer: object
    train_outputs: List[tuple]  # per student training document: (logits (T'-1, V) fp16, targets (T'-1,),
    eval_outputs: List[tuple]  # per held-out document             target spans (T'-1, 2))


@dataclass
class Assets:
    scale: Scale
    student_tokenizer: object
    train_texts: List[str]
    eval_texts: Dict[str, List[str]]
    teachers: List[Teacher]
    teacher_bpc: Dict[str, Dict[str, float]]  # teacher -> domain -> held-out bits per character


def _key(scale: Scale) -> str:
    text = json.dumps({"scale": asdict(scale), "teachers": TEACHERS, "student": STUDENT_TOKENIZER,
                       "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def splits(scale: Scale):
    """(tokenizer texts, student training texts, held-out texts per domain, teacher texts per teacher)."""
    tokenizer_texts = corpus.mixture({d: scale.tokenizer_docs for d in corpus.DOMAINS}, seed=100)
    train = corpus.mixture({d: scale.student_docs for d in corpus.DOMAINS}, seed=200)
    held_out = {d: corpus.generate(d, scale.eval_docs, seed=300) for d in corpus.DOMAINS}
    teacher_texts = {name: corpus.mixture({d: scale.teacher_docs for d in domains}, seed=400 + i)
                     for i, (name, (_, _, domains)) in enumerate(TEACHERS.items())}
    return tokenizer_texts, train, held_out, teacher_texts


def batches(texts: List[str], tokenizer, size: int, max_length: int):
    collator = FusionCollator(tokenizer, max_length=max_length)
    for start in range(0, len(texts), size):
        yield collator([{"text": t} for t in texts[start:start + size]])


def train_lm(model, tokenizer, texts: List[str], steps: int, batch: int, max_length: int, seed: int,
             lr: float = 3e-3, progress=None):
    """Plain next-token training (AdamW, cosine schedule) on shuffled ``texts``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    collator = FusionCollator(tokenizer, max_length=max_length)
    order = torch.randperm(len(texts), generator=generator).tolist()
    model.train()
    for step in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(texts), generator=generator).tolist()
        chosen, order = order[:batch], order[batch:]
        inputs = collator([{"text": texts[i]} for i in chosen])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted_targets(inputs["labels"]).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


@torch.no_grad()
def outputs_per_document(model, tokenizer, texts: List[str], max_length: int, batch: int = 32):
    """Per text: (logits (T-1, V) fp16, targets (T-1,)) of the model on its own tokens."""
    result = []
    for inputs in batches(texts, tokenizer, batch, max_length):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        targets = shifted_targets(inputs["labels"])
        for row in range(logits.shape[0]):
            length = int(inputs["attention_mask"][row].sum()) - 1
            result.append((logits[row, :length].half().clone(), targets[row, :length].clone()))
    return result


def build(scale: Scale, cache_root: Path, progress_factory=None) -> Assets:
    """Build (or load from ``cache_root``) the tokenizers, the trained teachers and their cached outputs."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer_texts, train, held_out, teacher_texts = splits(scale)
    eval_flat = [t for d in corpus.DOMAINS for t in held_out[d]]
    cache = cache_root / f"fusion-{_key(scale)}"
    student_dir = cache / "student_tokenizer"
    if not (student_dir / "tokenizer.json").exists():
        kind, size = STUDENT_TOKENIZER
        train_tokenizer(kind, tokenizer_texts, size).save_pretrained(student_dir)
    student_tokenizer = PreTrainedTokenizerFast.from_pretrained(student_dir)
    teachers, teacher_bpc = [], {}
    for index, (name, (kind, size, _)) in enumerate(TEACHERS.items()):
        folder = cache / f"teacher_{name}"
        outputs_file = folder / "outputs.pt"
        if not outputs_file.exists():
            tokenizer = train_tokenizer(kind, tokenizer_texts, size)
            model = tiny_llama(len(tokenizer), hidden=scale.teacher_hidden, layers=scale.teacher_layers,
                               heads=4, seed=10 + index)
            bar = progress_factory(total=scale.teacher_steps, desc=f"teacher {name}") if progress_factory else None
            train_lm(model, tokenizer, teacher_texts[name], scale.teacher_steps, 32, scale.max_length, seed=index,
                     progress=bar)
            if bar is not None:
                bar.close()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            torch.save({"train": outputs_per_document(model, tokenizer, train, scale.max_length),
                        "eval": outputs_per_document(model, tokenizer, eval_flat, scale.max_length),
                        "bpc": {d: bits_per_character(model, tokenizer, held_out[d], scale.max_length)
                                for d in corpus.DOMAINS}}, str(outputs_file) + ".tmp")
            Path(str(outputs_file) + ".tmp").replace(outputs_file)  # a killed run leaves no half-written cache
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        cached = torch.load(outputs_file)
        with_spans = [[(*output, spans) for output, spans in zip(cached[part], target_spans(tokenizer, texts,
                                                                                               scale.max_length))]
                      for part, texts in (("train", train), ("eval", eval_flat))]
        teachers.append(Teacher(name, model, tokenizer, *with_spans))
        teacher_bpc[name] = cached["bpc"]
    return Assets(scale, student_tokenizer, train, held_out, teachers, teacher_bpc)


def target_spans(tokenizer, texts: List[str], max_length: int) -> List[torch.Tensor]:
    """Per text, the character spans (T-1, 2) of the tokens its positions predict (what pairing by offsets reads;
    a function of the tokenizer only, so it is not cached)."""
    spans = []
    for inputs in batches(texts, tokenizer, 64, max_length):
        for row in range(inputs["input_ids"].shape[0]):
            length = int(inputs["attention_mask"][row].sum())
            spans.append(inputs["offsets"][row, 1:length].clone())
    return spans


def pad_outputs(outputs: List[tuple], indices: List[int]) -> TeacherOutput:
    """Stack cached (logits, targets, spans) of the chosen documents, right-padded (targets -100, spans -1)."""
    chosen = [outputs[i] for i in indices]
    width = max(logits.shape[0] for logits, _, _ in chosen)
    vocab = chosen[0][0].shape[-1]
    logits = torch.zeros(len(chosen), width, vocab)
    targets = torch.full((len(chosen), width), -100, dtype=torch.long)
    spans = torch.full((len(chosen), width, 2), -1, dtype=torch.long)
    for row, (x, y, z) in enumerate(chosen):
        logits[row, :x.shape[0]] = x.float()
        targets[row, :y.shape[0]] = y
        spans[row, :z.shape[0]] = z
    return TeacherOutput(logits, targets, spans)
