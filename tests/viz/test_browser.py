"""The HTML page in a real headless browser (Debian's chromium): it renders without console
errors, a click on a block's header expands it, a click on a layer fills the details, and a
screenshot is not blank. The probe script is appended by the test, never shipped in the page.

Chromium is driven by its own command line (--dump-dom, --screenshot), so the test needs no
Python browser package; it skips only where no chromium binary exists.
"""

import re
import shutil
import struct
import subprocess
import zlib

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian package chromium; "
                                "`.ci/run` installs it)")

# Records errors before the page's own script runs, then clicks like a user would.
_TRAP = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
var _ce = console.error; console.error = function () { window.__errors.push([].join.call(arguments, " ")); _ce.apply(console, arguments); };
</script>"""
_PROBE = """<script>
var block = document.querySelector(".block");
var before = block.classList.contains("expanded");
block.querySelector(".toggle").click();
var after = block.classList.contains("expanded");
var layer = block.querySelector('.node[data-node$="q_proj"]');
layer.dispatchEvent(new MouseEvent("click", {bubbles: true}));
var out = document.createElement("pre");
out.id = "probe";
out.textContent = JSON.stringify({before: before, after: after, visible: block.querySelector(".body").offsetHeight > 0,
  details: document.getElementById("details").textContent, errors: window.__errors});
document.body.appendChild(out);
</script>"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90, check=False)


def test_page_renders_without_errors_and_a_click_expands_a_block(tmp_path, picture):
    import json

    page = picture.html()
    probed = page.replace("<head>", "<head>" + _TRAP, 1).replace("</body>", _PROBE + "</body>", 1)
    (tmp_path / "page.html").write_text(probed, encoding="utf-8")
    done = _chromium(tmp_path, "--dump-dom", (tmp_path / "page.html").as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, done.stderr[-2000:]
    import html

    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == []
    assert (probe["before"], probe["after"], probe["visible"]) == (False, True, True)
    assert "model.layers.0.self_attn.q_proj" in probe["details"] and "@attn.q" in probe["details"]
    assert "chosen by rule" in probe["details"]
    assert not re.search(r"Uncaught|CONSOLE.*(Error|error)", done.stderr)
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", page)  # nothing fetched


def test_screenshot_is_not_blank(tmp_path, picture):
    (tmp_path / "page.html").write_text(picture.html(), encoding="utf-8")
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, "--window-size=1000,700", f"--screenshot={shot}", (tmp_path / "page.html").as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pixels = _png_rows(shot.read_bytes())
    colours = {row[i:i + 3] for row in pixels[::7] for i in range(0, len(row) - 3, 21)}
    assert len(colours) > 8  # text, borders, fills: far more than a blank page's one colour


def _png_rows(data: bytes) -> list[bytes]:
    """Raw RGB(A) rows of an 8-bit PNG (stdlib only; chromium writes colour type 2 or 6)."""
    width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and ctype in (2, 6)
    stride = width * (3 if ctype == 2 else 4)
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    bpp = stride // width
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return rows
