"""Registry-wide contract tests: every registered mixer, present and future, is checked here.

For each mixer: logits from prefill + token-by-token decoding equal the full forward pass; changing
future tokens never changes past outputs; packed documents (seq_idx) do not see each other.
A new mixer is covered by registering it; give it small test kwargs in SMALL if its defaults are big.
"""

import pytest
import torch

from hybrid.model import build_model
from hybrid.registry import MIXERS

D_MODEL = 32
_SSM = {"d_state": 16, "headdim": 16, "chunk_size": 4}  # backbone of the routed mixers
# Small, fast settings per mixer (defaults are used for mixers not listed).
SMALL = {
    "attention": [{"num_heads": 4, "num_kv_heads": 2}, {"num_heads": 2, "window": 3}],
    "mamba3": [{"d_state": 16, "headdim": 16, "chunk_size": 4}, {"d_state": 16, "headdim": 16, "mimo_rank": 2, "chunk_size": 4}],
    "mamba2": [{"d_state": 16, "headdim": 16, "chunk_size": 4}],
    "block_topk": [{"num_heads": 4, "num_kv_heads": 2, "block_size": 2, "topk": 2},
                   {"num_heads": 2, "block_size": 3, "topk": 1, "select": "token", "window": 2}],
    "token_router": [{"ssm": _SSM, "attn": {"num_heads": 2}, "capacity": 0.5},
                     {"ssm": _SSM, "attn": {"num_heads": 2, "window": 3}, "capacity": 0.5, "attend": "query_only"},
                     {"ssm": _SSM, "attn": {"num_heads": 2, "window": 4}, "capacity": 0.5, "routing": "topk"}],
    "chunk_gate": [{"ssm": _SSM, "attn": {"num_heads": 4, "num_kv_heads": 2}, "chunk_size": 4, "block_size": 2, "topk": 1},
                   {"ssm": _SSM, "attn": {"num_heads": 2, "window": 2}, "chunk_size": 3, "topk": 2, "select": "token"}],
    "fusion": [{"ssm": _SSM, "attn": {"num_heads": 2}}, {"ssm": _SSM, "attn": {"num_heads": 2, "window": 3}, "token_gate": True}],
}


def _cases():
    for name in MIXERS.names():
        for i, kwargs in enumerate(SMALL.get(name, [{}])):
            yield pytest.param(name, kwargs, id=f"{name}-{i}")


def _model(name, kwargs, n_layers=2):
    torch.manual_seed(0)
    model = build_model("Q" * n_layers, d_model=D_MODEL, vocab_size=50, symbols={"Q": {"mixer": name, **kwargs}})
    model = model.double().eval()
    # Random, non-trivial weights everywhere (fresh inits can hide bugs behind zeros and ones).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name,kwargs", list(_cases()))
def test_decode_equals_forward(name, kwargs):
    model = _model(name, kwargs)
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = model.allocate_cache(2, 11)
    logits = [model(tokens[:, :6], cache=cache)]  # prefill 6 (not a multiple of the chunk size)
    logits += [model(tokens[:, t:t + 1], cache=cache) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name,kwargs", list(_cases()))
def test_causality(name, kwargs):
    model = _model(name, kwargs)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 50, (2, 13), generator=g)
    b = a.clone()
    b[:, 7:] = torch.randint(0, 50, (2, 6), generator=g)
    torch.testing.assert_close(model(a)[:, :7], model(b)[:, :7], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,kwargs", list(_cases()))
def test_document_masking(name, kwargs):
    """A packed row with seq_idx gives each document the logits it gets alone."""
    model = _model(name, kwargs)
    g = torch.Generator().manual_seed(3)
    doc_a, doc_b = torch.randint(0, 50, (1, 6), generator=g), torch.randint(0, 50, (1, 7), generator=g)
    packed = torch.cat([doc_a, doc_b], 1)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7])
    out = model(packed, seq_idx=seq_idx)
    torch.testing.assert_close(out[:, :6], model(doc_a), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out[:, 6:], model(doc_b), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name,kwargs", list(_cases()))
def test_generate_runs(name, kwargs):
    model = _model(name, kwargs)
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, max_new_tokens=5)
    assert greedy.shape == (3, 9) and torch.equal(greedy[:, :4], prompt)
    # Greedy decoding through the cache equals re-running the full forward each step.
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq)
    sampled = model.generate(prompt, max_new_tokens=5, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 9)
