"""The README's reference of every operator's arguments and of the editing helpers, generated from the code.

The reference is built from the declarations the code itself uses: each operator's signature and the
``:param:`` lines of its docstring (for the dedicated operators those come from
:data:`evolink_provider.models.FIELD_DOCS`, the same table that checks the fields), the known models' field
docs for the generic operator's request fields, and the editing helpers' signatures and docstrings. It sits
in README.md between ``<!-- reference:start -->`` and ``<!-- reference:end -->``; a test keeps the two
equal, so the README cannot drift from the code.

``python -m evolink_provider.docs`` prints it; ``python -m evolink_provider.docs README.md`` rewrites the
README's section in place.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
_PARAM = re.compile(r"^:param (\w+): ?(.*)$")


def param_docs(obj: Any) -> dict[str, str]:
    """The ``:param name: text`` entries of ``obj``'s docstring, continuation lines joined."""
    docs: dict[str, str] = {}
    current: str | None = None
    for line in inspect.cleandoc(obj.__doc__ or "").splitlines():
        match = _PARAM.match(line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    return " ".join(inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].split())


def _markdown(text: str) -> str:
    """reStructuredText literals and roles as Markdown; ``|`` escaped for tables."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _default(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return "required"
    if parameter.name == "deferrable":  # read from Airflow's configuration when the module is imported
        return "`[operators] default_deferrable`"
    return f"`{parameter.default!r}`"


def _own_arguments(cls: type, skip: set[str]) -> list[tuple[str, str, str]]:
    """``(name, default, doc)`` of the keyword arguments ``cls.__init__`` declares itself."""
    docs = param_docs(cls)
    rows = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():  # type: ignore[misc]
        if name in skip or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        rows.append((name, _default(parameter), docs.get(name, "")))
    return rows


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| argument | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {_markdown(default)} | {_markdown(doc)} |" for name, default, doc in rows]
    return lines


def _model_fields() -> list[str]:
    """Each known model's request fields, models with the same fields and docs grouped."""
    from evolink_provider.models import KNOWN_MODELS, field_docs

    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for model in sorted(KNOWN_MODELS):
        groups.setdefault(tuple(field_docs(model).items()), []).append(model)
    lines = []
    for fields, models in groups.items():
        lines += ["", f"**{', '.join(f'`{model}`' for model in models)}**", ""]
        lines += [f"- `{name}`: {_markdown(doc)}" for name, doc in fields]
    return lines


def _editing_helpers() -> list[str]:
    from evolink_provider import editing

    helpers: list[Callable[..., Any]] = [
        editing.probe,
        editing.trim,
        editing.add_watermark,
        editing.thumbnail,
        editing.concat,
        editing.contact_sheet,
    ]
    lines = ["| helper | what it does |", "|---|---|"]
    for helper in helpers:
        signature = str(inspect.signature(helper)).replace("'", "")
        signature = re.sub(r" -> .*$", "", signature)
        lines.append(f"| `{helper.__name__}{_markdown(signature)}` | {_markdown(_summary(helper))} |")
    return lines


def reference() -> str:
    """The README's reference section (Markdown), from the code's declarations."""
    from airflow.sdk import BaseOperator

    from evolink_provider import editing
    from evolink_provider.operators.base import EvolinkBaseVideoOperator
    from evolink_provider.operators.evolink import (
        EvolinkHappyHorseReferenceToVideoOperator,
        EvolinkHappyHorseTextToVideoOperator,
        EvolinkSeedanceTextToVideoOperator,
        EvolinkSoraCharacterOperator,
        EvolinkVideoGenerationOperator,
    )
    from evolink_provider.operators.upload import EvolinkUploadImagesOperator

    base = set(inspect.signature(BaseOperator.__init__).parameters)
    common = set(inspect.signature(EvolinkBaseVideoOperator.__init__).parameters)
    lines = [
        "Generated from the code (`python -m evolink_provider.docs README.md`); a test keeps it equal to it.",
        "",
        "#### Arguments every generation operator takes",
        "",
        *_table(_own_arguments(EvolinkBaseVideoOperator, base | {"self"})),
    ]
    for cls in (
        EvolinkSeedanceTextToVideoOperator,
        EvolinkHappyHorseReferenceToVideoOperator,
        EvolinkHappyHorseTextToVideoOperator,
        EvolinkSoraCharacterOperator,
        EvolinkVideoGenerationOperator,
        EvolinkUploadImagesOperator,
    ):
        skip = base | {"self"} | (common if issubclass(cls, EvolinkBaseVideoOperator) else set())
        lines += [
            "",
            f"#### `{cls.__name__}`",
            "",
            _markdown(_summary(cls)),
            "",
            *_table(_own_arguments(cls, skip)),
        ]
        if cls is EvolinkVideoGenerationOperator:
            lines += [
                "",
                "Its request fields (keyword arguments or `request_fields`), per known model; other models'",
                "fields are passed through unchecked:",
                *_model_fields(),
            ]
    lines += [
        "",
        "#### Editing helpers (`evolink_provider.editing`, extra `ffmpeg`)",
        "",
        _markdown(_summary(editing)),
        "Inputs and outputs are local paths, storage URIs (`s3://conn_id@bucket/key`, ...) or",
        "`ObjectStoragePath`s; a storage output comes back as an `ObjectStoragePath`, a local one as a",
        "`Path`.",
        "",
        *_editing_helpers(),
    ]
    return "\n".join(lines) + "\n"


def replace_in(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced by ``section``."""
    before, start, rest = text.partition(START)
    _old, end, after = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the README has no {START} ... {END} section")
    return f"{before}{START}\n{section}{END}{after}"


def section_of(text: str) -> str:
    """The part of ``text`` between the markers."""
    return text.partition(START)[2].partition(END)[0].removeprefix("\n")


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(reference())
        return 0
    path = Path(argv[0])
    path.write_text(replace_in(path.read_text(encoding="utf-8"), reference()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
