#!/usr/bin/env bash
# The main job on the embedded default corpus, from a fresh machine: set up .venv, build the Bach-chorale
# token cache, train a small two-scale DSMR for a few minutes on the CPU, report validation perplexity,
# and continue a held-out chorale with the trained model (MIDI, piano roll, WAV with FluidSynth).
# Environment knobs: DSMR_DEMO_DIR (default runs/demo), DSMR_DEMO_STEPS (default 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
DIR="${DSMR_DEMO_DIR:-runs/demo}"
STEPS="${DSMR_DEMO_STEPS:-2000}"
DSMR=.venv/bin/dsmr

echo "== 1/4 build the Bach chorale cache (music21's bundled corpus) =="
$DSMR data build --corpus bach --cache "$DIR/cache"

echo "== 2/4 train a small two-scale DSMR ($STEPS steps) =="
# A laptop-sized model: 4 layers of width 128; the lowest layer keeps 448 past positions, the others 64.
RESUME=(); [ -f "$DIR/run/config.json" ] && RESUME=(--resume)   # a rerun continues (or finds it done)
$DSMR train --cache "$DIR/cache" --out "$DIR/run" --steps "$STEPS" "${RESUME[@]}" \
    --layers 4 --d-model 128 --heads 4 --segment 128 --batch-size 8 \
    --schedule two-scale --budget 640 --long-layers 1 --short 64 --eval-every 200

echo "== 3/4 validation perplexity over full pieces =="
$DSMR eval "$DIR/run" --cache "$DIR/cache" --split validation

echo "== 4/4 continue a chorale the model has not trained on =="
# The prompt: the first 8 s of the first validation chorale, decoded from the cache back to MIDI.
$DSMR data decode "$DIR/cache" --split validation --index 0 --out "$DIR/prompt.mid"
# A WAV too when FluidSynth is installed (apt-get install fluidsynth fluid-soundfont-gm; brew install fluid-synth)
WAV=()
if .venv/bin/python -c "from dsmr.generation.render import find_fluidsynth, find_soundfont; find_fluidsynth(); find_soundfont()" 2>/dev/null; then
    WAV=(--wav "$DIR/generated.wav")
else
    echo "(no WAV: FluidSynth or a General MIDI soundfont is missing; apt-get install fluidsynth fluid-soundfont-gm)"
fi
$DSMR generate "$DIR/run" --prompt "$DIR/prompt.mid" --prompt-seconds 8 --max-seconds 40 --seed 0 \
    --out "$DIR/generated.mid" --pianoroll "$DIR/generated.png" "${WAV[@]}"
echo "MIDI: $DIR/generated.mid   piano roll: $DIR/generated.png${WAV:+   audio: $DIR/generated.wav}"
