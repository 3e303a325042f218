"""Entry point: `python remap_server.py --help`."""

from remap.launch import server

if __name__ == "__main__":
    server()
