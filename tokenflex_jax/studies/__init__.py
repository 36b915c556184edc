"""Experiments and probes built on the library: the reproduction's summary and report,
the position probe, the pooling geometry of the suite, the crash harness."""
