#!/usr/bin/env python3
"""check-pattern.py [--round R] DISK [BLOCKS]: does DISK hold the pattern /init (init.c) writes?

The guest's own read-back only proves the guest sees what it wrote; this checks, on the host,
that the bytes really reached the backend's file at the right offsets.

Single pass (no --round): block b (4096 bytes) = 8-byte little-endian magic 0x3158554E494C4D56
("VMLINUX1"), then b as a little-endian u64, then byte i (16 <= i < 4096) = (b*31 + i*7) & 0xff.

--round R (the vmmrounds=R loop; R is its last round, the one that must be on the disk): block b
= magic 0x31444E554F524D56 ("VMROUND1"), b, R (little-endian u64 each), then byte i
(24 <= i < 4096) = (b*31 + i*7 + R*113) & 0xff. A block holding an earlier round (a stale write
replayed after a newer one) is named with the round it holds.

Exit 0 if the first BLOCKS blocks (default 256) match, 1 with a message naming the first
difference otherwise, 2 on usage errors.
"""

import struct
import sys

BLOCK_SIZE = 4096
MAGIC = 0x3158554E494C4D56
ROUND_MAGIC = 0x31444E554F524D56
DEFAULT_BLOCKS = 256


class Pattern:
    """Expected blocks of one pass (round None) or of round R of the loop."""

    def __init__(self, round_number):
        self.round = round_number
        self.header = 16 if round_number is None else 24
        self.tails = {}

    def tail(self, key: int) -> bytes:
        """Bytes header..4096: they depend on the block only through key = (b*31 + R*113) & 0xff."""
        if key not in self.tails:
            self.tails[key] = bytes((key + i * 7) & 0xFF for i in range(self.header, BLOCK_SIZE))
        return self.tails[key]

    def block(self, block_index: int) -> bytes:
        if self.round is None:
            return struct.pack("<QQ", MAGIC, block_index) + self.tail((block_index * 31) & 0xFF)
        key = (block_index * 31 + self.round * 113) & 0xFF
        return struct.pack("<QQQ", ROUND_MAGIC, block_index, self.round) + self.tail(key)

    def describe_difference(self, block_index: int, expected: bytes, actual: bytes) -> str:
        if len(actual) < BLOCK_SIZE:
            return f"block {block_index}: file ends after {len(actual)} of its {BLOCK_SIZE} bytes"
        offset = next(i for i in range(BLOCK_SIZE) if expected[i] != actual[i])
        if offset >= self.header:
            return (f"block {block_index}: pattern byte at offset {offset} is "
                    f"{actual[offset]:#04x}, expected {expected[offset]:#04x}")
        magic, number = struct.unpack("<QQ", actual[:16])
        found = f"found magic {magic:#018x}, block number {number}"
        if magic == ROUND_MAGIC:
            found += f", round {struct.unpack('<Q', actual[16:24])[0]}"
        want = "" if self.round is None else f"; expected round {self.round}"
        return f"block {block_index}: header differs ({found}{want})"


def main(argv: list) -> int:
    args = argv[1:]
    round_number = None
    if len(args) >= 2 and args[0] == "--round":
        try:
            round_number = int(args[1])
        except ValueError:
            round_number = -1
        if round_number < 1:
            print(f"check-pattern: --round must be a positive number, not {args[1]!r}",
                  file=sys.stderr)
            return 2
        args = args[2:]
    if len(args) not in (1, 2):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    path = args[0]
    try:
        blocks = int(args[1]) if len(args) == 2 else DEFAULT_BLOCKS
    except ValueError:
        print(f"check-pattern: BLOCKS must be a number, not {args[1]!r}", file=sys.stderr)
        return 2
    if blocks <= 0:
        print("check-pattern: BLOCKS must be positive", file=sys.stderr)
        return 2
    pattern = Pattern(round_number)
    try:
        with open(path, "rb") as disk:
            for block_index in range(blocks):
                actual = disk.read(BLOCK_SIZE)
                expected = pattern.block(block_index)
                if actual != expected:
                    print(f"check-pattern: FAIL {path}: "
                          f"{pattern.describe_difference(block_index, expected, actual)}")
                    return 1
    except OSError as error:
        print(f"check-pattern: FAIL cannot read {path}: {error}")
        return 1
    what = "the pattern" if round_number is None else f"round {round_number}'s pattern"
    print(f"check-pattern: OK {path} holds {what} in its first {blocks} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
