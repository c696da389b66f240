"""
Evaluation of an MPNet without training it, and the pieces every script scores with: metrics (written out, numpy
only), readers of tables (.csv/.tsv/.jsonl), loading a model to evaluate, sentence embeddings (pool, embed),
retrieval of a document's other half, STS, BEIR. Library code: every setting is an argument; finetune.py's command
line, contrastive.py's held-out evaluation and train.py's probe call it.

    from evaluation import load_model, retrieval_scores
    ckpt, tok = load_model('out-tiny/best.pt')                    # a checkpoint of this project, or an HF MPNet
    model = checkpoint.model_from_checkpoint(ckpt, 'out-tiny/best.pt')
    retrieval_scores(model, *retrieval_pairs(ckpt, tok, 'out-tiny/best.pt'))   # {'acc1', 'mrr', 'unrelated_cos', ...}
"""

import csv
import io
import json
import math
import os
import re
import tempfile
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

import data
from checkpoint import load_checkpoint
from convert_hf import ConvertError, hf_to_checkpoint
from model import MPNet


class TaskError(Exception):
    pass

# -----------------------------------------------------------------------------------------------
# metrics, written out (numpy only): each is checked against scipy / scikit-learn in the tests. A metric whose
# denominator is 0 (a constant prediction or gold) is undefined: NaN here, 'undefined' when printed, null in a
# record; never 0.0, which would be a number nobody measured (scikit-learn's 0 for these cases is a convention)

def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred, gold):  # of the positive class 1, as GLUE's MRPC and QQP; undefined when neither side has a 1
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    den = np.sum(pred) + np.sum(gold)
    return float(2 * np.sum(pred & gold) / den) if den else math.nan


def matthews(pred, gold):  # binary Matthews correlation (CoLA); undefined when a row or column of the table is empty
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = np.sum(pred & gold), np.sum(~pred & ~gold)
    fp, fn = np.sum(pred & ~gold), np.sum(~pred & gold)
    den = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float((tp * tn - fp * fn) / den) if den else math.nan


def pearson(x, y):  # undefined when either side is constant
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y) / den) if den else math.nan


def ranks(x):  # average ranks of ties, as Spearman's rho needs
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind='stable')
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse]


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def shown(v):
    """A metric as printed: 4 decimals, or 'undefined'."""
    return f'{v:.4f}' if v is not None and math.isfinite(v) else 'undefined'


def defined(x):
    """x with every NaN metric (also inside dicts and lists) as None, which JSON writes as null."""
    if isinstance(x, dict):
        return {k: defined(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [defined(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


METRICS = dict(accuracy=accuracy, f1=f1, matthews=matthews, pearson=pearson, spearman=spearman)

def scores(metrics, pred, gold):
    """{metric: value} and 'score', their mean (the number a best epoch is chosen by; NaN if one is undefined)."""
    out = {m: METRICS[m](pred, gold) for m in metrics}
    return dict(out, score=float(np.mean(list(out.values()))))


def score_name(metrics):
    """What a task's 'score' is: its one metric, or the mean of several (GLUE's MRPC: 'f1/accuracy mean')."""
    return metrics[0] if len(metrics) == 1 else '/'.join(metrics) + ' mean'


def subset(examples, keep):
    """A fixed random subset of keep examples (0: all), in their order: the first rows of a file sorted by
    label (pydocs' is) would be one label."""
    if not keep or keep >= len(examples):
        return examples
    return [examples[i] for i in sorted(np.random.default_rng(0).permutation(len(examples))[:keep])]


TABLES = ('.csv', '.tsv', '.jsonl')
csv.field_size_limit(2**31 - 1)  # a long document in one field is data (csv's default refuses fields over 131,072 characters)


def read_text(path):
    """The text of a file: UTF-8 (a byte-order mark, as Excel writes one, dropped), or UTF-16 with its mark;
    TaskError for a path that is no file, or bytes that are neither (a cp1252/Latin-1 export), and how to convert."""
    if not os.path.isfile(path):
        raise TaskError(f"'{path}': " + ('a folder, not a file' if os.path.isdir(path) else 'file not found'))
    with open(path, 'rb') as f:
        raw = f.read()
    utf16 = raw[:2] in (b'\xff\xfe', b'\xfe\xff')
    try:
        return raw.decode('utf-16' if utf16 else 'utf-8-sig')
    except UnicodeDecodeError as e:
        where = '' if utf16 else f', line {raw[:e.start].count(10) + 1}'  # 10: a line break's byte
        raise TaskError(f"'{path}'{where}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte {raw[e.start]:#04x}): convert "
                        f"it, e.g. iconv -f cp1252 -t utf-8 '{path}' > utf8{os.path.splitext(path)[1]}") from None


def parse_table(text, **fmt):
    """[(line, row dict)] of a csv text with a header, line the file line a row starts on (a quoted text may
    span lines); or (line, problem) for the first row that is not one."""
    reader = csv.reader(io.StringIO(text, newline=''), **fmt)
    rows, header, start = [], None, 1
    try:
        for fields in reader:
            if not fields:  # a blank line is no row (as csv.DictReader)
                pass
            elif header is None:
                header = fields
                twice = next((c for c in header if header.count(c) > 1), None)
                if twice is not None:
                    return start, f"the header names column '{twice}' twice"
            elif len(fields) != len(header):
                return start, (f"{len(fields)} field{'s' * (len(fields) > 1)} where the header has {len(header)} ({', '.join(header)})" +
                               ('; quote a text that holds the delimiter' if len(fields) > len(header) else ''))
            else:
                rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as e:
        return reader.line_num, str(e)
    return rows


def read_rows(path):
    """[(line, row dict)] of a .csv, .tsv or .jsonl file, line the file line a row starts on; TaskError for a
    file or a line that cannot be read."""
    ext = os.path.splitext(path)[1]
    if ext not in TABLES:
        raise TaskError(f"'{path}' is not a .csv, .tsv or .jsonl file")
    text = read_text(path)
    if ext == '.jsonl':
        rows = []
        # any line ending (Windows, old Mac, mixed): JSON strings hold no raw CR or LF, but may hold U+2028 unescaped,
        # which splitlines() would split
        for i, line in enumerate(re.split('\r\n|\r|\n', text), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except ValueError:
                    rows.append((i, None))
                if not isinstance(rows[-1][1], dict):
                    raise TaskError(f"'{path}', line {i}: not a JSON object")
    elif ext == '.csv':
        rows = parse_table(text)
    else:  # csv.writer quotes a tsv text that holds a tab, a quote or a line break; GLUE's own tsv files leave
        # quotes bare ('a "quoted" word', or one that opens a text), which only plain splitting reads right. The
        # quoted reading is taken when the whole file parses strictly as quoted, every row as long as the header
        quoted = parse_table(text, delimiter='\t', strict=True)
        plain = quoted if isinstance(quoted, list) else parse_table(text, delimiter='\t', quoting=csv.QUOTE_NONE)
        rows = plain if isinstance(plain, list) else max(quoted, plain)  # neither: the one that read further says why
    if isinstance(rows, tuple):
        raise TaskError(f"'{path}', line {rows[0]}: {rows[1]}")
    return rows


def number(v):
    """v as a float if it is a number or a text of one ('1', '1.0', ' 2e3'), else None (a bool is no number)."""
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def value(path, line, row, column, flag, need=''):
    """The non-empty value of row[column]; TaskError naming the file line, and the column missing or empty. A missing
    column is named with the caller's setting that names it (flag), or, for a caller without one (flag None), with
    what the file needs (need)."""
    if column not in row:
        sep = next((c for c in ';|' if len(row) == 1 and c in next(iter(row))), None)
        raise TaskError(f"'{path}', line {line}: no '{column}' column (columns: {', '.join(map(str, row))}); " +
                        (f"name it with --{flag}=" if flag else need) +
                        (f"; the file looks '{sep}'-separated: save it comma-separated" if sep else ''))
    v = row[column]
    if v is None or (isinstance(v, str) and not v.strip()):
        raise TaskError(f"'{path}', line {line}: '{column}' is empty" + (' (null)' if v is None else ''))
    return v


def text(path, line, row, column, flag='text_field', need=''):
    """A text of a row: a string (a JSON null, NaN or number is no text: it would be embedded as 'None', 'nan')."""
    v = value(path, line, row, column, flag, need)
    if not isinstance(v, str):
        raise TaskError(f"'{path}', line {line}: '{column}' is {json.dumps(v)}, not a text")
    return v


def label(path, line, row, column, flag='label_field', need=''):
    """A label or score of a row, as read: a text or a number; TaskError for one that reads as NaN or inf
    (a missing value written out, which would otherwise be a class or be ranked)."""
    v = value(path, line, row, column, flag, need)
    if not isinstance(v, (str, int, float)) or (number(v) is not None and not math.isfinite(number(v))):
        raise TaskError(f"'{path}', line {line}: '{column}' is {json.dumps(v)}: no score or label (a missing value?)")
    return v

# -----------------------------------------------------------------------------------------------
# models and tokens

def load_model(name, tokenizer='model'):
    """(checkpoint dict, tokenizer) of a checkpoint of this project or an HF MPNet (through convert_hf); tokenizer:
    'model' (the one it carries) or another name or folder, which must have the model's vocabulary."""
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, 'config.json')):
        run = next((n for n in ('best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(name, n))), None)
        if run:  # else transformers says 'Unrecognized model'
            raise TaskError(f"'{name}' is a run folder of train.py, not a model: give its checkpoint, {os.path.join(name, run)}")
    if name.endswith('.pt') or os.path.isfile(name):
        ckpt = load_checkpoint(name)
    else:
        try:
            ckpt = hf_to_checkpoint(name)
        except ConvertError:
            raise
        except Exception as e:  # config.json without weights, a damaged weights file (SafetensorError): the libraries' own
            raise TaskError(f"cannot load HF model '{name}' ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]})") from None
    bad = next((k for k, v in dict(ckpt['model']).items() if torch.is_tensor(v) and v.is_floating_point()
                and not torch.isfinite(v).all()), None) if isinstance(ckpt['model'], dict) else None
    if bad:  # it would train to NaN, or score NaN embeddings
        raise TaskError(f"'{name}': its weights hold NaN or inf ({bad}): it diverged; use an earlier snapshot")
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

class NonFiniteError(TaskError):
    """A model's outputs or loss hold NaN or inf: no score can be computed from them (train.py's probe catches it)."""


class CollapsedError(TaskError):
    """A model that gives every text the same embedding: no retrieval, STS or BEIR score of it means anything (its ties
    would be ranked by the order of the input). A TaskError: train.py's probe catches it."""


COLLAPSED = 1e-5  # normalised embeddings nearer than this are one (float noise); a random init's are ~1 apart


def spread(emb, ref):
    """The largest distance of the rows of emb [N, C] from ref [C], normalised embeddings (0: one embedding, 2: opposite)."""
    return float((emb - ref).norm(dim=-1).max()) if len(emb) else 0.0


def check_apart(spread, task):
    """The one rule of every embedding score: a model whose normalised embeddings of different texts all lie within
    COLLAPSED of the first (spread) cannot tell texts apart, and gets no score: CollapsedError. Exact equality is not
    the test: mean pooling of one vector repeated gives it back only within float noise, which would then rank."""
    if spread < COLLAPSED:
        raise CollapsedError(f'the model gives every text the same embedding (collapsed): no {task} score is meaningful '
                             f'(its embeddings of different texts are all within {COLLAPSED:g} of each other); score an '
                             f'earlier snapshot, or check how it was trained')


def pool(encoder, ids, mask, pooling, autocast=nullcontext(), chunk=32):
    """L2-normalised sentence embeddings [N, C] of right-padded (ids, mask), in their order: <s> ('cls') or the mean
    over the attention mask ('mean', sentence-transformers' mean: <s> and </s> included). Every evaluation embeds
    through here, as sentence-transformers' encode does: no autograd, rows sorted by length and embedded chunk rows
    at a time, each chunk cut to its own longest row (little padding); a row given twice is embedded once, so that
    its copies score exactly alike (a tie, as equal texts are). NonFiniteError for NaN or inf: similarities of NaN
    rank nothing above the right answer, a perfect retrieval score."""
    rows, which = torch.unique(torch.cat([ids * mask, mask], 1), dim=0, return_inverse=True)  # distinct rows
    first = torch.full((len(rows),), len(ids), dtype=torch.long, device=ids.device).scatter_reduce(
        0, which, torch.arange(len(ids), device=ids.device), 'amin')  # each distinct row's first occurrence
    ids, mask = ids[first], mask[first]
    lengths = mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    out = torch.empty(len(ids), encoder.config.n_embd, device=ids.device)
    for i in range(0, len(order), chunk):
        part = torch.tensor(order[i:i + chunk], device=ids.device)
        L = int(mask[part].any(0).nonzero().max()) + 1 if mask[part].any() else 1  # the chunk's longest row
        with torch.no_grad(), autocast:
            h = encoder.encode(ids[part, :L], mask[part, :L])
        out[part] = MPNet.pool(h.float(), mask[part, :L], pooling)
    if not torch.isfinite(out).all():
        raise NonFiniteError('the model gives non-finite sentence embeddings (NaN or inf): its weights or activations '
                             'overflow; nothing can be scored')
    return F.normalize(out, dim=-1)[which]


def cut_tokens(tok, texts, max_len):
    """(token ids of texts, <s> text </s>, each cut at max_len tokens as the tokenizer cuts, how many were cut)."""
    ids = tok(texts, truncation=True, max_length=max_len + 1)['input_ids']  # one more: a text that fills it was cut
    return [x if len(x) <= max_len else x[:max_len - 1] + x[-1:] for x in ids], sum(len(x) > max_len for x in ids)


def embed(encoder, tok, texts, pooling, dev, autocast=nullcontext(), size=32, max_len=128):
    """(pool()'s embeddings [N, C] of texts in their order, how many texts were cut at max_len tokens)."""
    ids, cut = cut_tokens(tok, texts, max_len)
    return pool(encoder, *pad(ids, dev), pooling, autocast, chunk=size), cut


def length_said(ckpt, task, cut, total, max_len):
    """The embedding tasks' one length rule, as their printed line says it: every text (a retrieval half too) is cut at
    max_len tokens, <s> and </s> included, and how many were; a sentence-transformers model cuts at its own
    max_seq_length (as does BEIR, which embeds with it), said with the flag that scores as it embeds; else, when texts
    were cut, the most the model reads (an extended model: its longer max_positions)."""
    said = f"{'halves' if task == 'retrieval' else 'texts'} cut at {max_len} tokens: {cut:,} of {total:,}"
    own = json.loads((ckpt.get('st_files') or {}).get(  # the Transformer module's, in whatever subfolder it is
        os.path.join(ckpt.get('st_path') or '', 'sentence_bert_config.json')) or '{}').get('max_seq_length')
    most = ckpt['model_args']['max_positions']
    if own and (own < max_len or own > max_len and cut):  # (none cut: cutting at own would change nothing)
        return said + (f"; this sentence-transformers model cuts at {own}: pass --max_len={min(own, most)} to score as "
                       f"{'BEIR does' if task == 'beir' else 'it embeds'}")
    return said + (f'; the model reads up to {most}: --max_len={most} reads more of them' if cut and most > max_len else '')


def retrieval_scores(encoder, ids, mask, pooling='mean', autocast=nullcontext()):
    """ids, mask [2, n, L] (data.probe_pairs: first and second halves of n documents) -> how often a first
    half's nearest second half is its own (acc1), the mean reciprocal rank of its own (mrr), and the mean
    cosine of unrelated halves (near 0: a spread-out space; near 1: everything looks alike). A tie with
    another half counts as the expected value of breaking it at random; a model that gives every half the
    same embedding gets no score (CollapsedError)."""
    was = encoder.training
    encoder.eval()
    try:
        return ranking(*pool(encoder, ids.flatten(0, 1), mask.flatten(0, 1), pooling, autocast).view(2, ids.size(1), -1))
    finally:
        encoder.train(was)


def ranking(first, second):
    """retrieval_scores' numbers from the normalised embeddings [n, C] of the first and the second halves (n different
    texts on each side, as retrieval_source gives them); CollapsedError for embeddings that are all one."""
    check_apart(max(spread(first, first[0]), spread(second, first[0])), 'retrieval')
    n = first.size(0)
    acc1, mrr, unrelated = [], [], 0.0
    for i in range(0, n, 1024):  # bounded memory for many pairs
        sim = first[i:i + 1024] @ second.T  # (b, n)
        own = sim[torch.arange(sim.size(0)), torch.arange(i, i + sim.size(0))]
        above, ties = (sim > own[:, None]).sum(1).double(), (sim == own[:, None]).sum(1).double() - 1
        # the own half's rank is 1 + above + k, k uniform in 0..ties: E[1/rank] = (H(above + ties + 1) - H(above)) / (ties + 1)
        acc1.append((above == 0).double() / (ties + 1))
        mrr.append(torch.where(ties == 0, 1 / (above + 1),  # exact where there is no tie, the usual case
                               (torch.digamma(above + ties + 2) - torch.digamma(above + 1)) / (ties + 1)))
        unrelated += (sim.sum() - own.sum()).item()
    return dict(acc1=torch.cat(acc1).mean().item(), mrr=torch.cat(mrr).mean().item(),
                unrelated_cos=unrelated / (n * (n - 1)), pairs=n)


class Probe:
    """train.py's embedding probe: this file's retrieval evaluation (--task=retrieval) on pairs of validation
    half-documents (data.probe_pairs), pooled as the run's sentence-transformers model pools (else mean): the
    same numbers, on fewer pairs. rows: a prefix of val.bin (whole documents) or validation blocks."""

    def __init__(self, rows, meta, n_docs, block_size):
        self.ids, self.mask = data.probe_pairs(rows, meta['bos_id'], meta['eos_id'], meta['pad_id'], n_docs,
                                               max_len=min(128, block_size - 2))  # <s> half </s> fits a block
        self.n = self.ids.size(1)
        if self.n < 2:
            raise TaskError(f'probe=True needs validation text with documents of 32 tokens or more; found {self.n}')
        self.said = (f'probe: {self.n} validation documents of 32 tokens or more (probe_docs={n_docs} asked)' +
                     ('; raise val_frac when preparing for more' if self.n < n_docs else ''))

    def __call__(self, encoder, pooling, dev, autocast=nullcontext()):
        """NonFiniteError (a TaskError) for NaN embeddings: their similarities would score a perfect retrieval."""
        return retrieval_scores(encoder, self.ids.to(dev), self.mask.to(dev), pooling, autocast)


def sts_scores(encoder, tok, pairs, pooling, dev, autocast=nullcontext(), max_len=128):
    """Spearman (and Pearson) of the cosine of each pair's embeddings against its human score (NaN: undefined,
    the model gives every pair the same cosine), and how many texts were cut at max_len tokens; CollapsedError for
    a model that gives every text the same embedding."""
    encoder.eval()
    texts = [p[k] for p in pairs for k in (0, 1)]
    emb, cut = embed(encoder, tok, texts, pooling, dev, autocast, max_len=max_len)
    if any(t != texts[0] for t in texts):
        check_apart(spread(emb, emb[0]), 'STS')
    cos = (emb[0::2] * emb[1::2]).sum(-1).cpu().numpy()
    gold = [p[2] for p in pairs]
    return dict(spearman=spearman(cos, gold), pearson=pearson(cos, gold), pairs=len(pairs), cut=cut)


def prepared_dir(ckpt, name):
    """(the folder of the checkpoint's prepared data on this machine or None, the paths tried). An older
    train.py recorded data_dir relative to where it ran: tried from here, then from the run folder's parent
    (where train.py is usually run) and the run folder."""
    d = ckpt.get('data_dir')
    if not d:
        return None, []
    run = os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else None
    run = os.path.dirname(run) if run and os.path.basename(run) == 'snapshots' else run
    tried = [d] + ([os.path.join(os.path.dirname(run), d), os.path.join(run, d)] if run and not os.path.isabs(d) else [])
    return next((t for t in tried if os.path.isfile(os.path.join(t, 'val.bin'))), None), tried


def retrieval_documents(path, text_field=''):
    """(documents, what they are) of a .txt (blank-line separated paragraphs) or .jsonl file (--text_field, else 'text'),
    read by data.py's one reader of text, as contrastive.py and train.py read the same file: any line ending; a .jsonl
    row without a text is skipped and counted, as data.py skips it. TaskError for a .txt that is not UTF-8 (data.py
    would read its bad bytes as U+FFFD, and UTF-16 as noise), saying how to convert it."""
    if os.path.splitext(path)[1] not in ('.txt', '.jsonl'):
        raise TaskError(f"--eval_data='{path}' is not a .txt or .jsonl file of documents for retrieval")
    blank = False
    if path.endswith('.txt'):
        blank = not read_text(path).strip()  # (datasets' reader fails on a file of blank lines)
        with open(path, 'rb') as f:
            if f.read(2) in (b'\xff\xfe', b'\xfe\xff'):
                raise TaskError(f"'{path}' is UTF-16 text: documents are read as UTF-8 (as contrastive.py and train.py "
                                f"read them); convert it, e.g. iconv -f utf-16 -t utf-8 '{path}' > utf8.txt")
    docs, skipped = ([], 0) if blank else data.read_texts(path, text_field or 'text', txt_split='paragraph')
    if not docs:
        raise TaskError(f"'{path}' holds no documents" + (' (paragraphs apart by a blank line)' if path.endswith('.txt') else
                        f" ({skipped:,} rows without a text in '{text_field or 'text'}': name the text's key with --text_field=)"))
    return docs, (f"{len(docs):,} {'paragraphs' if path.endswith('.txt') else 'documents'} of '{path}'" +
                  (f" ({skipped:,} rows without a text skipped)" if skipped and path.endswith('.jsonl') else ''))


def retrieval_source(ckpt, tok, name='', eval_data='', max_len=128, max_pairs=0, text_field=''):
    """(ids, mask [2, n, L], about) of the pairs --task=retrieval ranks: the first and second halves of held-out
    documents (data.probe_pairs), of --eval_data; else the held-out pairs a contrastive.py checkpoint carries (those it
    evaluated on); else the checkpoint's validation text. Every half is cut at max_len tokens, <s> and </s> included;
    a pair with a half seen before is left out (a repeated document would be two right answers for each of its halves,
    as contrastive.py leaves it out), and the first max_pairs are kept. about: said (what they are, for the printed
    line), cut (how many halves were cut)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if eval_data:
        docs, said = retrieval_documents(eval_data, text_field)
        ids = tok(docs, add_special_tokens=False)['input_ids']
        rows = [np.array([t for d in ids for t in (*d, eos)])]
    elif 'heldout' in ckpt:  # contrastive.py's: ids, mask [2, n, L], source
        held = ckpt['heldout']
        if not (isinstance(held, dict) and all(torch.is_tensor(held.get(k)) and held[k].dim() == 3 and held[k].size(0) == 2
                                               and held[k].shape == held['ids'].shape for k in ('ids', 'mask'))):
            raise TaskError(f"'{name}': its heldout is not contrastive.py's held-out pairs (ids and mask [2, n, L]): "
                            f"give the documents with --eval_data=FILE")
        ids, mask, rows = held['ids'].long(), held['mask'].long(), None
        said = f"the contrastive run's {ids.size(1):,} held-out pairs ({held.get('source') or 'source not recorded'})"
    else:
        found, tried = prepared_dir(ckpt, name)
        if not found:
            raise TaskError("--task=retrieval needs documents: --eval_data=FILE (.txt paragraphs or .jsonl 'text'); this model's "
                            "training data (its validation split) is not on this machine" +
                            (f" (tried {', '.join(os.path.join(t, 'val.bin') for t in tried)})" if tried else ''))
        rows, said = [data.val_prefix(found, 2**31)], f"the validation documents of {found}"
    if rows is not None:  # a token more than is kept: the halves that reach it are those cut
        ids, mask = data.probe_pairs(rows, bos, eos, 1, 2**31, max_len=max_len - 1)
    long = mask.sum(-1) > max_len  # [2, n]: cut, ending in </s> as the tokenizer cuts
    if long.any():
        ids, mask = ids[..., :max_len].clone(), mask[..., :max_len]
        ids[..., max_len - 1][long] = eos
    seen, keep, repeated = set(), [], 0
    for i in range(ids.size(1)):
        if len(keep) == (max_pairs or 2**31):
            break
        halves = [tuple(ids[s, i, :int(mask[s, i].sum())].tolist()) for s in (0, 1)]
        if seen.isdisjoint(halves):
            keep.append(i)
        else:
            repeated += 1
        seen.update(halves)
    if len(keep) < 2:
        raise TaskError(f'--max_pairs={max_pairs} ranks one pair against nothing: give 2 or more (0: all)' if max_pairs == 1 else
                        f'retrieval needs at least 2 documents of 32 tokens or more; found {len(keep)}' +
                        (f' (and {repeated} repeated)' if repeated else ''))
    keep = torch.tensor(keep)
    ids, mask = ids[:, keep], mask[:, keep]
    L = int(mask.sum(-1).max())
    said = ((said if rows is None else f"{len(keep):,} pairs, the first and second halves of {said}") +
            (f", the first {max_pairs:,} (--max_pairs)" if max_pairs and len(keep) == max_pairs else '') +
            (f"; {repeated:,} repeated pairs left out (a half seen before would have two right answers)" if repeated else ''))
    return ids[..., :L], mask[..., :L], dict(said=said, cut=int(long[:, keep].sum()))


def retrieval_pairs(ckpt, tok, name='', **settings):
    """[2, n, L] ids and mask of the pairs --task=retrieval ranks (retrieval_source's, without what it says of them)."""
    return retrieval_source(ckpt, tok, name, **settings)[:2]


def sts_pairs(path, first='sentence1', second='sentence2', score='', flags=None, keep=0):
    """[(text, text, score)] of a file of scored pairs: the columns first, second and score ('' = score if the file has
    it, else label); flags: the caller's settings that name these three columns (finetune.py's ('text_field',
    'pair_field', 'label_field')), named where a column is missing; without them (contrastive.py's --sts_data) the
    error says what columns the file needs. keep: a fixed random subset of this many (0: all). TaskError for a row
    without them, and for pairs that leave Spearman undefined, or a ranking of float noise, whatever the model: scores
    all equal, or every pair one text twice (every cosine 1)."""
    rows = read_rows(path)
    score = score or ('score' if rows and 'score' in rows[0][1] else 'label')
    flag = dict(zip((first, second, score), flags or (None,) * 3))
    need = f"a file of scored pairs needs columns {first}, {second} and {'score (or label)' if score in ('score', 'label') else score}"
    pairs = []
    for i, r in rows:
        a, b = text(path, i, r, first, flag[first], need), text(path, i, r, second, flag[second], need)
        y = number(label(path, i, r, score, flag[score], need))
        if y is None:
            raise TaskError(f"'{path}', line {i}: the score in '{score}' is {r[score]!r}, not a number")
        pairs.append((a, b, y))
    pairs = subset(pairs, keep)
    where = f"'{path}'" + (f' (--max_eval={keep})' if keep else '')
    if len(pairs) < 2:
        raise TaskError(f"{where}: needs at least 2 scored pairs; found {len(pairs)}")
    if len({p[2] for p in pairs}) == 1:
        raise TaskError(f"{where}: every pair has the score {pairs[0][2]:g}: Spearman and Pearson against a constant "
                        f"are undefined; it needs pairs with different scores")
    if all(a == b for a, b, _ in pairs):
        raise TaskError(f"{where}: every pair is one text twice: every model's cosines are all 1, and Spearman undefined "
                        f"(or a ranking of float noise); it needs pairs of different texts")
    return pairs


# -----------------------------------------------------------------------------------------------
# BEIR-format retrieval (Thakur et al. 2021): a folder of corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv, as BEIR and
# MTEB ship their retrieval sets; scored as BEIR's EvaluateRetrieval scores an exact dense search (pytrec_eval)

NDCG_AT, RECALL_AT, MRR_AT = 10, 100, 10
BEIR_FILES = ('corpus.jsonl', 'queries.jsonl')


def beir_paths(folder, split):
    """The three files of a BEIR folder that --task=beir reads."""
    return [os.path.join(folder, f) for f in BEIR_FILES] + [os.path.join(folder, 'qrels', f'{split}.tsv')]


def beir_rows(path, what):
    """{_id: (line, row)} of a BEIR .jsonl file; TaskError for an _id missing, not a text, or given twice."""
    out = {}
    for line, row in read_rows(path):
        i = row.get('_id')
        if isinstance(i, int) and not isinstance(i, bool):
            i = str(i)  # qrels name it as text
        if not isinstance(i, str) or not i:
            raise TaskError(f"'{path}', line {line}: " + ("no '_id'" if '_id' not in row else f"'_id' is {json.dumps(i)}, not an id"))
        if i in out:
            raise TaskError(f"'{path}', line {line}: _id '{i}' again (first on line {out[i][0]}): each {what} needs an id of its own")
        for key in ('text', 'title'):
            v = row.get(key, '' if key == 'title' else None)
            if not isinstance(v, str) and not (key == 'title' and v is None):
                raise TaskError(f"'{path}', line {line}: " + (f"no '{key}'" if key not in row else f"'{key}' is {json.dumps(v)}, not a text"))
        out[i] = (line, row)
    if not out:
        raise TaskError(f"'{path}' holds no {what}s")
    return out


def beir_data(folder, split, keep=0):
    """A BEIR folder, checked: the corpus's texts as BEIR's SentenceBERT embeds them ((title + ' ' + text).strip(): a
    missing or null title is ''), and the queries that qrels/SPLIT.tsv gives a relevant document (score > 0) with
    their judgments {corpus index: score}. A judged query with no relevant document scores 0 whatever the model, as
    pytrec_eval scores it and BEIR averages it in (so that our numbers are BEIR's); they are counted. TaskError for
    what would give a wrong number: an unknown query, a score that is no whole number (pytrec_eval's are ints), a
    pair judged twice differently, and qrels naming many documents the corpus lacks (another dataset's). keep: a fixed
    random subset of this many queries (0: all)."""
    if not os.path.isdir(folder):
        raise TaskError(f"--eval_data='{folder}': " + ('a file; --task=beir needs a BEIR folder (corpus.jsonl, queries.jsonl, '
                                                       f'qrels/{split}.tsv)' if os.path.isfile(folder) else 'folder not found'))
    for path in beir_paths(folder, split):
        if not os.path.isfile(path):
            qrels = os.path.dirname(path)
            there = sorted(f[:-4] for f in os.listdir(qrels) if f.endswith('.tsv')) if os.path.isdir(qrels) else []
            raise TaskError(f"'{folder}' has no {os.path.relpath(path, folder)}" + (
                f": unpack {os.path.basename(path)}.gz (gunzip)" if os.path.isfile(path + '.gz') else
                f": its qrels are {', '.join(there)}: choose one with --beir_split=" if there and path.endswith('.tsv') else
                f": a BEIR folder holds {', '.join(BEIR_FILES)} and qrels/{split}.tsv"))
    corpus_file, query_file, qrels_file = beir_paths(folder, split)
    docs = beir_rows(corpus_file, 'document')
    doc_ids = list(docs)
    texts = [(((r.get('title') or '') + ' ' + r['text']).strip()) for _, r in docs.values()]
    index = {d: i for i, d in enumerate(doc_ids)}
    del docs
    queries = beir_rows(query_file, 'query')
    rows = read_rows(qrels_file)
    if not rows:
        raise TaskError(f"'{qrels_file}' holds no judgments (a header 'query-id corpus-id score', then a line per judgment)")
    if len(rows[0][1]) != 3 or number(list(rows[0][1])[2]) is not None:
        raise TaskError(f"'{qrels_file}', line 1: " + (f'{len(rows[0][1])} columns; BEIR qrels have 3 (query-id, corpus-id, score)'
                        if len(rows[0][1]) != 3 else "looks like a judgment, not the header 'query-id corpus-id score'"))
    judged, unknown = {}, []  # {query id: {document id: (score, line)}}; (line, document id) of unknown documents
    for line, r in rows:
        q, d, score = r.values()
        rel = number(score)
        if rel is None or not rel.is_integer():
            raise TaskError(f"'{qrels_file}', line {line}: the score {score!r} is not a whole number (relevance: 0 not relevant, 1, 2, ...)")
        if q not in queries:
            n = sum(list(x.values())[0] not in queries for _, x in rows)
            raise TaskError(f"'{qrels_file}', line {line}: query '{q}' is not in queries.jsonl ({n:,} row{'s' * (n > 1)} name unknown "
                            f"queries): the qrels and queries are of different datasets or versions")
        if d not in index:
            unknown.append((line, d))
        seen = judged.setdefault(q, {}).get(d)
        if seen and seen[0] != int(rel):
            raise TaskError(f"'{qrels_file}', line {line}: query '{q}', document '{d}' judged {int(rel)}, and {seen[0]} on line {seen[1]}")
        judged[q][d] = (int(rel), line)
    if len(unknown) * 100 > len(rows):  # a few are the dataset's own (ArguAna's qrels name a document its corpus lacks); more: a mismatch
        raise TaskError(f"'{qrels_file}', line {unknown[0][0]}: document '{unknown[0][1]}' is not in corpus.jsonl ({len(unknown):,} of "
                        f"{len(rows):,} rows name documents it lacks): the qrels and corpus are of different datasets or versions")
    kept = {q: judged[q] for q in subset(list(judged), keep)}
    if not any(s > 0 for j in judged.values() for s, _ in j.values()):
        raise TaskError(f"'{qrels_file}': no query has a relevant document (a score above 0): nothing to score")
    # a document the corpus lacks keeps its judgment, as in BEIR (unreachable: it counts in recall's denominator and the
    # ideal ranking); an index past the corpus stands for it
    missing = {d: len(doc_ids) + i for i, d in enumerate(sorted({d for _, d in unknown}))}
    return dict(folder=folder, split=split, texts=texts, doc_ids=doc_ids, query_ids=list(kept),
                queries=[queries[q][1]['text'] for q in kept],
                qrels=[{index.get(d, missing.get(d)): s for d, (s, _) in kept[q].items()} for q in kept],
                same=[index.get(q, -1) for q in kept], unanswerable=sum(not any(s > 0 for s, _ in j.values())
                                                                      for j in kept.values()), unknown=unknown, judged=len(judged))


def stable_top_k(sim, k):
    """(scores, column indices) [b, k] of each row's k highest: score descending, a tie by column ascending (torch.topk
    picks among scores tied at the k-th at will; a row where it had to choose is sorted whole, stably)."""
    k = min(k, sim.size(1))
    val, idx = sim.topk(k, dim=1)
    kth = val[:, -1:]
    cut = ((sim == kth).sum(1) > (val == kth).sum(1)).nonzero()[:, 0]
    if len(cut):
        val[cut], idx[cut] = (t[:, :k] for t in sim[cut].sort(dim=1, descending=True, stable=True))
    idx, order = idx.sort(dim=1)  # by column, then stably by score: ties in column order
    val, order = val.gather(1, order).sort(dim=1, descending=True, stable=True)
    return val, idx.gather(1, order)


def tie_order(doc_ids):
    """Each document's place [N] in trec_eval's order of equal scores (pytrec_eval's, so BEIR's): document id descending,
    as strcmp orders them (Python orders str as UTF-8 orders its bytes)."""
    place = torch.empty(len(doc_ids), dtype=torch.long)
    place[torch.tensor(sorted(range(len(doc_ids)), key=doc_ids.__getitem__, reverse=True), dtype=torch.long)] = \
        torch.arange(len(doc_ids))
    return place


def beir_search(queries, chunks, k, same=None, block=1024, tie=None):
    """Exact search: (scores, corpus indices) [nq, k] of the k best documents of each query (rows of L2-normalised
    embeddings: a dot product is a cosine) among corpus embeddings given as consecutive chunks, so that memory holds
    one chunk and [block, chunk] scores. Equal scores rank by tie[index] ascending (tie_order: trec_eval's document id
    descending, so that the top k are those of trec_eval's whole ranking); without tie, in corpus order. same[q], the
    index of a document with the query's own _id (-1: none), is never retrieved, as BEIR's search and
    EvaluateRetrieval(ignore_identical_ids=True) leave it out; with fewer than k documents, the slots left hold -inf."""
    nq, start, best = queries.size(0), 0, None
    same = torch.as_tensor([-1] * nq if same is None else same, device=queries.device)
    tie = None if tie is None else tie.to(queries.device)
    for chunk in chunks:
        n = chunk.size(0)
        order = None if tie is None else tie[start:start + n].argsort()  # the chunk's columns in tie order
        if order is not None:
            chunk, column = chunk[order], order.argsort()
        found = []
        for i in range(0, nq, block):  # float64, kept as float32: a score is then one of the two embeddings alone, not
            # of where a matrix kernel met them (its rounding differs by column), so that equal embeddings tie exactly
            sim = (queries[i:i + block].double() @ chunk.double().T).float()
            own = same[i:i + block] - start
            hit = ((own >= 0) & (own < n)).nonzero()[:, 0]
            sim[hit, own[hit] if order is None else column[own[hit]]] = -math.inf
            found.append(stable_top_k(sim, k))
        val, idx = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        idx = (idx if order is None else order[idx]) + start
        if best is not None:  # by score, equal scores by tie (or index): sorted by the second key, then stably by the first
            val, idx = torch.cat([best[0], val], 1), torch.cat([best[1], idx], 1)
            _, by = (idx if tie is None else tie[idx]).sort(dim=1)
            val, idx = val.gather(1, by), idx.gather(1, by)
            val, by = val.sort(dim=1, descending=True, stable=True)
            val, idx = val[:, :k], idx.gather(1, by)[:, :k]
        best, start = (val, idx), start + n
    return best


def beir_metrics(ranked, qrels):
    """Mean nDCG@10, recall@100 and MRR@10 over queries, as pytrec_eval (ndcg_cut, recall) and BEIR (mrr) compute them:
    ranked[q] lists corpus indices best first, qrels[q] is {corpus index: graded relevance}. nDCG: gain = relevance
    (0 below 1), discount log2(rank + 1), over the ideal order of all the query's judged documents; recall: relevant
    documents (score > 0) in the top 100 over all relevant; MRR: 1 / rank of the first relevant in the top 10, else 0."""
    def dcg(gains):
        return sum(g / math.log2(r + 2) for r, g in enumerate(gains[:NDCG_AT]))

    ndcg, recall, mrr = [], [], []
    for docs, rel in zip(ranked, qrels):
        gain = [max(rel.get(d, 0), 0) for d in docs]
        ideal = sorted((s for s in rel.values() if s > 0), reverse=True)
        ndcg.append(dcg(gain) / dcg(ideal) if ideal else 0.0)  # no relevant document: 0, as pytrec_eval
        recall.append(sum(g > 0 for g in gain[:RECALL_AT]) / len(ideal) if ideal else 0.0)
        mrr.append(next((1 / (r + 1) for r, g in enumerate(gain[:MRR_AT]) if g > 0), 0.0))
    return {f'ndcg@{NDCG_AT}': float(np.mean(ndcg)), f'recall@{RECALL_AT}': float(np.mean(recall)),
            f'mrr@{MRR_AT}': float(np.mean(mrr))}


def beir_scores(encoder, tok, beir, pooling, dev, autocast=nullcontext(), chunk=16384, max_len=128):
    """nDCG@10, recall@100, MRR@10 of the model's exact cosine search over a BEIR folder (beir_data), the corpus embedded
    a chunk at a time (memory: one chunk's texts' tokens and embeddings, not the whole corpus's); equal scores ranked as
    trec_eval ranks them (tie_order), and MRR@10 on the same ranking. cut: how many texts were cut at max_len tokens.
    CollapsedError for a model that gives every text the same embedding (its ranking would be the tie order's)."""
    encoder.eval()
    queries, cut = embed(encoder, tok, beir['queries'], pooling, dev, autocast, max_len=max_len)
    texts, far = beir['texts'], [spread(queries, queries[0]), cut]
    hashes, counts = np.unique(np.fromiter(map(hash, texts), np.int64, len(texts)), return_counts=True)
    repeated, copied = set(hashes[counts > 1].tolist()), {}  # a text the corpus holds twice: one embedding for its copies

    def chunks():
        for i in range(0, len(texts), chunk):
            emb, n = embed(encoder, tok, texts[i:i + chunk], pooling, dev, autocast, max_len=max_len)
            for j, t in enumerate(texts[i:i + chunk]):
                if hash(t) in repeated and t in copied:  # a copy in another chunk, embedded in another batch: float noise apart
                    emb[j] = copied[t]
                elif hash(t) in repeated:
                    copied[t] = emb[j].clone()
            far[0], far[1] = max(far[0], spread(emb, queries[0])), far[1] + n
            yield emb

    val, idx = beir_search(queries, chunks(), max(NDCG_AT, RECALL_AT, MRR_AT), beir['same'], tie=tie_order(beir['doc_ids']))
    if any(t != texts[0] for ts in (texts, beir['queries']) for t in ts):
        check_apart(far[0], 'BEIR')
    ranked = [[d for d, v in zip(row, vals) if v > -math.inf] for row, vals in zip(idx.tolist(), val.tolist())]
    return dict(beir_metrics(ranked, beir['qrels']), queries=len(ranked), documents=len(texts), cut=far[1])
