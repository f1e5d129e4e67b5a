"""The client SDK services import: only tritonclient and numpy at import time (see the README)."""
