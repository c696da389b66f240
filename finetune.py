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
    python finetune.py sentence-transformers/all-mpnet-base-v2 --task=beir --eval_data=scifact --max_len=384  # a BEIR folder

Models are given first: checkpoints of this project (ckpt.pt, best.pt, snapshots), HF MPNet names or
folders, sentence-transformers folders. The head is HF's MPNetForSequenceClassification head on <s>;
classification is trained with cross-entropy, a single score (num_labels 1) with squared error, as HF
does. Each run prints one line and appends a JSON record to out_file (config, versions, command:
everything needed to run it again); several seeds end with their mean and standard deviation. A metric
that a run leaves undefined (a model that gives every example the same answer) is printed 'undefined' and
recorded as null, never as a number; inputs that would make one undefined for every model are refused.
"""

import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import data
from checkpoint import CheckpointError, carried_for_export, model_from_checkpoint, save_checkpoint
from configurator import ConfigError, check_device, configure, die
from convert_hf import ConvertError, quiet_transformers, sentence_pooling
from evaluation import (NDCG_AT, TABLES, NonFiniteError, TaskError, batches, beir_data, beir_paths, beir_scores,
                        defined, label, length_said, load_model, number, pad, read_rows, read_text, retrieval_scores,
                        retrieval_source, score_name, scores, shown, sts_pairs, sts_scores, subset, text)
from model import MPNet, MPNetConfig

# -----------------------------------------------------------------------------------------------
# model and task
model: str = ''                         # checkpoint (.pt) or HF name/folder; usually given first, several allowed
tokenizer: str = 'model'                # 'model' = the one the model carries; another must have its vocabulary
scratch: bool = False                   # re-initialise the weights (same architecture): the baseline to beat
task: str = 'pydocs'                    # 'pydocs' (built in), a GLUE name, a .csv/.tsv/.jsonl file or folder, 'retrieval', 'sts', 'beir'
problem: str = 'auto'                   # a local file's labels: 'classification', 'regression' or 'auto' (numbers that are not all whole)
text_field: str = ''                    # a local file's first text column ('' = sentence1, text or sentence)
pair_field: str = ''                    # ... its second text column, for pairs ('' = sentence2 if present)
label_field: str = ''                   # ... its label or score column ('' = label, else score)
eval_data: str = ''                     # retrieval: documents (.txt/.jsonl; '' = the checkpoint's validation text); sts: scored pairs; beir: its folder
beir_split: str = 'test'                # beir: the judgments scored, qrels/{beir_split}.tsv (BEIR's sets: test; MS MARCO: dev)
max_len: int = 128                      # tokens per example (pairs: both texts together), cut beyond
max_train: int = 0                      # use only a fixed random subset of this many training examples (0 = all)
max_eval: int = 0                       # ... and this many of each evaluation split (sts: pairs; beir: queries)
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
          'grad_clip', 'dropout', 'max_pairs', 'eval_data', 'beir_split')



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


# GLUE: text columns, number of labels (1 = a score), official metrics (the first few averaged into the
# main score, as the GLUE leaderboard does), and the dev splits (MNLI: matched, then mismatched)
GLUE = dict(
    cola=('sentence', None, 2, ('matthews',)), sst2=('sentence', None, 2, ('accuracy',)),
    mrpc=('sentence1', 'sentence2', 2, ('f1', 'accuracy')), qqp=('question1', 'question2', 2, ('f1', 'accuracy')),
    stsb=('sentence1', 'sentence2', 1, ('pearson', 'spearman')), mnli=('premise', 'hypothesis', 3, ('accuracy',)),
    qnli=('question', 'sentence', 2, ('accuracy',)), rte=('sentence1', 'sentence2', 2, ('accuracy',)),
    wnli=('sentence1', 'sentence2', 2, ('accuracy',)))


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
    rows = [r for _, r in read_rows(path)]
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



def local_task(path):
    """A labelled local file (split 80/10/10 by a hash of each row) or a folder of train/dev/test files."""
    if os.path.isdir(path):
        files = {}
        for s, names in (('train', ('train',)), ('dev', ('dev', 'validation')), ('test', ('test',))):
            files[s] = [os.path.join(path, f) for f in sorted(os.listdir(path))
                        if os.path.splitext(f)[0] in names and os.path.splitext(f)[1] in TABLES]
            if len(files[s]) > 1:
                raise TaskError(f"folder '{path}' has {' and '.join(files[s])} for its {s} split: keep one")
        if not files['train'] or not files['dev']:
            raise TaskError(f"folder '{path}' needs a train and a dev (or validation) file (.csv, .tsv or .jsonl)")
        rows = {s: [(f[0], line, r) for line, r in read_rows(f[0])] if f else [] for s, f in files.items()}
    else:
        rows, everything = {'train': [], 'dev': [], 'test': []}, read_rows(path)
        if not everything:
            raise TaskError(f"'{path}' has no rows" + (' (a header alone)' if read_text(path).strip() and not path.endswith('.jsonl') else ''))
        for line, r in everything:
            h = int(hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()[:8], 16) / 16**8
            rows['train' if h < 0.8 else 'dev' if h < 0.9 else 'test'].append((path, line, r))
    for split, rs in rows.items():
        if not rs and split != 'test':
            raise TaskError(f"the {split} split of '{path}' is empty " + (f"('{files[split][0]}' has no rows)" if os.path.isdir(path)
                            else '(a file is split 80/10/10: give more rows, or a folder with train and dev files)'))
    first = rows['train'][0][2]
    a = text_field or next((c for c in ('sentence1', 'text', 'sentence') if c in first), 'text')
    b = pair_field or ('sentence2' if 'sentence2' in first and a == 'sentence1' else '')
    y = label_field or ('label' if 'label' in first or 'score' not in first else 'score')
    if y in (a, b):  # a model that reads its answer scores perfectly and learns nothing
        raise TaskError(f"'{y}' is both a text and the label column: name the text with --text_field= (and --pair_field=)")
    examples = {s: [(text(f, i, r, a), text(f, i, r, b, 'pair_field') if b else None, label(f, i, r, y), f, i)
                    for f, i, r in rs] for s, rs in rows.items()}
    every = [e for es in examples.values() for e in es]
    kind = problem if problem != 'auto' else ('regression' if all(number(e[2]) is not None for e in every) and (
        y == 'score' or any(not number(e[2]).is_integer() for e in every)) else 'classification')
    if kind == 'regression':
        bad = next((e for e in every if number(e[2]) is None), None)
        if bad:
            raise TaskError(f"'{bad[3]}', line {bad[4]}: a regression task needs numbers in '{y}', found {bad[2]!r}: "
                            f"use --problem=classification for text labels")
        labels, convert = None, number
    else:  # numbers that are equal are one label ('1' and '1.0', also across files); a name is a label of its own
        def key(v):
            return (0, number(v), '') if number(v) is not None else (1, 0.0, str(v))
        spelling = {}
        for e in examples['train']:
            spelling.setdefault(key(e[2]), str(e[2]))
        keys = sorted(spelling)
        if len(keys) < 2:
            raise TaskError(f"'{path}': classification needs at least 2 labels in '{y}'; the training split has {list(spelling.values())}")
        unseen = next((e for s in ('dev', 'test') for e in examples[s] if key(e[2]) not in spelling), None)
        if unseen:
            raise TaskError(f"'{unseen[3]}', line {unseen[4]}: label {str(unseen[2])!r} never occurs in training "
                            f"(labels there: {', '.join(spelling[k] for k in keys[:10])}); a model cannot learn it")
        labels, convert = [spelling[k] for k in keys], lambda v: keys.index(key(v))
    splits = {s: [(e[0], e[1], convert(e[2])) for e in es] for s, es in examples.items()}
    return dict(name=path, splits=splits, num_labels=1 if labels is None else len(labels), labels=labels,
                metrics=('pearson', 'spearman') if labels is None else ('accuracy',) + (('f1',) if len(labels) == 2 else ()))


def load_task(name):
    if name == 'pydocs':
        return pydocs_task()
    if name in GLUE:
        return load_glue(name)
    if os.path.exists(name):
        return local_task(name)
    if os.path.splitext(name)[1] in TABLES:
        raise TaskError(f"--task='{name}': file not found")
    raise TaskError(f"unknown task '{name}': give pydocs, retrieval, sts, beir, a GLUE task ({', '.join(GLUE)}), "
                    f"or a .csv/.tsv/.jsonl file or folder")


def check_gold(spec):
    """Refuse an evaluation split whose gold labels leave a metric undefined (or fixed) for every model: scores
    all equal (Pearson, Spearman), one class alone (Matthews), no example of the positive class (F1)."""
    for s, examples in spec['splits'].items():
        gold = [e[2] for e in examples]
        if s == 'train' or not gold:
            continue
        where = f"the {s} split of task '{spec['name']}'" + (f' (--max_eval={max_eval})' if max_eval else '')
        if {'pearson', 'spearman', 'matthews'} & set(spec['metrics']) and len(set(gold)) < 2:
            raise TaskError(f"{where} has {len(gold)} example(s), all {'scored' if spec['num_labels'] == 1 else 'labelled'} "
                            f"{gold[0] if spec['num_labels'] == 1 else spec['labels'][gold[0]]!r}: "
                            f"{'/'.join(spec['metrics'])} against a constant is undefined; it needs different values")
        if 'f1' in spec['metrics'] and 1 not in gold:
            raise TaskError(f"{where} has no example of label {spec['labels'][1]!r}: F1 of that class (half the score) "
                            f"would be 0 or undefined whatever the model; it needs examples of both labels")


def encode_split(tok, examples):
    """Token ids of each example: <s> a </s> (pairs: <s> a </s></s> b </s>), as the tokenizer encodes them."""
    if not examples:
        return []
    a, b = [e[0] for e in examples], [e[1] for e in examples]
    return tok(a, b if b[0] is not None else None, truncation=True, max_length=max_len)['input_ids']


# -----------------------------------------------------------------------------------------------
# one fine-tuning run

def predict(encoder, head, ids, dev, autocast):
    encoder.eval()
    head.eval()
    out = np.zeros((len(ids), head.out_proj.out_features))
    for b in batches([len(r) for r in ids], 2 * batch_size):
        with torch.no_grad(), autocast:
            out[b] = head(encoder.encode(*pad([ids[i] for i in b], dev))).float().cpu().numpy()
    if not np.isfinite(out).all():  # argmax of NaN logits is class 0: a score for a broken model
        raise NonFiniteError('the model gives non-finite outputs (NaN or inf)')
    return out[:, 0] if out.shape[1] == 1 else out.argmax(1)


def finetune(ckpt, name, spec, ids, seed, dev, autocast):
    """Train encoder + head on spec's train split; (per-epoch dev scores, best epoch, its dev and test scores, the
    best epoch's weights (encoder, head) when --save asks for them, else None). An epoch whose dev score is
    undefined (NaN: the model gives every example the same label) is never best over a defined one.
    NonFiniteError when the loss or the outputs stop being finite: the run diverged, and nothing of it counts."""
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
    history, best, step = [], None, 0
    hint = (f'lower --learning_rate (now {learning_rate:g})' +
            (' or clip gradients (--grad_clip=1.0)' if not grad_clip else f' or --grad_clip (now {grad_clip:g})'))
    for epoch in range(epochs):
        encoder.train()
        head.train()
        for b in batches([len(x) for x, _ in train], batch_size, rng):
            x, mask = pad([train[i][0] for i in b], dev)
            y = torch.tensor([train[i][1] for i in b], dtype=target_type, device=dev)
            with autocast:
                logits = head(encoder.encode(x, mask)).float()
            loss = F.mse_loss(logits[:, 0], y) if spec['num_labels'] == 1 else F.cross_entropy(logits, y)
            step += 1
            if not torch.isfinite(loss):  # one sync a step: a fine-tune's steps are few, and NaN weights must not be scored
                raise NonFiniteError(f'seed {seed} diverged at step {step} (epoch {epoch + 1}): the loss is {loss.item()}; {hint}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            schedule.step()
        try:
            result = {s: scores(spec['metrics'], predict(encoder, head, ids[s], dev, autocast),
                                [e[2] for e in spec['splits'][s]])
                      for s in spec['splits'] if s != 'train' and spec['splits'][s]}
        except NonFiniteError as e:
            raise NonFiniteError(f'seed {seed} diverged in epoch {epoch + 1}: {e}; {hint}') from None
        history.append(round(result['dev']['score'], 4))
        if best is None or rank(result['dev']['score']) > rank(best[1]['dev']['score']):
            weights = [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in (encoder, head)] if save else None
            best = (epoch + 1, result, weights)
    return history, *best


def rank(score):
    """A score to compare by: an undefined one (NaN) below every defined one."""
    return score if math.isfinite(score) else -math.inf


def save_finetuned(ckpt, weights, spec, config, result):
    """The fine-tuned model as a checkpoint of this project with its classifier: convert_hf.py exports it as HF
    MPNetForSequenceClassification (labels named), which pipeline('text-classification') loads."""
    encoder, head = weights
    bad = next((k for part in weights for k, v in part.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:  # train.py's rule: non-finite weights are never written over a path where a model is expected
        raise NonFiniteError(f"the fine-tuned weights hold NaN or inf ({bad}): nothing saved to {save}")
    save_checkpoint(dict(model=encoder, model_args={**ckpt['model_args'], 'objective': 'mpnet'},
                         classifier=dict(head=head, labels=[str(n) for n in spec['labels']] if spec['labels'] else None),
                         # what else the export follows (a context extension); a classifier is no sentence model
                         **{k: v for k, v in carried_for_export(ckpt).items()
                            if k not in ('st_files', 'st_path', 'hf_extra', 'tokenizer_files', 'special_ids')},
                         tokenizer_files=ckpt.get('tokenizer_files') or {}, special_ids=ckpt.get('special_ids'),
                         iter_num=ckpt.get('iter_num'), config=config, finetune=dict(task=spec['name'],
                         dev=defined(result['dev']), test=defined(result.get('test')))), save)
    print(f"saved the fine-tuned model to {save} (dev {shown(result['dev']['score'])}); export it with: "
          f"python convert_hf.py {save} OUT_DIR")


def run_folder(name, ckpt):
    """The train.py run folder a checkpoint is one of (RUN/best.pt, RUN/ckpt.pt, RUN/snapshots/*.pt), else None:
    a fine-tuned model saved inside a run folder (--save) is no point of that run's pretraining curve."""
    if not os.path.isfile(name) or 'classifier' in ckpt or 'finetune' in ckpt:
        return None
    folder, base = os.path.split(os.path.abspath(name))
    if os.path.basename(folder) == 'snapshots':
        folder = os.path.dirname(folder)
    elif base not in ('best.pt', 'ckpt.pt'):
        return None
    return folder if os.path.isfile(os.path.join(folder, 'metrics.jsonl')) else None


# -----------------------------------------------------------------------------------------------
# main: check everything the user gave, then run each model x seed

def parse_seeds(text):
    """The seeds --seeds names: a count N (seeds 0..N-1) or a list '0,5,7'; dies saying why not. Each seed is one
    run: none would run nothing, and a repeated one would be counted twice in the spread."""
    try:
        got = list(range(int(text))) if text.strip().isdigit() else [int(s) for s in text.split(',')]
    except ValueError:
        die(f"seeds must be a count (--seeds=3) or a list (--seeds=0,5,7); got {text!r}")
    if not got:
        die(f"--seeds={text} runs nothing: give a count of 1 or more, or a list of seeds (--seeds=0,5,7)")
    bad = next((s for s in got if not 0 <= s < 2**63), None)
    if bad is not None:
        die(f"seed {bad} is out of range: seeds are whole numbers from 0 to 2**63 - 1")
    twice = next((s for s in got if got.count(s) > 1), None)
    if twice is not None:
        die(f"--seeds={text} lists seed {twice} twice: a repeated seed repeats a run, and would be counted twice in the spread")
    return got


def check_out_file(path, inputs):
    """Dies unless path can be appended to, before any work (found after the first seed, that seed's record was
    lost), and is none of the inputs (records appended to a checkpoint or a task's file would damage it); the
    probe leaves no file behind."""
    if path.endswith('.pt') or any(os.path.isfile(p) and os.path.isfile(path) and os.path.samefile(p, path) for p in inputs):
        die(f"out_file '{path}' is a model or the task's data: appending records would damage it; give a .jsonl of its own")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        die(f"out_file '{path}': its folder does not exist")
    existed = os.path.exists(path)
    try:
        open(path, 'a').close()
    except OSError as e:
        die(f"out_file '{path}' cannot be written ({e.strerror or e}): give a file in a folder you can write to")
    if not existed:
        os.remove(path)


def append(path, record):
    """One JSON line, undefined metrics as null (json would write NaN, which is no JSON)."""
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(defined(record), allow_nan=False) + '\n')
    except OSError as e:
        die(f"cannot append to '{path}' ({e.strerror or e})")


# the settings that only some tasks read: given to another, they would be ignored without a word
APPLIES = dict(problem=('local',), text_field=('local', 'sts', 'retrieval'), pair_field=('local', 'sts'),
               label_field=('local', 'sts'), eval_data=('sts', 'retrieval', 'beir'), beir_split=('beir',),
               max_train=('builtin', 'local'), max_eval=('builtin', 'local', 'sts', 'beir'), max_pairs=('retrieval',))
APPLIES_SAID = dict(builtin='the built-in task or a GLUE task', local='a local labelled file (--task=FILE.csv or a folder)',
                    sts='--task=sts (its pairs)',
                    retrieval='--task=retrieval (a .jsonl of documents)', beir='--task=beir (its queries)')
EMBEDDING = ('retrieval', 'sts', 'beir')  # tasks that embed with the model as it is and train nothing
METRIC = dict(retrieval='mrr', sts='spearman', beir=f'ndcg@{NDCG_AT}')  # an embedding task's score


def settings(argv):
    """(the resolved config, the models given first, the defaults): configurator's rules, and the combinations that
    cannot work, each one line."""
    files = [a for a in argv if not a.startswith('-') and a.endswith('.py')]
    models = [a for a in argv if not a.startswith('-') and not a.endswith('.py')]
    also = ('Models are given first (several for scores over a run): python finetune.py out/snapshots/*.pt '
            '--task=pydocs\nResults: one JSON record per run appended to out_file.')
    defaults = {k: globals()[k] for k in config_keys}
    try:
        c = configure(defaults, files + [a for a in argv if a.startswith('-')], CHOICES, script=__file__, also=also,
                      limits=LIMITS)
        check_device(c['device'], 'sdpa')
    except ConfigError as e:
        die(e)
    models = models or ([c['model']] if c['model'] else [])
    if not models:
        die('give a model: python finetune.py CHECKPOINT_OR_HF_NAME [--task=...] (see --help)')
    missing = next((m for m in models if m.endswith('.pt') and not os.path.isfile(m)), None)
    if missing:
        die(f"checkpoint '{missing}' not found (train one with: python train.py config/tiny.py)")
    twice = next((m for m in models if models.count(m) > 1), None)
    if twice:  # its score would be counted twice in the summary
        die(f"model '{twice}' is given twice")
    task, save, embedding = c['task'], c['save'], c['task'] in EMBEDDING
    kind = task if embedding else 'builtin' if task == 'pydocs' or task in GLUE else 'local'
    unused = next((k for k in APPLIES if c[k] != defaults[k] and kind not in APPLIES[k]), None)
    if unused:
        die(f"--{unused}={c[unused]} does not apply to --task={task}: it is for " +
            ' or '.join(APPLIES_SAID[k] for k in APPLIES[unused]))
    if embedding and c['seeds'].strip() != '1':
        die(f"--task={task} trains nothing: no score depends on a seed (leave out --seeds)")
    if save and (not save.endswith('.pt') or len(models) > 1 or embedding):
        die(f"save='{save}': give a .pt path, for one model fine-tuned on a task (not {', '.join(EMBEDDING)})")
    if save and (os.path.exists(save) or not os.path.isdir(os.path.dirname(os.path.abspath(save)))):
        die(f"save='{save}': " + ('it exists; choose a new path' if os.path.exists(save) else 'its folder does not exist'))
    return c, models


def load_inputs(models):
    """(the task's examples or None, STS pairs, BEIR data, the first model and its tokenizer): read before any model
    is scored, so that a mistake in any input stops at once; one line for what cannot work."""
    try:
        spec = None if task in EMBEDDING else load_task(task)
        if spec:
            for s in ('train', 'dev'):
                if not spec['splits'][s]:
                    raise TaskError(f"task '{task}' has an empty {s} split")
            for s, examples in spec['splits'].items():
                spec['splits'][s] = subset(examples, max_train if s == 'train' else max_eval)
            check_gold(spec)
        if task == 'sts' and not eval_data:
            raise TaskError("--task=sts needs --eval_data=FILE: pairs with human scores (columns sentence1, sentence2, score)")
        pairs = sts_pairs(eval_data, text_field or 'sentence1', pair_field or 'sentence2', label_field,
                          ('text_field', 'pair_field', 'label_field'), max_eval) if task == 'sts' else None
        if task == 'beir' and not eval_data:
            raise TaskError(f"--task=beir needs --eval_data=FOLDER: a BEIR dataset (corpus.jsonl, queries.jsonl, qrels/{beir_split}.tsv)")
        beir = beir_data(eval_data, beir_split, max_eval) if task == 'beir' else None
        return spec, pairs, beir, load_model(models[0], tokenizer)
    except (TaskError, CheckpointError, ConvertError, data.DataError) as e:
        die(e)


def say_inputs(spec, beir, metric):
    if beir:
        print(f"beir {eval_data} ({beir_split}): {len(beir['texts']):,} documents, {len(beir['queries']):,} queries scored" +
              (f" (a fixed random {len(beir['queries']):,} of {beir['judged']:,}: --max_eval)"
               if len(beir['queries']) < beir['judged'] else '') +
              (f" ({beir['unanswerable']:,} of them without a relevant document in qrels/{beir_split}.tsv: each scores 0, "
               f"as in BEIR)" if beir['unanswerable'] else '') +
              f"; exact cosine search, equal scores ranked by document id, descending (as trec_eval); a document with its "
              f"query's _id is never retrieved (as BEIR); metric {metric}")
        if beir['unknown']:
            line, doc = beir['unknown'][0]
            print(f"note: {len(beir['unknown']):,} judgment(s) name a document corpus.jsonl lacks (line {line}: '{doc}'): "
                  f"kept as BEIR keeps them, never retrieved")
    if spec:
        baseline = ''
        if spec['num_labels'] > 1:  # on the score's own scale (accuracy/f1 mean: the mean of the two, as the score)
            gold = [e[2] for e in spec['splits']['dev']]
            majority = int(np.bincount(gold).argmax())
            baseline = (f"; majority class {str(spec['labels'][majority])!r} scores "
                        f"{shown(scores(spec['metrics'], [majority] * len(gold), gold)['score'])} on dev")
        print(f"task {spec['name']}: " + ', '.join(f'{s} {len(e):,}' for s, e in spec['splits'].items()) +
              (f", {spec['num_labels']} labels" if spec['num_labels'] > 1 else ', a score') + f"; metric {metric}" + baseline)


def score_embeddings(name, ckpt, tok, pairs, beir, halves, base, said, same, dev, autocast):
    """The embedding task's record of one model, as it is (dropout off; scratch: the same shape, random)."""
    torch.manual_seed(0)
    encoder = (MPNet(MPNetConfig(**{**ckpt['model_args'], 'dropout': 0.0, 'attn_dropout': 0.0})) if scratch else
               model_from_checkpoint(ckpt, name, dropout=0.0, attn_dropout=0.0)).to(dev)
    pooling = sentence_pooling(ckpt.get('st_files'))
    if halves:
        print(f"retrieval: {halves[2]['said']}")
    try:
        result = (sts_scores(encoder, tok, pairs, pooling, dev, autocast, max_len) if task == 'sts' else
                  beir_scores(encoder, tok, beir, pooling, dev, autocast, max_len=max_len) if task == 'beir' else
                  retrieval_scores(encoder, halves[0].to(dev), halves[1].to(dev), pooling, autocast))
    except TaskError as e:  # NaN embeddings, or a collapsed model
        die(e)
    cut = halves[2]['cut'] if halves else result.pop('cut')
    record = dict(base, pooling=pooling, **result, texts_cut=cut, score=result[base['score_metric']])
    print(f'{said}, {pooling} pooling: ' + ', '.join(
        f'{k} {shown(v)}' + ('' if math.isfinite(v) else same) if isinstance(v, float) else f'{k} {v}'
        for k, v in result.items()) + '; ' + length_said(
        ckpt, task, cut, result['queries'] + result['documents'] if beir else 2 * result['pairs'], max_len))
    append(out_file, record)
    return [record]


def finetune_seeds(name, ckpt, spec, ids, seed_list, base, said, same, dev, autocast, config):
    """One record per seed of a model fine-tuned on the task; with --save, the best seed's model so far saved."""
    runs, saved = [], False
    for seed in seed_list:
        t0 = time.time()
        try:  # a diverged seed stops the whole: nothing of it is recorded or saved; earlier seeds' records stay
            history, best_epoch, result, weights = finetune(ckpt, name, spec, ids, seed, dev, autocast)
        except TaskError as e:
            die(e)
        record = dict(base, seed=seed, epochs_dev=history, best_epoch=best_epoch, score=result['dev']['score'],
                      metrics=list(spec['metrics']), **result, seconds=round(time.time() - t0, 1),
                      sizes={s: len(e) for s, e in spec['splits'].items()})
        print(f"{said} seed {seed}: dev {shown(result['dev']['score'])}" +
              ('' if math.isfinite(result['dev']['score']) else same) +
              f" at epoch {best_epoch} (by epoch {defined(history)})" +
              ''.join(f", {s} {shown(result[s]['score'])}" for s in result if s != 'dev') + f", {record['seconds']:.0f} s")
        runs.append(record)
        append(out_file, record)
        if weights and math.isfinite(record['score']) and all(rank(record['score']) > rank(r['score']) for r in runs[:-1]):
            if os.path.exists(save) and not saved:  # it was not there at the start: another run wrote it since
                die(f"save='{save}' appeared while this ran (another run?): it is kept, and nothing is saved over it")
            try:
                save_finetuned(ckpt, weights, spec, config, result)
            except (TaskError, CheckpointError) as e:
                die(e)
            saved = True
    if save and not any(math.isfinite(r['score']) for r in runs):
        print(f'nothing saved to {save}: no seed has a defined dev score')
    return runs


def record_run_scores(name, ckpt, iter_num, runs, metric, config):
    """A run's checkpoint scored: its mean over seeds in the run folder's scores.jsonl (plot.py draws it against the
    iteration), and the spread over seeds."""
    dev_s = [r['score'] for r in runs]
    undefined = [r.get('seed', 0) for r in runs if not math.isfinite(r['score'])]
    run_dir = run_folder(name, ckpt)
    if run_dir and not scratch and iter_num is not None:
        if undefined:
            print(f"not added to {os.path.join(run_dir, 'scores.jsonl')}: the score is undefined" +
                  (f" for seed(s) {', '.join(map(str, undefined))}" if task not in EMBEDDING else ''))
        else:
            append(os.path.join(run_dir, 'scores.jsonl'), dict(
                iter=iter_num, task=task, metric=metric, mean=float(np.mean(dev_s)),
                std=float(np.std(dev_s, ddof=1)) if len(runs) > 1 else 0.0, seeds=len(runs), model=name,
                recipe={k: config[k] for k in RECIPE}))
    if len(runs) > 1:
        test_s = [r['test']['score'] for r in runs if 'test' in r]
        print(f'{name}: dev ' + (f'{np.mean(dev_s):.4f} +- {np.std(dev_s, ddof=1):.4f}' if not undefined else
                                 f"undefined for seed(s) {', '.join(map(str, undefined))}") + f' over {len(runs)} seeds' +
              (f', test {np.mean(test_s):.4f} +- {np.std(test_s, ddof=1):.4f}' if len(test_s) > 1 and
               all(map(math.isfinite, test_s)) else ''))


def main(argv):
    config, models = settings(argv)
    globals().update(config)
    embedding = task in EMBEDDING
    seed_list = parse_seeds(seeds)  # a mistake there stops before anything runs
    check_out_file(out_file, [*models, task, eval_data, *(beir_paths(eval_data, beir_split) if task == 'beir' else ())])
    autocast = torch.autocast('cuda', torch.bfloat16) if device.startswith('cuda') and dtype == 'bfloat16' else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    spec, pairs, beir, first = load_inputs(models)
    metric = spec and score_name(spec['metrics']) or METRIC[task]
    say_inputs(spec, beir, metric)
    same = ' (the model gives every {} the same {})'.format(
        'pair' if embedding else 'example', 'label' if spec and spec['num_labels'] > 1 else 'score')
    summary = []
    for name in models:
        try:
            ckpt, tok = first if name == models[0] else load_model(name, tokenizer)
            if ckpt['model_args']['max_positions'] < max_len:
                raise TaskError(f"max_len {max_len} exceeds the model's max_positions "
                                f"{ckpt['model_args']['max_positions']}: pass --max_len={ckpt['model_args']['max_positions']}")
            ids = {s: encode_split(tok, e) for s, e in spec['splits'].items()} if spec else None
            halves = (retrieval_source(ckpt, tok, name, eval_data, max_len, max_pairs, text_field) if task == 'retrieval'
                      else None)
        except (TaskError, CheckpointError, ConvertError, data.DataError) as e:
            die(e)
        iter_num = ckpt.get('iter_num') if os.path.isfile(name) else None  # an HF model has no iteration of ours
        said = name if iter_num is None else f'{name} (iter {iter_num})'
        base = dict(model=name, iter_num=iter_num, task=task, scratch=scratch, config=config, command=' '.join(sys.argv),
                    python=platform.python_version(), torch=torch.__version__, score_metric=metric)
        runs = (score_embeddings(name, ckpt, tok, pairs, beir, halves, base, said, same, device, autocast) if embedding
                else finetune_seeds(name, ckpt, spec, ids, seed_list, base, said, same, device, autocast, config))
        record_run_scores(name, ckpt, iter_num, runs, metric, config)
        summary.append((name, iter_num, [r['score'] for r in runs]))
    if len(models) > 1:
        print(f"iter  score ({'dev ' + metric + ', mean over seeds' if spec else metric})")
        for name, it, dev_s in summary:
            print(f"{'-' if it is None else it!s:>6}  {shown(float(np.mean(dev_s)))}  {name}")
    print(f'records appended to {out_file}')


if __name__ == '__main__':
    try:
        with quiet_transformers():
            main(sys.argv[1:])
    except KeyboardInterrupt:  # the records already appended are whole lines, and stay
        print(f'error: interrupted; the records of finished runs are in {out_file}', file=sys.stderr)
        sys.exit(130)
