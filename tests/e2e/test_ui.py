"""A person's way in: headless Chromium opens the deployment page of the Prefect UI served by the test server,
starts a run with Run → Quick run (pointing `config` at a tiny project), and watches the run page until the
run is Completed. Screenshots go to /tmp/ui-*.png at each stage, and /tmp/ui-failure.png when it fails.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the test extra):
    apt-get install -y chromium chromium-driver && pip install -e '.[test]'
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .e2e_helpers import RUN_TIMEOUT, TERMINAL, PrefectServer, assert_outputs, chromium_paths, write_config

pytestmark = pytest.mark.e2e

SCREENSHOTS = Path("/tmp")

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
        "--window-size=1400,1000",
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


def _runs(server: PrefectServer, deployment_id: str) -> list[dict]:
    response = server.api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return response.json()


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"ui-{name}.png"))


def test_quick_run_from_the_deployment_page(
    prefect_server: PrefectServer, deployments, worker, tiny_model, tmp_path, browser
):
    server = prefect_server
    config = write_config(tmp_path / "project", tiny_model)
    wait = WebDriverWait(browser, 60)
    deployment_id = deployments["finetune-local"]["id"]

    before = {r["id"] for r in _runs(server, deployment_id)}
    # The page `prefect deploy` prints as "View Deployment in UI".
    browser.get(f"{server.url}/deployments/deployment/{deployment_id}")
    wait.until(ec.visibility_of_element_located((By.XPATH, "//*[normalize-space()='finetune-local']")))
    _shot(browser, "deployment")

    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
    wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Quick run']"))).click()

    # `config` has no default in the flow's signature, so the UI asks for it, filled with the deployment's value.
    box = wait.until(ec.visibility_of_element_located((By.XPATH, "//div[@role='dialog']//textarea")))
    assert box.get_attribute("value") == "examples/tone/tiny-cpu.json"
    box.clear()
    box.send_keys(str(config))
    _shot(browser, "run-dialog")
    browser.find_element(By.XPATH, "//div[@role='dialog']//button[normalize-space()='Run']").click()

    # The UI confirms with a toast; the new run is the deployment's one run that was not there before.
    wait.until(ec.visibility_of_element_located((By.XPATH, "//*[contains(normalize-space(), 'scheduled to start')]")))
    _shot(browser, "scheduled")
    new = [r for r in _runs(server, deployment_id) if r["id"] not in before]
    assert len(new) == 1, new
    flow_run_id = new[0]["id"]
    assert new[0]["parameters"]["config"] == str(config)

    browser.get(f"{server.url}/runs/flow-run/{flow_run_id}")
    deadline = time.monotonic() + RUN_TIMEOUT
    seen = None
    while time.monotonic() < deadline:
        try:
            # The run page refreshes itself every few seconds; its state badge says where the run is.
            WebDriverWait(browser, 5).until(
                ec.visibility_of_element_located(
                    (By.XPATH, "//*[contains(@class, 'state-badge')][normalize-space()='Completed']")
                )
            )
            seen = "Completed"
            break
        except TimeoutException:
            state = server.flow_run(flow_run_id)["state"]
            if state["type"] in TERMINAL and state["type"] != "COMPLETED":
                _shot(browser, "failure")
                pytest.fail(f"the run ended {state['name']}:\n{server.describe(flow_run_id)}")
    _shot(browser, "completed")
    assert seen == "Completed", f"the UI never showed Completed:\n{server.describe(flow_run_id)}"
    assert server.flow_run(flow_run_id)["state"]["type"] == "COMPLETED"
    assert_outputs(tmp_path / "project" / "outputs")
