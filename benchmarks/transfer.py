"""Move a dataset folder to a remote machine in parts that fit one transfer, checked end to end.

The accelerator machine is reached through calls that carry at most 64 MiB each, and CIFAR-10
as NumPy files is 178 MB. ``split`` cuts a folder's files (one byte stream, in name order) into
parts of at most ``--part_mib`` MiB and writes ``manifest.json`` (every file's name, size and
SHA-256, every part's SHA-256). On the other machine, ``receive`` is called once per transfer:
it verifies the parts that arrived and keeps them in ``DEST/.parts``; once all are there it
rebuilds the files in ``DEST`` and verifies each file's digest, so a damaged or missing part is
named, never silently used.

    python -m benchmarks.transfer split /work/shared/data/cifar10 .transfer
    # each call carries one part (and the manifest): .transfer/manifest.json .transfer/part-000
    python -m benchmarks.transfer receive .transfer /tmp/idm-data/cifar10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(source: str, out: str, part_bytes: int) -> dict:
    """Cut the files of ``source`` into parts under ``out``; returns the manifest."""
    names = sorted(n for n in os.listdir(source) if os.path.isfile(os.path.join(source, n)))
    if not names:
        raise SystemExit(f"error: {source} holds no files")
    os.makedirs(out, exist_ok=True)
    files = [{"name": n, "size": os.path.getsize(os.path.join(source, n)),
              "sha256": _sha256(os.path.join(source, n))} for n in names]
    parts, current, written = [], None, 0

    def next_part():
        nonlocal current, written
        if current is not None:
            current.close()
        name = f"part-{len(parts):03d}"
        parts.append({"name": name})
        current, written = open(os.path.join(out, name), "wb"), 0

    next_part()
    for entry in files:
        with open(os.path.join(source, entry["name"]), "rb") as f:
            while True:
                block = f.read(min(1 << 20, part_bytes - written))
                if not block:
                    break
                current.write(block)
                written += len(block)
                if written == part_bytes:
                    next_part()
    current.close()
    if written == 0 and len(parts) > 1:           # the last part came out empty
        os.remove(os.path.join(out, parts.pop()["name"]))
    for part in parts:
        part["sha256"] = _sha256(os.path.join(out, part["name"]))
        part["size"] = os.path.getsize(os.path.join(out, part["name"]))
    manifest = {"files": files, "parts": parts}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def receive(incoming: str, dest: str) -> bool:
    """Keep the verified parts of ``incoming`` in ``dest/.parts``; rebuild the files when all
    parts are there. Returns True when ``dest`` holds every file, verified."""
    store = os.path.join(dest, ".parts")
    os.makedirs(store, exist_ok=True)
    if os.path.exists(os.path.join(incoming, MANIFEST)):
        shutil.copy(os.path.join(incoming, MANIFEST), os.path.join(store, MANIFEST))
    if not os.path.exists(os.path.join(store, MANIFEST)):
        raise SystemExit(f"error: no {MANIFEST} in {incoming} or {store}; send it first")
    with open(os.path.join(store, MANIFEST)) as f:
        manifest = json.load(f)
    for part in manifest["parts"]:
        arrived = os.path.join(incoming, part["name"])
        if os.path.exists(arrived):
            if _sha256(arrived) != part["sha256"]:
                raise SystemExit(f"error: {arrived} is damaged (SHA-256 differs); send it again")
            shutil.copy(arrived, os.path.join(store, part["name"]))
    have = [p for p in manifest["parts"] if os.path.exists(os.path.join(store, p["name"]))]
    print(f"transfer: {len(have)}/{len(manifest['parts'])} parts in {store}")
    if len(have) < len(manifest["parts"]):
        return False
    stream = (open(os.path.join(store, p["name"]), "rb") for p in manifest["parts"])
    source, leftover = next(stream), b""
    for entry in manifest["files"]:
        target = os.path.join(dest, entry["name"])
        remaining = entry["size"]
        with open(target, "wb") as out:
            while remaining:
                if not leftover:
                    leftover = source.read(1 << 20)
                    if not leftover:
                        source.close()
                        source = next(stream)
                        continue
                block, leftover = leftover[:remaining], leftover[remaining:]
                out.write(block)
                remaining -= len(block)
        if _sha256(target) != entry["sha256"]:
            raise SystemExit(f"error: rebuilt {target} fails its SHA-256")
    source.close()
    print(f"transfer: {len(manifest['files'])} files rebuilt and verified in {dest}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut a folder into parts and a manifest")
    s.add_argument("source")
    s.add_argument("out")
    s.add_argument("--part_mib", type=float, default=59.5,
                   help="part size; one part per 64 MiB call leaves 4.5 MiB for the working tree")
    r = sub.add_parser("receive", help="keep arrived parts; rebuild when complete")
    r.add_argument("incoming")
    r.add_argument("dest")
    args = parser.parse_args(argv)
    if args.command == "split":
        if args.part_mib <= 0:
            raise SystemExit("error: --part_mib must be > 0")
        manifest = split(args.source, args.out, int(args.part_mib * 2 ** 20))
        print(f"transfer: {len(manifest['files'])} files in {len(manifest['parts'])} parts "
              f"under {args.out}")
        return 0
    return 0 if receive(args.incoming, args.dest) else 3


if __name__ == "__main__":
    sys.exit(main())
