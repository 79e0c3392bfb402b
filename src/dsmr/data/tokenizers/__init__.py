"""The encodings behind one `Tokenizer` protocol (`base`): `performance`, `duration` and miditok's
(`miditok_bridge`), by name in `registry` (`make_tokenizer`, `tokenizer_from_config`)."""
