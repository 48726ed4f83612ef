"""What every stage stands on: the config schema and what each stage reads outside its section, the
one-line errors, the run folder, the metrics log, the `python -m stages.<name>` entry, and the
runtime (precision, threads, accelerator). Imports nothing else from stages/."""
