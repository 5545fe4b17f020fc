#!/usr/bin/env python3
"""Print the crate's module import graph's circles and its longest files.

Usage: scripts/module-graph.py [--top] [--fail-on-circles] [SRC]   (default: src)
A module is a file under SRC (`foo/mod.rs` is `foo`). An edge A -> B is a `crate::B...`,
`super::B...` or `self::B...` path named in A outside its `#[cfg(test)]` module (a `super::` is
resolved against A's own place), also inside `use ...::{...}` groups; B is cut to the longest
module that exists. The circles printed are the strongly connected components with more than one
module, each with one cycle through it as evidence. With --top, every module counts as its
top-level module (`identity::keycloak::client` as `identity`), and edges inside one top-level
module are dropped. With --fail-on-circles the exit status is 1 when any circle is printed (CI
and `make lint` run it so).
"""
import os
import signal
import re
import sys

FLAGS = ('--top', '--fail-on-circles')
args = [a for a in sys.argv[1:] if a not in FLAGS]
top = '--top' in sys.argv[1:]
fail_on_circles = '--fail-on-circles' in sys.argv[1:]
src = args[0] if args else 'src'
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
files = {}
for d, _, fs in os.walk(src):
    for f in fs:
        if f.endswith('.rs'):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] == 'mod':
                rel = rel[:-1]
            if rel in (['lib'], ['main']):
                rel = []
            files['::'.join(rel)] = p

# A path from the crate root, the module itself or a parent: `crate::a::b`, `self::a`,
# `super::super::a`. The head is resolved against the naming module in `absolute`.
HEAD = r'(?:crate|self|super(?:::super)*)'
PATH = re.compile(r'\b(' + HEAD + r')::((?:\w+::)*\w+)')
USE_GROUP = re.compile(r'\buse (' + HEAD + r')::((?:\w+::)*)\{([^;]*)\}', re.S)


def absolute(module, head, rest):
    """`head::rest` named in `module`, as a path from the crate root."""
    if head == 'crate':
        base = []
    else:
        # A file's `self` is the file's module; each `super` goes one module up.
        base = module.split('::') if module else []
        ups = head.count('super')
        base = base[:len(base) - ups] if ups <= len(base) else []
    return '::'.join(base + [x for x in rest.split('::') if x])


def resolve(path):
    parts = path.split('::')
    for n in range(len(parts), 0, -1):
        m = '::'.join(parts[:n])
        if m in files:
            return m
    return None


edges = {m: set() for m in files}
for m, p in files.items():
    text = open(p).read()
    cut = text.find('#[cfg(test)]\nmod tests')
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r'//[^\n]*', '', text)
    found = [absolute(m, x.group(1), x.group(2)) for x in PATH.finditer(text)]
    for g in USE_GROUP.finditer(text):
        prefix = g.group(2)
        for item in re.split(r'[,\s{}]+', g.group(3)):
            if item and item not in ('self', '*'):
                found.append(absolute(m, g.group(1), prefix + item.split(':')[0]))
    for f in found:
        t = resolve(f)
        if t is not None and t != m and t != '':
            edges[m].add(t)

if top:
    folded = {}
    for m, ts in edges.items():
        head = m.split('::')[0]
        folded.setdefault(head, set())
        folded[head] |= {t.split('::')[0] for t in ts} - {head, ''}
    edges = folded
    files = {m: p for m, p in files.items() if '::' not in m}

# Tarjan's strongly connected components.
index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        comps.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        strong(v)


def cycle(comp):
    s = set(comp)
    start = comp[0]
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w in s and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


circles = [c for c in comps if len(c) > 1]
print(f'import circles: {len(circles)}')
for c in circles:
    print(f'  {{{", ".join(c)}}}: {" -> ".join(cycle(c))}')
print('longest files:')
for m, p in sorted(files.items(), key=lambda kv: -sum(1 for _ in open(kv[1])))[:10]:
    print(f'  {sum(1 for _ in open(p)):5}  {p}')
if fail_on_circles and circles:
    print(f'module-graph: {len(circles)} import circle(s): break them (see docs/development.md)',
          file=sys.stderr)
    sys.exit(1)
