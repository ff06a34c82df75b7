"""`python inference.py --export DIR`: the folder is a Hugging Face GPT-2 model repo. transformers, the
Hub's cache layout, inference.py and app.py load it with the network refused; its tokenizer gives
tiktoken's ids; its logits and greedy text are the checkpoint's; its model card tells the run. A tiny
model trained through train.py (seconds), exported once through the command line."""
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

import export
from checkpoint import CheckpointError
from conftest import trained_state, INPUT, ODD_TEXTS, one_line_error, run_cli, tiny_checkpoint
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, bytes_to_unicode, gpt2_ranks, gpt2_tokenizer
from export import export_hf
from generation import generate_ids, load_model

FILES = ['README.md', 'config.json', 'generation_config.json', 'merges.txt', 'metrics.jsonl', 'model.safetensors',
         'tokenizer.json', 'tokenizer_config.json', 'vocab.json']
# the keys of config.json in OpenAI's GPT-2 repos (openai-community/gpt2 on the Hugging Face Hub)
OPENAI_GPT2_CONFIG_KEYS = ['activation_function', 'architectures', 'attn_pdrop', 'bos_token_id', 'embd_pdrop',
                           'eos_token_id', 'initializer_range', 'layer_norm_epsilon', 'model_type', 'n_ctx', 'n_embd',
                           'n_head', 'n_layer', 'n_positions', 'resid_pdrop', 'summary_activation',
                           'summary_first_dropout', 'summary_proj_to_labels', 'summary_type', 'summary_use_proj',
                           'task_specific_params', 'vocab_size']


def PretrainedConfig_keys():
    """The keys every transformers config has, whatever the model (labels, output flags, ...)."""
    from transformers import PretrainedConfig
    return PretrainedConfig().to_dict().keys()


# transformers' logits against the checkpoint model's, measured on this machine: at most 2.4e-7 apart for
# the tiny model (logits up to 0.74), 1.9e-6 for a random 124M (up to 2.9). 1e-5 leaves room for other
# CPUs' summation orders; one matrix left untransposed puts them 0.34 apart
ATOL = 1e-5


@pytest.fixture(scope='module')
def exported(trained_run):
    r = run_cli('--checkpoint', str(trained_run), '--export', str(trained_run.parent / 'hf'))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f'wrote {trained_run.parent / "hf"}/ (') and 'float32 weights' in r.stdout
    return trained_run.parent / 'hf'


def checkpoint_model(trained_run):
    return load_model(str(trained_run))[0]


def test_the_folder_is_a_gpt2_repo_without_pickle(exported, trained_run):
    from safetensors.torch import load_file
    assert sorted(os.listdir(exported)) == FILES
    sd = load_file(exported / 'model.safetensors')  # safetensors: tensors and a JSON header, no pickle
    assert len(sd) == 4 + 2 * 12 and 'lm_head.weight' not in sd  # tied to wte
    assert sd['transformer.wte.weight'].shape == (GPT2_VOCAB_SIZE, 32)  # the 47 padded rows dropped
    assert sd['transformer.h.0.attn.c_attn.weight'].shape == (32, 96)  # Conv1D: (in, out)
    assert sd['transformer.h.1.mlp.c_proj.weight'].shape == (128, 32)
    assert all(t.dtype == torch.float32 for t in sd.values())
    ours = checkpoint_model(trained_run).state_dict()
    assert torch.equal(sd['transformer.h.1.mlp.c_fc.weight'], ours['transformer.h.1.mlp.c_fc.weight'].t())
    config = json.loads((exported / 'config.json').read_text())
    assert config['vocab_size'] == 50257 and config['architectures'] == ['GPT2LMHeadModel']
    assert (config['n_layer'], config['n_head'], config['n_embd'], config['n_positions']) == (2, 2, 32, 32)
    assert config['activation_function'] == 'gelu_new' and config['bos_token_id'] == config['eos_token_id'] == 50256
    assert config['resid_pdrop'] == config['embd_pdrop'] == config['attn_pdrop'] == 0.0
    # every key of OpenAI's own GPT-2 config.json, n_ctx among them (llama.cpp's converter reads it), and of
    # the config transformers builds from ours
    assert set(OPENAI_GPT2_CONFIG_KEYS) <= config.keys() and config['n_ctx'] == config['n_positions']
    from transformers import GPT2Config
    model_keys = GPT2Config().to_dict().keys() - PretrainedConfig_keys()
    assert model_keys <= config.keys(), model_keys - config.keys()
    generation = json.loads((exported / 'generation_config.json').read_text())
    assert generation == {'do_sample': True, 'temperature': 0.7, 'top_k': 50, 'max_new_tokens': 100,
                          'bos_token_id': 50256, 'eos_token_id': 50256, 'pad_token_id': 50256}
    assert (exported / 'metrics.jsonl').read_bytes() == (trained_run / 'metrics.jsonl').read_bytes()


def test_transformers_loads_it_offline_with_the_checkpoints_logits_and_greedy_text(exported, trained_run, no_network):
    from transformers import AutoModelForCausalLM, pipeline
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = checkpoint_model(trained_run)
    enc = gpt2_tokenizer()
    idx = torch.tensor(enc.encode(open(INPUT).read()[:2000])[:4 * 32]).view(4, 32)
    with torch.no_grad():
        expected = ours(idx)[0][..., :GPT2_VOCAB_SIZE]
        torch.testing.assert_close(hf(idx).logits, expected, rtol=0, atol=ATOL)
    for prompt in ('ROMEO:', 'First Citizen:\n', 'KING RICHARD II:\n', ' thee', '<|endoftext|>'):
        ids = enc.encode(prompt, allowed_special='all')
        n = 32 - len(ids)  # transformers' GPT-2 cannot look past n_positions: fill the context exactly
        greedy = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        assert greedy == list(generate_ids(ours, ids, n, temperature=0.0)), prompt
    text = pipeline('text-generation', model=str(exported))('ROMEO:', max_new_tokens=5)[0]['generated_text']
    assert text.startswith('ROMEO:') and len(text) > len('ROMEO:')


def test_the_tokenizer_gives_tiktokens_ids_offline(exported, no_network, tmp_path):
    """AutoTokenizer (from tokenizer.json), the classic vocab.json + merges.txt alone, and the tokenizers
    library on tokenizer.json: tiktoken's ids for the whole play and for odd texts, and back to the text.
    '<|endoftext|>' in a text is the special token 50256 (as inference.py reads a prompt)."""
    import tokenizers
    from transformers import AutoTokenizer
    classic = tmp_path / 'classic'
    classic.mkdir()
    for name in ('config.json', 'vocab.json', 'merges.txt', 'tokenizer_config.json'):
        shutil.copy(exported / name, classic / name)
    auto, from_classic = AutoTokenizer.from_pretrained(exported), AutoTokenizer.from_pretrained(classic)
    raw = tokenizers.Tokenizer.from_file(str(exported / 'tokenizer.json'))
    enc = gpt2_tokenizer()
    play = open(INPUT, encoding='utf-8').read()
    for text in [play, *ODD_TEXTS]:
        ids = enc.encode(text, allowed_special='all')
        assert auto(text)['input_ids'] == ids, text[:80]
        assert from_classic(text)['input_ids'] == ids, text[:80]
        assert raw.encode(text).ids == ids, text[:80]
        assert auto.decode(ids) == from_classic.decode(ids) == text
        assert raw.decode(ids, skip_special_tokens=False) == text
    assert len(auto(play)['input_ids']) == 338_025
    assert auto.eos_token_id == auto.bos_token_id == EOT_TOKEN and len(auto) == GPT2_VOCAB_SIZE
    # every token of the vocabulary is what BPE makes of its own bytes: none is missing its merge
    char = bytes_to_unicode()
    for token, rank in gpt2_ranks().items():
        assert [t.id for t in raw.model.tokenize(''.join(char[b] for b in token))] == [rank], token


def hub_snapshot(cache, repo_id, files):
    """files (paths) as the Hub's cache holds a downloaded repo: blobs named by their hash, a snapshot
    of links to them, refs/main naming the snapshot. Returns the snapshot folder."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo / 'snapshots' / hashlib.sha1(repo_id.encode()).hexdigest()
    for folder in (repo / 'blobs', snapshot, repo / 'refs'):
        folder.mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(snapshot.name)
    for path in files:
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, repo / 'blobs' / blob)
        os.symlink(f'../../blobs/{blob}', snapshot / path.name)
    return snapshot


def test_inference_and_the_app_load_the_folder_and_its_hub_snapshot(exported, trained_run, no_network, tmp_path,
                                                                       monkeypatch):
    """The folder, and the folder as a Hub repo downloaded before, read offline by repo id: through
    --checkpoint, $GPT2_SHAKESPEARE_MODEL and the app. And a repo that holds a model-only model.pt, offline."""
    import huggingface_hub.constants
    import app
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    snapshot = hub_snapshot(tmp_path / 'hub', 'someone/gpt2-shakespeare', sorted(exported.iterdir()))
    ours = checkpoint_model(trained_run)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 20))
    monkeypatch.setenv('GPT2_SHAKESPEARE_MODEL', 'someone/gpt2-shakespeare')
    for source in (str(exported), 'someone/gpt2-shakespeare', None):
        model, info = load_model(source)
        assert info['path'] == (str(exported) if source == str(exported) else str(snapshot))
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[0], ours(idx)[0], rtol=0, atol=ATOL)
        page = app.build_demo(source).get_config_file()
        markdown = ' '.join(str(c['props'].get('value')) for c in page['components'] if c.get('type') == 'markdown')
        assert 'Model: `' in markdown and 'No model loaded' not in markdown
        assert 'metrics.jsonl`: 20 steps' in markdown  # the Training run tab reads the repo's metrics.jsonl
    tiny_checkpoint(tmp_path / 'old' / 'model.pt', full=False)
    snapshot = hub_snapshot(tmp_path / 'hub', 'someone/old-style', [tmp_path / 'old' / 'model.pt'])
    assert load_model('someone/old-style')[1]['path'] == str(snapshot / 'model.pt')


def test_the_model_card_tells_the_run_from_its_log(exported, trained_run, tmp_path):
    card = (exported / 'README.md').read_text()
    log = (trained_run / 'train.log').read_text()
    commit = re.search(r'^git commit: (\S+)$', log, re.M).group(1)
    loss = re.search(r'whole-text loss: (\d+\.\d+) \(target', log).group(1)
    assert card.startswith('---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\n')
    assert '\nlanguage: en\ndatasets:\n- tiny_shakespeare\ntags:\n' in card
    assert f'- git commit: {commit}\n' in card and '- steps: 20 (0 to 19)\n' in card and '- tokens: 2,560\n' in card
    assert f'- whole-text loss: {loss} (target 0.099999: not reached)\n' in card
    assert '- command: `python train.py --n-layer 2 ' in card and '- device: CPU' in card
    samples = log[log.index('--- sample: '):].rstrip('\n')
    assert samples.count('--- sample: ') == 3 and f'```\n{samples}\n```' in card
    assert 'A memorizer of one text' in card and 'not a source of facts' in card
    # a model-only file with no train.log beside it: a shorter card that says so
    model = tiny_checkpoint(tmp_path / 'alone' / 'model.pt', full=False)
    export_hf(model, str(tmp_path / 'alone-hf'), str(tmp_path / 'alone' / 'model.pt'))
    card = (tmp_path / 'alone-hf' / 'README.md').read_text()
    assert 'No train.log came with the checkpoint' in card and '- steps:' not in card
    assert 'metrics.jsonl' not in os.listdir(tmp_path / 'alone-hf')


def test_bad_export_targets_are_one_line_errors_that_overwrite_nothing(exported, trained_run, tmp_path, monkeypatch):
    def listing(folder):
        return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}
    (tmp_path / 'notes.txt').write_text('my notes')
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'notes.txt'))
    one_line_error(r, re.escape(f'--export {tmp_path / "notes.txt"}: that is a file; give a folder') + '.*')
    assert (tmp_path / 'notes.txt').read_text() == 'my notes'
    shutil.copytree(exported, tmp_path / 'mine')
    (tmp_path / 'mine' / 'draft.md').write_text('a draft')  # a previous export plus someone's file
    (tmp_path / 'theirs').mkdir()  # the files of an export, but not one (a downloaded repo, say)
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(exported / name, tmp_path / 'theirs' / name)
    before = listing(tmp_path / 'mine'), listing(tmp_path / 'theirs')
    r = run_cli('--checkpoint', str(trained_run), '--export', str(tmp_path / 'mine'))
    one_line_error(r, re.escape(f'--export {tmp_path / "mine"}: the folder is neither empty nor a previous '
                                f'export (it holds draft.md); give a new or empty folder'))
    model = checkpoint_model(trained_run)
    with pytest.raises(CheckpointError, match="a previous export .its README.md is not an export's model card"):
        export_hf(model, str(tmp_path / 'theirs'), str(trained_run), trained_state(trained_run))
    assert (listing(tmp_path / 'mine'), listing(tmp_path / 'theirs')) == before
    r = run_cli('--checkpoint', str(tmp_path / 'missing'), '--export', str(tmp_path / 'out'))
    one_line_error(r, re.escape(f'{tmp_path / "missing"}: no such file or directory') + '.*')
    assert not (tmp_path / 'out').exists()
    # an empty folder, then the same folder again: a previous export is replaced whole
    (tmp_path / 'empty').mkdir()
    export_hf(model, str(tmp_path / 'empty'), str(trained_run), trained_state(trained_run))
    assert listing(tmp_path / 'empty') == listing(exported)
    (tmp_path / 'empty' / 'old-curve.png').write_bytes(b'png')  # what an earlier run's export may have had
    export_hf(model, str(tmp_path / 'empty'), str(trained_run), trained_state(trained_run))
    assert listing(tmp_path / 'empty') == listing(exported)
    # a write that fails half-way (disk full) leaves the previous export as it was, and no temporary folder
    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(export, 'write_hf_tokenizer', disk_full)
    with pytest.raises(CheckpointError, match=r'cannot write the export .*empty \(No space left on device\); '
                                              r'it is left as it was'):
        export_hf(model, str(tmp_path / 'empty'), str(trained_run), trained_state(trained_run))
    assert listing(tmp_path / 'empty') == listing(exported)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'mine', 'notes.txt', 'theirs']
