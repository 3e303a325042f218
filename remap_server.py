"""Entry point: `python remap_server.py --help`."""

from remap.server.main import run

if __name__ == "__main__":
    run()
