"""inference.py: loading every kind of checkpoint, sampling, the KV cache against the uncached
reference, streaming text, int8 and int4 weights and the command line. Tiny random models: seconds, no network."""
import copy
import functools
import gc
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import quantize
import runtime
import train
from conftest import INPUT, TINY_CONFIG as TINY, run_cli, tiny_checkpoint
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_tokenizer, load_tokens
from cpu_decode import prepare_for_generation
from quantize import INT4_GROUP_SIZE, Int4Linear, Int8Linear
from generation import (CheckpointError, generate, generate_ids, load_model, newest_checkpoint, resolve_source, sample_next,
                       stream_text)
from model import GPT, GPTConfig, KVCache


# ---- loading ----

def test_loads_train_checkpoint_run_dir_and_model_only_file(tmp_path):
    ref = tiny_checkpoint(tmp_path / 'run-a' / 'ckpt.pt')
    tiny_checkpoint(tmp_path / 'model.pt', full=False)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 10))
    for source in (tmp_path / 'run-a' / 'ckpt.pt', tmp_path / 'run-a', tmp_path / 'model.pt'):
        model, info = load_model(str(source))
        assert info['step'] == (None if source.name == 'model.pt' else 7)
        with torch.no_grad():
            assert torch.equal(model(idx)[0], ref(idx)[0])


def test_default_is_env_var_then_newest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('GPT2_SHAKESPEARE_MODEL', raising=False)
    with pytest.raises(CheckpointError, match='no checkpoint found: train one with `python train.py`'):
        resolve_source()
    tiny_checkpoint('logs/run-1/ckpt.pt')
    tiny_checkpoint('logs/run-2/ckpt.pt')
    os.utime('logs/run-1/ckpt.pt', (1e9, 1e9))  # run-1 is older
    assert newest_checkpoint() == os.path.join('logs', 'run-2', 'ckpt.pt')
    assert resolve_source() == os.path.join('logs', 'run-2', 'ckpt.pt')
    monkeypatch.setenv('GPT2_SHAKESPEARE_MODEL', 'logs/run-1/ckpt.pt')
    assert resolve_source() == 'logs/run-1/ckpt.pt'


def test_hugging_face_directory_matches_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / 'st')  # config.json + model.safetensors
    os.makedirs(tmp_path / 'bin')
    os.rename(tmp_path / 'st' / 'config.json', tmp_path / 'bin' / 'config.json')
    torch.save(hf.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
    os.link(tmp_path / 'bin' / 'config.json', tmp_path / 'st' / 'config.json')
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 12))
    with torch.no_grad():
        expected = hf(idx).logits
        for d in ('st', 'bin'):
            model, _ = load_model(str(tmp_path / d))
            assert model.config.block_size == 64 and model.config.n_layer == 2
            torch.testing.assert_close(model(idx)[0][..., :GPT2_VOCAB_SIZE], expected, atol=1e-4, rtol=1e-4)


def test_refuses_pickled_objects_and_bad_files(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / 'model.pt', full=False)
    torch.save({**torch.load(tmp_path / 'model.pt', weights_only=True), 'hook': Exception('code')},
               tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match='refused: it holds pickled objects other than tensors'):
        load_model(str(tmp_path / 'evil.pt'))
    (tmp_path / 'junk.pt').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='is not a readable checkpoint'):
        load_model(str(tmp_path / 'junk.pt'))
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'other.pt')
    with pytest.raises(CheckpointError, match="needs keys 'model_args' and 'model'"):
        load_model(str(tmp_path / 'other.pt'))
    with pytest.raises(CheckpointError, match='no such file or directory'):
        load_model(str(tmp_path / 'missing.pt'))
    (tmp_path / 'logs').mkdir()  # a mistyped run folder is a missing path, not a Hub repo id to try online
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match='logs/run-x: no such file or directory'):
        load_model('logs/run-x')


def test_hub_repo_id_without_network_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # read at import: set it directly
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(CheckpointError, match='someone/no-such-model: cannot download from the Hugging Face Hub'):
        load_model('someone/no-such-model')


def test_model_only_file_in_bfloat16_is_small_and_loads(tmp_path):
    ref = tiny_checkpoint(tmp_path / 'ckpt.pt')
    model, _ = load_model(str(tmp_path / 'ckpt.pt'))
    checkpoint.save_model_only(model, str(tmp_path / 'model.pt'))
    sd = torch.load(tmp_path / 'model.pt', weights_only=True)
    assert set(sd) == {'model_args', 'model'} and sd['model']['lm_head.weight'].dtype == torch.bfloat16
    assert os.path.getsize(tmp_path / 'model.pt') < 0.55 * os.path.getsize(tmp_path / 'ckpt.pt')  # bf16: half
    exported, _ = load_model(str(tmp_path / 'model.pt'))
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx)[0], ref(idx)[0], atol=0.05, rtol=0.05)


# ---- sampling and generation ----

def test_sampling_rules():
    logits = torch.randn(50304)
    logits[GPT2_VOCAB_SIZE:] = 100.0  # the padded ids, made tempting: never sampled all the same
    real_best = int(logits[:GPT2_VOCAB_SIZE].argmax())
    assert sample_next(logits, temperature=0.0) == real_best  # greedy, no division by zero
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.7, top_k=1, generator=g) == real_best
    assert sample_next(logits, 0.7, top_p=1e-6, generator=g) == real_best
    draws = [sample_next(logits, 1.0, top_k=5, generator=g) for _ in range(200)]
    assert set(draws) <= set(torch.topk(logits[:GPT2_VOCAB_SIZE], 5).indices.tolist()) and len(set(draws)) > 1
    draws = [sample_next(logits, 1.0, top_k=0, generator=g) for _ in range(50)]  # <= 0: all tokens
    assert max(draws) < GPT2_VOCAB_SIZE and len(set(draws)) > 40
    a = [sample_next(logits, 0.9, 50, 0.9, torch.Generator().manual_seed(3)) for _ in range(5)]
    b = [sample_next(logits, 0.9, 50, 0.9, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert a == b


def test_temperature_shapes_the_sampled_frequencies():
    """Three tokens with logits 0, 1, 2 among -inf ones: at temperature t they come with
    softmax([0, 1, 2] / t). 20,000 draws (fixed seed) land within 0.015 of those probabilities, about
    4 standard deviations. (A 64-entry vocabulary: the same draws as a 50,304-entry one, 6 times as
    fast.)"""
    logits = torch.full((64,), float('-inf'))
    logits[[7, 8, 9]] = torch.tensor([0.0, 1.0, 2.0])
    for t in (0.25, 1.0, 4.0):
        g = torch.Generator().manual_seed(0)
        draws = torch.tensor([sample_next(logits, t, generator=g) for _ in range(20_000)])
        freq = torch.stack([(draws == i).float().mean() for i in (7, 8, 9)])
        want = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / t, dim=0)
        torch.testing.assert_close(freq, want, rtol=0, atol=0.015)


def recorded_generation(monkeypatch, model, prompt, forced=None, **kw):
    """generate_ids with sample_next wrapped: (tokens, the logits each token was drawn from). With
    forced, the tokens are those instead of draws (the logits are still the model's own)."""
    import generation
    real, seen = generation.sample_next, []

    def sample(logits, *args):
        seen.append(logits[:GPT2_VOCAB_SIZE].clone())
        token = real(logits, *args)
        return token if forced is None else forced[len(seen) - 1]
    monkeypatch.setattr(generation, 'sample_next', sample)
    tokens = list(generate_ids(model, prompt, **kw))
    monkeypatch.setattr(generation, 'sample_next', real)
    return tokens, seen


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.0, None, None), (0.8, 40, None), (1.0, None, 0.9)])
def test_cached_generation_equals_uncached(monkeypatch, temperature, top_k, top_p):
    """The KV-cached path computes the logits of the uncached one (every position recomputed), to
    float32 rounding, along the same text; and it draws its tokens from exactly the logits it computed.
    Sampled tokens are not compared across the two paths: a random model's distribution is so flat that
    a 1e-7 difference in a logit can move a draw, which says nothing about the cache."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.randint(0, GPT2_VOCAB_SIZE, (20,)).tolist()
    # 90 new tokens after 20: the 64-token block overflows, so the context restarts twice
    kw = dict(max_new_tokens=90, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    cached, cached_logits = recorded_generation(monkeypatch, model, prompt, **kw)
    _, uncached_logits = recorded_generation(monkeypatch, model, prompt, forced=cached, use_cache=False, **kw)
    assert len(cached) == len(cached_logits) == len(uncached_logits) == 90
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(uncached_logits), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(1)  # the draws, replayed on the recorded logits with the same seed
    assert [sample_next(x, temperature, top_k, top_p, g) for x in cached_logits] == cached
    assert cached == list(generate_ids(model, prompt, **kw))  # same seed, same text


def test_prompt_longer_than_block_and_empty_prompt():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    long = torch.randint(0, GPT2_VOCAB_SIZE, (200,)).tolist()
    kw = dict(max_new_tokens=5, temperature=0.0)
    # cropped from the left: only the last 64 tokens count
    assert list(generate_ids(model, long, **kw)) == list(generate_ids(model, long[-64:], **kw))
    assert list(generate_ids(model, [], **kw)) == list(generate_ids(model, [EOT_TOKEN], **kw))
    assert len(list(generate_ids(model, [], max_new_tokens=0))) == 0


def test_stop_at_eot():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.transformer.wte.weight[EOT_TOKEN] *= 50  # tied to lm_head: EOT becomes the likeliest token
    assert list(generate_ids(model, [11], 10, temperature=0.0)) == [EOT_TOKEN] * 10
    assert list(generate_ids(model, [11], 10, temperature=0.0, stop_at_eot=True)) == []


def test_streaming_never_splits_a_character():
    enc = gpt2_tokenizer()
    text = 'ROMEO: héllo wörld, 世界 🎭🎉 — fin'
    ids = enc.encode(text)
    assert any(len(enc.decode_single_token_bytes(t).decode('utf-8', errors='ignore')) == 0 for t in ids)
    pieces = list(stream_text(iter(ids)))
    assert ''.join(pieces) == text and all('\ufffd' not in p for p in pieces)
    assert ''.join(stream_text([enc.encode('🎉')[0]])) == '\ufffd'  # an unfinished character at the end
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    out = ''.join(generate(model, 'ROMEO:', max_new_tokens=20, seed=3))
    ids = list(generate_ids(model, enc.encode('ROMEO:'), 20, seed=3))
    assert out == b''.join(enc.decode_single_token_bytes(t) for t in ids).decode('utf-8', errors='replace')


def on_the_int4_grid(out_features, in_features, group=INT4_GROUP_SIZE):
    """A weight that int4 stores exactly: per group, (q - 8) * scale + offset with q in 0..15 (0 and
    15 both present, so the group's range gives back the scale and offset) and bf16 scale and offset."""
    groups = in_features // group
    q = torch.randint(0, 16, (out_features, groups, group))
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(out_features, groups, 1) * 0.01 + 0.001).bfloat16().float()
    zero = (torch.randn(out_features, groups, 1) * 0.01).bfloat16().float()
    return ((q - 8) * scale + zero).view(out_features, in_features)


@pytest.mark.parametrize('cls', [Int8Linear, functools.partial(Int8Linear, fbgemm=True), Int4Linear],
                         ids=['int8', 'int8-fbgemm', 'int4'])
def test_quantized_linear_multiplies_its_weights(cls):
    """Weights its format stores exactly come back exactly: the output differs from float32 only by the
    rounding of the activations (int8 per row in int8's decoding, bf16 elsewhere) and of the kernel's
    output (under 1%). A wrong scale, offset or packing layout gives errors of the size of the weights
    themselves."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    with torch.no_grad():
        if cls is Int4Linear:
            linear.weight.copy_(on_the_int4_grid(384, 256))
        else:  # int8: integers times a bf16 scale per row, the row's largest exactly 127 of them
            w = torch.randint(-127, 128, (384, 256)).float()
            w[:, 0] = 127
            linear.weight.copy_(w * (torch.rand(384, 1) * 0.001).bfloat16().float())
    q = cls(linear)
    for rows in (1, 3, 40):  # decoding and, for int8, the prompt path's GEMM on the dequantized weight
        x = torch.randn(rows, 256) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different sizes
        with torch.no_grad():
            ref = linear(x) - linear.bias
            err = ((q(x) - linear.bias - ref).abs().amax(1) / ref.abs().amax(1)).max()  # each row on its own
        assert err < 0.01, (rows, err)


def test_int8_kernels_give_the_same_outputs_to_the_bit_row_by_row(monkeypatch):
    """The head's int8 decoding runs in fbgemm where torch has it, the blocks' in torch._int_mm: the
    same int32 sums times the same scales in the same order, so the same float32 outputs, and each row
    the same whatever rows share its call (a request's text must not depend on its neighbours in a
    batch). A copy of the model decodes on its own, after the original is gone. Without fbgemm (not
    x86), the head falls back to _int_mm."""
    if 'fbgemm' not in torch.backends.quantized.supported_engines:
        pytest.skip('this torch has no fbgemm')
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 640)
    plain, fbgemm = Int8Linear(linear), Int8Linear(linear, fbgemm=True)
    assert plain.fbgemm_weight is None and fbgemm.fbgemm_weight is not None
    x = torch.randn(32, 768) * torch.logspace(-3, 3, 32)[:, None]
    with torch.inference_mode():
        for rows in (1, 3, 32):
            assert torch.equal(fbgemm(x[:rows]), plain(x[:rows])), rows
        together = fbgemm(x)
        assert all(torch.equal(fbgemm(x[i:i + 1])[0], together[i]) for i in range(32))
        copied = copy.deepcopy(fbgemm)
        del fbgemm
        gc.collect()
        assert torch.equal(copied(x), together)
    monkeypatch.setattr(type(torch.backends.quantized), 'supported_engines', ['qnnpack'])
    fallback = Int8Linear(linear, fbgemm=True)
    assert fallback.fbgemm_weight is None
    with torch.inference_mode():
        assert torch.equal(fallback(x), together)


def huge_page_kb(env):
    """AnonHugePages (kB) of a fresh process that imports inference, as `python inference.py` and app.py
    do, and then allocates 64 MB; its environment must be as it was given (what its children inherit)."""
    code = ('import inference, os, torch; x = torch.ones(64 << 20, dtype=torch.int8); '
            f'assert os.environ.get("THP_MEM_ALLOC_ENABLE") == {env.get("THP_MEM_ALLOC_ENABLE")!r}; '
            'print(next(l.split()[1] for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")))')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return int(out.stdout)


def test_a_generation_process_puts_its_big_tensors_in_huge_pages():
    """cpu_decode sets THP_MEM_ALLOC_ENABLE for torch's first allocation, so the weights of a
    generation process sit in transparent huge pages wherever the kernel offers them on request
    (madvise), and takes it back (its children do not inherit it); THP_MEM_ALLOC_ENABLE=0 set
    beforehand keeps 4 KB pages."""
    try:
        mode = open('/sys/kernel/mm/transparent_hugepage/enabled').read()
    except OSError:
        pytest.skip('no transparent huge pages here (not Linux)')
    if '[madvise]' not in mode:
        pytest.skip(f'transparent huge pages are {mode.strip()!r} here, not on request')
    env = {k: v for k, v in os.environ.items() if k != 'THP_MEM_ALLOC_ENABLE'}
    assert huge_page_kb(env) >= 60 * 1024
    assert huge_page_kb({**env, 'THP_MEM_ALLOC_ENABLE': '0'}) == 0


def rows_of_many_ranges(out_features, in_features):
    """A weight whose rows and groups span very different ranges, some of them off zero."""
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * torch.rand(out_features, 1) * 0.1
    return w + (torch.rand(out_features, 1) < 0.25) * 0.05  # a quarter of the rows shifted


BF16_ROUNDING = 2 ** -8  # rounding to bfloat16 (8 significant bits) moves a number by at most this share of it


def test_every_int8_weight_is_within_half_a_step_of_the_float_one():
    """Int8 stores w as q * s with one scale s per row, s = (the row's largest |w|) / 127 rounded to bf16.
    Each weight comes back within half a step, s / 2; a weight that rounding s down pushed past 127
    steps is clamped there, and misses by what is past."""
    linear = torch.nn.Linear(768, 384)
    with torch.no_grad():
        linear.weight.copy_(rows_of_many_ranges(384, 768))
    w = linear.weight.detach()
    int8 = Int8Linear(linear)
    exact = w.abs().amax(1) / 127
    s = int8.scale.float()
    assert int8.weight.dtype == torch.int8 and ((s - exact).abs() <= BF16_ROUNDING * exact).all()
    error = (int8.weight.float() * s[:, None] - w).abs()
    bound = s[:, None] / 2 + (w.abs() - 127 * s[:, None]).clamp(min=0)
    assert (error <= bound * (1 + 1e-6)).all(), (error / bound).max()
    assert (error > 0.45 * s[:, None]).any()  # a real test of the bound: some weights come near it


def stored_int4_codes(int4):
    """The 4-bit codes (out, in) that an Int4Linear holds, read back through torch's own kernel: with a
    scale of 1 and an offset of 8 per group, the identity matrix times the weight gives the codes exactly."""
    ones = torch.ones_like(int4.scale_zero[..., 0])
    unit = torch.stack([ones, 8 * ones], dim=2)
    eye = torch.eye(int4.in_features, dtype=torch.bfloat16)
    codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, int4.weight, int4.group_size, unit).float()
    return codes.T  # (in, out) -> (out, in)


def test_every_int4_weight_is_within_half_a_step_of_the_float_one():
    """Int4 stores w as (q - 8) * s + z with q in 0..15 and, per group of 32 inputs of a row, the step
    s = (max - min) / 15 rounded to bf16 and the offset z = min + 8 s rounded to bf16. Each weight comes
    back within half a step of it; one that the roundings left outside the group's 16 levels misses by
    what is outside."""
    linear = torch.nn.Linear(256, 384)
    with torch.no_grad():
        linear.weight.copy_(rows_of_many_ranges(384, 256))
    int4 = Int4Linear(linear)
    g = int4.group_size
    w = linear.weight.detach().view(384, 256 // g, g)  # (out, groups, g)
    lo, hi = w.amin(2), w.amax(2)
    s, z = int4.scale_zero.float().transpose(0, 1).unbind(2)  # (groups, out, 2) -> (out, groups) each
    exact = (hi - lo) / 15
    assert ((s - exact).abs() <= BF16_ROUNDING * exact).all()
    assert ((z - (lo + 8 * s)).abs() <= BF16_ROUNDING * (lo + 8 * s).abs()).all()
    q = stored_int4_codes(int4).view(384, 256 // g, g)
    assert ((q >= 0) & (q <= 15) & (q == q.round())).all()
    s, z = s[..., None], z[..., None]
    error = ((q - 8) * s + z - w).abs()
    outside = torch.maximum(z - 8 * s - w, w - (z + 7 * s)).clamp(min=0)
    bound = s / 2 + outside
    assert (error <= bound * (1 + 1e-5)).all(), (error / bound).max()
    assert (error > 0.45 * s).any()


@pytest.mark.parametrize('precision, tolerance', [('int8', 0.05), ('int4', 0.25)])
def test_quantized_model_stays_close_to_float32_and_never_samples_a_padded_id(precision, tolerance):
    torch.manual_seed(0)
    fp32 = GPT(TINY).eval()
    with torch.no_grad():  # the padded ids made tempting: their logits would be the largest
        fp32.transformer.wte.weight[GPT2_VOCAB_SIZE:] = torch.randn(TINY.vocab_size - GPT2_VOCAB_SIZE, TINY.n_embd)
    quantized = prepare_for_generation(copy.deepcopy(fp32), precision)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 40))
    with torch.no_grad():
        a, b = fp32(idx)[0][0, -1], quantized(idx)[0][0, -1]
        c = quantized(idx, last_only=True)[0][0, -1]
    assert torch.isneginf(b[GPT2_VOCAB_SIZE:]).all()
    a, b, c = a[:GPT2_VOCAB_SIZE], b[:GPT2_VOCAB_SIZE], c[:GPT2_VOCAB_SIZE]
    assert (a - b).abs().max() < tolerance * a.abs().max()
    # the last position alone (the decode kernel; int8's 40 rows took the prompt GEMM): bf16 rounding apart
    torch.testing.assert_close(c, b, rtol=0, atol=0.01 * a.abs().max().item())
    ids = list(generate_ids(quantized, idx[0].tolist(), 30, temperature=2.0, seed=0))
    assert len(ids) == 30 and max(ids) < GPT2_VOCAB_SIZE


# What int8 and int4 cost on the walk-through model, as docs/cpu-generation.md's table gives it
# (bench_inference.py at 13da4ab): (top-1 agreement with float32, mean KL from float32) over the 1,024
# targets of its text; and int8 along the decode path, whose activations are int8 too, eagerly and
# through a batch's compiled step, and through inference.py's, one row at a time
# (prepare_for_generation(..., one_row=True): bf16 activations in inductor's GEMM template, a float16
# KV cache). The walk-through model is not the same on every CPU: float sums round differently in their
# last bits and the run goes another way (README says so), so the figures are kept for each run that a
# CPU of this project trains, named by its end (steps, whole-text loss), as RunState.end records it.
QUALITY = {
    # 2-core AMD EPYC (Zen 4): the table's figures
    (236, '0.094773'): {'int8': (0.9941, 1.5e-4), 'int4': (0.9844, 5.7e-3), 'int8, decoding, eager': (0.9971, 3.2e-4),
                        'int8, decoding, compiled': (0.9971, 3.2e-4), 'int8, decoding, one row': (0.9971, 9.6e-5)},
    # 2-core Intel Xeon with AMX (logs/cpu-walkthrough-xeon), measured by this test at 2c90a7a
    (196, '0.090313'): {'int8': (0.9980, 1.41e-4), 'int4': (0.9902, 5.20e-3), 'int8, decoding, eager': (0.9990, 1.90e-4),
                        'int8, decoding, compiled': (0.9990, 1.90e-4), 'int8, decoding, one row': (0.9980, 7.12e-5)},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_int8_and_int4_cost_what_readme_says_on_the_walkthrough_model(tmp_path, monkeypatch):
    """README's walk-through trained anew (about two minutes), then each precision judged position by
    position against float32 on the text it learnt, one window at a time. On a CPU of QUALITY it gives
    that run's figures to the digit: the margins allow one position of the 1,024 more or less, and a KL
    20% off. A long prompt's int8 matmul runs in bf16, as the figures were measured (quantize.py times
    bf16 against float32 once per process, and a loaded machine can pick float32: 99.71% and 4.6e-5)."""
    monkeypatch.setattr(quantize, 'prompt_matmul_dtype', lambda: torch.bfloat16)
    shutil.copy(INPUT, tmp_path / 'input.txt')  # its token cache lands there
    # compiled or not is train.py's choice by a timing (a loaded machine compiles): pinned, as the runs
    # behind the figures were made, so that the run depends on the CPU alone
    argv = shlex.split(runtime.WALKTHROUGH)[2:] + ['--data', str(tmp_path / 'input.txt'), '--samples', '0',
                                                   '--no-compile', '--out-dir', str(tmp_path / 'walk')]
    assert train.main(argv) == 0
    fp32, info = load_model(str(tmp_path / 'walk'))
    tokens = torch.from_numpy(load_tokens(str(tmp_path / 'input.txt'))[:1025].astype('int64'))
    T = fp32.config.block_size

    def log_probs(model):  # (1024 positions, the real vocabulary)
        with torch.no_grad():
            return torch.cat([F.log_softmax(model(tokens[i:i + T][None])[0][0, :, :GPT2_VOCAB_SIZE], -1)
                              for i in range(0, 1024, T)])
    def decoded_log_probs(model):  # the same, one position at a time through the KV cache: the decode path
        out, decode = [], getattr(model, 'compiled_decode', None)  # the compiled step, where it has one
        with torch.no_grad():
            for i in range(0, 1024, T):
                cache = KVCache(model.config, 1, T, dtype=decode.cache_dtype if decode is not None else torch.float32)
                for j in range(i, i + T):
                    if decode is not None and cache.pos > 0:
                        logits = decode(tokens[j:j + 1], [cache.pos], cache.k, cache.v)[0]
                        cache.advance(1)
                    else:
                        logits = model(tokens[j:j + 1][None], cache=cache, last_only=True)[0][0, -1]
                    out.append(F.log_softmax(logits[:GPT2_VOCAB_SIZE], -1))
        return torch.stack(out)
    base, got = log_probs(fp32), {}
    for path in ('eager', 'compiled', 'one row'):  # int8 decoding quantizes the activations too: apart
        prepared = prepare_for_generation(copy.deepcopy(fp32), 'int8', compile=path != 'eager', one_row=path == 'one row')
        got[f'int8, decoding, {path}'] = decoded_log_probs(prepared)
    for precision in ('int8', 'int4'):
        got[precision] = log_probs(prepare_for_generation(copy.deepcopy(fp32), precision))
    for name, lp in got.items():  # (top-1 agreement, KL(float32 || precision))
        got[name] = ((lp.argmax(-1) == base.argmax(-1)).double().mean().item(),
                     (base.exp() * (base - lp)).sum(-1).mean().item())
        print(f'{name}: top-1 agreement {got[name][0]:.2%}, KL {got[name][1]:.2e}')
    end = (info['run'].step, f"{info['run'].end['whole_loss']:.6f}")
    assert end in QUALITY, (f'this CPU trained another walk-through model (steps, whole-text loss: {end}): '
                            f'add its figures, printed above, to QUALITY')
    for name, (agreement, kl) in QUALITY[end].items():
        agree, divergence = got[name]
        assert abs(agree - agreement) <= 0.0011 and abs(divergence - kl) <= 0.2 * kl, (name, agree, divergence)


# ---- command line ----

def test_cli_streams_reproducible_text_and_rejects_bad_input(tmp_path):
    tiny_checkpoint(tmp_path / 'ckpt.pt')
    args = ['--checkpoint', str(tmp_path / 'ckpt.pt'), '--prompt', 'ROMEO:', '--max-new-tokens', '12',
            '--temperature', '0.7', '--top-k', '50', '--seed', '1']
    a, b = run_cli(*args), run_cli(*args, '--precision', 'float32')
    assert a.returncode == 0 and a.stdout.startswith('ROMEO:') and len(a.stdout) > len('ROMEO:') + 5
    assert a.stdout == run_cli(*args).stdout and b.returncode == 0
    c = run_cli(*args, '--precision', 'int4')
    assert c.returncode == 0 and c.stdout.startswith('ROMEO:') and ', int4, cpu' in c.stderr
    # a width that int4's groups of 32 do not divide: one line, not a traceback
    checkpoint.save_model_only(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=48)),
                               str(tmp_path / 'odd.pt'), torch.float32)
    odd = run_cli('--checkpoint', str(tmp_path / 'odd.pt'), '--precision', 'int4')
    assert odd.returncode == 1 and odd.stderr == 'error: int4: 48 inputs do not split into groups of 32\n'
    bad = run_cli('--checkpoint', str(tmp_path / 'ckpt.pt'), '--max-new-tokens', '-1')
    assert bad.returncode == 2 and '--max-new-tokens must be >= 0' in bad.stderr and 'Traceback' not in bad.stderr
    missing = run_cli(env={'GPT2_SHAKESPEARE_MODEL': str(tmp_path / 'nope.pt')})
    assert missing.returncode == 1 and missing.stderr.startswith('error: ') and 'Traceback' not in missing.stderr
    assert missing.stderr.count('\n') == 1


def test_cli_help_and_export(tmp_path):
    help_text = run_cli('--help').stdout
    for option in ('--checkpoint', '--prompt', '--max-new-tokens', '--temperature', '--top-k', '--top-p', '--seed',
                   '--stop-at-eot', '--precision', '--export', 'GPT2_SHAKESPEARE_MODEL'):
        assert option in help_text
    ref = tiny_checkpoint(tmp_path / 'ckpt.pt')
    r = run_cli('--checkpoint', str(tmp_path / 'ckpt.pt'), '--export', str(tmp_path / 'export'))
    assert r.returncode == 0 and r.stdout.startswith(f'wrote {tmp_path / "export"}/ (') and 'float32' in r.stdout
    model, info = load_model(str(tmp_path / 'export'))  # a Hugging Face folder (test_export.py has the rest)
    assert info['path'] == str(tmp_path / 'export')
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref(idx)[0], rtol=0, atol=1e-5)
