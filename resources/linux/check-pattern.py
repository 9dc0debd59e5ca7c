#!/usr/bin/env python3
"""check-pattern.py DISK [BLOCKS]: does DISK hold the test pattern that /init (init.c) writes?

The guest's own read-back only proves the guest sees what it wrote; this checks, on the host,
that the bytes really reached the backend's file at the right offsets.

Block b (4096 bytes) = 8-byte little-endian magic 0x3158554E494C4D56 ("VMLINUX1"),
then b as a little-endian u64, then byte i (16 <= i < 4096) = (b*31 + i*7) & 0xff.
Exit 0 if the first BLOCKS blocks (default 256) match, 1 with a message naming the first
difference otherwise, 2 on usage errors.
"""

import struct
import sys

BLOCK_SIZE = 4096
MAGIC = 0x3158554E494C4D56
DEFAULT_BLOCKS = 256


def tail_for(block_index: int) -> bytes:
    """Bytes 16..4096 of a block; they depend on the block index only through (b*31) & 0xff."""
    base = block_index * 31
    return bytes((base + i * 7) & 0xFF for i in range(16, BLOCK_SIZE))


def expected_block(block_index: int, tails: dict) -> bytes:
    key = (block_index * 31) & 0xFF
    if key not in tails:
        tails[key] = tail_for(block_index)
    return struct.pack("<QQ", MAGIC, block_index) + tails[key]


def describe_difference(block_index: int, expected: bytes, actual: bytes) -> str:
    if len(actual) < BLOCK_SIZE:
        return f"block {block_index}: file ends after {len(actual)} of its {BLOCK_SIZE} bytes"
    offset = next(i for i in range(BLOCK_SIZE) if expected[i] != actual[i])
    what = "magic" if offset < 8 else "block number" if offset < 16 else "pattern byte"
    if offset < 16:
        magic, number = struct.unpack("<QQ", actual[:16])
        return (f"block {block_index}: {what} differs (found magic {magic:#018x}, "
                f"block number {number})")
    return (f"block {block_index}: {what} at offset {offset} is {actual[offset]:#04x}, "
            f"expected {expected[offset]:#04x}")


def main(argv: list) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    path = argv[1]
    try:
        blocks = int(argv[2]) if len(argv) == 3 else DEFAULT_BLOCKS
    except ValueError:
        print(f"check-pattern: BLOCKS must be a number, not {argv[2]!r}", file=sys.stderr)
        return 2
    if blocks <= 0:
        print("check-pattern: BLOCKS must be positive", file=sys.stderr)
        return 2
    tails = {}
    try:
        with open(path, "rb") as disk:
            for block_index in range(blocks):
                actual = disk.read(BLOCK_SIZE)
                expected = expected_block(block_index, tails)
                if actual != expected:
                    print(f"check-pattern: FAIL {path}: "
                          f"{describe_difference(block_index, expected, actual)}")
                    return 1
    except OSError as error:
        print(f"check-pattern: FAIL cannot read {path}: {error}")
        return 1
    print(f"check-pattern: OK {path} holds the pattern in its first {blocks} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
