"""Model specifications: the shape of the KV cache a model produces.

A :class:`ModelSpec` is everything the cache needs to know about a model: how many layers,
KV heads and head dimensions it has, the KV dtype, whether attention is multi-head latent
(MLA, DeepSeek) and the tensor-parallel degree. From it follow the bytes per token, the page
shape of a block and a stable fingerprint that keys every hash crossing a process.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvcluster.errors import InvalidArgument

KVDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8"]

_DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int8": 1,
}

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}


class ModelSpec(BaseModel):
    """The KV-relevant shape of a model. Frozen; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name; part of the fingerprint that salts block hashes.")
    num_layers: int = Field(gt=0, description="Transformer layers (each keeps its own K/V).")
    num_attention_heads: int = Field(gt=0, description="Query heads per layer.")
    num_kv_heads: int = Field(gt=0, description="K/V heads per layer (fewer than query heads under GQA).")
    head_dim: int = Field(gt=0, description="Dimension of one attention head.")
    hidden_size: int = Field(gt=0, description="Model width; used by the prefill cost model.")
    intermediate_size: int = Field(gt=0, description="MLP width; used by the prefill cost model.")
    vocab_size: int = Field(gt=0, description="Vocabulary size; token ids must be below it.")
    dtype: KVDType = Field(default="bfloat16", description="Data type of the stored K/V.")
    kv_lora_rank: int | None = Field(
        default=None,
        gt=0,
        description="MLA latent size (DeepSeek). When set, one latent vector per token and layer "
        "is cached instead of separate K and V heads.",
    )
    qk_rope_head_dim: int = Field(
        default=0, ge=0, description="MLA decoupled RoPE key dimension cached beside the latent."
    )
    tensor_parallel: int = Field(
        default=1, gt=0, description="Tensor-parallel degree; KV heads are split across ranks."
    )

    @model_validator(mode="after")
    def _check_heads(self) -> ModelSpec:
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.kv_lora_rank is None and self.qk_rope_head_dim:
            raise ValueError(
                f"qk_rope_head_dim ({self.qk_rope_head_dim}) is only used with MLA; set "
                "kv_lora_rank or set qk_rope_head_dim to 0"
            )
        tp, heads = self.tensor_parallel, self.num_kv_heads
        if self.kv_lora_rank is None and heads % tp and tp % heads:
            # Ranks split the KV heads evenly or replicate them (one per rank); anything else
            # would leave a rank with a fraction of a head.
            raise ValueError(
                f"tensor_parallel ({tp}) must divide num_kv_heads ({heads}) or be a multiple of it"
            )
        return self

    # --- derived shape ---------------------------------------------------------------------

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def kv_components(self) -> int:
        """2 (K and V) for ordinary attention, 1 (the shared latent) for MLA."""
        return 1 if self.is_mla else 2

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads one tensor-parallel rank stores.

        With fewer KV heads than ranks, heads are replicated (each rank keeps one), as vLLM does.
        MLA's latent is replicated on every rank.
        """
        if self.is_mla:
            return 1
        return max(1, self.num_kv_heads // self.tensor_parallel)

    @property
    def kv_head_dim(self) -> int:
        if self.kv_lora_rank is not None:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one token occupies on one tensor-parallel rank, all layers."""
        return (
            self.num_layers
            * self.kv_components
            * self.kv_heads_per_rank
            * self.kv_head_dim
            * self.dtype_bytes
        )

    def page_shape(self, block_size: int) -> tuple[int, int, int, int, int]:
        """Shape of one page: ``(layers, kv_components, block_size, kv_heads, head_dim)``.

        A page holds every layer of one block contiguously, so moving a block is one copy.
        """
        return (
            self.num_layers,
            self.kv_components,
            block_size,
            self.kv_heads_per_rank,
            self.kv_head_dim,
        )

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def fingerprint(self) -> str:
        """A stable digest of everything that changes the bytes of a page.

        Blocks computed under another fingerprint must never match, so it salts every block
        hash. Built from fixed fields, never from ``hash()`` or pickle, so it is stable across
        processes, machines and Python versions.
        """
        fields = (
            self.name,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.kv_lora_rank or 0,
            self.qk_rope_head_dim,
            self.tensor_parallel,
        )
        text = "|".join(str(f) for f in fields)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def prefill_flops(self, num_tokens: int, context_tokens: int = 0) -> float:
        """Approximate FLOPs to prefill ``num_tokens`` new tokens after ``context_tokens`` cached.

        Dense matmuls cost ``2 * params_per_token`` per token; attention adds ``4 * layers *
        q_heads * head_dim`` per (query, key) pair, causal. Used by the migration planner to
        compare recomputing a prefix against moving it.
        """
        per_layer_attn_params = self.hidden_size * (
            self.num_attention_heads * self.head_dim + 2 * self.num_kv_heads * self.head_dim
        ) + self.num_attention_heads * self.head_dim * self.hidden_size
        per_layer_mlp_params = 3 * self.hidden_size * self.intermediate_size
        dense = 2.0 * num_tokens * self.num_layers * (per_layer_attn_params + per_layer_mlp_params)
        # Causal attention: query i attends to context_tokens + i + 1 keys.
        pairs = num_tokens * context_tokens + num_tokens * (num_tokens + 1) / 2
        attention = 4.0 * self.num_layers * self.num_attention_heads * self.head_dim * pairs
        return dense + attention


#: Published configurations of well-known models (from their Hugging Face ``config.json``).
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="llama-3-8b", num_layers=32, num_attention_heads=32, num_kv_heads=8,
            head_dim=128, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
        ),
        ModelSpec(
            name="llama-3-70b", num_layers=80, num_attention_heads=64, num_kv_heads=8,
            head_dim=128, hidden_size=8192, intermediate_size=28672, vocab_size=128256,
        ),
        ModelSpec(
            name="mistral-7b", num_layers=32, num_attention_heads=32, num_kv_heads=8,
            head_dim=128, hidden_size=4096, intermediate_size=14336, vocab_size=32768,
        ),
        ModelSpec(
            name="qwen2.5-7b", num_layers=28, num_attention_heads=28, num_kv_heads=4,
            head_dim=128, hidden_size=3584, intermediate_size=18944, vocab_size=152064,
        ),
        ModelSpec(
            name="deepseek-v3", num_layers=61, num_attention_heads=128, num_kv_heads=128,
            head_dim=128, hidden_size=7168, intermediate_size=18432, vocab_size=129280,
            kv_lora_rank=512, qk_rope_head_dim=64,
        ),
        # A small Llama-architecture spec with real K/V tensors for the demo and tests.
        ModelSpec(
            name="tiny-llama", num_layers=2, num_attention_heads=8, num_kv_heads=2,
            head_dim=16, hidden_size=128, intermediate_size=256, vocab_size=32000,
            dtype="float32",
        ),
    )
}


def preset(name: str) -> ModelSpec:
    """The built-in spec called ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise InvalidArgument(
            f"unknown model preset {name!r}; built-in presets: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[key]
