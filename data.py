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
blank-line separated paragraph; undecodable bytes become U+FFFD and are counted. .jsonl/.parquet give one
document per row (--text_field). Anything else is a HuggingFace hub dataset. A corpus too big to prepare
is read by StreamingBatches instead, which tokenizes on the fly.

Training from prepared data needs only torch + numpy: datasets/tokenizers/transformers are imported where used.
"""
import os
import sys
import json
import glob
import time

import numpy as np
import torch

DATA_ROOT = 'data'                   # default parent folder of prepared datasets and of the pydocs corpus
TOKENIZER_TRAIN_CHARS = 300_000_000  # --tokenizer=train learns its vocab from at most this much text
EXTENSIONS = {'.txt': 'text', '.jsonl': 'json', '.json': 'json', '.parquet': 'parquet'}

class DataError(Exception):
    """A mistake the user can fix; the message is one line naming the problem and the fix."""

def _line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]

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

# -----------------------------------------------------------------------------
# text sources

def build_pydocs(path=None):
    """The built-in corpus: pydoc's topic pages and the docstrings of the standard library's modules,
    classes and functions, deduplicated, one document each. Written once to DATA_ROOT/pydocs.jsonl."""
    import io, warnings, contextlib
    path = path or os.path.join(DATA_ROOT, 'pydocs.jsonl')
    if not os.path.exists(path):
        # some modules print or warn (asyncore, typing.io are deprecated) when imported or inspected
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter('ignore')
            docs = list(dict.fromkeys(_pydocs_texts()))  # deduplicated, first occurrence kept
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path + '.tmp', 'w', encoding='utf-8') as f:
            f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
        os.replace(path + '.tmp', path)
    return path

def _pydocs_texts():
    import inspect, pkgutil, importlib
    from pydoc_data.topics import topics
    def modules():
        # importing these opens windows or a browser, prints, or needs tkinter; tests are not documentation
        skip = {'antigravity', 'this', 'idlelib', 'tkinter', 'turtle', 'turtledemo', 'test', 'lib2to3', 'ensurepip'}
        for name in sorted(n for n in sys.stdlib_module_names if n not in skip and not n.startswith('_')):
            try:
                yield importlib.import_module(name)
            except (Exception, SystemExit):  # another platform's module (winreg, msvcrt), a missing library
                continue
            for info in pkgutil.walk_packages(getattr(sys.modules[name], '__path__', []), name + '.', onerror=lambda _: None):
                last = info.name.rsplit('.', 1)[-1]  # '__main__' submodules run a program when imported
                if not (last.startswith('_') or last.startswith('test') or '.test' in info.name):
                    try:
                        yield importlib.import_module(info.name)
                    except (Exception, SystemExit):
                        pass
    def docs():
        yield from (topics[t] for t in sorted(topics))
        for mod in modules():
            yield mod.__doc__
            for name, obj in sorted(vars(mod).items()):  # only what the module defines, not what it imports
                if name.startswith('__') or getattr(obj, '__module__', None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isroutine(obj):
                    yield obj.__doc__
                if inspect.isclass(obj):
                    yield from (a.__doc__ for a in vars(obj).values() if inspect.isroutine(a) or isinstance(a, property))
    for doc in docs():
        doc = inspect.cleandoc(doc) if isinstance(doc, str) else ''
        if len(doc) >= 20:  # drops the one-liners ("Return self==value.") that repeat everywhere
            yield doc

def _files(dataset):
    """-> (datasets builder, files) for 'pydocs' or a local path, None for a hub name; DataError for a bad path."""
    if dataset == 'pydocs':
        return 'json', [build_pydocs()]
    path = os.path.expanduser(dataset)
    if not os.path.exists(path):
        if path.startswith(('/', '.', '~')) or os.path.splitext(path)[1] in EXTENSIONS:
            raise DataError(f"dataset path '{dataset}' does not exist")
        return None
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, '**', '*'), recursive=True))
    files = [f for f in files if os.path.splitext(f)[1] in EXTENSIONS]
    kinds = {EXTENSIONS[os.path.splitext(f)[1]] for f in files}
    if not files:
        raise DataError(f"unsupported file type '{dataset}': use .txt, .jsonl or .parquet" if os.path.isfile(path) else
                        f"dataset path '{dataset}' is empty: no .txt, .jsonl or .parquet files found")
    if len(kinds) > 1:
        raise DataError(f"dataset folder '{dataset}' mixes file types ({', '.join(sorted(kinds))}): keep one kind per folder")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"dataset '{dataset}' has no documents: its files are empty")
    return kinds.pop(), files

def _source(dataset, text_field='text', streaming=False):
    """-> (datasets.Dataset or IterableDataset, name of its text column, whether it was read from .txt)."""
    import datasets
    local = _files(dataset)
    if local:
        kind, files = local
        text_field = 'text' if kind == 'text' or dataset == 'pydocs' else text_field
        # .txt: one document per blank-line separated paragraph; bad bytes become U+FFFD, not a crash
        kw = dict(sample_by='paragraph', encoding_errors='replace') if kind == 'text' else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, split='train', streaming=streaming, **kw)
        except Exception as e:
            raise DataError(f"cannot read '{dataset}': {_line(e)}") from None
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

def train_tokenizer(texts, vocab_size):
    """A lowercase WordPiece vocab (BERT's recipe) from an iterator of texts (or of lists of texts), in
    MPNet's special-token layout <s>=0 <pad>=1 </s>=2 <unk>=3, then <mask>=4 (mpnet-base has it last), then
    the learned pieces, continuations marked '##'. A small corpus can give fewer than vocab_size tokens.
    Not bit-reproducible: the `tokenizers` trainer breaks ties in hash-map order (tokenizers#1794)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token='<unk>', continuing_subword_prefix='##'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'], min_frequency=2,
        limit_alphabet=1000, continuing_subword_prefix='##'))
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

def prepare(dataset='pydocs', tokenizer='microsoft/mpnet-base', vocab_size=30527, out_dir=None, val_frac=0.005,
            text_field='text', num_proc=None, seed=1337):
    """Tokenize `dataset` into out_dir (see the module docstring) and return out_dir; a no-op if done before.
    Memory stays bounded: datasets keeps the text and token ids on disk (Arrow), and the .bin files are
    appended one batch of documents at a time."""
    out_dir = out_dir or default_out_dir(dataset, tokenizer, vocab_size)
    local = dataset != 'pydocs' and os.path.exists(os.path.expanduser(dataset))
    settings = dict(dataset=os.path.abspath(os.path.expanduser(dataset)) if local else dataset, tokenizer=tokenizer,
                    vocab_size=vocab_size if tokenizer == 'train' else None, text_field=text_field, val_frac=val_frac, seed=seed)
    if os.path.exists(os.path.join(out_dir, 'meta.json')):
        old = load_meta(out_dir).get('settings') or {}
        if old == settings:
            print(f"{out_dir} is already prepared with these settings")
            return out_dir
        diff = ', '.join(f'{k}: {old.get(k)!r} -> {v!r}' for k, v in settings.items() if old.get(k) != v)
        raise DataError(f"'{out_dir}' holds data prepared with other settings ({diff}): delete it, or prepare into another folder (data.py --out_dir=DIR, then train.py --data_dir=DIR)")
    t0 = time.time()
    _files(dataset)  # fail early on a bad path or tokenizer, before a long download
    tok = None if tokenizer == 'train' else load_tokenizer(tokenizer)
    ds, field, is_txt = _source(dataset, text_field)
    n_docs = len(ds)
    if n_docs == 0:
        raise DataError(f"dataset '{dataset}' has no documents")
    # val is held out by document: doc i is in val when hash(seed, i) < val_frac, and so is the doc with the
    # smallest hash, so val is never empty (the minimum is found in chunks: no array of n_docs)
    h_min = min(_uniform(np.arange(a, min(a + 2**20, n_docs)), seed).min() for a in range(0, n_docs, 2**20))
    val_cut = max(val_frac, h_min)

    if tokenizer == 'train':
        def train_texts():  # train documents only, so val stays unseen; a vocab needs a sample, not everything
            n_chars = 0
            for a, batch in zip(range(0, n_docs, 1000), ds.select_columns([field]).iter(batch_size=1000)):
                is_val = _uniform(np.arange(a, a + len(batch[field])), seed) <= val_cut
                yield [t for t, v in zip(batch[field], is_val) if t and not v]
                n_chars += sum(len(t) for t in batch[field] if t)
                if n_chars > TOKENIZER_TRAIN_CHARS:
                    return
        tok = train_tokenizer(train_texts(), vocab_size)
    ids, dtype = _special_ids(tok), token_dtype(len(tok))
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(os.path.join(out_dir, 'tokenizer'))

    encoder, eos = _encoder(tok), ids['eos_id']
    def tokenize(batch, indices):
        out = {'ids': [np.array(e.ids + [eos] if e.ids else [], dtype=np.int32)  # an empty doc adds nothing
                       for e in encoder.encode_batch_fast(batch[field], add_special_tokens=False)],
               'val': (_uniform(indices, seed) <= val_cut).tolist()}
        if is_txt:  # undecodable byte sequences the reader replaced by U+FFFD
            out['n_bad'] = [t.count('\ufffd') for t in batch[field]]
        return out
    if num_proc and num_proc > 1:  # forked workers must not use the Rust thread pool the parent already used
        os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    # 256 documents a batch: enough for the Rust thread pool, and bounded even when documents are books
    tokenized = ds.map(tokenize, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                       num_proc=num_proc, desc='tokenizing', load_from_cache_file=False,
                       cache_file_name=os.path.join(out_dir, 'tokenized.arrow'))  # intermediate, removed below

    import pyarrow.compute as pc
    n_tokens, n_split_docs, n_bad = {'train': 0, 'val': 0}, {'train': 0, 'val': 0}, 0
    files = {s: open(os.path.join(out_dir, f'{s}.bin.tmp'), 'wb') for s in n_tokens}
    for table in tokenized.with_format('arrow').iter(batch_size=4096):
        lens = pc.list_value_length(table['ids']).to_numpy()
        tokens = pc.list_flatten(table['ids']).to_numpy()
        doc_val = table['val'].to_numpy()
        tok_val = np.repeat(doc_val, lens)
        for split, doc_sel, tok_sel in (('train', ~doc_val, ~tok_val), ('val', doc_val, tok_val)):
            files[split].write(tokens[tok_sel].astype(dtype).tobytes())
            n_tokens[split] += int(tok_sel.sum())
            n_split_docs[split] += int((lens[doc_sel] > 0).sum())
        n_bad += int(pc.sum(table['n_bad']).as_py()) if is_txt else 0
    del tokenized
    for f in glob.glob(os.path.join(out_dir, 'tokenized*.arrow')):
        os.remove(f)
    for split, f in files.items():
        f.close()
        os.replace(f.name, os.path.join(out_dir, f'{split}.bin'))
    if not (n_split_docs['train'] and n_split_docs['val']):
        n = n_split_docs['train'] + n_split_docs['val']
        raise DataError(f"dataset '{dataset}' has {n or 'no'} non-empty documents, {n_split_docs['val']} of them in val: "
                        f"need at least one in each split (is --text_field right? raise --val_frac?)")

    meta = dict(dataset=dataset, tokenizer='tokenizer', tokenizer_source=tokenizer, vocab_size=len(tok),
                dtype=np.dtype(dtype).name, **ids, n_tokens=n_tokens, n_docs=n_split_docs, n_undecodable=n_bad,
                settings=settings)
    with open(os.path.join(out_dir, 'meta.json.tmp'), 'w') as f:  # written last: its presence means "done"
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, 'meta.json.tmp'), os.path.join(out_dir, 'meta.json'))
    dt = time.time() - t0
    if n_bad:
        print(f"warning: {n_bad:,} undecodable byte sequences in the .txt files were replaced by U+FFFD")
    print(f"wrote {out_dir}: train.bin {n_tokens['train']:,} tokens ({n_split_docs['train']:,} docs), "
          f"val.bin {n_tokens['val']:,} tokens ({n_split_docs['val']:,} docs), {meta['dtype']}, vocab {len(tok):,}, "
          f"meta.json, tokenizer/ in {dt:.1f}s: {sum(n_tokens.values()) / dt:,.0f} tokens/s")
    return out_dir

def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        raise DataError(f"'{data_dir}' is not a prepared dataset (no meta.json): run python data.py --dataset=... --out_dir={data_dir}")
    with open(path) as f:
        meta = json.load(f)
    if os.path.isdir(os.path.join(data_dir, meta['tokenizer'])):  # stored relative, so the folder can be moved
        meta['tokenizer'] = os.path.join(data_dir, meta['tokenizer'])
    return meta

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
    block within an epoch, and the whole state is i, the same on every rank, so resuming is exact."""

    def __init__(self, data_dir, split, batch_size, block_size, seed=1337, rank=0, world_size=1, device='cpu'):
        assert split in ('train', 'val') and 0 <= rank < world_size and block_size >= 2
        meta = load_meta(data_dir)
        self.path, self.dtype, self.bos = os.path.join(data_dir, f'{split}.bin'), np.dtype(meta['dtype']), meta['bos_id']
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        n, L = os.path.getsize(self.path) // self.dtype.itemsize, block_size - 1
        self.n_blocks = (n - L + 1) // L  # so the grid fits whatever the epoch's shift
        if self.n_blocks < 1:
            raise DataError(f"{self.path} has {n:,} tokens, too few for one block of {block_size}: "
                            f"lower block_size or prepare more data (or a larger val_frac)")
        self.i = 0

    def starts(self, i):
        """Stream offsets of the blocks of this rank's i-th batch."""
        L = self.block_size - 1
        p = (i * self.world_size + self.rank) * self.batch_size + np.arange(self.batch_size)
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
        return _batch(self.bos, data[starts[:, None] + np.arange(self.block_size - 1)], self.device)

    def state_dict(self):
        return dict(i=self.i, batch_size=self.batch_size, world_size=self.world_size)

    def load_state_dict(self, d):
        d = d[self.rank % len(d)] if isinstance(d, list) else d  # a list of every rank's state is fine too
        # exact for the same layout; a new batch_size or world_size resumes after the same number of blocks
        self.i = -(-d['i'] * d['batch_size'] * d['world_size'] // (self.batch_size * self.world_size))

def eval_blocks(data_dir, split, n_blocks, block_size, seed=0):
    """A fixed random set of n_blocks blocks [n_blocks, block_size] (the same on every call), on the CPU."""
    return Batches(data_dir, split, n_blocks, block_size, seed=seed).next()

class StreamingBatches:
    """Packed blocks tokenized on the fly, for a hub or local dataset too big to prepare.
    Rank r of W reads documents r, r+W, r+2W, ... of the stream, in windows of about buffer_blocks blocks
    (the end is checked every 64*W documents, so it depends only on where the window starts). A window is
    packed, its partial last block dropped, and its blocks shuffled by a seed from (seed, rank, epoch, first
    document). The state is (epoch, first document of the window, blocks taken from it); it differs between
    ranks, so save every rank's (load_state_dict takes the list), and resume with the same world_size.
    self.meta holds the special ids and vocab_size, as load_meta does for prepared data."""

    def __init__(self, dataset, tokenizer, batch_size, block_size, seed=1337, rank=0, world_size=1, device='cpu',
                 text_field='text', buffer_blocks=1000):
        assert 0 <= rank < world_size and block_size >= 2
        if tokenizer == 'train':
            raise DataError("streaming needs an existing tokenizer: train one with data.py --tokenizer=train on a "
                            "sample and pass its tokenizer/ folder, or use microsoft/mpnet-base")
        self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.meta = dict(dataset=dataset, tokenizer=tokenizer if isinstance(tokenizer, str) else self.tok.name_or_path,
                         vocab_size=len(self.tok), **_special_ids(self.tok))
        self.encoder = _encoder(self.tok)
        self.ds, self.field, _ = _source(dataset, text_field, streaming=True)
        self.dataset, self.batch_size, self.block_size, self.seed = dataset, batch_size, block_size, seed
        self.rank, self.world_size, self.device, self.buffer_blocks = rank, world_size, device, buffer_blocks
        self.load_state_dict(dict(epoch=0, doc=0, pos=0, world_size=world_size))

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
                    if self.field not in example:
                        raise DataError(f"dataset '{self.dataset}' has no column '{self.field}' "
                                        f"(columns: {', '.join(example)}): pass --text_field=NAME")
                    texts.append(example[self.field] or '')
                self._next_doc += 1
            for e in self.encoder.encode_batch_fast(texts, add_special_tokens=False):
                if e.ids:
                    parts.append(np.array(e.ids + [self.meta['eos_id']], dtype=np.int64))
                    n += len(parts[-1])
        nb = n // L
        if nb == 0 and ended and self.doc == 0:
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
                self.epoch, self.doc = (self.epoch + 1, 0) if self._ended else (self.epoch, self._next_doc)
                self.pos, self._blocks = 0, None
                self._it = None if self._ended else self._it
        return _batch(self.meta['bos_id'], np.concatenate(rows), self.device)

    def state_dict(self):
        return dict(epoch=self.epoch, doc=self.doc, pos=self.pos, world_size=self.world_size)

    def load_state_dict(self, d):
        d = d[self.rank] if isinstance(d, list) else d
        if d['world_size'] != self.world_size:
            raise DataError(f"the streaming data position was saved with world_size={d['world_size']}: "
                            f"resume with the same number of processes")
        self.epoch, self.doc, self.pos = d['epoch'], d['doc'], d['pos']
        self._it, self._blocks = None, None

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='tokenize a dataset into train.bin/val.bin for train.py')
    parser.add_argument('--dataset', default='pydocs', help="'pydocs', a .txt/.jsonl/.parquet file or folder, or hub name[:config]")
    parser.add_argument('--tokenizer', default='microsoft/mpnet-base', help="hub name, saved folder, or 'train'")
    parser.add_argument('--vocab_size', type=int, default=30527, help='vocab size for --tokenizer=train')
    parser.add_argument('--out_dir', default=None, help=f'default: {DATA_ROOT}/<dataset>-<tokenizer>')
    parser.add_argument('--val_frac', type=float, default=0.005)
    parser.add_argument('--text_field', default='text')
    parser.add_argument('--num_proc', type=int, default=None, help='tokenizer processes (default: one, multithreaded)')
    parser.add_argument('--seed', type=int, default=1337)
    try:
        prepare(**vars(parser.parse_args()))
    except DataError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
