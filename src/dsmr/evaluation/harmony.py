"""Harmony of a stretch of music: its pitch-class profile and its key, and how far two stretches are apart.

What a musician hears first when a continuation wanders: the pitch content drifts away from the prompt's and
the music settles in an unrelated key. Both are measured from notes alone:

* pitch-class profile: the time each of the 12 pitch classes sounds (note lengths summed), normalised; two
  profiles compare by cosine similarity (1 = the same pitch content in the same proportions);
* key: Krumhansl-Schmuckler, the major or minor key whose Krumhansl-Kessler profile correlates best with the
  pitch-class profile;
* key relation: `same`, `close` (the key signatures differ by at most one accidental: dominant, subdominant,
  relative and their relatives -- the "closely related keys" of harmony textbooks) or `far`.
"""

from __future__ import annotations

import numpy as np

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
PITCH_CLASSES = "C C# D Eb E F F# G Ab A Bb B".split()


def pitch_class_profile(pitch: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Seconds each pitch class sounds, normalised to sum 1 (zeros for no notes)."""
    weights = np.bincount(np.asarray(pitch, dtype=np.int64) % 12, weights=np.maximum(end - start, 0.0), minlength=12)
    total = weights.sum()
    return weights / total if total > 0 else weights


def profile_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two pitch-class profiles (0 when either is empty)."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0


def estimate_key(profile: np.ndarray) -> tuple[int, str]:
    """(tonic pitch class, "major" or "minor") whose key profile correlates best with `profile`."""
    best, key = -np.inf, (0, "major")
    for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            r = np.corrcoef(profile, np.roll(template, tonic))[0, 1] if profile.any() else -np.inf
            if r > best:
                best, key = r, (tonic, mode)
    return key


def key_name(key: tuple[int, str]) -> str:
    return f"{PITCH_CLASSES[key[0]]} {key[1]}"


def key_relation(a: tuple[int, str], b: tuple[int, str]) -> str:
    """`same`, `close` (key signatures at most one accidental apart) or `far`."""
    if a == b:
        return "same"
    steps = abs(_fifths(a) - _fifths(b)) % 12
    return "close" if min(steps, 12 - steps) <= 1 else "far"


def _fifths(key: tuple[int, str]) -> int:
    """Position of the key's signature on the circle of fifths (C major / A minor = 0, G = 1, F = 11)."""
    tonic, mode = key
    major = tonic if mode == "major" else (tonic + 3) % 12  # a minor key shares its relative major's signature
    return (major * 7) % 12
