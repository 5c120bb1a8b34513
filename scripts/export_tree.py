#!/usr/bin/env python3
"""Export one commit of a bare git directory (as the search tool's `fetch` leaves it) into a folder.

`git archive` stops at the first missing blob and fetched mirrors lack blobs of 4 MiB or more, so
files are written one by one and missing ones are listed and skipped. Dev tool for getting a real
ComfyUI into .cache/ (see shared/comfyui/README.md); nothing exported is ever committed.

    python scripts/export_tree.py /work/.mirror/silveroxides+ComfyUI/repo 4f874c5e .cache/ComfyUI-0.29.0
"""
import os
import subprocess
import sys


def export(git_dir: str, commit: str, dest: str) -> list[str]:
    listing = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "-z", commit],
                             check=True, capture_output=True).stdout.split(b"\0")
    entries = []
    for row in filter(None, listing):
        meta, path = row.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind == b"blob":
            entries.append((mode.decode(), sha.decode(), path.decode()))
    cat = subprocess.Popen(["git", "--git-dir", git_dir, "cat-file", "--batch"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    missing = []
    for mode, sha, path in entries:
        cat.stdin.write(sha.encode() + b"\n")
        cat.stdin.flush()
        header = cat.stdout.readline().split()
        if header[-1] == b"missing":
            missing.append(path)
            continue
        data = cat.stdout.read(int(header[2]))
        cat.stdout.read(1)
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if mode == "120000":
            if os.path.lexists(target):
                os.remove(target)
            os.symlink(data.decode(), target)
            continue
        with open(target, "wb") as f:
            f.write(data)
        if mode == "100755":
            os.chmod(target, 0o755)
    cat.stdin.close()
    cat.wait()
    return missing


if __name__ == "__main__":
    skipped = export(*sys.argv[1:4])
    print(f"exported to {sys.argv[3]}; {len(skipped)} missing blobs skipped: {skipped}")
