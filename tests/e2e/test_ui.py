"""A person's way in, in headless Chromium against `grove server`: Deployments → finetune-local → Run → Custom
run, an edit in the config shown in the form (the inline config), Submit; the run page shows the training
progress live, Completed, and the report artifact draws the loss curve. A mistake typed into the config
fails the run with its one line on the run page. Screenshots go to /tmp/ui-*.png at each stage, and
/tmp/ui-failure.png when it fails.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the test extra):
    apt-get install -y chromium chromium-driver && pip install -e '.[test]'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from grove_helpers import prefect_api, step

from .e2e_helpers import BIN, RUN_TIMEOUT, TERMINAL, TINY_EXAMPLE, TONE_DATASET, chromium_paths

pytestmark = pytest.mark.e2e

SCREENSHOTS = Path("/tmp")
STEPS = 60  # the form's config; the test edits it to 50, long enough on 2 cores to watch the progress move

_paths = chromium_paths()
if _paths is None:
    pytest.skip(
        "headless Chromium is not installed (apt-get install -y chromium chromium-driver)", allow_module_level=True
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path, request):
    chromium, chromedriver = _paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,2400",  # tall: the form's config editor draws the lines in view
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    report = getattr(request.node, "e2e_call_report", None)  # set by conftest's pytest_runtest_makereport
    if report is None or report.failed:
        driver.save_screenshot(str(SCREENSHOTS / "ui-failure.png"))
    driver.quit()


@pytest.fixture
def grove_server(tmp_path, tiny_model):
    """`grove server` in a project folder whose olive-config.json (the tiny example, LoRA only) becomes the
    run form's config; its own Prefect home, so it starts (and at Ctrl-C stops) a server of its own."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(TONE_DATASET, project / "tone.json")
    config = json.loads(TINY_EXAMPLE.read_text())
    config["input_model"]["model_path"] = str(tiny_model)
    for data in config["data_configs"]:  # the training rows and the held-out ones
        data["load_dataset_config"]["data_files"] = "tone.json"
    config["passes"] = {"lora": config["passes"]["lora"]}
    del config["evaluator"]  # the UI is the point here: the tone example's evaluation runs elsewhere
    config["passes"]["lora"]["training_args"].update(max_steps=STEPS, logging_steps=1, eval_steps=25, save_steps=STEPS)
    (project / "olive-config.json").write_text(json.dumps(config, indent=2))
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in ("OLIVE_GROVE_LOCAL_SERVER", "PREFECT_API_URL")}
    log = tmp_path / "grove-server.log"
    process = subprocess.Popen([str(BIN / "grove"), "server"], cwd=project, env={**env, "PREFECT_HOME": str(home)},
                               stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "a worker takes the runs" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        url = re.search(r"Prefect UI: (http://\S+)", log.read_text()).group(1)
        yield url, project
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: the worker, then the server it started
        process.wait(90)


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"ui-{name}.png"))


def _custom_run(browser, url: str, edit_line: str, old: str, new: str) -> dict:
    """Deployments → finetune-local → Run → Custom run; in the form's config, select the first `old` after
    `edit_line` and type `new` over it; Submit. Returns the new flow run."""
    api, wait = f"{url}/api", WebDriverWait(browser, 60)
    deployment = prefect_api(api, "/deployments/name/finetune/finetune-local", method="GET")
    before = {r["id"] for r in prefect_api(api, "/flow_runs/filter", {})}
    browser.get(f"{url}/deployments")
    wait.until(ec.element_to_be_clickable((By.XPATH, "//a[normalize-space()='finetune-local']"))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()

    # The config is a code box (a textarea) holding the deployment's config as JSON: select the word and type.
    box = wait.until(ec.visibility_of_element_located((By.XPATH, "//textarea[contains(@class, 'p-code-input')]")))
    text = box.get_attribute("value")
    at = text.index(old, text.index(edit_line))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();"
                           "arguments[0].setSelectionRange(arguments[1], arguments[2])",
                           box, at, at + len(old))  # fmt: skip
    box.send_keys(new)
    assert box.get_attribute("value") == text[:at] + new + text[at + len(old) :]
    # The run options are plain fields: no None/value switch to click before typing one.
    assert "Property is type" not in browser.find_element(By.TAG_NAME, "body").text
    _shot(browser, "custom-run")

    def new_run():
        runs = [
            r for r in prefect_api(api, "/flow_runs/filter", {}) if r["id"] not in before and not r["auto_scheduled"]
        ]  # the nightly schedules' runs are not ours
        return runs[0] if runs else None

    # Prefect's UI on SQLite now and then answers a submit with "Oops. Something went wrong." while the worker
    # polls (the API was busy); a person submits again.
    for _ in range(3):
        browser.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
        try:
            run = WebDriverWait(browser, 20).until(lambda _: new_run())
            break
        except TimeoutException:
            _shot(browser, "submit-refused")
            print(browser.get_log("browser")[-5:])
    else:
        pytest.fail("the run form never started a run (see /tmp/ui-submit-refused.png)")
    assert run["deployment_id"] == deployment["id"]
    return run


def _wait_for_state(browser, api: str, run_id: str, badge: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        try:  # the run page refreshes itself; its state badge says where the run is
            WebDriverWait(browser, 5).until(ec.visibility_of_element_located(
                (By.XPATH, f"//*[contains(@class, 'state-badge')][normalize-space()='{badge}']")))  # fmt: skip
            return
        except TimeoutException:
            state = prefect_api(api, f"/flow_runs/{run_id}", method="GET")["state"]
            if state["type"] in TERMINAL and state["name"] != badge:
                pytest.fail(f"the run ended {state['name']}: {state['message']}")
    pytest.fail(f"the run page never showed {badge}")


def test_a_custom_run_with_an_edited_config_shows_progress_and_the_loss_picture(grove_server, browser):
    url, project = grove_server
    api = f"{url}/api"
    run = _custom_run(browser, url, f'"max_steps": {STEPS}', str(STEPS), "50")
    # The config as edited in the form is what the run was given, and is kept with it.
    assert run["parameters"]["config"]["passes"]["lora"]["training_args"]["max_steps"] == 50

    browser.get(f"{url}/runs/flow-run/{run['id']}")
    WebDriverWait(browser, 60).until(
        ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Artifacts']"))
    ).click()
    seen, deadline = set(), time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and not any(s == 50 for s in seen):
        text = browser.find_element(By.TAG_NAME, "body").text
        seen |= {int(s) for s in re.findall(r"adapter training: step (\d+)/50, loss \d", text)}
        if any(s < 50 for s in seen) and len(seen) >= 2:
            break  # the card moved while the run trained
        time.sleep(0.5)
    _shot(browser, "progress")
    assert len(seen) >= 2 and min(seen) < 50, f"live progress never seen on the run page (saw steps {sorted(seen)})"

    _wait_for_state(browser, api, run["id"], "Completed")
    browser.refresh()  # as a person does: the tab's list is not reloaded when the run ends
    WebDriverWait(browser, 60).until(
        ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Artifacts']"))
    ).click()
    WebDriverWait(browser, 60).until(ec.visibility_of_element_located(
        (By.XPATH, "//*[contains(text(), 'adapter training: step 50/50')]")))  # fmt: skip
    _shot(browser, "completed")
    report = WebDriverWait(browser, 60).until(ec.element_to_be_clickable(
        (By.XPATH, "//*[normalize-space()='olive-grove run report: steps, loss, outputs']")))  # fmt: skip
    report.click()
    picture = WebDriverWait(browser, 60).until(ec.visibility_of_element_located(
        (By.XPATH, "//img[@alt='train and eval loss by step']")))  # fmt: skip
    WebDriverWait(browser, 30).until(lambda _: browser.execute_script("return arguments[0].naturalWidth", picture))
    _shot(browser, "report")
    # The report links this run's own outputs: a folder of the run's own under the config's output_dir.
    [folder] = (project / "outputs").glob(f"*/runs/{run['name']}-{run['id'][-8:]}")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert str(folder / "adapter") in page, page[page.find("Outputs") :][:600]
    assert step(json.loads((folder / "report.json").read_text()), "lora")["info"]["steps"] == 50


def test_a_mistake_typed_into_the_config_fails_the_run_with_its_one_line(grove_server, browser):
    url, project = grove_server
    run = _custom_run(browser, url, '"data_files"', "tone", "missing")
    browser.get(f"{url}/runs/flow-run/{run['id']}")
    _wait_for_state(browser, f"{url}/api", run["id"], "Failed")
    # The run's log on its page: the one line, naming the config key and the path the worker looked at.
    expected = f"data_configs[0].load_dataset_config.data_files: no file at {project / 'missing.json'}"
    WebDriverWait(browser, 60).until(lambda _: expected in browser.find_element(By.TAG_NAME, "body").text)
    _shot(browser, "failed")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
