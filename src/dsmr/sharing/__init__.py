"""Sharing: the files of run and model folders (`run_folder`), the one loader (`loader`), exported folders,
model cards and Hub repo ids (`hub`), and `export`."""
