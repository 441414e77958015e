"""Helpers shared by the prepare scripts: find or download the input text, stream it as
UTF-8, write token files and meta.json so that an interrupted run never leaves a
half-written dataset that looks finished."""

import argparse
import codecs
import collections
import glob
import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sologpt.configurator import ArgumentParser


class PrepareError(Exception):
    """An expected user mistake: main() prints it as one `error: ...` line and exits 1."""


def make_parser(description, default_name):
    """The command line every prepare script shares."""
    p = ArgumentParser(prog=f"python prepare/{default_name}.py", description=description)
    p.add_argument("--input", metavar="PATH", help="use this local text file instead of downloading")
    p.add_argument("--name", default=default_name,
                   help="output folder under --data_root (default: %(default)s)")
    p.add_argument("--data_root", default="data", metavar="DIR", help="default: %(default)s")
    p.add_argument("--val_fraction", type=fraction_arg, default=0.1,
                   help="share of the text that goes to val.bin (default: %(default)s)")
    p.add_argument("--chunk_bytes", type=_positive_int, default=1 << 20,
                   help="bytes read at a time; bounds memory use (default: %(default)s)")
    return p


def fraction_arg(s):
    """argparse type for --val_fraction: a float strictly between 0 and 1."""
    x = float(s)
    if not 0.0 < x < 1.0:  # train.py needs both a train.bin and a val.bin
        raise argparse.ArgumentTypeError(f"{s} is not strictly between 0 and 1")
    return x


def _positive_int(s):
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive integer")
    return n


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_input(name, url, sha256, input_path, data_dir):
    """Return the path of the text to prepare: --input if given, else <data_dir>/input.txt,
    downloading it there first when missing. Only downloads are checksum-verified: a local
    --input is the user's own text."""
    if input_path is not None:
        path = Path(input_path)
        if not path.is_file():
            raise PrepareError(f"--input {path} does not exist (or is not a file)")
        return path
    path = Path(data_dir) / "input.txt"
    if path.is_file():
        return path
    print(f"downloading {name} from {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename only once verified: a failed or interrupted
    # download must not leave an input.txt that a later run would trust.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="input.txt.", suffix=".tmp")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
            while block := resp.read(1 << 16):
                h.update(block)
                f.write(block)
        if h.hexdigest() != sha256:
            raise PrepareError(f"checksum mismatch for {url}: expected sha256 {sha256}, "
                               f"got {h.hexdigest()}")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        # "HTTP Error 404: Not Found" says more than HTTPError.reason; for others .reason is the cause.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise PrepareError(f"could not download {url} ({reason}): pass --input path/to/input.txt "
                           f"or put the file at {path}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # no-op after a successful os.replace
    return path


def iter_text(path, chunk_bytes=1 << 20):
    """Yield the file's text in pieces of about chunk_bytes, so big files never sit in memory."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()  # keeps a split multi-byte char for the next chunk
    offset = 0  # bytes read so far
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc=path.name, disable=None) as bar:
        while True:
            block = f.read(chunk_bytes)
            # The decoder reports positions in (its buffered bytes + block); the buffered bytes
            # are the last few of the previous block, so they start at offset - len(buffered).
            start = offset - len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"{path} is not valid UTF-8: bad byte 0x{e.object[e.start]:02x} at byte offset "
                    f"{start + e.start} ({e.reason}); convert it first "
                    "(e.g. iconv -f latin1 -t utf-8)") from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)
            bar.update(len(block))


def token_dtype(vocab_size):
    """uint16 halves the files when every id fits (GPT-2's 50257 does); else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class TokenWriter:
    """Append token ids to <path>.tmp. Leaving the `with` block on an error deletes the
    temporary file; publish() moves it into place once everything succeeded."""

    def __init__(self, path, dtype):
        self.path, self.tmp, self.dtype = Path(path), Path(f"{path}.tmp"), dtype
        self.n_tokens, self.max_id = 0, -1
        self.file = open(self.tmp, "wb")

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        top = int(ids.max())
        assert top <= np.iinfo(self.dtype).max, f"token id {top} does not fit {self.dtype.__name__}"
        ids.astype(self.dtype).tofile(self.file)
        self.n_tokens += ids.size
        self.max_id = max(self.max_id, top)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.file.flush()
            os.fsync(self.file.fileno())  # the data is on disk before the rename makes it visible
        self.file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)


def write_meta(data_dir, meta):
    """Write meta.json atomically (temp file + rename), then sync the folder: the renames before it (the token
    files') and its own survive a power cut once the folder's entry is on disk."""
    path = Path(data_dir) / "meta.json"
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(data_dir, train, val, input_path, meta):
    """Move the finished .bin files into place, then write meta.json last, with the counts and the source
    added. The old meta.json goes first: if we die in between, a folder without meta.json reads as unfinished,
    instead of an old meta.json describing new token files."""
    writers = [train, val]
    empty = [w.path.name for w in writers if w.n_tokens == 0]
    if empty:
        for w in writers:
            w.tmp.unlink(missing_ok=True)
        raise PrepareError(f"{empty[0]} would be empty: the input is too small for this --val_fraction")
    meta = {**meta, "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
            "max_token_id": max(train.max_id, val.max_id), "source": str(input_path),
            "source_sha256": sha256_file(input_path)}
    (Path(data_dir) / "meta.json").unlink(missing_ok=True)
    for w in writers:
        os.replace(w.tmp, w.path)
    write_meta(data_dir, meta)
    return meta


def write_problem(e, data_dir):
    """A failed write (a full disk, a read-only folder) as one PrepareError line; the token files being written are
    deleted and the dataset that was there is as it was."""
    return PrepareError(f"cannot write {e.filename or data_dir}: {e.strerror or e}: free disk space or choose another "
                        f"--data_root")


def run(argv, description, name, url, sha256, write_dataset):
    """A prepare script's command line: find or download the text, write the dataset, print a summary."""
    args = make_parser(description, name).parse_args(argv)
    data_dir = Path(args.data_root) / args.name
    try:
        path = fetch_input(name, url, sha256, args.input, data_dir)
        try:
            meta = write_dataset(path, data_dir, args.val_fraction, args.chunk_bytes)
        except OSError as e:
            raise write_problem(e, data_dir)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"vocab size {meta['vocab_size']} ({meta['dtype']}), {meta['train_tokens']:,} train tokens "
          f"-> {data_dir / 'train.bin'}, {meta['val_tokens']:,} val tokens -> {data_dir / 'val.bin'}, "
          f"meta -> {data_dir / 'meta.json'}")
    return meta


def publish_splits(data_dir, train, val, meta):
    """publish() for datasets built from many inputs (prepare/text.py checks the sizes itself and records
    its sources in meta): move the finished .bin files into place, then write meta.json with the counts."""
    meta = {**meta, "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
            "max_token_id": max(train.max_id, val.max_id)}
    (Path(data_dir) / "meta.json").unlink(missing_ok=True)  # as in publish(): no old meta.json over new files
    for w in (train, val):
        os.replace(w.tmp, w.path)
    write_meta(data_dir, meta)
    return meta


def ordered_map(pool, fn, items, window):
    """Like pool.imap(fn, items), in order, but with at most `window` items submitted and not yet
    returned. Pool.imap reads its input as fast as it can, which would pull a whole corpus into memory."""
    if pool is None:  # one worker: run here, no processes to start
        yield from map(fn, items)
        return
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def find_inputs(inputs, suffixes):
    """Files, folders (searched recursively) and globs -> the files whose name ends in one of `suffixes`
    (or that plus .gz), each once, in a stable order. A named file must have such a suffix too."""
    def wanted(p):
        return p.is_file() and str(p).lower().removesuffix(".gz").endswith(suffixes)

    shown = ", ".join(suffixes)
    files = []
    for spec in map(str, inputs):
        path = Path(spec)
        if path.is_file() and not wanted(path):
            raise PrepareError(f"{spec} is not a {shown} file (nor their .gz): rename or convert it")
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if wanted(p))
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if wanted(p))
        else:
            raise PrepareError(f"{spec} does not exist")
        if not found:
            raise PrepareError(f"{spec} {'holds' if path.is_dir() else 'matches'} no {shown} files (nor their .gz)")
        files += found
    return list(dict.fromkeys(files))


def decode_text(data, non_utf8="cp1252"):
    """Bytes -> (text, number of bytes that were not UTF-8), a leading BOM dropped. Such bytes are decoded
    one by one as Windows-1252 (non_utf8="cp1252"; its 5 unassigned bytes as Latin-1, as browsers do), or
    become U+FFFD ("replace"); with "skip" the text is None. One byte at a time, so a UTF-8 file with a few
    stray Latin-1 bytes (webtext/wine.txt) keeps its UTF-8, and a cp1252 file (webtext/firefox.txt) reads right."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff"), 0
    except UnicodeDecodeError:
        if non_utf8 == "skip":
            return None, 0
    bad = 0

    def one_byte(err):  # the UTF-8 decoder calls this at each invalid stretch; we fix one byte and go on
        nonlocal bad
        bad += 1
        byte = err.object[err.start:err.start + 1]
        char = "\ufffd" if non_utf8 == "replace" else byte.decode("cp1252", errors="ignore") or byte.decode("latin-1")
        return char, err.start + 1

    codecs.register_error("sologpt_fallback", one_byte)  # registered per call: this closure counts into `bad`
    return data.decode("utf-8", errors="sologpt_fallback").removeprefix("\ufeff"), bad
