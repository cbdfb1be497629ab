"""The notebook view in a real browser: headless Chromium renders a state with a heat map, a select and
a fork; the screenshot must show them (skipped where no Chromium is installed)."""

from __future__ import annotations

import colorsys
import math
import shutil
import subprocess
from pathlib import Path

import pytest

import plait as pl
from plait.lang import MockBackend

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)")


def representative_state() -> pl.ProgramState:
    backend = MockBackend(
        {"capital": " The capital of France is Paris <script>document.title='pwned'</script>.",
         "Idea": " an idea <img src=x onerror=alert(1)>", "Sure": " Yes, quite sure."},
        choice_logprobs={"positive": [-0.1, -0.3], "negative": [-2.0]},
    )

    @pl.function
    def prog(s):
        s += pl.system("You are a helpful assistant.")
        s += pl.user("What is the capital of France?")
        s += pl.assistant(pl.gen("answer", max_tokens=16))
        s += pl.user("Is the review positive or negative?")
        s += pl.assistant("It is " + pl.select("label", choices=["positive", "negative"]))
        forks = s.fork(2)
        forks += lambda i: pl.user(f"Idea {i}?") + pl.assistant(pl.gen("idea", max_tokens=8))
        forks.join()
        s += pl.user("Sure?")
        s += pl.assistant(pl.gen("sure", max_tokens=8))

    return prog.run(backend=backend, return_logprob=True, top_logprobs_num=2)


def chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, pl.ProgramState]:
    state = representative_state()
    path = tmp_path_factory.mktemp("view") / "state.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{state._repr_html_()}</body></html>")
    return path, state


def hsl_rgb(hue: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(hue / 360, 0.8, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


def test_screenshot_shows_the_view(page, tmp_path):
    path, state = page
    png = tmp_path / "state.png"
    out = chromium(f"--screenshot={png}", "--window-size=1100,1400", path.as_uri())
    assert png.exists() and png.stat().st_size > 10_000, out.stderr[-2000:]
    image_module = pytest.importorskip("PIL.Image")
    from PIL import ImageStat

    image = image_module.open(png).convert("RGB")
    assert image.size == (1100, 1400)
    assert max(ImageStat.Stat(image).var) > 100  # not a blank page
    colours = {rgb for _, rgb in image.getcolors(maxcolors=1 << 20)}

    def shown(rgb: tuple[int, int, int]) -> bool:
        return any(all(abs(a - b) <= 2 for a, b in zip(rgb, c)) for c in colours)

    assert shown((0xDD, 0xE8, 0xFB))  # the chosen select choice
    assert shown((0x33, 0xAA, 0x33))  # the underline of generated text
    heat = {round(120 * math.exp(e[0])) for c in state.calls if c.kind == "gen" for e in c.output_token_logprobs}
    assert all(shown(hsl_rgb(h)) for h in heat)  # every token colour of the heat maps is on screen


def test_the_browser_parses_model_text_as_text(page):
    path, state = page
    dom = chromium("--dump-dom", path.as_uri()).stdout
    assert 'class="plait-state"' in dom and "pwned" in dom
    assert "<script" not in dom and "<img" not in dom  # escaped: no element was made from the model's text
    gens = [c for c in state.calls if c.kind == "gen"]
    assert len(gens) == 4 and dom.count('class="plait-tok"') == sum(c.completion_tokens for c in gens)  # a span a token
    assert dom.count('<details class="plait-branch" open="">') == 2
