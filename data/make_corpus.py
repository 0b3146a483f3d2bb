#!/usr/bin/env python3
"""Builds modula's small multi-domain text corpus (data/<domain>/{train,test}.txt) from text
that this machine's package registries and packages carry, and records every file used with
its licence in data/SOURCES.tsv.

Domains:
- prose:  README.md files of Rust crates in the Cargo registry (English prose in Markdown);
- rust:   Rust source files (*.rs) of the same crates;
- toml:   the crates' Cargo.toml manifests (configuration);
- python: the CPython 3.11 standard library (*.py, PSF-2.0);
- c:      C sources bundled by liblzma-sys (0BSD / public domain), zstd-sys (BSD-3-Clause) and
          libmimalloc-sys (MIT);
- man:    OpenSSL 3's manual pages (roff source, Apache-2.0).

Each domain's files are put in a fixed pseudo-random order (SHA-256 of the file's path below
its package), files of 1-48 KiB that are valid UTF-8 only; the first files fill the test split
(24 KiB), the next the train split (160 KiB), so no file is in both. Only crates whose licence
is MIT or Apache-2.0 (alone or as alternatives) are used. Run once; the output is committed.

    python3 data/make_corpus.py
"""
import gzip
import hashlib
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

TEST_BYTES = 24 * 1024
TRAIN_BYTES = 160 * 1024
OUT = Path(__file__).resolve().parent
REGISTRY = sorted((Path.home() / ".cargo/registry/src").glob("*"))[0]
PERMISSIVE = re.compile(r"^(MIT|Apache-2\.0)((\s*(OR|/)\s*(MIT|Apache-2\.0))*)$")


def crate_license(crate_dir):
    toml = (crate_dir / "Cargo.toml").read_text(errors="replace")
    m = re.search(r'^license\s*=\s*"([^"]+)"', toml, re.M)
    return m.group(1) if m else None


def permissive_crates():
    out = []
    for d in sorted(REGISTRY.iterdir()):
        if not (d / "Cargo.toml").exists():
            continue
        lic = crate_license(d)
        if lic and PERMISSIVE.match(lic.strip()):
            out.append((d, lic))
    # One version per crate name (the last in sorted order).
    by_name = {}
    for d, lic in out:
        by_name[re.sub(r"-\d+\.\d+\.\d+.*$", "", d.name)] = (d, lic)
    return list(by_name.values())


def candidates(domain):
    """(key for ordering, label, reader, licence) for every candidate file of a domain."""
    if domain in ("prose", "rust", "toml"):
        for d, lic in permissive_crates():
            if domain == "prose":
                files = [d / "README.md"]
            elif domain == "toml":
                files = [d / "Cargo.toml"]
            else:
                files = sorted(p for p in d.rglob("*.rs") if "target" not in p.parts)
            for f in files:
                if f.is_file():
                    rel = f"crates.io/{f.relative_to(REGISTRY)}"
                    yield rel, f.read_bytes, lic
    elif domain == "python":
        lib = Path(sysconfig.get_paths()["stdlib"])
        for f in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
            if "site-packages" in f.parts or "test" in f.parts[-2:] or "idlelib" in f.parts:
                continue
            yield f"cpython-3.11/Lib/{f.relative_to(lib)}", f.read_bytes, "PSF-2.0"
    elif domain == "c":
        licences = {"liblzma-sys": "0BSD OR public domain (xz)", "zstd-sys": "BSD-3-Clause (zstd)",
                    "libmimalloc-sys": "MIT (mimalloc)"}
        for d in sorted(REGISTRY.iterdir()):
            name = re.sub(r"-\d+\.\d+\.\d+.*$", "", d.name)
            if name in licences:
                for f in sorted(d.rglob("*.c")):
                    yield f"crates.io/{f.relative_to(REGISTRY)}", f.read_bytes, licences[name]
    elif domain == "man":
        pages = subprocess.run(["dpkg", "-L", "openssl"], capture_output=True, text=True).stdout.split()
        for p in sorted(pages):
            f = Path(p)
            if f.suffix == ".gz" and "/man/" in p and f.is_file() and not f.is_symlink():
                yield f"debian:openssl{p}", lambda f=f: gzip.decompress(f.read_bytes()), "Apache-2.0"


def build(domain, sources):
    files = []
    for label, read, lic in candidates(domain):
        try:
            text = read().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        n = len(text.encode())
        if 1024 <= n <= 48 * 1024:
            files.append((hashlib.sha256(label.split("/", 2)[-1].encode()).hexdigest(), label, text, lic))
    files.sort()
    splits = {"test": [], "train": []}
    budget = {"test": TEST_BYTES, "train": TRAIN_BYTES}
    which = "test"
    for _, label, text, lic in files:
        if which == "test" and sum(len(t.encode()) for t in splits["test"]) >= budget["test"]:
            which = "train"
        if which == "train" and sum(len(t.encode()) for t in splits["train"]) >= budget["train"]:
            break
        splits[which].append(text)
        sources.append((domain, which, label, lic))
    (OUT / domain).mkdir(exist_ok=True)
    for split, texts in splits.items():
        data = "\n\n".join(texts)
        cap = budget[split]
        data = data.encode()[:cap].decode("utf-8", errors="ignore")
        (OUT / domain / f"{split}.txt").write_text(data)
    print(f"{domain}: {len(splits['test'])} test files, {len(splits['train'])} train files", file=sys.stderr)


def main():
    sources = []
    for domain in ["prose", "rust", "toml", "python", "c", "man"]:
        build(domain, sources)
    with open(OUT / "SOURCES.tsv", "w") as f:
        f.write("domain\tsplit\tfile\tlicence\n")
        for row in sources:
            f.write("\t".join(row) + "\n")


if __name__ == "__main__":
    main()
