"""`mmpeft ui` in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium; nothing
downloads a browser): the runs table, a report, a side-by-side comparison, a recipe launched to its end.
Screenshots go to the test's tmp folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
pytest.importorskip("gradio", reason="mmpeft ui needs gradio: pip install 'mmpeft[ui]'")
pytest.importorskip("selenium", reason="browser tests need selenium: pip install selenium")
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip("no browser: apt-get install -y chromium chromium-driver (see .ci/run)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

WAIT_SECONDS = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser_runs(ui_runs_dir, tmp_path_factory) -> Path:
    """A copy of the session's runs folder: what this test launches into it stays out of the other tests' way."""
    copy = tmp_path_factory.mktemp("ui-browser") / "runs"
    shutil.copytree(ui_runs_dir, copy)
    return copy


@pytest.fixture(scope="module")
def ui_url(browser_runs, tmp_path_factory):
    """`python -m mmpeft ui RUNS_DIR --port P` as a user starts it, until the page answers."""
    ui_runs_dir = browser_runs
    port = free_port()
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "mmpeft", "ui", str(ui_runs_dir), "--port", str(port)],
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + WAIT_SECONDS
        while True:
            assert server.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"mmpeft ui did not answer: {log.read_text()}"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # a Service: selenium-manager never runs
    yield driver
    driver.quit()


def wait_for(condition, what: str, seconds: float = WAIT_SECONDS):
    deadline = time.time() + seconds
    while True:
        try:
            found = condition()
        except Exception:  # elements re-render under Gradio; try again
            found = None
        if found:
            return found
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def wait_text(driver, element_id: str, *needles: str) -> str:
    """The element's text once it holds any of `needles`."""
    return wait_for(lambda: (lambda t: t if any(n in t for n in needles) else None)(text_of(driver, element_id)),
                    f"{needles} in #{element_id}")


def click_cell(driver, table_id: str, value: str) -> None:
    cell = wait_for(lambda: next((c for c in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} [role=gridcell]")
                                  if c.text.strip() == value), None), f"{value} in {table_id}")
    cell.click()


def pick(driver, dropdown_id: str, *choices: str) -> None:
    """Choose options of a Gradio dropdown by typing and clicking them, then close its list."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{dropdown_id} input")
    for choice in choices:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", box)
        box.send_keys(Keys.CONTROL, "a")  # a single-choice box holds its current value: type over it
        box.send_keys(choice)
        wait_for(lambda c=choice: [o for o in driver.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
                                   if o.text.strip() == c], f"option {choice}")[0].click()
    box.send_keys(Keys.ESCAPE)  # the open list would cover the buttons below it
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li"), "the option list to close")


def open_tab(driver, name: str) -> None:
    button = wait_for(lambda: next((b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                    if b.text.strip() == name), None), f"tab {name}")
    button.click()


def test_runs_table_report_compare_and_launch(browser, ui_url, browser_runs, color_folder, tmp_path):
    ui_runs_dir = browser_runs
    browser.get(ui_url)
    table = wait_text(browser, "runs-table", "grid/cells/bitfit-seed0")
    assert "lora-run" in table and "compare" in table and "finished" in table
    browser.save_screenshot(str(tmp_path / "runs.png"))

    click_cell(browser, "runs-table", "lora-run")
    report = wait_text(browser, "report", "Trainable parameters")
    assert "after training" in report and "finished" in text_of(browser, "run-head")
    open_tab(browser, "Plots")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#plots img"), "the confusion matrix")
    browser.save_screenshot(str(tmp_path / "report.png"))

    open_tab(browser, "Compare")
    pick(browser, "compare-picker", "lora-run", "grid")
    browser.find_element(By.ID, "compare-go").click()
    compared = wait_text(browser, "compare-table", "grid : bitfit")
    assert "lora-run" in compared and browser.find_elements(By.CSS_SELECTOR, "#compare-table strong")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#compare-plots img")) >= 3, "plots side by side")
    browser.save_screenshot(str(tmp_path / "compare.png"))

    recipe = yaml.safe_load((ui_runs_dir / "lora-run" / "recipe.yaml").read_text())
    recipe["output"] = {"dir": "anywhere", "name": "launched"}  # output.dir: the UI writes under RUNS_DIR
    upload = tmp_path / "one-epoch.yaml"
    upload.write_text("# mmpeft run one-epoch.yaml\n" + yaml.safe_dump(recipe, sort_keys=False))
    open_tab(browser, "Launch")
    browser.find_element(By.CSS_SELECTOR, "#recipe-upload input[type=file]").send_keys(str(upload))
    wait_for(lambda: "one-epoch" in browser.find_element(By.CSS_SELECTOR, "#recipe-name textarea, #recipe-name input")
             .get_attribute("value"), "the uploaded recipe in the editor")
    browser.find_element(By.ID, "start-recipe").click()
    started = wait_text(browser, "launch-status", "started", "problem")
    assert "started" in started and "launched" in started, started
    wait_for(lambda: (ui_runs_dir / "launched" / "recipe.yaml").is_file(), "the launched run's folder")
    open_tab(browser, "Runs")
    browser.find_element(By.ID, "refresh-runs").click()
    pick(browser, "folder-picker", "launched")  # picked while it runs: the timer refreshes its status and log
    wait_text(browser, "run-head", "finished")
    assert (ui_runs_dir / "launched" / "metrics.json").is_file()
    browser.find_element(By.ID, "refresh-runs").click()
    wait_text(browser, "runs-table", "launched")
    open_tab(browser, "Log")
    wait_for(lambda: "finished in" in browser.find_element(By.CSS_SELECTOR, "#log-tail textarea").get_attribute(
        "value"), "the launched run's log tail")
    assert (ui_runs_dir / ".ui" / "launches" / "launched.json").is_file()
    browser.save_screenshot(str(tmp_path / "launched.png"))

    open_tab(browser, "Try it")
    import mmpeft

    if getattr(mmpeft, "predict", None) is None:
        assert "not available in this version" in wait_for(lambda: text_of(browser, "predict-missing"), "notice")
        return
    pick(browser, "predict-source", "lora-run")
    image = next((color_folder / "red").glob("*.png"))
    browser.find_element(By.CSS_SELECTOR, "#predict-images input[type=file]").send_keys(str(image))
    browser.find_element(By.CSS_SELECTOR, "#predict-labels textarea, #predict-labels input").send_keys("red, blue")
    time.sleep(1)  # the upload settles before the click
    browser.find_element(By.ID, "predict-go").click()
    shown = wait_text(browser, "predict-results", image.name)
    direct = mmpeft.predict(str(ui_runs_dir / "lora-run"), [str(image)], labels=["red", "blue"])[0]["labels"]
    assert ", ".join(f"{item['label']} {item['score']:.3f}" for item in direct) in shown  # the same call, same numbers
    browser.save_screenshot(str(tmp_path / "predict.png"))
