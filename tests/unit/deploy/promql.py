"""A small PromQL reader for tests: which metric names does an expression select?

Not a full parser: it lexes the expression and tells metric names apart from functions,
aggregations, keywords and label names by position, which is all the contract checks need.
Syntax itself is checked by promtool.
"""

from __future__ import annotations

import re

TOKEN = re.compile(
    r"""\s+|(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"""|(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)"""
    r"""|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])""",
    re.IGNORECASE,
)
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "atan2", "inf", "nan"}
LABEL_LIST_AFTER = {"by", "without", "on", "ignoring", "group_left", "group_right"}
GRAFANA_VARS = re.compile(r"\$(__rate_interval|__interval|__range|__auto)|\$\{[^}]+\}|\$[A-Za-z_]+")


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables by values Prometheus accepts."""
    def repl(m: re.Match[str]) -> str:
        return "5m" if m.group(1) else "dwcp"
    return GRAFANA_VARS.sub(repl, expr)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; raises ValueError on a character PromQL does not have."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot lex {expr[pos:pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names selected by `expr` (bare selectors and `{__name__="..."}` ones)."""
    toks = tokens(expr)
    names: set[str] = set()
    depth_brace = depth_bracket = 0
    label_list = False
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        prev = toks[i - 1][1].lower() if i else ""
        if text == "{":
            depth_brace += 1
        elif text == "}":
            depth_brace -= 1
        elif text == "[":
            depth_bracket += 1
        elif text == "]":
            depth_bracket -= 1
        elif text == "(" and prev in LABEL_LIST_AFTER:
            label_list = True
        elif text == ")" and label_list:
            label_list = False
        elif kind == "str" and depth_brace and i >= 2 and toks[i - 2][1] == "__name__":
            names.add(text[1:-1])
        elif kind == "id" and not depth_brace and not depth_bracket and not label_list:
            if text.lower() in KEYWORDS or nxt == "(" or nxt.lower() in ("by", "without"):
                continue
            names.add(text)
    return names
