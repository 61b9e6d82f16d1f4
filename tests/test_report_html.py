"""report.html rendered by headless Chromium: the page draws, and its charts are on it.

The screenshot is decoded here (a small PNG reader, no Pillow) and checked for the exact
fill colours of each chart, so a chart that silently fails to draw fails the test.
"""

from __future__ import annotations

import copy
import html as html_lib
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_prefetch.cli.main import app
from moe_prefetch.report import html as report_html
from moe_prefetch.report import profiling

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
BANNERS = {"cpu": "#fff4d6", "cuda": "#e3f0e6", "simulated": "#fde2e4"}


def read_png(path) -> np.ndarray:
    """8-bit RGB(A), non-interlaced PNG -> [H, W, 3] uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and color_type in (2, 6) and interlace == 0
    bpp = 3 if color_type == 2 else 4
    stride = w * bpp
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, stride + 1)
    out, prev = np.zeros((h, stride), np.uint8), np.zeros(stride, np.int64)
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average or Paeth: each byte depends on the decoded one to its left
            done, up, raw = [0] * stride, prev.tolist(), line.tolist()
            for i in range(stride):
                a = done[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    done[i] = (raw[i] + ((a + b) >> 1)) & 255
                    continue
                c = up[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                done[i] = (raw[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.array(done, np.int64)
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3]


def screenshot(html_path, tmp_path, size=(1280, 3000)) -> np.ndarray:
    png = tmp_path / f"{html_path.stem}.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={png}",
            f"--window-size={size[0]},{size[1]}",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert png.stat().st_size > 10_000, "screenshot is suspiciously small"
    return read_png(png)


def pixels_of(image: np.ndarray, hex_color: str) -> int:
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return int((image == rgb).all(axis=-1).sum())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_cli import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp("html_model"))
    out = tmp_path_factory.mktemp("html_report")
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            str(folder),
            "--prompt",
            "def fibonacci(n):",
            "--device",
            "cpu",
            "--max-new-tokens",
            "24",
            "--cache-slots",
            "10",  # 16 experts, 4 per token: room to prefetch into, so every colour shows
            "--predictor",
            "next-gate",
            # misses on the host lane: on a CPU device auto copies experts this small instead; with
            # a desktop host profile's lanes (a use on the device saves host time) predictions and
            # host-served experts are uploaded, so prefetched hits show too (on a CPU device's own
            # lanes nothing would be copied with on_miss="host")
            "--on-miss",
            "host",
            "--host",
            "ddr4-3200-2ch",
            "--report",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return profiling.load_run(out / "run.json"), out / "report.html"


def test_report_is_self_contained(run):
    html = run[1].read_text()
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert not re.search(r"(src|href)\s*=", html)
    assert html.count("<svg") == 5


def test_cpu_report_draws_every_chart(run, tmp_path):
    image = screenshot(run[1], tmp_path)
    assert image.shape == (3000, 1280, 3)
    assert len(np.unique(image.reshape(-1, 3)[::7], axis=0)) > 50, "the page is (nearly) one colour"
    assert pixels_of(image, BANNERS["cpu"]) > 5_000  # "Measured on CPU" banner
    charts = {
        "hit rate: prefetched hits": report_html.C_PREF,
        "hit rate: misses run on the host lane": report_html.C_HOST,
        "hit rate: other hits / timeline calls": report_html.C_HIT,
        "stall per token: computing": report_html.C_BUSY,
        "lanes per token: device": report_html.C_DEVICE_LANE,
        "occupancy: layer 0": report_html.LAYER_COLORS[0],
        "occupancy: layer 1": report_html.LAYER_COLORS[1],
    }
    for chart, color in charts.items():
        assert pixels_of(image, color) > 500, f"{chart} ({color}) is not on the page"


@pytest.mark.parametrize("measured_on", ["cuda", "simulated"])
def test_banner_says_how_it_was_measured(run, tmp_path, measured_on):
    record = copy.deepcopy(run[0])
    record["measured_on"] = measured_on
    if measured_on == "cuda":  # CUDA copies carry no timestamps
        record["loads"] = [{k: e[k] for k in ("slot", "tag", "bytes")} for e in record["loads"]]
    html = profiling.write_html(tmp_path / f"{measured_on}.html", record)
    text = html.read_text()
    assert html_lib.escape(profiling.MEASURED_ON[measured_on]) in text
    image = screenshot(html, tmp_path, size=(1280, 400))
    assert pixels_of(image, BANNERS[measured_on]) > 5_000
    assert pixels_of(image, BANNERS["cpu"]) == 0
