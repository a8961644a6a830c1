"""HybridLM: the reference model, readable from tokens to logits.

    tokens (B, T)
      -> embedding                                  (B, T, d_model)
      -> n_layers blocks, one per pattern symbol:
             x = x + mixer(norm(x))                 attention, Mamba-3, Mamba-2, ... (registry)
             x = x + ffn(norm(x))                   optional, per block
      -> final norm -> LM head (tied to the embedding)   (B, T, vocab_size)

The layer pattern (``"MMMAx4"``, a list, a period spec, ...) is parsed by ``hybrid.pattern`` into
one LayerSpec per block; each names its mixer and FFN by registry name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.pattern import LayerSpec, ParsedPattern, parse_pattern
from hybrid.registry import FFNS, MIXERS, NORMS, ConfigError, build_dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    pattern: Any = "AA"  # compact string, list of symbols, or a layout mapping (see hybrid.pattern)
    n_layers: int | None = None  # required by period / index-list layouts; checked against the others
    symbols: dict = field(default_factory=dict)  # letter -> {mixer: name, **kwargs}; replaces defaults per letter
    ffn: dict | None = field(default_factory=lambda: {"type": "swiglu", "mult": 4.0})
    overrides: list = field(default_factory=list)  # [{layers: [i, ...], **mixer kwargs}]
    share: list = field(default_factory=list)  # [{symbol: A, group: name}] tied blocks
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ConfigError(f"model vocab_size must be >= 2, got {self.vocab_size}")
        if self.d_model < 1:
            raise ConfigError(f"model d_model must be >= 1, got {self.d_model}")

    def parse(self) -> ParsedPattern:
        return parse_pattern(self.pattern, n_layers=self.n_layers, symbols=self.symbols, ffn=self.ffn,
                             overrides=self.overrides, share=self.share)


def model_config(cfg: Any = None, **overrides: Any) -> ModelConfig:
    """A validated ModelConfig from a pattern string, a mapping (YAML / DictConfig) or a ModelConfig."""
    if isinstance(cfg, ModelConfig):
        return replace(cfg, **overrides)
    if cfg is None:
        values: dict[str, Any] = {}
    elif isinstance(cfg, (str, list, tuple)):
        values = {"pattern": cfg}
    else:
        values = _to_plain(cfg)
    values.update(overrides)
    for key in ("symbols", "overrides", "share"):  # YAML null = none (Hydra can only replace a null node by a mapping)
        if key in values and values[key] is None:
            del values[key]
    known = {f.name for f in fields(ModelConfig)}
    return build_dataclass(ModelConfig, {k: v for k, v in values.items() if k in known or not k.startswith("_")}, "model")


def _to_plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


@dataclass
class InferenceCache:
    """Per-block decode caches of one batch of sequences (``None`` for blocks without a mixer)."""

    layers: list[Any]
    batch_size: int
    max_seqlen: int
    seqlen: int = 0  # tokens consumed so far


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) when the block has an FFN."""

    def __init__(self, spec: LayerSpec, d_model: int, norm_name: str, norm_eps: float):
        super().__init__()
        norm_entry = NORMS.get(norm_name)
        norm_cfg = norm_entry.make_config({"eps": norm_eps})
        self.spec = spec
        self.mixer = self.mixer_norm = None
        if spec.mixer is not None:
            entry = MIXERS.get(spec.mixer)
            cfg = entry.make_config(dict(spec.mixer_kwargs), where=f" (layer {spec.index}, symbol {spec.symbol})")
            self.mixer_norm = norm_entry.cls(d_model, norm_cfg)
            self.mixer = entry.cls(d_model, cfg, layer_idx=spec.index)
        self.ffn = self.ffn_norm = None
        if spec.ffn is not None:
            entry = FFNS.get(spec.ffn)
            self.ffn_norm = norm_entry.cls(d_model, norm_cfg)
            self.ffn = entry.cls(d_model, entry.make_config(dict(spec.ffn_kwargs), where=f" (layer {spec.index})"))

    def forward(self, x: torch.Tensor, cache: Any = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.mixer is not None:
            x = x + self.mixer(self.mixer_norm(x), cache=cache, seq_idx=seq_idx)
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pattern = cfg.parse()
        check_mixers(self.pattern, cfg.d_model)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks, shared = [], {}
        for spec in self.pattern.layers:
            if spec.share_group is not None and spec.share_group in shared:
                blocks.append(shared[spec.share_group])  # tied: the same module object at several depths
                continue
            block = Block(spec, cfg.d_model, cfg.norm, cfg.norm_eps)
            if spec.share_group is not None:
                shared[spec.share_group] = block
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        norm_entry = NORMS.get(cfg.norm)
        self.norm_f = norm_entry.cls(cfg.d_model, norm_entry.make_config({"eps": cfg.norm_eps}))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matmuls and embeddings; residual outputs scaled by 1/sqrt(2 n_layers)
        (GPT-2) so the residual stream's variance does not grow with depth; then each layer's own
        special inits (SSM time constants, biases) via ``reset_parameters_special``."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * max(1, len(self.blocks)))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "_is_residual_out", False) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for module in self.modules():
            if hasattr(module, "reset_parameters_special"):
                module.reset_parameters_special()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: norms, biases, and parameters flagged ``_no_weight_decay`` get no decay."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # named_parameters() de-duplicates tied weights
            if not p.requires_grad:
                continue
            exempt = p.ndim < 2 or name.endswith("bias") or getattr(p, "_no_weight_decay", False)
            (no_decay if exempt else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, cache: InferenceCache | None = None,
                seq_idx: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits; ``last_only`` keeps the last position's, (B, 1, vocab)
        (a prompt's prefill needs no others, and at 128k tokens they would be 13 GB in bf16)."""
        B, T = tokens.shape
        if cache is not None:
            if B != cache.batch_size:
                raise ValueError(f"batch of {B} sequences does not match the cache's {cache.batch_size}")
            if cache.seqlen + T > cache.max_seqlen:
                raise ValueError(f"cache was allocated for {cache.max_seqlen} tokens; {cache.seqlen} used, {T} more given")
        logits = self.logits(tokens, cache, seq_idx, last_only)  # (B, T or 1, vocab_size)
        if cache is not None:
            cache.seqlen += T
        return logits

    def logits(self, tokens: torch.Tensor, cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """The network itself, tokens to logits, without forward()'s host-side checks and ``seqlen`` count:
        a graph decoder compiles and captures this for one-token steps and keeps the count itself."""
        x = self.embed(tokens)  # (B, T, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache.layers[i] if cache is not None else None, seq_idx=seq_idx)  # (B, T, d_model)
        if last_only:
            x = x[:, -1:]  # (B, 1, d_model)
        return self.lm_head(self.norm_f(x))  # (B, T, vocab_size)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of auxiliary losses that mixers (routers) set during the last forward."""
        losses = [b.mixer.aux_loss for b in self.blocks if b.mixer is not None and b.mixer.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    # ------------------------------------------------------------------ inference
    def allocate_cache(self, batch_size: int, max_seqlen: int) -> InferenceCache:
        p = next(self.parameters())
        layers = [b.mixer.allocate_cache(batch_size, max_seqlen, device=p.device, dtype=p.dtype)
                  if b.mixer is not None else None for b in self.blocks]
        return InferenceCache(layers, batch_size, max_seqlen)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 cuda_graph: bool | None = None) -> torch.Tensor:
        """Prefill the prompt in one parallel pass, then decode one token at a time from the cache.

        ``temperature=0`` is greedy decoding; otherwise sample from softmax(logits / temperature),
        optionally restricted to the ``top_k`` most likely tokens. ``cuda_graph`` replays each decode step
        from a captured CUDA graph (default: on CUDA whenever every mixer supports it, see
        ``hybrid.decode_graph``). Returns (B, T_prompt + max_new_tokens).
        """
        from hybrid.decode_graph import GraphDecoder, unsupported_mixers

        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be a (batch, length >= 1) tensor of token ids, got shape {tuple(prompt.shape)}")
        if cuda_graph is None:
            cuda_graph = prompt.is_cuda and not unsupported_mixers(self)
        cache = self.allocate_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, cache=cache, last_only=True)[:, -1]  # (B, vocab)
        decoder = GraphDecoder(self, cache) if cuda_graph and max_new_tokens > 1 else None
        out = [prompt]
        for step in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)  # (B, 1)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = decoder.step(token) if decoder is not None else self(token, cache=cache)[:, -1]
        return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def check_mixers(pattern: ParsedPattern, d_model: int) -> None:
    """Validate every layer's mixer and FFN config at this width, before anything is built or trained."""
    for spec in pattern.layers:
        where = f" (layer {spec.index}, symbol {spec.symbol})"
        if spec.mixer is not None:
            entry = MIXERS.get(spec.mixer)
            entry.cls.validate(d_model, entry.make_config(dict(spec.mixer_kwargs), where=where))
        if spec.ffn is not None:
            FFNS.get(spec.ffn).make_config(dict(spec.ffn_kwargs), where=where)


def build_model(cfg: Any = None, **overrides: Any) -> HybridLM:
    """``build_model("MMMA", d_model=64, vocab_size=256)``, or from a config mapping / ModelConfig."""
    return HybridLM(model_config(cfg, **overrides))
