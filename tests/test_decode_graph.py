"""Static (graph-capturable) decode steps equal ordinary decoding; on a GPU, so do captured graph replays."""

from __future__ import annotations

import pytest
import torch

import hybrid
from hybrid.decode_graph import GraphDecoder, unsupported_mixers

SYMBOLS = {"W": {"mixer": "attention", "num_heads": 2, "window": 5}, "A": {"mixer": "attention", "num_heads": 4, "num_kv_heads": 2}}


def _model(pattern: str, device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = hybrid.build_model(pattern, d_model=32, vocab_size=64, symbols=SYMBOLS)
    return model.to(device=device, dtype=dtype).eval()


def _decode_both(model, prompt_len: int, steps: int, capture: bool):
    """Logits of ``steps`` decode steps, ordinary vs through a GraphDecoder, from the same prompt."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, 64, (2, prompt_len + steps), generator=gen).to(device)
    out = []
    for graph in (False, True):
        cache = model.allocate_cache(2, prompt_len + steps)
        with torch.no_grad():
            model(tokens[:, :prompt_len], cache=cache)
            decoder = GraphDecoder(model, cache, capture=capture) if graph else None
            rows = []
            for i in range(prompt_len, prompt_len + steps):
                tok = tokens[:, i:i + 1]
                rows.append((decoder.step(tok) if graph else model(tok, cache=cache)[:, -1]).clone())
        out.append(torch.stack(rows, 1))
        assert cache.seqlen == prompt_len + steps
    return out


@pytest.mark.parametrize("pattern", ["AA", "MWMA", "DMWA"])
def test_static_step_equals_ordinary_decoding(pattern):
    # W's window of 5 against 4 + 7 tokens: the ring buffer wraps during the static steps
    eager, static = _decode_both(_model(pattern), prompt_len=4, steps=7, capture=False)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)


def test_unsupported_mixers_are_named():
    model = hybrid.build_model("MK", d_model=32, vocab_size=64)
    assert unsupported_mixers(model) == ["BlockTopk"]
    cache = model.allocate_cache(1, 8)
    with pytest.raises(ValueError, match="BlockTopk"):
        GraphDecoder(model, cache, capture=False)


def test_generate_through_the_static_step_matches_ordinary_decoding():
    """generate(cuda_graph=True) off CUDA runs the static (capturable) step eagerly: same tokens."""
    model = _model("MWMA")
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    eager = model.generate(prompt, 9, cuda_graph=False)
    static = model.generate(prompt, 9, cuda_graph=True)
    assert eager.shape == (2, 14) and torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["AA", "MWMA", "DMWA"])
def test_gpu_graph_replay_equals_eager(pattern):
    model = _model(pattern, "cuda", torch.bfloat16)
    eager, graph = _decode_both(model, prompt_len=40, steps=9, capture=True)
    # bf16 logits: the static path sums over the masked ring buffer, eager over the gathered keys, so single
    # elements may differ by an ulp (0.03 at |logit| ~ 4); the whole trajectory must agree closely
    assert float((graph.float() - eager.float()).norm() / eager.float().norm()) < 1e-2
    # generate() through graphs = eagerly; in fp32, so near-tied logits cannot flip a greedy token
    model32 = _model(pattern, "cuda", torch.float32)
    prompt = torch.randint(0, 64, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(model32.generate(prompt, 8, cuda_graph=True), model32.generate(prompt, 8, cuda_graph=False))


def test_warmup_steps_are_rolled_back_exactly():
    """Capture warms up by running real steps; the snapshot must undo them, ring-buffer slots included
    (a ring's next slots still hold keys the next query sees)."""
    model = _model("MWMA")
    cache = model.allocate_cache(2, 20)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), cache=cache)  # W's window of 5 has wrapped
        decoder = GraphDecoder(model, cache, capture=False)
        before = [t.clone() for t, _ in decoder_tensors(cache)]
        snap = decoder._snapshot(3)
        for _ in range(3):
            model.logits(torch.randint(0, 64, (2, 1)), cache)
        decoder._restore(snap)
    for a, (b, _) in zip(before, decoder_tensors(cache)):
        assert torch.equal(a, b)
    assert cache.seqlen == 9 and all(c.pos == 9 for c in decoder.kv)


def decoder_tensors(cache):
    from hybrid.decode_graph import cache_tensors

    return list(cache_tensors(cache.layers))


def test_close_hands_the_cache_back_to_ordinary_decoding():
    """Static steps, close(), then ordinary steps = ordinary steps all along."""
    model = _model("MWMA")
    tokens = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(3))
    caches = [model.allocate_cache(2, 14) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(tokens[:, :6], cache=c)
        want = torch.stack([model(tokens[:, i:i + 1], cache=caches[0])[:, -1] for i in range(6, 14)], 1)
        decoder = GraphDecoder(model, caches[1], capture=False)
        got = [decoder.step(tokens[:, i:i + 1]) for i in range(6, 10)]
        decoder.close()
        got += [model(tokens[:, i:i + 1], cache=caches[1])[:, -1] for i in range(10, 14)]
    torch.testing.assert_close(torch.stack(got, 1), want, rtol=1e-5, atol=1e-5)


def test_compile_modes_are_named_and_checked():
    """``compile`` is false, true (torch.compile's default mode) or a mode that leaves capture to GraphDecoder;
    torch.compile's own CUDA-graph modes would capture inside our capture and are refused by name."""
    from hybrid.decode_graph import compile_mode

    assert compile_mode(False) is None and compile_mode(True) == "default"
    assert compile_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        compile_mode("reduce-overhead")

