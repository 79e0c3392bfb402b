"""MIDI ports for `dsmr live` (mido over python-rtmidi: ALSA or JACK on Linux, CoreMIDI on macOS, Windows
MM) and the real-time loop that connects them to the live engine.

The loop reads the player's messages as they come, stamps them with the clock, hands them to the engine,
and sends each answer event when it is due, `latency` seconds early (a device that sounds later); it sleeps
between events, never busy-waits long. Ctrl-C (or `stop`) ends it cleanly: the model's sounding notes get
their note-offs, and the caller writes the recording.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Optional

from dsmr.errors import DsmrError

INSTALL_HINT = 'live MIDI needs mido and python-rtmidi: pip install "dsmr[live]" (or: pip install mido python-rtmidi)'
# --api: the rtmidi backends by the names musicians know them; "auto" tries the system's own, then JACK
APIS = {"alsa": "LINUX_ALSA", "jack": "UNIX_JACK", "coremidi": "MACOSX_CORE", "windows": "WINDOWS_MM"}
NO_MIDI_SYSTEM = ("no MIDI system answers: on Linux, ALSA's sequencer (/dev/snd/seq; `sudo modprobe snd-seq`) "
                  "or a running JACK server (`jackd -d alsa`, or `jackd -d dummy` without a sound card) with "
                  "--api jack; on macOS and Windows the system's own MIDI works as it is")


@contextlib.contextmanager
def _quiet_stderr():
    """ALSA and JACK print their complaints straight to the terminal; dsmr says what is wrong in one line."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def backend(api: str = "auto"):
    """The mido backend for `api` (auto: the platform's own, else JACK); DsmrError saying what to install
    or start when there is none."""
    try:
        import mido
        import rtmidi  # noqa: F401  (mido's rtmidi backend needs it)
    except ImportError as err:
        raise DsmrError(INSTALL_HINT) from err
    names = [APIS[api]] if api != "auto" else [None, "UNIX_JACK"]
    if api not in APIS and api != "auto":
        raise DsmrError(f"--api must be auto or one of {', '.join(APIS)}, got {api!r}")
    last = None
    for name in names:
        chosen = mido.Backend("mido.backends.rtmidi" + (f"/{name}" if name else ""), load=True)
        try:
            with _quiet_stderr():
                chosen.get_input_names()  # opens the system's MIDI client: fails where there is none
            return chosen
        except Exception as err:  # rtmidi's SystemError: no ALSA sequencer, no JACK server
            last = err
    raise DsmrError(f"{NO_MIDI_SYSTEM} ({api}: {str(last).strip() or type(last).__name__})")


def list_ports(midi) -> dict[str, list[str]]:
    with _quiet_stderr():
        return {"inputs": list(midi.get_input_names()), "outputs": list(midi.get_output_names())}


def open_ports(midi, inport: Optional[str], outport: Optional[str], virtual: bool, client: str = "dsmr"):
    """(input, output) ports: by name (an exact name, or the one name that contains it), or virtual ports
    named "dsmr in" / "dsmr out" that a DAW, a synth or a keyboard connects to."""
    ports = list_ports(midi)
    opened = []
    try:
        for kind, name, names, opener in (("input", inport, ports["inputs"], midi.open_input),
                                          ("output", outport, ports["outputs"], midi.open_output)):
            with _quiet_stderr():
                if name is None and virtual:
                    opened.append(opener(f"{client} {'in' if kind == 'input' else 'out'}", virtual=True,
                                         client_name=client))
                    continue
                if name is None:
                    raise DsmrError(f"give --{'in' if kind == 'input' else 'out'} PORT (--list-ports shows them) "
                                    f"or --virtual")
                opened.append(opener(_port_name(kind, name, names)))  # (mido: a client name makes it virtual)
    except DsmrError:
        for port in opened:
            port.close()
        raise
    except OSError as err:  # busy, or gone between listing and opening
        for port in opened:
            port.close()
        raise DsmrError(f"cannot open the MIDI port: {err} (is another program holding it?)") from None
    return tuple(opened)


def _port_name(kind: str, name: str, names: list[str]) -> str:
    if name in names:
        return name
    matches = [n for n in names if name.lower() in n.lower()]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(names) or "none"
    if not matches:
        raise DsmrError(f"no MIDI {kind} port named {name!r}; the {kind}s are: {listing} (connect the device, "
                        f"or use --virtual and connect to dsmr)")
    raise DsmrError(f"{name!r} names several MIDI {kind}s ({', '.join(matches)}): give the whole name")


def run_duet(engine, inport, outport, *, latency: float = 0.0, clock: Callable[[], float] = time.monotonic,
             should_stop: Callable[[], bool] = lambda: False, on_sent: Optional[Callable] = None,
             channel: int = 0) -> None:
    """Play until Ctrl-C or `should_stop()`: the player's messages into `engine`, its answer out when due
    (`latency` seconds early). The model's sounding notes are ended on the way out."""
    import mido

    try:
        while not should_stop():
            for msg in inport.iter_pending():
                now = clock()
                if msg.type == "note_on":
                    engine.note_on(now, msg.note, msg.velocity)
                elif msg.type == "note_off":
                    engine.note_off(now, msg.note)
                elif msg.type == "control_change":
                    engine.control(now, msg.control, msg.value)
            now = clock()
            for event in engine.poll(now + latency):
                outport.send(mido.Message("note_on" if event.kind == "on" else "note_off", note=event.pitch,
                                          velocity=event.velocity if event.kind == "on" else 0, channel=channel))
                if on_sent is not None:
                    on_sent(event, clock())
            due = engine.next_due()
            wait = 0.001 if due is None else min(0.001, max(0.0, due - latency - clock()))
            if wait > 0:
                time.sleep(wait)
    except KeyboardInterrupt:
        pass
    finally:
        for event in engine.stop(clock()):
            outport.send(mido.Message("note_off", note=event.pitch, velocity=0, channel=channel))
        sys.stdout.flush()
