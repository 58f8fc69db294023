"""The losses on torch.distributed (infigw.distributed): gloo on loopback, 2 and 4 processes.

Every case builds the whole batch on every rank from one seed, computes the one-process loss and its gradient, then
the distributed loss on the rank's part (its vocabulary shard, its sequences, its micro-batches) and checks the value
and the rank's gradient against the one-process ones. The worker processes of a world size live for the whole module
(one gloo group each, forked from a forkserver that imported infigw once); each test runs several random cases in
them. The 4-process world also runs cases on its 2-rank subgroups (group ranks differ from global ranks there) and in
a 2 x 2 layout (vocabulary-parallel pairs x data-parallel pairs).
"""
import contextlib
import copy
import datetime
import os
import queue
import random
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infigw import InfiGFusionLoss, TopKRecord, distributed
from infigw import functional as F
from infigw.distributed import ItemCounts, count_items
from infigw.summary import summarize
from tests.helpers import NORM_MODES, assert_close, random_mask, tied_logits

WORLDS = (2, 4)
RESULT_TIMEOUT_S = 180
_GROUPS = {}  # in a worker: the groups of its world, by name


# ----------------------------------------------------------------------------------------------- the worker pool
def _serve(rank, world, store, tasks, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    _GROUPS["world"] = dist.group.WORLD
    if world == 4:
        _GROUPS["pairs"], _ = dist.new_subgroups(group_size=2)  # {0, 1}, {2, 3}
        _GROUPS["strided"], _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    results.put((rank, None))
    while (task := tasks.get()) is not None:
        case, kwargs = task
        try:
            case(**kwargs)
            results.put((rank, None))
        except BaseException:  # reported to the test process, which fails the test with it
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    """``world`` processes in one gloo group; :meth:`run` runs ``case(**kwargs)`` on every rank and raises with
    the tracebacks of the ranks that failed. A failed or hung case leaves the group unusable: the pool restarts."""

    def __init__(self, world: int):
        self.world, self.processes = world, []

    def _start(self):
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["infigw", __name__])  # imported once, in the server the workers fork from
        directory = tempfile.mkdtemp(prefix="infigw-gloo-")
        self.tasks = [context.Queue() for _ in range(self.world)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, daemon=True,
                                          args=(rank, self.world, os.path.join(directory, "store"), self.tasks[rank],
                                                self.results)) for rank in range(self.world)]
        for process in self.processes:
            process.start()
        self._collect("start")

    def _collect(self, what):
        failures = {}
        try:
            for _ in range(self.world):
                rank, failure = self.results.get(timeout=RESULT_TIMEOUT_S)
                if failure:
                    failures[rank] = failure
        except queue.Empty:
            self.close()
            raise AssertionError(f"{what}: a rank gave no answer within {RESULT_TIMEOUT_S} s (a hang)")
        if failures:
            self.close()
            raise AssertionError(f"{what} failed on ranks {sorted(failures)}:\n" + "\n".join(failures.values()))

    def run(self, case, **kwargs):
        if not self.processes:
            self._start()
        for tasks in self.tasks:
            tasks.put((case, kwargs))
        self._collect(f"{case.__name__}({kwargs})")

    def close(self):
        if not self.processes:
            return
        for tasks, process in zip(self.tasks, self.processes):
            if process.is_alive():
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self.processes = []


@pytest.fixture(scope="module", params=WORLDS, ids=lambda world: f"world{world}")
def pool(request):
    workers = Pool(request.param)
    yield workers
    workers.close()


def _groups(world, seed):
    """The group a case runs on: the whole world, or (4 processes, odd seeds) the 2-rank subgroups."""
    return "pairs" if world == 4 and seed % 2 else "world"


# ----------------------------------------------------------------------------------------------- inputs
def _where(group_name):
    group = _GROUPS[group_name]
    return group, dist.get_rank(group), dist.get_world_size(group)


def _student_and_labels(rng, generator, batch, length, vocab, *, tied=False, dtype=torch.float32):
    # a third of the cases with kept probabilities far below 1e-19 (cosine graphs must stay finite, issue 14)
    scale = rng.choice([2.0, 2.0, 40.0])
    logits = (tied_logits(batch, length, vocab, levels=4, generator=generator) if tied
              else scale * torch.randn(batch, length, vocab, generator=generator))
    valid = random_mask(batch, length, generator=generator, empty_rows=[batch - 1] if rng.random() < 0.3 else ())
    labels = torch.randint(0, vocab, (batch, length), generator=generator).masked_fill(~valid, -100)
    return logits.to(dtype), valid, labels


def _teachers(rng, generator, batch, length, temperature):
    """One dense teacher of its own vocabulary sharing the student's positions, or (half the time) that teacher
    and a stored top-k record of another teacher, of another length and with its own mask."""
    dense = 2 * torch.randn(batch, length, rng.randint(7, 15), generator=generator)
    if rng.random() < 0.5:
        return dense, {}
    other_length = rng.randint(3, length + 2)
    other = 2 * torch.randn(batch, other_length, rng.randint(8, 14), generator=generator)
    record = TopKRecord.from_logits(other, 6, temperature=temperature)
    return [dense, record], {"teacher_mask": [None, random_mask(batch, other_length, generator=generator)]}


def _graph_options(rng, k_max):
    return dict(k=rng.randint(2, k_max), values=rng.choice(["logits", "probs", "topk_probs"]),
                nodes=rng.choice(["vocab", "rank"]), graph_norm=rng.choice(["mean", "sum", "cosine"]),
                distance=rng.choice(["l1", "gw1d"]), num_nodes=rng.choice([None, 4]))


def _leaf(tensor):
    return tensor.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------- vocabulary parallel
def case_summary(*, seed, group_name):
    """The merged summary of the shards is the one-process summary: same kept values and ids (ties across shards
    included), same logsumexps and gold logits; the gradient of any function of it reaches each shard exactly."""
    group, rank, size = _where(group_name)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    batch, length, shard_vocab = rng.randint(1, 3), rng.randint(2, 6), rng.randint(3, 7)
    vocab, dtype = size * shard_vocab, rng.choice([torch.float32, torch.float32, torch.bfloat16])
    logits, valid, labels = _student_and_labels(rng, generator, batch, length, vocab, tied=seed % 3 == 0, dtype=dtype)
    k, temperature = rng.randint(1, min(vocab, 2 * shard_vocab + 1)), rng.choice([1.0, 0.7])
    with_labels = rng.random() < 0.7
    full, shard = _leaf(logits), _leaf(logits.chunk(size, -1)[rank])
    expected = summarize(full, valid, k, temperature, labels if with_labels else None, backend="torch")
    actual = distributed.summarize_shard(shard, valid, k, temperature, labels if with_labels else None, group)
    assert actual.vocab_size == vocab
    assert torch.equal(actual.values[valid], expected.values[valid]), "kept values"
    assert torch.equal(actual.ids[valid], expected.ids[valid]), "kept ids (the tie rule across shards)"
    for name in ("lse", "unit_lse") + (("gold",) if with_labels else ()):
        assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=1e-5, name=name)
    weights = torch.randn(batch, length, k + 3, generator=generator)

    def objective(summary):
        parts = [summary.values, summary.lse.unsqueeze(-1), summary.unit_lse.unsqueeze(-1),
                 (summary.gold if with_labels else summary.lse).unsqueeze(-1)]
        return (weights * torch.cat(parts, -1)).sum()

    objective(expected).backward()
    objective(actual).backward()
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(shard.grad, full.grad.chunk(size, -1)[rank], atol=atol, rtol=atol, name="shard gradient")


def case_vocab_losses(*, seed, group_name):
    """gld_loss, uld_loss (top-k and full vocabulary) and infigfusion_loss on vocabulary shards: the one-process
    value on every rank, and each shard's slice of the one-process gradient."""
    group, rank, size = _where(group_name)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    batch, length, shard_vocab = rng.randint(1, 3), rng.randint(3, 7), rng.randint(3, 6)
    vocab, temperature = size * shard_vocab, rng.choice([1.0, 0.8])
    logits, valid, labels = _student_and_labels(rng, generator, batch, length, vocab)
    teachers, teacher_args = _teachers(rng, generator, batch, length, temperature)
    graph = _graph_options(rng, 6)
    weights = rng.choice([None, "uncertainty"]) if isinstance(teachers, list) else None
    top_k = rng.randint(2, 6)
    calls = {
        "gld": (F.gld_loss, dict(graph, temperature=temperature, teacher_weights=weights,
                                 reduction=rng.choice(["mean", "sum", "none"]))),
        "uld top-k": (F.uld_loss, dict(top_k=top_k, standardize=rng.random() < 0.5, temperature=temperature)),
        "uld full": (F.uld_loss, dict(temperature=temperature, record_tail=rng.choice(["zeros", "bucket"]))),
        "infigfusion": (F.infigfusion_loss, dict(graph, temperature=temperature, teacher_weights=weights,
                                                 uld_top_k=rng.choice([None, top_k]), lam=rng.choice([0.3, 1.0]),
                                                 gamma=rng.choice([0.0, 0.5]))),
    }
    for name, (loss_fn, options) in calls.items():
        full, shard = _leaf(logits), _leaf(logits.chunk(size, -1)[rank])
        expected = loss_fn(full, teachers, labels, **teacher_args, **options)
        actual = loss_fn(shard, teachers, labels, **teacher_args, **options, vocab_parallel_group=group)
        upstream = torch.randn(expected.shape, generator=generator)  # "not the last layer"
        (upstream * expected).sum().backward()
        (upstream * actual).sum().backward()
        assert_close(actual, expected, atol=1e-5, rtol=1e-5, name=f"{name} value ({options})")
        assert_close(shard.grad, full.grad.chunk(size, -1)[rank], atol=1e-5, rtol=1e-4,
                     name=f"{name} shard gradient ({options})")


def case_inconsistent_shards():
    """Ranks that disagree on the shard shape or on the labels get a clear error on every rank, not a hang."""
    group, rank, size = _where("world")
    labels = torch.zeros(2, 3, dtype=torch.long)
    for logits, rank_labels in ((torch.randn(2, 3, 4 + rank), labels), (torch.randn(2, 3, 4), labels + rank)):
        with pytest.raises(ValueError, match="same on every rank"):
            F.infigfusion_loss(logits, torch.randn(2, 3, 5), rank_labels, k=2, uld_top_k=2,
                               vocab_parallel_group=group)
    with pytest.raises(ValueError, match="same on every rank"):
        F.uld_loss(torch.randn(2, 3, 4 + rank), torch.randn(2, 3, 5), vocab_parallel_group=group)


# ----------------------------------------------------------------------------------------------- data parallel
def _batch_split(rng, generator, size, *, min_rows=1):
    """The whole batch and each rank's rows and length: ranks hold different numbers of sequences and positions
    (positions beyond a rank's length are masked in the whole batch)."""
    rows = [rng.randint(min_rows, min_rows + 1) for _ in range(size)]
    length, vocab = rng.randint(3, 6), 2 * rng.randint(4, 6)  # even: two vocabulary shards in the 2 x 2 layout
    logits, valid, labels = _student_and_labels(rng, generator, sum(rows), length, vocab)
    lengths = [rng.randint(2, length) for _ in range(size)]
    starts = [sum(rows[:r]) for r in range(size)]
    for start, count, own_length in zip(starts, rows, lengths):
        labels[start:start + count, own_length:] = -100
    return logits, labels, [(slice(start, start + count), own_length) for start, count, own_length in
                            zip(starts, rows, lengths)]


def _part(tensor, rows, length):
    return tensor[rows, :length]


def _teacher_part(teacher, rows, length):
    """A rank's part of a dense teacher or of a stored record."""
    if isinstance(teacher, TopKRecord):
        return TopKRecord(_part(teacher.values, rows, length), _part(teacher.indices, rows, length),
                          teacher.vocab_size, _part(teacher.logsumexp, rows, length), teacher.temperature)
    return _part(teacher, rows, length)


def case_data_parallel(*, seed, group_name):
    """Shares over a data-parallel group: summed over the ranks, the values are the one-process loss of the whole
    batch, and each rank's gradient is the one-process gradient of its rows; sequence graphs, pooled graphs
    (scope="batch": the degrees all-reduced) and the objective."""
    group, rank, size = _where(group_name)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    logits, labels, parts = _batch_split(rng, generator, size)
    rows, length = parts[rank]
    teacher = 2 * torch.randn(*labels.shape, rng.randint(7, 12), generator=generator)
    record = TopKRecord.from_logits(2 * torch.randn(*labels.shape, 9, generator=generator), 6)
    teachers = [teacher, record] if seed % 2 else teacher
    graph = _graph_options(rng, 5)
    calls = {
        "gld sequences": (F.gld_loss, dict(graph, reduction=rng.choice(["mean", "sum"]))),
        "gld pooled": (F.gld_loss, dict(graph, scope="batch", graph_norm=NORM_MODES[seed % 3],
                                        reduction=rng.choice(["mean", "sum", "none"]),
                                        teacher_weights="uncertainty" if seed % 2 else None,
                                        weight_granularity="token" if seed % 4 == 1 else "sequence")),
        # per-character uncertainties of a pooled graph (each teacher position covers 1 to 4 characters)
        "gld pooled, per character": (F.gld_loss, dict(
            graph, scope="batch", teacher_weights="uncertainty",
            teacher_chars=[torch.randint(1, 5, labels.shape, generator=generator)
                           for _ in range(len(teachers) if isinstance(teachers, list) else 1)])),
        "uld": (F.uld_loss, dict(top_k=rng.choice([None, 3]))),
        "infigfusion": (F.infigfusion_loss, dict(graph, uld_top_k=rng.choice([None, 3]),
                                                 teacher_weights="uncertainty" if seed % 2 else None)),
    }
    for name, (loss_fn, options) in calls.items():
        full = _leaf(logits)
        own = _leaf(_part(logits, rows, length))
        own_teachers = ([_teacher_part(t, rows, length) for t in teachers] if isinstance(teachers, list)
                        else _teacher_part(teachers, rows, length))
        own_options = {**options, "data_parallel_group": group}
        if "teacher_chars" in options:
            own_options["teacher_chars"] = [_part(chars, rows, length) for chars in options["teacher_chars"]]
        expected = loss_fn(full, teachers, labels, **options)
        expected.sum().backward()
        actual = loss_fn(own, own_teachers, _part(labels, rows, length), **own_options)
        actual.sum().backward()
        total = actual.detach().sum()
        dist.all_reduce(total, group=group)
        assert_close(total, expected.detach().sum(), atol=1e-5, rtol=1e-5, name=f"{name}: sum of the shares")
        assert_close(own.grad, _part(full.grad, rows, length), atol=1e-5, rtol=1e-4,
                     name=f"{name}: this rank's gradient ({options})")


def case_accumulation(*, seed, group_name):
    """Gradient accumulation over two micro-batches per rank with num_items_in_batch (count_items summed over the
    micro-batches and the group): the shares of all micro-batches and ranks add up to the whole batch's loss and
    gradient; for pooled graphs the items are the micro-batches' graphs."""
    group, rank, size = _where(group_name)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    logits, labels, parts = _batch_split(rng, generator, size, min_rows=2)
    rows, length = parts[rank]
    teacher = 2 * torch.randn(*labels.shape, 9, generator=generator)
    own_labels, own_teacher = _part(labels, rows, length), _part(teacher, rows, length)
    micro = [slice(0, 1), slice(1, None)]
    counts = sum(count_items(own_labels[m], group=group) for m in micro)
    graph = _graph_options(rng, 5)
    calls = {
        "infigfusion": (F.infigfusion_loss, dict(graph, uld_top_k=rng.choice([None, 3])), counts),
        "gld": (F.gld_loss, graph, counts.sequences),
        "uld": (F.uld_loss, dict(top_k=3), counts),
        "gld pooled": (F.gld_loss, dict(graph, scope="batch"), len(micro)),
    }
    for name, (loss_fn, options, items) in calls.items():
        full = _leaf(logits)
        if name == "gld pooled":  # the whole batch: the mean of the graphs of the micro-batches of all ranks
            first = torch.cat([torch.arange(r.start, r.start + 1) for r, _ in parts])
            rest = torch.cat([torch.arange(r.start + 1, r.stop) for r, _ in parts])
            expected = sum(loss_fn(full[index], teacher[index], labels[index], **options) for index in (first, rest))
            expected = expected / len(micro)
        else:
            expected = loss_fn(full, teacher, labels, **options)
        expected.backward()
        own = _leaf(_part(logits, rows, length))
        total = 0.0
        for m in micro:
            loss = loss_fn(own[m], own_teacher[m], own_labels[m], **options, data_parallel_group=group,
                           num_items_in_batch=items)
            loss.backward()
            total += loss.detach()
        dist.all_reduce(total, group=group)
        assert_close(total, expected.detach(), atol=1e-5, rtol=1e-5, name=f"{name}: sum over micro-batches and ranks")
        assert_close(own.grad, _part(full.grad, rows, length), atol=1e-5, rtol=1e-4,
                     name=f"{name}: accumulated gradient ({options})")


def case_ddp(*, seed, group_name):
    """A model under DistributedDataParallel with gradient accumulation (no_sync), the objective normalised by
    num_items_in_batch and each rank's loss multiplied by the world size (DDP averages): the parameters' gradients
    are those of one process on the whole batch."""
    group, rank, size = _where(group_name)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Tanh(), torch.nn.Linear(8, 13))
    reference = copy.deepcopy(model)
    per_rank, length = 2, 5
    inputs = torch.randint(0, 11, (size * per_rank, length), generator=generator)
    labels = torch.randint(0, 13, (size * per_rank, length), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.3] = -100
    labels[:, 0] = 1
    teacher = 2 * torch.randn(size * per_rank, length, 7, generator=generator)
    loss_fn = InfiGFusionLoss(k=3, values="probs", uld_top_k=3)
    loss_fn(reference(inputs), teacher, labels).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    micro = [slice(i, i + 1) for i in range(per_rank)]
    counts = sum(count_items(labels[rows][m], group=group) for m in micro)
    for i, m in enumerate(micro):
        with ddp.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
            loss = loss_fn(ddp(inputs[rows][m]), teacher[rows][m], labels[rows][m], num_items_in_batch=counts)
            (loss * size).backward()
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        assert_close(parameter.grad, expected.grad, atol=1e-5, rtol=1e-4, name=f"DDP gradient of {name}")


def case_two_dimensional(*, seed):
    """4 processes as 2 data-parallel ranks x 2 vocabulary shards: the objective and pooled GLD with both groups."""
    vocab_group, shard, shards = _where("pairs")
    data_group, data_rank, data_size = _where("strided")
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    logits, labels, parts = _batch_split(rng, generator, data_size)
    rows, length = parts[data_rank]
    teacher = 2 * torch.randn(*labels.shape, 9, generator=generator)
    graph = _graph_options(rng, 4)
    calls = {"infigfusion": (F.infigfusion_loss, dict(graph, uld_top_k=3)),
             "gld pooled": (F.gld_loss, dict(graph, scope="batch"))}
    for name, (loss_fn, options) in calls.items():
        full = _leaf(logits)
        own = _leaf(_part(logits, rows, length).chunk(shards, -1)[shard])
        expected = loss_fn(full, teacher, labels, **options)
        expected.backward()
        actual = loss_fn(own, _part(teacher, rows, length), _part(labels, rows, length), **options,
                         vocab_parallel_group=vocab_group, data_parallel_group=data_group)
        actual.backward()
        total = actual.detach().clone()
        dist.all_reduce(total, group=data_group)
        assert_close(total, expected.detach(), atol=1e-5, rtol=1e-5, name=f"{name}: value")
        assert_close(own.grad, _part(full.grad, rows, length).chunk(shards, -1)[shard], atol=1e-5, rtol=1e-4,
                     name=f"{name}: gradient of this rank's rows and shard ({options})")


# ----------------------------------------------------------------------------------------------- the tests
def test_vocab_parallel_summary_is_the_one_process_summary(pool):
    for seed in range(6):
        pool.run(case_summary, seed=seed, group_name=_groups(pool.world, seed))


def test_vocab_parallel_losses_equal_the_one_process_losses(pool):
    for seed in range(4):
        pool.run(case_vocab_losses, seed=100 + seed, group_name=_groups(pool.world, seed))


def test_ranks_that_disagree_get_a_clear_error(pool):
    pool.run(case_inconsistent_shards)


def test_data_parallel_shares_add_up_to_the_whole_batch(pool):
    for seed in range(4):
        pool.run(case_data_parallel, seed=200 + seed, group_name=_groups(pool.world, seed))


def test_gradient_accumulation_with_num_items_in_batch(pool):
    for seed in range(2):
        pool.run(case_accumulation, seed=300 + seed, group_name=_groups(pool.world, seed))


def test_ddp_with_accumulation_trains_as_one_process(pool):
    pool.run(case_ddp, seed=400, group_name="world")


def test_vocab_and_data_parallel_together(pool):
    if pool.world != 4:
        pytest.skip("the 2 x 2 layout needs 4 processes")
    for seed in range(2):
        pool.run(case_two_dimensional, seed=500 + seed)


# ----------------------------------------------------------------------------------------------- one process
def test_num_items_in_batch_makes_micro_batches_add_up():
    """Gradient accumulation in one process: per-micro-batch losses normalised by the whole batch's items sum to
    the whole batch's loss, and so do their gradients."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 10, generator=generator)
    labels = torch.randint(0, 10, (4, 6), generator=generator)
    labels[torch.rand(4, 6, generator=generator) < 0.3] = -100
    labels[2] = -100  # a sequence without valid positions counts as no item
    teacher = torch.randn(4, 6, 8, generator=generator)
    micro = [slice(0, 1), slice(1, 4)]
    counts = sum(count_items(labels[m]) for m in micro)
    assert int(counts.tokens) == int((labels != -100).sum()) and int(counts.sequences) == 3
    for loss_fn, options, items in ((F.infigfusion_loss, dict(k=3, uld_top_k=3), counts),
                                    (F.gld_loss, dict(k=3), counts.sequences), (F.uld_loss, {}, counts)):
        full = _leaf(logits)
        expected = loss_fn(full, teacher, labels, **options)
        expected.backward()
        parts = _leaf(logits)
        total = sum(loss_fn(parts[m], teacher[m], labels[m], num_items_in_batch=items, **options) for m in micro)
        total.backward()
        assert_close(total, expected, name=f"{loss_fn.__name__} value")
        assert_close(parts.grad, full.grad, name=f"{loss_fn.__name__} gradient")


def test_count_items_follows_the_losses_rules_for_teachers():
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100], [3, -100, -100]])
    assert tuple(int(x) for x in (count_items(labels).tokens, count_items(labels).sequences)) == (3, 2)
    teacher_mask = torch.tensor([[True, False], [True, True], [False, False]])  # the third sequence: no teacher
    counts = count_items(labels, teacher_mask=teacher_mask)
    assert (int(counts.tokens), int(counts.sequences)) == (3, 1)
    counts = count_items(mask=labels != -100, teacher_mask=[teacher_mask, None])  # another teacher covers it
    assert int(counts.sequences) == 2
    total = sum([ItemCounts(1, 2), ItemCounts(torch.tensor(3), 4)])
    assert (int(total.tokens), int(total.sequences)) == (4, 6)


def test_module_takes_num_items_in_batch_per_batch():
    generator = torch.Generator().manual_seed(1)
    logits, teacher = torch.randn(2, 4, 9, generator=generator), torch.randn(2, 4, 7, generator=generator)
    labels = torch.randint(0, 9, (2, 4), generator=generator)
    loss = InfiGFusionLoss(k=3)
    halved = loss(logits, teacher, labels, num_items_in_batch=ItemCounts(16, 4))
    assert_close(halved, loss(logits, teacher, labels) / 2, name="normalised by twice the items")


@pytest.mark.parametrize("call, error, match", [
    (lambda: F.gld_loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6), reduction="sum", num_items_in_batch=4),
     ValueError, "reduction='mean'"),
    (lambda: F.infigfusion_loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long),
                                num_items_in_batch=6), ValueError, "ItemCounts"),
    (lambda: F.gld_loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6), num_items_in_batch=-1), ValueError, "count"),
    (lambda: F.gld_loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6), scope="batch",
                        num_items_in_batch=ItemCounts(3, 2)), ValueError, "graphs"),
    (lambda: F.gld_loss(torch.randn(2, 3, 6), torch.randn(2, 3, 6), vocab_parallel_group=object()), RuntimeError,
     "init_process_group"),
    (lambda: count_items(None), ValueError, "labels or mask"),
])
def test_bad_distributed_arguments_get_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
