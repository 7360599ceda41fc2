"""Writes docs/configuration.md, the configuration reference, from vae_hf/config.py.

Keys, types and defaults come from the dataclasses themselves (`dataclasses.fields` and an instance of each);
the descriptions are the string literals that follow each field (attribute docstrings), which only the
source keeps, so config.py is also parsed with `ast`. A key with a fixed set of values lists them from
`vae_hf.config.CHOICES`, where validation and the command line read them too.

    python docs/generate_config_reference.py          # rewrite the page
    python docs/generate_config_reference.py --check  # exit 1 if the committed page is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"

# This checkout's package, not whichever one an editable install points at.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vae_hf import config as config_module  # noqa: E402

HEADER = """\
<!-- Generated from vae_hf/config.py by docs/generate_config_reference.py; do not edit by hand. -->

# Configuration reference

Every key of the training configuration, with its type, its default and its description, as defined in
`vae_hf/config.py`. How a YAML file and `dotted.key=value` overrides combine is explained in the
[configuration guide](configuration-guide.md).
"""


def attribute_docstrings(source: str) -> dict[str, dict[str, str]]:
    """{class name: {field name: the string literal right after the field}} for every class in `source`."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for statement, following in zip(node.body, node.body[1:], strict=False):
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                if isinstance(following.value.value, str):
                    fields[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def yaml_text(value: object) -> str:
    """A default as it would be written in a YAML file or on the command line."""
    if isinstance(value, enum.Enum):
        return yaml_text(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {yaml_text(item)}" for key, item in value.items()) + "}"
    return repr(value)


def type_text(annotation: object) -> str:
    """The annotation as written in config.py (it is a string under `from __future__ import annotations`)."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def choices(annotation: object) -> list[str]:
    """The allowed values of an Enum- or Literal-typed field (also inside Optional or List); else none."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [yaml_text(member) for member in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [yaml_text(value) for value in typing.get_args(annotation)]
    for argument in typing.get_args(annotation):
        found = choices(argument)
        if found:
            return found
    return []


def markdown_cell(text: str) -> str:
    """Text safe inside a table cell; code spans (between backticks) are left as they are."""
    parts = " ".join(text.split()).split("`")
    for index in range(0, len(parts), 2):  # outside code spans
        parts[index] = parts[index].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


def default_of(instance: object, field: dataclasses.Field) -> object:
    if instance is not None:
        return getattr(instance, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def instantiate(cls: type) -> object | None:
    """The defaults as the dataclass builds them; None when it cannot be built without arguments."""
    try:
        return cls()
    except Exception:  # a class that needs arguments: fall back to the fields' declared defaults
        return None


def type_hints(cls: type) -> dict[str, object]:
    try:
        return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    except Exception:  # an annotation that does not resolve: keep the written text
        return {}


def section(prefix: str, cls: type, instance: object | None, docs: dict[str, dict[str, str]]) -> list[str]:
    """A table of the leaf keys of `cls`; nested dataclasses are their own sections (see `sections`)."""
    hints = type_hints(cls)
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        resolved = hints.get(field.name, field.type)
        if dataclasses.is_dataclass(resolved):
            continue
        description = docs.get(cls.__name__, {}).get(field.name, "")
        allowed = config_module.CHOICES.get(f"{prefix}{field.name}") or choices(resolved)
        if allowed:
            description += f" Choices: {', '.join(f'`{value}`' for value in allowed)}."
        default = yaml_text(default_of(instance, field))
        rows.append(
            f"| `{prefix}{field.name}` | `{type_text(field.type)}` | `{default}` | {markdown_cell(description)} |"
        )
    return rows


def sections(cls: type, docs: dict[str, dict[str, str]]) -> list[tuple[str, type, object | None]]:
    """(prefix, dataclass, its default instance) for the top level and each nested group, in field order."""
    instance = instantiate(cls)
    found = [("", cls, instance)]
    hints = type_hints(cls)
    for field in dataclasses.fields(cls):
        nested = hints.get(field.name, field.type)
        if dataclasses.is_dataclass(nested) and isinstance(nested, type):
            value = default_of(instance, field) if instance is not None else None
            found.append((f"{field.name}.", nested, value if dataclasses.is_dataclass(value) else instantiate(nested)))
    return found


def render() -> str:
    """The whole configuration reference page, deterministically."""
    docs = attribute_docstrings(Path(config_module.__file__).read_text(encoding="utf-8"))
    lines = [HEADER]
    for prefix, cls, instance in sections(config_module.Config, docs):
        title = f"`{prefix}*`" if prefix else "Top-level keys"
        lines.append(f"## {title}\n")
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # dataclasses invent a signature
            lines.append(inspect.cleandoc(cls.__doc__) + "\n")
        lines.append(f"Defined by `{cls.__name__}`.\n")
        lines.extend(section(prefix, cls, instance, docs))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python docs/generate_config_reference.py", file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)} is up to date")
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
