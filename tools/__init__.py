"""The project's own build tools (scripts/lock, scripts/package, the wheel check); not shipped."""
