"""The sample explorer: its encodings against plain references, and the page in a real browser
(headless Chromium through Selenium) against the run's dynamics/ arrays."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

from conftest import folded, module_store
from sample_importance.explorer import data as X

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs


def reference_grid(v: float) -> float:
    """One value through the log grid, the obvious way."""
    return 0.0 if v == 0 else math.exp(round(math.log(v) / X.LOG_STEP) * X.LOG_STEP)


def hand_made_curves(n: int = 7, E: int = 6, L: int = 3, seed: int = 0) -> np.ndarray:
    """(L + 2, n, E) float32 curves over many orders of magnitude, with zeros and a p_true that is
    exp(-NLL) for some samples and unrelated for others."""
    rng = np.random.default_rng(seed)
    beta = 10.0 ** rng.uniform(-30, 2, size=(L, n, E))
    beta[0, 1, 2] = 0.0  # a zero gradient
    beta[:, 2] = 1e-38  # near float32's smallest normal
    nll = 10.0 ** rng.uniform(-9, 1.5, size=(n, E))
    nll[3, 4] = 0.0  # p_true rounded to 1
    p = np.exp(-nll)
    p[5] = rng.uniform(0, 1, size=E)  # not exp(-NLL): the residual carries it
    p[6, 0] = 0.0
    return np.concatenate([beta, nll[None], p[None]]).astype(np.float32)


def test_curve_encoding_is_the_log_grid_within_the_stated_bound():
    curves = hand_made_curves()
    b = X.encode_curves(curves)
    shown = X.decode_curves(b)
    expected = np.vectorize(reference_grid)(curves.astype(np.float64))
    np.testing.assert_allclose(shown, expected, rtol=1e-14, atol=0)  # on the grid, whatever the predictions
    nonzero = curves > 0
    rel = np.abs(shown[nonzero] - curves[nonzero]) / curves[nonzero]
    assert rel.max() <= X.MAX_RELATIVE_ERROR < 0.01
    assert rel.max() > 0.5 * X.MAX_RELATIVE_ERROR  # the bound is tight, not vacuous
    np.testing.assert_array_equal(shown == 0, curves == 0)
    chunked = X.encode_curves(curves, chunk=3)  # 7 samples: chunks of 3, 3 and 1
    assert len(chunked["chunks"]) == 3
    np.testing.assert_array_equal(X.decode_curves(chunked), shown)


def test_curve_encoding_with_one_layer_and_bad_input():
    curves = hand_made_curves(L=1, n=7, E=5)[:, :, :1]  # one layer, one epoch
    np.testing.assert_allclose(X.decode_curves(X.encode_curves(curves)),
                               np.vectorize(reference_grid)(curves.astype(np.float64)), rtol=1e-14, atol=0)
    with pytest.raises(ValueError):
        X.log_codes(np.array([1.0, -1e-9]))
    with pytest.raises(ValueError):
        X.log_codes(np.array([np.nan]))


def test_signed_curves_keep_their_sign_and_the_log_grid_bound():
    rng = np.random.default_rng(3)
    c = (rng.choice([-1.0, 1.0], size=(2, 7, 5)) * 10.0 ** rng.uniform(-30, 2, size=(2, 7, 5))).astype(np.float32)
    c[0, 1, 2] = 0.0
    c[1, 3] = np.float32(-1e-45)  # float32's smallest subnormal, negative
    b = X.encode_signed(c, chunk=3)
    assert len(b["chunks"]) == 3
    shown = X.decode_signed(b)
    expected = np.sign(c) * np.vectorize(reference_grid)(np.abs(c.astype(np.float64)))
    np.testing.assert_allclose(shown, expected, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.sign(shown), np.sign(c))
    nonzero = c != 0
    assert (np.abs(shown[nonzero] - c[nonzero]) / np.abs(c[nonzero])).max() <= X.MAX_RELATIVE_ERROR


def test_blobs_round_trip():
    rng = np.random.default_rng(1)
    for a in (rng.normal(size=(5, 4)).astype(np.float32), np.arange(-3, 9, dtype=np.int32), np.zeros(0, np.uint8)):
        b = X.blob(a)
        np.testing.assert_array_equal(X.unblob(b), a)
        assert b["byte_planes"] == (a.dtype == np.float32)


def test_run_curves_order_and_ranks():
    E, n, L = 4, 3, 2
    imp = np.arange(E * n * L, dtype=np.float32).reshape(E, n, L) + 1
    loss = np.arange(E * n, dtype=np.float32).reshape(E, n) + 100
    c = X.run_curves(imp, loss, np.exp(-loss))
    assert c.shape == (L + 2, n, E)
    for q in range(L):
        for i in range(n):
            np.testing.assert_array_equal(c[q, i], [imp[t, i, q] for t in range(E)])
    np.testing.assert_array_equal(c[L, 1], loss[:, 1])
    # rank 1 = hardest; ties share the smallest rank; "smaller is harder" for e.g. confidence
    np.testing.assert_array_equal(X.ranks(np.array([0.5, 2.0, 2.0, 0.1])), [3, 1, 1, 4])
    np.testing.assert_array_equal(X.ranks(np.array([0.5, 2.0, 2.0, 0.1]), harder_is_larger=False), [2, 3, 3, 1])


def test_cluster_payload_maps_sample_ids_and_ranks_clusters_by_difficulty():
    from sample_importance.stages.explore import cluster_payload

    clusters = pd.DataFrame({"sample_id": [4, 1, 7], "cluster": [1, 0, 1], "mean_nll": [0.3, 0.1, 0.5]})
    summary = pd.DataFrame({"cluster": [0, 1], "size": [1, 2], "difficulty": [0.1, 0.4], "peak_epoch": [1, 3]})
    assign, rows = cluster_payload(np.array([0, 1, 4, 7, 9]), clusters, summary)
    np.testing.assert_array_equal(assign, [-1, 0, 1, 1, -1])
    assert [(r["cluster"], r["rank"], r["size"]) for r in rows] == [(0, 0, 1), (1, 1, 2)]


def test_sprite_sheets_hold_every_image_losslessly_when_small():
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, size=(23, 8, 8), dtype=np.uint8)
    s = X.sprite_sheets(imgs, columns=5, rows=2)  # 10 per sheet: 3 sheets, the last one partly filled
    assert len(s["sheets"]) == 3 and s["encoding"] == "WebP lossless"
    for i in (0, 9, 10, 22):
        k, j = divmod(i, 10)
        r, c = divmod(j, 5)
        sheet = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["sheets"][k].split(",", 1)[1]))).convert("L"))
        np.testing.assert_array_equal(sheet[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], imgs[i])


# --- the page in a real browser -------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason="headless Chromium is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    """A tiny digits run, a cluster run of it, and the explorer of both: (run id, cluster run id,
    path of explorer.html, dynamics)."""
    import cluster as cluster_entry
    import explore as explore_entry

    from sample_importance import mlflow_io

    args = ["--dataset", "digits", "--subset", "300", "--epochs", "4", "--depth", "2", "--width", "16",
            "--batch_size", "50", "--device", "cpu", "--attribute_to", "test", "--target_size", "50"]
    with module_store(tmp_path_factory, "explorer", args) as (tmp, run_id), pytest.MonkeyPatch.context() as mp:
        mp.setattr(X, "CURVE_CHUNK", 64)  # 300 samples: the page reads curves from 5 chunks
        cluster_id = cluster_entry.main(folded("cluster", [*args, "--train_run_ids", run_id, "--label", "3", "--num_clusters", "3"]))
        explore_id = explore_entry.main(folded("explore", [*args, "--train_run_ids", run_id]))
        path = mlflow_io._local_path(mlflow_io.get_run(explore_id).info.artifact_uri) / "explorer.html"
        yield run_id, cluster_id, path, mlflow_io.load_dynamics(run_id)


def test_the_explorer_is_one_self_contained_file(explored):
    _, _, path, _ = explored
    html = path.read_text()
    for fetched in ("<script src=", "<link ", "@import", "<iframe"):
        assert fetched not in html, f"the page must not load {fetched}"
    assert 'id="si-plotly"' in html and 'id="si-data"' in html
    start = html.index('id="si-data">') + len('id="si-data">')
    payload = json.loads(html[start:html.index("</script>", start)])
    assert payload["curves"]["curve_shape"] == [3 + 2, 300, 4] and len(payload["curves"]["chunks"]) == 5


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as profile:
        options = Options()
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--enable-unsafe-swiftshader", "--window-size=1500,1300", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.binary_location = CHROMIUM
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver, script: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for: {script}")
        time.sleep(0.05)


def shown(driver, selector: str) -> float:
    return float(driver.find_element("css selector", selector).get_attribute("data-value"))


def check_detail(driver, d, sample_id: int) -> None:
    """The detail panel shows `sample_id` with the run's values (within the encoding's bound)."""
    wait_for(driver, f"return document.body.dataset.selected === '{sample_id}'", 10)
    i = int(np.flatnonzero(d.sample_id == sample_id)[0])
    assert driver.find_element("id", "detail-sample-id").text == str(sample_id)
    assert driver.find_element("id", "detail-label").text.startswith(str(int(d.label[i])))
    tau = d.total_importance
    # Scores travel as float32: equal to the recorded value up to float32 rounding.
    assert shown(driver, '[data-score="total_importance"] .value') == pytest.approx(tau[i], rel=1e-6)
    assert shown(driver, '[data-score="final_nll"] .value') == pytest.approx(float(d.final_loss[i]), rel=1e-6)
    rank = int(driver.find_element("css selector", '[data-score="total_importance"] .rank').get_attribute("data-rank"))
    assert rank == X.ranks(tau.astype(np.float32))[i]
    bound = X.MAX_RELATIVE_ERROR * (1 + 1e-6)
    for k, layer in enumerate(d.layer_names):
        beta = float(d.importance[-1, i, k])
        assert shown(driver, f'[data-curve="beta_{layer}"] .value') == pytest.approx(beta, rel=bound)
    assert shown(driver, '[data-curve="nll"] .value') == pytest.approx(float(d.loss[-1, i]), rel=bound)
    assert shown(driver, '[data-curve="p_true"] .value') == pytest.approx(float(d.p_true[-1, i]), rel=bound)
    assert driver.find_element("css selector", "#detail-image .si-img").size["width"] > 0
    # The in-run attribution beside beta: one signed curve per layer, each epoch within the encoding's bound.
    if d.contribution is None:  # a run without it shows none
        assert not driver.find_element("id", "contribution-plot").is_displayed()
        return
    c = np.asarray(d.contribution[:, i], np.float64)  # (E, L)
    curves = driver.execute_script("return document.getElementById('contribution-plot').data.map((t) => t.y);")
    np.testing.assert_allclose(np.array(curves).T, c, rtol=bound)
    verdict = "raised" if c.sum() > 0 else "lowered"
    assert f"sample {sample_id} {verdict} the target loss" in driver.find_element("id", "contribution-note").text


@needs_chromium
def test_explorer_in_headless_chromium(explored, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    run_id, cluster_id, path, d = explored
    browser.get(path.as_uri())
    wait_for(browser, "return document.body.dataset.ready === '1'")
    assert run_id in browser.find_element("id", "runs").text and cluster_id in browser.find_element("id", "runs").text

    # Search a sample id.
    target = int(d.sample_id[np.argsort(-d.total_importance)[5]])
    search = browser.find_element("id", "search")
    search.send_keys(str(target), Keys.ENTER)
    check_detail(browser, d, target)

    # Click a point of the data map: the sample whose dot is farthest from any other (so the click
    # cannot hit a neighbour), located from Plotly's own axes.
    sample_id, x, y = browser.execute_script("""
        const gd = document.getElementById('map'), fl = gd._fullLayout, t = gd.data[0];
        const px = t.x.map((v) => fl.xaxis.l2p(v) + fl._size.l), py = t.y.map((v) => fl.yaxis.l2p(v) + fl._size.t);
        let best = -1, bestGap = -1;
        for (let i = 0; i < px.length; i++) {
          let gap = Infinity;
          for (let j = 0; j < px.length; j++) if (j !== i) gap = Math.min(gap, Math.hypot(px[i] - px[j], py[i] - py[j]));
          if (gap > bestGap && px[i] > 5 && py[i] > 5) { bestGap = gap; best = i; }
        }
        return [t.customdata[best], px[best], py[best]];""")
    assert sample_id != target
    plot = browser.find_element("id", "map")
    size = plot.size
    ActionChains(browser).move_to_element_with_offset(plot, x - size["width"] / 2, y - size["height"] / 2).click().perform()
    check_detail(browser, d, int(sample_id))

    # A row of the table selects its sample; the class filter keeps only that class.
    row = browser.find_element("css selector", "#table tbody tr:nth-child(3)")
    row_id = int(row.find_element("css selector", "td").text)
    row.click()
    check_detail(browser, d, row_id)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "f-class")).select_by_value("3")
    labels = [r.find_element("css selector", "td:nth-child(2)").text for r in browser.find_elements("css selector", "#table tbody tr")]
    assert labels and all(text.startswith("3") for text in labels)
    assert len(labels) == min(100, int((d.label == 3).sum()))

    # The most harmful samples to the target (largest contribution first), and the most helpful.
    total = np.asarray(d.contribution, np.float64).sum((0, 2))
    in_class = np.where(d.label == 3, total, np.nan)  # the class filter above still holds: within class 3
    for button, pick in (("most-harmful", np.nanargmax), ("most-helpful", np.nanargmin)):
        browser.find_element("id", button).click()
        first = int(browser.find_element("css selector", "#table tbody tr td").text)
        assert first == int(d.sample_id[pick(in_class)])
    Select(browser.find_element("id", "f-class")).select_by_value("")
    for button, pick in (("most-harmful", np.argmax), ("most-helpful", np.argmin)):
        browser.find_element("id", button).click()
        first = int(browser.find_element("css selector", "#table tbody tr td").text)
        assert first == int(d.sample_id[pick(total)])
    assert browser.find_element("id", "colour-by").get_attribute("value") == "score:contribution_total"

    # The clusters of the cluster run, with their members' images.
    assert len(browser.find_elements("css selector", ".si-cluster")) == 3
    assert len(browser.find_elements("css selector", ".si-cluster .si-img")) == int((d.label == 3).sum())

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@needs_chromium
def test_explorer_inside_the_mlflow_ui(tmp_path, monkeypatch, mlflow_server, browser):
    """MLflow's UI shows an HTML artifact in an iframe (sandbox="allow-scripts", a blob: URL): the
    page starts there, finds a sample, and links the runs to the server it was logged to."""
    import mlflow
    import train as train_entry

    import explore as explore_entry
    from sample_importance import mlflow_io
    from selenium.webdriver.common.keys import Keys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        args = ["--subset", "100", "--epochs", "2", "--width", "8", "--batch_size", "50", "--device", "cpu"]
        train_id = train_entry.main(args)
        explore_id = explore_entry.main(folded("explore", [*args, "--train_run_ids", train_id]))
        experiment = mlflow_io.get_run(explore_id).info.experiment_id
    finally:
        mlflow.set_tracking_uri(None)
    browser.get(f"{mlflow_server}/#/experiments/{experiment}/runs/{explore_id}/artifacts/explorer.html")
    wait_for(browser, "return document.querySelector('iframe.mlflow-html-iframe') !== null", 90)
    frame = browser.find_element("css selector", "iframe.mlflow-html-iframe")
    assert "allow-scripts" in frame.get_attribute("sandbox")
    browser.switch_to.frame(frame)
    wait_for(browser, "return document.body && document.body.dataset.ready === '1'", 90)
    browser.find_element("id", "search").send_keys("7", Keys.ENTER)
    wait_for(browser, "return document.body.dataset.selected === '7'", 10)
    assert browser.find_element("id", "detail-sample-id").text == "7"
    link = browser.find_element("css selector", "#runs a")
    assert link.text == train_id and link.get_attribute("href").startswith(mlflow_server)
    browser.switch_to.default_content()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "blob:" in e["message"]]
    assert not errors, errors


def test_explore_refuses_an_early_epoch_beyond_the_run(explored, capsys):
    import explore as explore_entry
    from _cli import run_cli

    run_id, _, _, _ = explored
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: explore_entry.main(["--train_run_ids", run_id, "--train", "early_epoch=9"]))
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == ["error: early_epoch=9 is outside the run's 4 epochs: choose 1 to 4."]
