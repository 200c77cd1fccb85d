"""Training report: learning-curve and comparison plots, and a self-contained HTML page of annotated rollouts.

Plots are drawn on a bare matplotlib ``Figure`` with an explicit Agg canvas (no pyplot, no global backend
switch), so importing or calling this module never disturbs an interactive session and works headless.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ALGO_COLORS: dict[str, str] = {"grpo": "#1f77b4", "arpo": "#ff7f0e", "appo": "#d62728", "appo-entropy": "#2ca02c"}
_FALLBACK_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")
_DPI = 110
_SMOOTH = 5  # moving-average window (steps) of the training curves
_TRAIN_PANELS = (
    ("reward", "training reward"),
    ("success", "training success rate"),
    ("tool_calls", "tool calls per rollout"),
    ("entropy", "entropy (nats / generated token)"),
)
_EVAL_PANELS = (("eval_success", "eval success rate"), ("eval_reward", "eval reward"))
_COMPARE_METRICS = (("success", "held-out success rate"), ("reward", "held-out reward"), ("tool_calls", "tool calls"))
_RATES = {"success", "eval_success"}
_SeedStats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]

# Diverging token scale (ColorBrewer RdBu ends) and the advantage bar colours (RdYlGn ends).
_POS_RGB = (178, 24, 43)
_NEG_RGB = (33, 102, 172)
_ADV_POS_RGB = (26, 152, 80)
_ADV_NEG_RGB = (215, 48, 39)
_SPECIAL = re.compile(r"<[^<>\s]+>")
_VISIBLE_WS = {" ": "·", "\n": "↵", "\t": "→"}
_KINDS = {"prompt", "gen", "tool"}
_IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}


# ----------------------------------------------------------------------------------------------- plots


def _finite(x: Any) -> bool:
    """True for a real, finite number (None, nan and +-inf are not)."""
    return isinstance(x, numbers.Real) and math.isfinite(x)


def _algo_colors(algos: Iterable[str]) -> dict[str, str]:
    """Fixed colours for the known algorithms; the others get the fallback cycle in sorted-name order."""
    algos = list(algos)
    others = sorted(a for a in set(algos) if a not in ALGO_COLORS)
    colors = {a: _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)] for i, a in enumerate(others)}
    return {a: ALGO_COLORS[a] if a in ALGO_COLORS else colors[a] for a in algos}


def _new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas with a ``rows x cols`` grid of axes (always a 2-d array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, out_path: Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def _seed_stats(by_seed: dict[int, dict[int, dict]], key: str) -> _SeedStats | None:
    """(steps, mean, min, max, n_seeds) over the seeds reporting ``key``, at the steps they all have (None: nothing)."""
    per_seed = [{s: float(r[key]) for s, r in steps.items() if _finite(r.get(key))} for steps in by_seed.values()]
    per_seed = [p for p in per_seed if p]
    if not per_seed:
        return None
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not common:
        return None
    vals = np.array([[p[s] for s in common] for p in per_seed])  # (seeds, steps)
    return np.array(common), vals.mean(0), vals.min(0), vals.max(0), len(per_seed)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average, the window truncated at both ends (needs ``len(y) >= window``)."""
    kernel = np.ones(window)
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def _plot_panel(ax: Axes, runs: dict[str, dict[int, dict[int, dict]]], colors: dict[str, str], key: str,
                smooth: bool) -> None:
    for algo, by_seed in runs.items():
        stats = _seed_stats(by_seed, key)
        if stats is None:
            continue
        steps, mean, lo, hi, n = stats
        color, label = colors[algo], algo if n == 1 else f"{algo} ({n} seeds)"
        if n > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        if smooth and len(steps) > _SMOOTH:
            ax.plot(steps, mean, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, _moving_average(mean, _SMOOTH), color=color, linewidth=1.8, label=label)
        else:
            ax.plot(steps, mean, color=color, linewidth=1.5, marker="o", markersize=4, label=label)


def plot_training_curves(records: list[dict], out_path: Path) -> Path:
    """Reward, success, tool calls and entropy vs step (plus eval success/reward when logged), one line per algo.

    Several seeds of an algo are averaged at the steps they all logged, with a min..max band; training curves
    are smoothed with a centred 5-step moving average drawn over the faint raw mean.
    """
    if not records:
        raise ValueError("plot_training_curves: no records")
    runs: dict[str, dict[int, dict[int, dict]]] = {}
    for rec in records:  # algo -> seed -> step -> merged record (a later record for the same step adds to it)
        runs.setdefault(str(rec["algo"]), {}).setdefault(int(rec.get("seed", 0)), {}).setdefault(
            int(rec["step"]), {}).update(rec)
    panels = list(_TRAIN_PANELS) + (list(_EVAL_PANELS) if any("eval_success" in r for r in records) else [])
    rows = len(panels) // 2
    fig, axes = _new_figure(rows, 2, (11.0, 3.4 * rows + 0.6))
    colors = _algo_colors(runs)
    for i, (ax, (key, label)) in enumerate(zip(axes.flat, panels)):
        _plot_panel(ax, runs, colors, key, smooth=not key.startswith("eval_"))
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key in _RATES:
            ax.set_ylim(-0.02, 1.02)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        elif i == 0 or key == "eval_success":
            ax.legend(fontsize=8, loc="best")
    several = sorted(algo for algo, by_seed in runs.items() if len(by_seed) > 1)
    if not several:
        title = f"Training curves, one seed per algorithm: lines = {_SMOOTH}-step moving average (faint = raw)"
    else:
        which = "" if len(several) == len(runs) else f" ({', '.join(several)})"
        title = (f"Training curves: lines = {_SMOOTH}-step moving average of the seed mean (faint = raw), "
                 f"bands = min..max over the seeds of algorithms with several{which}")
    fig.suptitle(title + "; eval panels unsmoothed", fontsize=10)
    return _save(fig, out_path)


def _human(n: float) -> str:
    """1234567 -> '1.23M' (token counts in tick labels)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def plot_comparison(results: list[dict], out_path: Path) -> Path:
    """Held-out success, reward and tool calls per algo: bar = seed mean, whiskers = min..max, dots = seeds."""
    if not results:
        raise ValueError("plot_comparison: no results")
    by_algo: dict[str, list[dict]] = {}
    for row in results:
        by_algo.setdefault(str(row["algo"]), []).append(row)
    algos, colors = list(by_algo), _algo_colors(by_algo)
    ticks = []
    for algo in algos:
        tokens = [float(r["gen_tokens"]) for r in by_algo[algo] if _finite(r.get("gen_tokens"))]
        ticks.append(f"{algo}\n{len(by_algo[algo])} seed(s)" + (f"\n{_human(np.mean(tokens))} tok" if tokens else ""))
    fig, axes = _new_figure(1, len(_COMPARE_METRICS), (max(10.0, 2.4 * len(algos) + 4.0), 4.4))
    for ax, (key, label) in zip(axes.flat, _COMPARE_METRICS):
        for i, algo in enumerate(algos):
            vals = np.array([float(r[key]) for r in by_algo[algo] if _finite(r.get(key))])
            if not vals.size:
                continue
            mean = float(vals.mean())
            ax.bar(i, mean, width=0.6, color=colors[algo], alpha=0.85, yerr=[[mean - vals.min()], [vals.max() - mean]],
                   capsize=4, ecolor="black")
            ax.scatter(i + np.linspace(-0.12, 0.12, vals.size) * (vals.size > 1), vals, color="black", s=14, zorder=3)
            up = mean >= 0  # label beyond the bar's end, clear of the whisker
            ax.annotate(f"{mean:.3g}", (i, vals.max() if up else vals.min()), textcoords="offset points",
                        xytext=(0, 5 if up else -5), ha="center", va="bottom" if up else "top", fontsize=8)
        ax.set_xticks(np.arange(len(algos)), ticks, fontsize=8)
        ax.set_title(label)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.margins(y=0.12)
        if key in _RATES:
            ax.set_ylim(0.0, 1.12)
    fig.suptitle("Held-out evaluation: bar = mean over seeds, whiskers = min..max, dots = individual seeds",
                 fontsize=10)
    return _save(fig, out_path)


def plot_efficiency(runs: list[dict], budget: float, unit: str, out_path: Path) -> Path:
    """Sample-efficiency curves: held-out success against `unit` (each run's `curve` = [x, y], its evaluations)
    per arm, the seed mean of the runs interpolated onto a common grid over [0, budget] with a min..max band;
    the legend gives each arm's mean area (the curve's mean over the budget)."""
    if not runs:
        raise ValueError("plot_efficiency: no runs")
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(str(run["arm"]), []).append(run)
    colors = _algo_colors(by_arm)
    grid = np.linspace(0.0, float(budget), 101)
    fig, axes = _new_figure(1, 1, (9.0, 5.0))
    ax = axes[0, 0]
    for arm, rs in by_arm.items():
        ys = np.array([np.interp(grid, *r["curve"]) for r in rs])
        area = float(np.mean([r["area"] for r in rs]))
        if len(rs) > 1:
            ax.fill_between(grid, ys.min(0), ys.max(0), color=colors[arm], alpha=0.12, linewidth=0)
        ax.plot(grid, ys.mean(0), color=colors[arm], linewidth=1.8, label=f"{arm} ({len(rs)} seeds): area {area:.3f}")
    ax.set_xlabel(unit)
    ax.set_ylabel("held-out success")
    ax.set_xlim(0.0, float(budget))
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(lambda v, _: _human(v))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Held-out success against {unit}: seed mean (linear between evaluations), band = min..max over "
                 f"seeds; area = mean over the budget", fontsize=10)
    return _save(fig, out_path)


def plot_differences(diffs: list[dict], metrics: Iterable[tuple[str, str]], out_path: Path) -> Path:
    """Paired differences arm - baseline (`{key}_diff`, `{key}_lo`, `{key}_hi` per row) with their confidence
    intervals, one panel per metric `(key, label)`, a line at 0."""
    if not diffs:
        raise ValueError("plot_differences: no differences")
    metrics = list(metrics)
    names = [f"{d['arm']} - {d['baseline']}" for d in diffs]
    y = np.arange(len(diffs))[::-1]
    fig, axes = _new_figure(1, len(metrics), (5.0 * len(metrics), 1.0 + 0.45 * len(diffs)))
    colors = _algo_colors(d["arm"] for d in diffs)
    for ax, (key, label) in zip(axes.flat, metrics):
        for yi, d in zip(y, diffs):
            mid, lo, hi = d[f"{key}_diff"], d[f"{key}_lo"], d[f"{key}_hi"]
            ax.errorbar(mid, yi, xerr=[[mid - lo], [hi - mid]], fmt="o", color=colors[d["arm"]], capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlabel(f"difference in {label}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Paired differences (same seed, same warm start): mean over seeds, 95% bootstrap interval",
                 fontsize=10)
    return _save(fig, out_path)


# ----------------------------------------------------------------------------------------------- colours


def _mix(rgb: tuple[int, int, int], t: float) -> str:
    """White blended towards ``rgb`` by ``t`` in [0, 1], as '#rrggbb'."""
    return "#" + "".join(f"{round(255 + (c - 255) * t):02x}" for c in rgb)


def token_color(score: float | None, lo: float, hi: float) -> str:
    """Diverging colour of a Branching Score: blue below 0 (full at ``lo``), white at 0, red above (full at ``hi``).

    Scores beyond the range are clamped; None and non-finite scores are white.
    """
    if not _finite(score) or score == 0:
        return "#ffffff"
    score = float(score)
    rgb, bound = (_POS_RGB, hi) if score > 0 else (_NEG_RGB, lo)
    return _mix(rgb, min(score / bound, 1.0) if bound * score > 0 else 1.0)


def _advantage_color(adv: float | None, scale: float) -> str:
    """Green for a positive advantage, red for a negative one, saturating at ``|adv| = scale``."""
    if not _finite(adv):
        return "transparent"
    return _mix(_ADV_POS_RGB if adv >= 0 else _ADV_NEG_RGB, min(abs(adv) / scale, 1.0))


def _ink(background: str) -> str:
    """Black or white text, whichever reads better on a '#rrggbb' background."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"


def _robust_scale(values: Iterable[Any]) -> float:
    """95th percentile of the finite ``|values|`` (falling back to their max, then to 1) as a symmetric range."""
    mags = np.abs(np.array([float(v) for v in values if _finite(v)], dtype=float))
    for scale in (float(np.percentile(mags, 95)) if mags.size else 0.0, float(mags.max()) if mags.size else 0.0):
        if scale > 0:
            return scale
    return 1.0


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
  color:#222;padding:0 16px}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}td.num{text-align:right}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#666}
.card{border:1px solid #ccc;border-radius:6px;padding:10px 12px;margin:14px 0;background:#fff}
.card.ok{border-left:5px solid #1a9850}.card.bad{border-left:5px solid #d73027}
.hdr{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;margin-bottom:6px}
.prompt{font-size:13px;color:#555;margin-bottom:6px}
.toks{display:flex;flex-wrap:wrap;align-items:flex-end;row-gap:6px;font-family:ui-monospace,Menlo,Consolas,monospace;
  font-size:14px;line-height:1.3}
.tok{display:inline-flex;flex-direction:column;align-items:stretch;margin:0 1px}
.tx{padding:1px 2px;white-space:pre;text-align:center}
.adv{display:block;height:5px;margin-top:1px}
.k-prompt .tx{color:#8a8a8a}
.k-tool .tx{background:#e3f0fb;font-style:italic;border:1px dotted #7aa7d6}
.cand .tx{text-decoration:underline;text-decoration-thickness:2px;text-underline-offset:2px}
.bp .tx{box-shadow:0 0 0 3px #000;margin:0 3px;font-weight:bold}
.fork{display:inline-block;width:0;height:0;border-left:4px solid transparent;border-right:4px solid transparent;
  border-top:6px solid currentColor;vertical-align:super;margin-right:2px}
.wide{overflow-x:auto;max-width:100%}
.ws{opacity:.45}
.legend{font-size:13px;display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;margin:8px 0}
.scale{display:inline-flex}.scale span{padding:1px 5px;font-size:11px;font-family:ui-monospace,monospace}
.calls{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.muted{color:#888;font-size:12px}
"""


def _cell(value: Any) -> str:
    """Summary-table cell text: floats to 3 decimals, booleans as marks, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.3f}"
    return str(value)


def _td(value: Any) -> str:
    num = ' class="num"' if isinstance(value, numbers.Real) and not isinstance(value, bool) else ""
    return f"<td{num}>{html.escape(_cell(value))}</td>"


def _summary_table(rows: list[dict]) -> str:
    """One column per key (a row per entry), or for a single entry one row per key, so that a run's many
    metrics stay within the page; wide tables scroll inside their own box."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    if len(rows) == 1:
        body = "".join(f"<tr><th>{html.escape(str(c))}</th>{_td(rows[0].get(c))}</tr>" for c in cols)
        return f'<div class="wide"><table><tbody>{body}</tbody></table></div>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(row.get(c)) for c in cols) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(path: Path) -> str:
    path = Path(path)
    mime = _IMAGE_MIME.get(path.suffix.lower(), "image/png")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img src="data:{mime};base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _fmt(value: Any) -> str:
    """Tooltip number: 4 significant digits, 'none' for a missing value, 'inf'/'-inf'/'nan' as such."""
    if value is None:
        return "none"
    value = float(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _token_text(text: str) -> str:
    """Escaped, visible token text: '<call>' -> '⟨call⟩', whitespace as faint '·', '↵', '→'."""
    if _SPECIAL.fullmatch(text):
        return html.escape(f"⟨{text[1:-1]}⟩")
    out = [f'<span class="ws">{_VISIBLE_WS[ch]}</span>' if ch in _VISIBLE_WS else html.escape(ch) for ch in text]
    return "".join(out) or '<span class="ws">∅</span>'


def _token(tok: dict, score_scale: float, adv_scale: float) -> str:
    kind = tok.get("kind") if tok.get("kind") in _KINDS else "gen"
    classes = ["tok", f"k-{kind}"] + ["cand"] * bool(tok.get("candidate")) + ["bp"] * bool(tok.get("branch_point"))
    style = ""
    if kind == "gen":
        bg = token_color(tok.get("score"), -score_scale, score_scale)
        style = f' style="background:{bg};color:{_ink(bg)}"'
    tip = ", ".join(f"{k}={_fmt(tok.get(k))}" for k in ("score", "entropy", "omega", "advantage"))
    fork = '<span class="fork"></span>' if tok.get("branch_point") else ""       # drawn by CSS: no font needed
    adv = _advantage_color(tok.get("advantage"), adv_scale)
    return (f'<span class="{" ".join(classes)}" title="{html.escape(tip)}"><span class="tx"{style}>{fork}'
            f'{_token_text(str(tok.get("text", "")))}</span><span class="adv" style="background:{adv}"></span></span>')


def _rollout_card(r: dict, score_scale: float, adv_scale: float) -> str:
    esc = html.escape
    origin = (f"branch of #{int(r.get('parent', -1))}, split at token {int(r.get('split', -1))}" if r.get("is_branch")
              else "initial")
    calls = r.get("tool_calls") or []
    tokens = r.get("tokens") or []
    n_bp = sum(bool(t.get("branch_point")) for t in tokens)
    n_cand = sum(bool(t.get("candidate")) for t in tokens)
    ok = bool(r.get("success"))
    fields = [
        f"<b>{esc(str(r.get('algo', '')))}</b>", f"step {int(r.get('step', 0))}", f"group {int(r.get('group', 0))}",
        f"#{int(r.get('index', 0))}", esc(origin), f"reward {_fmt(r.get('reward'))}",
        f"{'✓ success' if ok else '✗ failure'}",
        f"answer <code>{esc(str(r.get('answer', '')))}</code> vs gold <code>{esc(str(r.get('gold', '')))}</code>",
        f"{len(calls)} tool call(s)", f"{n_bp} branch point(s), {n_cand} candidate(s)",
    ]
    hdr = "".join(f"<span>{f}</span>" for f in fields)
    toks = "".join(_token(t, score_scale, adv_scale) for t in tokens)
    if calls:
        rows = "".join(f"<tr><td>{i}</td><td>{esc(str(c.get('call', '')))}</td><td>{esc(str(c.get('result', '')))}</td>"
                       "</tr>" for i, c in enumerate(calls, 1))
        table = f'<table class="calls"><thead><tr><th>#</th><th>call</th><th>result</th></tr></thead>{rows}</table>'
    else:
        table = '<div class="muted">no tool calls</div>'
    return (f'<section class="card {"ok" if ok else "bad"}"><div class="hdr">{hdr}</div>'
            f'<div class="prompt">prompt: <code>{esc(str(r.get("prompt", "")))}</code></div>'
            f'<div class="toks">{toks}</div>{table}</section>')


def _legend(score_scale: float, adv_scale: float) -> str:
    def scale(values: np.ndarray, color: Callable[[float], str]) -> str:
        spans = []
        for v in values:
            bg = color(float(v))
            spans.append(f'<span style="background:{bg};color:{_ink(bg)}">{v:+.2g}</span>')
        return f'<span class="scale">{"".join(spans)}</span>'

    score = scale(np.linspace(-score_scale, score_scale, 9), lambda v: token_color(v, -score_scale, score_scale))
    adv = scale(np.linspace(-adv_scale, adv_scale, 5), lambda v: _advantage_color(v, adv_scale))
    return (f'<div class="legend"><span>Branching Score (generated tokens, clamped to ±{score_scale:.3g}, the 95th '
            f'percentile of |score|): {score}</span><span>advantage (bar under each token): {adv}</span></div>'
            '<div class="legend toks"><span class="tok k-prompt"><span class="tx">prompt</span></span>'
            '<span class="tok k-tool"><span class="tx">tool output</span></span>'
            '<span class="tok k-gen cand"><span class="tx">candidate (underlined)</span></span>'
            '<span class="tok k-gen bp"><span class="tx"><span class="fork"></span>chosen branch point (outlined, '
            'marked)</span></span>'
            '<span class="muted">white = score 0 or none (-inf); hover a token for score, entropy, omega, advantage'
            '</span></div>')


def write_html_report(out_path: Path, *, title: str, summary_rows: list[dict], rollouts: list[dict],
                      images: list[Path], notes: str = "") -> Path:
    """Write one self-contained HTML page (inline CSS, base64 images, no scripts): notes, summary table, images
    and one card per rollout with its tokens coloured by Branching Score and underlined by advantage."""
    esc = html.escape
    gen = [t for r in rollouts for t in r.get("tokens") or [] if t.get("kind") == "gen"]
    score_scale = _robust_scale(t.get("score") for t in gen)
    adv_scale = _robust_scale(t.get("advantage") for r in rollouts for t in r.get("tokens") or [])
    paras = [p for p in re.split(r"\n\s*\n", notes.strip()) if p.strip()]
    parts = [f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(p.strip()).replace(chr(10), '<br>')}</p>" for p in paras]
    if summary_rows:
        parts += ["<h2>Summary</h2>", _summary_table(summary_rows)]
    if images:
        parts += ["<h2>Figures</h2>"] + [_image(p) for p in images]
    if rollouts:
        parts += [f"<h2>Rollouts ({len(rollouts)})</h2>", _legend(score_scale, adv_scale)]
        parts += [_rollout_card(r, score_scale, adv_scale) for r in rollouts]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{_CSS}</style></head><body>\n' + "\n".join(parts) + "\n</body></html>\n")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
