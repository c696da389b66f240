"""
Downstream fine-tuning and evaluation of an MPNet: does the pretrained model understand text?

    python finetune.py out-tiny/best.pt                                # the built-in task (offline), 1 seed
    python finetune.py out-tiny/best.pt config/finetune_tiny.py --seeds=3            # mean and spread over 3 seeds
    python finetune.py out-tiny/best.pt config/finetune_tiny.py --seeds=3 --scratch=True   # the same, random init
    python finetune.py out-tiny/snapshots/*.pt config/finetune_tiny.py  # score against iteration over a run
    python finetune.py microsoft/mpnet-base --task=mrpc --seeds=3      # GLUE (needs the hub, or datasets' cache)
    python finetune.py out/best.pt --task=data/reviews.csv --text_field=review   # your own labelled file
    python finetune.py sentence-transformers/all-mpnet-base-v2 --task=retrieval --eval_data=docs.jsonl  # no training
    python finetune.py sentence-transformers/all-mpnet-base-v2 --task=sts --eval_data=sts-dev.tsv       # no training

Models are given first: checkpoints of this project (ckpt.pt, best.pt, snapshots), HF MPNet names or
folders, sentence-transformers folders. The head is HF's MPNetForSequenceClassification head on <s>;
classification is trained with cross-entropy, a single score (num_labels 1) with squared error, as HF
does. Each run prints one line and appends a JSON record to out_file (config, versions, command:
everything needed to run it again); several seeds end with their mean and standard deviation.
"""

import csv
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import ConfigError, check_device, configure
from convert_hf import ConvertError, hf_to_checkpoint, quiet_transformers, sentence_pooling
from model import MPNet, MPNetConfig

# -----------------------------------------------------------------------------------------------
# model and task
model: str = ''                         # checkpoint (.pt) or HF name/folder; usually given first, several allowed
tokenizer: str = 'model'                # 'model' = the one the model carries; another must have its vocabulary
scratch: bool = False                   # re-initialise the weights (same architecture): the baseline to beat
task: str = 'pydocs'                    # 'pydocs' (built in), a GLUE name, a .csv/.tsv/.jsonl file or folder, 'retrieval', 'sts'
problem: str = 'auto'                   # a local file's labels: 'classification', 'regression' or 'auto' (numbers that are not all whole)
text_field: str = ''                    # a local file's first text column ('' = sentence1, text or sentence)
pair_field: str = ''                    # ... its second text column, for pairs ('' = sentence2 if present)
label_field: str = ''                   # ... its label or score column ('' = label, else score)
eval_data: str = ''                     # retrieval: documents (.txt/.jsonl; '' = the checkpoint's validation text); sts: scored pairs
max_len: int = 128                      # tokens per example (pairs: both texts together), cut beyond
max_train: int = 0                      # use only a fixed random subset of this many training examples (0 = all)
max_eval: int = 0                       # ... and this many of each evaluation split
max_pairs: int = 0                      # retrieval: at most this many document pairs (0 = as many as the text gives)
# recipe (RoBERTa/MPNet GLUE fine-tuning)
seeds: str = '1'                        # N (seeds 0..N-1) or a list '0,5,7': one run each, then mean and spread
epochs: int = 3                         # passes over the training split; the best epoch by the dev metric is kept
batch_size: int = 32                    # examples per step, padded to the longest in its batch
learning_rate: float = 2e-5             # peak, after warmup; then linear to 0
warmup_frac: float = 0.06               # fraction of all steps spent warming up from 0
weight_decay: float = 0.01              # on matrices and embeddings, not biases or norms
grad_clip: float = 1.0                  # 0 = off
dropout: float = 0.1                    # encoder and head dropout (HF: classifier dropout = hidden dropout)
out_file: str = 'results.jsonl'         # one JSON record per run is appended here
save: str = ''                          # write the best seed's fine-tuned model here (.pt): convert_hf.py exports it for pipeline()
# system
device: str = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda' or 'cuda:N'
dtype: str = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype on CUDA; CPU runs float32
# -----------------------------------------------------------------------------------------------
config_keys = list(__annotations__)  # the typed globals above, and nothing imported (checkpoint.REPLACED is a str too)
CHOICES = dict(problem=('auto', 'classification', 'regression'), dtype=('float32', 'bfloat16'))
# this script's own ranges; those of the keys it shares with train.py (batch_size, learning_rate, ...) are configurator's
LIMITS = dict(max_len='>= 8', max_train='>= 0', max_eval='>= 0', max_pairs='>= 0', epochs='>= 1', warmup_frac='[0, 1)',
              dropout='[0, 1)')


# what a score depends on besides the model and task: plot.py draws scores of different recipes as different lines
RECIPE = ('max_len', 'max_train', 'max_eval', 'epochs', 'batch_size', 'learning_rate', 'warmup_frac', 'weight_decay',
          'grad_clip', 'dropout', 'max_pairs', 'eval_data')


class TaskError(Exception):
    pass


# -----------------------------------------------------------------------------------------------
# the head: HF's MPNetClassificationHead, same names, so that it maps 1:1 onto `classifier.*`

class ClassificationHead(nn.Module):

    def __init__(self, n_embd, num_labels, dropout):
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(n_embd, num_labels)
        for layer in (self.dense, self.out_proj):  # HF's init: N(0, 0.02), zero bias
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden):  # (B, T, C) -> (B, num_labels), from <s>
        x = self.dropout(hidden[:, 0])
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


# -----------------------------------------------------------------------------------------------
# metrics, written out (numpy only): each is checked against scipy / scikit-learn in the tests

def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred, gold):  # of the positive class 1, as GLUE's MRPC and QQP
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp = np.sum(pred & gold)
    return float(2 * tp / (np.sum(pred) + np.sum(gold))) if tp else 0.0


def matthews(pred, gold):  # binary Matthews correlation (CoLA); 0 when a row or column of the table is empty
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = np.sum(pred & gold), np.sum(~pred & ~gold)
    fp, fn = np.sum(pred & ~gold), np.sum(~pred & gold)
    den = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float((tp * tn - fp * fn) / den) if den else 0.0


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y) / den) if den else 0.0


def ranks(x):  # average ranks of ties, as Spearman's rho needs
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind='stable')
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse]


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


METRICS = dict(accuracy=accuracy, f1=f1, matthews=matthews, pearson=pearson, spearman=spearman)

# GLUE: text columns, number of labels (1 = a score), official metrics (the first few averaged into the
# main score, as the GLUE leaderboard does), and the dev splits (MNLI: matched, then mismatched)
GLUE = dict(
    cola=('sentence', None, 2, ('matthews',)), sst2=('sentence', None, 2, ('accuracy',)),
    mrpc=('sentence1', 'sentence2', 2, ('f1', 'accuracy')), qqp=('question1', 'question2', 2, ('f1', 'accuracy')),
    stsb=('sentence1', 'sentence2', 1, ('pearson', 'spearman')), mnli=('premise', 'hypothesis', 3, ('accuracy',)),
    qnli=('question', 'sentence', 2, ('accuracy',)), rte=('sentence1', 'sentence2', 2, ('accuracy',)),
    wnli=('sentence1', 'sentence2', 2, ('accuracy',)))


def scores(metrics, pred, gold):
    """{metric: value} and 'score', their mean (the number a best epoch is chosen by)."""
    out = {m: METRICS[m](pred, gold) for m in metrics}
    return dict(out, score=float(np.mean(list(out.values()))))


# -----------------------------------------------------------------------------------------------
# tasks: {split: [(text, pair text or None, label)]}, the label an int class or a float score

# the built-in task: which of these standard-library packages a docstring comes from. Chosen for many
# docstrings in many classes each (decimal, with two huge classes, cannot be split), and for names that
# are no part of common words (not 'ast': last, fast); every identifier that contains a package name (asyncio, XMLParser,
# SSLContext, email.mime.text) is replaced by 'module' in every text, so the name cannot give the answer
PYDOCS_PACKAGES = ('asyncio', 'collections', 'email', 'http', 'importlib', 'inspect', 'logging', 'multiprocessing',
                   'ssl', 'tarfile', 'unittest', 'urllib', 'xml')
GIVEAWAY = re.compile(r'\w*(?:' + '|'.join(PYDOCS_PACKAGES) + r')\w*(?:\.\w+)*', re.IGNORECASE)


def build_pydocs_task(path):
    """The labelled docstrings of PYDOCS_PACKAGES, written once to path (jsonl: text, label, split). The
    split is made per owner (a class with its methods, or a module with its functions), so that near-identical
    sibling docstrings never sit on both sides of it, and per package, about 70/15/15 of its texts; a text
    found under two packages is dropped. The walk is the pydocs corpus's (data.stdlib_docstrings)."""
    rows = {}
    for package, owner, doc in data.stdlib_docstrings(PYDOCS_PACKAGES):
        text = GIVEAWAY.sub('module', data.clean_docstring(doc))
        if len(text) >= 40:  # drops the one-liners ("Return self==value.")
            seen = rows.setdefault(text, (package, owner))
            if seen[0] != package:
                rows[text] = (None, owner)
    owners = {}  # package -> owner -> texts
    for text, (package, owner) in rows.items():
        if package:
            owners.setdefault(package, {}).setdefault(owner, []).append(text)
    share = dict(train=0.7, dev=0.15, test=0.15)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(f'{path}.tmp-{os.getpid()}', 'w', encoding='utf-8') as f:  # two builders never share it
        for package in PYDOCS_PACKAGES:  # per package, the largest owners first, each to the split most short of its share
            count, total = dict.fromkeys(share, 0), sum(len(t) for t in owners[package].values())
            for owner, texts in sorted(owners[package].items(), key=lambda o: (-len(o[1]), hashlib.sha1(o[0].encode()).digest())):
                split = min(share, key=lambda s: count[s] / total - share[s])
                count[split] += len(texts)
                f.writelines(json.dumps(dict(text=t, label=package, split=split)) + '\n' for t in texts)
    os.replace(f'{path}.tmp-{os.getpid()}', path)


def pydocs_task():
    path = os.path.join(data.DATA_ROOT, f'pydocs-packages-py{sys.version_info[0]}.{sys.version_info[1]}.jsonl')
    if not os.path.exists(path):
        build_pydocs_task(path)
    rows = read_rows(path)
    names = list(PYDOCS_PACKAGES)
    splits = {s: [(r['text'], None, names.index(r['label'])) for r in rows if r['split'] == s] for s in ('train', 'dev', 'test')}
    return dict(name='pydocs', splits=splits, num_labels=len(names), labels=names, metrics=('accuracy',))


def load_glue(name):
    text, pair, num_labels, metrics = GLUE[name]
    try:
        from datasets import load_dataset
        ds = load_dataset('nyu-mll/glue', name)
    except Exception as e:  # offline, no cache: datasets names the reason on its first line
        raise TaskError(f"cannot load GLUE task '{name}' ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__}): "
                        f"it needs the hub once (then datasets' cache); offline, fine-tune on a local file: --task=FILE.csv")
    dev = ('validation_matched', 'validation_mismatched') if name == 'mnli' else ('validation',)
    splits = {'train': ds['train'], 'dev': ds[dev[0]], **({'dev_mismatched': ds[dev[1]]} if name == 'mnli' else {})}
    out = {s: [(r[text], r[pair] if pair else None, float(r['label']) if num_labels == 1 else r['label']) for r in rows]
           for s, rows in splits.items()}
    out['test'] = []  # GLUE's test labels are hidden (-1): scores come from the dev splits
    return dict(name=name, splits=out, num_labels=num_labels, labels=ds['train'].features['label'].names
                if num_labels > 1 else None, metrics=metrics)


def subset(examples, keep):
    """A fixed random subset of keep examples (0: all), in their order: the first rows of a file sorted by
    label (pydocs' is) would be one label."""
    if not keep or keep >= len(examples):
        return examples
    return [examples[i] for i in sorted(np.random.default_rng(0).permutation(len(examples))[:keep])]


def read_rows(path):
    """The rows (dicts) of a .csv, .tsv or .jsonl file; TaskError for a line that cannot be read."""
    ext = os.path.splitext(path)[1]
    if ext not in ('.csv', '.tsv', '.jsonl'):
        raise TaskError(f"'{path}' is not a .csv, .tsv or .jsonl file")
    with open(path, encoding='utf-8', newline='') as f:
        if ext == '.jsonl':
            rows = []
            for i, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line)) if line.strip() else None
                except ValueError:
                    raise TaskError(f"{path}, line {i}: not a JSON object") from None
                if not isinstance(rows[-1], dict):
                    raise TaskError(f"{path}, line {i}: not a JSON object")
            return rows
        # tsv (GLUE's own files): quotes are text, not quoting
        return list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE) if ext == '.tsv' else csv.DictReader(f))


def local_task(path):
    """A labelled local file (split 80/10/10 by a hash of each text) or a folder of train/dev/test files."""
    if os.path.isdir(path):
        files = {s: [os.path.join(path, f) for f in sorted(os.listdir(path)) if os.path.splitext(f)[0] in names
                     and os.path.splitext(f)[1] in ('.csv', '.tsv', '.jsonl')]
                 for s, names in (('train', ('train',)), ('dev', ('dev', 'validation')), ('test', ('test',)))}
        if not files['train'] or not files['dev']:
            raise TaskError(f"folder '{path}' needs a train and a dev (or validation) file (.csv, .tsv or .jsonl)")
        rows = {s: read_rows(f[0]) if f else [] for s, f in files.items()}
        where = {s: f[0] if f else path for s, f in files.items()}
    else:
        everything = read_rows(path)
        rows, where = {'train': [], 'dev': [], 'test': []}, dict.fromkeys(('train', 'dev', 'test'), path)
        for r in everything:
            h = int(hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()[:8], 16) / 16**8
            rows['train' if h < 0.8 else 'dev' if h < 0.9 else 'test'].append(r)
    first = rows['train'][0] if rows['train'] else {}
    a = text_field or next((c for c in ('sentence1', 'text', 'sentence') if c in first), 'text')
    b = pair_field or ('sentence2' if 'sentence2' in first and a == 'sentence1' else '')
    y = label_field or ('label' if 'label' in first or 'score' not in first else 'score')
    for split, rs in rows.items():
        if not rs and split != 'test':
            raise TaskError(f"the {split} split of '{path}' is empty" + (' (a file is split 80/10/10: give more rows, '
                            'or a folder with train and dev files)' if not os.path.isdir(path) else ''))
        for column in (a, b, y) if b else (a, y):
            missing = next((i for i, r in enumerate(rs) if r.get(column) in (None, '')), None)
            if missing is not None:
                raise TaskError(f"{where[split]}: row {missing + 1} of the {split} split has no '{column}' column "
                                f"(columns: {', '.join(rs[missing])}); name it with --{'label' if column == y else 'text' if column == a else 'pair'}_field=")
    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None
    values = [r[y] for rs in rows.values() for r in rs]
    numbers = [number(v) for v in values]
    kind = problem if problem != 'auto' else ('regression' if None not in numbers and (y == 'score' or any(
        not float(n).is_integer() for n in numbers)) else 'classification')
    if kind == 'regression':
        bad = next((v for v, n in zip(values, numbers) if n is None or not math.isfinite(n)), None)
        if bad is not None:
            raise TaskError(f"'{path}': a regression task needs numbers in '{y}', found {bad!r}: "
                            f"use --problem=classification for text labels")
        labels, convert = None, float
    else:
        names = sorted({str(r[y]) for r in rows['train']}, key=lambda s: (number(s) is None, number(s) or 0, s))
        if len(names) < 2:
            raise TaskError(f"'{path}': classification needs at least 2 labels in '{y}'; the training split has {names}")
        unseen = sorted({str(r[y]) for s in ('dev', 'test') for r in rows[s]} - set(names))
        if unseen:
            raise TaskError(f"'{path}': label {unseen[0]!r} of the dev/test split never occurs in training "
                            f"(labels there: {', '.join(names[:10])}); a model cannot learn it")
        labels, convert = names, lambda v: names.index(str(v))
    splits = {s: [(str(r[a]), str(r[b]) if b else None, convert(r[y])) for r in rs] for s, rs in rows.items()}
    return dict(name=path, splits=splits, num_labels=1 if labels is None else len(labels), labels=labels,
                metrics=('pearson', 'spearman') if labels is None else ('accuracy',) + (('f1',) if len(labels) == 2 else ()))


def load_task(name):
    if name == 'pydocs':
        return pydocs_task()
    if name in GLUE:
        return load_glue(name)
    if os.path.exists(name):
        return local_task(name)
    raise TaskError(f"unknown task '{name}': give pydocs, retrieval, sts, a GLUE task ({', '.join(GLUE)}), "
                    f"or a .csv/.tsv/.jsonl file or folder")


# -----------------------------------------------------------------------------------------------
# models and tokens

def load_model(name):
    """(checkpoint dict, tokenizer) of a checkpoint of this project or an HF MPNet (through convert_hf)."""
    ckpt = (load_checkpoint(name) if name.endswith('.pt') or os.path.isfile(name) else hf_to_checkpoint(name))
    own = None
    if ckpt.get('tokenizer_files'):
        with tempfile.TemporaryDirectory() as tmp:
            for fname, text in ckpt['tokenizer_files'].items():
                with open(os.path.join(tmp, fname), 'w', encoding='utf-8') as f:
                    f.write(text)
            own = data.load_tokenizer(tmp)
    elif tokenizer == 'model':
        raise TaskError(f"'{name}' carries no tokenizer: pass --tokenizer=NAME_OR_DIR, the one it was trained with")
    tok = own if tokenizer == 'model' else data.load_tokenizer(tokenizer)
    trained = (ckpt.get('data_fingerprint') or {}).get('tokenizer') or (own and data.tokenizer_fingerprint(own))
    vocab = ckpt['model_args']['vocab_size']
    if len(tok) > vocab or (trained and data.tokenizer_fingerprint(tok) != trained) or tok.pad_token_id != 1:
        raise TaskError(f"tokenizer '{tokenizer}' has another vocabulary than the model '{name}' ({len(tok)} vs "
                        f"{vocab} tokens, or the same ids for other tokens): leave out --tokenizer to use the model's own")
    return ckpt, tok


def encode_split(tok, examples):
    """Token ids of each example: <s> a </s> (pairs: <s> a </s></s> b </s>), as the tokenizer encodes them."""
    if not examples:
        return []
    a, b = [e[0] for e in examples], [e[1] for e in examples]
    return tok(a, b if b[0] is not None else None, truncation=True, max_length=max_len)['input_ids']


def batches(lengths, size, rng=None):
    """Index batches of similar lengths, so that padding is little. Training (rng given): shuffled, sorted
    by length within buckets of 50 batches, the batches then shuffled; evaluation: sorted whole."""
    order = np.argsort(lengths, kind='stable') if rng is None else rng.permutation(len(lengths))
    if rng is not None:
        bucket = 50 * size
        order = np.concatenate([b[np.argsort(np.asarray(lengths)[b], kind='stable')]
                                for b in np.array_split(order, range(bucket, len(order), bucket))])
    out = [order[i:i + size] for i in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(out)
    return out


def pad(rows, dev):
    """(ids, attention_mask) of token lists, padded with MPNet's <pad> (id 1) to the longest."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), 1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(dev), (ids != 1).long().to(dev)


# -----------------------------------------------------------------------------------------------
# embeddings with no training: retrieval of a document's other half, and similarity against human scores

def pool(encoder, ids, mask, pooling, autocast=nullcontext(), chunk=64):
    """L2-normalised sentence embeddings [N, C] of padded (ids, mask), in chunks: <s> ('cls') or the mean
    over the attention mask ('mean', sentence-transformers' mean: <s> and </s> included)."""
    out = []
    for i in range(0, ids.size(0), chunk):
        with torch.no_grad(), autocast:
            h = encoder.encode(ids[i:i + chunk], mask[i:i + chunk]).float()
        m = mask[i:i + chunk, :, None].float()
        out.append(h[:, 0] if pooling == 'cls' else (h * m).sum(1) / m.sum(1))
    return F.normalize(torch.cat(out), dim=-1)


def retrieval_scores(encoder, ids, mask, pooling='mean', autocast=nullcontext()):
    """ids, mask [2, n, L] (data.probe_pairs: first and second halves of n documents) -> how often a first
    half's nearest second half is its own (acc1), the mean reciprocal rank of its own (mrr), and the mean
    cosine of unrelated halves (near 0: a spread-out space; near 1: everything looks alike)."""
    was = encoder.training
    encoder.eval()
    n = ids.size(1)
    first, second = pool(encoder, ids.flatten(0, 1), mask.flatten(0, 1), pooling, autocast).view(2, n, -1)
    encoder.train(was)
    rank, unrelated = [], 0.0
    for i in range(0, n, 1024):  # bounded memory for many pairs
        sim = first[i:i + 1024] @ second.T  # (b, n)
        own = sim[torch.arange(sim.size(0)), torch.arange(i, i + sim.size(0))]
        rank.append(1 + (sim > own[:, None]).sum(1))
        unrelated += (sim.sum() - own.sum()).item()
    rank = torch.cat(rank).double()
    return dict(acc1=(rank == 1).double().mean().item(), mrr=(1 / rank).mean().item(),
                unrelated_cos=unrelated / (n * (n - 1)), pairs=n)


def sts_scores(encoder, tok, pairs, pooling, dev, autocast=nullcontext()):
    """Spearman (and Pearson) of the cosine of each pair's embeddings against its human score."""
    encoder.eval()
    sides = [tok([p[k] for p in pairs], truncation=True, max_length=max_len)['input_ids'] for k in (0, 1)]
    a, b = (pool(encoder, *pad(s, dev), pooling, autocast) for s in sides)
    cos = (a * b).sum(-1).cpu().numpy()
    gold = [p[2] for p in pairs]
    return dict(spearman=spearman(cos, gold), pearson=pearson(cos, gold), pairs=len(pairs))


def retrieval_pairs(ckpt, tok):
    """[2, n, L] halves of held-out documents: the given file's, or the checkpoint's validation text."""
    if eval_data:
        if not os.path.isfile(eval_data) or os.path.splitext(eval_data)[1] not in ('.txt', '.jsonl'):
            raise TaskError(f"--eval_data='{eval_data}' is not a .txt or .jsonl file of documents for retrieval")
        with open(eval_data, encoding='utf-8') as f:
            docs = ([str(r.get(text_field or 'text', '')) for r in read_rows(eval_data)] if eval_data.endswith('.jsonl') else
                    [p for p in f.read().split('\n\n') if p.strip()])
        ids = tok(docs, add_special_tokens=False)['input_ids']
        rows = [np.array([t for d in ids for t in (*d, tok.eos_token_id)])]
    elif ckpt.get('data_dir') and os.path.isfile(os.path.join(ckpt['data_dir'], 'val.bin')):
        rows = [data.val_prefix(ckpt['data_dir'], 2**31)]
    else:
        raise TaskError("--task=retrieval needs documents: --eval_data=FILE (.txt paragraphs or .jsonl 'text'); this model's "
                        "training data (its validation split) is not on this machine")
    ids, mask = data.probe_pairs(rows, tok.bos_token_id, tok.eos_token_id, 1, max_pairs or 2**31,
                                 max_len=max_len - 2)
    if ids.size(1) < 2:
        raise TaskError(f'retrieval needs at least 2 documents of 32 tokens or more; found {ids.size(1)}')
    return ids, mask


# -----------------------------------------------------------------------------------------------
# one fine-tuning run

def predict(encoder, head, ids, dev, autocast):
    encoder.eval()
    head.eval()
    out = np.zeros((len(ids), head.out_proj.out_features))
    for b in batches([len(r) for r in ids], 2 * batch_size):
        with torch.no_grad(), autocast:
            out[b] = head(encoder.encode(*pad([ids[i] for i in b], dev))).float().cpu().numpy()
    return out[:, 0] if out.shape[1] == 1 else out.argmax(1)


def finetune(ckpt, name, spec, ids, seed, dev, autocast):
    """Train encoder + head on spec's train split; (per-epoch dev scores, best epoch, its dev and test scores, the
    best epoch's weights (encoder, head) when --save asks for them, else None)."""
    torch.manual_seed(seed)
    overrides = dict(dropout=dropout, attn_dropout=dropout, objective='mpnet')
    encoder = (MPNet(MPNetConfig(**{**ckpt['model_args'], **overrides})) if scratch else
               model_from_checkpoint(ckpt, name, **overrides)).to(dev)
    head = ClassificationHead(encoder.config.n_embd, spec['num_labels'], dropout).to(dev)
    train = list(zip(ids['train'], (e[2] for e in spec['splits']['train'])))
    params = [p for m in (encoder, head) for p in m.parameters()]
    optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                                   {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(seed)
    steps = epochs * math.ceil(len(train) / batch_size)
    warmup = int(warmup_frac * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    target_type = torch.float if spec['num_labels'] == 1 else torch.long
    history, best = [], None
    for epoch in range(epochs):
        encoder.train()
        head.train()
        for b in batches([len(x) for x, _ in train], batch_size, rng):
            x, mask = pad([train[i][0] for i in b], dev)
            y = torch.tensor([train[i][1] for i in b], dtype=target_type, device=dev)
            with autocast:
                logits = head(encoder.encode(x, mask)).float()
            loss = F.mse_loss(logits[:, 0], y) if spec['num_labels'] == 1 else F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            schedule.step()
        result = {s: scores(spec['metrics'], predict(encoder, head, ids[s], dev, autocast),
                            [e[2] for e in spec['splits'][s]])
                  for s in spec['splits'] if s != 'train' and spec['splits'][s]}
        history.append(round(result['dev']['score'], 4))
        if best is None or result['dev']['score'] > best[1]['dev']['score']:
            weights = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in (encoder, head)] if save else None
            best = (epoch + 1, result, weights)
    return history, *best


def save_finetuned(ckpt, weights, spec, config, result):
    """The fine-tuned model as a checkpoint of this project with its classifier: convert_hf.py exports it as HF
    MPNetForSequenceClassification (labels named), which pipeline('text-classification') loads."""
    encoder, head = weights
    save_checkpoint(dict(model=encoder, model_args={**ckpt['model_args'], 'objective': 'mpnet'},
                         classifier=dict(head=head, labels=[str(n) for n in spec['labels']] if spec['labels'] else None),
                         tokenizer_files=ckpt.get('tokenizer_files') or {}, special_ids=ckpt.get('special_ids'),
                         iter_num=ckpt.get('iter_num'), config=config, finetune=dict(task=spec['name'],
                         dev=result['dev'], test=result.get('test'))), save)
    print(f"saved the fine-tuned model to {save} (dev {result['dev']['score']:.4f}); export it with: "
          f"python convert_hf.py {save} OUT_DIR")


def run_folder(name):
    """The train.py run folder a checkpoint belongs to (RUN/best.pt, RUN/snapshots/iter_N.pt), else None."""
    if not os.path.isfile(name):
        return None
    folder = os.path.dirname(os.path.abspath(name))
    folder = os.path.dirname(folder) if os.path.basename(folder) == 'snapshots' else folder
    return folder if os.path.isfile(os.path.join(folder, 'metrics.jsonl')) else None


# -----------------------------------------------------------------------------------------------
# main: check everything the user gave, then run each model x seed

def die(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)


def main(argv):
    files = [a for a in argv if not a.startswith('-') and a.endswith('.py')]
    models = [a for a in argv if not a.startswith('-') and not a.endswith('.py')]
    also = ('Models are given first (several for scores over a run): python finetune.py out/snapshots/*.pt '
            '--task=pydocs\nResults: one JSON record per run appended to out_file.')
    try:
        config = configure({k: globals()[k] for k in config_keys}, files + [a for a in argv if a.startswith('-')],
                           CHOICES, script=__file__, also=also, limits=LIMITS)
        check_device(config['device'], 'sdpa')
    except ConfigError as e:
        die(e)
    globals().update(config)
    models = models or ([model] if model else [])
    if not models:
        die('give a model: python finetune.py CHECKPOINT_OR_HF_NAME [--task=...] (see --help)')
    missing = next((m for m in models if m.endswith('.pt') and not os.path.isfile(m)), None)
    if missing:
        die(f"checkpoint '{missing}' not found (train one with: python train.py config/tiny.py)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_file))):
        die(f"out_file '{out_file}': its folder does not exist")
    if save and (not save.endswith('.pt') or len(models) > 1 or task in ('retrieval', 'sts')):
        die(f"save='{save}': give a .pt path, for one model fine-tuned on a task (not retrieval or sts)")
    if save and (os.path.exists(save) or not os.path.isdir(os.path.dirname(os.path.abspath(save)))):
        die(f"save='{save}': " + ('it exists; choose a new path' if os.path.exists(save) else 'its folder does not exist'))
    try:
        seed_list = list(range(int(seeds))) if seeds.strip().isdigit() else [int(s) for s in seeds.split(',')]
    except ValueError:
        die(f"seeds must be a count (--seeds=3) or a list (--seeds=0,5,7); got {seeds!r}")
    dev = device
    autocast = torch.autocast('cuda', torch.bfloat16) if dev.startswith('cuda') and dtype == 'bfloat16' else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        embedding = task in ('retrieval', 'sts')
        spec = None if embedding else load_task(task)
        if spec:
            for s in ('train', 'dev'):
                if not spec['splits'][s]:
                    raise TaskError(f"task '{task}' has an empty {s} split")
            for s, examples in spec['splits'].items():
                spec['splits'][s] = subset(examples, max_train if s == 'train' else max_eval)
        if task == 'sts':
            if not eval_data:
                raise TaskError("--task=sts needs --eval_data=FILE: pairs with human scores (columns sentence1, sentence2, score)")
            rows = read_rows(eval_data)
            y = label_field or ('score' if rows and 'score' in rows[0] else 'label')
            try:
                pairs = [(str(r['sentence1']), str(r['sentence2']), float(r[y])) for r in rows]
            except KeyError as e:
                raise TaskError(f"{eval_data}: a row has no {e} column (sentence1, sentence2 and {y} are needed)") from None
            except ValueError as e:
                raise TaskError(f"{eval_data}: a score in '{y}' is not a number ({e})") from None
            if len(pairs) < 2:
                raise TaskError(f'{eval_data}: needs at least 2 scored pairs; found {len(pairs)}')
        first = load_model(models[0])
    except (TaskError, CheckpointError, ConvertError, data.DataError) as e:
        die(e)
    if spec:
        print(f"task {spec['name']}: " + ', '.join(f'{s} {len(e):,}' for s, e in spec['splits'].items()) +
              (f", {spec['num_labels']} labels" if spec['num_labels'] > 1 else ', a score') +
              f"; metric {'/'.join(spec['metrics'])}" + (
              f"; majority class {max(np.bincount([e[2] for e in spec['splits']['dev']])) / len(spec['splits']['dev']):.3f} of dev"
              if spec['num_labels'] > 1 else ''))
    summary = []
    for name in models:
        try:
            ckpt, tok = first if name == models[0] else load_model(name)
            if ckpt['model_args']['max_positions'] < max_len:
                raise TaskError(f"max_len {max_len} exceeds the model's max_positions "
                                f"{ckpt['model_args']['max_positions']}: pass --max_len={ckpt['model_args']['max_positions']}")
            ids = {s: encode_split(tok, e) for s, e in spec['splits'].items()} if spec else None
        except (TaskError, CheckpointError, ConvertError, data.DataError) as e:
            die(e)
        iter_num = ckpt.get('iter_num')
        base = dict(model=name, iter_num=iter_num, task=task, scratch=scratch, config=config, command=' '.join(sys.argv),
                    python=platform.python_version(), torch=torch.__version__)
        if embedding:
            torch.manual_seed(0)
            encoder = (MPNet(MPNetConfig(**{**ckpt['model_args'], 'dropout': 0.0, 'attn_dropout': 0.0})) if scratch else
                       model_from_checkpoint(ckpt, name, dropout=0.0, attn_dropout=0.0)).to(dev)
            pooling = sentence_pooling(ckpt.get('st_files'))
            try:
                result = (sts_scores(encoder, tok, pairs, pooling, dev, autocast) if task == 'sts' else
                          retrieval_scores(encoder, *(t.to(dev) for t in retrieval_pairs(ckpt, tok)), pooling, autocast))
            except TaskError as e:
                die(e)
            record = dict(base, pooling=pooling, **result, score=result['spearman' if task == 'sts' else 'mrr'])
            print(f'{name} (iter {iter_num}), {pooling} pooling: ' + ', '.join(
                f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()))
            runs = [record]
            with open(out_file, 'a') as f:
                f.write(json.dumps(record) + '\n')
        else:
            runs = []
            for seed in seed_list:
                t0 = time.time()
                history, best_epoch, result, weights = finetune(ckpt, name, spec, ids, seed, dev, autocast)
                if weights and (not runs or result['dev']['score'] > max(r['score'] for r in runs)):
                    try:
                        save_finetuned(ckpt, weights, spec, config, result)
                    except CheckpointError as e:
                        die(e)
                record = dict(base, seed=seed, epochs_dev=history, best_epoch=best_epoch, score=result['dev']['score'],
                              metrics=list(spec['metrics']), **result, seconds=round(time.time() - t0, 1),
                              sizes={s: len(e) for s, e in spec['splits'].items()})
                print(f"{name} (iter {iter_num}) seed {seed}: dev {result['dev']['score']:.4f} at epoch {best_epoch} "
                      f"(by epoch {history})" + (f", test {result['test']['score']:.4f}" if 'test' in result else '') +
                      ''.join(f", {s} {result[s]['score']:.4f}" for s in result if s not in ('dev', 'test')) +
                      f", {record['seconds']:.0f} s")
                runs.append(record)
                with open(out_file, 'a') as f:
                    f.write(json.dumps(record) + '\n')
        summary.append((name, iter_num, [r['score'] for r in runs], [r.get('test', {}).get('score') for r in runs]))
        run_dir = run_folder(name)
        if run_dir and not scratch and iter_num is not None:  # the run's score against its iteration, for plot.py
            with open(os.path.join(run_dir, 'scores.jsonl'), 'a') as f:
                f.write(json.dumps(dict(iter=iter_num, task=task, metric=(spec['metrics'][0] if spec else
                                        'spearman' if task == 'sts' else 'mrr'), mean=float(np.mean(summary[-1][2])),
                                        std=float(np.std(summary[-1][2], ddof=1)) if len(runs) > 1 else 0.0,
                                        seeds=len(runs), model=name, recipe={k: config[k] for k in RECIPE})) + '\n')
        if len(runs) > 1:
            dev_s, test_s = np.array(summary[-1][2]), [t for t in summary[-1][3] if t is not None]
            print(f'{name}: dev {dev_s.mean():.4f} +- {dev_s.std(ddof=1):.4f} over {len(runs)} seeds' +
                  (f', test {np.mean(test_s):.4f} +- {np.std(test_s, ddof=1):.4f}' if len(test_s) > 1 else ''))
    if len(models) > 1:
        print('iter  score (dev, mean over seeds)')
        for name, it, dev_s, _ in summary:
            print(f'{it!s:>6}  {np.mean(dev_s):.4f}  {name}')
    print(f'records appended to {out_file}')


if __name__ == '__main__':
    with quiet_transformers():
        main(sys.argv[1:])
