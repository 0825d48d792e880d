"""Print pip's index settings as `uv pip install` options, so the fast installer sees the same registries.

`make` installs the lock with uv (about 45 s instead of pip's 300-400 s on a 2-core machine), but uv does not read
pip's configuration files or PIP_* variables (astral-sh/uv#1404): a machine whose only registries are set up for
pip (a mirror, a local wheel folder, a corporate CA) would send uv to pypi.org. This reads what pip would use
(`pip config list`: global < user < site < environment) and prints the matching uv options, one per line.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys

# pip key → uv option; pip's list-valued keys hold whitespace-separated values
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "cert": "--cert",
}
SCOPE_ORDER = ["global", "user", "site", ":env:", ":env-var:"]  # later wins, as in pip


def pip_settings(listing: str) -> dict[str, str]:
    """The value pip would use for each key in OPTIONS, from `pip config list` output (`scope.key='value'`)."""
    found: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if not sep or key not in OPTIONS:
            continue
        rank = SCOPE_ORDER.index(scope) if scope in SCOPE_ORDER else len(SCOPE_ORDER)
        if key not in found or rank >= found[key][0]:
            found[key] = (rank, value.strip().strip("'\""))
    return {key: value for key, (_, value) in found.items()}


def uv_args(settings: dict[str, str]) -> list[str]:
    args: list[str] = []
    for key, option in OPTIONS.items():
        for value in settings.get(key, "").split():
            args += [option, value]
    return args


def main() -> int:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    print("\n".join(uv_args(pip_settings(listing))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
