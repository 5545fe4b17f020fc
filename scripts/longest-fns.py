#!/usr/bin/env python3
"""Print the longest Rust functions under the given folders (default: src).

Usage: scripts/longest-fns.py [-n N] [DIR...]
A function's length is its lines from the `fn` line to its closing brace. Comments and strings
are skipped when matching braces, which is enough for this codebase's style.
"""
import os
import re
import sys

FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)')


def strip(line, state):
    """Remove string, char and comment text from a line; `state` carries block comments."""
    out, i = [], 0
    while i < len(line):
        if state['block']:
            j = line.find('*/', i)
            if j < 0:
                return ''.join(out)
            state['block'], i = False, j + 2
            continue
        c = line[i]
        if line.startswith('//', i):
            break
        if line.startswith('/*', i):
            state['block'], i = True, i + 2
            continue
        if c == '"' or (c == 'r' and re.match(r'r#*"', line[i:])):
            m = re.match(r'r(#*)"', line[i:])
            if m:
                end = '"' + m.group(1)
                j = line.find(end, i + len(m.group(0)))
                if j < 0:
                    state['raw'] = end
                    return ''.join(out)
                i = j + len(end)
                continue
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == '\\' else 1
            if j >= len(line):
                state['raw'] = '"'
                return ''.join(out)
            i = j + 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return ''.join(out)


def functions(path):
    lines = open(path, encoding='utf-8').read().split('\n')
    state = {'block': False, 'raw': None}
    clean = []
    for line in lines:
        if state['raw']:
            j = line.find(state['raw'])
            if j < 0:
                clean.append('')
                continue
            line, state['raw'] = line[j + len(state['raw']):], None
        clean.append(strip(line, state))
    for n, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, opened = 0, False
        for k in range(n, len(clean)):
            for ch in clean[k]:
                if ch == '{':
                    depth, opened = depth + 1, True
                elif ch == '}':
                    depth -= 1
                elif ch == ';' and not opened and depth == 0:
                    break
            else:
                if opened and depth == 0:
                    yield k - n + 1, m.group(6), f'{path}:{n + 1}'
                    break
                continue
            break


def main(argv):
    n = 10
    if argv[:1] == ['-n']:
        n, argv = int(argv[1]), argv[2:]
    found = []
    for root in argv or ['src']:
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith('.rs'):
                    found.extend(functions(os.path.join(dirpath, f)))
    for length, name, where in sorted(found, reverse=True)[:n]:
        print(f'{length:5}  {name:40} {where}')


if __name__ == '__main__':
    main(sys.argv[1:])
