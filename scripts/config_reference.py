"""Print the configuration reference (every section and field, its type, default and help) as Markdown.

The README's "Configuration reference" section is this script's output; `tests/test_readme.py`
checks that the two agree, so the reference cannot drift from the dataclasses.

Usage: python scripts/config_reference.py
"""

from __future__ import annotations

import dataclasses

from perl.config import SECTIONS, _describe, field_type


def reference() -> str:
    lines = []
    for section, cls in SECTIONS.items():
        lines += [f"#### `config.{section}`", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            if isinstance(default, list):
                default = ",".join(map(str, default)) if default else "[]"
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            kind = _describe(field_type(cls, f.name)).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {kind} | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
