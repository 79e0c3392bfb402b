// dsmr's Play view: a duet in the browser. Notes come from a MIDI keyboard (Web MIDI), the on-screen piano or
// the computer keyboard; they go to the server over a websocket, and the model's answer comes back and is
// played (a built-in synthesized piano, and a MIDI output if one is chosen) and drawn on the piano roll.
// Everything here ships with dsmr: nothing is fetched from elsewhere.
(function () {
  "use strict";
  const LOW = 48, HIGH = 84;                       // the on-screen piano: C3..C6
  const KEYMAP = "awsedftgyhujkolp;'";             // the computer keyboard, from C4 up (z / x: octave down / up)
  const BLACK = new Set([1, 3, 6, 8, 10]);
  const state = window.dsmrPlay = { counts: { player: 0, model: 0 }, notes: [], ws: null, ready: false,
                                    midiOut: null, octave: 0, sounding: {} };
  let audio = null;

  function ctx() {
    if (!audio) audio = new (window.AudioContext || window.webkitAudioContext)();
    if (audio.state === "suspended") audio.resume();
    return audio;
  }

  // A piano-like tone: a few decaying partials, released on note-off.
  function sound(pitch, velocity) {
    const a = ctx(), now = a.currentTime, f = 440 * Math.pow(2, (pitch - 69) / 12);
    const gain = a.createGain();
    const level = 0.12 * (velocity / 127);
    gain.gain.setValueAtTime(0, now);
    gain.gain.linearRampToValueAtTime(level, now + 0.005);
    gain.gain.exponentialRampToValueAtTime(level * 0.25, now + 1.5);
    gain.connect(a.destination);
    const oscs = [[1, "triangle", 1], [2, "sine", 0.35], [3, "sine", 0.12]].map(([m, type, amp]) => {
      const o = a.createOscillator(), g = a.createGain();
      o.type = type; o.frequency.value = f * m; g.gain.value = amp;
      o.connect(g); g.connect(gain); o.start(now);
      return o;
    });
    return { gain, oscs };
  }

  function release(voice) {
    if (!voice) return;
    const now = ctx().currentTime;
    voice.gain.gain.cancelScheduledValues(now);
    voice.gain.gain.setTargetAtTime(0, now, 0.08);
    voice.oscs.forEach(o => o.stop(now + 0.5));
  }

  function key(pitch) { return document.querySelector(`#dsmr-play .key[data-pitch="${pitch}"]`); }

  function start(part, pitch, velocity) {
    const id = part + pitch;
    release(state.sounding[id]);
    state.sounding[id] = sound(pitch, velocity);
    const k = key(pitch);
    if (k) k.classList.add(part === "player" ? "down" : "model");
    state.notes.push({ part, pitch, on: performance.now() / 1000, off: null });
    state.counts[part] += 1;
    if (part === "model" && state.midiOut) state.midiOut.send([0x90, pitch, velocity]);
  }

  function end(part, pitch) {
    const id = part + pitch;
    release(state.sounding[id]);
    delete state.sounding[id];
    const k = key(pitch);
    if (k) k.classList.remove(part === "player" ? "down" : "model");
    for (let i = state.notes.length - 1; i >= 0; i--) {
      const n = state.notes[i];
      if (n.part === part && n.pitch === pitch && n.off === null) { n.off = performance.now() / 1000; break; }
    }
    if (part === "model" && state.midiOut) state.midiOut.send([0x80, pitch, 0]);
  }

  function send(message) {
    if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(message));
  }

  function playerOn(pitch, velocity) { start("player", pitch, velocity); send({ type: "on", pitch, velocity }); }
  function playerOff(pitch) { end("player", pitch); send({ type: "off", pitch }); }

  function status(text) { const s = document.querySelector("#dsmr-play .status"); if (s) s.textContent = text; }

  function connect() {
    const base = location.pathname.replace(/\/$/, "");
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + base + "/dsmr/play");
    state.ws = ws;
    ws.onmessage = (msg) => {
      const m = JSON.parse(msg.data);
      if (m.type === "ready") { state.ready = true; status(`Ready: play, then pause — ${m.model} answers.`); settings(); }
      else if (m.type === "notes") m.events.forEach(([kind, pitch, velocity]) =>
        kind === "on" ? start("model", pitch, velocity) : end("model", pitch));
      else if (m.type === "midi") download(m.data);
      else if (m.type === "error") status("Error: " + m.message);
    };
    ws.onclose = () => { state.ready = false; status("Disconnected from the server: reload the page."); };
  }

  function download(b64) {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "audio/midi" }));
    const a = document.createElement("a");
    a.href = url; a.download = "dsmr-session.mid"; a.id = "dsmr-play-download";
    document.body.appendChild(a); a.click();
    state.savedBytes = bytes.length;
  }

  function settings() {
    const v = (id) => document.getElementById(id);
    send({ type: "settings", wait: parseFloat(v("dsmr-wait").value), answer_seconds: parseFloat(v("dsmr-answer").value) || null,
           temperature: v("dsmr-temperature").value === "" ? null : parseFloat(v("dsmr-temperature").value) });
  }

  function buildKeys(root) {
    const keys = root.querySelector(".keys");
    const whites = [];
    for (let p = LOW; p <= HIGH; p++) if (!BLACK.has(p % 12)) whites.push(p);
    const w = 100 / whites.length;
    for (let p = LOW; p <= HIGH; p++) {
      const el = document.createElement("div");
      const black = BLACK.has(p % 12);
      el.className = "key " + (black ? "black" : "white");
      el.dataset.pitch = p;
      const left = whites.filter(x => x < p).length * w;
      el.style.left = (black ? left - w * 0.3 : left) + "%";
      el.style.width = (black ? w * 0.6 : w) + "%";
      const on = (e) => { e.preventDefault(); ctx(); playerOn(p, 90); };
      const off = (e) => { e.preventDefault(); if (state.sounding["player" + p]) playerOff(p); };
      el.addEventListener("pointerdown", on);
      el.addEventListener("pointerup", off);
      el.addEventListener("pointerleave", off);
      keys.appendChild(el);
    }
  }

  function computerKeyboard() {
    const held = new Set();
    document.addEventListener("keydown", (e) => {
      if (!document.getElementById("dsmr-play") || e.target.tagName === "INPUT" || e.repeat) return;
      if (e.key === "z") { state.octave = Math.max(-2, state.octave - 1); return; }
      if (e.key === "x") { state.octave = Math.min(2, state.octave + 1); return; }
      const i = KEYMAP.indexOf(e.key);
      if (i < 0 || held.has(e.key)) return;
      held.add(e.key); ctx(); playerOn(60 + 12 * state.octave + i, 90);
    });
    document.addEventListener("keyup", (e) => {
      const i = KEYMAP.indexOf(e.key);
      if (i < 0 || !held.has(e.key)) return;
      held.delete(e.key); playerOff(60 + 12 * state.octave + i);
    });
  }

  function webMidi(root) {
    const pick = root.querySelector("#dsmr-midi-in"), out = root.querySelector("#dsmr-midi-out");
    if (!navigator.requestMIDIAccess) { pick.innerHTML = "<option>no Web MIDI in this browser</option>"; return; }
    navigator.requestMIDIAccess().then((access) => {
      state.midi = access;
      const fill = () => {
        pick.innerHTML = '<option value="">every MIDI input</option>' +
          Array.from(access.inputs.values()).map(i => `<option value="${i.id}">${i.name}</option>`).join("");
        out.innerHTML = '<option value="">none (the built-in piano)</option>' +
          Array.from(access.outputs.values()).map(o => `<option value="${o.id}">${o.name}</option>`).join("");
        access.inputs.forEach((input) => {
          input.onmidimessage = (e) => {
            if (pick.value && pick.value !== input.id) return;
            const [status_, a, b] = e.data, kind = status_ & 0xf0;
            if (kind === 0x90 && b > 0) playerOn(a, b);
            else if (kind === 0x80 || (kind === 0x90 && b === 0)) playerOff(a);
            else if (kind === 0xb0) send({ type: "cc", number: a, value: b });
          };
        });
      };
      fill();
      access.onstatechange = fill;
      out.onchange = () => { state.midiOut = out.value ? access.outputs.get(out.value) : null; };
    }, () => { pick.innerHTML = "<option>MIDI access refused: the on-screen and computer keyboards still work</option>"; });
  }

  function roll(root) {
    const canvas = root.querySelector("canvas"), g = canvas.getContext("2d"), span = 20;
    const draw = () => {
      const w = canvas.width = canvas.clientWidth, h = canvas.height = canvas.clientHeight, now = performance.now() / 1000;
      g.fillStyle = "#111"; g.fillRect(0, 0, w, h);
      state.notes = state.notes.filter(n => n.off === null || now - n.off < span);
      for (const n of state.notes) {
        const x0 = w - (now - n.on) / span * w, x1 = w - (now - (n.off ?? now)) / span * w;
        const y = h - (n.pitch - 21) / 88 * h;
        g.fillStyle = n.part === "player" ? "#5fa8ff" : "#ff9a3c";
        g.fillRect(x0, y - 3, Math.max(2, x1 - x0), 5);
      }
      requestAnimationFrame(draw);
    };
    draw();
  }

  function init() {
    const root = document.getElementById("dsmr-play");
    if (!root || root.dataset.ready) return false;
    root.dataset.ready = "1";
    buildKeys(root); computerKeyboard(); webMidi(root); roll(root); connect();
    ["dsmr-wait", "dsmr-answer", "dsmr-temperature"].forEach(id => document.getElementById(id).addEventListener("change", settings));
    document.getElementById("dsmr-save").addEventListener("click", () => send({ type: "save" }));
    return true;
  }

  const timer = setInterval(() => { if (init()) clearInterval(timer); }, 200);
})();
