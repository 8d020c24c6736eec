"""What the Docker image's build stage sees: the files its COPY lines copy, out of the build
context that .dockerignore leaves, laid out as they are under its WORKDIR. Used by .ci/run, which
builds the wheel from that directory alone (no Docker engine runs here), so an image that would
miss a file (the playground, the OpenAPI document, a new folder) fails CI.

    python tests/dockerfile_context.py Dockerfile /tmp/empty-dir
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path


def _pattern(glob: str) -> re.Pattern:
    """A .dockerignore pattern as Go's filepath.Match reads it, with `**` for any depth."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**", i):
            out, i = out + ".*", i + 2
            if glob.startswith("/", i):
                i += 1
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent directories, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, pattern in rules:
        if any(pattern.match(c) for c in candidates):
            verdict = not negated
    return verdict


def build_context(root: Path) -> list[str]:
    """The files of the checkout that reach the build (relative paths)."""
    rules = []
    ignore = root / ".dockerignore"
    for line in ignore.read_text().splitlines() if ignore.is_file() else []:
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith(".git/") and not ignored(relative, rules):
            files.append(relative)
    return files


def copy_lines(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY, in any stage, that copies from the context (not --from)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    copies, stage = [], 0
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True) if line.strip() else []
        if not words:
            continue
        if words[0].upper() == "FROM":
            stage += 1
        if stage >= 1 and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            copies.append((args[:-1], args[-1]))
    return copies


def main(dockerfile: str, into: str) -> int:
    dockerfile_path = Path(dockerfile).resolve()
    root, target = dockerfile_path.parent, Path(into)
    context = build_context(root)
    copied = 0
    for sources, destination in copy_lines(dockerfile_path):
        for source in sources:
            source = source.strip("/").removeprefix("./")
            matched = [f for f in context if f == source or f.startswith(source + "/")]
            if not matched:
                print(f"dockerfile_context: COPY {source} copies nothing (missing, or .dockerignore'd)")
                return 1
            for f in matched:
                inside = f[len(source) + 1 :] if f != source else Path(f).name
                if f == source and not destination.endswith("/") and len(sources) == 1:
                    out = target / destination
                else:
                    out = target / destination / inside
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / f, out)
                copied += 1
    print(f"dockerfile_context: {copied} files copied as the image's build stage has them, into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
