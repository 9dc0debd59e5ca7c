#!/usr/bin/env python3
"""Check, on the host, the blocks the test guest's `blk-write-verify` wrote.

The pattern (see the test-guest contract and src/pattern.rs): block b is 4096
bytes at byte offset b*4096:
  0..32     le u64 magic "VMMBLK01", le u64 b, le u64 seed, le u64 seq
  32..4088  xorshift64 stream from s = seed ^ (b * 0x9E3779B97F4A7C15) (1 if 0),
            each step s ^= s<<13; s ^= s>>7; s ^= s<<17 (64-bit), emitted as
            8 little-endian bytes
  4088..    le u64 FNV-1a-64 of bytes 0..4088
seq is the order of writing: block start+i was written as number i.

Usage: check-pattern.py DISK [--blocks N] [--start S] [--seed SEED]
Exit status 0 when every block matches, 1 with one line per bad block
(at most 10) otherwise, 2 on usage errors.
"""
import argparse
import struct
import sys

BLOCK = 4096
MAGIC = 0x31304B4C424D4D56
GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & MASK
    return h


def expected_block(block: int, seed: int, seq: int) -> bytes:
    out = bytearray(struct.pack("<QQQQ", MAGIC, block, seed, seq))
    s = (seed ^ (block * GOLDEN)) & MASK or 1
    words = []
    for _ in range((BLOCK - 8 - 32) // 8):
        s ^= (s << 13) & MASK
        s ^= s >> 7
        s ^= (s << 17) & MASK
        words.append(s)
    out += struct.pack("<%dQ" % len(words), *words)
    out += struct.pack("<Q", fnv1a64(out))
    return bytes(out)


def describe(found: bytes, want: bytes) -> str:
    fields = ("magic", "block", "seed", "seq")
    for i, name in enumerate(fields):
        a, b = found[i * 8:(i + 1) * 8], want[i * 8:(i + 1) * 8]
        if a != b:
            return "%s is %#x, expected %#x" % (name, struct.unpack("<Q", a)[0], struct.unpack("<Q", b)[0])
    first = next(i for i in range(BLOCK) if found[i] != want[i])
    return "first differing byte at offset %d" % first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("disk")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.blocks < 1 or args.start < 0 or not 0 <= args.seed <= MASK:
        parser.error("blocks must be >= 1, start >= 0, seed a u64")
    bad = 0
    with open(args.disk, "rb") as disk:
        for i in range(args.blocks):
            block = args.start + i
            disk.seek(block * BLOCK)
            found = disk.read(BLOCK)
            want = expected_block(block, args.seed, i)
            if len(found) < BLOCK:
                problem = "disk ends inside the block (%d bytes)" % len(found)
            elif found != want:
                problem = describe(found, want)
            else:
                continue
            bad += 1
            if bad <= 10:
                print("block %d: %s" % (block, problem))
    if bad:
        print("check-pattern: %d of %d blocks bad" % (bad, args.blocks))
        return 1
    print("check-pattern: %d blocks from %d match (seed %d)" % (args.blocks, args.start, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
