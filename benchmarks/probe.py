"""Child process of the memory measurement: ``python -m benchmarks.probe`` (see ``benchmarks.measure``)."""

from .measure import probe_main

if __name__ == "__main__":
    raise SystemExit(probe_main())
