"""HTML view of a program state for notebooks (``ProgramState._repr_html_``).

The conversation, one box per role block, with generated text highlighted (hover shows the
variable), template text dimmed, then a table of the backend calls: tokens, cached tokens, latency.
Every piece of program or model text is escaped.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from plait.lang.records import CallRecord, Segment

if TYPE_CHECKING:
    from plait.lang.state import ProgramState

__all__ = ["render_state_html"]

_STYLE = (
    "<style>.plait-state{font-family:ui-monospace,monospace;font-size:13px}"
    ".plait-msg{border:1px solid #ccc;border-radius:6px;margin:4px 0;padding:4px 8px;white-space:pre-wrap}"
    ".plait-role{font-weight:bold;font-size:11px;text-transform:uppercase;color:#555}"
    ".plait-gen{background:#d9f2d9;border-bottom:2px solid #3a3}"
    ".plait-select{background:#dde8fb;border-bottom:2px solid #36c}"
    ".plait-tpl{color:#999}.plait-plain{white-space:pre-wrap}"
    ".plait-calls td,.plait-calls th{padding:2px 8px;text-align:right}</style>"
)


def _span(seg: Segment) -> str:
    text = escape(seg.text)
    if seg.kind in ("gen", "select"):
        title = escape(f"{seg.kind} {seg.name}" if seg.name else seg.kind, quote=True)
        return f'<span class="plait-{seg.kind}" title="{title}">{text}</span>'
    if seg.kind in ("role_prefix", "role_suffix"):
        return f'<span class="plait-tpl">{text}</span>'
    return text


def _merge(segments: list[Segment]) -> list[Segment]:
    """Adjacent pieces of one streamed generation become one segment."""
    merged: list[Segment] = []
    for seg in segments:
        last = merged[-1] if merged else None
        if last and last.kind == seg.kind and last.name == seg.name and last.role == seg.role and seg.kind != "role_prefix":
            merged[-1] = Segment(last.kind, last.text + seg.text, last.role, last.name)
        else:
            merged.append(seg)
    return merged


def _conversation(segments: list[Segment]) -> list[str]:
    parts: list[str] = []
    block: list[str] | None = None
    role = None
    for seg in _merge(segments):
        if seg.kind == "role_prefix":
            block, role = [], seg.role
            block.append(_span(seg))
        elif seg.kind == "role_suffix" and block is not None:
            block.append(_span(seg))
            parts.append(
                f'<div class="plait-msg"><div class="plait-role">{escape(str(role))}</div>{"".join(block)}</div>'
            )
            block = None
        elif block is not None:
            block.append(_span(seg))
        else:
            parts.append(f'<span class="plait-plain">{_span(seg)}</span>')
    if block is not None:  # an open role block (a state read mid-run)
        parts.append(f'<div class="plait-msg"><div class="plait-role">{escape(str(role))} (open)</div>{"".join(block)}</div>')
    return parts


def _call_name(call: CallRecord) -> str:
    return str(call.name) if call.branch is None else f"{call.name} (fork {call.branch})"


def _calls_table(calls: list[CallRecord]) -> str:
    if not calls:
        return ""
    header = (
        "<tr><th>call</th><th>name</th><th>prompt tokens</th><th>cached tokens</th>"
        "<th>output tokens</th><th>latency</th><th>finish</th></tr>"
    )
    rows = [header]
    for c in calls:
        finish = (c.finish_reason or {}).get("type", "") if c.kind == "gen" else ""
        rows.append(
            f"<tr><td>{escape(c.kind)}</td><td>{escape(_call_name(c))}</td><td>{c.prompt_tokens}</td>"
            f"<td>{c.cached_tokens}</td><td>{c.completion_tokens}</td><td>{c.latency_s * 1000:.1f} ms</td>"
            f"<td>{escape(str(finish))}</td></tr>"
        )
    return f'<table class="plait-calls">{"".join(rows)}</table>'


def render_state_html(state: ProgramState) -> str:
    """The HTML of ``state`` (its current content; a running state is shown as far as it got)."""
    ex = state._executor
    with ex.changed:
        segments = list(ex.segments)
        calls = list(ex.calls)
        error = ex.error
    body = "".join(_conversation(segments))
    err = f'<div style="color:#b00">error: {escape(f"{type(error).__name__}: {error}")}</div>' if error else ""
    return f'{_STYLE}<div class="plait-state">{body}{err}{_calls_table(calls)}</div>'
