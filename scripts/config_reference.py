"""Print the config reference (every section, key, default and the comment beside it) as Markdown tables.

    python scripts/config_reference.py     # the README's "Configuration" tables are this output
"""

import dataclasses
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


def field_comments(cls: type) -> dict[str, str]:
    """The `# ...` text beside each field. Comment-only lines between two fields continue the comment of the field
    above, or, when the field below has no comment of its own, describe that one."""
    comments: dict[str, str] = {}
    previous, pending = None, []
    for line in inspect.getsource(cls).splitlines():
        if re.match(r"\s+#", line):
            pending.append(line.strip().lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s?(.*))?$", line)
        if not match:
            continue
        name, inline = match.group(1), (match.group(2) or "").strip()
        if inline and previous and pending:
            comments[previous] += " " + " ".join(pending)
        comments[name] = inline or " ".join(pending)
        previous, pending = name, []
    if previous and pending:
        comments[previous] += " " + " ".join(pending)
    return comments


def main() -> None:
    root = train.Config()
    for section in dataclasses.fields(root):
        value = getattr(root, section.name)
        cls = type(value)
        comments = field_comments(cls)
        print(f"\n**[{section.name}]** (`{cls.__module__}.{cls.__name__}`)\n")
        print("| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = getattr(value, f.name)
            shown = str(default).lower() if isinstance(default, bool) else repr(default).replace("'", '"')
            print(f"| `{f.name}` | `{shown}` | {comments.get(f.name, '').replace('|', '/')} |")


if __name__ == "__main__":
    main()
