"""`python -m dsmr.study SPEC.json`: the worker that trains one variant in a fresh process."""

from dsmr.study.run import main

raise SystemExit(main())
