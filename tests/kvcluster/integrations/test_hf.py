"""The transformers integration: conversions, and generation that reuses the cluster's prefix.

The correctness proof: greedy generation through :func:`generate` with whatever prefix the
cluster holds gives exactly the tokens, and the logits within float tolerance, of a plain
recomputation of the whole sequence at every step with no cache at all.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from kvcluster.errors import (
    CapacityError,
    InvalidArgument,
    InvalidKV,
    InvalidTokens,
    MissingDependency,
    NodeUnavailable,
)
from kvcluster.integrations.hf import (
    cache_from_kv,
    check_transformers_version,
    generate,
    kv_from_cache,
    model_spec_from_hf,
)
from tests.kvcluster.integrations.conftest import BLOCK_SIZE, VOCAB

ATOL = 1e-4
NEW_TOKENS = 5


# --- references ------------------------------------------------------------------------------


def reference_generate(model: Any, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding that recomputes the whole sequence at every step, with no cache."""
    sequence = [int(t) for t in prompt]
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=torch.tensor([sequence]), use_cache=False)
            step = out.logits[0, -1].float()
            token = int(torch.argmax(step))
            tokens.append(token)
            logits.append(step)
            sequence.append(token)
    return tokens, torch.stack(logits)


def reference_kv(model: Any, tokens: np.ndarray) -> torch.Tensor:
    """K/V of ``tokens`` computed in one pass from scratch, kvcluster layout."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens.tolist()]), use_cache=True)
    return kv_from_cache(out.past_key_values)


def random_prompt(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=length, dtype=np.int64)


def assert_same_generation(result: Any, model: Any, prompt: np.ndarray) -> None:
    tokens, logits = reference_generate(model, prompt, len(result.tokens))
    assert result.tokens == tokens
    torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=0)
    assert result.first_logits.shape == (VOCAB,)


def case_namespace(request: pytest.FixtureRequest) -> str:
    """A namespace of its own for each test case: no case sees another's cache."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)


def cache_prefix(client: Any, model: Any, tokens: np.ndarray, namespace: str) -> None:
    """Store the K/V of ``tokens`` directly (not through :func:`generate`)."""
    client.store(tokens, reference_kv(model, tokens), namespace=namespace)


# --- model spec ------------------------------------------------------------------------------


def test_model_spec_from_hf_reads_gqa_shape(gqa_model: Any) -> None:
    spec = model_spec_from_hf(gqa_model.config, name="gqa")
    assert (spec.name, spec.num_layers, spec.num_attention_heads, spec.num_kv_heads) == ("gqa", 3, 8, 2)
    assert (spec.head_dim, spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (8, 64, 128, VOCAB)
    assert spec.dtype == "float32"
    assert spec.page_shape(BLOCK_SIZE) == (3, 2, BLOCK_SIZE, 2, 8)


def test_model_spec_from_hf_defaults_and_overrides() -> None:
    config = transformers.LlamaConfig(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=None, head_dim=32, vocab_size=100,
    )
    spec = model_spec_from_hf(config, dtype=torch.bfloat16)
    assert spec.name == "llama"  # model_type when name_or_path is empty
    assert spec.num_kv_heads == 4  # no num_key_value_heads: multi-head attention
    assert spec.head_dim == 32  # explicit head_dim wins over hidden_size // heads
    assert spec.dtype == "bfloat16"
    assert model_spec_from_hf(config, name="x", dtype="float16").dtype == "float16"


def test_model_spec_from_hf_rejects_bad_configs() -> None:
    fields = {
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100,
    }
    # A plain object with the fields works (no get_text_config needed)...
    assert model_spec_from_hf(SimpleNamespace(**fields), name="x").head_dim == 8
    # ...a missing or non-positive field is named...
    with pytest.raises(InvalidArgument, match="'intermediate_size' must be a positive int, got None"):
        model_spec_from_hf(SimpleNamespace(**{**fields, "intermediate_size": None}), name="x")
    with pytest.raises(InvalidArgument, match="'num_hidden_layers' must be a positive int, got 0"):
        model_spec_from_hf(SimpleNamespace(**{**fields, "num_hidden_layers": 0}), name="x")
    # ...and latent attention or a nameless config is refused.
    with pytest.raises(InvalidArgument, match="latent attention"):
        model_spec_from_hf(SimpleNamespace(**fields, kv_lora_rank=512), name="x")
    with pytest.raises(InvalidArgument, match="pass name="):
        model_spec_from_hf(SimpleNamespace(**fields))
    # ...and what ModelSpec itself refuses comes back as InvalidArgument too.
    with pytest.raises(InvalidArgument, match="dtype"):
        model_spec_from_hf(SimpleNamespace(**fields), name="x", dtype="float64")
    with pytest.raises(InvalidArgument, match="multiple of num_kv_heads"):
        model_spec_from_hf(SimpleNamespace(**{**fields, "num_key_value_heads": 3}), name="x")
    with pytest.raises(InvalidArgument, match="float64"):
        model_spec_from_hf(transformers.LlamaConfig(), name="x", dtype=torch.float64)


# --- conversions -----------------------------------------------------------------------------


def test_kv_from_cache_lays_out_every_layer_token_and_head(gqa_model: Any) -> None:
    prompt = random_prompt(0, 21)
    with torch.no_grad():
        cache = gqa_model(input_ids=torch.tensor([prompt.tolist()]), use_cache=True).past_key_values
    kv = kv_from_cache(cache)
    assert kv.shape == (3, 2, 21, 2, 8) and kv.dtype == torch.float32 and kv.is_contiguous()
    for layer in range(3):
        for t in (0, 7, 20):
            for h in range(2):
                assert torch.equal(kv[layer, 0, t, h], cache.layers[layer].keys[0, h, t])
                assert torch.equal(kv[layer, 1, t, h], cache.layers[layer].values[0, h, t])
    assert torch.equal(kv_from_cache(cache, start=5, end=12), kv[:, :, 5:12])
    assert torch.equal(kv_from_cache(cache, start=16), kv[:, :, 16:])
    assert kv_from_cache(cache, start=21).shape == (3, 2, 0, 2, 8)
    kv[0, 0, 0, 0, 0] += 1.0  # a copy: the cache is untouched
    assert not torch.equal(kv[0, 0, 0, 0], cache.layers[0].keys[0, 0, 0])


@pytest.mark.parametrize(("start", "end"), [(-1, None), (3, 2), (0, 22), (22, None)])
def test_kv_from_cache_rejects_ranges_outside_the_cache(gqa_model: Any, start: int, end: int | None) -> None:
    with torch.no_grad():
        cache = gqa_model(input_ids=torch.tensor([list(range(21))]), use_cache=True).past_key_values
    with pytest.raises(InvalidArgument, match="outside the cache's 21 tokens"):
        kv_from_cache(cache, start=start, end=end)


def test_kv_from_cache_rejects_batches_and_empty_caches(gqa_model: Any) -> None:
    with torch.no_grad():
        batched = gqa_model(input_ids=torch.zeros((2, 4), dtype=torch.long), use_cache=True)
    with pytest.raises(InvalidArgument, match="batch size 2"):
        kv_from_cache(batched.past_key_values)
    with pytest.raises(InvalidArgument, match="per-layer keys/values"):
        kv_from_cache(transformers.DynamicCache())
    with pytest.raises(InvalidArgument, match="per-layer keys/values"):
        kv_from_cache(object())


def test_cache_from_kv_round_trips_and_copies(gqa_model: Any) -> None:
    kv = torch.randn(3, 2, 19, 2, 8)
    cache = cache_from_kv(kv, gqa_model.config)
    assert isinstance(cache, transformers.DynamicCache)
    assert cache.get_seq_length() == 19 and len(cache.layers) == 3
    assert cache.layers[2].keys.shape == (1, 2, 19, 8)
    assert torch.equal(kv_from_cache(cache), kv)
    kv.zero_()  # the cache holds its own copy
    assert cache.layers[0].keys.abs().sum() > 0


def test_cache_from_kv_converts_dtype_and_handles_empty(gqa_model: Any) -> None:
    kv = torch.randn(3, 2, 4, 2, 8, dtype=torch.bfloat16)
    cache = cache_from_kv(kv, gqa_model.config, dtype=torch.float32)
    assert cache.layers[1].values.dtype == torch.float32
    assert torch.equal(kv_from_cache(cache), kv.float())
    empty = cache_from_kv(torch.empty(3, 2, 0, 2, 8), gqa_model.config)
    assert empty.get_seq_length() == 0


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 4, 2, 8), (3, 1, 4, 2, 8), (3, 2, 4, 8, 8), (3, 2, 4, 2, 16), (3, 2, 4, 2)],
)
def test_cache_from_kv_rejects_shapes_that_do_not_fit_the_model(gqa_model: Any, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidKV, match="kv"):
        cache_from_kv(torch.zeros(shape), gqa_model.config)


@pytest.mark.parametrize("split", [1, 16, 37, 63])
def test_converted_prefix_continues_the_model_exactly(gqa_model: Any, split: int) -> None:
    """A prefix's K/V, out to kvcluster layout and back, lets the model finish the prompt."""
    prompt = torch.tensor([random_prompt(split, 64).tolist()])
    with torch.no_grad():
        full = gqa_model(input_ids=prompt, use_cache=True)
        prefix = gqa_model(input_ids=prompt[:, :split], use_cache=True).past_key_values
        cache = cache_from_kv(kv_from_cache(prefix), gqa_model.config)
        rest = gqa_model(
            input_ids=prompt[:, split:],
            position_ids=torch.arange(split, 64).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
    torch.testing.assert_close(rest.logits[0], full.logits[0, split:], atol=ATOL, rtol=0)
    torch.testing.assert_close(kv_from_cache(cache), kv_from_cache(full.past_key_values), atol=ATOL, rtol=0)


# --- generation through the cluster: the correctness proof ----------------------------------

# (prompt length, cached prefix length): nothing cached, prefixes ending mid-block (37: two
# full blocks plus 5 tokens, copy-on-write partial reuse) and on block boundaries, one token,
# the whole prompt, a one-token prompt.
EDGE_CASES = [
    (40, 0),
    (64, 37),
    (41, 37),
    (38, 37),
    (64, 16),
    (64, 32),
    (48, 47),
    (50, 50),
    (16, 16),
    (33, 1),
    (1, 1),
    (1, 0),
    (100, 5),
    (130, 129),
]


def _random_cases(count: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(7)
    cases = []
    for _ in range(count):
        length = int(rng.integers(1, 150))
        cases.append((length, int(rng.integers(0, length + 1))))
    return cases


@pytest.mark.parametrize(("length", "cached"), EDGE_CASES + _random_cases(16))
def test_generate_with_cached_prefix_equals_no_cache_gqa(
    gqa_model: Any, gqa_client: Any, request: pytest.FixtureRequest, length: int, cached: int
) -> None:
    namespace = case_namespace(request)
    prompt = random_prompt(1000 * length + cached, length)
    if cached:
        cache_prefix(gqa_client, gqa_model, prompt[:cached], namespace)

    result = generate(gqa_model, prompt, gqa_client, max_new_tokens=NEW_TOKENS, namespace=namespace)

    assert_same_generation(result, gqa_model, prompt)
    assert result.prompt_tokens == length
    assert result.matched_tokens == cached
    assert result.reused_tokens == min(cached, length - 1)
    assert result.computed_tokens == length - result.reused_tokens
    seen = np.concatenate([prompt, np.asarray(result.tokens[:-1], dtype=np.int64)])
    assert result.stored_tokens == len(seen) - cached
    # What was stored is the true K/V of the prompt and the generated tokens.
    with gqa_client.lookup(seen, namespace=namespace) as again:
        assert again.matched_tokens == len(seen)
        torch.testing.assert_close(gqa_client.fetch(again), reference_kv(gqa_model, seen), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("length", "cached"), [(40, 0), (64, 37), (50, 50), (70, 48), (9, 3)])
def test_generate_with_cached_prefix_equals_no_cache_mha(
    mha_model: Any, mha_client: Any, request: pytest.FixtureRequest, length: int, cached: int
) -> None:
    namespace = case_namespace(request)
    prompt = random_prompt(length + 7 * cached, length)
    if cached:
        cache_prefix(mha_client, mha_model, prompt[:cached], namespace)
    result = generate(mha_model, prompt, mha_client, max_new_tokens=NEW_TOKENS, namespace=namespace)
    assert_same_generation(result, mha_model, prompt)
    assert result.matched_tokens == cached


def test_generate_agrees_with_transformers_own_generate(gqa_model: Any, gqa_client: Any) -> None:
    prompt = random_prompt(5, 45)
    cache_prefix(gqa_client, gqa_model, prompt[:37], "hf-own-generate")
    result = generate(gqa_model, prompt, gqa_client, max_new_tokens=8, namespace="hf-own-generate")
    with torch.no_grad():
        out = gqa_model.generate(
            torch.tensor([prompt.tolist()]), max_new_tokens=8, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    assert result.tokens == out.sequences[0, 45:].tolist()
    torch.testing.assert_close(result.logits, torch.cat(out.logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("length", "cached"), [(64, 37), (50, 50), (100, 16), (200, 131)])
def test_three_node_cluster_routes_to_the_prefix_and_generates_the_same(
    gqa_model: Any, gqa_cluster: Any, request: pytest.FixtureRequest, length: int, cached: int
) -> None:
    """Prefixes of at least one full block are found through the registry on any of 3 nodes."""
    namespace = case_namespace(request)
    prompt = random_prompt(31 * length + cached, length)
    holder = gqa_cluster.store(prompt[:cached], reference_kv(gqa_model, prompt[:cached]), namespace=namespace)
    result = generate(gqa_model, prompt, gqa_cluster, max_new_tokens=NEW_TOKENS, namespace=namespace)
    assert result.node_id == holder.node_id
    assert result.matched_tokens == cached
    assert_same_generation(result, gqa_model, prompt)


@pytest.mark.parametrize("client_fixture", ["gqa_client", "gqa_cluster"])
def test_multi_turn_chat_reuses_each_previous_turn(
    gqa_model: Any, client_fixture: str, request: pytest.FixtureRequest
) -> None:
    client = request.getfixturevalue(client_fixture)
    namespace = case_namespace(request)
    rng = np.random.default_rng(11)
    history = np.empty(0, dtype=np.int64)
    stored_before = 0  # tokens of the conversation the cluster held after the previous turn
    nodes: set[str] = set()
    for turn, user_len in enumerate([23, 9, 30, 1]):
        prompt = np.concatenate([history, rng.integers(0, VOCAB, size=user_len)])
        result = generate(gqa_model, prompt, client, max_new_tokens=6, namespace=namespace)
        assert_same_generation(result, gqa_model, prompt)
        # Everything but the previous turn's last response token (never fed back) was reused.
        assert result.matched_tokens == stored_before, f"turn {turn}"
        assert result.computed_tokens == len(prompt) - stored_before
        history = np.concatenate([prompt, np.asarray(result.tokens, dtype=np.int64)])
        stored_before = len(history) - 1
        nodes.add(result.node_id)
    assert len(nodes) == 1  # the conversation stuck to the node holding its history


@pytest.mark.parametrize("client_fixture", ["gqa_client", "gqa_cluster"])
def test_two_tenants_never_share_a_prefix(
    gqa_model: Any, client_fixture: str, request: pytest.FixtureRequest
) -> None:
    gqa_client = request.getfixturevalue(client_fixture)
    system_prompt = random_prompt(99, 40)
    question = random_prompt(98, 12)
    prompt = np.concatenate([system_prompt, question])

    first_a = generate(gqa_model, prompt, gqa_client, max_new_tokens=4, namespace="tenant-a")
    first_b = generate(gqa_model, prompt, gqa_client, max_new_tokens=4, namespace="tenant-b")
    assert first_a.matched_tokens == 0
    assert first_b.matched_tokens == 0  # tenant-a's identical prompt is invisible to tenant-b
    assert first_a.tokens == first_b.tokens
    assert_same_generation(first_b, gqa_model, prompt)

    # Each tenant now reuses its own cache, and only its own.
    other_question = np.concatenate([system_prompt, random_prompt(97, 5)])
    again_a = generate(gqa_model, other_question, gqa_client, max_new_tokens=4, namespace="tenant-a")
    assert again_a.matched_tokens == 40
    assert_same_generation(again_a, gqa_model, other_question)
    with gqa_client.lookup(prompt, namespace="tenant-c") as result:
        assert result.matched_tokens == 0


def test_generate_without_store_leaves_the_cluster_unchanged(gqa_model: Any, gqa_client: Any) -> None:
    prompt = random_prompt(3, 30)
    result = generate(gqa_model, prompt, gqa_client, max_new_tokens=3, namespace="no-store", store=False)
    assert result.stored_tokens == 0
    assert_same_generation(result, gqa_model, prompt)
    with gqa_client.lookup(prompt, namespace="no-store") as again:
        assert again.matched_tokens == 0


def test_generate_stops_after_eos(gqa_model: Any, gqa_client: Any) -> None:
    prompt = random_prompt(4, 20)
    tokens, _ = reference_generate(gqa_model, prompt, 6)
    eos = tokens[2]
    stop = tokens.index(eos) + 1
    result = generate(
        gqa_model, prompt, gqa_client, max_new_tokens=6, namespace="eos", eos_token_id=eos
    )
    assert result.tokens == tokens[:stop]
    assert result.logits.shape == (stop, VOCAB)


def test_generate_reports_consistent_timings(gqa_model: Any, gqa_client: Any) -> None:
    ticks = iter(range(100))
    result = generate(
        gqa_model, random_prompt(6, 20), gqa_client, max_new_tokens=2, namespace="timing",
        clock=lambda: float(next(ticks)),
    )
    t = result.timings
    # One clock reading per phase boundary: start, routed, fetched, first token, decoded, stored.
    assert (t.route_s, t.fetch_s, t.prefill_s, t.decode_s, t.store_s) == (1, 1, 1, 1, 1)
    assert (t.ttft_s, t.total_s) == (3, 5)


# --- misuse and failures, with a recording client --------------------------------------------


@dataclass
class _Result:
    node_id: str
    namespace: str
    matched_tokens: int


@dataclass
class RecordingClient:
    """Matches nothing; records every call; can fail a store."""

    store_error: Exception | None = None
    release_error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def route_and_lookup(self, tokens: Any, namespace: str = "default") -> _Result:
        self.calls.append("route_and_lookup")
        return _Result("node-0", namespace, 0)

    def fetch(self, result: Any) -> torch.Tensor:
        self.calls.append("fetch")
        return torch.empty(3, 2, 0, 2, 8)

    def store(self, tokens: Any, kv: torch.Tensor, namespace: str = "default", result: Any = None,
              generated_tokens: int | None = None) -> None:
        self.calls.append("store")
        self.generated_tokens = generated_tokens
        if self.store_error is not None:
            raise self.store_error

    def release(self, result: Any) -> bool:
        self.calls.append("release")
        if self.release_error is not None:
            raise self.release_error
        return True


def test_bad_arguments_raise_before_touching_the_cluster(gqa_model: Any) -> None:
    client = RecordingClient()
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        generate(gqa_model, [1, 2], client, max_new_tokens=0)
    with pytest.raises(InvalidTokens, match="non-empty"):
        generate(gqa_model, [], client, max_new_tokens=1)
    with pytest.raises(InvalidTokens, match=f"token id {VOCAB}"):
        generate(gqa_model, [1, VOCAB], client, max_new_tokens=1)
    with pytest.raises(InvalidTokens, match="integers"):
        generate(gqa_model, [1.5], client, max_new_tokens=1)
    assert client.calls == []


def test_lease_is_released_when_the_store_fails(gqa_model: Any) -> None:
    client = RecordingClient(store_error=InvalidKV("boom"))
    with pytest.raises(InvalidKV, match="boom"):
        generate(gqa_model, [1, 2, 3], client, max_new_tokens=2)
    assert client.calls == ["route_and_lookup", "fetch", "store", "release"]


def test_lease_is_released_when_the_model_fails(gqa_model: Any) -> None:
    client = RecordingClient()

    class Broken:
        config = gqa_model.config

        def parameters(self) -> Any:
            return gqa_model.parameters()

        def __call__(self, **kwargs: Any) -> Any:
            raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        generate(Broken(), [1, 2, 3], client, max_new_tokens=2)
    assert client.calls == ["route_and_lookup", "fetch", "release"]


def test_a_full_cluster_still_returns_the_generation(gqa_model: Any) -> None:
    client = RecordingClient(store_error=CapacityError("no free blocks"))
    result = generate(gqa_model, [1, 2, 3], client, max_new_tokens=2)
    assert result.stored_tokens == 0 and len(result.tokens) == 2
    assert client.calls == ["route_and_lookup", "fetch", "store", "release"]
    assert client.generated_tokens == 2  # the store reported the generated length


def test_a_node_lost_before_release_still_returns_the_generation(gqa_model: Any) -> None:
    client = RecordingClient(release_error=NodeUnavailable("node-0 died"))
    result = generate(gqa_model, [1, 2, 3], client, max_new_tokens=2)
    assert len(result.tokens) == 2 and result.stored_tokens == 4  # prompt + first token
    assert client.calls[-1] == "release"


# --- the optional extra ----------------------------------------------------------------------


def test_transformers_is_imported_only_when_used() -> None:
    """Importing the integration needs no transformers; using it without one says what to install."""
    script = """
import sys
import torch
import kvcluster.integrations.hf as hf
assert "transformers" not in sys.modules, "imported at module load"
sys.modules["transformers"] = None  # as if it were not installed
from kvcluster.errors import MissingDependency
try:
    hf.cache_from_kv(torch.zeros(1, 2, 0, 1, 4), object())
except MissingDependency as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "pip install 'kvcluster[hf]'" in out.stdout


@pytest.mark.parametrize("version", ["4.56.0", "4.57.6", "5.0.0rc1", "5.25.0", "4.60.0.dev0"])
def test_supported_transformers_versions_pass_the_check(version: str) -> None:
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.45.2", "4.55.4", "3.5.1"])
def test_a_transformers_without_per_layer_caches_is_refused_by_name(version: str) -> None:
    with pytest.raises(MissingDependency, match=f"transformers >= 4.56, found {re.escape(version)}"):
        check_transformers_version(version)


def test_the_installed_transformers_passes_the_check() -> None:
    check_transformers_version(transformers.__version__)
