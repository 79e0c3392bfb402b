"""Evaluation: full-piece perplexity and NLL per note (`perplexity`), music statistics of generated pieces
against real ones (`music_stats`), and whether a continuation keeps its prompt's key (`harmony`)."""
