"""The web side: `autoresearch dashboard` (server.py, live and read-only) and `report --html`
(export.py, one file), sharing data.py (what is shown), render.py, templates/ and static/."""
