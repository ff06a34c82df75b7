"""
Generation for several sequences at once, one batch per decoding step: what a server does with the
requests of several visitors. A decoding step reads every weight once whatever the number of rows it
multiplies, so four sequences cost little more than one.

    batch = Batch(model, max_rows=8)
    a = batch.add(Sequence(ids_a, max_new_tokens=100, temperature=0.7, top_k=50, seed=1))
    b = batch.add(Sequence(ids_b, max_new_tokens=20, temperature=0))
    while batch:
        for seq, token in batch.step():   # token None: seq has finished (and left the batch)
            ...

Each sequence keeps its own prompt, position, length, sampling settings and random generator, so
its tokens are those generation.generate_ids makes for it alone, whatever its neighbours (test_batching.py
holds the two equal). Sequences join and leave between steps. A step that has a newcomer (or a
sequence whose text outgrew the context) runs that sequence's prompt pass alone, into its own row of
the cache, and the others wait for it; every other step decodes one token for every row at once.
"""
import math
import queue
import threading
import time

import torch
import torch.nn.functional as F

from data import EOT_TOKEN
from cpu_decode import compile_decoding
from generation import context_restart, sample_next
from model import KVCache


class RowsCache:
    """A KV cache whose rows stand at positions of their own: row b holds lengths[b] positions, and
    rows 0 .. n-1 are in use. A decoding step feeds one token to each of them (attend() masks every row
    to its own positions); a prompt pass fills one row through row(b), a plain KVCache over it.

    Its memory (k and v) is taken by allocate() and given back by release(), so that a server holds it
    only while it serves (for GPT-2 124M, 8 rows of 1,024 positions in float32: 604 MB). It is one
    block of the full size, not one that grows with the rows in use: the compiled decoding step is
    made for the cache's strides, and a cache of another size would compile it again."""

    def __init__(self, config, max_rows, max_len, device=None):
        hs = config.n_embd // config.n_head
        self.shape, self.device = (config.n_layer, max_rows, config.n_head, max_len, hs), device
        self.k = self.v = None
        self.lengths = [0] * max_rows
        self.n = 0

    @property
    def nbytes(self):
        return 2 * math.prod(self.shape) * torch.get_default_dtype().itemsize

    def allocate(self):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=self.device)
            self.v = torch.zeros(self.shape, device=self.device)

    def release(self):
        assert self.n == 0, 'rows in use'
        self.k = self.v = None

    @property
    def pos(self):  # the longest row: what the model checks against its block size
        return max(self.lengths[:self.n], default=0)

    def row(self, b):
        """Row b as a KVCache of batch 1 from position 0: a prompt pass writes into it; then
        lengths[b] is set to what it filled."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = self.k[:, b:b + 1], self.v[:, b:b + 1], 0
        return view

    def positions(self, T, device=None):
        assert T == 1, 'a decoding step feeds one token per row'
        self.step_lengths = torch.tensor(self.lengths[:self.n], device=device)  # (n,)
        longest = self.pos + 1
        # row b sees its positions 0 .. lengths[b] (the new one included), none of the others' beyond
        self.mask = (torch.arange(longest, device=device) <= self.step_lengths[:, None])[:, None, None, :]
        return self.step_lengths[:, None]  # (n, 1)

    def attend(self, layer, q, k, v):
        """q, k, v (n, nh, 1, hs): store each row's key and value at its own position, then attend."""
        n, nh, _, hs = k.shape
        where = self.step_lengths.view(n, 1, 1, 1).expand(n, nh, 1, hs)
        keys, values = self.k[layer, :n], self.v[layer, :n]
        keys.scatter_(2, where, k)
        values.scatter_(2, where, v)
        longest = self.mask.size(-1)
        return F.scaled_dot_product_attention(q, keys[:, :, :longest], values[:, :, :longest],
                                              attn_mask=self.mask)

    def advance(self, T):
        for b in range(self.n):
            self.lengths[b] += T

    def move(self, src, dst):
        """Row src's positions into row dst (a sequence left dst: the rows in use stay 0 .. n-1)."""
        length = self.lengths[src]
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.lengths[dst] = length


class Sequence:
    """One request: its prompt's token ids (empty: <|endoftext|>) and how to continue it, as
    generation.generate_ids takes them. tokens: what it has made so far."""

    def __init__(self, ids, max_new_tokens=100, temperature=0.7, top_k=None, top_p=None, seed=None,
                 stop_at_eot=False):
        self.ids = list(ids) or [EOT_TOKEN]
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.stop_at_eot = stop_at_eot
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.start = 0  # the context is ids[start:]; its row of the cache holds ids[start:start + length]
        self.tokens = []
        self.done = max_new_tokens <= 0


class Batch:
    """The sequences being generated together, at most max_rows of them (the rest wait their turn in
    whatever feeds add()). A model prepared by cpu_decode.prepare_for_generation, in eval mode: with its
    compiled_decode, if it has one, for the steps that decode every row."""

    def __init__(self, model, max_rows=8):
        self.model, self.max_rows = model, max_rows
        self.block_size = model.config.block_size
        self.cache = RowsCache(model.config, max_rows, self.block_size, next(model.parameters()).device)
        self.seqs = []  # seqs[b] is in row b of the cache

    def __len__(self):
        return len(self.seqs)

    def full(self):
        return len(self.seqs) >= self.max_rows

    def add(self, seq):
        """seq joins at the next step (its prompt pass). Returns seq."""
        if self.full():
            raise ValueError(f'the batch is full ({self.max_rows} sequences)')
        if not seq.done:
            seq.ids = seq.ids[-self.block_size:]  # a longer prompt keeps its end, as in generate_ids
            self.cache.allocate()
            self.cache.lengths[len(self.seqs)] = 0
            self.seqs.append(seq)
            self.cache.n = len(self.seqs)
        return seq

    def remove(self, seq):
        """seq leaves now (its client went away): its row is free for the next one."""
        b = self.seqs.index(seq)
        last = len(self.seqs) - 1
        if b != last:
            self.cache.move(last, b)
            self.seqs[b] = self.seqs[last]
        self.seqs.pop()
        self.cache.n = len(self.seqs)
        seq.done = True

    @torch.inference_mode()
    def step(self):
        """One token for each sequence: [(sequence, token), ...], and (sequence, None) for one that
        stopped at <|endoftext|> without it. Those that have finished have left the batch."""
        device = self.cache.device
        prompts = []  # rows whose context (re)starts: a prompt pass each, alone
        for b, seq in enumerate(self.seqs):
            if len(seq.ids) - seq.start > self.block_size:  # as generate_ids: go on from the last half
                seq.start = context_restart(len(seq.ids), self.block_size)
                self.cache.lengths[b] = 0
            if self.cache.lengths[b] == 0:
                prompts.append(b)
        logits = {}
        if prompts:  # the others wait for these: one step is either prompt passes or one decode
            for b in prompts:
                seq, row = self.seqs[b], self.cache.row(b)
                new = seq.ids[seq.start:]
                logits[b] = self.model(torch.tensor([new], device=device), cache=row, last_only=True)[0][0, -1]
                self.cache.lengths[b] = row.pos
        else:  # (n,) last tokens -> (n, vocab)
            n = len(self.seqs)
            last = torch.tensor([seq.ids[-1] for seq in self.seqs], device=device)
            decode = getattr(self.model, 'compiled_decode', None)
            if decode is not None:
                out = decode(last, self.cache.lengths[:n], self.cache.k, self.cache.v)
                self.cache.advance(1)
            else:
                out = self.model(last[:, None], cache=self.cache, last_only=True)[0][:, -1]
            logits = {b: out[b] for b in range(n)}
        made, finished = [], []
        for b, row_logits in logits.items():
            seq = self.seqs[b]
            token = sample_next(row_logits, seq.temperature, seq.top_k, seq.top_p, seq.generator)
            if seq.stop_at_eot and token == EOT_TOKEN:
                made.append((seq, None))
                finished.append(seq)
                continue
            seq.ids.append(token)
            seq.tokens.append(token)
            made.append((seq, token))
            if len(seq.tokens) >= seq.max_new_tokens:
                finished.append(seq)
        for seq in finished:
            self.remove(seq)
        return made


# ---- a server's loop: requests from several threads, one batch ----

class Stream:
    """What a request gets back from Server.submit: its tokens as they come (iterate it), and close()
    when its client goes away, which frees its row at the next step."""

    def __init__(self, seq):
        self.seq, self.tokens, self.closed = seq, queue.Queue(), False

    def __iter__(self):
        while True:
            token = self.tokens.get()
            if token is None:
                return
            if isinstance(token, BaseException):
                raise token
            yield token

    def close(self):
        self.closed = True


class Server:
    """One thread that runs a Batch for every request submitted from any thread: newcomers join
    between steps while there are free rows (the others wait in line), each stream gets its own
    tokens, and a closed stream's sequence leaves the batch before the next step."""

    def __init__(self, model, max_rows=4, log=print, idle_release_s=60.0):
        self.batch, self.log, self.idle_release_s = Batch(model, max_rows), log, idle_release_s
        self.compiled = hasattr(model, 'compiled_decode')
        if self.compiled:  # compile before the first request, not during it
            t0 = time.perf_counter()
            cache = self.batch.cache
            cache.allocate()
            why = compile_decoding(model, cache.k, cache.v)
            cache.release()  # a server with no requests holds no cache
            self.compiled = why is None
            log(f'batching: compiled the decoding step in {time.perf_counter() - t0:.1f} s' if self.compiled else
                f'batching: cannot compile the decoding step ({why}); decoding eagerly')
        self.waiting, self.streams = queue.Queue(), {}
        self.thread = threading.Thread(target=self.run, name='batching', daemon=True)
        self.thread.start()

    def submit(self, ids, **settings):
        stream = Stream(Sequence(ids, **settings))
        self.waiting.put(stream)
        return stream

    def run(self):
        while True:
            # between steps: a closed stream leaves, and newcomers take the free rows (block when idle)
            for stream in [s for s in self.streams.values() if s.closed]:
                self.batch.remove(stream.seq)
                self.finish(stream, f'client gone after {len(stream.seq.tokens)} tokens, row freed')
            while not self.batch.full() and (len(self.batch) == 0 or not self.waiting.empty()):
                idle = len(self.batch) == 0 and self.batch.cache.k is not None
                try:  # idle with a cache: wait idle_release_s, then give the cache back
                    stream = self.waiting.get(timeout=self.idle_release_s if idle else None)
                except queue.Empty:
                    self.batch.cache.release()
                    self.log(f'batching: idle for {self.idle_release_s:g} s, KV cache released '
                             f'({self.batch.cache.nbytes / 1e6:.0f} MB)')
                    continue
                if stream.closed:
                    stream.tokens.put(None)
                    continue
                self.batch.add(stream.seq)
                if stream.seq.done:  # nothing to make (max_new_tokens 0)
                    stream.tokens.put(None)
                    continue
                self.streams[id(stream.seq)] = stream
            try:
                made = self.batch.step()
            except Exception as e:  # a bug or out of memory: every request says so, the server lives on
                for stream in self.streams.values():
                    stream.tokens.put(e)
                self.streams.clear()
                self.batch = Batch(self.batch.model, self.batch.max_rows)
                continue
            for seq, token in made:
                stream = self.streams[id(seq)]
                if token is not None:
                    stream.tokens.put(token)
                if seq.done:
                    self.finish(stream)

    def finish(self, stream, why=None):
        del self.streams[id(stream.seq)]
        stream.tokens.put(None)
        if why:
            self.log(f'batching: {why}')
