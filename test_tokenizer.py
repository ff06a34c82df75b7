"""The offline GPT-2 tokenizer and train.py's streamed, cached tokenizing of a text file."""
import shutil

import numpy as np

from data import gpt2_tokenizer, load_tokens, tokenize_file

from conftest import INPUT


def test_input_txt_is_338025_tokens_with_no_network(no_network, tmp_path):
    data = tmp_path / 'input.txt'
    shutil.copy(INPUT, data)
    tokens = load_tokens(str(data))
    assert len(tokens) == 338_025
    assert tokens.dtype == np.uint16
    enc = gpt2_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.decode(tokens[:10].tolist()) == 'First Citizen:\nBefore we proceed any further,'
    assert enc.decode(tokens.tolist()) == open(INPUT, encoding='utf-8').read()  # lossless, all of it
    assert enc.encode_ordinary('Hello world') == [15496, 995]  # the ids of tiktoken's 'gpt2'


def test_streamed_pieces_tokenize_like_the_whole_text(tmp_path):
    text = open(INPUT, encoding='utf-8').read()[:200_000]
    src = tmp_path / 'part.txt'
    src.write_text(text, encoding='utf-8')
    out = tmp_path / 'part.bin'
    tokenize_file(str(src), str(out), piece_chars=3000)  # about 70 pieces, cut at safe newlines
    streamed = np.fromfile(out, dtype=np.uint16)
    assert streamed.tolist() == gpt2_tokenizer().encode_ordinary(text)


def test_bom_and_windows_line_ends_read_as_plain_text(tmp_path):
    text = 'ROMEO:\nBut soft, what light\n\nthrough yonder window breaks?\n' * 50
    plain, windows = tmp_path / 'plain.txt', tmp_path / 'windows.txt'
    plain.write_bytes(text.encode('utf-8'))
    windows.write_bytes(b'\xef\xbb\xbf' + text.replace('\n', '\r\n').encode('utf-8'))
    assert load_tokens(str(windows)).tolist() == load_tokens(str(plain)).tolist()


def test_cache_is_reused_and_follows_changes(tmp_path):
    data = tmp_path / 'data.txt'
    data.write_text('To be, or not to be, that is the question:\n' * 20)
    first = load_tokens(str(data))
    caches = list(tmp_path.glob('*.bin'))
    assert len(caches) == 1 and len(first) > 0
    mtime = caches[0].stat().st_mtime_ns
    again = load_tokens(str(data))  # the second run reads the cache, it does not tokenize again
    assert again.tolist() == first.tolist() and caches[0].stat().st_mtime_ns == mtime
    data.write_text('Whether tis nobler in the mind to suffer\n' * 20)
    changed = load_tokens(str(data))  # an edited text gets a new cache
    assert changed.tolist() != first.tolist()
    assert changed.tolist() == gpt2_tokenizer().encode_ordinary(data.read_text())
    # a .bin is read as token ids, through a memmap
    assert load_tokens(str(caches[0])).tolist() == first.tolist()
    assert isinstance(load_tokens(str(caches[0])), np.memmap)
    assert not list(tmp_path.glob('*.tmp'))
