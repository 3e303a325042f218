"""Entry point: `python remap_console.py --help`."""

from remap.launch import console

if __name__ == "__main__":
    console()
