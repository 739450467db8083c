"""Retake docs/studio.png: the studio on the default bundled model, a story generated, retried,
with the probability view open.

    python docs/screenshot.py            # needs Debian's chromium and the playwright package

The server runs in this process on a free port with a throwaway project store.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent


def main():
    import uvicorn
    from playwright.sync_api import sync_playwright

    from llmos.llm import LLM
    from llmos.server.app import create_app
    from llmos.db import Store

    llm = LLM.load("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = uvicorn.Server(uvicorn.Config(create_app(llm, store=Store(Path(tmp) / "studio.db")),
                                               host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.1)
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            sys.exit("Debian's chromium is needed: apt-get install chromium")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.body.dataset.ready === 'true'")
            idle = "() => document.querySelector('#stop').disabled && !document.querySelector('#generate').disabled"
            page.fill("#memory", "A fox keeps the lighthouse on a northern island. Quiet, wry, a little sad.")
            page.fill("#authors-note", "Short sentences. Sea weather.")
            page.fill("#max_tokens", "60")
            page.fill("#editor", "Every night the fox climbed the hundred steps of the lighthouse and lit the lamp.")
            page.click("#generate")
            page.wait_for_function(idle, timeout=300_000)
            page.click("#retry")
            page.wait_for_function(idle, timeout=300_000)
            page.fill("#project-name", "The lighthouse fox")
            page.press("#project-name", "Tab")
            page.wait_for_function("() => document.querySelector('#save-state').textContent === 'saved'")
            page.check("#show-probs")
            page.locator("#probability .tok").nth(4).click()
            page.wait_for_selector("#token-popup button")
            page.screenshot(path=str(HERE / "studio.png"))
            browser.close()
        server.should_exit = True
        server.config.app.state.scheduler.close()
    print(f"wrote {HERE / 'studio.png'}")


if __name__ == "__main__":
    main()
