"""The interactive sample explorer: one self-contained `explorer.html` per analysed run (or group
of runs). `data` assembles and encodes the page's data (pure functions of arrays), `html` renders
the page; `stages/explore.py` is the `explore` entry point and the hook other stages call."""
