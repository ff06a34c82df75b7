"""model.py: GPT-2's parameter counts, loss at init, causality, and the same logits as Hugging Face's GPT-2."""
import math

import pytest
import torch

from data import GPT2_VOCAB_SIZE
from model import GPT, GPTConfig, KVCache

SMALL = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope='module')
def gpt2_124m():
    torch.manual_seed(0)
    return GPT(GPTConfig())


def test_124m_parameter_groups(gpt2_124m, capsys):
    decay, no_decay = gpt2_124m.optim_groups(weight_decay=0.1, lr=6e-4)['adamw']
    assert (len(decay['params']), sum(p.numel() for p in decay['params'])) == (50, 124_354_560)
    assert (len(no_decay['params']), sum(p.numel() for p in no_decay['params'])) == (98, 121_344)
    assert (decay['weight_decay'], no_decay['weight_decay']) == (0.1, 0.0)
    # the tied wte / lm_head weight counts once; GPT-2 small has 124,439,808 with a 50257-row embedding
    assert gpt2_124m.num_params() == 124_475_904 == 124_439_808 + (50304 - 50257) * 768
    opt, = gpt2_124m.configure_optimizers(0.1, 6e-4, device_type='cpu')
    assert 'decayed parameter tensors: 50, with 124,354,560 parameters' in capsys.readouterr().out
    assert opt.defaults['betas'] == (0.9, 0.95) and opt.defaults['eps'] == 1e-8


def test_124m_init_scales_the_residual_projections(gpt2_124m):
    """Weights start at std 0.02, except the two projections that add to the residual stream in
    each block: 0.02 / sqrt(2 * n_layer), so the stream's variance does not grow with depth."""
    residual = 0.02 / (2 * 12) ** 0.5
    for name, p in gpt2_124m.named_parameters():
        if name.endswith('c_proj.weight'):
            assert p.std().item() == pytest.approx(residual, rel=0.02), name
        elif name.endswith(('c_attn.weight', 'c_fc.weight', 'wte.weight', 'wpe.weight')):
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name
        elif name.endswith('bias'):
            assert not p.any(), name


def test_124m_loss_at_init_is_uniform_guess(gpt2_124m):
    torch.manual_seed(1)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 128))
    with torch.no_grad():
        _, loss = gpt2_124m(idx, idx.roll(-1, dims=1))
    assert abs(loss.item() - math.log(GPT2_VOCAB_SIZE)) < 0.3  # ln(50257) = 10.825


def test_causal_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, GPT2_VOCAB_SIZE, (2, 15))
    with torch.no_grad():
        a = model(idx)[0][..., :GPT2_VOCAB_SIZE]
        b = model(changed)[0][..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-5)
    assert (a[:, 25:] - b[:, 25:]).abs().max() > 1e-2


# a float32 cache: the same sums in another order, float32 rounding (3.6e-7 here), far below what a wrong
# mask gives; a float16 one (the compiled one-row step's) adds its rounding of the keys and values (2.6e-5)
@pytest.mark.parametrize('dtype, atol', [(torch.float32, 1e-5), (torch.float16, 1e-4)])
def test_cache_fed_several_tokens_at_once_equals_the_uncached_pass(dtype, atol):
    """A KV cache filled in pieces of several tokens (a prompt pass after earlier positions, which
    needs the offset causal mask) and of one token gives the logits of one uncached pass. The first
    piece attends to its own keys and values as computed, whatever the cache keeps."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40))
    cache = KVCache(SMALL, batch_size=2, max_len=SMALL.block_size, dtype=dtype)
    with torch.no_grad():
        full = model(idx)[0]
        pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 10), (10, 25), (25, 26), (26, 40))]
    assert cache.pos == 40 and cache.k.dtype == dtype
    torch.testing.assert_close(pieces[0], full[:, :10], rtol=0, atol=1e-5)
    worst = (torch.cat(pieces, dim=1) - full)[..., :GPT2_VOCAB_SIZE].abs().max()
    print(f'{dtype}: within {worst:.1e} of the uncached pass')
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=atol)


def test_padded_vocabulary_can_never_be_sampled():
    model = GPT(SMALL).eval()
    with torch.no_grad():
        logits, loss = model(torch.zeros(1, 5, dtype=torch.long))
    assert loss is None and logits.shape == (1, 5, 50304)
    assert torch.isneginf(logits[..., GPT2_VOCAB_SIZE:]).all()
    assert torch.isfinite(logits[..., :GPT2_VOCAB_SIZE]).all()
    assert torch.softmax(logits, -1)[..., GPT2_VOCAB_SIZE:].sum() == 0


def test_same_logits_as_transformers_gpt2():
    transformers = pytest.importorskip('transformers')
    hf_config = transformers.GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_positions=SMALL.block_size, n_embd=SMALL.n_embd,
                                        n_layer=SMALL.n_layer, n_head=SMALL.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random values everywhere, biases and LayerNorms too: every tensor must map
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    # Conv1D stores (in, out): a square c_proj copied without the transpose would give other logits
    assert hf.transformer.h[0].attn.c_proj.weight.shape == (64, 64)
    model = GPT.from_hf_state_dict(hf.state_dict(), SMALL).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, SMALL.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    # the two agree to about 1e-7 (float32 rounding); GELU's exact erf form instead of GPT-2's tanh
    # approximation already differs by ~1e-5 here, so the tolerance has to be this tight
    torch.testing.assert_close(ours[..., :GPT2_VOCAB_SIZE], theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize('autocast', [False, True])
def test_the_chunked_loss_equals_cross_entropy_of_the_whole_logits(autocast):
    """On a CPU the loss never makes the (N, vocab) logits whole (model.LinearCrossEntropy): its
    loss and gradients, over several chunks and with ignored targets (-1), are those of
    F.cross_entropy on the whole logits, in float32 and in bfloat16 autocast (the same bfloat16
    logits, the softmax in float32)."""
    import torch.nn.functional as F

    from model import linear_cross_entropy
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    weight = (torch.randn(100, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 100, (37,))
    targets[[3, 20, 21]] = -1
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        ours = linear_cross_entropy(x, weight, targets, chunk=10)
        logits = x @ weight.t()
    theirs = F.cross_entropy(logits.float(), targets, ignore_index=-1)
    grads = torch.autograd.grad(ours * 3, (x, weight))  # a scaled loss scales the gradients
    expected = torch.autograd.grad(theirs * 3, (x, weight))
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs, **tol)
    for g, e in zip(grads, expected):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, **tol)
    with torch.no_grad():  # evaluation: the same loss, no gradients made
        assert linear_cross_entropy(x, weight, targets, chunk=10).item() == pytest.approx(ours.item(), rel=1e-2 if autocast else 1e-6)
