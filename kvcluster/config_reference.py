"""The configuration reference, generated from the config schema so that it cannot drift.

``render_reference()`` walks the pydantic models under :class:`KVClusterConfig` (the root,
its sections, the tier and routing slices and :class:`ModelSpec`) and renders markdown: one
table per section with each key's dotted path, type and allowed range, default and the
field's ``description``. ``docs/configuration.md`` holds that text between two marker lines;
a test compares it with a fresh rendering.

    python -m kvcluster.config_reference                      # print the reference
    python -m kvcluster.config_reference --write docs/configuration.md
    python -m kvcluster.config_reference --check docs/configuration.md   # exit 1 if stale

Defaults are read from a default-constructed root, so a section whose parent supplies its
default (``model`` defaults to the ``tiny-llama`` preset) shows the value that is really used.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from kvcluster.config import KVClusterConfig
from kvcluster.model_spec import PRESETS, ModelSpec
from tiers.config import Capacity

BEGIN_MARKER = "<!-- BEGIN GENERATED: python -m kvcluster.config_reference -->"
END_MARKER = "<!-- END GENERATED -->"

#: Models that a YAML file writes as one scalar; they get a row, not a section of their own.
SCALAR_MODELS: Mapping[type[BaseModel], str] = {
    Capacity: "size (`4GiB`, `512MiB`, bytes) or fraction of free (`50%`)",
}

#: Sections that a YAML file may also give as one string; the type column names that form too.
SECTION_SHORTHANDS: Mapping[type[BaseModel], str] = {ModelSpec: "preset name"}

_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """One key of the reference.

    ``default`` is the value, as YAML text, that a default-constructed root has there (None: a
    required key with no value; for a ``section``, "see below" or "null"). ``own_default`` is
    the field's own default, which differs where the parent supplies the section (the
    ``model`` preset); None when the field is required.
    """

    path: str
    type_text: str
    default: str | None
    own_default: str | None
    required: bool
    description: str
    section: bool = False


@dataclass(frozen=True, slots=True)
class SectionDoc:
    """One model in the tree: ``path`` is "" for the root, else the dotted key of the section."""

    path: str
    model: type[BaseModel]
    description: str
    fields: tuple[FieldDoc, ...]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds as a section (``Foo`` or ``Foo | None``), else None."""
    candidates = [a for a in _union_members(annotation) if a is not type(None)]
    if len(candidates) == 1:
        only = candidates[0]
        if isinstance(only, type) and issubclass(only, BaseModel) and only not in SCALAR_MODELS:
            return only
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def type_text(annotation: Any) -> str:
    """A reader's name for a field's type: ``int``, ``` `lru` or `lfu` ```, ``list of str``."""
    alternatives = _alternatives(annotation)
    if len(alternatives) <= 2:
        return " or ".join(alternatives)
    return ", ".join(alternatives[:-1]) + " or " + alternatives[-1]


def _alternatives(annotation: Any) -> list[str]:
    """The alternatives a type admits, flattened (``Literal["a", "b"] | None`` gives three)."""
    members = _union_members(annotation)
    if len(members) > 1:
        flat = [alt for m in members if m is not type(None) for alt in _alternatives(m)]
        return [*flat, "null"] if type(None) in members else flat
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [f"`{value}`" for value in typing.get_args(annotation)]
    if origin in (tuple, list, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return [f"list of {type_text(args[0])}" if args else "list"]
    if origin in (dict, Mapping):
        key, value = typing.get_args(annotation)
        return [f"mapping of {type_text(key)} to {type_text(value)}"]
    if annotation is type(None):
        return ["null"]
    if isinstance(annotation, type):
        if annotation in SCALAR_MODELS:
            return [SCALAR_MODELS[annotation]]
        if issubclass(annotation, BaseModel):
            return ["section"]
        return [annotation.__name__]
    return [str(annotation)]


def constraint_text(info: FieldInfo) -> str:
    """The numeric bounds of a field (``> 0, <= 4096``), or ""."""
    bounds = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            bounds.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            bounds.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            bounds.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            bounds.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            bounds.append(f"length >= {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            bounds.append(f"length <= {item.max_length}")
    return ", ".join(bounds)


def default_text(value: Any) -> str:
    """A default as it would be written in YAML: ``null``, ``true``, ``256MiB``, ``[]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Capacity):
        if value.bytes is not None:
            return _size_text(value.bytes)
        assert value.fraction_of_free is not None, "a Capacity holds bytes or a fraction"
        return f"{value.fraction_of_free * 100:g}%"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value != value.strip() else value
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {default_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    return str(value)


def _size_text(n: int) -> str:
    for unit, scale in _BINARY_UNITS:
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def collect_sections(
    root: type[BaseModel] = KVClusterConfig, defaults: BaseModel | None = None
) -> list[SectionDoc]:
    """Every model under ``root``, depth first in field order, root first.

    ``defaults`` is the instance whose values are the defaults shown (a default-constructed
    ``root`` when None, if ``root`` has no required field); where there is no instance, or a
    section has no value in it, the fields' own defaults are shown.
    """
    instance = defaults
    if instance is None:
        try:
            instance = root()
        except ValidationError:  # a required field: show each field's own default instead
            instance = None
    sections: list[SectionDoc] = []
    _walk(root, "", instance, root.__doc__ or "", sections)
    return sections


def _walk(
    model: type[BaseModel], path: str, instance: BaseModel | None, intro: str,
    out: list[SectionDoc],
) -> None:
    fields: list[FieldDoc] = []
    children: list[tuple[type[BaseModel], str, BaseModel | None, str]] = []
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        sub = _section_model(info.annotation)
        own = _field_default(info)
        value = getattr(instance, name) if instance is not None else own
        description = " ".join((info.description or "").split())
        if sub is not None:
            children.append((sub, key, value if isinstance(value, BaseModel) else None, description))
            shown: str | None = "see below" if value is not None else "null"
            own_shown = shown
            kind = type_text(info.annotation).replace("section", f"section `{key}`")
            if sub in SECTION_SHORTHANDS:
                kind = f"{SECTION_SHORTHANDS[sub]} or {kind}"
        else:
            shown = None if value is _MISSING else default_text(value)
            own_shown = None if own is _MISSING else default_text(own)
            kind = type_text(info.annotation)
        bounds = constraint_text(info)
        fields.append(FieldDoc(
            path=key,
            type_text=f"{kind} ({bounds})" if bounds else kind,
            default=shown,
            own_default=own_shown,
            required=info.is_required(),
            description=description,
            section=sub is not None,
        ))
    out.append(SectionDoc(path, model, _doc(model, intro), tuple(fields)))
    for sub, key, value, description in children:
        _walk(sub, key, value, description, out)


_MISSING = object()


def _field_default(info: FieldInfo) -> Any:
    if info.is_required():
        return _MISSING
    return info.get_default(call_default_factory=True)


def _doc(model: type[BaseModel], intro: str) -> str:
    """The section's text: the parent field's description, then the class docstring's summary."""
    parts = [" ".join(intro.split())] if intro.strip() else []
    own = model.__doc__ if "__doc__" in vars(model) else None
    if own and own.strip():
        summary = own.strip().split("\n\n", 1)[0]
        text = " ".join(summary.split())
        if text not in parts:
            parts.append(text)
    return " ".join(parts)


def undocumented(root: type[BaseModel] = KVClusterConfig) -> list[str]:
    """Dotted paths of the keys whose field has no description (should be empty)."""
    return [f.path for s in collect_sections(root) for f in s.fields if not f.description]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """The markdown reference of every key of :class:`KVClusterConfig`, with an introduction."""
    default_model = KVClusterConfig().model.name
    intro = [
        "Every key of a kvcluster YAML file, generated from the configuration schema "
        "(`kvcluster.config`). Unknown keys are rejected, and so is any value outside the "
        "range given beside its type. Sizes take the units `B`, `KB`, `MB`, `GB`, `TB`, "
        "`KiB`, `MiB`, `GiB` and `TiB` (any case).",
        "",
        f"Model presets: {', '.join(f'`{name}`' for name in sorted(PRESETS))}. Without a "
        f"`model` key the `{default_model}` preset is used, and its values are the defaults "
        "shown under `model`; a full model spec must give every key marked *required*.",
    ]
    return "\n".join(intro) + "\n" + render_sections(collect_sections())


def render_sections(sections: Sequence[SectionDoc]) -> str:
    """One markdown table per section, each after a blank line and a ``##`` heading."""
    lines: list[str] = []
    for section in sections:
        lines += ["", f"## `{section.path}`" if section.path else "## Top level", ""]
        if section.description:
            lines += [section.description, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for field in section.fields:
            if field.default is None:
                default = "*required*"
            elif field.section:
                default = "see below" if field.default != "null" else "`null`"
            elif field.required:  # a value only because the parent's default supplies one
                default = f"`{field.default}` (*required* in a full spec)"
            elif field.own_default != field.default:
                default = f"`{field.default}` (`{field.own_default}` in a full spec)"
            else:
                default = f"`{field.default}`"
            lines.append(
                f"| `{field.path}` | {_cell(field.type_text)} | {_cell(default)} | "
                f"{_cell(field.description) or '-'} |"
            )
    return "\n".join(lines) + "\n"


# --- the generated section of a file ----------------------------------------------------------


def generated_section(text: str) -> str | None:
    """The text between the marker lines (exclusive), or None when the markers are absent."""
    begin = text.find(BEGIN_MARKER)
    end = text.find(END_MARKER)
    if begin < 0 or end < begin:
        return None
    body = text[begin + len(BEGIN_MARKER):end]
    return body.removeprefix("\n")


def with_generated(text: str, reference: str) -> str:
    """``text`` with its generated section replaced by ``reference`` (appended when absent)."""
    block = f"{BEGIN_MARKER}\n{reference}{END_MARKER}"
    begin = text.find(BEGIN_MARKER)
    end = text.find(END_MARKER)
    if begin < 0 or end < begin:
        prefix = text if not text or text.endswith("\n\n") else text.rstrip("\n") + "\n\n"
        return prefix + block + "\n"
    return text[:begin] + block + text[end + len(END_MARKER):]


def check(path: Path, reference: str) -> list[str]:
    """Differences (unified diff lines) between ``path``'s generated section and ``reference``.

    Empty when they agree. A file without markers is compared whole.
    """
    text = path.read_text(encoding="utf-8")
    section = generated_section(text)
    current = text if section is None else section
    if current == reference:
        return []
    return list(difflib.unified_diff(
        current.splitlines(keepends=True), reference.splitlines(keepends=True),
        fromfile=str(path), tofile="generated",
    ))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvcluster.config_reference",
        description="Print the configuration reference generated from the config schema.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--check", type=Path, metavar="FILE",
        help="exit 1 if FILE's generated section differs from a fresh rendering",
    )
    group.add_argument(
        "--write", type=Path, metavar="FILE",
        help="replace FILE's generated section (between the markers) with a fresh rendering",
    )
    args = parser.parse_args(argv)
    reference = render_reference()
    if args.check is not None:
        try:
            diff = check(args.check, reference)
        except OSError as exc:
            print(f"{args.check}: cannot read: {exc.strerror}", file=sys.stderr)
            return 2
        if diff:
            sys.stderr.writelines(diff)
            print(f"{args.check} is stale; regenerate it with: python -m "
                  f"kvcluster.config_reference --write {args.check}", file=sys.stderr)
            return 1
        return 0
    if args.write is not None:
        old = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(with_generated(old, reference), encoding="utf-8")
        return 0
    sys.stdout.write(reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
