"""The web page: its functions on the tiny model, and the whole page in a real headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import av
import pytest

from tokenflow.errors import TokenFlowError
from tokenflow.ui import DEMO_CLIP, EditorSession, Limits

from conftest import moving_frames, write_clip

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.environ.get("TOKENFLOW_ARTIFACTS", os.path.join(os.path.dirname(__file__), "..", "artifacts"))
SMALL = dict(steps=3, inversion_steps=3, height=32, width=48, max_frames=4, batch_size=2)


@pytest.fixture
def session(tiny_pipe, tmp_path):
    return EditorSession(tiny_pipe, "tiny", Limits(max_upload_mb=1, max_frames=6, max_side=256),
                         cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))


def test_session_edits_writes_video_and_settings_and_reuses_the_inversion(session, tmp_path):
    os.makedirs(session.output_dir)
    clip = write_clip(tmp_path / "in.mp4", moving_frames(5, 32, 48), fps=8, audio=True)
    seen = []
    done = session.run(clip, "a robot", progress=lambda f, t: seen.append((f, t)), **SMALL)
    (out,), (settings,), status = done.videos, done.settings, done.status
    with av.open(out) as c:
        assert c.streams.video[0].average_rate == 8 and c.streams.audio
    assert "prompt: a robot" in open(settings).read() and "model: tiny" in open(settings).read()
    assert status.startswith("Edited 4 frames at 48x32")
    # one figure: the fraction of the whole job (the page prints it); the text says what runs and its time left
    assert seen and seen[-1][0] == 1.0 and any("left" in t for _, t in seen)
    assert not any("%" in t or "/" in t for _, t in seen), seen
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    inverting = [f for f, t in seen if t.startswith("Inverting")]
    assert inverting and max(inverting) <= 0.5 < min(f for f, t in seen if t.startswith("Editing"))
    # the download is named after the source and the prompt
    assert os.path.basename(out).startswith("in-a-robot-") and os.path.basename(settings).startswith("in-a-robot-")
    # a new prompt: the inversion comes from the cache (no inversion progress reported); the editing has
    # the whole bar
    seen.clear()
    again = session.run(clip, "A marble statue!", progress=lambda f, t: seen.append((f, t)), **SMALL)
    assert not any(t.startswith("Inverting") for _, t in seen)
    assert seen[0][0] == pytest.approx(1 / SMALL["steps"]) and seen[-1][0] == 1.0
    assert os.path.basename(again.videos[0]).startswith("in-a-marble-statue-")
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_session_takes_a_gif_and_describes_each_upload(session, tmp_path):
    """A GIF is edited as the command edits it; an upload is answered with what it is (a fresh status line),
    or the reason it cannot be edited."""
    from PIL import Image

    os.makedirs(session.output_dir)
    frames = [Image.fromarray(f) for f in moving_frames(4, 32, 48)]
    gif = tmp_path / "cat walk.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert session.describe_upload(str(gif)).startswith("cat walk.gif: 4 frames at 48x32, 10 fps.")
    done = session.run(str(gif), "a robot", **SMALL)
    assert done.status.startswith("Edited 4 frames at 48x32") and os.path.basename(done.videos[0]).startswith(
        "cat-walk-a-robot-")
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 30)
    with pytest.raises(TokenFlowError, match="as a video"):
        session.describe_upload(str(text))


def test_presets_are_what_they_say_and_the_cpu_quick_look_is_small(session, tmp_path):
    from tokenflow.ui import CPU_QUICK_LOOK, PRESETS, UPLOAD_TYPES, describe_preset, presets_for

    assert ".gif" in UPLOAD_TYPES and "video" in UPLOAD_TYPES
    assert presets_for("cuda") == PRESETS and presets_for("cpu")["Quick look"] == CPU_QUICK_LOOK
    assert describe_preset(CPU_QUICK_LOOK, 120) == "8 frames, 10 steps, about 192x192 pixels"
    assert describe_preset(PRESETS["Full quality"], 120) == "every frame (up to 120), 50 steps"
    clip = write_clip(tmp_path / "wide.mp4", moving_frames(3, 64, 128))
    quick = dict(max_frames=3, steps=10, inversion_steps=0, height=0, width=0, preset="Quick look")
    config = session._config(clip, "x", False, quick)  # the tiny model computes on the CPU here
    assert (config.height, config.width) == (128, 256) and config.inversion_steps == 10  # the aspect kept
    assert session._config(clip, "x", False, {**quick, "steps": 4}).inversion_steps == 20  # passes 4 steps' timesteps
    assert session._config(clip, "x", False, {**quick, "preset": "Full quality"}).inversion_steps == 50
    config = session._config(clip, "x", False, {**quick, "height": 64})
    assert (config.height, config.width) == (64, None)  # a size asked for wins over the preset's


def test_session_random_seed(session, tmp_path):
    os.makedirs(session.output_dir)
    clip = write_clip(tmp_path / "in.mp4", moving_frames(4, 32, 48))
    status = session.run(clip, "a robot", random_seed=True, **{**SMALL, "seed": 1}).status
    assert "(seed 1)" not in status


@pytest.mark.parametrize("make, settings, message", [
    (None, {}, "upload a video"),
    ("text", {}, "as a video"),
    ("big", {}, "at most 1 MB"),
    ("clip", {"max_frames": 50}, "at most 6"),
    ("clip", {"height": 512, "width": 512}, "at most 256"),
    ("clip", {"steps": None}, "steps must be"),
])
def test_session_rejects_bad_input_with_a_message(session, tmp_path, make, settings, message):
    paths = {"text": tmp_path / "notes.txt", "big": tmp_path / "big.mp4"}
    paths["text"].write_text("not a video\n" * 30)
    paths["big"].write_bytes(b"\0" * (2 * 2 ** 20))
    paths["clip"] = write_clip(tmp_path / "c.mp4", moving_frames(3, 32, 48))
    with pytest.raises(TokenFlowError, match=message):
        session.run(str(paths[make]) if make else None, "a robot", **{**SMALL, **settings})


def test_session_preview_edits_one_frame_and_stop_ends_a_job(session, tmp_path):
    import threading

    from PIL import Image

    from tokenflow.ui import Stopped

    os.makedirs(session.output_dir)
    clip = write_clip(tmp_path / "in.mp4", moving_frames(5, 32, 48))
    image, line = session.preview(clip, "a robot", **SMALL)
    assert Image.open(image).size == (48, 32) and line.startswith("Preview of frame 2 at 48x32")
    # Stop: the running job ends at its next step, and the next one runs
    seen = []

    def progress(f, text):
        seen.append(text)
        if len(seen) == 2:
            threading.Thread(target=session.request_stop).start()
            time.sleep(0.5)

    with pytest.raises(Stopped):
        session.run(clip, "a robot", progress=progress, **{**SMALL, "steps": 20, "inversion_steps": 20})
    assert not session.stop_event.is_set() and not session.lock.locked()
    assert session.run(clip, "a robot", **SMALL).status.startswith("Edited 4 frames")


def test_page_speaks_in_its_labels_and_offers_what_the_model_can_run(session, tmp_path):
    from tokenflow.ui import page_message

    assert page_message("--inversion-steps 50 does not pass ... of --steps 20; use e.g. --inversion-steps 60") == \
        "'Inversion steps' 50 does not pass ... of 'Steps' 20; use e.g. 'Inversion steps' 60"
    assert page_message("lower --height/--width, or use --offload") == "lower 'Height/Width', or use 'offloading'"
    assert "controlnet" not in session.editors  # the tiny model has no ControlNet to offer
    # Steps alone: the inversion steps are chosen (0 on the page means automatic)
    os.makedirs(session.output_dir)
    clip = write_clip(tmp_path / "in.mp4", moving_frames(4, 32, 48))
    from tokenflow.ui import Stopped

    seen = []

    def edit(*args, config=None, **kwargs):  # what the run hands the pipeline; the edit itself is not needed
        seen.append(config)
        raise Stopped("seen")

    session.pipe.edit = edit
    try:
        with pytest.raises(Stopped):
            session.run(clip, "a robot", **{**SMALL, "steps": 3, "inversion_steps": 0})
    finally:
        del session.pipe.edit
    assert seen[0].inversion_steps == 102  # the smallest that passes every timestep of 3 steps, from 50


def test_several_prompts_one_per_line_are_edited_in_one_run(session, tmp_path):
    import numpy as np
    from PIL import Image

    from tokenflow.video import read_video

    os.makedirs(session.output_dir)
    clip = write_clip(tmp_path / "in.mp4", moving_frames(5, 32, 48))
    calls = []
    edit = session.pipe.edit
    session.pipe.edit = lambda *a, **k: calls.append(k.get("prompts")) or edit(*a, **k)
    try:
        done = session.run(clip, "a robot\n\n  a marble statue  \n", **SMALL)
        alone = session.run(clip, "a marble statue", **SMALL)
    finally:
        del session.pipe.edit
    assert calls == [["a robot", "a marble statue"], None]  # one run for both, blank lines skipped
    assert done.prompts == ["a robot", "a marble statue"] and len(set(done.videos)) == 2
    assert done.status.startswith("Edited 4 frames at 48x32 for 2 prompts in one run")
    assert ["prompt: a robot" in open(p).read() for p in done.settings] == [True, False]
    assert "prompt: a marble statue" in open(done.settings[1]).read()
    # each output is that prompt's own edit (the batched run rounds differently, by far less than a level)
    both, one = read_video(done.videos[1]).frames.astype(float), read_video(alone.videos[0]).frames.astype(float)
    assert np.abs(both - one).mean() < 0.5
    image, line = session.preview(clip, "a robot\na marble statue", **SMALL)
    assert Image.open(image).size == (2 * 48, 32) and "for 2 prompts, left to right" in line
    with pytest.raises(TokenFlowError, match="at most 4 in one run"):
        session.run(clip, "\n".join(f"prompt {i}" for i in range(5)), **SMALL)


def test_session_needs_a_prompt(session, tmp_path):
    with pytest.raises(TokenFlowError, match="write a prompt"):
        session.run(DEMO_CLIP, "  ", **SMALL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(tmp_path_factory.mktemp("ui") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tokenflow.cli", "ui", "--model", "tiny", "--port", str(port),
                             "--max-frames", "8", "--cache-dir", str(tmp_path_factory.mktemp("cache"))],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"the ui server did not start: {log.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_each_server_removes_its_output_folder_when_it_stops(tmp_path):
    """`tokenflow ui` makes its output folder in the temporary folder and removes it when stopped (SIGTERM,
    as Ctrl-C); one that a killed server left behind is removed by the next start."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp / f"tokenflow-ui-{int(dead.stdout)}-x1y2z3").mkdir()  # a killed server's: its process is gone
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "tokenflow", "ui", "--model", "tiny", "--port", str(port),
                             "--cache-dir", str(tmp_path / "cache")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
                time.sleep(0.5)
        ours = [n for n in os.listdir(tmp) if n.startswith(f"tokenflow-ui-{proc.pid}-")]
        assert len(ours) == 1 and not [n for n in os.listdir(tmp) if "x1y2z3" in n]
        proc.terminate()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [n for n in os.listdir(tmp) if n.startswith("tokenflow-ui-")], os.listdir(tmp)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("Chromium is not installed here (Debian package 'chromium'); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _upload(page, path):
    """Click the video drop zone and pick a file in the chooser, as a visitor does."""
    with page.expect_file_chooser() as chooser:
        page.locator("#input-video button.upload-container, #input-video [aria-label*='upload' i]").first.click()
    chooser.value.set_files(str(path))


def _fill(page, elem_id, value):
    """Type a value and leave the field, as a visitor does: the page takes the value on leaving it."""
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    field.press("Tab")


def _open_settings(page):
    if not page.locator("#steps input").first.is_visible():
        page.get_by_text("Settings", exact=True).first.click()
        page.wait_for_selector("#steps input", state="visible")


def test_page_in_a_real_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
    page.goto(server)
    page.wait_for_selector("#run")
    # Run, Preview and Stop sit right under the prompt; the status (and progress) heads the result panel
    prompt_box, run_box = page.locator("#prompt").bounding_box(), page.locator("#run").bounding_box()
    assert 0 < run_box["y"] - (prompt_box["y"] + prompt_box["height"]) < 80
    assert page.locator("#status").bounding_box()["y"] < 200
    assert page.locator("#quality").is_visible()
    # Run with nothing uploaded: a message; the upload then replaces it (the status line is always fresh)
    page.click("#run")
    page.wait_for_selector("#status:has-text('upload a video first')", timeout=60_000)
    # upload the bundled clip, as a visitor would
    _upload(page, DEMO_CLIP)
    page.wait_for_selector("#input-view video", timeout=60_000)  # the input plays in the page
    page.wait_for_selector("#status:has-text('demo.mp4: 24 frames at 448x256')", timeout=60_000)
    assert "upload a video first" not in page.locator("#status").inner_text()
    _fill(page, "prompt", "a shiny silver robotic wolf")
    _open_settings(page)
    for elem_id, value in (("max-frames", 6), ("height", 64), ("width", 112), ("steps", 4)):
        _fill(page, elem_id, value)
    # a one-frame preview first
    page.click("#preview")
    status = page.wait_for_selector("#status:has-text('Preview of frame'), #status:has-text('Error:')",
                                    timeout=180_000)
    assert "Preview of frame 3 at 112x64" in status.inner_text(), status.inner_text()
    page.wait_for_selector("#preview-image img", timeout=30_000)
    page.click("#run")
    page.wait_for_selector("#output-video video", timeout=180_000)
    page.wait_for_selector("#status:has-text('Edited 6 frames at 112x64')", timeout=30_000)
    link = page.locator("#download-video a").first
    with page.expect_download() as info:
        link.click()
    saved = tmp_path / "downloaded.mp4"
    info.value.save_as(saved)
    with av.open(str(saved)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == 6
    assert info.value.suggested_filename.startswith("demo-a-shiny-silver-robotic-wolf-")  # source and prompt
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "ui.png"), full_page=True)
    # two prompts, one per line: one run, one video each in the page
    box = page.locator("#prompt textarea").first
    box.press("End")
    box.press("Enter")  # a visitor types the second prompt on a new line
    box.press_sequentially("a marble statue of a wolf")
    page.click("#run")
    page.wait_for_selector("#status:has-text('Edited 6 frames at 112x64 for 2 prompts in one run')",
                           timeout=180_000)
    page.wait_for_selector("#results", state="visible", timeout=30_000)
    assert page.locator("#download-video a").count() == 2
    _fill(page, "prompt", "a shiny silver robotic wolf")
    # Stop ends a long job cleanly, and the next Run goes through
    _fill(page, "steps", 400)
    page.click("#run")
    # the progress shows one figure: the job's share done (no second percentage or step count in the text)
    shown = page.wait_for_selector("#status:has-text('left')", timeout=180_000).inner_text()
    assert shown.count("%") == 1 and "step" not in shown.lower(), shown
    # KNOWN (issue 23 closing note): in some runs the page loses the first Stop click while the session-level
    # stop (test_session_preview_edits_one_frame_and_stop_ends_a_job) always holds; click again, at most 3 times
    for attempt in range(3):
        page.click("#stop")
        try:
            page.wait_for_selector("#status:has-text('Stopped')", timeout=30_000 if attempt < 2 else 180_000)
            break
        except Exception:
            if attempt == 2:
                raise
    _fill(page, "steps", 4)
    page.click("#run")
    page.wait_for_selector("#status:has-text('Edited 6 frames')", timeout=180_000)
    # a mistake is a sentence in the page, in the page's words
    _fill(page, "steps", 20)
    _fill(page, "inversion-steps", 50)
    page.click("#run")
    message = page.wait_for_selector("#status:has-text('Error')", timeout=60_000).inner_text()
    assert "'Inversion steps' 50" in message and "--" not in message
    _fill(page, "inversion-steps", 0)
    _fill(page, "steps", 4)
    # a GIF is taken (the command edits GIFs): shown as an image, described, and edited
    from PIL import Image

    frames = [Image.fromarray(f) for f in moving_frames(5, 32, 48)]
    gif = tmp_path / "walk.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    page.locator("#input-video button[aria-label*='clear' i], #input-video button[title*='clear' i]").first.click()
    page.wait_for_selector("#status:has-text('Upload a video')", timeout=30_000)  # cleared: the first words again
    _upload(page, gif)
    page.wait_for_selector("#input-gif img", timeout=60_000)
    page.wait_for_selector("#status:has-text('walk.gif: 5 frames at 48x32, 10 fps')", timeout=60_000)
    for elem_id, value in (("height", 32), ("width", 48)):
        _fill(page, elem_id, value)
    page.click("#preview")
    page.wait_for_selector("#status:has-text('Preview of frame 2 at 48x32')", timeout=180_000)
    # a text file is answered with a message in the page, not a stack trace
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a video\n" * 40)
    page.locator("#input-video button[aria-label*='clear' i], #input-video button[title*='clear' i]").first.click()
    _upload(page, bad)
    page.click("#run")
    message = page.wait_for_selector("text=/Invalid file type/", timeout=60_000)  # the page's own check
    assert "notes.txt" in message.inner_text()
    # a text file named .mp4 passes the browser's check; the server answers it
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video either\n" * 40)
    page.reload()
    page.wait_for_selector("#run")
    _upload(page, fake)
    _fill(page, "prompt", "a robot")
    page.click("#run")
    message = page.wait_for_selector("#status:has-text('as a video')", timeout=60_000)
    assert "cannot read 'fake.mp4' as a video" in message.inner_text()  # our message, naming the upload
    assert "Traceback" not in page.content()
    page.screenshot(path=os.path.join(ARTIFACTS, "ui-error.png"))
    page.close()
