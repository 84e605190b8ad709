"""Regenerate docs/ui-runs.png and docs/ui-compare.png: a quickstart-style run and a 3 methods x 2 seeds grid on
the demo digits CLIP, shown by `mmpeft ui` in headless Chromium (needs `mmpeft[ui]`, selenium, chromium and
chromium-driver). About two minutes on 2 CPU cores:  python docs/make_screenshots.py [WORK_DIR]
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import mmpeft

DOCS = Path(__file__).resolve().parent
PORT = 7899
RECIPE = {
    "name": "digits", "seed": 0, "backbone": {"id": "mmpeft-demo/digits-clip"},
    "data": {"source": "digits", "subset": "heldout", "templates": ["a photo of the digit {label}."],
             "split": {"val": 0.15, "test": 0.25}, "shots": 16, "shift": ["rot90"]},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.003, "warmup_ratio": 0.1},
}


def make_runs(root: Path) -> None:
    mmpeft.run({**RECIPE, "method": "adapters/lora-vision-r8.yaml", "output": {"dir": str(root), "name": "lora-r8"}})
    mmpeft.compare({**RECIPE, "output": {"dir": str(root), "name": "methods"},
                    "grid": {"methods": ["linear_probe", "bitfit", "lora"], "seeds": [0, 1],
                             "baseline": "linear_probe"}})


def save(driver, path: Path) -> None:
    """A palette PNG keeps a screenshot of text and flat colours well under 300 KB."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=64).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def wait_text(driver, element_id: str, needle: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while True:
        found = driver.find_elements(By.ID, element_id)  # the page renders after it loads
        if found and needle in found[0].text:
            return
        if time.time() > deadline:
            raise TimeoutError(f"{needle!r} never appeared in #{element_id}")
        time.sleep(0.3)


def shoot(root: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{PORT}/")
        wait_text(driver, "runs-table", "lora-r8")
        next(c for c in driver.find_elements(By.CSS_SELECTOR, "#runs-table [role=gridcell]")
             if c.text.strip() == "lora-r8").click()
        wait_text(driver, "report", "Trainable parameters")
        save(driver, DOCS / "ui-runs.png")
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Compare").click()
        picker = driver.find_element(By.CSS_SELECTOR, "#compare-picker input")
        for choice in ("lora-r8", "methods"):
            picker.click()
            picker.send_keys(choice)
            time.sleep(0.5)
            next(o for o in driver.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
                 if o.text.strip() == choice).click()
        picker.send_keys(Keys.ESCAPE)
        time.sleep(0.5)
        driver.find_element(By.ID, "compare-go").click()
        wait_text(driver, "compare-table", "methods : lora")
        time.sleep(2)  # plots load
        save(driver, DOCS / "ui-compare.png")
    finally:
        driver.quit()


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mmpeft-ui-shots-"))
    if not (root / "methods" / "summary.json").is_file():
        make_runs(root)
    server = subprocess.Popen([sys.executable, "-m", "mmpeft", "ui", str(root), "--port", str(PORT)],
                              start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        shoot(root)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


if __name__ == "__main__":
    main()
