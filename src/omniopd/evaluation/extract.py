"""Extracting code from a model's answer (one path for every benchmark and for GRPO's reward).

:func:`extract_code` drops everything up to the last ``</think>``, takes the fenced Python blocks or the text
itself, and cuts a continuation of the prompt at the official HumanEval stop sequences; :func:`sanitize_code`
reduces a program to its imports, definitions and the globals they use, so top-level statements (tests,
prints, ``sys.exit(0)``) drop out (``evaluation.code`` has how a grade uses them).
"""

from __future__ import annotations

import ast
import re

# The official HumanEval stop sequences, applied to a completion that continues the prompt.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_CODE_START = re.compile(r"^(?:def |async def |class |import |from \S+ import |@)", re.MULTILINE)


def extract_code(answer: str, entry_point: str | None = None, *, sanitize: bool = True) -> str:
    """The code in a model's answer.

    Drops everything up to the last ``</think>``. With fenced blocks: the Python (or untagged)
    blocks; when ``sanitize``, each block that parses is reduced to its imports and definitions and
    the blocks are joined in order (later definitions win), so "example usage" blocks and test calls
    drop out; when no block defines ``entry_point``, the longest block as is. Without fences: the
    text itself, if it parses; a continuation of a prompt (an indented body) cut at the HumanEval
    stop sequences; else the code from its first ``def``/``import`` line, trimmed at the end until it
    parses.
    """
    text = answer
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if blocks:
        python = [body for tag, body in blocks if tag in _PYTHON_TAGS] or [body for _, body in blocks]
        if sanitize:
            parts = [sanitize_code(body) for body in python if parses(body)]
            parts = [p for p in parts if p.strip()]
            joined = "\n\n".join(parts)
            if parts and (entry_point is None or defines(joined, entry_point)):
                return joined.rstrip() + "\n"
        else:
            defining = [b for b in python if entry_point is not None and defines(b, entry_point)]
            if defining:
                return defining[-1].rstrip() + "\n"
        return _strip_blank_lines(max(python, key=len)).rstrip() + "\n"
    body = _strip_blank_lines(text).rstrip()
    if not body:
        return ""
    if parses(body):
        return (sanitize_code(body) if sanitize else body).rstrip() + "\n"
    if body[:1] in (" ", "\t"):
        return _cut_at_stops(body).rstrip() + "\n"
    m = _CODE_START.search(body)
    if m:
        lines = body[m.start() :].splitlines()
        for end in range(len(lines), 0, -1):
            candidate = "\n".join(lines[:end])
            if parses(candidate):
                return (sanitize_code(candidate) if sanitize else candidate).rstrip() + "\n"
    return body + "\n"


def _strip_blank_lines(text: str) -> str:
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def _cut_at_stops(text: str) -> str:
    cut = len(text)
    for stop in HUMANEVAL_STOP:
        i = text.find(stop)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    return any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name for n in tree.body
    ) or any(
        isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
        for n in tree.body
    )


def _is_setup(node: ast.stmt) -> bool:
    """``sys.setrecursionlimit(...)``, or ``try: import ...`` (with any fallback)."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        return isinstance(func, ast.Attribute) and func.attr == "setrecursionlimit"
    if isinstance(node, ast.Try):
        return bool(node.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
    return False


def sanitize_code(code: str) -> str:
    """Keep the top-level imports (``try: import ...`` blocks included), function and class
    definitions, ``sys.setrecursionlimit(...)`` and the assignments the definitions use
    (``MOD = 10**9 + 7``); drop the rest (tests, prints, ``if __name__ == '__main__'``). Code that does
    not parse is returned unchanged."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return code
    lines = code.splitlines()
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    keep: set[int] = set()
    used: set[str] = set()

    def names_in(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom, *defs)) or _is_setup(node):
            keep.add(i)
            if isinstance(node, (*defs, ast.Try)):
                used |= names_in(node)
    assigns = {
        i: node
        for i, node in enumerate(tree.body)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(node, "value", None) is not None
    }
    changed = True
    while changed:
        changed = False
        for i, node in assigns.items():
            if i in keep:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = set().union(*(names_in(t) for t in targets))
            if bound & used and node.value is not None:
                keep.add(i)
                used |= names_in(node.value)
                changed = True
    out = []
    for i, node in enumerate(tree.body):
        if i not in keep:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        end = node.end_lineno or node.lineno
        out.append("\n".join(lines[start - 1 : end]))
    return "\n\n".join(out) + ("\n" if out else "")
