"""The reader-study page in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): answer, reload, export, score; a confidence not chosen is exported empty."""
import csv
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from xrayforge.data.prepare import prepare
from xrayforge.evaluate.reader_study import make, read_answers, read_key, score

pytestmark = pytest.mark.browser


@pytest.fixture
def driver(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromium-driver are not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                           "download.prompt_for_download": False})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    drv = webdriver.Chrome(options=opts, service=service)
    yield drv
    drv.quit()


def _export(driver, target):
    """Click the page's export and wait for its file ``target``."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "export").click()
    deadline = time.time() + 60  # a loaded machine
    while time.time() < deadline and not target.exists():
        time.sleep(0.1)
    assert target.exists(), "the page did not export the answers"
    return target


def _pack(tmp_path, n, seed):
    """A pack of n 32-px images: n / 2 phantoms and n / 2 flat grey squares."""
    prepare(f"phantom:{n}", tmp_path / "real", resolution=32, workers=1, progress=False)
    synth = tmp_path / "synth"
    synth.mkdir()
    for i in range(n // 2):
        Image.fromarray(np.full((32, 32), 120 * i // (n // 2), dtype=np.uint8)).save(synth / f"s{i}.png")
    return make(str(tmp_path / "real"), str(synth), n, tmp_path / "pack", size=32, seed=seed)


def test_answer_reload_export_and_score(driver, tmp_path):
    from selenium.webdriver.common.by import By
    info = _pack(tmp_path, 6, seed=3)
    driver.get((tmp_path / "pack" / "index.html").as_uri())
    driver.find_element(By.CSS_SELECTOR, "#conf button[data-c='2']").click()  # a confidence alone is no answer
    driver.find_element(By.ID, "reader").send_keys("dr_test")  # its 'r' and 's' are not answers
    assert "0 answered" in driver.find_element(By.ID, "pos").text
    driver.find_element(By.TAG_NAME, "body").send_keys("s")  # outside the name they are
    assert "1 answered" in driver.find_element(By.ID, "pos").text
    assert driver.find_element(By.ID, "synthetic").get_attribute("class") == "on"
    driver.find_element(By.ID, "real").click()
    driver.find_element(By.CSS_SELECTOR, "#conf button[data-c='4']").click()
    driver.find_element(By.ID, "next").click()
    driver.find_element(By.ID, "synthetic").click()  # no confidence chosen: none is recorded (it was 3)
    assert "2 answered" in driver.find_element(By.ID, "pos").text
    assert not [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#conf button.on")]
    # the page stores each answer at once, but headless Chrome hands localStorage writes of a file://
    # page to its browser process asynchronously: a reload right away can read the state from before
    # them (seen in about one run in eight, even after a second tab had read the new state). Progress
    # survives a reload: reloads are repeated until it shows, for up to 30 s; an answer lost for good
    # still fails. Reading only: the page writes nothing until it is answered
    deadline = time.time() + 30
    while True:
        driver.refresh()
        if "2 answered" in driver.find_element(By.ID, "pos").text or time.time() > deadline:
            break
        time.sleep(0.2)
    assert "2 answered" in driver.find_element(By.ID, "pos").text
    assert driver.find_element(By.ID, "pos").text.startswith("2 / 6")
    assert driver.find_element(By.ID, "reader").get_attribute("value") == "dr_test"
    target = _export(driver, tmp_path / "downloads" / "answers-dr_test.csv")
    with open(target, newline="") as fh:  # the confidence chosen, and an empty cell for the one not chosen
        assert sorted(row["confidence"] for row in csv.DictReader(fh)) == ["", "4"]
    result = score(tmp_path / "pack", info["key"], [target])
    assert result["readers"]["dr_test"]["answers"] == 2
    assert result["pooled"]["answers"] == 2
    assert {a["confidence"] for a in read_answers(target, read_key(info["key"]))} == {4, None}


def test_readers_who_left_the_name_empty_are_told_apart_by_their_files(driver, tmp_path):
    """The page wrote the placeholder 'reader' for an empty name box, so two such readers' files were
    refused as one reader's; empty, the file's name names the reader."""
    from selenium.webdriver.common.by import By
    info = _pack(tmp_path, 4, seed=0)
    driver.get((tmp_path / "pack" / "index.html").as_uri())
    driver.find_element(By.ID, "synthetic").click()
    target = _export(driver, tmp_path / "downloads" / "answers-reader.csv")
    files = [target]
    driver.execute_script("localStorage.clear()")  # a second reader, in a fresh browser
    driver.refresh()
    driver.find_element(By.ID, "synthetic").click()
    second = _export(driver, tmp_path / "downloads" / "answers-reader (1).csv")
    (tmp_path / "two").mkdir()  # each reader's file as they sent it: both called answers-reader.csv
    files.append(shutil.move(second, tmp_path / "two" / target.name))
    result = score(tmp_path / "pack", info["key"], files)
    assert len(result["readers"]) == 2 and result["pooled"]["answers"] == 2
    with pytest.raises(ValueError, match="one reader's answers exported twice"):  # one reader's file, twice
        score(tmp_path / "pack", info["key"], [target, shutil.copy(target, tmp_path / "copy.csv")])


def test_keys_r_and_s_answer_with_shift_or_caps_lock_too(driver, tmp_path):
    """The README's keys R / S: typed as capitals (Shift, Caps Lock) they did nothing."""
    from selenium.webdriver.common.by import By
    _pack(tmp_path, 4, seed=0)
    driver.get((tmp_path / "pack" / "index.html").as_uri())
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("S")
    assert "1 answered" in driver.find_element(By.ID, "pos").text
    assert driver.find_element(By.ID, "synthetic").get_attribute("class") == "on"
    body.send_keys("R")
    assert driver.find_element(By.ID, "real").get_attribute("class") == "on"
