"""Tests for appo_train.report: training/comparison plots, token colours and the self-contained HTML report."""

from __future__ import annotations

import base64
import colorsys
import html
import itertools
import math
import random
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from appo_train import report
from matplotlib.image import imread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALGOS = ("grpo", "appo", "my-variant")


def _records(with_eval: bool) -> list[dict]:
    rng = random.Random(0)
    out = []
    for algo in ALGOS:
        for seed in (0, 1):
            tokens = 0
            for step in range(20):
                tokens += rng.randint(900, 1100)
                rec = {"algo": algo, "seed": seed, "step": step, "gen_tokens": tokens,
                       "reward": -1 + step / 10 + rng.random() * 0.2,
                       "success": min(1.0, step / 20 + rng.random() / 10),
                       "tool_calls": 1 + rng.random() * 2, "entropy": 1.5 - step / 20 + rng.random() * 0.1}
                if with_eval and step % 5 == 4:
                    rec.update(eval_success=step / 25, eval_reward=step / 10 - 1, eval_tool_calls=2.0)
                out.append(rec)
    return out


def _tok(text: str, kind: str, score: float | None = None, *, cand: bool = False, bp: bool = False) -> dict:
    gen = kind == "gen"
    return {"text": text, "kind": kind, "score": score, "entropy": 0.7 if gen else None, "omega": 0.3 if gen else None,
            "advantage": (0.5 if score is None or score >= 0 else -0.5) if gen else None, "candidate": cand,
            "branch_point": bp}


def _rollout(index: int, prompt: str, bps: int, *, branch: bool = False) -> dict:
    toks = [_tok(ch, "prompt") for ch in prompt]
    toks += [_tok("<call>", "gen", 0.2), _tok("k", "gen", 1.5, cand=True, bp=bps > 0), _tok(" ", "gen", -float("inf")),
             _tok("a", "gen", None), _tok("x", "gen", -0.8, cand=True, bp=bps > 1), _tok("</call>", "gen", 0.0),
             _tok("<res>", "tool"), _tok("4", "tool"), _tok("7", "tool"), _tok("</res>", "tool"),
             _tok("<ans>", "gen", 0.1), _tok("4", "gen", -0.3), _tok("7", "gen", 0.4), _tok("<eos>", "gen", 0.05)]
    return {"algo": "appo", "step": 3, "group": 1, "index": index, "is_branch": branch, "parent": 0 if branch else -1,
            "split": 9 if branch else -1, "reward": 1.0 - index / 2, "success": index == 0, "answer": "47",
            "gold": "47" if index == 0 else "<47>", "prompt": prompt, "tokens": toks,
            "tool_calls": [{"call": "k:kv ax", "result": "<47> & more"}]}


def _png_shape(path: Path) -> tuple[int, ...]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a rendered figure, not an empty canvas
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.01  # something was drawn
    return img.shape


def test_training_curves_rows_grow_with_eval(tmp_path: Path) -> None:
    plain = report.plot_training_curves(_records(False), tmp_path / "plain.png")
    with_eval = report.plot_training_curves(_records(True), tmp_path / "sub" / "eval.png")
    assert plain == tmp_path / "plain.png" and with_eval == tmp_path / "sub" / "eval.png"
    h0, w0, _ = _png_shape(plain)
    h1, w1, _ = _png_shape(with_eval)
    assert w0 == w1 and w0 > h0  # 2x2 grid: landscape
    assert h1 / w1 > 1.3 * h0 / w0  # a third row of panels for the eval curves


def test_training_curves_single_record_and_algo(tmp_path: Path) -> None:
    rec = {"algo": "appo", "seed": 0, "step": 0, "gen_tokens": 10, "reward": 0.2, "success": 0.0, "tool_calls": 1.0,
           "entropy": 1.1}
    _png_shape(report.plot_training_curves([rec], tmp_path / "one.png"))
    one_algo = [r for r in _records(True) if r["algo"] == "grpo" and r["seed"] == 0]
    _png_shape(report.plot_training_curves(one_algo, tmp_path / "grpo.png"))
    with pytest.raises(ValueError):
        report.plot_training_curves([], tmp_path / "none.png")


def test_comparison_plot(tmp_path: Path) -> None:
    results = [{"algo": a, "seed": s, "success": 0.3 + 0.2 * i + 0.05 * s, "reward": -0.2 + 0.3 * i,
                "tool_calls": 2.0 + s, "gen_tokens": 100_000 * (i + 1)} for i, a in enumerate(ALGOS) for s in (0, 1)]
    out = report.plot_comparison(results, tmp_path / "cmp.png")
    assert out == tmp_path / "cmp.png"
    h, w, _ = _png_shape(out)
    assert w > 2 * h  # three metric panels side by side


def _rgb(color: str) -> tuple[int, int, int]:
    assert re.fullmatch(r"#[0-9a-f]{6}", color), color
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def test_token_color() -> None:
    for missing in (None, math.nan, -math.inf, math.inf, 0.0):
        assert report.token_color(missing, -2.0, 2.0) == "#ffffff"
    r, g, b = _rgb(report.token_color(1.0, -2.0, 2.0))
    assert r > b and r > g
    r, g, b = _rgb(report.token_color(-1.0, -2.0, 2.0))
    assert b > r
    assert report.token_color(50.0, -2.0, 2.0) == report.token_color(2.0, -2.0, 2.0)  # clamped
    assert report.token_color(-50.0, -2.0, 2.0) == report.token_color(-2.0, -2.0, 2.0)
    assert report.token_color(np.float32(1.0), -2.0, 2.0) == report.token_color(1.0, -2.0, 2.0)
    for sign in (1.0, -1.0):
        sats = [colorsys.rgb_to_hsv(*(c / 255 for c in _rgb(report.token_color(sign * v, -2.0, 2.0))))[1]
                for v in np.linspace(0.0, 2.0, 9)]
        assert sats[0] == 0.0 and all(b > a for a, b in itertools.pairwise(sats))


class _TagChecker(HTMLParser):
    """Collects tags and checks every non-void element is closed in order."""

    VOID: ClassVar[frozenset[str]] = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_html_report(tmp_path: Path) -> None:
    images = [report.plot_training_curves(_records(True), tmp_path / "curves.png"),
              report.plot_comparison([{"algo": "appo", "seed": 0, "success": 0.5, "reward": 0.1, "tool_calls": 2.0,
                                       "gen_tokens": 5}], tmp_path / "cmp.png")]
    prompts = ['ax*bo? <b>"bold"</b> & co', "kv 3 < 4", "plain"]
    rollouts = [_rollout(0, prompts[0], 1), _rollout(1, prompts[1], 0, branch=True), _rollout(2, prompts[2], 2)]
    n_bp = sum(t["branch_point"] for r in rollouts for t in r["tokens"])
    assert n_bp == 3
    summary = [{"algo": "appo", "success": 0.123456, "seeds": 2}, {"algo": "grpo", "success": 0.5, "note": "a<b"}]
    out = report.write_html_report(tmp_path / "out" / "report.html", title="Run <1>", summary_rows=summary,
                                   rollouts=rollouts, images=images, notes="First para & more.\n\nSecond <para>.")
    assert out == tmp_path / "out" / "report.html"
    text = out.read_text(encoding="utf-8")

    checker = _TagChecker()
    checker.feed(text)
    checker.close()
    assert checker.stack == []
    tags = [t for t, _ in checker.tags]
    assert "script" not in tags and "link" not in tags  # self-contained: no scripts, no external resources

    # escaping: prompts, title, notes, tool results and special tokens never leak raw markup
    for p in prompts:
        assert html.escape(p) in text
    assert '<b>"bold"</b>' not in text and "Run &lt;1&gt;" in text
    assert "First para &amp; more." in text and "Second &lt;para&gt;." in text
    assert "&lt;47&gt; &amp; more" in text
    for raw in ("<call>", "</call>", "<res>", "<ans>", "<eos>"):
        assert raw not in text
    assert "⟨call⟩" in text and "⟨/res⟩" in text and "⟨eos⟩" in text

    # branch points: one fork marker each (and one in the legend); branch provenance in the header
    assert text.count('<span class="fork"></span>') == n_bp + 1
    assert "branch of #0, split at token 9" in text and text.count("initial") >= 2

    # images embedded once each, decoding to the original files
    srcs = [a["src"] for t, a in checker.tags if t == "img"]
    assert len(srcs) == len(images) == text.count("data:image/png;base64,")
    for src, path in zip(srcs, images):
        assert base64.b64decode(src.split(",", 1)[1]) == path.read_bytes()

    # summary table: union of columns, floats to 3 decimals
    for cell in ("<th>algo</th>", "<th>success</th>", "<th>seeds</th>", "<th>note</th>", "0.123", "0.500", "a&lt;b"):
        assert cell in text
    assert "0.123456" not in text

    # every token has a tooltip; scores of -inf / None render white, the top score in full red
    n_tokens = sum(len(r["tokens"]) for r in rollouts)
    tips = [a["title"] for t, a in checker.tags if t == "span" and "title" in a]
    assert len(tips) == n_tokens
    assert all(re.fullmatch(r"score=\S+, entropy=\S+, omega=\S+, advantage=\S+", tip) for tip in tips)
    assert "score=-inf" in "".join(tips)
    assert f"background:{report.token_color(1.0, -1.0, 1.0)}" in text  # the top score (1.5) saturates
    assert "tok k-tool" in text and "tok k-prompt" in text and "cand" in text


def _charmap(family: str) -> set[int]:
    from matplotlib import font_manager, ft2font
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    return set(ft2font.FT2Font(path).get_charmap())


def test_html_report_needs_only_glyphs_of_debians_default_fonts(tmp_path: Path) -> None:
    # Debian's default fonts are DejaVu (fonts-dejavu-core; matplotlib bundles the same files): a character
    # they lack renders as an empty box, as the old fork mark U+2442 did.
    rollouts = [_rollout(0, "ax*bo?", 2), _rollout(1, "ax+3?", 1, branch=True)]
    out = report.write_html_report(tmp_path / "report.html", title="t", summary_rows=[{"algo": "appo", "ok": True}],
                                   rollouts=rollouts, images=[], notes="")
    used = {ch for ch in out.read_text(encoding="utf-8") if ord(ch) > 127}
    assert used                                       # the test looks at something: ·, ⟨, ✓ ...
    for family in ("DejaVu Sans", "DejaVu Sans Mono"):
        missing = sorted(f"U+{ord(ch):04X}" for ch in used if ord(ch) not in _charmap(family))
        assert not missing, (family, missing)


def test_summary_of_one_run_is_a_vertical_table_that_fits_the_page(tmp_path: Path) -> None:
    row = {f"metric_{i}": i / 7 for i in range(20)}
    text = report.write_html_report(tmp_path / "one.html", title="t", summary_rows=[row], rollouts=[], images=[]
                                    ).read_text(encoding="utf-8")
    table = text[text.index('<div class="wide"><table>'):]
    assert "<thead>" not in table.split("</table>")[0]                        # one row per metric, not per run
    assert table.count("<tr>") == 20 and "<tr><th>metric_3</th><td class=\"num\">0.429</td></tr>" in table
    assert ".wide{overflow-x:auto" in text                                    # wide tables scroll in their box
    two = report.write_html_report(tmp_path / "two.html", title="t", summary_rows=[row, row], rollouts=[], images=[]
                                   ).read_text(encoding="utf-8")
    assert two.count("<thead><tr>") == 1 and two.count("<tr>") == 3


@pytest.mark.parametrize("seeds, says_bands", [((0,), False), ((0, 1), True)])
def test_training_curves_subtitle_speaks_of_seeds_only_when_there_are_several(tmp_path: Path, monkeypatch,
                                                                               seeds, says_bands) -> None:
    from matplotlib.figure import Figure
    titles = []
    original = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t) or original(self, t, **kw))
    records = [r for r in _records(True) if r["seed"] in seeds]
    report.plot_training_curves(records, tmp_path / "curves.png")
    (title,) = titles
    assert ("seed" in title and "bands" in title) == says_bands, title
    assert ("one seed per algorithm" in title) != says_bands, title
