"""`python inference.py --export model.gguf`: one GGUF file, run by llama.cpp itself (built from PyPI's
llama-cpp-python, the simplest handle on it), not by a reader of our own: its tokenizer gives
tiktoken's ids, its greedy tokens are inference.py's float32 ones and its logits agree within the
tolerances measured below. And llama.cpp's own converter reads the Hugging Face export unchanged.
Without llama-cpp-python (requirements-dev.txt) or the converter (.ci/run fetches it) these tests are
skipped, except in CI."""
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from checkpoint import CheckpointError
from conftest import trained_state, ODD_TEXTS, ROOT, one_line_error, read_only, run_cli
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, bytes_to_unicode, gpt2_tokenizer
from export import export_gguf
from generation import generate_ids, load_model

gguf = pytest.importorskip('gguf')  # the format's writer; installed with the dev requirements
CONVERTER = os.environ.get('LLAMA_CPP_CONVERTER', os.path.join(ROOT, '.llama.cpp', 'convert_hf_to_gguf.py'))
PROMPT = 'First Citizen:\nBefore we proceed any further, hear me speak.\n'  # 12 tokens
# llama.cpp's logits against inference.py's float32 ones over the prompt and 20 greedy tokens of the
# trained tiny model (its whole context of 32), as a share of the largest logit, measured on this
# machine: float16 2.8e-4 (llama.cpp keeps its KV cache in float16 too), q8_0 7.0e-3
TOLERANCE = {'float16': 1e-3, 'q8_0': 2.5e-2}


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get('REQUIRE_LLAMA_CPP'):
            pytest.fail('llama-cpp-python is not installed (pip install -r requirements-dev.txt)')
        pytest.skip('llama-cpp-python is not installed (requirements-dev.txt)')
    return llama_cpp


def llama(path, n_ctx):
    """llama.cpp on path with its plain CPU kernels. Its extra buffer types (the AMX kernels on CPUs with
    AMX_INT8, and repacked weights), on by default, segfault in the first decode of this tiny model's Q8_0
    file (llama-cpp-python 0.3.36 on an Intel Xeon with AMX; llama.cpp's issue 20824 reports a crash in
    ggml_backend_amx_mul_mat), and what these tests check is our file, not those kernels. Llama() has no
    argument for it, so its default model parameters are wrapped while it loads."""
    lib = llama_cpp()
    defaults = lib.llama_cpp.llama_model_default_params

    def plain_kernels():
        params = defaults()
        params.use_extra_bufts = False
        return params
    with mock.patch.object(lib.llama_cpp, 'llama_model_default_params', plain_kernels):
        return lib.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)


def greedy(llm, ids, n):
    """llama.cpp's greedy tokens after ids, and its logits at every position: (tokens, (len, vocab)).
    ids and the n tokens must fit in the context: past it llama.cpp aborts the process (a GGML_ASSERT on
    the position table)."""
    llm.reset()
    llm.eval(ids)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1][:GPT2_VOCAB_SIZE])))
        llm.eval([tokens[-1]])
    return tokens, np.array(llm.scores[:llm.n_tokens])


@pytest.fixture(scope='module')
def exports(trained_run):
    """The trained tiny run exported through the command line, in float16 (the default) and q8_0."""
    files = {}
    for dtype in ('float16', 'q8_0'):
        path = trained_run.parent / f'model-{dtype}.gguf'
        args = [] if dtype == 'float16' else ['--export-dtype', dtype]
        r = run_cli('--checkpoint', str(trained_run), '--export', str(path), *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f'wrote {path} (') and f'{dtype} weights' in r.stdout
        files[dtype] = path
    return files


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_the_file_holds_gpt2_its_tokenizer_and_the_run(exports, trained_run):
    model = load_model(str(trained_run))[0]
    c = model.config
    kv, tensors = fields(exports['q8_0'])
    assert kv['general.architecture'] == 'gpt2' and kv['general.file_type'] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (kv['gpt2.context_length'], kv['gpt2.embedding_length'], kv['gpt2.block_count'],
            kv['gpt2.attention.head_count'], kv['gpt2.feed_forward_length']) == (
        c.block_size, c.n_embd, c.n_layer, c.n_head, 4 * c.n_embd)
    # the tokens are GPT-2's bytes in vocab.json's characters, in id order; <|endoftext|> the one control token
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    enc = gpt2_tokenizer()
    tokens = kv['tokenizer.ggml.tokens']
    assert len(tokens) == GPT2_VOCAB_SIZE and tokens[EOT_TOKEN] == '<|endoftext|>'
    assert all(bytes(byte_of[ch] for ch in tokens[i]) == enc.decode_single_token_bytes(i)
               for i in range(GPT2_VOCAB_SIZE) if i != EOT_TOKEN)
    types = kv['tokenizer.ggml.token_type']
    assert types[EOT_TOKEN] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == GPT2_VOCAB_SIZE - 1
    assert len(kv['tokenizer.ggml.merges']) == 50000 and kv['tokenizer.ggml.merges'][0] == 'Ġ t'
    assert (kv['tokenizer.ggml.model'], kv['tokenizer.ggml.pre'], kv['tokenizer.ggml.add_bos_token']) == (
        'gpt2', 'gpt-2', False)
    # the real rows only, the output layer tied to them; q8_0 for the matrices, float32 where llama.cpp wants it
    assert list(tensors['token_embd.weight'].shape) == [c.n_embd, GPT2_VOCAB_SIZE] and 'output.weight' not in tensors
    assert tensors['blk.0.attn_qkv.weight'].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert {t.tensor_type for name, t in tensors.items() if name.endswith('.bias') or 'norm' in name
            or name.startswith('position_embd')} == {gguf.GGMLQuantizationType.F32}
    assert len(tensors) == 4 + 12 * c.n_layer
    # the run's facts, as its train.log's end line gives them
    end = re.search(r'target NOT reached at step 19 \(20 steps\) \| tokens seen: (\S+) \| wall time: (\S+)s .*'
                    r'whole-text loss: (\S+) ', (trained_run / 'train.log').read_text())
    assert (kv['gpt2_shakespeare.step'], kv['gpt2_shakespeare.tokens_seen'], kv['gpt2_shakespeare.wall_time_s'],
            kv['gpt2_shakespeare.whole_text_loss']) == ('20', *end.groups())
    assert kv['gpt2_shakespeare.command'].startswith('python train.py ')


@pytest.mark.slow  # llama.cpp loads and runs two files: the slow suite, to keep the main one under 5 minutes
@pytest.mark.parametrize('dtype', ['float16', 'q8_0'])
def test_llama_cpp_runs_it_with_inference_pys_greedy_tokens(exports, trained_run, dtype):
    model = load_model(str(trained_run))[0]
    enc = gpt2_tokenizer()
    ids = enc.encode(PROMPT)
    llm = llama(exports[dtype], model.config.block_size)
    n = model.config.block_size - len(ids)  # the whole context: 12 + 20 tokens
    ours = list(generate_ids(model, ids, n, temperature=0))
    theirs, logits = greedy(llm, ids, n)
    with torch.no_grad():
        reference = model(torch.tensor([ids + ours]))[0][0, :, :GPT2_VOCAB_SIZE].numpy()
    error = np.abs(logits[:, :GPT2_VOCAB_SIZE] - reference).max() / np.abs(reference).max()
    print(f'{dtype}: logits within {error:.2e} of the largest')
    assert error < TOLERANCE[dtype]
    assert theirs == ours, (enc.decode(theirs), enc.decode(ours))
    # llama.cpp's tokenizer, read from the file, gives tiktoken's ids
    for text in [PROMPT, *ODD_TEXTS]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == enc.encode(text, allowed_special='all'), text


@pytest.mark.slow
def test_llama_cpps_converter_reads_the_hugging_face_export_unchanged(trained_run, tmp_path):
    if not os.path.isfile(CONVERTER):
        if os.environ.get('REQUIRE_LLAMA_CPP'):
            pytest.fail(f'no llama.cpp converter at {CONVERTER} (.ci/run fetches it)')
        pytest.skip(f'no llama.cpp converter at {CONVERTER} (.ci/run fetches it)')
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'hf'))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, CONVERTER, str(tmp_path / 'hf'), '--outfile', str(tmp_path / 'stock.gguf'),
                        '--outtype', 'f16'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_model(str(trained_run))[0]
    ids = gpt2_tokenizer().encode(PROMPT)
    n = model.config.block_size - len(ids)
    theirs, _ = greedy(llama(tmp_path / 'stock.gguf', model.config.block_size), ids, n)
    assert theirs == list(generate_ids(model, ids, n, temperature=0))


def test_bad_gguf_targets_are_one_line_errors_that_overwrite_nothing(exports, trained_run, tmp_path, monkeypatch):
    (tmp_path / 'notes.gguf').write_text('my notes')
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'notes.gguf'))
    one_line_error(r, re.escape(f'--export {tmp_path / "notes.gguf"}: the file exists and is not a GGUF file; '
                                f'give a new path'))
    assert (tmp_path / 'notes.gguf').read_text() == 'my notes'
    (tmp_path / 'dir.gguf').mkdir()
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'dir.gguf'))
    one_line_error(r, re.escape(f'--export {tmp_path / "dir.gguf"}: that is a folder; a GGUF export is one file'))
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'x'), '--export-dtype', 'q8_0')
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(
        '--export-dtype q8_0 is for a .gguf file; a folder takes float32 or bfloat16')
    # without the gguf package: one line that says how to get it
    (tmp_path / 'shim' / 'gguf').mkdir(parents=True)
    (tmp_path / 'shim' / 'gguf' / '__init__.py').write_text('raise ImportError("No module named gguf")\n')
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'new.gguf'),
                env={'PYTHONPATH': str(tmp_path / 'shim')})
    one_line_error(r, re.escape('--export *.gguf needs the gguf package: pip install gguf'))
    assert not (tmp_path / 'new.gguf').exists()
    # a folder that cannot be written, then a disk that fills during the write: what was there stays
    model = load_model(str(trained_run))[0]
    (tmp_path / 'locked').mkdir()
    with read_only(tmp_path / 'locked'):
        with pytest.raises(CheckpointError, match=r'cannot write the export .*locked/m.gguf \(.*\); nothing was written'):
            export_gguf(model, str(tmp_path / 'locked' / 'm.gguf'), str(trained_run), trained_state(trained_run))
    assert os.listdir(tmp_path / 'locked') == []
    previous = tmp_path / 'previous.gguf'
    previous.write_bytes(exports['q8_0'].read_bytes())

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', disk_full)
    with pytest.raises(CheckpointError, match=r'cannot write the export .*previous.gguf \(No space left on device\); '
                                              r'it is left as it was'):
        export_gguf(model, str(previous), str(trained_run), trained_state(trained_run))
    assert previous.read_bytes() == exports['q8_0'].read_bytes()
    assert sorted(os.listdir(tmp_path)) == ['dir.gguf', 'locked', 'notes.gguf', 'previous.gguf', 'shim']
