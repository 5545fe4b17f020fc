#!/usr/bin/env python3
"""Every relative link of README.md and docs/*.md points at a file that exists, and every
`#anchor` (in the same file or another Markdown file) at a heading that exists, with GitHub's
heading ids. Links to URLs (`https:`, `mailto:`, ...) are not followed.

    python3 scripts/check-links.py    # one line per broken link; exit 1 when there is one
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path):
    """GitHub's ids for the headings of a Markdown file: lower case, punctuation dropped, spaces
    as hyphens, a repeated id suffixed -1, -2, ..."""
    seen, ids = {}, set()
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.M | re.S)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def main():
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    broken = checked = 0
    for src in files:
        with open(src, encoding="utf-8") as f:
            text = prose(f.read())
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(src), path)) if path else src
            where = os.path.relpath(src, ROOT)
            if not os.path.exists(dest):
                print(f"{where}: {target}: no file {os.path.relpath(dest, ROOT)}")
                broken += 1
            elif anchor and (not dest.endswith(".md") or anchor not in anchors(dest)):
                print(f"{where}: {target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
                broken += 1
    print(f"check-links: {checked} relative links in {len(files)} files, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
