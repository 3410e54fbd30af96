"""bitlm's own components, registered exactly like an external plugin's (see ``plugin.py``)."""
