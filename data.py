"""
Text -> token ids for MPNet pretraining.

Prepare a dataset once (tokenize it into flat token streams on disk), then train from it:
    python data.py --dataset=pydocs --tokenizer=train --vocab_size=8192 --val_frac=0.05  # as config/tiny.py
    python data.py --dataset=path/to/file_or_folder                        # .txt / .jsonl / .parquet, mpnet-base vocab
    python data.py --dataset=HuggingFaceFW/fineweb-edu:sample-10BT --num_proc=16   # hub dataset, name[:config]
This writes data/<dataset>-<tokenizer>/: train.bin and val.bin (uint16, or uint32 for vocabs over 65536),
meta.json, and tokenizer/ (a HF tokenizer folder, so neither training nor export needs the hub). Each .bin
is the split's documents concatenated, each followed by </s>; a training block is <s> followed by
block_size-1 consecutive tokens of that stream, so blocks run across document boundaries.

Sources: 'pydocs' is the Python installation's own documentation (pydoc topics + standard-library
docstrings, ~2 MB of English, built once into data/pydocs.jsonl). A .txt file gives one document per
blank-line separated paragraph (--txt_split=paragraph), per line (line) or per file (file); undecodable
bytes become U+FFFD and are counted. .jsonl/.parquet give one document per row (--text_field); rows
whose text is null or not a string are skipped and counted. Anything else is a HuggingFace hub dataset.
A corpus too big to prepare is read by StreamingBatches instead, which tokenizes on the fly.

meta.json records what the folder was made from (source files' sizes and times, or the hub revision);
preparing again over a changed source is refused unless --overwrite. load_prepared checks a folder
before training reads it, and gives the fingerprint that DDP ranks compare. The folder is written as
<out_dir>.partial-PID and renamed when complete: Ctrl-C or SIGTERM stops preparing within a second and
removes it, and a later prepare removes one left by a killed process.

Training from prepared data needs torch, numpy and tokenizers: datasets and transformers are imported
where used (preparing, streaming), and finding an already prepared folder needs neither.

The file has two halves: I. what training reads each step (load_prepared, Batches, StreamingBatches,
training_data), then II. preparation (interruption, sources, tokenizers, prepare and its provenance).
"""
import os
import re
import sys
import json
import glob
import hashlib
import shutil
import signal
import socket
import threading
import time
import contextlib
from types import SimpleNamespace

import numpy as np
import torch

DATA_ROOT = 'data'                   # default parent folder of prepared datasets and of the pydocs corpus
TOKENIZER_TRAIN_CHARS = 300_000_000  # --tokenizer=train learns its vocab from at most this much text
EXTENSIONS = {'.txt': 'text', '.jsonl': 'json', '.json': 'json', '.parquet': 'parquet'}

TXT_SPLITS = {'line': 'line', 'paragraph': 'paragraph', 'file': 'document'}  # txt_split -> datasets' sample_by

class DataError(Exception):
    """A mistake the user can fix; the message is one line naming the problem and the fix."""

class Interrupted(DataError):
    """Preparation stopped by SIGINT or SIGTERM; nothing was written (the staging folder is removed)."""

def _line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]

def _root_cause(e):  # datasets wraps the reader's error ("An error occurred while generating the dataset")
    for _ in range(20):  # a chain, not a cycle
        e = e.__cause__ or e.__context__ or e
    return e

# -----------------------------------------------------------------------------
# seeded hashing: every random choice here is a pure function of (seed, index), so runs resume exactly

def _hash(x, *keys):
    """splitmix64 of the integer array x, chained over the integer keys (numpy uint64 wraps mod 2**64)."""
    z = np.array(x, dtype=np.uint64, ndmin=1)
    for k in keys:
        z = z + np.uint64((k * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z

def _uniform(x, *keys):  # floats in [0, 1)
    return (_hash(x, *keys) >> np.uint64(11)).astype(np.float64) / 2**53

def digests(blobs):
    """A stable 64-bit id of each byte string's content [n] (uint64), the same in every process (Python's hash is not)."""
    return np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), 'little') for b in blobs], np.uint64)

def text_digests(texts):
    """digests of texts (a row that is no text counts as ''): what decides a document's split, so that a text given
    twice is held out, or trained on, both times; never one of each."""
    return digests(t.encode('utf-8', 'surrogatepass') if isinstance(t, str) else b'' for t in texts)

def _permute(j, n, *keys):
    """A seeded bijection of [0, n), applied to the array j in O(len(j)) memory however large n is: a
    4-round Feistel network on the smallest even number of bits covering n, cycle-walking values that
    land >= n (the cycle of a bijection through j always comes back into [0, n))."""
    n = int(n)
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    x = np.array(j, dtype=np.uint64, ndmin=1)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        for rnd in range(4):
            left, right = y >> np.uint64(h), y & mask
            y = (right << np.uint64(h)) | (left ^ (_hash(right, *keys, rnd) & mask))
        x[todo] = y
        todo = x >= np.uint64(n)
    return x.astype(np.int64)

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


# =============================================================================
# I. What training reads, each step: a prepared folder (load_prepared), its batches of packed blocks
#    (Batches), a stream tokenized on the fly (StreamingBatches), and train.py's data (training_data).
# =============================================================================

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise DataError(f"'{data_dir}' is not a prepared dataset (no meta.json): run python data.py --dataset=... --out_dir={data_dir}")
    fix = f"re-prepare the folder: {prepare_command(None, data_dir)}"
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, truncated, not JSON, not UTF-8
        raise DataError(f"'{path}' cannot be read ({_line(e)}); {fix}") from None
    if not isinstance(meta, dict):
        raise DataError(f"'{path}' holds a JSON {type(meta).__name__}, not the object data.py writes; {fix}")
    if isinstance(meta.get('settings'), dict):
        fix = f"re-prepare the folder: {prepare_command(meta['settings'], data_dir)}"
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    def dtype(v):  # load_prepared says when it cannot hold the vocabulary
        try:
            return isinstance(v, str) and np.dtype(v).kind in 'ui'
        except TypeError:
            return False
    checks = dict(tokenizer=lambda v: isinstance(v, str) and v, vocab_size=lambda v: ints(v) and v > 0,
                  dtype=dtype, bos_id=ints, eos_id=ints,
                  pad_id=lambda v: v is None or ints(v), unk_id=lambda v: v is None or ints(v),
                  mask_id=lambda v: v is None or ints(v), settings=lambda v: v is None or isinstance(v, dict),
                  source=lambda v: v is None or isinstance(v, dict),
                  n_tokens=lambda v: v is None or (isinstance(v, dict) and all(map(ints, v.values()))))
    for key, ok in checks.items():
        if key not in meta and key in ('tokenizer', 'vocab_size', 'dtype', 'bos_id', 'eos_id'):  # needed by every reader
            raise DataError(f"'{path}' has no '{key}' (not written by this data.py, or edited); {fix}")
        if not ok(meta.get(key)):
            raise DataError(f"'{path}' has {key} = {json.dumps(meta.get(key))[:60]}, which data.py never writes; {fix}")
    if os.path.isdir(os.path.join(data_dir, meta['tokenizer'])):  # stored relative, so the folder can be moved
        meta['tokenizer'] = os.path.join(data_dir, meta['tokenizer'])
    return meta

SCAN_TOKENS = 2**31  # token files up to this size are scanned whole for ids beyond the vocabulary when loaded

def load_prepared(data_dir):
    """(meta, tokenizer, fingerprint) of a prepared folder, once its parts are checked to agree: each .bin
    holds whole tokens, as many as meta.json says, within the tokenizer's vocabulary (scanned whole up to
    SCAN_TOKENS; larger files are checked batch by batch), and meta.json agrees with the tokenizer. The
    fingerprint {tokenizer, tokens} (the vocabulary; the token files' sizes and 64 samples of each) is
    what DDP ranks compare, and what a checkpoint records of the data it was trained on."""
    meta = load_meta(data_dir)
    tok, special = _token_table(meta['tokenizer'])
    fix = f're-prepare it: {prepare_command(meta.get("settings"), data_dir)}'
    if tok.get_vocab_size() != meta['vocab_size']:
        raise DataError(f"'{data_dir}/meta.json' says vocab_size {meta['vocab_size']} but its tokenizer has "
                        f"{tok.get_vocab_size()} tokens: the folder's parts do not belong together; {fix}")
    wrong = {k: (meta.get(k), v) for k, v in special.items() if meta.get(k) != v}
    if wrong:
        raise DataError(f"'{data_dir}/meta.json' disagrees with its tokenizer on special ids "
                        f"({', '.join(f'{k} {a} vs {b}' for k, (a, b) in wrong.items())}); {fix}")
    dtype = np.dtype(meta['dtype'])
    if dtype not in (np.uint16, np.uint32) or np.iinfo(dtype).max < meta['vocab_size'] - 1:
        raise DataError(f"'{data_dir}/meta.json' gives dtype {dtype.name}, which cannot hold a vocabulary of "
                        f"{meta['vocab_size']}; {fix}")
    h = hashlib.sha256()
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.isfile(path):
            raise DataError(f"'{path}' is missing; {fix}")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise DataError(f"'{path}' has {size:,} bytes, not a whole number of {dtype.name} tokens (truncated, "
                            f"or not written by data.py); {fix}")
        n = size // dtype.itemsize
        if n != meta.get('n_tokens', {}).get(split, n):
            raise DataError(f"'{path}' holds {n:,} tokens but meta.json says {meta['n_tokens'][split]:,} "
                            f"(truncated or replaced); {fix}")
        tokens = np.memmap(path, dtype=dtype, mode='r') if n else np.zeros(0, dtype)
        if n <= SCAN_TOKENS:
            top = max([int(tokens[a:a + 2**24].max()) for a in range(0, n, 2**24)], default=0)
            if top >= meta['vocab_size']:
                raise DataError(f"'{path}' holds token id {top}, beyond the tokenizer's {meta['vocab_size']} tokens: "
                                f"it was not made with this tokenizer; {fix}")
        h.update(f'{split} {n}'.encode())
        for a in np.linspace(0, max(n - 2**15, 0), 64).astype(np.int64):  # 64 samples of 32k tokens
            h.update(tokens[a:a + 2**15].tobytes())
    return meta, tok, dict(tokenizer=tokenizer_fingerprint(tok), tokens=h.hexdigest()[:16])

def _token_table(tok_dir):
    """A prepared folder's tokenizer as a bare `tokenizers.Tokenizer`, and its special ids read from the
    folder's config files as transformers would: quick to load, and training needs no transformers."""
    from tokenizers import Tokenizer
    path = os.path.join(tok_dir, 'tokenizer.json')
    if not os.path.isfile(path):
        raise DataError(f"'{tok_dir}' holds no tokenizer.json: re-prepare the data")
    tok, names = Tokenizer.from_file(path), {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # transformers 4 wrote both, 5 the second
        if os.path.isfile(os.path.join(tok_dir, name)):
            with open(os.path.join(tok_dir, name)) as f:
                for key, value in json.load(f).items():
                    if key.endswith('_token') and value:
                        names.setdefault(key[:-len('_token')], value['content'] if isinstance(value, dict) else value)
    ids = {k: tok.token_to_id(v) for k, v in names.items()}
    pick = lambda a, b: ids.get(a) if ids.get(a) is not None else ids.get(b)  # <s>/</s>, or [CLS]/[SEP] (BERT)
    return tok, dict(bos_id=pick('bos', 'cls'), eos_id=pick('eos', 'sep'), pad_id=ids.get('pad'), unk_id=ids.get('unk'),
                     mask_id=ids.get('mask'))

def tokenizer_fingerprint(tok):
    """A short hash of the token <-> id table: equal for the same vocabulary, wherever it was loaded from."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]

# -----------------------------------------------------------------------------
# batches of packed blocks

def _batch(bos, blocks, device):
    x = np.empty((blocks.shape[0], blocks.shape[1] + 1), dtype=np.int64)
    x[:, 0] = bos
    x[:, 1:] = blocks
    x = torch.from_numpy(x)
    if torch.device(device).type == 'cuda':  # from pinned memory the copy runs asynchronously
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)

class Batches:
    """Random packed blocks of a prepared split: a row is <s> + block_size-1 consecutive stream tokens.
    Epoch e visits the grid of n_blocks slots in a seeded permutation (a Feistel bijection: no table in
    memory), the grid shifted by a seeded offset in [0, block_size-1) so blocks differ between epochs.
    The i-th next() on rank r of world_size W takes batch i*W + r of that sequence: ranks never share a
    block within an epoch. The state is the number of blocks of the sequence consumed by all ranks, the
    same on every rank: resuming is exact, and resuming with another batch size or number of processes
    continues at exactly the next block of the sequence."""

    def __init__(self, data_dir, split, batch_size, block_size, seed=1337, rank=0, world_size=1, device='cpu'):
        assert split in ('train', 'val') and 0 <= rank < world_size and block_size >= 2
        meta = load_meta(data_dir)
        self.path, self.dtype, self.bos = os.path.join(data_dir, f'{split}.bin'), np.dtype(meta['dtype']), meta['bos_id']
        self.vocab_size = meta['vocab_size']
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        n, L = os.path.getsize(self.path) // self.dtype.itemsize, block_size - 1
        self.n_blocks = (n - L + 1) // L  # so the grid fits whatever the epoch's shift
        if self.n_blocks < 1:
            # a block takes L = block_size-1 stream tokens (after its <s>) from a grid shifted by up to L-1 per epoch
            raise DataError(f"{self.path} has {n:,} tokens; block_size {block_size} needs at least {2 * L - 1:,} "
                            f"({L:,} per block, plus up to {L - 1:,} for the random shift of each epoch's grid): " +
                            (f"use block_size <= {(n + 1) // 2 + 1:,} or " if n else '') + "prepare more data" +
                            (" (or a larger val_frac)" if split == 'val' else ''))
        self.offset, self.i = 0, 0  # blocks consumed before the last load_state_dict, batches since

    def starts(self, i):
        """Stream offsets of the blocks of this rank's i-th batch."""
        L = self.block_size - 1
        p = self.offset + (i * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size)
        epoch, j = p // self.n_blocks, p % self.n_blocks
        starts = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epoch):  # usually one; two when the batch straddles an epoch's end
            shift = int(_uniform(e, self.seed, 1)[0] * L)
            starts[epoch == e] = shift + L * _permute(j[epoch == e], self.n_blocks, self.seed, int(e))
        return starts

    def next(self):
        starts = self.starts(self.i)
        self.i += 1
        # a fresh memmap per batch: a long-lived one keeps every page it touched (as nanoGPT notes)
        data = np.memmap(self.path, dtype=self.dtype, mode='r')
        blocks = data[starts[:, None] + np.arange(self.block_size - 1)]
        if blocks.max() >= self.vocab_size:  # files too large to scan when loaded are checked here
            raise DataError(f"'{self.path}' holds token id {blocks.max()}, beyond the vocabulary of {self.vocab_size}: "
                            f"it was not made with this tokenizer; re-prepare it")
        return _batch(self.bos, blocks, self.device)

    def state_dict(self):
        return dict(blocks=self.offset + self.i * self.world_size * self.batch_size)

    def load_state_dict(self, d):
        d = d[0] if isinstance(d, list) else d  # every rank's state is the same
        self.offset = d['blocks'] if 'blocks' in d else d['i'] * d['batch_size'] * d['world_size']  # older files
        self.i = 0

def eval_blocks(data_dir, split, n_blocks, block_size, seed=0):
    """A fixed random set of n_blocks blocks [n_blocks, block_size] (the same on every call), on the CPU."""
    return Batches(data_dir, split, n_blocks, block_size, seed=seed).next()

def longest_document_run(blocks, eos_id):
    """Per block of [n, T] (<s> + packed text, a tensor): the most consecutive tokens of one document it holds.
    At a longer context this says whether long documents are really seen whole (doc_mask keeps them apart)."""
    text = blocks[:, 1:]
    is_eos = text == eos_id
    segment = is_eos.long().cumsum(1)  # (n, T-1): which document of the block each token belongs to
    counts = torch.zeros(text.size(0), text.size(1) + 1, dtype=torch.long).scatter_add_(1, segment, (~is_eos).long())
    return counts.max(1).values


def probe_pairs(rows, bos_id, eos_id, pad_id, n_pairs, max_len=128, min_len=16):
    """The embedding probe's inputs. rows: token sequences whose documents end with </s> (a prefix of
    val.bin, or validation blocks without their <s>); the text between two </s> is a document (or, at a
    row's edge, a piece of one). The first n_pairs of at least 2*min_len tokens each give a pair, their
    first and second half, each cut to max_len tokens. Returns (ids, attention_mask), both [2, n, L]:
    <s> half </s>, padded with pad_id. Built once at start (a loop over documents, not per step)."""
    pairs = []
    for row in rows:
        row = np.asarray(row)
        cuts = np.concatenate([[-1], np.flatnonzero(row == eos_id), [len(row)]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b - a - 1 >= 2 * min_len and len(pairs) < n_pairs:
                piece = row[a + 1:b].tolist()
                pairs.append((piece[:len(piece) // 2][:max_len], piece[len(piece) // 2:][:max_len]))
    L = max((len(x) for pair in pairs for x in pair), default=0) + 2
    ids = torch.full((2, len(pairs), L), pad_id, dtype=torch.long)
    for i, pair in enumerate(pairs):
        for side, half in enumerate(pair):
            ids[side, i, :len(half) + 2] = torch.tensor([bos_id, *half, eos_id])
    return ids, (ids != pad_id).long()

def val_prefix(data_dir, n_tokens=2**21):
    """The first n_tokens of a prepared folder's val.bin (whole documents, for the embedding probe)."""
    meta = load_meta(data_dir)
    return np.memmap(os.path.join(data_dir, 'val.bin'), dtype=np.dtype(meta['dtype']), mode='r')[:n_tokens]

class StreamingBatches:
    """Packed blocks tokenized on the fly, for a hub or local dataset too big to prepare.
    Rank r of W reads documents r, r+W, r+2W, ... of the stream, in windows of about buffer_blocks blocks
    (the end is checked every 64*W documents, so it depends only on where the window starts). A window is
    packed, its partial last block dropped, and its blocks shuffled by a seed from (seed, rank, epoch, first
    document). The state is (epoch, first document of the window, blocks taken from it); it differs between
    ranks, so save every rank's (load_state_dict takes the list), and resume with the same world_size.
    The first held_out documents (stream_val_blocks' validation set) are never read. Rows whose text is
    null or not a string are skipped and counted (n_skipped). self.meta holds the special ids and
    vocab_size, as load_meta does for prepared data."""

    def __init__(self, dataset, tokenizer, batch_size, block_size, seed=1337, rank=0, world_size=1, device='cpu',
                 text_field='text', buffer_blocks=1000, held_out=0, txt_split='paragraph', held_texts=()):
        assert 0 <= rank < world_size and block_size >= 2
        if tokenizer == 'train':
            raise DataError("streaming needs an existing tokenizer: train one with data.py --tokenizer=train on a "
                            "sample and pass its tokenizer/ folder, or use microsoft/mpnet-base")
        self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.meta = dict(dataset=dataset, tokenizer=tokenizer if isinstance(tokenizer, str) else self.tok.name_or_path,
                         vocab_size=len(self.tok), **_special_ids(self.tok))
        self.encoder = _encoder(self.tok)
        self.ds, self.field, _ = _source(dataset, text_field, streaming=True, txt_split=txt_split)
        self.dataset, self.batch_size, self.block_size, self.seed = dataset, batch_size, block_size, seed
        self.rank, self.world_size, self.device, self.buffer_blocks = rank, world_size, device, buffer_blocks
        self.held_out, self.n_skipped, self.n_held_copies = held_out, 0, 0
        self.held_texts = np.array(sorted(held_texts), np.uint64)  # digests of the held-out texts: their copies are skipped
        self.load_state_dict(dict(epoch=0, doc=held_out, pos=0, world_size=world_size, held_out=held_out))

    def _read_window(self):
        L, W = self.block_size - 1, self.world_size
        if self._it is None:
            self._it, self._next_doc = iter(self.ds), 0
        for _ in range(self.doc - self._next_doc):  # resuming: skip to the window's first document
            next(self._it)
        self._next_doc = self.doc
        parts, n, ended = [], 0, False
        while n < self.buffer_blocks * L and not ended:
            texts = []
            for _ in range(64 * W):
                example = next(self._it, None)
                if example is None:
                    ended = True
                    break
                if self._next_doc % W == self.rank:
                    text = _text_of(example, self.field, self.dataset)
                    self.n_skipped += not isinstance(text, str)
                    texts.append(text if isinstance(text, str) else '')
                self._next_doc += 1
            if len(self.held_texts) and texts:  # a copy of a held-out document later in the stream is never trained on
                copy = np.isin(text_digests(texts), self.held_texts)  # (held_texts holds no empty text)
                self.n_held_copies += int(copy.sum())
                texts = [t for t, c in zip(texts, copy) if not c]
            for e in self.encoder.encode_batch_fast(texts, add_special_tokens=False):
                if e.ids:
                    parts.append(np.array(e.ids + [self.meta['eos_id']], dtype=np.int64))
                    n += len(parts[-1])
        nb = n // L
        if nb == 0 and ended and self.doc == self.held_out:
            raise DataError(f"dataset '{self.dataset}' has fewer than {L + 1} tokens for rank {self.rank} of {W}")
        stream = np.concatenate(parts)[:nb * L] if parts else np.zeros(0, dtype=np.int64)
        order = np.random.default_rng([self.seed, self.rank, self.epoch, self.doc]).permutation(nb)
        self._blocks, self._ended = stream.reshape(nb, L)[order], ended

    def next(self):
        rows = []
        while sum(map(len, rows)) < self.batch_size:
            if self._blocks is None:
                self._read_window()
            rows.append(self._blocks[self.pos:self.pos + self.batch_size - sum(map(len, rows))])
            self.pos += len(rows[-1])
            if self.pos == len(self._blocks):  # window used up: the next starts where this one stopped reading
                self.epoch, self.doc = (self.epoch + 1, self.held_out) if self._ended else (self.epoch, self._next_doc)
                self.pos, self._blocks = 0, None
                self._it = None if self._ended else self._it
        return _batch(self.meta['bos_id'], np.concatenate(rows), self.device)

    def state_dict(self):
        return dict(epoch=self.epoch, doc=self.doc, pos=self.pos, world_size=self.world_size, held_out=self.held_out)

    def load_state_dict(self, d):
        n = len(d) if isinstance(d, list) else d['world_size']
        if n != self.world_size:
            raise DataError(f"a streaming run reads documents by rank and this one was saved by {n} processes: "
                            f"resume it with the same number of processes ({self.world_size} now)")
        d = d[self.rank] if isinstance(d, list) else d
        if d.get('held_out', 0) != self.held_out:
            raise DataError(f"this streaming run held out its first {d.get('held_out', 0)} documents for validation, "
                            f"now {self.held_out}: resume with the same eval_iters, batch_size and block_size")
        self.epoch, self.doc, self.pos = d['epoch'], d['doc'], d['pos']
        self._it, self._blocks = None, None

def _text_of(example, field, dataset):
    if field not in example:
        raise DataError(f"dataset '{dataset}' has no column '{field}' (columns: {', '.join(example)}): "
                        f"pass --text_field=NAME")
    return example[field]

def stream_val_blocks(dataset, tokenizer, n_blocks, block_size, text_field='text', txt_split='paragraph'):
    """The validation set of a streaming run without a prepared data_dir: the first documents of the
    stream, packed in order into n_blocks fixed blocks (<s> + block_size-1 tokens), on the CPU.
    Returns (blocks, n_docs, digests of their texts); StreamingBatches(held_out=n_docs, held_texts=digests) never
    trains on those documents, nor on a copy of one later in the stream."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    encoder, ids = _encoder(tok), _special_ids(tok)
    ds, field, _ = _source(dataset, text_field, streaming=True, txt_split=txt_split)
    need, parts, n, n_docs, held = n_blocks * (block_size - 1), [], 0, 0, set()
    for example in ds:
        n_docs += 1
        text = _text_of(example, field, dataset)
        if isinstance(text, str) and text:
            held.add(int(text_digests([text])[0]))
        doc = encoder.encode(text, add_special_tokens=False).ids if isinstance(text, str) else []
        if doc:
            parts.append(np.array(doc + [ids['eos_id']], dtype=np.int64))
            n += len(parts[-1])
        if n >= need:
            return _batch(ids['bos_id'], np.concatenate(parts)[:need].reshape(n_blocks, block_size - 1), 'cpu'), n_docs, held
    raise DataError(f"dataset '{dataset}' has {n:,} tokens, too few to hold out {n_blocks} validation blocks of "
                    f"{block_size} and still train: lower eval_iters, or pass a prepared --data_dir for validation")

def training_data(c, rank, world_size, device, barrier=lambda: None):
    """train.py's data, from its config c: the training batches and the validation blocks of a prepared
    folder (prepared here first if data_dir is empty: by rank 0, the others wait at barrier()) or of a stream.
    Returns (run, error), one of them None, so that under torchrun every rank reaches the barrier and then
    learns whether any rank failed. run: train, val_tokens, val_said, tok, meta, fingerprint and data_dir."""
    data_dir, n_val = os.path.expandvars(os.path.expanduser(c['data_dir'])), c['eval_iters'] * c['batch_size']
    block_size, run, error = c['block_size'], None, None
    try:
        if c['streaming']:
            if data_dir:  # validation from a prepared folder of the same tokenizer; the stream is trained on whole
                val_meta, _, _ = load_prepared(data_dir)
                val_tokens, held_out, held_texts = eval_blocks(data_dir, 'val', n_val, block_size), 0, ()
                val_said = f'validation: {data_dir}/val.bin; the stream is trained on whole'
            else:  # the first documents of the stream, never trained on
                val_tokens, held_out, held_texts = stream_val_blocks(c['dataset'], c['tokenizer'], n_val, block_size,
                                                                     text_field=c['text_field'], txt_split=c['txt_split'])
                val_said = (f'validation: the first {held_out:,} documents of the stream, held out of training (and any '
                            f'copy of one later in the stream)')
            train = StreamingBatches(c['dataset'], c['tokenizer'], c['batch_size'], block_size, c['seed'], rank,
                                     world_size, device, text_field=c['text_field'], held_out=held_out,
                                     txt_split=c['txt_split'], held_texts=held_texts)
            if data_dir and val_meta['vocab_size'] != train.meta['vocab_size']:
                raise DataError(f"data_dir '{data_dir}' was prepared with a tokenizer of {val_meta['vocab_size']} tokens, "
                                f"the stream's has {train.meta['vocab_size']}: prepare it with --tokenizer={c['tokenizer']}")
            run = SimpleNamespace(train=train, val_tokens=val_tokens, val_said=val_said, tok=train.tok, meta=train.meta,
                                  data_dir=data_dir, fingerprint=dict(tokenizer=tokenizer_fingerprint(train.tok),
                                                                      tokens=f"stream of {c['dataset']}"))
        elif not data_dir:
            data_dir = default_out_dir(c['dataset'], c['tokenizer'], c['vocab_size'])
            if rank == 0:
                prepare(c['dataset'], c['tokenizer'], c['vocab_size'], out_dir=data_dir, val_frac=c['val_frac'],
                        text_field=c['text_field'], txt_split=c['txt_split'])
    except DataError as e:
        error = str(e)
    barrier()
    if not c['streaming'] and error is None:
        try:
            meta, tok, fingerprint = load_prepared(data_dir)  # checked: sizes, ids within the vocabulary, meta
            run = SimpleNamespace(train=Batches(data_dir, 'train', c['batch_size'], block_size, c['seed'], rank,
                                                world_size, device),
                                  val_tokens=eval_blocks(data_dir, 'val', n_val, block_size),
                                  val_said=f'validation: {data_dir}/val.bin', tok=tok, meta=meta,
                                  fingerprint=fingerprint, data_dir=data_dir)
        except DataError as e:
            error = str(e)
    return (None, error) if error else (run, None)


# =============================================================================
# II. Preparation, once: interruption, text sources, tokenizers, the shards and their provenance (prepare).
#     Training never runs it, but to prepare a folder it lacks (training_data) or to read a stream.
# =============================================================================

# -----------------------------------------------------------------------------
# Ctrl-C: Python runs signal handlers only in the main thread, between bytecodes; a long Rust call there
# (the vocabulary trainer) would hold a Ctrl-C until it returns. So long Rust calls run in a worker thread
# while the main thread waits in short timeouts, and SIGTERM (which would end the process without any
# cleanup) raises KeyboardInterrupt too, so that the staging folder is removed either way.

@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block (once: a second signal during the
    cleanup that follows is ignored); yields a list that receives the signal's number. prepare() runs
    in it; train.py needs nothing more. Outside the main thread, or where SIGINT is ignored (nohup),
    the handlers are left as they are."""
    got = []
    def handler(signum, frame):
        if not got:
            got.append(signum)
            raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)

def _in_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon worker thread, the main thread waiting in short timeouts so that a
    signal is answered at once. On an interrupt the worker is abandoned (it ends with the process)."""
    out = {}
    def work():
        try:
            out['value'] = fn(*args, **kwargs)
        except BaseException as e:
            out['error'] = e
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if 'error' in out:
        raise out['error']
    return out['value']

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process: alive
        return True
    return True

def _remove_stale_staging(out_dir):
    """Remove out_dir.partial-PID folders whose process is gone on this host (a kill -9 or a power loss
    during prepare); a staging folder records its host, so one of a live process elsewhere is kept."""
    for folder in glob.glob(glob.escape(out_dir.rstrip(os.sep)) + '.partial-*'):
        pid = folder.rsplit('.partial-', 1)[1]
        if not (pid.isdigit() and os.path.isdir(folder)) or pid_alive(int(pid)):
            continue
        try:
            with open(os.path.join(folder, '.host')) as f:
                host = f.read().strip()
        except OSError:
            host = None
        if host in (None, socket.gethostname()):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder}: the unfinished preparation of process {pid}, which is gone")

# -----------------------------------------------------------------------------
# text sources

def build_pydocs(path=None):
    """The built-in corpus: pydoc's topic pages and the docstrings of the standard library's modules,
    classes and functions, deduplicated, one document each. Written once to DATA_ROOT/pydocs.jsonl."""
    from pydoc_data.topics import topics
    path = path or os.path.join(DATA_ROOT, 'pydocs.jsonl')
    if not os.path.exists(path):
        # importing these opens windows or a browser, prints, or needs tkinter; tests are not documentation
        skip = {'antigravity', 'this', 'idlelib', 'tkinter', 'turtle', 'turtledemo', 'test', 'lib2to3', 'ensurepip'}
        names = sorted(n for n in sys.stdlib_module_names if n not in skip and not n.startswith('_'))
        texts = [topics[t] for t in sorted(topics)] + [doc for _, _, doc in stdlib_docstrings(names)]
        texts = (clean_docstring(t) for t in texts)
        # deduplicated, first occurrence kept; drops the one-liners ("Return self==value.") that repeat everywhere
        docs = list(dict.fromkeys(t for t in texts if len(t) >= 20))
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(f'{path}.tmp-{os.getpid()}', 'w', encoding='utf-8') as f:  # two builders never share it
            f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
        os.replace(f'{path}.tmp-{os.getpid()}', path)
    return path

def clean_docstring(doc):
    import inspect
    return inspect.cleandoc(doc) if isinstance(doc, str) else ''

def stdlib_docstrings(packages):
    """(package, owner, docstring) of each module of these standard-library packages (submodules included,
    tests and private ones not), and of the classes, functions and methods each defines (not what it imports).
    The owner is the module for the module and its functions, 'module.Class' for a class and its methods:
    finetune.py's built-in task keeps an owner on one side of its split. Also the walk of the pydocs corpus."""
    import contextlib, importlib, inspect, io, pkgutil, warnings
    def modules(package):
        try:
            yield importlib.import_module(package)
        except (Exception, SystemExit):  # another platform's module (winreg, msvcrt), a missing library
            return
        for info in pkgutil.walk_packages(getattr(sys.modules[package], '__path__', []), package + '.', onerror=lambda _: None):
            last = info.name.rsplit('.', 1)[-1]  # '__main__' submodules run a program when imported
            if not (last.startswith('_') or last.startswith('test') or '.test' in info.name):
                try:
                    yield importlib.import_module(info.name)
                except (Exception, SystemExit):
                    pass
    # some modules print or warn (asyncore, typing.io are deprecated) when imported or inspected
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter('ignore')
        for package in packages:
            for mod in modules(package):
                yield package, mod.__name__, mod.__doc__
                for name, obj in sorted(vars(mod).items()):
                    if name.startswith('__') or getattr(obj, '__module__', None) != mod.__name__:
                        continue
                    owner = f'{mod.__name__}.{name}' if inspect.isclass(obj) else mod.__name__
                    if inspect.isclass(obj) or inspect.isroutine(obj):
                        yield package, owner, obj.__doc__
                    if inspect.isclass(obj):
                        yield from ((package, owner, a.__doc__) for a in vars(obj).values()
                                    if inspect.isroutine(a) or isinstance(a, property))

def _looks_local(dataset):
    """Whether dataset names a local source ('pydocs', or a path) rather than a hub dataset."""
    path = os.path.expanduser(dataset)
    return (dataset == 'pydocs' or os.path.exists(path) or path.startswith(('/', '.', '~'))
            or os.path.splitext(path)[1] in EXTENSIONS)

def _files(dataset, build=True):
    """-> (datasets builder, files) for 'pydocs' or a local path, None for a hub name; DataError for a bad
    path or a file that cannot be read. build=False: 'pydocs' gives its path even before it is built."""
    if dataset == 'pydocs':
        return 'json', [build_pydocs() if build else os.path.join(DATA_ROOT, 'pydocs.jsonl')]
    path = os.path.expanduser(dataset)
    if not os.path.lexists(path):
        if _looks_local(dataset):
            raise DataError(f"dataset path '{dataset}' does not exist")
        return None
    found = [path] if not os.path.isdir(path) else sorted(glob.glob(os.path.join(glob.escape(path), '**', '*'), recursive=True))
    files = [f for f in found if os.path.splitext(f)[1] in EXTENSIONS and not os.path.isdir(f)]
    for f in files:  # every file is checked here, where it is found: the reader's errors name neither file nor fix
        if not os.path.exists(f):
            raise DataError(f"dataset file '{f}' is a broken link (to '{os.readlink(f)}'): fix or remove it")
        if not os.path.isfile(f):
            raise DataError(f"dataset file '{f}' is not a regular file: remove it from '{dataset}'")
        try:
            with open(f, 'rb') as fh:
                head, size = fh.read(4), os.fstat(fh.fileno()).st_size
                fh.seek(max(size - 4, 0))
                tail = fh.read(4)
        except OSError as e:
            raise DataError(f"cannot read dataset file '{f}' ({e.strerror or _line(e)}): fix its permissions, or remove it") from None
        if f.endswith('.parquet') and not (head == tail == b'PAR1' and size >= 8):
            raise DataError(f"dataset file '{f}' is not a parquet file ({'empty' if not head else 'no PAR1 magic bytes'}, "
                            f"truncated or misnamed): re-create or remove it")
    kinds = {EXTENSIONS[os.path.splitext(f)[1]] for f in files}
    if not files:
        raise DataError(f"unsupported file type '{dataset}': use .txt, .jsonl or .parquet" if os.path.isfile(path) else
                        f"dataset path '{dataset}' is empty: no .txt, .jsonl or .parquet files found")
    if len(kinds) > 1:
        raise DataError(f"dataset folder '{dataset}' mixes file types ({', '.join(sorted(kinds))}): keep one kind per folder")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"dataset '{dataset}' has no documents: its files are empty")
    return kinds.pop(), files

def _bad_json_line(path):
    """(line number, what is wrong) of the first line of a JSON-lines file that is not a JSON object, or
    None. Run only after the reader failed: it names the file and line, which the reader's error does not."""
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode('utf-8').strip())
            except UnicodeDecodeError:
                why = 'not UTF-8'
            except ValueError as e:
                why = f'not valid JSON ({e})'
            else:
                if isinstance(row, dict):
                    continue
                why = f'a JSON {type(row).__name__}, not an object'
            if path.endswith('.json'):  # a .json file may also be one JSON array of objects
                try:
                    with open(path, encoding='utf-8') as g:
                        whole = json.load(g)
                    if isinstance(whole, list) and all(isinstance(r, dict) for r in whole):
                        return None
                except ValueError:
                    pass
            return n, why
    return None

def _read_error(dataset, kind, files, e):
    """The DataError for a failed read of local files: the file and line at fault where they can be found."""
    for f in files if kind == 'json' else []:
        bad = _bad_json_line(f)
        if bad:
            return DataError(f"'{f}' line {bad[0]} is {bad[1][:200]}: fix or remove that line")
    return DataError(f"cannot read '{dataset}': {_line(_root_cause(e))}")

class _Rows:
    """A streaming dataset whose read errors become the one-line DataError of _read_error."""
    def __init__(self, ds, error):
        self.ds, self.error, self.column_names = ds, error, ds.column_names
    def __iter__(self):
        try:
            yield from self.ds
        except DataError:
            raise
        except Exception as e:
            raise self.error(e) from None

def _import_datasets(dataset):
    """The datasets package, or one line saying how to do without it (GPU machines often lack it)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading '{dataset}' needs the datasets package, which is not installed here: prepare "
                        f"the data where it is (python data.py --dataset={dataset} ... --out_dir=DIR), copy DIR "
                        f"here and pass --data_dir=DIR (or pip install datasets)") from None
    return datasets

def _source(dataset, text_field='text', streaming=False, txt_split='paragraph'):
    """-> (datasets.Dataset or IterableDataset, name of its text column, whether it was read from .txt)."""
    if txt_split not in TXT_SPLITS:
        raise DataError(f"txt_split '{txt_split}' is not one of {', '.join(TXT_SPLITS)}")
    datasets = _import_datasets(dataset)
    local = _files(dataset)
    if local:
        kind, files = local
        text_field = 'text' if kind == 'text' or dataset == 'pydocs' else text_field
        # .txt: one document per line, blank-line separated paragraph or file; bad bytes become U+FFFD, not a crash
        kw = dict(sample_by=TXT_SPLITS[txt_split], encoding_errors='replace') if kind == 'text' else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, split='train', streaming=streaming, **kw)
        except Exception as e:
            raise _read_error(dataset, kind, files, e) from None
        if streaming:  # read errors surface while iterating
            ds = _Rows(ds, lambda e: _read_error(dataset, kind, files, e))
    else:  # a hub dataset, 'name' or 'name:config'
        kind, (name, _, config) = None, dataset.partition(':')
        try:
            ds = datasets.load_dataset(name, config or None, split='train', streaming=streaming)
        except Exception as e:
            raise DataError(f"dataset '{dataset}' is not a local path and could not be loaded from the "
                            f"HuggingFace hub (offline?): {_line(e)}") from None
    if ds.column_names is not None and text_field not in ds.column_names:  # streaming json: checked when read
        raise DataError(f"dataset '{dataset}' has no column '{text_field}' (columns: {', '.join(ds.column_names)}): "
                        f"pass --text_field=NAME")
    return ds, text_field, kind == 'text'

def read_texts(dataset, text_field='text', txt_split='paragraph'):
    """(texts, skipped) of a local or hub source read whole, as prepare reads it (_source: .txt split by txt_split,
    CRLF or LF alike; .jsonl/.parquet by text_field), for the scripts that need the texts themselves (contrastive.py,
    finetune.py's documents). Rows whose text is null, not a string or blank are skipped and counted, bytes of a .txt
    file that are not UTF-8 replaced and said (as prepare does); a read error is
    the one-line DataError naming file and line (bytes that are not UTF-8 in a JSON string surface only here)."""
    ds, field, is_txt = _source(dataset, text_field, txt_split=txt_split)
    try:
        column = ds[field]
        column = column if isinstance(column, list) else list(column)
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise _read_error(dataset, *(_files(dataset) or (None, [])), e) from None
    texts = [t for t in column if isinstance(t, str) and t.strip()]
    n_bad = sum(t.count('\ufffd') for t in texts) if is_txt else 0
    if n_bad:  # as prepare says it
        print(f"warning: {n_bad:,} undecodable byte sequences in the .txt files of '{dataset}' were replaced by U+FFFD")
    return texts, len(column) - len(texts)

# -----------------------------------------------------------------------------
# tokenizers

def load_tokenizer(name_or_dir):
    """A HuggingFace fast tokenizer by hub name or saved folder; MPNet needs its mask token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:
        raise DataError(f"cannot load tokenizer '{name_or_dir}' (not a saved tokenizer folder, and the hub "
                        f"is unreachable or has no such tokenizer): {_line(e)}") from None
    if not getattr(tok, 'is_fast', False):
        raise DataError(f"tokenizer '{name_or_dir}' has no fast (Rust) backend: use one that has a tokenizer.json")
    if tok.mask_token_id is None:
        raise DataError(f"tokenizer '{name_or_dir}' has no mask token, which MPNet needs: "
                        f"use --tokenizer=train or a tokenizer that has one (e.g. microsoft/mpnet-base)")
    return tok

def _special_ids(tok):
    # BERT-style vocabularies have [CLS]/[SEP] where MPNet has <s>/</s>; they play the same role here
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if bos is None or eos is None:
        raise DataError(f"tokenizer '{tok.name_or_path}' has no bos/cls or eos/sep token to start blocks and end documents")
    return dict(bos_id=bos, eos_id=eos, pad_id=tok.pad_token_id, unk_id=tok.unk_token_id, mask_id=tok.mask_token_id)

def _encoder(tok):
    """The tokenizer's Rust backend without truncation or padding: documents are encoded whole
    (with encode_batch_fast, which skips the character offsets we never use)."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend

# a word longer than this is <unk> for WordPiece (BERT's max_input_chars_per_word); the vocabulary trainer's
# time grows with the square of a word's length, so such words are left out of vocabulary training.
# Letters and digits, not CJK ideographs (BERT splits those into single characters)
LONG_WORD = re.compile(r'[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]{101,}')

def prepare_command(settings, out_dir):
    """The data.py command that prepares out_dir again with the recorded settings, replacing it."""
    s = settings or {}
    return ' '.join(['python data.py', f"--dataset={s.get('dataset', '...')}", f"--tokenizer={s.get('tokenizer', '...')}"] +
                    [f'--{k}={s[k]}' for k in ('vocab_size', 'val_frac', 'text_field', 'seed', 'txt_split')
                     if s.get(k) is not None] +
                    [f'--out_dir={out_dir}', '--overwrite'])

def train_tokenizer(texts, vocab_size):
    """A lowercase WordPiece vocab (BERT's recipe) from an iterator of texts (or of lists of texts), in
    MPNet's special-token layout <s>=0 <pad>=1 </s>=2 <unk>=3, then <mask>=4 (mpnet-base has it last), then
    the learned pieces, continuations marked '##'. A small corpus can give fewer than vocab_size tokens;
    a vocab_size below the special tokens plus the corpus' characters is refused (DataError).
    Words over 100 characters (LONG_WORD) are left out: they encode as <unk> anyway, and would cost time.
    Not bit-reproducible: the `tokenizers` trainer breaks ties in hash-map order (tokenizers#1794)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token='<unk>', continuing_subword_prefix='##'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    capped = ([LONG_WORD.sub(' ', t) for t in x] if isinstance(x, list) else LONG_WORD.sub(' ', x) for x in texts)
    # in a worker thread: the trainer holds the thread it runs in for as long as it learns (see interruptible)
    _in_thread(tok.train_from_iterator, capped, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'], min_frequency=2,
        limit_alphabet=1000, continuing_subword_prefix='##'))
    if tok.get_vocab_size() > vocab_size:  # the trainer keeps every special token and alphabet character, whatever vocab_size says
        raise DataError(f"vocab_size {vocab_size} is too small for this corpus: its 5 special tokens and the characters "
                        f"it uses (up to 1000) already make {tok.get_vocab_size()} tokens; use --vocab_size="
                        f"{tok.get_vocab_size()} or more")
    # what tokenizer(text) adds, as HF's MPNet tokenizer does; data.py itself encodes without special tokens
    tok.post_processor = processors.TemplateProcessing(single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>',
                                                       special_tokens=[('<s>', 0), ('</s>', 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
                                   unk_token='<unk>', mask_token='<mask>', cls_token='<s>', sep_token='</s>')

# -----------------------------------------------------------------------------
# prepare: tokenize once into train.bin / val.bin

def _slug(name):  # 'HuggingFaceFW/fineweb-edu' -> 'fineweb-edu'; 'data/x/tokenizer' -> 'x'
    parts = name.rstrip('/').split('/')
    name = parts[-2] if parts[-1] == 'tokenizer' and len(parts) > 1 else parts[-1]
    return ''.join(c if c.isalnum() or c in '._-' else '_' for c in name)

def default_out_dir(dataset, tokenizer, vocab_size):
    """Where prepare() writes unless told: e.g. data/pydocs-train8192, data/fineweb-edu_sample-10BT-mpnet-base."""
    return os.path.join(DATA_ROOT, f"{_slug(dataset)}-{f'train{vocab_size}' if tokenizer == 'train' else _slug(tokenizer)}")

def _source_record(dataset, local):
    """What prepared data is made from, so that a change is noticed: each local file's path, size and
    modification time, or the hub dataset's name and revision (None where the hub cannot be asked)."""
    if local:
        root = os.path.expanduser(dataset) if os.path.isdir(os.path.expanduser(dataset)) else None
        return dict(files=[[os.path.relpath(f, root) if root else os.path.basename(f), os.path.getsize(f),
                            os.stat(f).st_mtime_ns] for f in local[1]])
    name, _, config = dataset.partition(':')
    try:
        from huggingface_hub import HfApi
        revision = HfApi().dataset_info(name, timeout=10).sha  # a machine without network waits no longer
    except Exception:  # offline, private, or no such dataset: the load itself will say which
        revision = None
    return dict(hub=name, config=config or None, revision=revision)

def _source_changes(old, new):
    """What differs between two source records, as short phrases ([] if nothing, or if either is unknown)."""
    if not old or not new:
        return []
    if 'files' in old and 'files' in new:
        try:
            a, b = ({f: (size, mtime) for f, size, mtime in r['files']} for r in (old, new))
        except (TypeError, ValueError):  # meta.json edited by hand: the source cannot be compared
            return ['its record in meta.json unreadable']
        return ([f'{f} added' for f in b if f not in a] + [f'{f} removed' for f in a if f not in b] +
                [f'{f} modified' for f in a if f in b and a[f] != b[f]])
    if old.get('revision') and new.get('revision') and old['revision'] != new['revision']:
        return [f"hub revision {old['revision'][:10]} is now {new['revision'][:10]}"]
    return []

def prepare(dataset='pydocs', tokenizer='microsoft/mpnet-base', vocab_size=30527, out_dir=None, val_frac=0.005,
            text_field='text', num_proc=None, seed=1337, overwrite=False, txt_split='paragraph'):
    """Tokenize `dataset` into out_dir (see the module docstring) and return out_dir; a no-op if done before
    with the same settings from the same source files (a changed source is refused unless overwrite).
    Finding a prepared folder needs neither the source nor the datasets package (a GPU machine may have
    neither). The folder is built under a temporary name and renamed when complete, so a failure leaves
    nothing; so does Ctrl-C or SIGTERM, answered within a second (Interrupted), and a later prepare removes
    what a killed one left. Memory stays bounded: datasets keeps the text and token ids on disk (Arrow),
    and the .bin files are appended one batch of documents at a time."""
    out_dir = out_dir or default_out_dir(dataset, tokenizer, vocab_size)
    with interruptible() as got:
        try:
            return _prepare(dataset, tokenizer, vocab_size, out_dir, val_frac, text_field, num_proc, seed, overwrite,
                            txt_split)
        except KeyboardInterrupt:
            name = signal.Signals(got[0]).name if got else 'SIGINT'
            raise Interrupted(f"interrupted by {name} while preparing '{out_dir}': nothing written; run the same "
                              f"command again to prepare it") from None

def _prepare(dataset, tokenizer, vocab_size, out_dir, val_frac, text_field, num_proc, seed, overwrite, txt_split):
    _remove_stale_staging(out_dir)
    if txt_split not in TXT_SPLITS:
        raise DataError(f"txt_split '{txt_split}' is not one of {', '.join(TXT_SPLITS)}")
    local = _looks_local(dataset)
    here = os.path.exists(os.path.join(DATA_ROOT, 'pydocs.jsonl') if dataset == 'pydocs' else os.path.expanduser(dataset))
    files = _files(dataset, build=False) if local and here else None  # fail early on a bad path or file
    kind = files[0] if files else EXTENSIONS.get(os.path.splitext(dataset)[1])
    settings = dict(dataset=os.path.abspath(os.path.expanduser(dataset)) if local and dataset != 'pydocs' else dataset,
                    tokenizer=tokenizer, vocab_size=vocab_size if tokenizer == 'train' else None,
                    text_field=text_field, val_frac=val_frac, seed=seed, txt_split=txt_split if kind == 'text' else None)
    if os.path.exists(os.path.join(out_dir, 'meta.json')) and not overwrite:
        old = load_meta(out_dir)
        # folders prepared before txt_split existed split .txt files into paragraphs
        old_settings = {'txt_split': 'paragraph' if kind == 'text' else None, **(old.get('settings') or {})}
        if local and not here and kind is None:  # a folder that is not here: its kind is unknown
            settings['txt_split'] = old_settings['txt_split']
        if not old.get('settings') or any(old_settings.get(k) != v for k, v in settings.items()):
            diff = ', '.join(f'{k}: {old_settings.get(k)!r} -> {v!r}' for k, v in settings.items()
                             if old_settings.get(k) != v) if old.get('settings') else 'unknown'
            raise DataError(f"'{out_dir}' holds data prepared with other settings ({diff}): delete it, or prepare into another folder (data.py --out_dir=DIR, then train.py --data_dir=DIR)")
        if local and not here:  # e.g. a GPU machine given only the prepared folder
            print(f"{out_dir} is already prepared with these settings (its source '{dataset}' is not here to compare)")
            return out_dir
        changes = _source_changes(old.get('source'), _source_record(dataset, files))
        if changes:
            raise DataError(f"'{out_dir}' was prepared from an earlier version of '{dataset}' "
                            f"({', '.join(changes[:3])}{', ...' if len(changes) > 3 else ''}): re-prepare it with "
                            f"{prepare_command(settings, out_dir)} (a run resumed on it then reads other blocks)")
        print(f"{out_dir} is already prepared with these settings from the same source" + (
            '' if old.get('split') == 'content' else ' (note: prepared before validation was held out by content, a '
            'text given twice may be in both splits: data.py --overwrite re-prepares it)'))
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, 'meta.json')):
        raise DataError(f"'{out_dir}' exists but is not a prepared dataset (no meta.json): delete it, or choose "
                        f"another --out_dir")  # never deleted here, even with overwrite: it may be anything
    _import_datasets(dataset)  # before building anything: one line on a machine without it
    files = _files(dataset) if local else None  # builds pydocs; a missing path is said here
    source = _source_record(dataset, files)
    staging = f'{out_dir.rstrip(os.sep)}.partial-{os.getpid()}'
    try:
        os.makedirs(staging, exist_ok=True)
        with open(os.path.join(staging, '.host'), 'w') as f:  # whose it is, for _remove_stale_staging
            f.write(socket.gethostname())
        meta = _prepare_into(staging, out_dir, dataset, tokenizer, vocab_size, val_frac, text_field, num_proc, seed,
                             txt_split)
        meta.update(settings=settings, source=source)
        with open(os.path.join(staging, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        os.remove(os.path.join(staging, '.host'))
        if os.path.exists(os.path.join(out_dir, 'meta.json')) and not overwrite:
            print(f'{out_dir} was prepared meanwhile by another process; using it')  # two runs started at once
            return out_dir
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

def _prepare_into(folder, out_dir, dataset, tokenizer, vocab_size, val_frac, text_field, num_proc, seed, txt_split):
    """prepare()'s work, written into folder (renamed to out_dir when done); returns the meta dict."""
    t0 = time.time()
    tok = None if tokenizer == 'train' else load_tokenizer(tokenizer)
    ds, field, is_txt = _source(dataset, text_field, txt_split=txt_split)
    n_docs = len(ds)
    if n_docs == 0:
        raise DataError(f"dataset '{dataset}' has no documents")
    # val is held out by document content: a doc is in val when hash(seed, its text) <= val_frac, and so is the doc with
    # the smallest hash, so val is never empty; a text given twice is in one split only (the minimum is found in a pass
    # over the texts: no array of n_docs)
    def split_keys(texts):
        return _uniform(text_digests(texts), seed)
    try:  # the minimum over documents with text: an empty row adds nothing to val
        val_cut = max(val_frac, min((split_keys(texts).min() for b in ds.select_columns([field]).iter(batch_size=4096)
                                     for texts in [[t for t in b[field] if isinstance(t, str) and t]] if texts),
                                    default=0.0))
    except (ValueError, OSError) as e:  # as for the map below
        raise _read_error(dataset, *(_files(dataset) or (None, [])), e) from None

    if tokenizer == 'train':
        def train_texts():  # train documents only, so val stays unseen; a vocab needs a sample, not everything
            n_chars = 0
            for batch in ds.select_columns([field]).iter(batch_size=1000):
                is_val = split_keys(batch[field]) <= val_cut
                texts = [t for t, v in zip(batch[field], is_val) if isinstance(t, str) and t and not v]
                yield texts
                n_chars += sum(map(len, texts))
                if n_chars > TOKENIZER_TRAIN_CHARS:
                    return
        try:
            tok = train_tokenizer(train_texts(), vocab_size)
        except (ValueError, OSError) as e:  # as for the map below
            raise _read_error(dataset, *(_files(dataset) or (None, [])), e) from None
    ids, dtype = _special_ids(tok), token_dtype(len(tok))
    tok.save_pretrained(os.path.join(folder, 'tokenizer'))

    encoder, eos = _encoder(tok), ids['eos_id']
    def tokenize(batch):
        texts = batch[field]
        out = {'ids': [np.array(e.ids + [eos] if e.ids else [], dtype=np.int32)  # an empty doc adds nothing
                       for e in encoder.encode_batch_fast([t if isinstance(t, str) else '' for t in texts],
                                                          add_special_tokens=False)],
               'val': (split_keys(texts) <= val_cut).tolist(),
               'not_text': [t is not None and not isinstance(t, str) for t in texts],  # a number, a list, ...
               'null': [t is None for t in texts]}
        if is_txt:  # undecodable byte sequences the reader replaced by U+FFFD
            out['n_bad'] = [t.count('\ufffd') for t in texts]
        return out
    if num_proc and num_proc > 1:  # forked workers must not use the Rust thread pool the parent already used
        os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    # 256 documents a batch: enough for the Rust thread pool, and bounded even when documents are books
    try:
        tokenized = ds.map(tokenize, batched=True, batch_size=256, remove_columns=ds.column_names,
                           num_proc=num_proc, desc='tokenizing', load_from_cache_file=False,
                           cache_file_name=os.path.join(folder, 'tokenized.arrow'))  # intermediate, removed below
    except (ValueError, OSError) as e:  # what the reader let through (bytes that are not UTF-8 in a JSON string)
        raise _read_error(dataset, *(_files(dataset) or (None, [])), e) from None

    import pyarrow.compute as pc
    n_tokens, n_split_docs, n_bad, n_null, n_not_text, max_id = {'train': 0, 'val': 0}, {'train': 0, 'val': 0}, 0, 0, 0, 0
    files = {s: open(os.path.join(folder, f'{s}.bin'), 'wb') for s in n_tokens}
    for table in tokenized.with_format('arrow').iter(batch_size=4096):
        lens = pc.list_value_length(table['ids']).to_numpy()
        tokens = pc.list_flatten(table['ids']).to_numpy()
        doc_val = table['val'].to_numpy()
        tok_val = np.repeat(doc_val, lens)
        for split, doc_sel, tok_sel in (('train', ~doc_val, ~tok_val), ('val', doc_val, tok_val)):
            files[split].write(tokens[tok_sel].astype(dtype).tobytes())
            n_tokens[split] += int(tok_sel.sum())
            n_split_docs[split] += int((lens[doc_sel] > 0).sum())
        max_id = max(max_id, int(tokens.max(initial=0)))
        n_null += int(pc.sum(table['null']).as_py() or 0)
        n_not_text += int(pc.sum(table['not_text']).as_py() or 0)
        n_bad += int(pc.sum(table['n_bad']).as_py()) if is_txt else 0
    del tokenized
    for f in glob.glob(os.path.join(folder, 'tokenized*.arrow')):
        os.remove(f)
    for f in files.values():
        f.close()
    if not (n_split_docs['train'] and n_split_docs['val']):
        n = n_split_docs['train'] + n_split_docs['val']
        raise DataError(f"dataset '{dataset}' has {n or 'no'} non-empty documents, {n_split_docs['val']} of them in val: "
                        f"need at least one in each split (is --text_field right? raise --val_frac?)")
    dt = time.time() - t0
    if n_bad:
        print(f"warning: {n_bad:,} undecodable byte sequences in the .txt files were replaced by U+FFFD")
    if n_null or n_not_text:
        print(f"warning: skipped {n_null + n_not_text:,} rows whose '{field}' is not text ({n_null:,} null, "
              f"{n_not_text:,} numbers, lists or other values)")
    print(f"wrote {out_dir}: train.bin {n_tokens['train']:,} tokens ({n_split_docs['train']:,} docs), "
          f"val.bin {n_tokens['val']:,} tokens ({n_split_docs['val']:,} docs), {np.dtype(dtype).name}, vocab {len(tok):,}, "
          f"meta.json, tokenizer/ in {dt:.1f}s: {sum(n_tokens.values()) / dt:,.0f} tokens/s")
    return dict(dataset=dataset, split='content', tokenizer='tokenizer', tokenizer_source=tokenizer, vocab_size=len(tok),
                dtype=np.dtype(dtype).name, **ids, n_tokens=n_tokens, n_docs=n_split_docs, max_id=max_id,
                n_undecodable=n_bad, n_skipped_rows=n_null + n_not_text)


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    from configurator import ConfigError, configure
    # the command line: prepare()'s arguments, as --key=value (python data.py --help)
    SETTINGS = [('group', 'tokenize a dataset into train.bin/val.bin for train.py'),
                ('key', 'dataset', 'pydocs', "'pydocs', a .txt/.jsonl/.parquet file or folder, or hub name[:config]"),
                ('key', 'tokenizer', 'microsoft/mpnet-base', "hub name, saved folder, or 'train'"),
                ('key', 'vocab_size', 30527, 'vocab size for --tokenizer=train'),
                ('key', 'out_dir', '', f"'': {DATA_ROOT}/<dataset>-<tokenizer>"),
                ('key', 'val_frac', 0.005, 'documents held out for validation'),
                ('key', 'text_field', 'text', 'the text column of .jsonl / .parquet / hub datasets'),
                ('key', 'num_proc', 0, 'tokenizer processes (0: one, multithreaded)'),
                ('key', 'seed', 1337, 'the validation split and the vocabulary sample'),
                ('key', 'overwrite', False, 're-prepare out_dir even if it holds prepared data'),
                ('key', 'txt_split', 'paragraph', 'a .txt document is a line, a blank-line separated paragraph, or the file')]
    try:
        args = configure({e[1]: e[2] for e in SETTINGS if e[0] == 'key'}, sys.argv[1:], dict(txt_split=tuple(TXT_SPLITS)),
                         script=__file__, settings=SETTINGS, usage='python data.py [--key=value ...]',
                         limits=dict(num_proc='>= 0'))
        prepare(**{**args, 'out_dir': args['out_dir'] or None, 'num_proc': args['num_proc'] or None})
    except Interrupted as e:
        print(e, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # at once: an abandoned worker thread (the vocabulary trainer) must not delay the exit
    except (DataError, ConfigError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
