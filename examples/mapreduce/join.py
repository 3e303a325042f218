"""Join of two inputs (users and orders) on the user id, users first by a secondary sort.

Keys are ``(user_id, 0)`` for a user and ``(user_id, 1)`` for an order; ``group`` makes one
reduce call per user id, and since keys sort by their parts the user's row comes first.
"""

from pathlib import Path


def read(path):
    kind = Path(path).stem  # users.csv or orders.csv
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                yield kind, line.rstrip("\n").split(",")


def map(record):
    kind, fields = record
    if kind == "users":
        user_id, name = fields
        yield (int(user_id), 0), name
    else:
        order_id, user_id, amount = fields
        yield (int(user_id), 1), (order_id, amount)


def group(key):
    return key[0]


def reduce(user_id, values):
    name = None
    for value in values:
        if isinstance(value, str):
            name = value
        elif name is not None:  # an inner join: orders of unknown users are dropped
            order_id, amount = value
            yield f"{user_id},{name},{order_id},{amount}"


def write(record, file):
    file.write(record + "\n")
