#!/usr/bin/env python3
"""Docs that cannot drift from the repository. Four checks, each a line per problem:

  links    every relative link of README.md and docs/*.md points at a file that exists, and every
           `#anchor` (same file or another Markdown file) at a heading that exists, with GitHub's
           heading ids. Links to URLs (`https:`, `mailto:`, ...) are not followed.
  paths    every repository path named in README.md, docs/*.md (in backticks or as a link) and
           .ci/run (anywhere) exists: a path is a word starting with one of the top-level folders
           below and a slash (`src/trust.rs`, `scripts/keycloak.sh`, `tests/it/`); words with a
           placeholder (`<version>`, `*`, `…`) are patterns, not paths.
  counts   "N tests", "N unit tests" and "N integration tests" in README.md and docs/*.md equal the
           number of test functions today (`#[test]` and `#[tokio::test]`: unit tests in src/,
           integration tests in tests/it/). A line with a date (2026-12-05) is a record of that
           day and is not checked; prose should rather name no count at all.
  issues   no reference to an issue tracker outside the repository ("issue 12", "issue #12",
           "#12") in README.md, docs/, .ci/run, the Makefile, scripts/, src/, tests/ or benches/:
           a reader cannot follow it, so say what is meant. `owner/project#12` or `project#12`
           (another project's tracker, named) is allowed.

    python3 scripts/check-docs.py            # all four; exit 1 when anything is found
    python3 scripts/check-docs.py links      # only the named checks
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP = ("src", "scripts", "docs", "tests", "deploy", "config", "realms", "migrations", "benches", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./+*<>…{}$-]*)" % "|".join(re.escape(t) for t in TOP))
# Named on purpose though not in the repository: files that are made or brought by the reader.
NOT_IN_REPO = {
    "config/seedkeeper.toml": "the operator's own config file, read when present",
    ".ci/keycloak-fetch.log": "written by .ci/run",
    ".ci/deny-fetch.log": "written by .ci/run",
}
COUNT = re.compile(r"\b(\d+) (unit |integration )?tests\b")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
ISSUE = re.compile(r"\bissues? #?\d+|(?<![\w/.-])#\d+\b", re.I)


def rel(path):
    return os.path.relpath(path, ROOT)


def doc_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text):
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path):
    """GitHub's ids for the headings of a Markdown file: lower case, punctuation dropped, spaces
    as hyphens, a repeated id suffixed -1, -2, ..."""
    seen, ids = {}, set()
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.M | re.S)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def check_links():
    problems, checked = [], 0
    for src in doc_files():
        for target in LINK.findall(prose(read(src))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(src), path)) if path else src
            if not os.path.exists(dest):
                problems.append(f"{rel(src)}: {target}: no file {rel(dest)}")
            elif anchor and (not dest.endswith(".md") or anchor not in anchors(dest)):
                problems.append(f"{rel(src)}: {target}: no heading #{anchor} in {rel(dest)}")
    return problems, f"{checked} relative links"


def named_paths(path):
    """(line number, path) of every repository path the file names."""
    text = read(path)
    if path.endswith(".md"):
        # Backticked spans and link targets only: prose words are not taken for paths.
        spans = [(m.start(), m.group(1)) for m in re.finditer(r"`([^`\n]+)`", text)]
        spans += [(m.start(), m.group(1)) for m in LINK.finditer(text)]
    else:
        spans = [(0, text)]
    for start, span in spans:
        for m in PATH.finditer(span):
            yield text.count("\n", 0, start + m.start()) + 1, m.group(1)


def check_paths():
    problems, checked = [], 0
    for src in doc_files() + [os.path.join(ROOT, ".ci", "run")]:
        for line, p in named_paths(src):
            if re.search(r"[<>*…{}$]", p) or p.endswith("-"):
                continue
            p = p.rstrip(".,:;)")
            if p in NOT_IN_REPO:
                continue
            checked += 1
            if not os.path.exists(os.path.join(ROOT, p)):
                problems.append(f"{rel(src)}:{line}: {p}: no such file or folder")
    return problems, f"{checked} paths"


def count_tests(folder):
    n = 0
    for path in glob.glob(os.path.join(ROOT, folder, "**", "*.rs"), recursive=True):
        n += len(re.findall(r"^\s*#\[(?:tokio::)?test\b", read(path), re.M))
    return n


def check_counts():
    unit, integration = count_tests("src"), count_tests("tests/it")
    want = {"unit ": unit, "integration ": integration, None: unit + integration}
    problems, checked = [], 0
    for src in doc_files():
        for i, line in enumerate(read(src).splitlines(), 1):
            if DATE.search(line):
                continue
            for m in COUNT.finditer(line):
                checked += 1
                n, kind = int(m.group(1)), m.group(2)
                if n != want[kind]:
                    problems.append(f"{rel(src)}:{i}: \"{m.group(0)}\": there are {want[kind]} "
                                    f"({unit} unit, {integration} integration); better, name no number")
    return problems, f"{checked} test counts ({unit} unit, {integration} integration tests today)"


def check_issues():
    files = doc_files() + [os.path.join(ROOT, p) for p in (".ci/run", "Makefile")]
    for folder, exts in [("scripts", ("*.sh", "*.py")), ("src", ("*.rs",)), ("tests", ("*.rs",)),
                         ("benches", ("*.rs",))]:
        for ext in exts:
            files += glob.glob(os.path.join(ROOT, folder, "**", ext), recursive=True)
    problems = []
    for src in sorted(set(files)):
        if os.path.abspath(src) == os.path.abspath(__file__):
            continue
        for i, line in enumerate(read(src).splitlines(), 1):
            for m in ISSUE.finditer(line):
                problems.append(f"{rel(src)}:{i}: \"{m.group(0)}\" names an issue tracker outside the "
                                "repository: say what is meant")
    return problems, f"{len(files)} files searched for issue references"


CHECKS = {"links": check_links, "paths": check_paths, "counts": check_counts, "issues": check_issues}


def main(argv):
    names = argv or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"check-docs: unknown check {unknown}; the checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        problems, summary = CHECKS[name]()
        for p in problems:
            print(p)
        print(f"check-docs {name}: {summary}, {len(problems)} wrong")
        failed += len(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
