"""Entry point: `python remap_node.py --help`."""

from remap.node.main import run

if __name__ == "__main__":
    run()
