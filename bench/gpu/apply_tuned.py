"""Merge the rows that `python -m bench.moe_kernel --tune` printed into this checkout's
`engine/kernels/fused_moe_configs.py` (appended as code: the device's copy of the tree, so that
a session can tune and then time the engine with the new rows in one call; the rows worth
keeping are pasted into TUNED by hand afterwards).

    python3 bench/gpu/apply_tuned.py OUT/tune_a.txt OUT/tune_b.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "engine" / "kernels" / "fused_moe_configs.py"
KEY = re.compile(r"^\s*(\(\d+, \d+, \d+, \d+, '\w+'\)): \($")


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """(key, row lines) of every table the tuner printed in `text`."""
    found: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = KEY.match(line)
        if not match:
            continue
        rows = []
        for row in lines[i + 1 :]:
            if row.strip() == "),":
                break
            rows.append(row.split("#")[0].rstrip())
        found.append((match.group(1), rows))
    return found


def main(paths: list[str]) -> int:
    code = []
    for path in paths:
        for key, rows in blocks(Path(path).read_text()):
            body = "\n".join(rows)
            code.append(
                f"TUNED[{key}] = tuple(sorted({{**dict(TUNED.get({key}, ())), "
                f"**dict((\n{body}\n))}}.items()))"
            )
            print(f"{path}: {key}, {len(rows)} rows")
    if not code:
        print("no tuned rows found")
        return 1
    with CONFIGS.open("a") as f:
        f.write("\n# Appended by bench/gpu/apply_tuned.py\n" + "\n".join(code) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
