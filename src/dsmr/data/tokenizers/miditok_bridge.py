"""miditok's encodings behind dsmr's `Tokenizer` interface: any single-vocabulary miditok tokenizer (REMI, TSD,
MIDILike, Structured, ...) as `MidiTokTokenizer`, built by dsmr.data.tokenizers.registry (`--tokenizer remi` etc.)."""

from __future__ import annotations

import inspect
import json
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import symusic

from dsmr.errors import DsmrError
from dsmr.data.tokenizers.base import _TokenizerBase
from dsmr.data.midi import sustained_ends

if TYPE_CHECKING:
    import miditok

# Extra make_tokenizer spellings; any miditok class name also works, in any case ("remi", "cpword").
MIDITOK_ALIASES = {"midi-like": "MIDILike", "midi_like": "MIDILike"}
# Params that miditok records for provenance but that do not change the tokens; kept out of config().
_MIDITOK_VERSION_KEYS = ("miditok_version", "symusic_version", "hf_tokenizers_version")


def default_miditok_config(**options: Any) -> "miditok.TokenizerConfig":
    """A TokenizerConfig for piano performances: PAD/BOS/EOS, 32 velocities, fine time grid."""
    import miditok

    params: dict[str, Any] = {
        "pitch_range": (21, 109),
        "beat_res": {(0, 4): 8, (4, 12): 4},
        "num_velocities": 32,
        "special_tokens": ["PAD", "BOS", "EOS"],
        "use_programs": False,
    }
    # TokenizerConfig keeps unknown keywords as "additional params": refuse them here, they are typos.
    known = set(inspect.signature(miditok.TokenizerConfig).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise DsmrError(f"unknown miditok TokenizerConfig option(s) {unknown}")
    params.update(options)
    try:
        return miditok.TokenizerConfig(**params)
    except (TypeError, ValueError) as err:
        raise DsmrError(f"bad miditok TokenizerConfig option: {err}") from err


# miditok's names of the events that start a note: Pitch_60 (REMI, TSD, Structured, ...), NoteOn_60 (MIDILike).
_MIDITOK_PITCH = re.compile(r"^(?:Pitch|NoteOn)_(\d+)$")


class MidiTokTokenizer(_TokenizerBase):
    """A miditok tokenizer behind the `Tokenizer` interface: one flat id sequence per piece.

    Tracks are merged into one (non-drum) piano part unless the miditok tokenizer already makes one
    stream for all tracks. With `sustain=True` (the default) note ends are extended by the sustain
    pedal before miditok sees the score, as for the performance encoding. A trained miditok tokenizer
    (BPE, ...) works too: wrap it after training, its config() then carries the trained model.
    """

    kind = "miditok"

    def __init__(self, tokenizer: "miditok.MusicTokenizer", sustain: bool = True):
        if tokenizer.is_multi_voc:
            raise DsmrError(f"miditok {type(tokenizer).__name__} uses several vocabularies; dsmr needs "
                            f"one flat id sequence (use REMI, TSD, MIDILike, Structured, ...)")
        missing = [t for t in ("PAD_None", "BOS_None", "EOS_None") if t not in tokenizer.vocab]
        if missing:
            raise DsmrError(f"miditok {type(tokenizer).__name__} lacks special tokens {missing}: build it "
                            f"with TokenizerConfig(special_tokens=['PAD', 'BOS', 'EOS'])")
        self.miditok = tokenizer
        self.sustain = bool(sustain)
        self._names: list[str] | None = None
        self.vocab_size = len(tokenizer)
        self.pad_id = int(tokenizer.vocab["PAD_None"])
        self.bos_id = int(tokenizer.vocab["BOS_None"])
        self.eos_id = int(tokenizer.vocab["EOS_None"])

    @property
    def tokenization(self) -> str:
        return type(self.miditok).__name__

    def config(self) -> dict:
        params = {k: v for k, v in self.miditok.to_dict().items() if k not in _MIDITOK_VERSION_KEYS}
        # Through JSON once so that config() == json.loads(json.dumps(config())).
        return json.loads(json.dumps({"kind": self.kind, "sustain": self.sustain, "params": params}))

    def __repr__(self) -> str:
        return f"MidiTokTokenizer({self.tokenization}, vocab_size={self.vocab_size}, sustain={self.sustain})"

    def pitch_range(self) -> tuple[int, int]:
        low, end = self.miditok.config.pitch_range  # miditok's range excludes its end
        return int(low), int(end) - 1

    # ---- vocabulary

    def vocabulary(self) -> list[str]:
        if self._names is None:
            if not self.miditok.is_trained:
                self._names = [self.miditok[i] for i in range(self.vocab_size)]
            else:  # a trained (BPE/Unigram/WordPiece) id stands for one or several base tokens
                byte_of_id = {i: byte for byte, i in self.miditok.vocab_model.items()}
                learned = self.miditok._vocab_learned_bytes_to_tokens  # miditok has no public id -> tokens map
                self._names = ["+".join(learned[byte_of_id[i]]) for i in range(self.vocab_size)]
        return list(self._names)

    def event_name(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise DsmrError(f"token id {i} is out of range [0, {self.vocab_size})")
        if self._names is None:
            self.vocabulary()
        return self._names[i]

    def note_pitch(self, i: int) -> int | None:
        """The pitch of a miditok Pitch_P or NoteOn_P event, else None (a BPE id merging several tokens: None)."""
        match = _MIDITOK_PITCH.match(self.event_name(i))
        return int(match.group(1)) if match else None

    # ---- encoding

    def _prepare(self, score: symusic.Score) -> symusic.Score:
        """A tick-time copy: drums dropped, sustain applied, tracks merged (for per-track tokenizers)."""
        from miditok.utils import merge_tracks

        score = score.to("tick")  # a new object: the caller's score is never modified
        score.tracks = [t for t in score.tracks if not t.is_drum and t.note_num() > 0]
        if self.sustain and score.tracks:
            piece_end = max(t.end() for t in score.tracks)
            for track in score.tracks:
                if len(track.controls):
                    notes, cc = track.notes.numpy(), track.controls.numpy()
                    ends = sustained_ends(notes["time"] + notes["duration"], cc["time"], cc["number"],
                                          cc["value"], piece_end)
                    track.notes = symusic.Note.from_numpy(
                        notes["time"], (ends - notes["time"]).astype(np.int32), notes["pitch"],
                        notes["velocity"], ttype="tick")
        if len(score.tracks) > 1 and not self.miditok.one_token_stream:
            merge_tracks(score)
            score.tracks[0].program, score.tracks[0].name = 0, "Piano"
        return score

    def encode(self, score: symusic.Score) -> np.ndarray:
        score = self._prepare(score)
        if not score.tracks:
            return np.empty(0, np.int64)
        tokens = self.miditok.encode(score)
        if isinstance(tokens, list):
            tokens = tokens[0] if tokens else None
        return np.asarray(tokens.ids if tokens is not None else [], dtype=np.int64)

    def _no_notes_message(self, path) -> str:
        return f"no notes the {self.tokenization} tokenizer can encode: {path}"

    # ---- decoding

    def decode(self, ids: Sequence[int]) -> symusic.Score:
        """A Score (ticks, with miditok's tempo) from ids; PAD/BOS/EOS handled as for every Tokenizer."""
        ids = self._ids_before_eos(ids)
        ids = ids[(ids != self.pad_id) & (ids != self.bos_id)].tolist()
        if not ids:
            score = symusic.Score(self.miditok.time_division)
            score.tracks.append(symusic.Track("Piano", program=0))
            return score
        return self.miditok.decode(ids if self.miditok.one_token_stream else [ids])

    def seconds(self, ids: Sequence[int]) -> float:
        """Seconds of music the ids describe: the end of the decoded score."""
        return float(self.decode(ids).to("second").end())


# ------------------------------------------------------------------------------------------------ factories


def miditok_class(name: str) -> type:
    import miditok

    classes = {n.lower(): c for n, c in vars(miditok).items()
               if isinstance(c, type) and issubclass(c, miditok.MusicTokenizer) and c is not miditok.MusicTokenizer}
    cls = classes.get(MIDITOK_ALIASES.get(name.lower(), name).lower())
    if cls is None:
        known = ", ".join(["performance", "duration", *sorted(classes)])
        raise DsmrError(f"unknown tokenizer {name!r} (known: {known})")
    return cls
