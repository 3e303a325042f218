"""remap.Pool: code written for multiprocessing.Pool, running on a cluster.

Run: python examples/api_pool.py
"""

import remap


def word_count(line: str) -> int:
    return len(line.split())


def power(base: int, exponent: int) -> int:
    return base**exponent


if __name__ == "__main__":
    lines = [f"line {i} has " + "word " * (i % 7) for i in range(1000)]
    with remap.Pool(2) as pool:  # like multiprocessing.Pool(2); embedded cluster with 2 cores
        print("words:", sum(pool.map(word_count, lines)))
        print("powers:", pool.starmap(power, [(2, 10), (3, 3)]))
        print("first three, lazily:", [c for c, _ in zip(pool.imap(word_count, lines), range(3))])
        result = pool.apply_async(power, (7, 2), callback=lambda v: print("callback got", v))
        print("apply_async:", result.get(timeout=60))
        print("map_async:", pool.map_async(word_count, lines[:5]).get(timeout=60))
        pool.close()
        pool.join()
