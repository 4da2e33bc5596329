"""DVC stage scripts; run each as `python -m stages.<name>`."""
