"""Entry point: `python remap_node.py --help`."""

from remap.launch import node

if __name__ == "__main__":
    node()
