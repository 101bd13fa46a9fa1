"""Benchmark analysis, the top layer below the CLI: ``compare`` (runs over methods x seeds, their
summary and paired comparisons), ``describe`` (a config's clients), ``tables`` (CSV and printed
tables), ``stats`` (intervals over seeds) and ``plots``. Nothing in the library imports it."""
