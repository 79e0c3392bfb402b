"""`dsmr app`: the page's functions, the running server through gradio_client (127.0.0.1), and one test in
a real browser (headless Chromium through Selenium; skips without it). Nothing here reaches the network."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from dsmr.app.continuation import MAX_SECONDS, cache_pieces, cache_prompt, check_request, generate_variations
from dsmr.app.models import NO_MODEL_HELP, ModelStore
from dsmr.training.resume import save_checkpoint
from dsmr.cli import main
from dsmr.errors import DsmrError
from dsmr.model import DSMR, DSMRConfig
from conftest import have_audio
from dsmr.data.tokenizers.registry import make_tokenizer
from tests.midi_factory import tiny_midi, write_midi_file

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "app.png"  # rewritten only with DSMR_UPDATE_SCREENSHOT=1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = make_tokenizer("performance")
    torch.manual_seed(0)
    model = DSMR(DSMRConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=16, n_heads=2, horizons=(16, 4)))
    path = tmp_path_factory.mktemp("app") / "run"
    save_checkpoint(path, model, {"model": model.cfg.to_dict(), "tokenizer": tok.config(),
                                  "tokenizer_hash": tok.config_hash(), "segment_len": 8})
    return path


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    return tiny_midi(tmp_path_factory.mktemp("prompt") / "prompt.mid", n=6)


# ------------------------------------------------------------------------------------------- functions


def test_generate_variations(run_dir, prompt, tmp_path):
    loaded = ModelStore().load(str(run_dir))
    results = generate_variations(loaded, prompt, tmp_path, prompt_seconds=2.0, seconds=4.0, seed=5,
                                  variations=2, min_pitch=40, max_pitch=90)
    assert [r["seed"] for r in results] == [5, 6]
    for r in results:
        assert Path(r["midi"]).is_file() and Path(r["pianoroll"]).is_file()
        assert r["prompt_seconds"] > 0 and r["music_seconds"] >= 4.0
        if have_audio():
            assert Path(r["wav"]).stat().st_size > 1000 and r["audio_note"] is None
        else:
            assert r["wav"] is None and "fluidsynth" in r["audio_note"].lower()
    # the same seed gives the same piece; without a prompt it starts from nothing
    again = generate_variations(loaded, prompt, tmp_path / "again", prompt_seconds=2.0, seconds=4.0, seed=5,
                                min_pitch=40, max_pitch=90, render_audio=False)
    assert Path(again[0]["midi"]).read_bytes() == Path(results[0]["midi"]).read_bytes()
    assert again[0]["audio_note"] == "audio rendering is off"
    free = generate_variations(loaded, None, tmp_path / "free", seconds=3.0, seed=1, render_audio=False)
    assert free[0]["prompt_tokens"] == 0


def test_bad_input_is_a_readable_message(run_dir, tmp_path):
    loaded = ModelStore().load(str(run_dir))
    junk = tmp_path / "junk.mid"
    junk.write_text("this is not MIDI")
    with pytest.raises(DsmrError, match="not a readable MIDI"):
        generate_variations(loaded, junk, tmp_path)
    silent = write_midi_file(tmp_path / "silent.mid", [])
    with pytest.raises(DsmrError, match="no notes|empty"):
        generate_variations(loaded, silent, tmp_path)
    with pytest.raises(DsmrError, match="length must be between"):
        generate_variations(loaded, None, tmp_path, seconds=MAX_SECONDS + 1)
    with pytest.raises(DsmrError, match="longer than the prompt"):
        check_request(10, 5, 1.0, 0.9, 1, 0, 127)
    with pytest.raises(DsmrError, match="variations"):
        check_request(1, 5, 1.0, 0.9, 9, 0, 127)
    with pytest.raises(DsmrError, match="pitch range"):
        check_request(1, 5, 1.0, 0.9, 1, 90, 40)
    with pytest.raises(DsmrError, match="No model loaded"):
        ModelStore().load("")
    with pytest.raises(DsmrError, match="not found"):
        ModelStore().load(str(tmp_path / "missing"))


def test_cache_prompt(bach_cache, tmp_path):
    names = cache_pieces(bach_cache)
    assert names and len(names) == bach_cache.num_pieces("validation")
    path = cache_prompt(bach_cache, names[0], tmp_path)
    assert path.stat().st_size > 50
    with pytest.raises(DsmrError, match="no piece"):
        cache_prompt(bach_cache, "nope", tmp_path)
    assert cache_pieces(None) == []


def test_cli_without_gradio_says_how_to_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["app", "--port", "7861"]) == 2
    assert 'pip install "dsmr[app]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- running server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "dsmr[app]")')
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from dsmr.app.page import serve

    port = _free_port()
    demo = serve(str(run_dir), host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_server_through_gradio_client(server, prompt, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=str(tmp_path))
    out = client.predict("", handle_file(str(prompt)), None, 2, 4, 1.0, 0.95, 3, 2, 21, 108,
                         api_name="/generate")
    assert "No model loaded" in out[0]  # an empty model box: a message, not a crash


def test_server_generates_two_variations(server, run_dir, prompt, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=str(tmp_path))
    junk = tmp_path / "junk.mid"
    junk.write_text("not midi")
    bad = client.predict(str(run_dir), handle_file(str(junk)), None, 2, 4, 1.0, 0.95, 3, 2, 21, 108,
                         api_name="/generate")
    assert "not a readable MIDI" in bad[0]
    # the server keeps serving after the error
    out = client.predict(str(run_dir), handle_file(str(prompt)), None, 2, 4, 1.0, 0.95, 3, 2, 21, 108,
                         api_name="/generate")
    status = out[0]
    assert status.startswith("**Done**") and "seed 3" in status and "seed 4" in status, status
    assert len(out) == 13  # status, then 4 audios, 4 piano rolls, 4 MIDI files (the groups are layout)
    audios, rolls, midis = out[1:5], out[5:9], out[9:13]
    assert all(Path(_path(m)).suffix == ".mid" for m in midis[:2]) and midis[2] is None
    assert all(Path(_path(r)).is_file() for r in rolls[:2])
    if have_audio():
        assert all(Path(_path(a)).suffix == ".wav" for a in audios[:2])
    else:
        assert "No audio" in status


def _path(value):
    return value if isinstance(value, str) else (value.get("path") or value.get("value"))


# ------------------------------------------------------------------------------------------ real browser


def _chromium():
    for exe in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(exe):
            return shutil.which(exe)
    return None


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="no Chromium + chromedriver (apt-get install chromium chromium-driver)")
def test_in_a_real_browser(server, prompt, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium is not installed (pip install "dsmr[browser]")')
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        file_input = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#prompt-upload input[type=file]")))
        file_input.send_keys(str(prompt))
        wait.until(EC.text_to_be_present_in_element((By.ID, "prompt-upload"), ".mid"))  # the upload is shown
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 180).until(EC.text_to_be_present_in_element((By.ID, "status"), "Done"))
        # the MIDI download link and the piano roll of the first variation are on the page
        link = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#midi-1 a[href]")))
        assert ".mid" in link.get_attribute("href")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#roll-1 img")))
        if have_audio():
            # the player has decoded the rendered WAV: its waveform shows the duration (not 0:00)
            wait.until(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#audio-1 time'))"
                ".some(t => /^[0-9]+:[0-9]{2}$/.test(t.textContent.trim()) && t.textContent.trim() !== '0:00');"))
        time.sleep(1.0)  # let the images and waveform settle before the picture
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("DSMR_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        driver.quit()


def test_cli_app_serves_on_localhost(run_dir, tmp_path, capsys):
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "dsmr[app]")')
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    assert main(["app", str(tmp_path / "missing"), "--port", str(port)]) == 2  # fails before serving
    assert "not found" in capsys.readouterr().err
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp)}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "dsmr", "app", str(run_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None and "gradio" in page.lower(), proc.stderr.read() if proc.poll() is not None else ""
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in err
    assert proc.returncode == 0, err  # SIGTERM stops it as Ctrl-C does
    assert "share=True" not in err
    left = [p.name for p in temp.iterdir() if p.name.startswith(("dsmr-app-", "gradio"))]  # not torch's caches
    assert not left, "the app's files (its pieces and Gradio's copies) go when it stops"


def test_upload_errors_name_the_users_file_and_old_outputs_are_removed(tmp_path):
    import os
    import time

    from dsmr.app.page import _remove_old_outputs
    from dsmr.app.continuation import user_words
    from dsmr.errors import DsmrError

    upload = tmp_path / "gradio" / "abc123" / "my piece.mid"
    err = DsmrError(f"not a readable MIDI file: {upload} (its data is damaged or it is not MIDI: ...)")
    assert user_words(err, str(upload)) == "not a readable MIDI file: my piece.mid (its data is damaged or it " \
                                            "is not MIDI: ...)"
    old, new = tmp_path / "out" / "old", tmp_path / "out" / "new"
    old.mkdir(parents=True)
    new.mkdir()
    (old / "variation-1.wav").write_bytes(b"x" * 100)
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    _remove_old_outputs(tmp_path / "out")
    assert not old.exists() and new.exists()


def test_the_page_opens_each_model_at_the_settings_dsmr_generate_plays_it_with(tmp_path):
    """The sliders start where `dsmr generate` resolves the same model's settings (one resolution for both):
    the duration model at its temperature and its encoding's 10-s longest note, with no most-notes-at-once
    slider (its notes carry their lengths); the performance model at 4 s and 8 notes; the seed empty (a new
    one each time)."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "dsmr[app]")')
    from dsmr.generation import defaults
    from dsmr.app.page import build_app
    from dsmr.sharing.hub import read_model_config
    from dsmr.generation.note_guard import guard_for
    from dsmr.data.tokenizers.registry import tokenizer_from_config

    for name in ("maestro-duration-small", "maestro-small"):
        folder = REPO / "models" / name
        config = read_model_config(folder)
        cli = {**defaults.sampling_defaults(config), **guard_for(tokenizer_from_config(config["tokenizer"]))}
        demo = build_app(folder, out_root=tmp_path / name, render_audio=False)
        by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        sliders = {b.label: b for b in demo.blocks.values() if type(b).__name__ == "Slider"}
        assert sliders["Temperature"].value == cli["temperature"] and sliders["Top-p"].value == cli["top_p"]
        assert by_id["max-note-seconds"].value == cli["max_note_seconds"]
        assert by_id["max-polyphony"].visible == (cli["max_polyphony"] is not None)
        if cli["max_polyphony"] is not None:
            assert by_id["max-polyphony"].value == cli["max_polyphony"]
        assert by_id["seed"].value is None
    assert cli["max_note_seconds"] == defaults.MAX_NOTE_SECONDS  # maestro-small, the last of the two
    duration = read_model_config(REPO / "models" / "maestro-duration-small")
    assert guard_for(tokenizer_from_config(duration["tokenizer"]))["max_note_seconds"] == 10.0


@pytest.fixture(scope="module")
def shipped_server():
    """The page with the shipped model, which answers a phrase with notes (a random tiny model may not)."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "dsmr[app]")')
    from dsmr.app.page import serve

    port = _free_port()
    demo = serve(str(REPO / "models" / "maestro-duration-small"), host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


FAKE_MIDI = """
window.__toSynth = [];
const input = {id: "fake-in", name: "Fake Keyboard", onmidimessage: null};
const output = {id: "fake-out", name: "Fake Synth", send: (data) => window.__toSynth.push(Array.from(data))};
window.__keyboard = (bytes) => input.onmidimessage && input.onmidimessage({data: new Uint8Array(bytes)});
navigator.requestMIDIAccess = () => Promise.resolve({inputs: new Map([["fake-in", input]]),
                                                     outputs: new Map([["fake-out", output]]), onstatechange: null});
"""


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="no Chromium + chromedriver (apt-get install chromium chromium-driver)")
def test_the_play_view_in_a_real_browser(shipped_server):
    """Headless Chromium has no MIDI device: a fake Web MIDI keyboard is injected before the page loads. Its
    notes and the on-screen piano's reach the server, the model's answer comes back, is drawn and goes to the
    chosen MIDI output; the session saves as MIDI; another tab is a session of its own."""
    webdriver = pytest.importorskip("selenium.webdriver", reason='selenium is not installed (pip install "dsmr[browser]")')
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FAKE_MIDI})
        driver.get(shipped_server)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and contains(., 'Play')]"))
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Play')]").click()
        wait.until(lambda d: d.execute_script("return window.dsmrPlay && window.dsmrPlay.ready"))
        Select(driver.find_element(By.ID, "dsmr-midi-out")).select_by_value("fake-out")
        driver.execute_script("document.getElementById('dsmr-midi-out').dispatchEvent(new Event('change'))")
        driver.execute_script("document.getElementById('dsmr-wait').value = '0.4';"
                              "document.getElementById('dsmr-wait').dispatchEvent(new Event('change'))")
        for pitch in (60, 64, 67):  # the fake MIDI keyboard
            driver.execute_script(f"window.__keyboard([0x90, {pitch}, 90])")
            time.sleep(0.15)
            driver.execute_script(f"window.__keyboard([0x80, {pitch}, 0])")
            time.sleep(0.05)
        key = driver.find_element(By.CSS_SELECTOR, '#dsmr-play .key[data-pitch="72"]')  # and the on-screen piano
        ActionChains(driver).click_and_hold(key).pause(0.2).release().perform()
        assert driver.execute_script("return window.dsmrPlay.counts.player") == 4
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.dsmrPlay.counts.model") > 0)
        drawn = driver.execute_script("return window.dsmrPlay.notes.filter(n => n.part === 'model').length")
        assert drawn > 0  # on the piano roll
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.__toSynth.length") > 0)
        assert driver.execute_script("return window.__toSynth[0][0]") == 0x90
        driver.find_element(By.ID, "dsmr-save").click()
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return window.dsmrPlay.savedBytes || 0") > 14)
        # a second tab: its own session, which has heard nothing
        driver.switch_to.new_window("tab")
        driver.get(shipped_server)
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and contains(., 'Play')]"))
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Play')]").click()
        wait.until(lambda d: d.execute_script("return window.dsmrPlay && window.dsmrPlay.ready"))
        time.sleep(2.0)
        assert driver.execute_script("return window.dsmrPlay.counts.model") == 0
    finally:
        driver.quit()
