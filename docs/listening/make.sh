#!/usr/bin/env bash
# The listening set: the first 10 s of four MAESTRO test-split performances, continued to 40 s by a model dsmr
# ships, with dsmr generate's defaults (the model's own temperature and top-p, the note guard for its encoding), seed 1.
# Usage: bash docs/listening/make.sh MAESTRO_ROOT [MODEL_FOLDER]   (default models/maestro-duration-small)
# writes docs/listening/<the model folder's name>/NAME.mid and NAME.png
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="${1:?give the folder of MAESTRO v3.0.0}"
MODEL="${2:-models/maestro-duration-small}"
OUT="docs/listening/$(basename "$MODEL")"
mkdir -p "$OUT"
while IFS='|' read -r name midi; do
    .venv/bin/dsmr generate "$MODEL" --prompt "$ROOT/$midi" --prompt-seconds 10 --max-seconds 40 \
        --seed 1 --out "$OUT/$name.mid" --pianoroll "$OUT/$name.png" --no-progress
done <<'LIST'
scarlatti-k9|2014/MIDI-UNPROCESSED_11-13_R1_2014_MID--AUDIO_11_R1_2014_wav--1.midi
chopin-nocturne-op15-1|2015/MIDI-Unprocessed_R1_D1-9-12_mid--AUDIO-from_mp3_12_R1_2015_wav--3.midi
bach-wtc1-bwv858|2015/MIDI-Unprocessed_R1_D1-1-8_mid--AUDIO-from_mp3_02_R1_2015_wav--1.midi
debussy-pour-les-accords|2009/MIDI-Unprocessed_11_R1_2009_01-05_ORIG_MID--AUDIO_11_R1_2009_11_R1_2009_04_WAV.midi
LIST
