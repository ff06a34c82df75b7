"""batching.py: sequences generated together, one batch per decoding step, make the tokens that
generation.generate_ids makes for each of them alone, with logits within the tolerance measured
below; they join and leave between steps, finish on their own lengths and settings, and a removed
one frees its row for the next. Tiny random models: seconds."""
import time

import pytest
import torch

import batching
import generation
from batching import Batch, Sequence
from conftest import TINY_CONFIG
from data import EOT_TOKEN, GPT2_VOCAB_SIZE
from cpu_decode import prepare_for_generation
from generation import generate_ids
from model import GPT

# (prompt ids, settings): greedy and sampled, top-k and top-p, lengths that end at different steps, a
# prompt longer than the 64-token context (cropped) and texts that outgrow it (a second prompt pass)
REQUESTS = [([11, 12, 13], dict(max_new_tokens=30, temperature=0)),
            ([400, 401, 402, 403, 404], dict(max_new_tokens=12, temperature=0.8, top_k=40, seed=1)),
            ([], dict(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=2)),
            (list(range(1000, 1090)), dict(max_new_tokens=20, temperature=0.7, top_k=50, seed=3)),
            ([7] * 50, dict(max_new_tokens=40, temperature=0.9, seed=4)),
            ([5, 6], dict(max_new_tokens=1, temperature=0.7, seed=5))]
# the batch's logits against the same sequence's alone, over the real vocabulary: within 4.2e-7 in
# float32, 2.4e-7 in int8 and 1.8e-7 in compiled int8 on a 2-core Xeon (AMX), a matmul of n rows
# summing in another order than one of one row; 1e-5 leaves room for other CPUs
ATOL = {'float32': 1e-5, 'int8': 1e-5, 'int8, compiled': 1e-5}


def recorded(monkeypatch, module):
    """[(generator, logits), ...]: every logits vector that module's sample_next is given, in order."""
    seen, sample = [], module.sample_next

    def recording(logits, temperature=0.7, top_k=None, top_p=None, generator=None):
        seen.append((generator, logits.clone()))
        return sample(logits, temperature, top_k, top_p, generator)
    monkeypatch.setattr(module, 'sample_next', recording)
    return seen


# 'int8, compiled' compiles graphs of one row and of several (30 s): in the slow suite
@pytest.fixture(scope='module', params=['float32', 'int8', pytest.param('int8, compiled', marks=pytest.mark.slow)])
def model(request):
    """A tiny model and its precision; 'int8, compiled': with cpu_decode's compiled step, whose graphs
    for one row (alone) and for several (together) are not the same code."""
    torch.manual_seed(0)
    precision, _, compiled = request.param.partition(', ')
    return prepare_for_generation(GPT(TINY_CONFIG).eval(), precision, compile=bool(compiled)), request.param


def test_together_equals_alone_whatever_joins_and_leaves(model, monkeypatch):
    model, precision = model
    alone = [list(generate_ids(model, ids, **kw)) for ids, kw in REQUESTS]
    batch, seqs, made = Batch(model, max_rows=4), [], {}
    waiting = [Sequence(ids, **kw) for ids, kw in REQUESTS]
    steps = 0
    while waiting or batch:
        while waiting and not batch.full() and (steps % 3 == 0 or not batch):  # join every third step
            seqs.append(batch.add(waiting.pop(0)))
        for seq, token in batch.step():
            made.setdefault(id(seq), []).append(token)
        steps += 1
    assert [seq.tokens for seq in seqs] == alone
    assert all(len(seq.tokens) == kw['max_new_tokens'] for seq, (_, kw) in zip(seqs, REQUESTS))
    assert [made[id(seq)] for seq in seqs] == alone  # step() handed out each token once, in order


def test_logits_together_are_those_alone(model, monkeypatch):
    model, precision = model
    requests = [(ids, {**kw, 'seed': kw.get('seed', 99)}) for ids, kw in REQUESTS]  # a generator each
    seen = recorded(monkeypatch, generation)
    alone = []
    for ids, kw in requests:
        list(generate_ids(model, ids, **kw))
        alone.append([logits for _, logits in seen])
        seen.clear()
    monkeypatch.undo()
    seen = recorded(monkeypatch, batching)
    batch, seqs, held = Batch(model, max_rows=len(requests)), [], []
    for ids, kw in requests:  # one joins at each step, beside rows that hold positions
        seqs.append(batch.add(Sequence(ids, **kw)))
        held.append(batch.cache.k.size(1))
        batch.step()
    while batch:
        batch.step()
    assert held == [6] * 6  # one block for all rows (growing it cost 8 clients' speed: docs/serving.md)
    worst = 0.0
    for seq, logits_alone in zip(seqs, alone):
        together = [logits for generator, logits in seen if generator is seq.generator]
        assert len(together) == len(logits_alone) == seq.max_new_tokens
        assert all(torch.isneginf(b[GPT2_VOCAB_SIZE:]).all() for b in together)
        # the real vocabulary only: -inf - -inf is nan, and a nan maximum would hide any difference
        worst = max([worst, *((a - b)[:GPT2_VOCAB_SIZE].abs().max().item() for a, b in zip(logits_alone, together))])
    print(f'{precision}: together within {worst:.2e} of alone')
    assert worst <= ATOL[precision]


def test_sequences_stop_on_their_own_and_a_removed_one_frees_its_row(model):
    model, precision = model
    batch = Batch(model, max_rows=2)
    long = batch.add(Sequence([1, 2, 3], max_new_tokens=50, temperature=0))
    short = batch.add(Sequence([4, 5], max_new_tokens=3, temperature=0))
    with pytest.raises(ValueError, match='the batch is full'):
        batch.add(Sequence([6]))
    for _ in range(4):  # a prompt step, then three decode steps: short is done after 3 tokens
        batch.step()
    assert short.done and len(short.tokens) == 3 and batch.seqs == [long]
    third = batch.add(Sequence([8, 9], max_new_tokens=5, temperature=0))
    batch.remove(long)  # its client went away: the row is free at once, and third moves into row 0
    assert long.done and batch.seqs == [third] and batch.cache.n == 1
    while batch:
        batch.step()
    assert third.tokens == list(generate_ids(model, [8, 9], 5, temperature=0))
    # <|endoftext|> ends a stop_at_eot sequence without being handed out as a token: a model steered to
    # make it likeliest everywhere (ln_f gives a vector of ones, and only its row of the head sees them)
    torch.manual_seed(0)
    eot_model = GPT(TINY_CONFIG).eval()
    with torch.no_grad():
        eot_model.transformer.ln_f.weight.zero_()
        eot_model.transformer.ln_f.bias.fill_(1.0)
        eot_model.lm_head.weight[EOT_TOKEN] = 10.0
    weights, _, compiled = precision.partition(', ')
    eot_model = prepare_for_generation(eot_model, weights, compile=bool(compiled))
    assert list(generate_ids(eot_model, [1, 2], 5, temperature=0, stop_at_eot=True)) == []
    batch = Batch(eot_model, max_rows=2)
    stops = batch.add(Sequence([1, 2], max_new_tokens=5, temperature=0, stop_at_eot=True))
    goes_on = batch.add(Sequence([1, 2], max_new_tokens=5, temperature=0))
    assert batch.step() == [(stops, None), (goes_on, EOT_TOKEN)]
    assert stops.done and stops.tokens == [] and batch.seqs == [goes_on]
    while batch:
        batch.step()
    assert goes_on.tokens == [EOT_TOKEN] * 5


def test_a_server_holds_its_kv_cache_only_while_it_serves(model):
    """A server takes its cache with its first request and gives it back after idle_release_s with
    nothing to do (the memory of a quiet Space); the next request gets a new one and the same tokens."""
    model, _ = model
    lines = []
    server = batching.Server(model, max_rows=2, log=lines.append, idle_release_s=0.3)
    cache = server.batch.cache
    assert cache.k is None  # started, compiled if it compiles: nothing held

    def released(times):
        deadline = time.time() + 60
        while sum('KV cache released' in line for line in lines) < times:
            assert time.time() < deadline, lines
            time.sleep(0.02)

    request = dict(max_new_tokens=6, temperature=0.7, top_k=50, seed=7)
    first = list(server.submit([1, 2, 3], **request))
    row_bytes = 2 * model.config.n_layer * model.config.n_embd * model.config.block_size * 4
    released(1)
    assert cache.k is None and lines[-1] == f'batching: idle for 0.3 s, KV cache released ({2 * row_bytes / 1e6:.0f} MB)'
    assert list(server.submit([1, 2, 3], **request)) == first == list(generate_ids(model, [1, 2, 3], **request))
    released(2)
    assert cache.k is None
