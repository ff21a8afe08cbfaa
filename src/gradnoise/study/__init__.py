"""The study: a YAML spec expands to runs, the runs go to a SQLite store, and the report
compares the methods with paired statistics (`gradnoise study`)."""
