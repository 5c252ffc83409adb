"""A side-by-side study: algorithms trained with one recipe and the same seeds, the base model and
every final checkpoint evaluated under named decodings, one report with standard errors that count
seeds and problems.

- `spec.py`: the arms, the named evaluation decodings, the check that the arms explore alike;
- `jobs.py`: the `softgrpo train` / `softgrpo eval` commands, the directory layout, running them;
- `stats.py`: paired estimates and their standard errors (pure);
- `report.py`: report.md, report.json and the plots.
"""
