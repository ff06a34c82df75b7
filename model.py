"""
GPT-2 as released by OpenAI, in plain PyTorch.

Parameter names follow GPT-2's own checkpoints (transformer.wte, transformer.h.0.attn.c_attn, ...),
so Hugging Face's GPT-2 weights load onto this model one to one and back (their Conv1D weights
transposed).
Used by train.py, inference.py and app.py. The tokenizer is in data.py.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import GPT2_VOCAB_SIZE

# Hugging Face's GPT-2 keeps these as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in)
HF_CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # 50257 padded up to a multiple of 128: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class KVCache:
    """Keys and values of every layer for the positions seen so far, so that generating one more
    token costs one position of work instead of the whole prefix."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled

    @property
    def max_len(self):
        return self.k.size(3)

    def update(self, layer, k, v):
        """Store the keys and values (B, nh, T, hs) of the next T positions of a layer; return the
        layer's keys and values of every position so far, (B, nh, pos + T, hs)."""
        B, T = k.size(0), k.size(2)
        keys, values = self.k[layer, :B], self.v[layer, :B]
        keys[:, :, self.pos:self.pos + T] = k
        values[:, :, self.pos:self.pos + T] = v
        return keys[:, :, :self.pos + T], values[:, :, :self.pos + T]

    def positions(self, T, device=None):
        """The positions of the next T tokens, (T,): the same for every row."""
        return torch.arange(self.pos, self.pos + T, dtype=torch.long, device=device)

    def attend(self, layer, q, k, v):
        """Attention of the next T positions' queries (B, nh, T, hs) over every position so far, once
        their keys and values are stored: causal among the new ones, which see every cached one."""
        p, T = self.pos, q.size(2)
        k_all, v_all = self.update(layer, k, v)
        if p == 0:  # the first call: the whole prompt, on its keys and values as computed (the cache may round them)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        k, v = k_all.to(q.dtype), v_all.to(q.dtype)
        mask = None
        if T > 1:  # row i (absolute position p + i) may look at columns 0 .. p + i
            mask = torch.ones(T, p + T, dtype=torch.bool, device=q.device).tril(diagonal=p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def advance(self, T):
        self.pos += T


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        # (B, T, 3C) -> (3, B, nh, T, hs): q, k and v, heads apart
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # generation: the cache stores k and v, and knows which positions each query sees
            y = cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)  # pre-LayerNorm: the residual stream stays clean
        x = x + self.mlp(self.ln_2(x))
        return x


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets (-1: no target), without the
    (N, vocab) logits ever made whole: a chunk of rows at a time, the forward pass computes the loss
    and both gradients, and backward only scales them. GPT.head takes it on a CPU under autocast,
    where the float32 logits, their log-softmax and its backward cost a step more than all its other
    matmuls (logs/cpu_training.md)."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk, grads):
        # x (N, C), weight (vocab, C), targets (N,); the matmuls in `dtype`, the softmax in float32;
        # grads: False when no backward will follow (evaluation)
        w = weight.to(dtype)
        valid = targets != -1
        scale = 1.0 / valid.sum().clamp(min=1)
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads else None
        for s in range(0, x.size(0), chunk):
            xc, t, v = x[s:s + chunk].to(dtype), targets[s:s + chunk].clamp(min=0)[:, None], valid[s:s + chunk]
            logits = (xc @ w.t()).float()  # (chunk, vocab)
            picked = logits.gather(1, t).squeeze(1)
            top = logits.amax(1, keepdim=True)
            p = logits.sub_(top).exp_()  # in place: softmax numerators, shifted for range
            total = p.sum(1)
            loss += ((top.squeeze(1) + total.log() - picked) * v).sum()  # log-sum-exp - target logit
            if not grads:
                continue
            # d loss / d logits = (softmax - one-hot of the target) / targets counted
            weight_row = v * scale
            p.mul_((weight_row / total)[:, None]).scatter_add_(1, t, -weight_row[:, None])
            p = p.to(dtype)
            grad_x[s:s + chunk] = p @ w
            grad_w += p.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = x.dtype, weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad).to(ctx.dtypes[0]), (grad_w * grad).to(ctx.dtypes[1]), None, None, None, None


@torch.compiler.disable  # its own loop of chunks; the compiled blocks hand it x
def linear_cross_entropy(x, weight, targets, chunk=1024):
    """The loss of LinearCrossEntropy, in autocast's dtype when autocast is on."""
    on = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets, dtype, chunk, grads)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size >= GPT2_VOCAB_SIZE, 'the GPT-2 tokenizer has 50257 tokens'
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, 'RESIDUAL_SCALE_INIT', False):
                # each block adds twice to the residual stream: keep its variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # the tied wte/lm_head weight counts once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab_size) and the mean cross-entropy loss against
        targets (B, T), or None without targets. With a KVCache, idx holds only the new positions
        and the cache advances by T. last_only: the logits of the last position only, (B, 1, vocab):
        all that sampling needs, and it skips the (T, C) x (C, vocab) matmul of a prompt's others."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f'sequence of length {start + T} is longer than block_size {self.config.block_size}')
        if cache is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            pos = cache.positions(T, idx.device)  # (T,), or (B, T) where rows stand at their own
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        return self.head(x, targets)

    def head(self, x, targets=None):
        """Final LayerNorm, logits (..., C) -> (..., vocab_size) and the loss against targets. A
        method of its own so that train.py can compile it apart from the blocks, and cpu_decode's
        step ends in it too."""
        x = self.transformer.ln_f(x)
        if targets is None:
            logits = self.lm_head(x)
            # the padded ids 50257..50303 are no tokens at all: they must never be sampled
            logits[..., GPT2_VOCAB_SIZE:] = float('-inf')
            return logits, None
        if x.device.type == 'cpu' and (torch.is_autocast_enabled('cpu') or not torch.is_grad_enabled()):
            # the (B, T, vocab) logits are never made whole: see LinearCrossEntropy. In training only
            # under autocast, where it pays most: float32 training keeps F.cross_entropy's sums to the
            # bit. An evaluation (no gradients) always: B x T x vocab float32 logits are GBs
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def optim_groups(self, weight_decay, lr, muon_lr=None):
        """The parameter groups of each optimizer, with their peak lr and weight decay, as
        {'adamw': [decayed, not decayed], 'muon': [hidden matrices]}. Every tensor of 2 or more
        dimensions (matmul weights, embeddings) decays; biases and LayerNorm gains do not. With
        muon_lr, Muon takes the 2-D weights inside the blocks (it orthogonalizes each matrix's update)
        and AdamW keeps the embeddings and the 1-D tensors."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # wte/lm_head once
        hidden = [p for n, p in params if muon_lr is not None and n.startswith('transformer.h.') and p.dim() == 2]
        adamw = [p for n, p in params if all(p is not h for h in hidden)]
        groups = {'adamw': [
            {'params': [p for p in adamw if p.dim() >= 2], 'weight_decay': weight_decay, 'lr': lr},
            {'params': [p for p in adamw if p.dim() < 2], 'weight_decay': 0.0, 'lr': lr},
        ]}
        if hidden:
            groups['muon'] = [{'params': hidden, 'weight_decay': weight_decay, 'lr': muon_lr}]
        return groups

    def configure_optimizers(self, weight_decay, lr, muon_lr=None, betas=(0.9, 0.95), eps=1e-8,
                             device_type='cpu', verbose=True):
        """[AdamW] or, with muon_lr, [AdamW, Muon] over optim_groups (Muon needs torch >= 2.9)."""
        groups = self.optim_groups(weight_decay, lr, muon_lr)
        if verbose:
            for name, g in zip(('decayed', 'non-decayed'), groups['adamw']):
                n = sum(p.numel() for p in g['params'])
                print(f'{name} parameter tensors: {len(g["params"])}, with {n:,} parameters')
        # the fused kernel does the whole update in one launch; CPU and MPS have it in recent torch
        fused_ok = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_ok and device_type in ('cuda', 'cpu', 'mps')
        try:
            adamw = torch.optim.AdamW(groups['adamw'], lr=lr, betas=betas, eps=eps, fused=use_fused)
        except RuntimeError:  # a device whose fused AdamW is missing in this torch build
            adamw = torch.optim.AdamW(groups['adamw'], lr=lr, betas=betas, eps=eps)
        if 'muon' not in groups:
            return [adamw]
        # match_rms_adamw scales Muon's orthogonal updates to AdamW's size, so AdamW's rates fit
        return [adamw, torch.optim.Muon(groups['muon'], lr=muon_lr, adjust_lr_fn='match_rms_adamw')]

    def hf_state_dict(self):
        """The weights as a Hugging Face GPT2LMHeadModel state dict, the reverse of from_hf_state_dict:
        the Conv1D weights transposed to (in, out), the embedding cut to the tokenizer's 50257 rows and
        no lm_head.weight (tied to wte: transformers ties it again when it loads)."""
        sd = {}
        for k, v in self.state_dict().items():
            if k == 'lm_head.weight':
                continue
            if k.endswith(HF_CONV1D_WEIGHTS):
                v = v.t()  # (out, in) -> (in, out)
            if k == 'transformer.wte.weight':
                v = v[:GPT2_VOCAB_SIZE]  # the padded rows are no tokens
            sd[k] = v.detach().contiguous()
        return sd

    @classmethod
    def from_hf_state_dict(cls, sd_hf, config=None):
        """A GPT-2 model from a Hugging Face GPT2LMHeadModel state dict (tensors only). Their
        attention and MLP weights are Conv1D, stored (in, out): transposed here to nn.Linear's
        (out, in). The 50257-row embedding is padded to config.vocab_size."""
        sd_hf = {k.removeprefix('transformer.') if k.startswith('transformer.') else k: v
                 for k, v in sd_hf.items()}
        if config is None:
            n_layer = 1 + max(int(k.split('.')[1]) for k in sd_hf if k.startswith('h.'))
            n_embd = sd_hf['wte.weight'].shape[1]
            config = GPTConfig(block_size=sd_hf['wpe.weight'].shape[0], n_layer=n_layer,
                               n_head=max(1, n_embd // 64), n_embd=n_embd)
        model = cls(config)
        sd = model.state_dict()
        for k in sd:
            if k == 'lm_head.weight':
                continue  # tied to wte
            name = k.removeprefix('transformer.')
            if name not in sd_hf:
                raise KeyError(f'missing tensor in the Hugging Face state dict: {name}')
            src = sd_hf[name]
            if name.endswith(HF_CONV1D_WEIGHTS):
                src = src.t()
            with torch.no_grad():
                if name == 'wte.weight':
                    sd[k][:src.shape[0]].copy_(src)
                    sd[k][src.shape[0]:].zero_()
                else:
                    if sd[k].shape != src.shape:
                        raise ValueError(f'{name}: shape {tuple(src.shape)}, expected {tuple(sd[k].shape)}')
                    sd[k].copy_(src)
        return model
