"""Data: MIDI files (`midi`), the encodings (`tokenizers`), corpora and their splits (`corpora`, `maestro`,
`sources`), the token cache (`cache`, `cache_build`), whole pieces streamed as lanes of segments (`stream`) and
augmentation on the fly (`augment`)."""
