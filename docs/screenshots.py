"""Screenshots of the MLflow UI with headless Chromium, driven over the DevTools protocol.

    python docs/screenshots.py BASE_URL OUT_DIR EXPERIMENT_ID PARENT_RUN_ID CHILD_RUN_ID...

Called by docs/screenshots.sh with a running `harness mlflow-server`. Plain
`chromium --screenshot` cannot close the UI's assistant panel (it opens on a first
visit), switch a view or wait for the charts to draw: here each page loads, waits
in real time, and is shot. Uses aiohttp (installed with Ray) as the
WebSocket client. Starts one Chromium and stops it by its PID.
"""

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

WINDOW = (1400, 900)
DEVTOOLS_PORT = 9237


class Page:
    def __init__(self, socket):
        self.socket, self.next_id = socket, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        async for message in self.socket:
            reply = json.loads(message.data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def open(self, url: str, settle_s: float) -> None:
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(settle_s)

    async def click(self, selector_js: str) -> bool:
        """A real mouse click (press, release) at the centre of the element ``selector_js`` finds:
        some of the UI's controls react to the press, not to a scripted click()."""
        box = await self.js(f"""(() => {{ const e = {selector_js};
            if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if not box:
            return False
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        return True

    async def click_text(self, text: str) -> bool:
        """Click the visible element whose text is ``text``, innermost first."""
        return await self.click(f"""[...document.querySelectorAll('*')]
            .filter(e => e.textContent.trim() === {json.dumps(text)} && e.offsetParent !== null).pop()""")

    async def choose(self, label: str, option: str) -> bool:
        """Pick ``option`` in the dropdown that follows the text ``label``: open it, click the option."""
        opened = await self.click(f"""(() => {{
            const title = [...document.querySelectorAll('*')].filter(e => e.textContent.trim() === {json.dumps(label)}).pop();
            let box = title; while (box && !box.querySelector('input, [role=combobox]')) box = box.parentElement;
            return box && box.querySelector('input, [role=combobox]'); }})()""")
        await asyncio.sleep(1)
        if opened and await self.click_text(option):
            await asyncio.sleep(1)
            return True
        for kind in ("keyDown", "keyUp"):  # not offered: close the dropdown, keep the default
            await self.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
        print(f"screenshots: {label} {option} not found; the plot keeps its default", flush=True)
        return False

    async def type_into(self, selector: str, text: str) -> bool:
        """Focus the first element matching ``selector`` and type ``text`` into it, as keystrokes."""
        if not await self.click(f"document.querySelector({json.dumps(selector)})"):
            print(f"screenshots: no {selector} to type into", flush=True)
            return False
        await self.call("Input.insertText", text=text)
        return True

    async def shoot(self, path: Path) -> None:
        png = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(png["data"]))
        print(f"screenshots: {path}", flush=True)


async def take(base: str, out: Path, experiment: str, parent: str, children: list[str]) -> None:
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{DEVTOOLS_PORT}/json/list"))
    page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    async with aiohttp.ClientSession() as session, session.ws_connect(page_url, max_msg_size=0) as socket:
        page = Page(socket)
        await page.call("Page.enable")
        runs = f"{base}/#/experiments/{experiment}?workflowType=machine_learning"
        await page.open(runs, 8)
        # The UI keeps its view state in the browser's local storage: the assistant
        # panel closed (it opens itself on a first visit). Then the parent run is
        # expanded to show its trials, as a user would with one click.
        await page.js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
        await page.call("Page.reload")
        await asyncio.sleep(8)
        await page.click("document.querySelector('button[data-component-id*=runnamecellrenderer]')")  # the parent's +
        await asyncio.sleep(3)
        await page.shoot(out / "mlflow-runs.png")
        # The runs view's second mode switch: the chart view.
        await page.click("document.querySelectorAll('[role=radio], label')[1]")
        await asyncio.sleep(12)
        await page.shoot(out / "mlflow-sweep-charts.png")
        # Click 1: the parent run, whose Overview opens with the report's answer (its description).
        await page.open(f"{base}/#/experiments/{experiment}/runs/{parent}?workflowType=machine_learning", 10)
        await page.shoot(out / "mlflow-sweep-answer.png")
        # Click 2: its Model metrics tab, filtered to the series against log2 of the batch size.
        await page.open(f"{base}/#/experiments/{experiment}/runs/{parent}/model-metrics"
                        "?workflowType=machine_learning", 12)
        await page.type_into("input[placeholder*=earch]", "by_log2_batch/")
        await asyncio.sleep(6)
        await page.shoot(out / "mlflow-sweep-vs-batch.png")
        ids = json.dumps(children, separators=(",", ":"))
        await page.open(f"{base}/#/compare-runs?runs={ids}&experiments=[\"{experiment}\"]"
                        "&workflowType=machine_learning", 8)
        if not await page.click_text("Scatter Plot"):
            print("screenshots: no Scatter Plot tab found; the compare view shows its default plot", flush=True)
        await asyncio.sleep(2)
        # Batch size on a log scale (the param log2_batch_size) against the final test accuracy.
        await page.choose("X-axis:", "log2_batch_size")
        await page.choose("Y-axis:", "test_accuracy")
        await asyncio.sleep(3)
        await page.shoot(out / "mlflow-compare.png")


def main(argv: list[str]) -> int:
    base, out, experiment, parent, *children = argv
    profile = tempfile.mkdtemp(prefix="harness-chromium-")
    browser = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={DEVTOOLS_PORT}", "--remote-debugging-address=127.0.0.1",
         f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # the DevTools endpoint answers once the browser is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{DEVTOOLS_PORT}/json/version", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        asyncio.run(take(base.rstrip("/"), Path(out), experiment, parent, children))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
