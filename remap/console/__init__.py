"""The console: one-shot commands and an interactive shell over the same parser."""
