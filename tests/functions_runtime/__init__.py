"""The Functions Python worker's indexing, run in its own Python 3.13 venv (``probe.py``)."""
