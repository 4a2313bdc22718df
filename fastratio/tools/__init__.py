"""Command-line utilities (``python -m fastratio.tools.<name>``)."""
