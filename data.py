"""
The data side of a run: the GPT-2 tokenizer (offline), a text tokenized once and cached as uint16
token ids, and the windows of block_size tokens that training walks through.

    tokens = load_tokens('input.txt')   # 338,025 ids, a read-only memmap of input.gpt2-<key>.bin
    windows = Windows(tokens, T=1024, device='cuda')
    x, y = windows.get(start, count)    # (count, T) inputs and next-token targets

Used by train.py (data), inference.py and app.py (the tokenizer), checkpoint.py (the tokenizer's files
in an export).
"""
import base64
import hashlib
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

GPT2_VOCAB_SIZE = 50257  # real tokens of the GPT-2 tokenizer; <|endoftext|> is 50256
EOT_TOKEN = 50256
EOT = '<|endoftext|>'
ON_DEVICE_BYTES = 1 << 30  # token arrays below this (as int64 inputs + targets) live on the training device


class DataError(Exception):
    """A data or tokenizer file that cannot be used; the message is one line, meant for the user."""


# ---- tokenizer ----
# The GPT-2 byte-pair ranks ship with the project (the same ranks tiktoken's 'gpt2' and 'r50k_base'
# encodings download), so tokenizing never needs the network. The hash guards against a damaged file.
TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpt2.tiktoken')
TOKENIZER_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_tokenizers = {}


def gpt2_ranks(path=TOKENIZER_PATH):
    """{token bytes: rank} from the ranks file, checked against its sha256. A token's rank is its id."""
    with open(path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
        raise ValueError(f'{path} is not the GPT-2 ranks file (sha256 mismatch); '
                         f'restore it from the repository')
    lines = (line.split() for line in data.splitlines() if line)
    return {base64.b64decode(token): int(rank) for token, rank in lines}


def gpt2_tokenizer(path=TOKENIZER_PATH):
    """The GPT-2 tokenizer as a tiktoken Encoding, built offline from the ranks file."""
    if path not in _tokenizers:
        import tiktoken
        _tokenizers[path] = tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_ranks(path),
                                              special_tokens={EOT: EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    return _tokenizers[path]


# ---- the tokenizer as Hugging Face files ----
# vocab.json and merges.txt are what OpenAI released with GPT-2 (encoder.json and vocab.bpe);
# tokenizer.json is the same tokenizer in the `tokenizers` library's format. All three are rebuilt here
# from the ranks file: nothing is downloaded.

def bytes_to_unicode():
    """{byte: the character that stands for it} in GPT-2's vocab.json and merges.txt, which hold text,
    not bytes: the 188 printable bytes of Latin-1 stand for themselves, the other 68 (control
    characters, space, ...) for U+0100 onwards in byte order. So the space byte is 'Ġ'."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def bpe_parts(token, ranks, max_rank):
    """token's bytes after byte-pair encoding with only the ranks below max_rank: merge the adjacent
    pair whose join has the lowest rank, again and again (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        joined = [ranks.get(a + b, max_rank) for a, b in zip(parts, parts[1:])]
        i = min(range(len(joined)), key=joined.__getitem__)
        if joined[i] >= max_rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def gpt2_merges(ranks):
    """The merge that makes each multi-byte token, in rank order (its order in merges.txt is its
    priority): the last merge BPE makes on the token's bytes with the ranks below the token's own.
    Each one splits the token in exactly two parts, or the ranks are not a BPE's."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f'token {rank} ({token!r}) is no merge of two lower-ranked tokens')
            merges.append(parts)
    return merges


def gpt2_vocab_and_merges(path=TOKENIZER_PATH):
    """({token text: id}, ['first second', ...] in priority order): GPT-2's vocabulary and merges as
    text, in the form that vocab.json, merges.txt and GGUF's tokenizer hold, '<|endoftext|>' included."""
    ranks = gpt2_ranks(path)
    char = bytes_to_unicode()

    def text(token):
        return ''.join(char[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = EOT_TOKEN
    return vocab, [f'{text(a)} {text(b)}' for a, b in gpt2_merges(ranks)]


def write_hf_tokenizer(out_dir, model_max_length=1024, path=TOKENIZER_PATH):
    """The GPT-2 tokenizer as transformers' AutoTokenizer and the tokenizers library load it, offline:
    vocab.json, merges.txt, tokenizer.json and tokenizer_config.json in out_dir. Its ids are
    tiktoken's; '<|endoftext|>' in a text is the special token 50256, as inference.py reads a prompt."""
    vocab, merges = gpt2_vocab_and_merges(path)
    byte_level = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': True}
    tokenizer = {
        'version': '1.0', 'truncation': None, 'padding': None,
        'added_tokens': [{'id': EOT_TOKEN, 'content': EOT, 'single_word': False, 'lstrip': False,
                          'rstrip': False, 'normalized': False, 'special': True}],
        'normalizer': None, 'pre_tokenizer': byte_level, 'post_processor': byte_level, 'decoder': byte_level,
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': '',
                  'end_of_word_suffix': '', 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                  'vocab': vocab, 'merges': merges}}
    config = {'tokenizer_class': 'GPT2Tokenizer', 'model_max_length': model_max_length,
              'bos_token': EOT, 'eos_token': EOT, 'unk_token': EOT, 'pad_token': EOT,
              'add_prefix_space': False, 'add_bos_token': False, 'errors': 'replace',
              'clean_up_tokenization_spaces': False}  # True would turn ' .' into '.' when decoding
    files = {'vocab.json': vocab, 'tokenizer.json': tokenizer, 'tokenizer_config.json': config}
    for name, obj in files.items():
        with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
            json.dump(obj, f, ensure_ascii=False, indent=2 if name == 'tokenizer_config.json' else None)
    with open(os.path.join(out_dir, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return [*files, 'merges.txt']


# ---- tokenizing a text file ----

def _safe_cut(text):
    """Index just after the last newline that has a non-space character on both sides. GPT-2's
    pre-tokenizer never joins anything across such a newline, so pieces cut there tokenize exactly
    like the whole text. Without one, the whole text (a very rare, slightly inexact cut)."""
    i = text.rfind('\n', 0, len(text) - 1)
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind('\n', 0, i)
    return i + 1 if i > 0 else len(text)


def tokenize_file(path, out_path, piece_chars=1 << 20):
    """Tokenize a UTF-8 text into a uint16 file, streamed in pieces of about piece_chars characters
    (bounded memory for any size). A BOM is dropped and Windows line ends read as '\\n'."""
    try:
        enc = gpt2_tokenizer()
    except (OSError, ValueError) as e:  # the ranks file is missing or fails its sha256 check
        raise DataError(f'cannot load the GPT-2 tokenizer: {e}') from None
    tmp = f'{out_path}.{os.getpid()}.tmp'
    try:
        with open(path, encoding='utf-8-sig') as f, open(tmp, 'wb') as out:
            rest, pieces = '', []
            while True:
                chunk = f.read(piece_chars)
                text = rest + chunk
                cut = _safe_cut(text) if chunk else len(text)
                if cut:
                    pieces.append(text[:cut])
                rest = text[cut:]
                if len(pieces) == 16 or not chunk:  # encode 16 pieces at a time on tiktoken's threads
                    for ids in enc.encode_ordinary_batch(pieces):
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                    pieces = []
                if not chunk:
                    break
        os.replace(tmp, out_path)  # atomic: a second run never sees half a cache
    except UnicodeDecodeError as e:
        raise DataError(f'data file {path} is not UTF-8 text '
                        f'(byte 0x{e.object[e.start]:02x} cannot be decoded)') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokens(path, piece_chars=1 << 20):
    """GPT-2 token ids of a text file (cached beside it as <name>.gpt2-<key>.bin, keyed by size and
    mtime, so a second run starts at once) or of a uint16 .bin file, as a read-only memmap."""
    if os.path.isdir(path):
        raise DataError(f'data file {path} is a directory; give a text file or a .bin of token ids')
    if not os.path.isfile(path):
        raise DataError(f'data file {path} not found')
    if not os.access(path, os.R_OK):
        raise DataError(f'data file {path} cannot be read (permission denied)')
    bin_path = path
    if not path.endswith('.bin'):
        st = os.stat(path)
        key = hashlib.sha1(f'{st.st_size}-{st.st_mtime_ns}'.encode()).hexdigest()[:10]
        bin_path = f'{os.path.splitext(path)[0]}.gpt2-{key}.bin'
        if not os.path.exists(bin_path):
            try:
                tokenize_file(path, bin_path, piece_chars)
            except OSError:  # a read-only folder: cache in the temp folder instead
                bin_path = os.path.join(tempfile.gettempdir(), f'{os.path.basename(path)}.{key}.gpt2.bin')
                tokenize_file(path, bin_path, piece_chars)
    size = os.path.getsize(bin_path)
    if size == 0:
        raise DataError(f'data file {path} is empty')
    if size % 2:
        raise DataError(f'{path} is not a file of uint16 token ids (odd size)')
    tokens = np.memmap(bin_path, dtype=np.uint16, mode='r')
    if bin_path == path and tokens.max() >= GPT2_VOCAB_SIZE:
        raise DataError(f'{path} holds ids >= {GPT2_VOCAB_SIZE}: not GPT-2 tokens')
    return tokens


# ---- windows ----

def load_splits(path, block_size, device, max_tokens=0, val_fraction=0.0):
    """(training Windows, validation Windows or None, a line for the log) of a data file: its first
    max_tokens tokens (0: all), the last val_fraction of them held out for validation."""
    tokens = load_tokens(path)
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_val = int(len(tokens) * val_fraction)
    splits = {'text': tokens[:len(tokens) - n_val], 'validation split': tokens[len(tokens) - n_val:]}
    for split, t in splits.items():
        if (split == 'text' or n_val) and len(t) < block_size + 1:
            raise DataError(f'the {split} of {path} has {len(t)} tokens, fewer than one sequence (block '
                            f'size {block_size} + 1); use a longer text or a smaller --block-size')
    train = Windows(splits['text'], block_size, device)
    line = f'{path}: {len(splits["text"]):,} training tokens in {train.n} windows'
    if not n_val:
        return train, None, line
    val = Windows(splits['validation split'], block_size, device)
    return train, val, line + f', {n_val:,} validation tokens'


class Windows:
    """Tokens cut into n windows: window i has inputs tokens[i*T : i*T+T] and targets one further on.
    The last window is padded (input 0, target -1, which the loss ignores), so every token but the
    first is a target exactly once. Small arrays sit on the device as two (n, T) tensors and a batch
    is one indexing op there, with no copy from the host; large ones are read from the memmap."""

    def __init__(self, tokens, T, device):
        self.T, self.device = T, device
        self.n = math.ceil((len(tokens) - 1) / T)
        self.tokens = tokens
        self.on_device = 16 * self.n * T < ON_DEVICE_BYTES
        if self.on_device:
            t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            pad = self.n * T + 1 - len(t)
            self.x = F.pad(t[:-1], (0, pad), value=0).view(self.n, T).to(device)
            self.y = F.pad(t[1:], (0, pad), value=-1).view(self.n, T).to(device)

    def targets(self, start, count):
        """How many real targets windows start .. start+count-1 hold, wrapping around: T in each, but
        fewer in the padded last one, as often as it comes round (the multiples of n in start+1 ..
        start+count are the laps that end on it)."""
        padded = self.n * self.T - (len(self.tokens) - 1)
        return count * self.T - padded * ((start + count) // self.n - start // self.n)

    def get(self, start, count, wrap=True):
        """Windows start .. start+count-1 as x, y (count, T) on the device. Past the last window they
        wrap around to the first (training), or have all targets -1 (evaluation: counted once)."""
        if self.on_device:
            idx = torch.arange(start, start + count, device=self.device)
            x, y = self.x[idx % self.n], self.y[idx % self.n]
            if not wrap:
                y = y.masked_fill((idx >= self.n)[:, None], -1)
            return x, y
        x = np.zeros((count, self.T), np.int64)
        y = np.full((count, self.T), -1, np.int64)
        for row, i in enumerate(range(start, start + count)):
            if i >= self.n and not wrap:
                break
            seg = self.tokens[(i % self.n) * self.T:(i % self.n + 1) * self.T + 1]
            x[row, :len(seg) - 1], y[row, :len(seg) - 1] = seg[:-1], seg[1:]
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.startswith('cuda'):  # pinned memory lets the copy overlap the running step
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
