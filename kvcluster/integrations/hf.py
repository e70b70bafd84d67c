"""Hugging Face transformers integration: K/V conversions and prefix-reusing generation.

Needs the optional extra ``hf`` (``pip install 'kvcluster[hf]'``: transformers 4.56 to 5.x,
the releases whose caches have per-layer ``keys``/``values``). transformers is imported
lazily, inside the functions that build its objects, so importing this module (or kvcluster)
never needs it; a missing install raises :class:`~kvcluster.errors.MissingDependency`.

Layouts. kvcluster moves K/V as one tensor ``(layers, 2, tokens, kv_heads, head_dim)`` (K at
component 0, V at 1); transformers 5 keeps, per layer of a :class:`~transformers.Cache`,
``keys`` and ``values`` of shape ``(batch, kv_heads, tokens, head_dim)``::

    kvcluster kv[l, 0, t, h, :]  ==  cache.layers[l].keys[0, h, t, :]
    kvcluster kv[l, 1, t, h, :]  ==  cache.layers[l].values[0, h, t, :]

Both hold keys *after* RoPE, so a prefix's K/V is only valid at the positions it was computed
at: :func:`generate` runs the remaining tokens at positions ``reused .. prompt_len - 1``.

Only decoder-only models whose every layer is full attention with separate K and V heads
(Llama, Mistral, Qwen2 and kin) are supported; sliding-window layers keep only a window and
MLA caches a latent, so neither round-trips.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from pydantic import ValidationError

from kvcluster.errors import (
    CapacityError,
    InvalidArgument,
    InvalidKV,
    InvalidTokens,
    MissingDependency,
    NodeUnavailable,
)
from kvcluster.model_spec import ModelSpec

if TYPE_CHECKING:
    from transformers import DynamicCache

logger = logging.getLogger(__name__)

_KV_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


# --- what this module needs from the cluster client --------------------------------------


class RouteResultLike(Protocol):
    """The fields of :class:`kvcluster.client.RouteResult` that :func:`generate` reads."""

    @property
    def node_id(self) -> str: ...

    @property
    def matched_tokens(self) -> int: ...


class KVClientLike(Protocol):
    """The four calls of :class:`kvcluster.client.KVClient` that :func:`generate` makes."""

    def route_and_lookup(self, tokens: Any, namespace: str = ...) -> RouteResultLike: ...

    def fetch(self, result: Any) -> torch.Tensor: ...

    def store(
        self, tokens: Any, kv: torch.Tensor, namespace: str = ..., *, result: Any = ...,
        generated_tokens: int | None = ...,
    ) -> Any: ...

    def release(self, result: Any) -> Any: ...


class CausalLM(Protocol):
    """A transformers causal language model (``LlamaForCausalLM`` and kin)."""

    config: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self) -> Any: ...


# --- model spec ----------------------------------------------------------------------------


def model_spec_from_hf(
    config: Any, name: str | None = None, dtype: str | torch.dtype | None = None
) -> ModelSpec:
    """The :class:`ModelSpec` of a transformers model config (``LlamaConfig`` and kin).

    ``name`` defaults to the config's ``name_or_path`` (or its ``model_type`` when that is
    empty); it salts every block hash, so two models must never share one. ``dtype`` is the
    stored K/V dtype (a name or a ``torch.dtype``); it defaults to the config's ``dtype``
    (``torch_dtype`` before transformers 5), else ``float32``, the dtype of a model built
    from a config. Raises :class:`InvalidArgument` naming a missing or unsupported field.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields: dict[str, int] = {}
    for ours, theirs in (
        ("num_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("hidden_size", "hidden_size"),
        ("intermediate_size", "intermediate_size"),
        ("vocab_size", "vocab_size"),
    ):
        value = getattr(text_config, theirs, None)
        if not isinstance(value, int) or value <= 0:
            raise InvalidArgument(
                f"model config field {theirs!r} must be a positive int, got {value!r}"
            )
        fields[ours] = value
    if getattr(text_config, "kv_lora_rank", None):
        raise InvalidArgument(
            "multi-head latent attention (kv_lora_rank set) is not supported by the transformers "
            "integration; only models with separate K and V heads are"
        )
    kv_heads = getattr(text_config, "num_key_value_heads", None) or fields["num_attention_heads"]
    head_dim = getattr(text_config, "head_dim", None) or (
        fields["hidden_size"] // fields["num_attention_heads"]
    )
    if name is None:
        name = getattr(text_config, "name_or_path", "") or getattr(text_config, "model_type", "")
        if not name:
            raise InvalidArgument("the model config has no name_or_path or model_type; pass name=")
    try:
        return ModelSpec(
            name=name,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            dtype=_kv_dtype_name(dtype if dtype is not None else _config_dtype(text_config)),
            **fields,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidArgument(f"the model config gives no valid ModelSpec: {problems}") from None


def _config_dtype(config: Any) -> torch.dtype | str:
    # transformers 5 names it dtype and warns on reading the older torch_dtype.
    value = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None)
    return value if value is not None else "float32"


def _kv_dtype_name(dtype: str | torch.dtype) -> Any:
    if isinstance(dtype, torch.dtype):
        if dtype not in _KV_DTYPE_NAMES:
            raise InvalidArgument(
                f"K/V dtype {dtype} is not supported; use one of {sorted(_KV_DTYPE_NAMES.values())}"
            )
        return _KV_DTYPE_NAMES[dtype]
    return dtype.removeprefix("torch.")  # ModelSpec validates the name.


# --- conversions ---------------------------------------------------------------------------


def kv_from_cache(cache: Any, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Tokens ``[start, end)`` of a transformers cache as one kvcluster K/V tensor.

    Returns a new contiguous tensor ``(layers, 2, end - start, kv_heads, head_dim)`` on the
    cache's device and in its dtype; it shares no memory with the cache. ``end=None`` means
    the cache's sequence length. Only batch size 1 is supported (one sequence per call).
    Raises :class:`InvalidArgument` for a bad range, an uninitialised, batched or
    sliding-window cache.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        raise InvalidArgument(
            f"expected a transformers Cache with per-layer keys/values, got {type(cache).__name__}"
        )
    seq_len = int(cache.get_seq_length())
    stop = seq_len if end is None else end
    if not 0 <= start <= stop <= seq_len:
        raise InvalidArgument(
            f"token range [{start}, {end}) is outside the cache's {seq_len} tokens"
        )
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for index, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False):
            raise InvalidArgument(
                f"cache layer {index} is a sliding-window layer; it keeps only a window of tokens"
            )
        if not getattr(layer, "is_initialized", True) or layer.keys is None:
            raise InvalidArgument(f"cache layer {index} holds no keys yet")
        if layer.keys.shape[0] != 1:
            raise InvalidArgument(
                f"cache layer {index} has batch size {layer.keys.shape[0]}; only 1 is supported"
            )
        # (1, H, T, D) -> (T, H, D)
        keys.append(layer.keys[0, :, start:stop].transpose(0, 1))
        values.append(layer.values[0, :, start:stop].transpose(0, 1))
    # stack copies, so the result is contiguous and independent of the cache.
    return torch.stack([torch.stack(keys), torch.stack(values)], dim=1)


def cache_from_kv(
    kv: torch.Tensor,
    model_config: Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DynamicCache:
    """A :class:`transformers.DynamicCache` holding ``kv`` as the K/V of one sequence.

    ``kv`` is ``(layers, 2, tokens, kv_heads, head_dim)`` and must match ``model_config``'s
    layers, KV heads and head dim. The cache's tensors are copies in ``dtype`` on ``device``
    (by default ``kv``'s own), so ``kv`` may be reused or freed afterwards. An empty ``kv``
    (``tokens == 0``) gives an empty cache. Raises :class:`InvalidKV` naming the mismatch.
    """
    dynamic_cache = _transformers().DynamicCache
    spec = model_spec_from_hf(model_config, name="cache_from_kv")
    expected = (spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        raise InvalidKV(
            f"kv must be a 5-dim tensor (layers, 2, tokens, kv_heads, head_dim), got "
            f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}"
        )
    if (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != expected:
        raise InvalidKV(
            f"kv shape {tuple(kv.shape)} does not fit the model: expected "
            f"({spec.num_layers}, 2, tokens, {spec.num_kv_heads}, {spec.head_dim})"
        )
    cache = dynamic_cache(config=model_config)
    if kv.shape[2] == 0:
        return cache
    kv = kv.to(dtype=dtype or kv.dtype, device=device or kv.device)
    for layer in range(spec.num_layers):
        # (T, H, D) -> (1, H, T, D) views; the layer's update concatenates them onto its
        # empty start, which copies, so the cache never shares memory with kv.
        keys = kv[layer, 0].transpose(0, 1).unsqueeze(0)
        values = kv[layer, 1].transpose(0, 1).unsqueeze(0)
        cache.update(keys, values, layer)
    return cache


#: The oldest transformers whose caches keep per-layer ``keys``/``values`` (see the docstring).
MIN_TRANSFORMERS = (4, 56)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependency(
            "the transformers integration needs the 'hf' extra: pip install 'kvcluster[hf]'"
        ) from exc
    check_transformers_version(transformers.__version__)
    return transformers


def check_transformers_version(version: str) -> None:
    """:class:`MissingDependency` unless ``version`` is at least :data:`MIN_TRANSFORMERS`
    (older caches are tuples per layer, which this module cannot read or build)."""
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TRANSFORMERS:
        wanted = ".".join(map(str, MIN_TRANSFORMERS))
        raise MissingDependency(
            f"the transformers integration needs transformers >= {wanted}, found {version}: "
            "pip install 'kvcluster[hf]'"
        )


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationTimings:
    """Seconds spent in each phase of one :func:`generate` call (same clock throughout).

    ``route_s`` is ``route_and_lookup``; ``fetch_s`` the fetch plus building the transformers
    cache from it; ``prefill_s`` the model on the remaining prompt tokens and the first
    greedy choice. ``ttft_s`` (time to first token) is their sum, from the call's start to
    the first generated token. ``decode_s`` covers the other tokens, ``store_s`` the store.
    """

    route_s: float
    fetch_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    store_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The outcome of one :func:`generate` call.

    ``tokens`` are the generated ids (greedy), ``logits[i]`` the float32 CPU logits that
    chose ``tokens[i]``; ``logits[0]`` is the last prompt position's. Of the
    ``prompt_tokens``, the cluster matched ``matched_tokens`` and ``reused_tokens`` of those
    were fed to the model from the cache (one fewer when the whole prompt matched: the last
    prompt token is always run, to get its logits); the model ran ``computed_tokens`` prompt
    tokens. ``stored_tokens`` is how many tokens' new K/V were handed to the cluster (0 when
    ``store=False`` or the cluster had no room). A fetch shorter than the match (a corrupt
    spilled page was dropped) reuses only what came back, and the store then hands over
    every token's K/V.
    """

    tokens: list[int]
    logits: torch.Tensor
    prompt_tokens: int
    matched_tokens: int
    reused_tokens: int
    computed_tokens: int
    stored_tokens: int
    node_id: str
    timings: GenerationTimings

    @property
    def first_logits(self) -> torch.Tensor:
        """Logits of the last prompt position, ``(vocab,)``."""
        return self.logits[0]


def generate(
    model: CausalLM,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    client: KVClientLike,
    *,
    max_new_tokens: int,
    namespace: str = "default",
    store: bool = True,
    eos_token_id: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> GenerationResult:
    """Greedy generation that reuses the cluster's cached prefix of ``tokens``.

    1. ``client.route_and_lookup(tokens, namespace)`` finds the node holding the longest
       prefix and pins it with a lease; ``client.fetch`` returns its K/V.
    2. The model runs only on the prompt tokens after the reused prefix, at their true
       positions, on top of a cache built from the fetched K/V. When the whole prompt
       matched, all but the last token are reused and the last is run again for its logits.
    3. Up to ``max_new_tokens`` (>= 1) tokens are chosen greedily, stopping after
       ``eos_token_id`` if given.
    4. With ``store``, the K/V of every token the model has seen (the prompt and all
       generated tokens but the last, which was never fed back) not already matched is
       stored under ``namespace``, reusing the leased prefix on its node. A full cache
       (:class:`CapacityError`) is logged and leaves ``stored_tokens == 0``; the generation
       is still returned.
    5. The lease is released, whatever happened (a node that became unavailable is logged:
       its leases expire on their own).

    The model must be in eval mode; it runs under ``torch.no_grad``. One sequence per call
    (batch size 1). ``clock`` times the phases. Raises :class:`InvalidTokens` for an empty,
    non-1-D or out-of-vocabulary prompt and :class:`InvalidArgument` for ``max_new_tokens < 1``
    or, with ``store``, a model whose cache keeps only a sliding window in some layer (it
    cannot give back every token's K/V); none of them contacts the cluster.
    """
    if max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab_size = int(model.config.vocab_size)
    prompt = _prompt_array(tokens, vocab_size)
    if store:
        _check_no_sliding_layers(model.config)
    device = next(iter(model.parameters())).device
    started = clock()
    result = client.route_and_lookup(prompt, namespace=namespace)
    try:
        routed = clock()
        matched = int(result.matched_tokens)
        assert 0 <= matched <= len(prompt), f"node matched {matched} of {len(prompt)} tokens"
        # Also called on a miss (then local and empty): its dtype is the cluster's K/V dtype.
        prefix_kv = client.fetch(result)
        if prefix_kv.dim() != 5 or prefix_kv.shape[2] > matched:
            raise InvalidKV(
                f"fetch returned K/V of shape {tuple(prefix_kv.shape)} for a match of {matched}"
            )
        # Shorter than the match when a spilled page failed its checksum (the node drops it
        # and the K/V ends before it): the model computes the rest.
        fetched_tokens = int(prefix_kv.shape[2])
        # The last prompt token always runs: its logits choose the first new token.
        reused = min(fetched_tokens, len(prompt) - 1)
        kv_dtype = prefix_kv.dtype
        cache = cache_from_kv(
            prefix_kv[:, :, :reused], model.config, dtype=_model_dtype(model), device=device
        )
        fetched = clock()

        generated: list[int] = []
        step_logits: list[torch.Tensor] = []
        with torch.no_grad():
            logits = _forward(model, prompt[reused:], reused, cache, device)
            next_token = int(torch.argmax(logits))
            generated.append(next_token)
            step_logits.append(logits)
            first_token = clock()
            position = len(prompt)
            while len(generated) < max_new_tokens and next_token != eos_token_id:
                logits = _forward(model, np.array([next_token]), position, cache, device)
                position += 1
                next_token = int(torch.argmax(logits))
                generated.append(next_token)
                step_logits.append(logits)
        decoded = clock()

        stored = 0
        if store:
            # The last generated token was never fed back, so the cache ends one before it.
            seen = np.concatenate([prompt, np.asarray(generated[:-1], dtype=np.int64)])
            assert int(cache.get_seq_length()) == len(seen), "cache and token count disagree"
            # After a short fetch the leased prefix has a corrupt page, which the node would
            # refuse to reuse (PageCorrupt): store the K/V of every token, without the lease.
            whole = fetched_tokens < matched
            start = 0 if whole else matched
            if len(seen) > start:
                new_kv = kv_from_cache(cache, start=start).to(device="cpu", dtype=kv_dtype)
                try:
                    client.store(seen, new_kv, namespace=namespace,
                                 result=None if whole else result,
                                 generated_tokens=len(generated))
                    stored = len(seen) - start
                except CapacityError as exc:
                    logger.warning("not caching %s tokens in %s: %s", len(seen), namespace, exc)
        stored_at = clock()
    finally:
        try:
            client.release(result)
        except NodeUnavailable:
            # The node is gone, and its leases with it (or they expire): nothing to undo.
            logger.warning("could not release the lease on node %s", result.node_id)

    return GenerationResult(
        tokens=generated,
        logits=torch.stack(step_logits),
        prompt_tokens=len(prompt),
        matched_tokens=matched,
        reused_tokens=reused,
        computed_tokens=len(prompt) - reused,
        stored_tokens=stored,
        node_id=str(result.node_id),
        timings=GenerationTimings(
            route_s=routed - started,
            fetch_s=fetched - routed,
            prefill_s=first_token - fetched,
            ttft_s=first_token - started,
            decode_s=decoded - first_token,
            store_s=stored_at - decoded,
            total_s=stored_at - started,
        ),
    )


def _prompt_array(
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor, vocab_size: int
) -> npt.NDArray[np.int64]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    array = np.asarray(tokens)
    if array.ndim != 1 or array.size == 0:
        raise InvalidTokens(f"tokens must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidTokens(f"tokens must be integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidTokens(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return array.astype(np.int64, copy=False)


def _check_no_sliding_layers(model_config: Any) -> None:
    # The layers transformers would build for this model (Mistral's sliding_window, or
    # layer_types with sliding attention), checked before any work rather than at the store.
    for index, layer in enumerate(_transformers().DynamicCache(config=model_config).layers):
        if getattr(layer, "is_sliding", False):
            raise InvalidArgument(
                f"layer {index} of the model keeps only a sliding window of K/V, which cannot "
                "be stored; pass store=False"
            )


def _model_dtype(model: CausalLM) -> torch.dtype:
    dtype: torch.dtype = next(iter(model.parameters())).dtype
    return dtype


def _forward(
    model: CausalLM,
    token_ids: npt.NDArray[np.int64],
    first_position: int,
    cache: Any,
    device: torch.device,
) -> torch.Tensor:
    """Run ``token_ids`` at positions ``first_position..`` on ``cache`` (which grows by them).

    Returns the float32 CPU logits of the last position, ``(vocab,)``. Positions are passed
    explicitly: RoPE must rotate each query at the position its token has in the sequence.
    """
    assert int(cache.get_seq_length()) == first_position, (
        f"cache holds {cache.get_seq_length()} tokens, expected {first_position}"
    )
    input_ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).unsqueeze(0)
    position_ids = torch.arange(
        first_position, first_position + len(token_ids), device=device
    ).unsqueeze(0)
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = output.logits[0, -1].float().cpu()
    return logits
