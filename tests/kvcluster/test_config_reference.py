"""kvcluster.config_reference: the reference generated from the schema, and docs/configuration.md.

The committed doc must equal a fresh rendering, so it cannot drift from the models; every key
of every section must carry a description, since that text is the reference.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import kvcluster.config as config_module
from kvcluster import config_reference as ref
from kvcluster.config import KVClusterConfig
from tiers.config import Capacity

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


def test_docs_configuration_md_is_the_fresh_rendering() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert ref.generated_section(text) == ref.render_reference()
    assert ref.check(DOC, ref.render_reference()) == []
    assert ref.main(["--check", str(DOC)]) == 0


def test_every_key_has_a_description() -> None:
    assert ref.undocumented() == []


def test_every_model_in_kvcluster_config_has_a_docstring() -> None:
    models = [
        cls for _, cls in inspect.getmembers(config_module, inspect.isclass)
        if issubclass(cls, BaseModel) and cls.__module__ == config_module.__name__
    ]
    assert {m.__name__ for m in models} >= {
        "KVClusterConfig", "CacheConfig", "EvictionConfig", "ClusterConfig", "MigrationConfig"
    }
    assert [m.__name__ for m in models if not (vars(m).get("__doc__") or "").strip()] == []


def test_sections_cover_the_whole_tree_once() -> None:
    sections = ref.collect_sections()
    assert [s.path for s in sections] == [
        "", "model", "cache", "cache.eviction", "tiers", "tiers.gpu", "tiers.cpu", "tiers.nvme",
        "hashing", "registry", "router", "cluster", "migration",
    ]
    rendered = ref.render_reference()
    for section in sections:
        assert [f.path.rsplit(".", 1)[-1] for f in section.fields] == list(section.model.model_fields)
        for field in section.fields:
            assert rendered.count(f"| `{field.path}` |") == 1, field.path


def test_rows_of_real_keys() -> None:
    rendered = ref.render_reference()
    assert (
        "| `cache.block_size` | int (> 0, <= 4096) | `16` | Tokens per KV block (page). |\n"
        in rendered
    )
    assert (
        "| `tiers.gpu.eviction_policy` | `lru`, `lfu` or null | `null` | This tier's eviction "
        "order; None inherits tiers.eviction_policy. |\n" in rendered
    )
    assert "| `tiers.gpu.capacity` | size (`4GiB`, `512MiB`, bytes) or fraction of free (`50%`) | `256MiB` |" in rendered
    assert "| `tiers.nvme.paths` | list of str | `[]` |" in rendered
    assert "| `hashing.salt` | str | `\"\"` |" in rendered
    assert (
        "| `router.tier_weights` | mapping of `gpu`, `cpu` or `nvme` to float | "
        "`{gpu: 1.0, cpu: 0.8, nvme: 0.5}` |" in rendered
    )
    # The model section shows the default preset's values and what a full spec must give.
    assert "| `model` | preset name or section `model` | see below |" in rendered
    assert "| `model.num_layers` | int (> 0) | `2` (*required* in a full spec) |" in rendered
    assert "| `model.dtype` | `float32`, `float16`, `bfloat16`, `fp8_e4m3`, `fp8_e5m2` or `int8` | `float32` (`bfloat16` in a full spec) |" in rendered


class _Leaf(BaseModel):
    """A leaf section.

    Details that stay out of the reference.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["a", "b"] | None = Field(default=None, description="Mode | pipe.")
    size: Capacity = Field(default=Capacity(fraction_of_free=0.5), description="How big.")


class _Root(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(gt=0, le=8, description="How many.")
    names: tuple[str, ...] = Field(default=("x", "y"), description="Names.")
    leaf: _Leaf = Field(default_factory=_Leaf, description="The leaf.")
    spare: _Leaf | None = Field(default=None, description="")


def test_rendering_of_a_small_tree() -> None:
    sections = ref.collect_sections(_Root, _Root(count=3))
    assert [s.path for s in sections] == ["", "leaf", "spare"]
    assert sections[1].description == "The leaf. A leaf section."
    rows = [
        (f.path, f.type_text, f.default, f.own_default, f.required, f.section)
        for s in sections for f in s.fields
    ]
    size = ref.SCALAR_MODELS[Capacity]
    assert rows == [
        ("count", "int (> 0, <= 8)", "3", None, True, False),
        ("names", "list of str", "[x, y]", "[x, y]", False, False),
        ("leaf", "section `leaf`", "see below", "see below", False, True),
        ("spare", "section `spare` or null", "null", "null", False, True),
        ("leaf.mode", "`a`, `b` or null", "null", "null", False, False),
        ("leaf.size", size, "50%", "50%", False, False),
        ("spare.mode", "`a`, `b` or null", "null", "null", False, False),
        ("spare.size", size, "50%", "50%", False, False),
    ]
    assert ref.render_sections(sections) == textwrap.dedent(f"""
        ## Top level

        | key | type | default | description |
        |---|---|---|---|
        | `count` | int (> 0, <= 8) | `3` (*required* in a full spec) | How many. |
        | `names` | list of str | `[x, y]` | Names. |
        | `leaf` | section `leaf` | see below | The leaf. |
        | `spare` | section `spare` or null | `null` | - |

        ## `leaf`

        The leaf. A leaf section.

        | key | type | default | description |
        |---|---|---|---|
        | `leaf.mode` | `a`, `b` or null | `null` | Mode \\| pipe. |
        | `leaf.size` | {size} | `50%` | How big. |

        ## `spare`

        A leaf section.

        | key | type | default | description |
        |---|---|---|---|
        | `spare.mode` | `a`, `b` or null | `null` | Mode \\| pipe. |
        | `spare.size` | {size} | `50%` | How big. |
        """)
    # Without a default instance (count is required) the fields' own defaults are shown.
    bare = ref.collect_sections(_Root)
    assert [(f.path, f.default) for f in bare[0].fields] == [
        ("count", None), ("names", "[x, y]"), ("leaf", "see below"), ("spare", "null")
    ]
    assert "| `count` | int (> 0, <= 8) | *required* | How many. |" in ref.render_sections(bare)
    assert ref.undocumented(_Root) == ["spare"]


def test_undocumented_names_the_keys_without_description() -> None:
    class Root(BaseModel):
        documented: int = Field(default=1, description="Yes.")
        bare: int = 2
        blank: str = Field(default="", description="   ")

    assert ref.undocumented(Root) == ["bare", "blank"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"), (True, "true"), (False, "false"), ("", '""'), (" x", '" x"'), ("lru", "lru"),
        (0.9, "0.9"), (32768, "32768"), ((), "[]"), ({"gpu": 1.0}, "{gpu: 1.0}"),
        (Capacity(bytes=256 * 2**20), "256MiB"), (Capacity(bytes=2 * 2**30), "2GiB"),
        (Capacity(bytes=1000), "1000"), (Capacity(fraction_of_free=0.25), "25%"),
    ],
)
def test_default_text(value: object, text: str) -> None:
    assert ref.default_text(value) == text


def test_write_replaces_only_the_generated_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nIntro.\n\n{ref.BEGIN_MARKER}\nold table\n{ref.END_MARKER}\n\nOutro.\n")
    assert ref.main(["--check", str(doc)]) == 1
    assert ref.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text == (
        f"# Title\n\nIntro.\n\n{ref.BEGIN_MARKER}\n{ref.render_reference()}{ref.END_MARKER}"
        "\n\nOutro.\n"
    )
    assert ref.main(["--check", str(doc)]) == 0


def test_write_appends_markers_to_a_file_without_them(tmp_path: Path) -> None:
    doc = tmp_path / "new.md"
    assert ref.main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"{ref.BEGIN_MARKER}\n{ref.render_reference()}{ref.END_MARKER}\n"
    other = tmp_path / "other.md"
    other.write_text("# Heading\n")
    assert ref.with_generated(other.read_text(), "T\n") == (
        f"# Heading\n\n{ref.BEGIN_MARKER}\nT\n{ref.END_MARKER}\n"
    )


def test_check_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "stale.md"
    reference = ref.render_reference()
    stale.write_text(
        f"{ref.BEGIN_MARKER}\n{reference.replace('Tokens per KV block (page).', 'Tokens.')}"
        f"{ref.END_MARKER}\n"
    )
    assert ref.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "-| `cache.block_size` | int (> 0, <= 4096) | `16` | Tokens. |" in err
    assert "+| `cache.block_size` | int (> 0, <= 4096) | `16` | Tokens per KV block (page). |" in err
    assert f"--write {stale}" in err
    # A file without markers is compared whole.
    whole = tmp_path / "whole.md"
    whole.write_text(reference)
    assert ref.main(["--check", str(whole)]) == 0
    assert ref.main(["--check", str(tmp_path / "missing.md")]) == 2


def test_printing(capsys: pytest.CaptureFixture[str]) -> None:
    assert ref.main([]) == 0
    assert capsys.readouterr().out == ref.render_reference()


def test_type_text() -> None:
    assert ref.type_text(int) == "int"
    assert ref.type_text(str | None) == "str or null"
    assert ref.type_text(Literal["x", "y"]) == "`x` or `y`"
    assert ref.type_text(dict[str, float]) == "mapping of str to float"
    assert ref.type_text(KVClusterConfig) == "section"
    assert ref.type_text(tuple[int, ...]) == "list of int"
