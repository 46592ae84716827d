"""The results view (plugins/, dtm_ops.ui) in a real Airflow with its real login, over a run
mined by the real scheduler from the real S3 server, and in a real browser (Debian's Chromium).

Airflow runs in multi-team mode so that a user may lack read access to the mining DAG:
the DAG folder's bundle belongs to team ``perception``; ``reader`` is a viewer in that team,
``outsider`` a viewer in another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.airflow_server import REPO, AirflowServer, airflow_cli, get_object, put_report

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("DTM_TEST_ARTIFACTS", REPO / "test-artifacts"))
USERS = {"admin": ("admin", "admin-pw"), "reader": ("viewer", "reader-pw", "perception"),
         "outsider": ("viewer", "outsider-pw", "vision")}
TOP_K = 6


@pytest.fixture(scope="module")
def view(world, tmp_path_factory):
    """Airflow with the plugin; a dtm_mining run triggered through the REST API and finished."""
    home = tmp_path_factory.mktemp("airflow-view")
    bundles = [{"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {}, "team_name": "perception"}]
    env = {**world["env"], "AIRFLOW_HOME": str(home / "airflow"), "DTM_HOME": str(home),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__MULTI_TEAM": "True",
           "AIRFLOW__CORE__PARALLELISM": "4",
           # the run the schedule makes on unpausing finds no reports and pushes nowhere shared
           "DTM_REPORTS_URI": f"s3://{world['bucket']}/no-reports-here", "DTM_SINK_URI": f"s3://{world['bucket']}/labeling-view",
           "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles)}
    airflow_cli(env, "db", "migrate")
    for team in ("perception", "vision"):
        airflow_cli(env, "teams", "create", team)
    airflow_cli(env, "pools", "set", "gpu", "2", "GPU workers")
    put_report(world)
    server = AirflowServer(env, home / "standalone.log", USERS).start()
    try:
        server.wait_for_dag("dtm_mining", "admin")
        run_id = f"view_{uuid.uuid4().hex[:8]}"
        server.trigger("dtm_mining", run_id, {"report_uri": f"s3://{world['bucket']}/reports/day1.jsonl", "top_k": TOP_K},
                       "admin")
        assert server.wait_for_run("dtm_mining", run_id, "admin", timeout=900)["state"] == "success", server.log_tail()
        rows = [json.loads(x) for x in get_object(world, f"runs/dtm_mining/{run_id}/report/results.jsonl").splitlines()]
        yield {"server": server, "run_id": run_id, "rows": rows, "base": f"/dtm/runs/dtm_mining/{quote(run_id, safe='')}"}
    finally:
        server.stop()


def _get(view, path: str, user: str | None):
    server = view["server"]
    return server.request("GET", path, token=server.token(user) if user else None)


def test_every_route_needs_login_and_read_access_to_the_dag(view):
    b = view["base"]
    image = f"{b}/images/{view['rows'][0]['thumb']}"
    for path in (b, f"{b}/queries/bicycle-fn", image, f"{b}/tasks/push/-1"):
        status, headers, body = _get(view, path, None)
        assert status == 401 and not body.startswith(b"\xff\xd8"), (path, status)
        status, headers, body = _get(view, path, "outsider")
        assert status == 403 and "image" not in headers.get("content-type", ""), (path, status)
        assert not body.startswith(b"\xff\xd8")
    status, headers, body = _get(view, image, "reader")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body.startswith(b"\xff\xd8")
    # the same user is refused by Airflow's own API for this DAG: the view asks the same auth manager
    assert view["server"].request("GET", "/api/v2/dags/dtm_mining", token=view["server"].token("outsider"))[0] == 403


def test_overview_and_query_pages_show_the_run(view):
    b = view["base"]
    status, _, body = _get(view, b, "reader")
    page = body.decode()
    assert status == 200 and "bicycle-fn" in page
    assert "lies outside the 640x272 image" in page  # the quarantined record and its reason
    assert re.search(r"<b>1</b>quarantined", page) and re.search(rf"<b>{TOP_K}</b>hits", page)
    assert page.count("<td>scan</td>") >= 1 and "<td>publish_report</td>" in page  # timings from Airflow's DB
    status, _, body = _get(view, f"{b}/queries/bicycle-fn?per_page=4&page=2", "reader")
    ranks = [int(r) for r in re.findall(r"data-rank='(\d+)'", body.decode())]
    assert status == 200 and ranks == [5, 6]


@pytest.mark.parametrize("path,status", [
    ("/dtm/runs/dtm_mining/no_such_run", 404),
    ("/dtm/runs/no_such_dag/x", 404),
    ("{b}/queries/no-such-query", 404),
    ("{b}/queries/bicycle-fn?page=0", 422),
    ("{b}/queries/bicycle-fn?per_page=100000", 422),
    ("{b}/queries/bicycle-fn?page=99", 404),
    ("{b}/images/..%2F..%2F..%2Freports%2Fraw.jsonl", 400),
    ("{b}/images/heatmaps/bicycle-fn/..%2F..%2F..%2Ftemplates.safetensors", 400),
    ("{b}/images/results.jsonl", 400),
    ("{b}/images/thumbs/heatmaps/bicycle-fn/0999.jpg", 404),
])
def test_bad_parameters_and_unknown_runs(view, path, status):
    got, _, body = _get(view, path.format(b=view["base"]), "reader")
    assert got == status, body[:300]


def test_links_from_the_run_and_task_pages(view):
    server, run_id = view["server"], view["run_id"]
    token = server.token("reader")
    _, plugins = server.api("GET", "/api/v2/plugins", token=server.token("admin"))
    (plugin,) = [p for p in plugins["plugins"] if p["name"] == "dtm_results"]
    assert {v["destination"] for v in plugin["external_views"]} == {"dag_run", "task_instance"}
    for task, mi in (("push", -1), ("scan", 0)):
        _, links = server.api("GET", f"/api/v2/dags/dtm_mining/dagRuns/{quote(run_id, safe='')}/taskInstances/{task}/links"
                                     f"?map_index={mi}", token=token)
        assert links["extra_links"]["Mining results"] == f"{server.url}{view['base']}"
    _, links = server.api("GET", f"/api/v2/dags/dtm_mining/dagRuns/{quote(run_id, safe='')}/taskInstances/fetch_reports/links",
                          token=token)
    assert not links["extra_links"].get("Mining results")


def _through_navigation(condition):
    """``condition``, read as not yet met while the page navigates away (Airflow's redirect
    to its login page, the reload after it): ChromeDriver then answers a look-up with
    "aborted by navigation" (seen once in CI), which is the page not being there yet, not
    the test's failure. Other driver errors are raised."""
    from selenium.common.exceptions import WebDriverException

    def check(driver):
        try:
            return condition(driver)
        except WebDriverException as e:
            if "navigat" not in (e.msg or ""):
                raise
            return False
    return check


def test_a_real_browser_logs_in_and_sees_the_hits_with_their_boxes(view):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, "Debian's chromium and chromium-driver are needed (scripts/test.sh installs them)"
    server, run_id = view["server"], view["run_id"]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = ARTIFACTS / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = webdriver.Chrome(service=Service(driver_bin), options=options)
    waiter = WebDriverWait(browser, 60)

    def wait(condition):
        return waiter.until(_through_navigation(condition))

    try:
        browser.get(server.url + "/")  # Airflow sends us to its login page
        wait(ec.presence_of_element_located((By.NAME, "username"))).send_keys("reader")
        browser.find_element(By.NAME, "password").send_keys(USERS["reader"][1])
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait(lambda b: "/auth/login" not in b.current_url)
        browser.get(f"{server.url}/dags/dtm_mining/runs/{quote(run_id, safe='')}")
        wait(ec.element_to_be_clickable((By.LINK_TEXT, "Mining results"))).click()
        frame = wait(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
        browser.switch_to.frame(frame)
        wait(ec.element_to_be_clickable((By.LINK_TEXT, "bicycle-fn"))).click()
        wait(ec.presence_of_element_located((By.ID, "hits")))
        wait(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete)"))
        shown = browser.execute_script("""
            return [...document.querySelectorAll('figure.hit')].map(f => {
              const img = f.querySelector('img.thumb'), box = f.querySelector('.box');
              const a = img.getBoundingClientRect(), b = box.getBoundingClientRect();
              const [w, h] = f.dataset.frameSize.split(',').map(Number);
              return {rank: +f.dataset.rank, frame: f.dataset.frameId, natural: img.naturalWidth,
                      box: [(b.left - a.left) / a.width * w, (b.top - a.top) / a.height * h,
                            (b.right - a.left) / a.width * w, (b.bottom - a.top) / a.height * h]};
            })""")
        query_img = browser.execute_script("return document.querySelector('.query img').naturalWidth")
        browser.switch_to.default_content()
        browser.save_screenshot(str(ARTIFACTS / "results-view.png"))
    finally:
        browser.quit()
    expected = [r for r in view["rows"] if r["query_id"] == "bicycle-fn"]
    assert len(shown) == len(expected) == TOP_K and query_img > 0
    for got, want in zip(shown, expected):
        assert (got["rank"], got["frame"]) == (want["rank"], want["frame_id"])
        assert got["natural"] > 0, f"hit image of rank {got['rank']} did not render"
        # the box drawn over the rendered image, mapped back to frame pixels, is the results file's box
        assert got["box"] == pytest.approx(want["box"], abs=2.0), (got, want)
