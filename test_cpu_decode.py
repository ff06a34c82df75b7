"""cpu_decode.CompiledDecoder: the compiled decoding step makes the logits of the model's own eager step,
in every precision, at every cached length from 1 to the end of the block; generate_ids decodes through
it, from an empty prompt and through context restarts, to the eager tokens; each model's decoder keeps
to its own graphs when several live in one process; and `inference.py --compile` writes the text that
the eager path writes. Tiny random models: each graph compiles in a few seconds."""
import copy
import os

import pytest
import torch

import cpu_decode
import inference
from batching import Batch, Sequence
from conftest import TINY_CONFIG, run_cli, tiny_checkpoint
from cpu_decode import prepare_for_generation
from quantize import PRECISIONS
from data import GPT2_VOCAB_SIZE
from generation import generate_ids
from model import GPT, GPTConfig, KVCache

# the compiled step's logits against the eager step's, same weights and tokens. float32: equal to the
# last bits (the fused LayerNorm and softmax round a few values otherwise). int8 and int4 run the same
# matmul kernels, but a last-bit change in an activation can move its int8 code (int8) or its bf16
# rounding (int4, whose kernel also rounds its output to bf16) by one step: measured here, 1.2e-5 and
# 3.9e-3 (one bf16 step at a logit near 1). int8 one row at a time (inference.py's step) runs other
# kernels than the eager step, with bf16 activations: measured 8.5e-3, and 8.3e-3 with its float16 KV
# cache (which alone moves int4's by less than its own bf16 step: 3.9e-3 still)
ATOL = {'float32': 1e-5, 'int8': 1e-4, 'int4': 1e-2, 'int8, one row': 1e-2, 'int4, one row': 1e-2}
DECODERS = [*PRECISIONS, 'int8, one row', 'int4, one row']


def prepared(model, decoder, compile=False):
    """A copy of model, prepared for generation as decoder (a precision, 'int8, one row': one_row=True)."""
    precision, _, one_row = decoder.partition(', ')
    return prepare_for_generation(copy.deepcopy(model), precision, compile=compile, one_row=bool(one_row))


# (prompt ids, settings): an empty prompt (<|endoftext|> alone: one cached position at the first
# decoding step), greedy and sampled, and 150 new tokens on a 64-token context: three context restarts
REQUESTS = [([], dict(max_new_tokens=20, temperature=0)),
            ([11, 12, 13], dict(max_new_tokens=150, temperature=0.8, top_k=40, seed=1)),
            (list(range(500, 560)), dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=2))]


@pytest.fixture(scope='module')
def base():
    torch.manual_seed(0)
    return GPT(TINY_CONFIG).eval()


def fed_logits(model, tokens, compiled):
    """([logits (vocab_size,) after each of tokens[1:]], the cache): the tokens fed one at a time after a
    prompt pass of the first, through the compiled step or the eager one."""
    dtype = model.compiled_decode.cache_dtype if compiled else torch.float32  # the eager step's: float32
    cache, out = KVCache(model.config, 1, model.config.block_size, dtype=dtype), []
    with torch.inference_mode():
        model(tokens[None, :1], cache=cache)
        for i in range(1, len(tokens)):
            if compiled:
                out.append(model.compiled_decode(tokens[i:i + 1], [cache.pos], cache.k, cache.v)[0])
                cache.advance(1)
            else:
                out.append(model(tokens[None, i:i + 1], cache=cache, last_only=True)[0][0, -1])
    return out, cache


@pytest.mark.parametrize('precision', DECODERS)
def test_compiled_step_gives_the_eager_logits(base, precision):
    """The same tokens through both, one position at a time from one cached position to the end of the
    block (every cached length the graph must take, from the padded 1 to 63)."""
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (TINY_CONFIG.block_size,), generator=torch.Generator().manual_seed(0))
    eager, cache_e = fed_logits(prepared(base, precision), tokens, False)
    compiled, cache_c = fed_logits(prepared(base, precision, compile=True), tokens, True)
    assert len(compiled) == TINY_CONFIG.block_size - 1
    assert all(torch.isinf(b[GPT2_VOCAB_SIZE:]).all() and (b[GPT2_VOCAB_SIZE:] < 0).all() for b in compiled)
    worst = max((a[:GPT2_VOCAB_SIZE] - b[:GPT2_VOCAB_SIZE]).abs().max().item() for a, b in zip(eager, compiled))
    print(f'{precision}: compiled within {worst:.1e} of eager')
    assert worst <= ATOL[precision]
    # the keys and values it stored are those the eager step stored
    assert cache_c.k.dtype == (torch.float16 if 'one row' in precision else torch.float32)
    assert torch.allclose(cache_c.k.float(), cache_e.k, atol=ATOL[precision])
    assert torch.allclose(cache_c.v.float(), cache_e.v, atol=ATOL[precision])


def test_generate_ids_decodes_through_it(base, monkeypatch):
    """generate_ids with a compiled model: the eager model's tokens (float32, where the two agree to the
    last bits), every token after a prompt pass made by the compiled step."""
    eager = prepare_for_generation(copy.deepcopy(base), 'float32')
    compiled = prepare_for_generation(copy.deepcopy(base), 'float32', compile=True)
    decoder, forward = compiled.compiled_decode, compiled.forward
    step, steps, passes = decoder.compiled, [], []
    monkeypatch.setattr(decoder, 'compiled', lambda *args: steps.append(1) or step(*args))
    monkeypatch.setattr(compiled, 'forward', lambda *args, **kwargs: passes.append(1) or forward(*args, **kwargs))
    for ids, settings in REQUESTS:
        steps.clear(), passes.clear()
        assert list(generate_ids(compiled, ids, **settings)) == list(generate_ids(eager, ids, **settings))
        # the first token and the first after each context restart come from a prompt pass
        assert len(steps) + len(passes) == settings['max_new_tokens'] and 1 <= len(passes) <= 4


@pytest.mark.parametrize('decoder', ['int4, one row', 'int4'])
def test_generate_ids_makes_the_cache_its_decoder_reads(base, monkeypatch, decoder):
    """float16 for a quantized one-row step (inference.py's), float32 for a batch's: a float32 cache
    would work in the one-row step too, but read twice the bytes."""
    model = prepared(base, decoder, compile=True)
    step, dtypes = model.compiled_decode.compiled, []
    monkeypatch.setattr(model.compiled_decode, 'compiled', lambda *args: dtypes.append(args[2].dtype) or step(*args))
    assert len(list(generate_ids(model, [1, 2], max_new_tokens=5, temperature=0))) == 5
    assert dtypes == [torch.float16 if 'one row' in decoder else torch.float32] * 4


def test_each_model_keeps_to_its_own_graphs(base):
    """Decoders in one process, called in turn, each make their own model's logits: of different
    precisions (their guards skip the modules' attributes: a shared graph would run int8 kernels on
    int4 weights or the other way round), and two one-row int8 decoders of models of the same shapes but
    other weights. A one-row int8 step holds its model's weights as constants (frozen, blocked for
    inductor's GEMM template) in a package on disk, named by a digest of the weights; torch's
    compiled-graph cache, which keys such constants by their shapes alone, would hand the first
    model's graph, weights and all, to the second."""
    torch.manual_seed(1)
    other = GPT(TINY_CONFIG).eval()
    models = {'int8': base, 'int4': base, 'int8, one row': base, 'int8, one row, other weights': other}
    decoder = {name: ', '.join(name.split(', ')[:2]) for name in models}  # the name less 'other weights'
    compiled = {name: prepared(m, decoder[name], compile=True) for name, m in models.items()}
    tokens = torch.arange(5, 15)
    eager = {name: fed_logits(prepared(m, decoder[name]), tokens, False)[0][-1][:GPT2_VOCAB_SIZE]
             for name, m in models.items()}
    for a, b in (('int8', 'int4'), ('int8, one row', 'int8, one row, other weights')):  # told apart below
        assert (eager[a] - eager[b]).abs().max() > 4 * ATOL['int4']
    for _ in range(2):
        for name in models:
            last = fed_logits(compiled[name], tokens, True)[0][-1][:GPT2_VOCAB_SIZE]
            assert (last - eager[name]).abs().max() <= ATOL[decoder[name]], name


@pytest.mark.slow  # two package builds (20 s each): the slow suite
def test_a_package_is_compiled_once_and_loaded_after(base, tmp_path, monkeypatch):
    """inference.py's int8 step (a PackagedDecoder): the first decoder of a model compiles its package,
    a later one with the same weights loads it and decodes alike, a damaged package is made again, only
    the newest KEPT_PACKAGES stay, and a cache of another layout is refused: the package would read it
    with its own strides. (Other weights get a package of their own: the test above.)"""
    compiles, build = [], torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, 'aoti_compile_and_package', lambda *a, **kw: compiles.append(1) or build(*a, **kw))
    for i in range(cpu_decode.KEPT_PACKAGES):  # older packages, of other models
        (tmp_path / f'decode-{i}.pt2').write_bytes(b'')
        os.utime(tmp_path / f'decode-{i}.pt2', (i, i))

    def decoded(model=base):
        model = prepared(model, 'int8, one row', compile=True)
        model.compiled_decode.folder = str(tmp_path)
        return model, fed_logits(model, torch.arange(5, 15), True)[0]
    _, first = decoded()
    packages = sorted(tmp_path.glob('decode-*.pt2'), key=os.path.getmtime)
    assert len(compiles) == 1 and len(packages) == cpu_decode.KEPT_PACKAGES and packages[0].name == 'decode-1.pt2'
    model, again = decoded()
    assert len(compiles) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    packages[-1].write_bytes(packages[-1].read_bytes()[:1000])  # damaged
    _, remade = decoded()
    assert len(compiles) == 2 and all(torch.equal(a, b) for a, b in zip(first, remade))
    assert not list(tmp_path.glob('partial-*'))
    with torch.inference_mode():
        other = KVCache(model.config, 1, model.config.block_size + 1, dtype=torch.float16)
    with pytest.raises(ValueError, match='cache of strides'):
        model.compiled_decode(torch.tensor([1]), [3], other.k, other.v)


def test_a_warmed_up_server_compiles_nothing_more(base):
    """batching.Server warms its model's decoder up before it takes requests: after that, steps of one
    row and of several, at any cached length, run graphs already made (a compile in a request would
    stall every client for as long as the compile takes: half a minute for GPT-2 124M)."""
    from torch._dynamo.utils import counters
    model = prepare_for_generation(copy.deepcopy(base), 'int8', compile=True)
    batch = Batch(model, max_rows=4)
    batch.cache.allocate()
    model.compiled_decode.warm_up(batch.cache.k, batch.cache.v)
    batch.cache.release()
    graphs = counters['stats']['unique_graphs']
    for _ in range(2):  # the second time in a cache allocated anew, as after a server's idle release
        batch.add(Sequence([1, 2, 3], max_new_tokens=20, temperature=0.7, seed=1))
        for _ in range(5):
            batch.step()  # a prompt pass, then one row
        for ids in ([4], list(range(30, 70))):
            batch.add(Sequence(ids, max_new_tokens=10, temperature=0))
        while batch:
            batch.step()  # three rows, then fewer as they finish
        batch.cache.release()
    assert counters['stats']['unique_graphs'] == graphs


def test_cli_compile_writes_the_eager_text(tmp_path):
    """And where the compile cannot run (no working C++ compiler: inductor's CPU code is C++), one line
    says so and the text comes eagerly: no traceback. In float32, where the two steps agree to the last
    bits: inference.py's int8 step (one row) differs from the eager one by a bf16 rounding (ATOL), which
    moves a sampled token of a random model, whose likeliest tokens are all but tied."""
    tiny_checkpoint(tmp_path / 'ckpt.pt')
    args = ['--checkpoint', str(tmp_path / 'ckpt.pt'), '--prompt', 'ROMEO:', '--max-new-tokens', '40',
            '--temperature', '0.7', '--top-k', '50', '--seed', '1', '--precision', 'float32']
    eager, compiled = run_cli(*args), run_cli(*args, '--compile', env={'TORCH_LOGS': 'recompiles'})
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == eager.stdout and ', compiled' in compiled.stderr
    assert 'Recompiling' not in compiled.stderr  # the graph made before the text is the one it runs
    # a fresh compiler cache, so that nothing compiled before can stand in for the compile
    broken = run_cli(*args, '--compile', env={'CXX': str(tmp_path / 'no-such-compiler'),
                                              'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')})
    assert broken.returncode == 0 and broken.stdout == eager.stdout, broken.stderr[-2000:]
    assert '# cannot compile the decoding step (' in broken.stderr and 'Traceback' not in broken.stderr
    assert ', compiled' not in broken.stderr


@pytest.mark.slow  # three runs, one building a package with a compiler cache of its own (50 s): the slow suite
def test_cli_compiles_int8_once_per_model_and_big_models_by_default(tmp_path):
    """int8's one-row step on the command line: the first run for a model says that it compiles, and
    builds the package; a later run loads it silently and writes the same text. A model as small as
    the tests' decodes eagerly unless --compile asks; GPT-2 124M on the CPU compiles by default
    (inference.compiles_by_default: the package then starts as fast as eager, README)."""
    tiny_checkpoint(tmp_path / 'ckpt.pt')
    args = ['--checkpoint', str(tmp_path / 'ckpt.pt'), '--prompt', 'ROMEO:', '--max-new-tokens', '20', '--seed', '1']
    env = {'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')}
    packages = tmp_path / 'inductor' / 'gpt2-decode'
    eager = run_cli(*args, env=env)
    assert eager.returncode == 0 and 'int8, cpu' in eager.stderr and not packages.exists(), eager.stderr[-2000:]
    first, later = run_cli(*args, '--compile', env=env), run_cli(*args, '--compile', env=env)
    for run in (first, later):
        assert run.returncode == 0 and 'int8, compiled, cpu' in run.stderr, run.stderr[-2000:]
    assert 'compiling the decoding step for this model, once' in first.stderr
    assert 'compiling' not in later.stderr and later.stdout == first.stdout
    assert len(list(packages.glob('decode-*.pt2'))) == 1
    gpt2 = GPT(GPTConfig()).num_params()
    assert inference.compiles_by_default('cpu', 'int8', gpt2)
    assert not inference.compiles_by_default('cpu', 'int8', GPT(TINY_CONFIG).num_params())
    assert not any(inference.compiles_by_default(*other, gpt2) for other in (('cpu', 'int4'), ('cpu', 'float32'),
                                                                           ('cuda', 'float32'), ('mps', 'float32')))
