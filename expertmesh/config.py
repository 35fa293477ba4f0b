"""What a run is: the model (`ModelConfig`, with presets) and the work it does (`Workload`).

Both are frozen dataclasses validated on construction. Every error is a `ValueError` whose one-line
message names the field and says what would fit, so the CLI can print it as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPERT_KINDS = ("mlp", "swiglu")
OVERFLOW_POLICIES = ("drop", "reroute")
ROUTER_KINDS = ("softmax", "sigmoid_grouped", "softmax_grouped")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_dtype(name: str) -> torch.dtype:
    """`"fp32"` or `"bf16"` to a torch dtype (fp16 is left out: its CPU matmul is unusably slow)."""
    _check(name in DTYPES, f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Capacity:
    """Expert capacity of a model (opt-in): each expert takes at most `factor` x its fair share of
    a capacity group's assignments; the rest are dropped or rerouted, as `policy` says. What that
    means for a batch, and the function that applies it, are in `model/capacity.py`."""

    factor: float
    policy: str = "drop"

    def __post_init__(self) -> None:
        _check(self.factor > 0, f"capacity factor {self.factor} must be > 0 (omit it for no capacity)")
        _check(self.policy in OVERFLOW_POLICIES,
               f"overflow policy {self.policy!r}; use one of: {', '.join(OVERFLOW_POLICIES)}")


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (DeepSeek-V3's `rope_scaling`, type yarn): the frequencies of RoPE's
    slow dimensions divided by `factor`, blended into the fast ones between the dimensions that
    turn `beta_slow` and `beta_fast` times over `original_max` positions; cos / sin scaled by
    `attention_factor` (None: from `mscale` / `mscale_all_dim`), the softmax scale by
    mscale(factor, mscale_all_dim)^2. `model/mla.py` applies it."""

    factor: float
    original_max: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _check(self.factor >= 1 and self.original_max > 0 and self.beta_fast > self.beta_slow > 0,
               f"Yarn(factor={self.factor}, original_max={self.original_max}, beta_fast={self.beta_fast}, "
               f"beta_slow={self.beta_slow}): needs factor >= 1, original_max > 0, beta_fast > beta_slow > 0")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer: every layer is attention + an MoE block of routed experts
    (or a dense MLP, in `dense_layers`).

    Router convention: softmax over all `n_experts` router logits, keep the `top_k` largest; with
    `renormalize` the kept weights are divided by their sum, which equals a softmax over the top-k
    logits (Mixtral, OLMoE). Without it the weights are the raw probabilities (Qwen2-MoE default).
    Experts: `mlp` is down(gelu(up(x))) (two matrices, the seed's), `swiglu` is
    down(silu(gate(x)) * up(x)) (three matrices: Mixtral, Qwen2-MoE, OLMoE).
    Options of Hugging Face families: `shared_expert_hidden > 0` adds a SwiGLU shared expert that
    every token passes through, scaled by sigmoid(shared_gate(x)) (Qwen2-MoE); `qkv_bias` gives
    the query, key and value projections a bias (Qwen2-MoE); `qk_norm` applies RMSNorm to the
    whole query and key projections, before splitting heads and RoPE (OLMoE); `qk_head_norm`
    applies RMSNorm over `head_dim` to each query and key head, before RoPE (Qwen3-MoE).
    `dense_layers`: the layers whose feed-forward is a dense SwiGLU MLP of hidden `dense_hidden`
    instead of an MoE block (Qwen3-MoE's `mlp_only_layers` / `decoder_sparse_step`, DeepSeek-V3's
    `first_k_dense_replace`). `router_kind="sigmoid_grouped"` is DeepSeek-V3's router
    (`model/routing.py`: sigmoid scores, a correction bias for the choice only, the best
    `topk_groups` of `n_groups` expert groups, weights times `routed_scaling`);
    `router_kind="softmax_grouped"` is DeepSeek-V2's (softmax scores, no bias, groups ranked by
    their best expert);
    `shared_expert_gate=False` drops the shared expert's sigmoid gate (DeepSeek-V3).
    `kv_lora_rank > 0`: multi-head latent attention (DeepSeek-V2/V3, `model/mla.py`): keys and
    values come from a cached latent of `kv_lora_rank` plus a shared RoPE key of
    `qk_rope_head_dim`; `head_dim` is then the query / key head dim (nope + rope), `v_head_dim`
    the value's, `q_lora_rank > 0` a low-rank query, `rope_interleave` RoPE on interleaved pairs,
    `yarn` its YaRN RoPE scaling.
    """

    name: str
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    n_heads: int
    head_dim: int
    expert_hidden: int
    vocab_size: int
    max_seq_len: int
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    expert_kind: str = "mlp"
    renormalize: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "fp32"
    shared_expert_hidden: int = 0
    router_skew: float = 0.0
    router_skew_shift: int = 0  # steps after which the skew's hot experts rotate (0: never)
    capacity_factor: float | None = None
    overflow: str = "drop"
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_head_norm: bool = False
    dense_layers: tuple[int, ...] = ()
    dense_hidden: int = 0
    router_kind: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    shared_expert_gate: bool = True
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    yarn: Yarn | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_experts", "top_k", "d_model", "n_heads", "head_dim",
                     "expert_hidden", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0,
                   f"ModelConfig.{name}={value!r} must be a positive integer")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check(isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0,
               f"ModelConfig.n_kv_heads={self.n_kv_heads!r} must be a positive integer")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}; "
               f"use a divisor of {self.n_heads}")
        _check(self.top_k <= self.n_experts,
               f"ModelConfig.top_k={self.top_k} must be <= n_experts={self.n_experts}")
        _check(self.expert_kind in EXPERT_KINDS,
               f"ModelConfig.expert_kind={self.expert_kind!r}; use one of: {', '.join(EXPERT_KINDS)}")
        _check(self.head_dim % 2 == 0,
               f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        _check(self.rope_theta > 0, f"ModelConfig.rope_theta={self.rope_theta} must be > 0")
        _check(self.norm_eps > 0, f"ModelConfig.norm_eps={self.norm_eps} must be > 0")
        _check(isinstance(self.shared_expert_hidden, int) and self.shared_expert_hidden >= 0,
               f"ModelConfig.shared_expert_hidden={self.shared_expert_hidden!r} must be an integer "
               f">= 0 (0: no shared expert)")
        _check(self.router_skew >= 0, f"ModelConfig.router_skew={self.router_skew} must be >= 0")
        _check(self.router_skew_shift >= 0,
               f"ModelConfig.router_skew_shift={self.router_skew_shift} must be >= 0 (0: never)")
        if self.capacity_factor is not None:
            Capacity(self.capacity_factor, self.overflow)  # validates factor and policy
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        _check(all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.dense_layers)
               and list(self.dense_layers) == sorted(set(self.dense_layers)),
               f"ModelConfig.dense_layers={self.dense_layers!r} must be distinct layer indices in "
               f"[0, {self.n_layers}), ascending")
        _check(isinstance(self.dense_hidden, int) and self.dense_hidden >= 0
               and (self.dense_hidden > 0) == bool(self.dense_layers),
               f"ModelConfig.dense_hidden={self.dense_hidden!r} must be a positive integer exactly "
               f"when dense_layers is not empty")
        _check(self.router_kind in ROUTER_KINDS,
               f"ModelConfig.router_kind={self.router_kind!r}; use one of: {', '.join(ROUTER_KINDS)}")
        _check(isinstance(self.n_groups, int) and self.n_groups > 0 and self.n_experts % self.n_groups == 0
               and (self.n_groups == 1 or self.n_experts // self.n_groups >= 2),
               f"ModelConfig.n_groups={self.n_groups!r} must divide n_experts={self.n_experts} into "
               f"groups of at least 2 experts")
        _check(isinstance(self.topk_groups, int) and 0 < self.topk_groups <= self.n_groups
               and self.top_k <= self.topk_groups * (self.n_experts // self.n_groups),
               f"ModelConfig.topk_groups={self.topk_groups!r} must be in [1, n_groups={self.n_groups}] "
               f"and its groups must hold top_k={self.top_k} experts")
        _check(self.router_kind != "softmax" or (self.n_groups, self.topk_groups) == (1, 1),
               "ModelConfig.n_groups / topk_groups apply to the grouped router kinds only")
        _check(self.routed_scaling > 0, f"ModelConfig.routed_scaling={self.routed_scaling} must be > 0")
        _check(self.capacity_factor is None or self.router_kind == "softmax",
               "ModelConfig.capacity_factor applies to the softmax router only; omit it")
        if self.kv_lora_rank:
            _check(0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0
                   and self.v_head_dim > 0 and self.q_lora_rank >= 0 and self.n_kv_heads == self.n_heads,
                   f"ModelConfig: latent attention needs an even 0 < qk_rope_head_dim < head_dim, "
                   f"v_head_dim > 0, q_lora_rank >= 0 and n_kv_heads == n_heads; got "
                   f"{self.qk_rope_head_dim}, {self.head_dim}, {self.v_head_dim}, {self.q_lora_rank}, "
                   f"{self.n_kv_heads}")
        _check(self.yarn is None or self.kv_lora_rank > 0,
               "ModelConfig.yarn applies to latent attention (kv_lora_rank > 0) only")
        _check(self.dtype in DTYPES,
               f"ModelConfig.dtype={self.dtype!r}; use one of: {', '.join(DTYPES)}")

    @property
    def capacity(self) -> Capacity | None:
        return Capacity(self.capacity_factor, self.overflow) if self.capacity_factor else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def is_dense(self, layer: int) -> bool:
        """Whether layer `layer`'s feed-forward is the dense MLP rather than an MoE block."""
        return layer in self.dense_layers

    def kv_per_token(self, tp: int = 1) -> tuple[int, int]:
        """(KV heads, head dim) of what a rank caches per token and layer: the latent and the RoPE
        key as one head (every TP rank holds all of it) under latent attention."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim
        return self.n_kv_heads // tp, self.head_dim

    def kv_elements_per_token(self, tp: int = 1) -> int:
        """Elements a rank caches per token and layer: K and V, `2 g d / tp`; under latent attention
        the latent `r + p` once (its keys are its values: a keys-only pool, `model/paged.py`)."""
        heads, dim = self.kv_per_token(tp)
        return heads * dim * (1 if self.kv_lora_rank else 2)

    @property
    def matrices_per_expert(self) -> int:
        return 3 if self.expert_kind == "swiglu" else 2

    def with_(self, **changes) -> "ModelConfig":
        """A copy with some fields changed, validated again.

        Plain multi-head attention stays plain when only `n_heads` changes (`n_kv_heads` was
        filled in from `n_heads`, so keeping it would reject `preset("tiny", n_heads=4)`).
        """
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            changes["n_kv_heads"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # The seed's model. The seed gives layers, experts, d_model, heads x head_dim, expert hidden,
    # BF16 and "MLP" experts; it does not give top-k, vocabulary, norm or position encoding, so
    # these are assumptions: top-2 routing (as Mixtral / GShard), RMSNorm, RoPE, vocab 32000,
    # a context of 10,000 prompt tokens plus room to generate.
    "paper": ModelConfig(
        name="paper", n_layers=16, n_experts=16, top_k=2, d_model=4096, n_heads=32, head_dim=128,
        expert_hidden=16384, vocab_size=32000, max_seq_len=16384, expert_kind="mlp", dtype="bf16",
    ),
    # The same architecture scaled down for tests: 16 experts so that 16 ranks hold one each,
    # 8 heads x 32 so that TP=8 divides heads and KV heads.
    "tiny": ModelConfig(
        name="tiny", n_layers=4, n_experts=16, top_k=2, d_model=256, n_heads=8, head_dim=32,
        expert_hidden=1024, vocab_size=1024, max_seq_len=512, expert_kind="mlp", dtype="fp32",
    ),
    # Sized so that one CPU rank does real work in a benchmark: matmuls of 1024 x 2816 are large
    # enough to run near this machine's matmul peak, while a whole run stays within seconds.
    "small": ModelConfig(
        name="small", n_layers=4, n_experts=8, top_k=2, d_model=1024, n_heads=16, head_dim=64,
        expert_hidden=2816, vocab_size=8192, max_seq_len=2048, expert_kind="mlp", dtype="bf16",
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with fields overridden (`preset("tiny", dtype="bf16")`)."""
    _check(name in PRESETS, f"unknown preset {name!r}; use one of: {', '.join(PRESETS)}")
    return PRESETS[name].with_(**overrides) if overrides else PRESETS[name]


@dataclass(frozen=True)
class Workload:
    """A batch of prompts and how much to generate from each.

    Prompts are either synthetic (`batch_size` x `prompt_len` ids drawn from `seed`) or explicit
    `prompt_ids`, one tuple per sequence, of any lengths (`prompt_len` is then the longest).
    `temperature == 0` is greedy decoding; otherwise temperature / top-p sampling from a
    generator seeded with `seed`.
    """

    batch_size: int = 8
    prompt_len: int = 64
    gen_len: int = 32
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    prompt_ids: tuple[tuple[int, ...], ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.prompt_ids is not None:
            ids = tuple(tuple(int(t) for t in p) for p in self.prompt_ids)
            _check(len(ids) > 0 and all(len(p) > 0 for p in ids),
                   "prompt ids are empty; give at least one token id per prompt")
            object.__setattr__(self, "prompt_ids", ids)
            object.__setattr__(self, "batch_size", len(ids))
            object.__setattr__(self, "prompt_len", max(len(p) for p in ids))
        _check(isinstance(self.batch_size, int) and self.batch_size > 0,
               f"batch size {self.batch_size} must be at least 1")
        _check(isinstance(self.prompt_len, int) and self.prompt_len > 0,
               f"prompt length {self.prompt_len} must be at least 1")
        _check(isinstance(self.gen_len, int) and self.gen_len > 0,
               f"generation length {self.gen_len} must be at least 1")
        _check(self.temperature >= 0, f"temperature {self.temperature} must be >= 0 (0 is greedy)")
        _check(0 < self.top_p <= 1, f"top_p {self.top_p} must be in (0, 1]")

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.gen_len

    def validate_for(self, config: ModelConfig) -> None:
        """Errors a model would hit mid-run, raised before any work starts."""
        _check(self.total_len <= config.max_seq_len,
               f"prompt length {self.prompt_len} + generation length {self.gen_len} = "
               f"{self.total_len} exceeds the model's maximum length {config.max_seq_len}; "
               f"shorten the prompt or generate fewer tokens")
        if self.prompt_ids is not None:
            bad = [t for p in self.prompt_ids for t in p if not 0 <= t < config.vocab_size]
            _check(not bad, f"token id {bad[0] if bad else 0} is outside the vocabulary "
                            f"[0, {config.vocab_size}); use ids below {config.vocab_size}")

    def prompt_lists(self, config: ModelConfig) -> list[tuple[int, ...]]:
        """The prompts' token ids, one tuple per sequence (lengths may differ)."""
        if self.prompt_ids is not None:
            self.validate_for(config)
            return list(self.prompt_ids)
        return [tuple(p) for p in self.prompts(config).tolist()]

    def prompts(self, config: ModelConfig) -> torch.Tensor:
        """The prompt token ids, `[batch_size, prompt_len]` int64 (prompts of equal length)."""
        self.validate_for(config)
        if self.prompt_ids is not None:
            _check(len({len(p) for p in self.prompt_ids}) == 1,
                   "prompts have different lengths; this path needs prompts of equal length")
            return torch.tensor(self.prompt_ids, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, config.vocab_size, (self.batch_size, self.prompt_len), generator=gen)
