"""What every stage uses: atomic writes, safe file reading, config dataclasses from JSON, options defined
once from config fields, and where the work runs (device, threads, peak memory)."""
