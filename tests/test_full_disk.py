"""Outputs on a full disk or in place of a device: an error that names the file, and nothing half-written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import symusic

import dsmr.core.atomic
from dsmr.core.atomic import atomic_path, atomic_write_bytes
from dsmr.errors import DsmrError
from dsmr.core.files import check_output_file
from dsmr.data.midi import write_midi


def no_space(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_midi_written_to_a_full_disk_is_an_error_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "g.mid"
    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(OSError, match=f"No space left on device.*{out}"):
        write_midi(symusic.Score(480), out)
    assert list(tmp_path.iterdir()) == []


def test_the_previous_file_survives_a_full_disk(tmp_path, monkeypatch):
    out = tmp_path / "model.bin"
    atomic_write_bytes(out, b"old")
    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(OSError):
        atomic_write_bytes(out, b"new")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_a_c_writers_own_full_disk_message_becomes_an_oserror_naming_the_file(tmp_path, monkeypatch):
    out = tmp_path / "weights.safetensors"
    monkeypatch.setattr(dsmr.core.atomic, "_disk_full", lambda folder: True)
    with pytest.raises(OSError, match=f"no space left on the device \\(writing {out}\\)") as caught:
        with atomic_path(out):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(dsmr.core.atomic, "_disk_full", lambda folder: False)
    with pytest.raises(RuntimeError, match="enforce fail"):  # any other failure stays what it was
        with atomic_path(out):
            raise RuntimeError("[enforce fail at inline_container.cc:672]")


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null on this system")
def test_outputs_that_are_devices_are_refused_and_never_replaced():
    with pytest.raises(DsmrError, match="not a regular file"):
        check_output_file("/dev/null", "--out")
    with pytest.raises(DsmrError, match="not a regular file"):
        with atomic_path("/dev/null"):
            pass
    assert Path("/dev/null").is_char_device()
    with pytest.raises(DsmrError, match="kernel's proc file system"):
        check_output_file("/proc/self/out.mid", "--out")
