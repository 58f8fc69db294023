"""infigw.train: the collator, the step objective's normalisation, packed rows and the Trainer integration, with
tiny real tokenizers (trained here with the ``tokenizers`` library) and tiny Llama models built from configs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from infigw import InfiGFusionLoss  # noqa: E402
from infigw.train import (FusionCollator, FusionObjective, FusionTrainer, OnlineTeacher, count_targets,  # noqa: E402
                          shifted_targets)
from infigw.train.toy import tiny_llama, train_tokenizer  # noqa: E402

from .helpers import assert_close  # noqa: E402

# The Trainer-level runs do not depend on the backend: tests/run.sh's second stage (extension disabled) skips them.
once = pytest.mark.skipif(os.environ.get("INFIGW_DISABLE_EXTENSION") == "1",
                          reason="backend-independent Trainer run: checked in the stage with the extension")

TEXTS = [
    "the cat sees a dog . 3 + 4 = 7.",
    "a blick is green and lives in the sea. Q: where does a blick live? A: in the sea.",
    "count 5 6 7 8 9. down 9 8 7.",
    "some foxes help the farmers .",
    "12 + 3 = 15. 1 + 1 = 2. the big horse likes a bird .",
    "Q: what colour is a zorp? A: blue.",
]


@pytest.fixture(scope="module")
def tokenizers():
    corpus = TEXTS * 4
    return {kind: train_tokenizer(kind, corpus, size) for kind, size in (("unigram", 120), ("bpe", 300),
                                                                         ("wordpiece", 200))}


@pytest.fixture(scope="module")
def teachers(tokenizers):
    return [OnlineTeacher(tiny_llama(len(tokenizers["bpe"]), seed=1), tokenizers["bpe"], name="bpe"),
            OnlineTeacher(tiny_llama(len(tokenizers["wordpiece"]), seed=2), tokenizers["wordpiece"], name="wp")]


def _trainer(tokenizers, teachers, *, batch, accumulation, steps=1, objective=None, **args):
    from datasets import Dataset
    from transformers import TrainingArguments

    student = tiny_llama(len(tokenizers["unigram"]), seed=3)
    arguments = TrainingArguments(output_dir=args.pop("output_dir", "unused"), per_device_train_batch_size=batch,
                                  gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.5,
                                  optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                                  use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                  ddp_find_unused_parameters=False,
                                  **args)
    dataset = Dataset.from_dict({"text": TEXTS[:4], "source": ["x"] * 4})
    return FusionTrainer(model=student, args=arguments, train_dataset=dataset, processing_class=tokenizers["unigram"],
                         teachers=teachers, objective=objective or InfiGFusionLoss(values="topk_probs"))


# ------------------------------------------------------------------------------------------------ collator
def test_collator_tokenizes_the_text_for_every_model_and_keeps_it(tokenizers):
    collator = FusionCollator(tokenizers["unigram"], [tokenizers["bpe"], tokenizers["wordpiece"]])
    batch = collator([{"text": TEXTS[0]}, {"text": TEXTS[1]}])
    assert batch["text"] == TEXTS[:2]
    for part, tokenizer in zip([batch] + batch["teachers"], ("unigram", "bpe", "wordpiece")):
        ids = tokenizers[tokenizer](TEXTS[1])["input_ids"]
        assert part["input_ids"][1, :len(ids)].tolist() == ids, tokenizer
        assert part["attention_mask"][1].sum() == len(ids)
        assert part["labels"][0, part["attention_mask"][0] == 0].eq(-100).all()
        # the spans of the text tokens cover every character once, in order; a word's token starts at its first
        # letter whichever side the tokenizer puts the space on (trimmed spans: only spaces fall between them)
        spans = part["offsets"][1, 1:len(ids)].tolist()
        assert spans[0][0] == 0 and spans[-1][1] == len(TEXTS[1])
        assert all(a[1] <= b[0] and not TEXTS[1][a[1]:b[0]].strip() for a, b in zip(spans, spans[1:]))
        assert all(not TEXTS[1][start].isspace() for start, end in spans if end - start > 1)


def test_collator_learns_only_the_completion_on_every_side(tokenizers):
    collator = FusionCollator(tokenizers["unigram"], [tokenizers["bpe"]])
    prompt, completion = "Q: where does a blick live?", " A: in the sea."
    batch = collator([{"prompt": prompt, "completion": completion}])
    assert batch["text"] == [prompt + completion]
    for part in (batch, batch["teachers"][0]):
        learnt = part["labels"][0] != -100
        ends = part["offsets"][0, :, 1]
        assert learnt.any()
        assert (ends[learnt] > len(prompt)).all()  # every learnt token reaches into the completion
        assert not learnt[(ends <= len(prompt)) & (ends > 0)].any()


def test_collator_names_the_missing_text_column(tokenizers):
    with pytest.raises(ValueError, match="raw text.*'text'"):
        FusionCollator(tokenizers["unigram"])([{"input_ids": [1, 2, 3]}])
    slow = type("Slow", (), {"is_fast": False})()
    with pytest.raises(TypeError, match="fast tokenizer"):
        FusionCollator(slow)([{"text": "a"}])


# ------------------------------------------------------------------------------------------------ objective
def _teacher_outputs(teachers, batch):
    return [teacher.outputs(part) for teacher, part in zip(teachers, batch["teachers"])]


@pytest.mark.parametrize("options", [dict(values="topk_probs"), dict(values="probs", nodes="rank", gamma=0.5),
                                     dict(lam=0.0), dict(gamma=0.0, uld_top_k=4), dict(pairing="offsets")])
def test_micro_batch_shares_add_up_to_the_big_batch(tokenizers, teachers, options):
    """Sum over micro-batches of loss(micro, global counts) == loss(whole batch), value and gradient."""
    collator = FusionCollator(tokenizers["unigram"], [t.tokenizer for t in teachers])
    objective = FusionObjective(InfiGFusionLoss(**options))
    examples = [{"text": text} for text in TEXTS[:5]]
    torch.manual_seed(0)
    logits = {}

    def student_logits(batch):
        vocab = len(tokenizers["unigram"])
        weights = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1))
        leaf = logits.setdefault("w", weights.requires_grad_())
        return leaf[batch["input_ids"]]

    whole = collator(examples)
    expected = objective(student_logits(whole), whole, _teacher_outputs(teachers, whole)).loss
    (expected_grad,) = torch.autograd.grad(expected, logits["w"])
    micro = [collator(examples[:2]), collator(examples[2:])]
    counts = sum(count_targets(batch) for batch in micro)
    assert (counts.tokens, counts.sequences) == (count_targets(whole).tokens, count_targets(whole).sequences)
    total = sum(objective(student_logits(b), b, _teacher_outputs(teachers, b), counts).loss for b in micro)
    (grad,) = torch.autograd.grad(total, logits["w"])
    assert_close(total, expected, name="loss")
    assert_close(grad, expected_grad, atol=1e-6, name="gradient")


def test_packed_rows_are_split_into_sequences(tokenizers, teachers):
    collator = FusionCollator(tokenizers["unigram"], [t.tokenizer for t in teachers])
    packer = FusionCollator(tokenizers["unigram"], [t.tokenizer for t in teachers], packing=True)
    examples = [{"text": text} for text in TEXTS[:3]]
    padded, packed = collator(examples), packer(examples)
    assert packed["input_ids"].shape[0] == 1 and packed["position_ids"].eq(0).sum() == 3
    table = torch.randn(len(tokenizers["unigram"]), 7 + len(tokenizers["unigram"]) - 7, generator=torch.Generator()
                        .manual_seed(0))
    # logits that depend on the token only, so that both layouts see the same numbers
    objective = FusionObjective(InfiGFusionLoss(values="probs", graph_norm="mean"))
    outputs = _teacher_outputs(teachers, padded)
    expected = objective(table[padded["input_ids"]], padded, outputs)
    actual = objective(table[packed["input_ids"]], packed, outputs)
    assert (count_targets(packed).tokens, count_targets(packed).sequences) == (
        count_targets(padded).tokens, count_targets(padded).sequences)
    assert_close(actual.loss, expected.loss, name="packed loss")
    # the boundary between two packed sequences is never a target
    targets = shifted_targets(packed["labels"], packed["position_ids"])
    assert targets[0, packed["position_ids"][0, 1:] == 0].eq(-100).all()


def test_packed_rows_need_one_teacher_row_per_sequence(tokenizers, teachers):
    packer = FusionCollator(tokenizers["unigram"], [t.tokenizer for t in teachers], packing=True)
    packed = packer([{"text": text} for text in TEXTS[:2]])
    logits = torch.zeros(*packed["input_ids"].shape, len(tokenizers["unigram"]))
    wrong = [(t.logits[:1], t.targets[:1]) for t in _teacher_outputs(teachers, packed)]
    with pytest.raises(ValueError, match="teacher 0 has 1 sequences but the student batch has 2"):
        FusionObjective()(logits, packed, wrong)


def test_gamma_zero_never_computes_gld(tokenizers, teachers, monkeypatch):
    from infigw import functional

    def fail(*args, **kwargs):
        raise AssertionError("GLD computed with gamma=0")

    monkeypatch.setattr(functional, "gld_terms", fail)
    collator = FusionCollator(tokenizers["unigram"], [t.tokenizer for t in teachers])
    batch = collator([{"text": TEXTS[0]}])
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizers["unigram"]))
    terms = FusionObjective(InfiGFusionLoss(gamma=0.0))(logits, batch, _teacher_outputs(teachers, batch))
    assert terms.logs["gld/teacher0"] == 0.0 and terms.logs["uld/teacher0"] > 0


# ------------------------------------------------------------------------------------------------ trainer
def _update(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()}


def test_trainer_keeps_the_text_and_logs_the_components(tokenizers, teachers, tmp_path):
    trainer = _trainer(tokenizers, teachers, batch=2, accumulation=1, steps=2, output_dir=str(tmp_path))
    assert trainer.args.remove_unused_columns  # the default that used to drop the text
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "ce", "uld/bpe", "gld/bpe", "weights/bpe", "uld/wp", "gld/wp", "weights/wp"):
        assert key in logged, key
    assert logged["weights/bpe"] == pytest.approx(0.5) and logged["gld/wp"] > 0


def test_gradient_accumulation_equals_one_big_batch(tokenizers, teachers, tmp_path):
    big = _update(_trainer(tokenizers, teachers, batch=4, accumulation=1, output_dir=str(tmp_path)))
    accumulated = _update(_trainer(tokenizers, teachers, batch=2, accumulation=2, output_dir=str(tmp_path)))
    for name in big:
        assert_close(accumulated[name], big[name], atol=1e-7, rtol=1e-4, name=name)


_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_train import TEXTS, _trainer, _update
    from infigw.train import OnlineTeacher
    from infigw.train.toy import tiny_llama
    from transformers import PreTrainedTokenizerFast
    tokenizers = {{kind: PreTrainedTokenizerFast.from_pretrained({out!r} + "/" + kind)
                   for kind in ("unigram", "bpe", "wordpiece")}}
    teachers = [OnlineTeacher(tiny_llama(len(tokenizers["bpe"]), seed=1), tokenizers["bpe"], name="bpe"),
                OnlineTeacher(tiny_llama(len(tokenizers["wordpiece"]), seed=2), tokenizers["wordpiece"], name="wp")]
    update = _update(_trainer(tokenizers, teachers, batch=2, accumulation=1, output_dir={out!r}))
    if torch.distributed.get_rank() == 0:
        torch.save(update, {out!r} + "/update.pt")
""")


@once
def test_two_process_gloo_ddp_equals_one_big_batch(tokenizers, teachers, tmp_path):
    """2 ranks x 2 sequences (gloo, CPU) give the update of 1 process x 4 sequences."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    for kind, tokenizer in tokenizers.items():  # the same tokenizers on every rank (training them may vary)
        tokenizer.save_pretrained(tmp_path / kind)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--standalone", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "update.pt")
    big = _update(_trainer(tokenizers, teachers, batch=4, accumulation=1, output_dir=str(tmp_path)))
    for name in big:
        assert_close(ddp[name], big[name], atol=1e-7, rtol=1e-4, name=name)


@once
@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trainer_with_its_own_pipeline(tokenizers, teachers, packing):
    """TRL's SFTTrainer tokenizes (and packs) itself: the teachers read each sequence decoded from the student's
    tokens (exact here: the Unigram tokenizer is lossless), packed rows are split into sequences."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from infigw.train import fusion_trainer_class

    arguments = trl.SFTConfig(output_dir="unused", max_steps=1, per_device_train_batch_size=3, report_to=[],
                              use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, packing=packing)
    trainer = fusion_trainer_class(trl.SFTTrainer)(
        model=tiny_llama(len(tokenizers["unigram"]), seed=3), args=arguments,
        train_dataset=Dataset.from_dict({"text": TEXTS[:3]}), processing_class=tokenizers["unigram"],
        teachers=teachers, objective=InfiGFusionLoss(values="topk_probs", nodes="rank"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("position_ids" in batch) == packing and batch["input_ids"].shape[0] == (1 if packing else 3)
    parts = trainer._parts_from_student_tokens(batch, teachers)
    for part, teacher in zip(parts, teachers):
        assert part["input_ids"].shape[0] == 3  # one row per sequence, packed or not
        decoded = teacher.tokenizer.batch_decode(part["input_ids"], skip_special_tokens=True)
        squeeze = str.maketrans("", "", " \u2581")  # the toy WordPiece decoder keeps Metaspace's marks
        assert sorted(d.translate(squeeze) for d in decoded) == sorted(t.translate(squeeze) for t in TEXTS[:3])
    trainer.train()
    assert trainer.state.log_history[0]["gld/bpe"] > 0


@once
def test_the_first_example_of_docs_training_runs_as_written(tmp_path, monkeypatch):
    """docs/training.md's first code block, executed as it stands (in a scratch directory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "training.md")).read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    logged = namespace["trainer"].state.log_history[0]
    assert {"ce", "uld/math", "gld/lore", "weights/math"} <= set(logged)
    assert (tmp_path / "fused" / "config.json").exists()


def test_a_record_store_teacher_equals_the_same_teacher_online(tokenizers, teachers, tmp_path):
    """Records captured with infigw.records (k = the whole vocabulary, with logsumexp) give the online teacher's
    loss: the store is read by the dataset's index column, its target spans pair like the collator's."""
    import json

    from infigw.records.capture import capture
    from infigw.train import StoreTeacher

    online = teachers[0]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    vocab = online.model.config.vocab_size
    capture(online.model, data, tmp_path / "store", k=vocab, tokenizer=online.tokenizer, value_dtype="fp32",
            progress=False)
    store = StoreTeacher(tmp_path / "store", name="bpe", tokenizer=online.tokenizer)
    collator = FusionCollator(tokenizers["unigram"], [online.tokenizer])
    batch = collator([{"text": t, "index": i} for i, t in enumerate(TEXTS[:4])])
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizers["unigram"]), generator=torch.Generator()
                         .manual_seed(0))
    for options in (dict(values="topk_probs"), dict(gamma=0.0, pairing="offsets"), dict(uld_top_k=8)):
        objective = FusionObjective(InfiGFusionLoss(**options))
        expected = objective(logits, batch, [online.outputs(batch["teachers"][0])])
        actual = objective(logits, batch, [store.outputs(batch["index"])])
        assert_close(actual.loss, expected.loss, atol=1e-4, rtol=1e-4, name=f"store vs online {options}")
