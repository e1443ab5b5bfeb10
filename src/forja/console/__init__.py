"""The operator's console at /console: accounts, sessions and the pages (see routes.py)."""
