"""HTML view of a program state for notebooks (``ProgramState._repr_html_``).

The conversation, one box per role block: template text dimmed, generated text highlighted (hover
shows the variable). A ``gen`` that carries output token logprobs (``run(..., return_logprob=True)``
or ``gen(..., return_logprob=True)``) is drawn as a heat map, one span per token coloured by its
probability, with the probability, logprob, token and any top alternatives on hover. A ``select``
is followed by its choices with the score its method compared, the chosen one marked. Each
``fork`` is a nested section at the point it was made, one box per branch with the text the branch
added (joined or not). Then a totals line (calls, prompt tokens, cached %, output tokens, latency)
and a bordered table of the backend calls. A call served by a model other than the backend's default
(``gen(..., model="judge")``, ``s.using(model=...)``) is tagged with the model's name after its text, and
the table then has a model column ("default" for the others).

Every piece of program or model text is escaped; the view is bounded (tokens per heat map,
branches per fork, fork nesting, table rows), and says what it left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

from plait.lang.records import CallRecord, Segment, segments_from

if TYPE_CHECKING:
    from plait.lang.interpreter import Executor
    from plait.lang.state import ProgramState

__all__ = ["MAX_BRANCHES", "MAX_CALL_ROWS", "MAX_CHOICES", "MAX_FORK_DEPTH", "MAX_HEATMAP_TOKENS", "render_state_html"]

MAX_HEATMAP_TOKENS = 1000  # tokens of one gen drawn as spans; the rest of its text is plain
MAX_CHOICES = 20  # select choices listed after the chosen text
MAX_BRANCHES = 32  # branches shown per fork
MAX_FORK_DEPTH = 8  # forks nested deeper are summarised
MAX_CALL_ROWS = 200  # rows of the calls table (the totals line counts every call)

_STYLE = (
    "<style>"
    ".plait-state{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;color:#222;"
    "background:#fff;padding:4px;line-height:1.45}"
    ".plait-msg{border:1px solid #ccc;border-radius:6px;margin:4px 0;padding:4px 8px;white-space:pre-wrap}"
    ".plait-role{font-weight:bold;font-size:11px;text-transform:uppercase;color:#555}"
    ".plait-gen{background:#d9f2d9;border-bottom:2px solid #3a3}"
    ".plait-select{background:#dde8fb;border-bottom:2px solid #36c}"
    ".plait-tpl{color:#999}.plait-plain{white-space:pre-wrap}"
    ".plait-tok{border-radius:2px;box-shadow:inset -1px 0 0 rgba(255,255,255,.8)}"
    ".plait-choices{white-space:normal}"
    ".plait-choice{display:inline-block;font-size:11px;border:1px solid #aab;border-radius:4px;padding:0 4px;"
    "margin:0 0 0 4px;background:#f4f6fb;color:#444;white-space:nowrap}"
    ".plait-chosen{border-color:#36c;background:#dde8fb;color:#123;font-weight:bold}"
    ".plait-fork{border:1px dashed #a7a;border-radius:6px;margin:6px 0;padding:2px 8px;white-space:normal}"
    ".plait-fork-head{font-size:11px;font-weight:bold;color:#747}"
    ".plait-branch{border-left:3px solid #c9c;margin:4px 0;padding:0 0 0 8px}"
    ".plait-branch>summary{font-size:11px;color:#555;cursor:pointer}"
    ".plait-branch-body{white-space:pre-wrap}"
    ".plait-note{font-size:11px;color:#777;font-style:italic}"
    ".plait-model{font-size:10px;border:1px solid #b80;border-radius:3px;padding:0 3px;margin:0 0 0 2px;"
    "background:#fff4dd;color:#740;white-space:nowrap}"
    ".plait-totals{margin:8px 0 4px 0;font-weight:bold}"
    ".plait-legend{font-size:11px;color:#555;margin:4px 0}"
    ".plait-legend-bar{display:inline-block;width:120px;height:10px;vertical-align:middle;margin:0 4px;"
    "border:1px solid #999;background:linear-gradient(90deg,hsl(0,80%,80%),hsl(60,80%,80%),hsl(120,80%,80%))}"
    ".plait-state table.plait-calls{border-collapse:collapse;border:1px solid #999;margin:4px 0}"
    ".plait-state table.plait-calls th,.plait-state table.plait-calls td{border:1px solid #999;padding:2px 8px;"
    "text-align:right}"
    ".plait-state table.plait-calls th{background:#f0f0f0}"
    ".plait-state table.plait-calls td:nth-child(-n+2),.plait-state table.plait-calls td:last-child,"
    ".plait-state table.plait-calls td.plait-left{text-align:left}"
    "</style>"
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# ---------------------------------------------------------------------------------- generated text
def _prob_colour(p: float) -> str:
    """Red (p=0) through yellow to green (p=1), light enough for dark text."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f},80%,80%)"


def _token_title(entry: tuple, alternatives: list | None) -> str:
    logprob, token_id, token = entry[0], entry[1], entry[2]
    if logprob is None or not math.isfinite(logprob):
        head = f"token {token!r} (id {token_id}): logprob unknown"
    else:
        head = f"p={math.exp(logprob):.4f}  logprob={logprob:.4f}  token={token!r} (id {token_id})"
    if alternatives:
        alts = ", ".join(
            f"{a[2]!r} {math.exp(a[0]):.3f}" for a in alternatives[:10] if a[0] is not None and math.isfinite(a[0])
        )
        head += f"\ntop: {alts}"
    return head


def _heatmap(text: str, call: CallRecord) -> str | None:
    """``text`` as one span per output token, coloured by probability; None when the tokens do not
    spell the text (no token texts reported). Text past the matching tokens (a trimmed stop string
    leaves extra tokens; the cap) is appended plain."""
    entries = call.output_token_logprobs or []
    tops = call.output_top_logprobs or []
    out: list[str] = []
    pos = 0
    for i, entry in enumerate(entries[:MAX_HEATMAP_TOKENS]):
        token = entry[2] if len(entry) > 2 else None
        if not isinstance(token, str) or not text.startswith(token, pos):
            break
        if not token:
            continue
        logprob = entry[0]
        colour = _prob_colour(math.exp(logprob)) if logprob is not None and math.isfinite(logprob) else "#eee"
        title = escape(_token_title(entry, tops[i] if i < len(tops) else None), quote=True)
        out.append(f'<span class="plait-tok" style="background:{colour}" title="{title}">{escape(token)}</span>')
        pos += len(token)
    if pos == 0:
        return None
    if pos < len(text):
        note = "" if len(entries) <= MAX_HEATMAP_TOKENS else f" title=\"{MAX_HEATMAP_TOKENS} tokens shown\""
        out.append(f"<span{note}>{escape(text[pos:])}</span>")
    return "".join(out)


def _choices(call: CallRecord) -> str:
    """A select's choices, each with the score its method compared; the chosen one marked."""
    choices = call.choices or []
    scores = call.choice_scores or []
    items = []
    for i, choice in enumerate(choices[:MAX_CHOICES]):
        score = scores[i] if i < len(scores) else None
        shown = "?" if score is None else f"{score:.3f}"
        chosen = i == call.chosen
        title = f"{choice!r}: score {shown} ({call.choices_method}){', chosen' if chosen else ''}"
        mark = "\u2713 " if chosen else ""
        cls = "plait-choice plait-chosen" if chosen else "plait-choice"
        items.append(
            f'<span class="{cls}" title="{escape(title, quote=True)}">{mark}{escape(_clip(choice, 40))} {shown}</span>'
        )
    if len(choices) > MAX_CHOICES:
        items.append(f'<span class="plait-note"> +{len(choices) - MAX_CHOICES} more choices</span>')
    return f'<span class="plait-choices">{"".join(items)}</span>'


def _span(seg: Segment) -> str:
    text = escape(seg.text)
    if seg.kind in ("gen", "select"):
        call = seg.call
        model = call.model if call is not None else None
        label = f"{seg.kind} {seg.name}" if seg.name else seg.kind
        title = escape(label if model is None else f"{label} (model {model})", quote=True)
        if seg.kind == "gen" and call is not None and call.output_token_logprobs:
            text = _heatmap(seg.text, call) or text
        extra = _choices(call) if seg.kind == "select" and call is not None and call.choices else ""
        if model is not None:
            tag_title = escape(f"served by model {model!r}", quote=True)
            extra = f'<span class="plait-model" title="{tag_title}">{escape(_clip(model, 40))}</span>{extra}'
        return f'<span class="plait-{seg.kind}" title="{title}">{text}</span>{extra}'
    if seg.kind in ("role_prefix", "role_suffix"):
        return f'<span class="plait-tpl">{text}</span>'
    return text


# ---------------------------------------------------------------------------------- conversation
def _merge(segments: list[Segment], start: int, breaks: set[int]) -> list[Segment]:
    """Adjacent pieces of one streamed generation (or of plain text) become one segment; never across
    a fork point (``breaks``: text positions, counted from ``start``)."""
    merged: list[Segment] = []
    pos = start
    for seg in segments:
        last = merged[-1] if merged else None
        if (last and last.kind == seg.kind and last.name == seg.name and last.role == seg.role
                and last.call is seg.call and seg.kind != "role_prefix" and pos not in breaks):
            merged[-1] = Segment(last.kind, last.text + seg.text, last.role, last.name, last.call)
        else:
            merged.append(seg)
        pos += len(seg.text)
    return merged


def _conversation(segments: list[Segment], start: int, inserts: dict[int, list[str]]) -> str:
    """Role boxes and plain text; ``inserts[pos]`` (fork sections) go where the text reached ``pos``.

    ``segments`` begin at text position ``start``; a first segment inside an open role (a branch
    forked inside a role block) opens that role's box, labelled "continued".
    """
    parts: list[str] = []
    block: list[str] | None = None
    role = None
    continued = bool(segments) and segments[0].role is not None and segments[0].kind != "role_prefix"
    if continued:
        block, role = [], segments[0].role

    def emit(html: str) -> None:
        (block if block is not None else parts).append(html)

    def box(closed: bool) -> str:
        label = escape(str(role)) + (" (continued)" if continued else "" if closed else " (open)")
        return f'<div class="plait-msg"><div class="plait-role">{label}</div>{"".join(block or [])}</div>'

    pending = sorted(inserts.items())
    pos = start
    for seg in _merge(segments, start, set(inserts)):
        while pending and pending[0][0] <= pos:
            for html in pending.pop(0)[1]:
                emit(html)
        if seg.kind == "role_prefix":
            if block is not None:  # a box left open (cannot happen in a valid run): close it as is
                parts.append(box(False))
            block, role, continued = [_span(seg)], seg.role, False
        elif seg.kind == "role_suffix" and block is not None:
            block.append(_span(seg))
            parts.append(box(True))
            block, continued = None, False
        elif block is not None:
            block.append(_span(seg))
        else:
            parts.append(f'<span class="plait-plain">{_span(seg)}</span>')
        pos += len(seg.text)
    for _, htmls in pending:
        for html in htmls:
            emit(html)
    if block is not None:  # an open role block (a state read mid-run, or a branch's open role)
        parts.append(box(False))
    return "".join(parts)


@dataclass
class _Snapshot:
    """What one executor shows, copied under its lock."""

    segments: list[Segment]
    calls: list[CallRecord]
    error: BaseException | None
    forks: list[list[Executor]]
    fork_start: int
    join_mode: str | None
    finished: bool


def _snapshot(ex: Executor) -> _Snapshot:
    with ex.changed:
        return _Snapshot(list(ex.segments), list(ex.calls), ex.error, [list(g) for g in ex.fork_groups],
                         ex.fork_start, ex.join_mode, ex.finished)


def _body(snap: _Snapshot, start: int, depth: int) -> str:
    """The conversation from text position ``start``, with this executor's forks at their points."""
    inserts: dict[int, list[str]] = {}
    for group in snap.forks:
        if group:
            inserts.setdefault(group[0].fork_start, []).append(_fork_section(group, depth))
    return _conversation(segments_from(snap.segments, start), start, inserts)


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    return f'<div style="color:#b00">error: {escape(f"{type(error).__name__}: {error}")}</div>'


def _fork_section(group: list[Executor], depth: int) -> str:
    snaps = [_snapshot(ex) for ex in group]
    mode = next((s.join_mode for s in snaps if s.join_mode), None)
    joined = f"joined ({mode})" if mode else ("not joined" if all(s.finished for s in snaps) else "not joined yet")
    head = f'<div class="plait-fork-head">fork: {len(group)} branch{"es" if len(group) != 1 else ""}, {joined}</div>'
    if depth >= MAX_FORK_DEPTH:
        return f'<div class="plait-fork">{head}<div class="plait-note">nested deeper than {MAX_FORK_DEPTH} forks: not shown</div></div>'
    branches = []
    for i, snap in enumerate(snaps[:MAX_BRANCHES]):
        ncalls = len(snap.calls)
        out_tokens = sum(c.completion_tokens for c in snap.calls)
        status = "error" if snap.error is not None else (f"joined ({snap.join_mode})" if snap.join_mode else "not joined")
        summary = f"branch {i}: {status}, {ncalls} call{'s' if ncalls != 1 else ''}, {out_tokens} output tokens"
        body = _body(snap, snap.fork_start, depth + 1) or '<span class="plait-note">(no text added)</span>'
        branches.append(
            f'<details class="plait-branch" open><summary>{escape(summary)}</summary>'
            f'<div class="plait-branch-body">{body}</div>{_error_line(snap.error)}</details>'
        )
    if len(snaps) > MAX_BRANCHES:
        branches.append(f'<div class="plait-note">{len(snaps) - MAX_BRANCHES} more branches not shown</div>')
    return f'<div class="plait-fork">{head}{"".join(branches)}</div>'


# ---------------------------------------------------------------------------------- calls
def _call_name(call: CallRecord) -> str:
    return str(call.name) if call.branch is None else f"{call.name} (fork {call.branch})"


def _totals(calls: list[CallRecord]) -> str:
    if not calls:
        return ""
    prompt = sum(c.prompt_tokens for c in calls)
    cached = sum(c.cached_tokens for c in calls)
    output = sum(c.completion_tokens for c in calls)
    latency = sum(c.latency_s for c in calls)
    share = f"{100 * cached / prompt:.0f}%" if prompt else "-"
    n = len(calls)
    return (
        f'<div class="plait-totals">{n} call{"s" if n != 1 else ""} \u00b7 {prompt} prompt tokens, {cached} cached '
        f"({share}) \u00b7 {output} output tokens \u00b7 latency {_ms(latency)} (sum over calls)</div>"
    )


def _calls_table(calls: list[CallRecord]) -> str:
    if not calls:
        return ""
    with_models = any(c.model is not None for c in calls)  # the model column only when a call named one
    header = (
        "<tr><th>call</th><th>name</th>" + ("<th>model</th>" if with_models else "")
        + "<th>prompt tokens</th><th>cached tokens</th><th>output tokens</th><th>latency</th><th>finish</th></tr>"
    )
    rows = [header]
    for c in calls[:MAX_CALL_ROWS]:
        finish = (c.finish_reason or {}).get("type", "") if c.kind == "gen" else ""
        model = ""
        if with_models:
            model = (f'<td class="plait-left">{escape(c.model)}</td>' if c.model is not None
                     else '<td class="plait-left plait-note">default</td>')
        rows.append(
            f"<tr><td>{escape(c.kind)}</td><td>{escape(_call_name(c))}</td>{model}<td>{c.prompt_tokens}</td>"
            f"<td>{c.cached_tokens}</td><td>{c.completion_tokens}</td><td>{c.latency_s * 1000:.1f} ms</td>"
            f"<td>{escape(str(finish))}</td></tr>"
        )
    if len(calls) > MAX_CALL_ROWS:
        columns = 8 if with_models else 7
        rows.append(f'<tr><td colspan="{columns}" class="plait-note">{len(calls) - MAX_CALL_ROWS} more calls not '
                    "shown</td></tr>")
    return f'<table class="plait-calls">{"".join(rows)}</table>'


def _has_heatmap(snap: _Snapshot) -> bool:
    return any(c.kind == "gen" and c.output_token_logprobs for c in snap.calls)


def render_state_html(state: ProgramState) -> str:
    """The HTML of ``state`` (its current content; a running state is shown as far as it got)."""
    snap = _snapshot(state._executor)
    body = _body(snap, 0, 0)
    legend = (
        '<div class="plait-legend">token probability 0<span class="plait-legend-bar"></span>1 '
        "(hover a token for its probability)</div>"
        if _has_heatmap(snap) else ""
    )
    return (
        f'{_STYLE}<div class="plait-state">{body}{_error_line(snap.error)}{legend}'
        f"{_totals(snap.calls)}{_calls_table(snap.calls)}</div>"
    )
