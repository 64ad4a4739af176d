"""Screenshots of three pages of the built site (`make docs` first), with the headless chromium the suite uses.

    python docs/screenshots/take.py     # writes home.png, settings-train.png, benchmarks.png beside this file

The site is served on 127.0.0.1 (material's search and navigation need http, not file://).
"""

from __future__ import annotations

import functools
import http.server
import socketserver
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
SITE = HERE.parents[1] / "site"
PAGES = {"home.png": "", "settings-train.png": "reference/settings/#train", "benchmarks.png": "results/benchmarks/"}
# as tests/test_console_and_ui.py: no sandbox (a container's root), no GPU, small /dev/shm
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def main() -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, path in PAGES.items():
                page.goto(base + path)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(HERE / name))
                print(f"wrote {HERE / name}")
            browser.close()
        server.shutdown()


if __name__ == "__main__":
    main()
