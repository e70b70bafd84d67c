"""Workload pre-flight analysis: exact counts, shared prefixes, replayed hit rates per policy,
trace reading and expansion, and the ``kvcluster analyze`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.cli import main
from kvcluster.commands.analyze import parse_sizes
from kvcluster.core.workload_analysis import PromptTrie, analyze_workload
from kvcluster.core.workload_reader import Workload, expand_hash_ids, read_workload
from kvcluster.errors import InvalidArgument, InvalidWorkload

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mooncake_sample.jsonl"


def common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_counts_unique_tokens_and_shared_prefixes() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4], [9]]
    analysis = analyze_workload(prompts, block_size=2, cache_sizes=[1000])
    assert (analysis.prompts, analysis.total_tokens, analysis.unique_tokens) == (4, 13, 6)
    assert analysis.dedup_ratio == pytest.approx(13 / 6)
    assert analysis.infinite_hit_rate == pytest.approx(7 / 13)
    top = [(p.tokens, p.prompts, p.saved_tokens, p.preview) for p in analysis.top_prefixes]
    assert top == [(3, 3, 6, (1, 2, 3)), (4, 2, 4, (1, 2, 3, 4))]
    # A cache large enough for everything serves exactly what an unbounded one does.
    assert [p.hit_tokens for p in analysis.curve] == [7, 7, 7]  # lru, lfu, reuse


def test_replay_follows_the_eviction_policy() -> None:
    prompts = [[1, 1], [1, 1], [2, 2], [3, 3], [1, 1]]
    analysis = analyze_workload(prompts, block_size=2, cache_sizes=[4], policies=("lru", "lfu"))
    # Two blocks: LRU drops [1 1] for [3 3] (used before [2 2]); LFU keeps it (used twice).
    assert analysis.hit_rate(4, "lru") == pytest.approx(2 / 10)
    assert analysis.hit_rate(4, "lfu") == pytest.approx(4 / 10)
    assert analysis.recommended_policy == "lfu"


def test_small_cache_keeps_what_fits_and_recommends_the_smallest_good_size() -> None:
    rng = np.random.default_rng(1)
    system = rng.integers(0, 1000, 64).tolist()
    prompts = [system + rng.integers(0, 1000, 16).tolist() for _ in range(40)]
    analysis = analyze_workload(prompts, block_size=16, cache_sizes=[16, 64, 128, 4096])
    rates = [analysis.hit_rate(s, "lru") for s in (16, 64, 128, 4096)]
    assert rates == sorted(rates) and rates[0] < rates[2]
    assert rates[-1] == pytest.approx(analysis.infinite_hit_rate)
    assert analysis.infinite_hit_rate == pytest.approx(39 * 64 / (40 * 80))
    # 64 tokens hold the system prompt: every later prompt reuses it.
    assert analysis.hit_rate(64, "lru") == pytest.approx(analysis.infinite_hit_rate)
    assert analysis.recommended_cache_tokens == 64


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=25))
def test_trie_counts_equal_brute_force(prompts: list[list[int]]) -> None:
    expected_unique = sum(
        len(p) - max((common(p, q) for q in prompts[:i]), default=0) for i, p in enumerate(prompts)
    )
    trie = PromptTrie()
    got = [trie.add(np.asarray(p, dtype=np.int64).tobytes()) for p in prompts]
    assert got == [max((common(p, q) for q in prompts[:i]), default=0) for i, p in enumerate(prompts)]
    analysis = analyze_workload(prompts, block_size=4, cache_sizes=[10_000])
    assert analysis.unique_tokens == expected_unique
    assert analysis.curve[0].hit_tokens == analysis.total_tokens - expected_unique


def test_trace_at_block_granularity(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"hash_ids": [1, 2, 3], "input_length": 1100},
        {"hash_ids": [1, 2, 4], "input_length": 1500},
        {"hash_ids": [1, 5], "input_length": 600},
    ]
    trace.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    workload = read_workload(trace)
    assert (workload.kind, workload.symbol_tokens, workload.total_tokens) == ("trace", 512, 3200)
    analysis = analyze_workload(workload, cache_sizes=[512 * 100])
    # Prompt 2 reuses blocks 1, 2 (1024 tokens); prompt 3 block 1 (512).
    assert analysis.unique_tokens == 3200 - 1536
    assert analysis.curve[0].hit_tokens == 1536
    assert analysis.block_size == 512
    tokens = analyze_workload(workload.expanded(), cache_sizes=[100_000], block_size=16)
    assert tokens.total_tokens == 3200 and tokens.symbol_tokens == 1
    assert tokens.unique_tokens <= analysis.unique_tokens  # equal up to chance matching tokens
    assert tokens.unique_tokens >= analysis.unique_tokens - 3


def test_expansion_is_deterministic_and_seeded_by_the_id() -> None:
    a = expand_hash_ids([7, 8, 9], 1200)
    assert a.shape == (1200,) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 32000
    assert np.array_equal(a, expand_hash_ids([7, 8, 9], 1200))
    b = expand_hash_ids([7, 8, 10], 1500)
    assert np.array_equal(a[:1024], b[:1024]) and not np.array_equal(a[1024:1200], b[1024:1200])
    assert not np.array_equal(expand_hash_ids([8], 512), expand_hash_ids([7], 512))
    # A block's tokens do not depend on where in a prompt the block appears.
    assert np.array_equal(expand_hash_ids([9], 512), expand_hash_ids([7, 9], 1024)[512:])


def test_sample_trace_expanded_matches_block_level() -> None:
    workload = read_workload(SAMPLE, limit=60)
    blocks = analyze_workload(workload, cache_sizes=[2_000_000], top=3)
    tokens = analyze_workload(workload.expanded(), cache_sizes=[2_000_000], top=3)
    assert tokens.total_tokens == blocks.total_tokens
    assert tokens.infinite_hit_rate == pytest.approx(blocks.infinite_hit_rate, abs=1e-4)
    assert blocks.top_prefixes[0].tokens == tokens.top_prefixes[0].tokens // 512 * 512


def test_default_sizes_reach_the_unbounded_hit_rate() -> None:
    workload = read_workload(SAMPLE, limit=80)
    analysis = analyze_workload(workload)
    assert len(analysis.cache_sizes) == 7
    largest = max(analysis.cache_sizes)
    for policy in ("lru", "lfu"):
        assert analysis.hit_rate(largest, policy) == pytest.approx(analysis.infinite_hit_rate)
    assert analysis.recommended_cache_tokens is not None
    best = max(analysis.hit_rate(analysis.recommended_cache_tokens, p) for p in ("lru", "lfu"))
    assert best >= 0.9 * analysis.infinite_hit_rate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"policies": ("lru+ttl",)}, "TTL"), ({"policies": ("mru",)}, "lru, lfu, reuse, ttl"), ({"policies": ()}, "policy"),
     ({"block_size": 0}, "block_size"), ({"target": 0}, "target"), ({"cache_sizes": [0]}, "cache sizes")],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        analyze_workload([[1, 2, 3]], **kwargs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"tokens": [1, 2]}\nnot json\n', ":2: not valid JSON"),
        ('{"tokens": [1, 2]}\n{"text": "hi"}\n', ":2: a 'text' line"),
        ('{"text": "hello"}\n', "name a tokenizer"),
        ('{"hash_ids": [1, 2], "input_length": 2000}\n', "does not fit 2 block"),
        ('{"tokens": [1, -2]}\n', "negative"),
        ('{"tokens": []}\n', "non-empty"),
        ('{"tokens": [1.5]}\n', "integers"),
        ('{"prompt": [1]}\n', "expected a 'tokens'"),
        ('{"tokens": [1], "output_length": -4}\n', ":1: 'output_length' must be an integer >= 0, got -4"),
        ('{"tokens": [1], "generated_tokens": "7"}\n', "'generated_tokens' must be an integer >= 0"),
        ("\n", "no prompts"),
    ],
)
def test_bad_workload_files_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidWorkload, match=message):
        read_workload(path)


def test_generated_lengths_reach_the_reuse_replay(tmp_path: Path) -> None:
    sample = read_workload(SAMPLE, limit=5)
    assert sample.generated()[:2] == (36, 54)  # the trace's output_length
    path = tmp_path / "chats.jsonl"
    # Chats whose first turns (short answers) come back, among one-offs with long answers
    # that never do: only the generated lengths tell them apart at store time.
    lines = []
    for r in range(40):
        first = list(range(1000 * r, 1000 * r + 12))
        lines.append({"tokens": first, "generated_tokens": 4})
        lines.append({"tokens": list(range(1000 * r + 100, 1000 * r + 112)), "generated_tokens": 700})
        lines.append({"tokens": list(range(1000 * r + 200, 1000 * r + 212)), "generated_tokens": 700})
        lines.append({"tokens": first + list(range(1000 * r + 50, 1000 * r + 58)), "generated_tokens": 4})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    workload = read_workload(path)
    assert workload.generated()[:4] == (4, 700, 700, 4)
    analysis = analyze_workload(workload, block_size=4, cache_sizes=[28])
    assert analysis.hit_rate(28, "lru") < 0.1  # at most a first block of each first turn
    assert analysis.hit_rate(28, "reuse") > 0.5 * analysis.infinite_hit_rate
    assert analysis.recommended_policy == "reuse"
    unhinted = analyze_workload(Workload(workload.records, workload.num_tokens, "tokens"), block_size=4,
                                cache_sizes=[28], policies=("reuse",))
    assert unhinted.hit_rate(28, "reuse") < analysis.hit_rate(28, "reuse")


def test_text_prompts_use_the_given_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "ab"}\n{"text": "abc"}\n')
    workload = read_workload(path, tokenizer=lambda text: [ord(c) for c in text])
    assert [r.tolist() for r in workload.records] == [[97, 98], [97, 98, 99]]
    assert analyze_workload(workload, cache_sizes=[64], block_size=2).unique_tokens == 3
    with pytest.raises(InvalidWorkload, match="only a block trace"):
        workload.expanded()
    assert Workload.from_prompts([[1, 2]]).kind == "tokens"


def test_parse_sizes() -> None:
    assert parse_sizes("64K, 1M,1.5M,500") == [64_000, 1_000_000, 1_500_000, 500]
    for bad in ("1X", "0", "-5K", "nanK"):
        with pytest.raises(InvalidArgument):
            parse_sizes(bad)


def test_cli_prints_tables_and_writes_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot, report = tmp_path / "hit.png", tmp_path / "analysis.json"
    code = main(["analyze", str(SAMPLE), "--limit", "50", "--model", "llama-3-8b", "--plot", str(plot), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "unique tokens" in out and "Top shared prefixes" in out and "Recommended" in out and "GiB" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    expected = analyze_workload(read_workload(SAMPLE, limit=50))
    assert data["total_tokens"] == expected.total_tokens and data["unique_tokens"] == expected.unique_tokens
    assert len(data["curve"]) == 21  # 7 sizes x lru, lfu, reuse


def test_cli_token_level_with_given_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": [1, 2, 3, 4, i]}) + "\n" for i in range(10)))
    code = main(["analyze", str(prompts), "--cache-sizes", "16,32", "--policies", "lru", "--no-plot", "--block-size", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "lfu" not in out and "72.0%" in out  # 9 prompts reuse 4 of 5 tokens: 36 of 50
    assert not list(tmp_path.glob("*.png"))


def test_cli_reports_an_unavailable_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "hello"}\n')
    code = main(["analyze", str(texts), "--tokenizer", "no-such-org/no-such-tokenizer", "--no-plot"])
    assert code == 2
    assert "not available offline" in capsys.readouterr().err


def test_cli_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing.jsonl"), "--no-plot"]) == 2
    assert "cannot read the workload" in capsys.readouterr().err


def test_cli_text_prompts_with_a_local_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "you": 1, "are": 2, "a": 3, "helpful": 4, "assistant": 5, "hi": 6, "bye": 7}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"you are a helpful assistant {w}"}) + "\n" for w in ("hi", "bye", "hi")))
    report = tmp_path / "a.json"
    code = main(["analyze", str(texts), "--tokenizer", str(tmp_path / "tok"), "--no-plot", "--json", str(report),
                 "--cache-sizes", "64", "--block-size", "2"])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    # 6 tokens each; the second reuses 5, the third all 6.
    assert (data["total_tokens"], data["unique_tokens"]) == (18, 7)
    assert data["top_prefixes"][0]["preview"] == [1, 2, 3, 4, 5]
