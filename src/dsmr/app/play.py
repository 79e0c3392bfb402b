"""The page's Play view: a duet in the browser. The page sends the player's notes over a websocket
(`/dsmr/play`) and plays the answer that comes back; the model runs here, one live engine per connection, so
browser tabs never share a session.

Messages from the page (JSON): {"type": "on", "pitch", "velocity"}, {"type": "off", "pitch"},
{"type": "cc", "number", "value"}, {"type": "settings", "wait", "answer_seconds", "temperature"},
{"type": "save"}. To the page: {"type": "ready", "model"}, {"type": "notes", "events": [[kind, pitch,
velocity], ...]} when they are due, {"type": "midi", "data": base64 of the session's MIDI}, {"type": "error",
"message"}. Times are the server's: a note goes out when it is due, so the page plays it on arrival.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from fastapi import WebSocket, WebSocketDisconnect  # at module level: FastAPI resolves the handler's annotation here

from dsmr.generation import defaults
from dsmr.errors import DsmrError

PLAY_PATH = "/dsmr/play"
ASSETS = Path(__file__).with_name("assets")
POLL_SECONDS = 0.002


def page_head() -> str:
    """The Play view's script and style, inlined into the page (shipped with the package; nothing fetched)."""
    script = (ASSETS / "play.js").read_text(encoding="utf-8")
    style = (ASSETS / "play.css").read_text(encoding="utf-8")
    return f"<style>{style}</style>\n<script>{script}</script>"


def add_play_route(app, store, model_ref) -> None:
    """Serve the Play view's websocket on the page's FastAPI `app` (Gradio's own server)."""

    async def play(websocket: WebSocket):
        await websocket.accept()
        session = None
        try:
            session = _Session(store, model_ref)
            await websocket.send_text(json.dumps({"type": "ready", "model": str(session.ref)}))
            receiver = asyncio.create_task(_receive(websocket, session))
            while not receiver.done():
                events = session.engine.poll(time.monotonic())
                if events:
                    await websocket.send_text(json.dumps(
                        {"type": "notes", "events": [[e.kind, e.pitch, e.velocity] for e in events]}))
                for reply in session.replies():
                    await websocket.send_text(json.dumps(reply))
                await asyncio.sleep(POLL_SECONDS)
            receiver.result()
        except WebSocketDisconnect:
            pass
        except DsmrError as err:
            await websocket.send_text(json.dumps({"type": "error", "message": str(err)}))
            await websocket.close()

    app.add_api_websocket_route(PLAY_PATH, play)


async def _receive(websocket, session) -> None:
    try:
        while True:
            session.handle(json.loads(await websocket.receive_text()))
    except WebSocketDisconnect:
        return


class _Session:
    """One browser tab's duet: its own engine (and decoder state) over the page's shared model."""

    def __init__(self, store, ref):
        from dsmr.generation import playing_sampling
        from dsmr.generation.live.engine import LiveEngine
        from dsmr.generation.live.events import LiveSettings

        with store.lock:
            self.loaded = store.load(ref)
        self.ref = ref
        model = self.loaded.model
        self.sampling = playing_sampling(model, max_tokens=None, max_seconds=1e9, stop_at_eos=False,
                                         seed=int.from_bytes(os.urandom(4), "little"))
        self.engine = LiveEngine(model, self.sampling, LiveSettings(), start=time.monotonic())
        self._replies: list[dict] = []

    def handle(self, message: dict) -> None:
        kind, now = message.get("type"), time.monotonic()
        if kind == "on":
            self.engine.note_on(now, int(message["pitch"]), int(message.get("velocity", 80)))
        elif kind == "off":
            self.engine.note_off(now, int(message["pitch"]))
        elif kind == "cc":
            self.engine.control(now, int(message["number"]), int(message["value"]))
        elif kind == "settings":
            self._settings(message)
        elif kind == "save":
            self._replies.append({"type": "midi", "data": self._midi()})

    def _settings(self, message: dict) -> None:
        try:
            answer = message.get("answer_seconds")
            settings = dataclasses.replace(self.engine.settings, wait=float(message.get("wait", 0.8)),
                                           answer_seconds=float(answer) if answer else None)
            settings.validate()
            self.engine.settings = settings
            if message.get("temperature") is not None:
                temperature = float(message["temperature"])
                if not 0 <= temperature <= defaults.MAX_TEMPERATURE:
                    raise DsmrError(f"temperature must be between 0 and {defaults.MAX_TEMPERATURE:g}, got {temperature}")
                self.engine.sampling = dataclasses.replace(self.engine.sampling, temperature=temperature)
        except (DsmrError, ValueError, TypeError) as err:
            self._replies.append({"type": "error", "message": str(err)})

    def _midi(self) -> str:
        from dsmr.data.midi import write_midi

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "session.mid"
            write_midi(self.engine.recording(), path)
            return base64.b64encode(path.read_bytes()).decode("ascii")

    def replies(self) -> list[dict]:
        out, self._replies = self._replies, []
        return out


def play_view(gr) -> None:
    """The Play tab's controls (the script in `page_head` brings them to life)."""
    gr.HTML("""
<div id="dsmr-play">
  <div class="row"><span class="status">Connecting to the model...</span></div>
  <div class="row">
    <label>MIDI input <select id="dsmr-midi-in"></select></label>
    <label>MIDI output <select id="dsmr-midi-out"></select></label>
  </div>
  <div class="row">
    <label>Your turn ends after <input id="dsmr-wait" type="number" min="0.1" max="10" step="0.1" value="0.8"> s of silence</label>
    <label>Answer length <input id="dsmr-answer" type="number" min="0" max="60" step="1" value="0"> s (0: as long as your phrase)</label>
    <label>Temperature <input id="dsmr-temperature" type="number" min="0" max="5" step="0.05" placeholder="the model's own"></label>
    <button id="dsmr-save" type="button">Save the session (MIDI)</button>
  </div>
  <div class="keys"></div>
  <div class="row legend">Computer keyboard: A W S E D F T G Y H U J K O L P from C4 (Z / X: octave down / up).
    <span style="background:#5fa8ff">you</span><span style="background:#ff9a3c">the model</span></div>
  <canvas></canvas>
</div>""", elem_id="play-view")
