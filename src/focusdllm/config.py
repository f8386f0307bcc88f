"""Frozen configs: model shapes (with named presets) and the Focus-dLLM method knobs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaDA-style (OLMo keys) or Dream-style (Qwen2 keys) dLLM.

    Both are pre-norm RMSNorm + RoPE + SwiGLU transformers run bidirectionally. They differ in
    key names, GQA, q/k/v biases, RoPE precision and Dream's shifted logits.
    """

    arch: str = "llada"  # "llada" (LLaDA-8B, LLaDA-1.5, UltraLLaDA) or "dream"
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden: int = 12288
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: float = 1.0  # multiplies rope_theta (the LongLLaDA / UltraLLaDA eval knob)
    qkv_bias: bool = False
    mask_id: int = 126336
    eos_id: int = 126081
    pad_id: int = 126081
    bos_id: int | None = 126080

    def __post_init__(self):
        if self.arch not in ("llada", "dream"):
            raise ConfigError(f"unknown arch {self.arch!r}: use 'llada' or 'dream'")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("head_dim must be even for RoPE")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ConfigError(f"mask_id={self.mask_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def shift_logits(self) -> bool:
        """Dream predicts token i from the hidden state at i-1 (it was initialised from an AR model)."""
        return self.arch == "dream"

    @property
    def rope_fp32(self) -> bool:
        """LLaDA rotates q/k in fp32; Dream casts cos/sin to the model dtype first."""
        return self.arch == "llada"

    @property
    def n_params(self) -> int:
        d, f, hd = self.d_model, self.mlp_hidden, self.head_dim
        attn = d * d * 2 + 2 * d * self.n_kv_heads * hd
        return 2 * self.vocab_size * d + self.n_layers * (attn + 3 * d * f + 2 * d) + d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]

    def with_(self, **kw) -> ModelConfig:
        return replace(self, **kw)


_LLADA_8B = ModelConfig()
_DREAM_7B = ModelConfig(
    arch="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
    mlp_hidden=18944, rms_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
    mask_id=151666, eos_id=151643, pad_id=151643, bos_id=None,
)
MODEL_PRESETS: dict[str, ModelConfig] = {
    "llada-8b": _LLADA_8B,
    # Same layout as LLaDA-8B-Base; a real checkpoint's config.json supplies its rope_theta.
    "ultrallada-8b": _LLADA_8B,
    "dream-7b": _DREAM_7B,
    # Tiny shapes for tests: same numerics, small everything. Ids sit at the top of the vocab.
    "llada-tiny": ModelConfig(
        vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden=128,
        rope_theta=10000.0, mask_id=127, eos_id=126, pad_id=125, bos_id=124,
    ),
    "dream-tiny": ModelConfig(
        arch="dream", vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
        mlp_hidden=128, rms_eps=1e-6, rope_theta=10000.0, qkv_bias=True,
        mask_id=127, eos_id=126, pad_id=125, bos_id=None,
    ),
}


@dataclass(frozen=True)
class FocusConfig:
    """Knobs of Focus-dLLM's focused steps (DESIGN.md, "Focus-dLLM, as this project defines it").

    Args:
        window: odd width of the window grown around each focus position (paper Fig. 1: 3).
        extra_focus: focus positions added beyond the schedule's count for the step.
        window_past_block: let windows reach past the current block (last prompt token, first
            next-block token) as the paper figure draws it; off keeps focus == dual cache exact.
        sink_layer: the layer whose attention picks the sinks; layers <= it are dense.
            None means n_layers // 4.
        num_sinks: prompt positions kept as attention sinks in every sparse layer.
        block_size: prompt keys per selection block (equals the flex KV block).
        keep_ratio: fraction of prompt blocks kept in sparse layers, in (0, 1].
        min_blocks: lower bound on kept prompt blocks.
        per_head: pick blocks per KV head (True) or one set shared by all heads (False).
        block_score: how focus queries score a prompt block: "mean" (paper: q . mean of the block's
            keys) or "bound" (beyond the paper, Quest-style: sum_d max(q_d min_d, q_d max_d), an upper
            bound on every q . k in the block, so one strong key cannot be averaged away).
        backend: sparse attention executor: "auto", "torch" (gather + SDPA) or "flex".
        reuse_prompt_kv: beyond the paper: prefill the prompt once; later block starts refresh only
            the response region against the cached prompt K/V (DESIGN.md: the refresh dominates).
        prompt_refresh_every: with reuse, re-prefill the whole canvas every N blocks (0 = never).
        refresh_prompt_tail: with reuse, a response refresh also recomputes the last N prompt tokens (the
            ones next to the response, whose frozen K/V drift most as it fills in; 0 = none).
        prefill_keep: beyond the paper (SlimInfer-style): after `prefill_layer`, a refresh keeps
            computing only this fraction of prompt rows (by response attention); the rest keep their
            hidden state and only get K/V projections. 1.0 = off.
        prefill_layer: the layer that scores the prompt rows; None = sink_layer (or `prefill_depth`).
        prefill_depth: `prefill_layer` as a fraction of the model's depth, int(depth * n_layers), so one
            config means "half depth" on every model (0.5: layer 16 of LLaDA-8B's 32, layer 2 of focus-tiny's 4).
        prefill_sparse: beyond the paper: after `prefill_layer`, each 128-row block of prompt queries
            in a prefill attends only to this fraction of prompt key blocks (top by mean query . mean
            key), its own neighbourhood (+- `prefill_band` blocks), the sinks and every response key;
            blocks holding response rows stay dense. 1.0 = off.
        prefill_band: key blocks kept on either side of a query block's own rows.
    """

    window: int = 3
    extra_focus: int = 0
    window_past_block: bool = False
    sink_layer: int | None = None
    num_sinks: int = 16
    block_size: int = 64
    keep_ratio: float = 0.1
    min_blocks: int = 4
    per_head: bool = True
    block_score: str = "mean"
    backend: str = "auto"
    reuse_prompt_kv: bool = False
    prompt_refresh_every: int = 0
    refresh_prompt_tail: int = 0
    prefill_keep: float = 1.0
    prefill_layer: int | None = None
    prefill_depth: float | None = None
    prefill_sparse: float = 1.0
    prefill_band: int = 1

    def __post_init__(self):
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"window={self.window} must be a positive odd number (e.g. 3)")
        if self.extra_focus < 0:
            raise ConfigError(f"extra_focus={self.extra_focus} must be >= 0")
        if self.sink_layer is not None and self.sink_layer < 0:
            raise ConfigError(f"sink_layer={self.sink_layer} must be >= 0 (or None for n_layers // 4)")
        if self.num_sinks < 0:
            raise ConfigError(f"num_sinks={self.num_sinks} must be >= 0")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ConfigError(
                f"block_size={bs} must be a power of two >= 16 so it divides the flex KV block "
                "(use 64 or 128)"
            )
        if not (0.0 < self.keep_ratio <= 1.0) or math.isnan(self.keep_ratio):
            raise ConfigError(f"keep_ratio={self.keep_ratio} must be in (0, 1]")
        if self.min_blocks < 1:
            raise ConfigError(f"min_blocks={self.min_blocks} must be >= 1")
        if self.prompt_refresh_every < 0:
            raise ConfigError(f"prompt_refresh_every={self.prompt_refresh_every} must be >= 0 (0 = never)")
        if self.refresh_prompt_tail < 0:
            raise ConfigError(f"refresh_prompt_tail={self.refresh_prompt_tail} must be >= 0 (0 = none)")
        if not (0.0 < self.prefill_keep <= 1.0):
            raise ConfigError(f"prefill_keep={self.prefill_keep} must be in (0, 1] (1 = no pruning)")
        if not (0.0 < self.prefill_sparse <= 1.0):
            raise ConfigError(f"prefill_sparse={self.prefill_sparse} must be in (0, 1] (1 = dense prefill)")
        if self.prefill_band < 0:
            raise ConfigError(f"prefill_band={self.prefill_band} must be >= 0")
        if self.prefill_layer is not None and self.prefill_layer < 0:
            raise ConfigError(f"prefill_layer={self.prefill_layer} must be >= 0 (or None for sink_layer)")
        if self.prefill_depth is not None:
            if not (0.0 < self.prefill_depth < 1.0):
                raise ConfigError(f"prefill_depth={self.prefill_depth} must be in (0, 1) (0.5 = half depth)")
            if self.prefill_layer is not None:
                raise ConfigError(f"prefill_layer={self.prefill_layer} and prefill_depth={self.prefill_depth} "
                                  "both set the prefill layer; pass one of them")
        if self.block_score not in ("mean", "bound"):
            raise ConfigError(f"block_score={self.block_score!r}: use 'mean' (paper) or 'bound'")
        if self.backend not in ("auto", "torch", "flex"):
            raise ConfigError(f"backend={self.backend!r}: use 'auto', 'torch' or 'flex'")

    def resolve_sink_layer(self, n_layers: int) -> int:
        sl = n_layers // 4 if self.sink_layer is None else self.sink_layer
        if sl >= n_layers:
            raise ConfigError(
                f"sink_layer={sl} but the model has {n_layers} layers (0..{n_layers - 1}); "
                f"use sink_layer <= {n_layers - 1} (sink_layer = {n_layers - 1} disables pruning)"
            )
        return sl

    def resolve_prefill_layer(self, n_layers: int) -> int:
        """The layer after which prefill pruning / sparse prefill start: prefill_layer, else
        int(prefill_depth * n_layers), else the sink layer."""
        if self.prefill_layer is not None:
            pl, what = self.prefill_layer, f"prefill_layer={self.prefill_layer}"
        elif self.prefill_depth is not None:
            pl = int(self.prefill_depth * n_layers)
            what = f"prefill_depth={self.prefill_depth} (layer {pl})"
        else:
            return self.resolve_sink_layer(n_layers)
        if pl >= n_layers - 1:
            raise ConfigError(f"{what} leaves no later layer to prune in a {n_layers}-layer model; "
                              f"use prefill_layer <= {n_layers - 2} or prefill_depth < {(n_layers - 1) / n_layers:.3g}")
        return pl

    def n_keep_blocks(self, n_blocks: int) -> int:
        """K = max(min_blocks, ceil(keep_ratio * n_blocks)), at most n_blocks."""
        return min(n_blocks, max(self.min_blocks, math.ceil(self.keep_ratio * n_blocks - 1e-9)))

    @classmethod
    def paper(cls, **kw) -> FocusConfig:
        """The paper's method with this project's defaults where the paper is silent."""
        return cls(**kw)

    @classmethod
    def lossless(cls, **kw) -> FocusConfig:
        """Focused steps but no pruning (keep_ratio=1): isolates the query-side saving."""
        return cls(**{"keep_ratio": 1.0, **kw})

    @classmethod
    def fast(cls, **kw) -> FocusConfig:
        """Beyond the paper: prompt KV reuse across blocks (prefill once; each response refresh also
        recomputes the last 64 prompt tokens) and bound block scores. The same answers as the dual cache on the
        fidelity suite where mean-pooled scores lose 60-80 points (bench/results/fidelity_h100.json); on the
        previous weights, reuse without the tail lost a case at 8K (fidelity_h100_tail.json)."""
        return cls(**{"reuse_prompt_kv": True, "block_score": "bound", "refresh_prompt_tail": 64, **kw})

    @classmethod
    def fast_sparse(cls, **kw) -> FocusConfig:
        """`fast()` + sparse prefill over 10 % of prompt key blocks: the fastest preset; the same answers as
        `fast()` on the fidelity suite (bench/results/fidelity_h100.json; 5.1x Fast-dLLM dual at 32K on an
        H100: bench/results/e2e_h100_32k_tail.json)."""
        return cls.fast(**{"prefill_sparse": 0.1, **kw})

    @classmethod
    def aggressive(cls, **kw) -> FocusConfig:
        """Smaller budget for very long prompts (5% of blocks, 32 sinks)."""
        return cls(**{"keep_ratio": 0.05, "num_sinks": 32, **kw})

    def with_(self, **kw) -> FocusConfig:
        return replace(self, **kw)
