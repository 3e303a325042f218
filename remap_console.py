"""Entry point: `python remap_console.py --help`."""

from remap.console.main import run

if __name__ == "__main__":
    run()
