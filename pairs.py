"""
Text pairs for contrastive.py: labelled pairs or triplets from a file, or positives built from raw text (the halves
of a document, or a text twice), and the held-out pairs that pick best.pt, held out by content: a text on the
held-out side is never trained on, whichever file or copy it comes from.

    from pairs import load
    tokens, spans, eval_set, sts, said = load(tok, (bos, eos), ckpt, name, batch, config)

A text is a span of one token array (no special tokens); pairs are spans [K, n, 2], K = 2 (anchor, positive) or 3
(and a hard negative). Settings come in as arguments: `c` is contrastive.py's resolved config (a dict).
"""

import os

import numpy as np
import torch

import data
import evaluation

MIN_HALF = 16  # data.probe_pairs' min_len: a document gives two halves when it has 2 x 16 tokens or more
SPLIT_SEED = 1337  # the held-out split's, data.py's default: runs of other seeds are scored on the same held-out text
# sentence-transformers' column names for each role; without them it reads the columns in order
COLUMNS = dict(anchor=('anchor', 'sentence1', 'query', 'question'),
               positive=('positive', 'sentence2', 'document', 'answer'), negative=('negative', 'sentence3'))
NOT_TEXT = ('label', 'labels', 'score', 'scores', 'id')


def collate(seqs, bos, eos, device='cpu'):
    """(ids, attention_mask) of token arrays as the tokenizer encodes a text: <s> text </s>, padded with <pad> (1)."""
    ids = np.ones((len(seqs), max(len(s) for s in seqs) + 2), np.int64)
    for i, s in enumerate(seqs):
        ids[i, 0], ids[i, 1:len(s) + 1], ids[i, len(s) + 1] = bos, s, eos
    ids = torch.from_numpy(ids)
    return ids.to(device), (ids != 1).long().to(device)


# -----------------------------------------------------------------------------------------------
# data: a text is a span of one token array (no special tokens); pairs are spans [K, n, 2], K = 2 or 3

def encode(tok, texts):
    """(token array, spans [n, 2]) of texts, encoded whole (clip cuts them to max_len when they are used)."""
    ids = [x for i in range(0, len(texts), 1000) for x in tok(texts[i:i + 1000], add_special_tokens=False)['input_ids']]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    return np.fromiter((t for x in ids for t in x), np.int32, int(lengths.sum())), np.stack([lengths.cumsum() - lengths,
                                                                                           lengths.cumsum()], 1)


def labelled_pairs(path, tok, c):
    """(tokens, spans) of a file of pairs or triplets, its columns picked as sentence-transformers does: by the
    names it knows, else in order. A file whose score or label column says some rows are not positives is refused:
    every row trains as a positive."""
    anchor_field, positive_field, negative_field, max_len = (c[k] for k in ('anchor_field', 'positive_field',
                                                                            'negative_field', 'max_len'))
    rows = evaluation.read_rows(path)
    columns = [c for c in (rows[0][1] if rows else {}) if c not in NOT_TEXT]
    scored = [c for c in (rows[0][1] if rows else {}) if c in NOT_TEXT[:4]]
    values = sorted({str(r.get(scored[0])) for _, r in rows}) if scored else []
    # sentence-transformers' MNRL takes (anchor, positive) rows only: scores or labels that differ (or all say 0)
    # belong to other losses; a label that is the same positive value on every row says nothing
    if len(values) > 1 or values and float(evaluation.number(values[0]) or 0) <= 0:
        raise evaluation.TaskError(
            f"'{path}' has a '{scored[0]}' column ({len(values)} value{'s' * (len(values) != 1)}: "
            f"{', '.join(values[:5])}{', ...' * (len(values) > 5)}): contrastive.py trains every row as a positive pair; "
            f"keep only the positive rows and drop the column (a scored file is for evaluation: --sts_data=)")
    named = [next((c for c in COLUMNS[role] if c in columns), '') for role in COLUMNS]
    picked = ([anchor_field or named[0], positive_field or named[1], negative_field or named[2]]
              if anchor_field or positive_field or named[0] and named[1] else (columns + ['', ''])[:3])
    picked = [(c, role) for c, role in zip(picked, COLUMNS) if c]
    if len(picked) < 2:
        raise evaluation.TaskError(
            f"'{path}' has {len(columns)} text column{'s' * (len(columns) != 1)} ({', '.join(columns) or 'none'}): a pair "
            f"needs two (anchor/positive, sentence1/sentence2 or query/document; --anchor_field= and --positive_field= "
            f"name others); for raw text, build the pairs from it with --pairs=halves or --pairs=simcse")
    tokens, spans = encode(tok, [evaluation.text(path, line, r, c, f'{role}_field') for c, role in picked for line, r in rows])
    for i in np.flatnonzero(spans[:, 1] == spans[:, 0])[:1]:
        raise evaluation.TaskError(f"'{path}', line {rows[i % len(rows)][0]}: '{picked[i // len(rows)][0]}' has no tokens")
    spans = spans.reshape(len(picked), len(rows), 2)
    ids = digests(tokens, clip(spans, max_len))
    itself = ids[0] == ids[1]  # a positive that is its anchor (as the model sees them) teaches nothing and scores 1
    if itself.all():
        raise evaluation.TaskError(f"'{path}': every {picked[1][0]} is the same text as its {picked[0][0]} (within max_len "
                                 f"{max_len}): a pair needs two different texts that mean the same")
    print(f"{path}: {len(rows):,} {'triplets' if len(picked) == 3 else 'pairs'} ({' / '.join(c for c, _ in picked)})" +
          (f"; {int(itself.sum()):,} whose {picked[1][0]} is their {picked[0][0]} left out (they teach nothing)"
           if itself.any() else ''))
    return tokens, spans[:, ~itself]


def digests(tokens, spans):
    """data.digests of each span's token sequence (any token dtype alike), shaped as spans without their last axis:
    held-out text is kept out of training by content, so a duplicate is on one side only."""
    return data.digests(np.asarray(tokens[a:b], np.int32).tobytes() for a, b in spans.reshape(-1, 2)).reshape(spans.shape[:-1])


def split_documents(tokens, eos):
    """spans [n, 2] of the </s>-separated documents of a token array."""
    ends = np.concatenate([np.flatnonzero(tokens[i:i + 2**24] == eos) + i for i in range(0, len(tokens), 2**24)] or
                          [np.zeros(0, np.int64)])
    return np.stack([np.concatenate([[0], ends[:-1] + 1]), ends], 1).astype(np.int64)


def raw_text(tok, eos, c, eval_file=None):
    """(tokens, document spans [n, 2] to train on, held-out documents as one </s>-separated row or None, lines to
    print); eval_file: --eval_data's pairs, when it holds pairs. Held out by content (a document's digest, data.py's uniform rule at SPLIT_SEED), each held-out text
    once; a training document equal to a held-out one is dropped, so that held-out means never trained on."""
    data_dir, dataset, eval_data, val_frac = c['data_dir'], c['dataset'], c['eval_data'], c['val_frac']
    text_field, txt_split = c['text_field'], c['txt_split']
    said = []
    if data_dir:  # prepared: train.bin trains, val.bin is held out
        meta, _, fingerprint = data.load_prepared(data_dir)
        if fingerprint['tokenizer'] != data.tokenizer_fingerprint(tok):
            raise data.DataError(f"data_dir '{data_dir}' was prepared with another vocabulary than the model's: prepare "
                                 f"it with the model's tokenizer (data.py --tokenizer=...)")
        tokens = np.memmap(os.path.join(data_dir, 'train.bin'), dtype=meta['dtype'], mode='r')
        docs, held = split_documents(tokens, eos), np.asarray(data.val_prefix(data_dir, 2**40))
        held_ids = set(digests(held, split_documents(held, eos)).tolist())
    else:  # the sources train.py reads, through data.py's one reader of text
        texts, skipped = data.read_texts(dataset, text_field, txt_split)
        if skipped:
            said.append(f"{dataset}: skipped {skipped:,} rows whose '{text_field}' is null, blank or not text")
        if not texts:
            raise data.DataError(f"'{dataset}' holds no text" + (f" in '{text_field}' (--text_field names the column)"
                                                                   if skipped else ''))
        tokens, docs = encode(tok, texts)
        ids = digests(tokens, docs)  # what the model sees: equal texts are equal tokens
        # data.py's rule on the text itself (the same split whatever the tokenizer, as prepare draws it)
        out = data._uniform(data.text_digests(texts), SPLIT_SEED) < (0 if eval_data else val_frac)
        first = np.zeros(len(docs), bool)
        first[np.unique(ids, return_index=True)[1]] = True  # a text given twice is held out (and evaluated) once
        held = np.concatenate([x for a, b in docs[out & first] for x in (tokens[a:b], [eos])]) if out.any() else None
        held_ids = set(ids[out].tolist())
        if out.all() and text_pairs(docs, c['pairs']).shape[1]:  # (none long enough: said as such by load)
            raise data.DataError(f"val_frac={val_frac} holds out every document of '{dataset}' ({len(docs):,}): lower "
                                 f"--val_frac, or give --eval_data=FILE and train on all of it")
        if out.any() and not eval_data:
            said.append(f"held out: {int((out & first).sum()):,} documents by content (val_frac={val_frac}), never trained on")
        docs = docs[~out]
    if eval_data:  # documents or pairs of its own: their texts are never trained on either
        held_ids |= heldout_texts(tok, c, eval_file)
    keep = ~np.isin(digests(tokens, docs), np.array(sorted(held_ids), np.uint64)) if held_ids else np.ones(len(docs), bool)
    if not keep.all():
        said.append(f"dropped {int((~keep).sum()):,} training documents whose text is also held out (in "
                    f"{eval_data or os.path.join(data_dir, 'val.bin')}): held-out text is never trained on")
    if len(docs) and not keep.any():
        raise data.DataError(f"every training document of '{data_dir or dataset}' is also held out"
                             + (f" in --eval_data='{eval_data}'" if eval_data else '') + ": nothing is left to train on; "
                             "evaluate on other text than you train on")
    return tokens, docs[keep], held, said


def heldout_texts(tok, c, eval_file=None):
    """Digests of every text of --eval_data: its pairs' texts (eval_file, as labelled_pairs read them), or its
    documents."""
    if eval_file:
        return set(digests(*eval_file).ravel().tolist())
    texts, _ = data.read_texts(c['eval_data'], c['text_field'], c['txt_split'])
    t, docs = encode(tok, texts)
    return set(digests(t, docs).tolist())


def is_pairs_file(path, text_field):
    """Whether --eval_data is a file of pairs (.csv/.tsv, or .jsonl rows without the text field) or of documents."""
    first = evaluation.read_rows(path)[:1] if path.endswith('.jsonl') else []
    return path.endswith(('.csv', '.tsv')) or bool(first) and text_field not in first[0][1]


def text_pairs(docs, pairs):
    """[K, n, 2] training texts of raw documents [n, 2]: each one's halves (at least MIN_HALF tokens each: the split
    data.probe_pairs makes for the evaluation), or itself twice (simcse)."""
    start, length = docs[:, 0], docs[:, 1] - docs[:, 0]
    keep = length >= (1 if pairs == 'simcse' else 2 * MIN_HALF)
    start, length = start[keep], length[keep]
    cut = start + (length if pairs == 'simcse' else length // 2)
    first = np.stack([start, cut], 1)
    return np.stack([first, first if pairs == 'simcse' else np.stack([cut, start + length], 1)])


def clip(spans, max_len):  # what the model sees of a text: max_len tokens with <s> and </s>
    return np.stack([spans[..., 0], np.minimum(spans[..., 1], spans[..., 0] + max_len - 2)], -1)


def text_ids(tokens, spans, max_len):
    """[K, n] ids of texts: equal for equal token sequences (within this process)."""
    return torch.tensor([[hash(tokens[a:b].tobytes()) for a, b in column] for column in clip(spans, max_len)])


def heldout_pairs(tokens, spans, special, c, n=None, held_ids=()):
    """(training spans, [2, m, L] ids and mask of held-out pairs, as data.probe_pairs gives and retrieval_scores
    ranks, or None; training pairs dropped). Held out by the anchor's text (one anchor is never on both sides) unless
    n: the first n pairs of all; a pair whose anchor or positive was already seen is left out (one right answer per
    query). A training pair holding a held-out text (or one of held_ids: --eval_data's) is dropped: never trained on."""
    max_len, eval_data, val_frac, eval_pairs = c['max_len'], c['eval_data'], c['val_frac'], c['eval_pairs']
    ids = digests(tokens, clip(spans, max_len))  # [K, n]: texts as the model sees them
    out = np.ones(ids.shape[1], bool) if n else data._uniform(ids[0], SPLIT_SEED) < (0 if eval_data else val_frac)
    seen, keep = set(), []
    for i, (a, p) in zip(np.flatnonzero(out), ids[:2, out].T.tolist()):
        if a not in seen and p not in seen and len(keep) < (n or eval_pairs):
            keep.append(i)
        seen |= {a, p}
    held = np.array(sorted(set(ids[:2, out].ravel().tolist()) | set(held_ids)), np.uint64)
    train = ~out & ~np.isin(ids, held).any(0)
    dropped = int((~out).sum() - train.sum())
    if len(keep) < 2:
        return spans[:, train], None, dropped
    ids, mask = collate([tokens[a:b] for a, b in clip(spans[:2, keep], max_len).reshape(-1, 2)], *special)
    return spans[:, train], (ids.view(2, len(keep), -1), mask.view(2, len(keep), -1)), dropped


def digest(array):
    """A short stable id of an array's bytes (what a run trains or is evaluated on)."""
    return f'{data.digests([np.ascontiguousarray(array).tobytes()])[0]:016x}'


def load(tok, special, ckpt, name, GB, c):
    """(tokens, training spans, held-out pairs, STS pairs or None, lines to print); a TaskError or DataError for data
    that cannot work, naming what to change."""
    data_dir, dataset, eval_data, val_frac, pairs = c['data_dir'], c['dataset'], c['eval_data'], c['val_frac'], c['pairs']
    max_len, eval_pairs, text_field = c['max_len'], c['eval_pairs'], c['text_field']
    source = data_dir or dataset
    eval_file = labelled_pairs(eval_data, tok, c) if eval_data and is_pairs_file(eval_data, text_field) else None  # read once
    if pairs == 'labelled':
        tokens, spans = labelled_pairs(dataset, tok, c)
        held_ids = heldout_texts(tok, c, eval_file) if eval_data else ()
        spans, eval_set, dropped = heldout_pairs(tokens, spans, special, c, held_ids=held_ids)
        said = [f"dropped {dropped:,} training pairs holding a held-out text ({eval_data or 'val_frac'}): held-out "
                f"text is never trained on"] if dropped else []
        if not spans.shape[1]:
            raise evaluation.TaskError(f"every pair of '{dataset}' is held out" + (
                f" or shares a text with --eval_data='{eval_data}'" if eval_data else f" (val_frac={val_frac})") +
                ": nothing is left to train on; lower --val_frac, or evaluate on other text than you train on")
    else:
        tokens, docs, held, said = raw_text(tok, special[1], c, eval_file)
        spans = text_pairs(docs, pairs)
        if not spans.shape[1]:
            raise data.DataError(f"no training document of '{source}' has {2 * MIN_HALF} tokens or more to split into "
                                 f"halves: give longer documents (--txt_split=file for .txt files), or use --pairs=simcse")
        eval_set = data.probe_pairs([held], *special, 1, eval_pairs, max_len=max_len - 2) if held is not None else None
    if spans.shape[1] < 2:
        raise evaluation.TaskError(f"'{source}' gives {spans.shape[1]} training pair" + (
            f" once val_frac={val_frac} is held out" if val_frac and not eval_data and not data_dir else '') +
            ": a batch needs 2 or more (the other pairs of a batch are each pair's negatives): give more text" +
            (", or lower --val_frac" if val_frac and not eval_data and not data_dir else ''))
    for k in (0, 1):
        if len(set(text_ids(tokens, spans[k:k + 1], max_len)[0].tolist())) < 2:
            raise evaluation.TaskError(f"every {('anchor', 'positive')[k]} text of '{source}' is the same: no "
                                     f"pair of a batch has a negative (the texts of the other pairs)")
    if eval_data:  # a pairs file, or documents (read as finetune.py --task=retrieval reads them: their halves)
        if eval_file:
            eval_set = heldout_pairs(*eval_file, special, c, eval_pairs)[1]
        else:
            eval_set = evaluation.retrieval_pairs(ckpt, tok, name, eval_data=eval_data, max_len=max_len,
                                                  max_pairs=eval_pairs, text_field=text_field)
        if eval_set is None or eval_set[0].size(1) < 2:
            raise evaluation.TaskError(f"--eval_data='{eval_data}' gives fewer than 2 "
                                     f"held-out pairs with distinct texts: retrieval needs 2 or more; give more pairs "
                                     f"(or documents of {2 * MIN_HALF}+ tokens)")
    if eval_set is None or eval_set[0].size(1) < 2:
        n = 0 if eval_set is None else eval_set[0].size(1)
        if pairs == 'labelled':
            why = f"val_frac={val_frac} holds out {n} pair(s) with distinct texts: raise --val_frac"
        elif held is None:
            why = f"val_frac={val_frac} holds out no document of '{source}': raise --val_frac"
        else:
            lengths = np.diff(split_documents(held, special[1]), axis=1)
            longest = int((docs[:, 1] - docs[:, 0]).max(initial=0))
            why = (f"{len(lengths)} held-out documents, {n} of {2 * MIN_HALF}+ tokens: the evaluation ranks the halves of "
                   f"held-out documents (with --pairs={pairs} too), " + (
                       f"and no document of '{source}' is that long (the longest: {longest} tokens): give pairs to "
                       f"evaluate on with --eval_data=PAIRS.jsonl (anchor, positive)" if longest < 2 * MIN_HALF else
                       "2 or more are needed: raise --val_frac"))
        raise evaluation.TaskError(f"too little to evaluate on: {why}, or give --eval_data=FILE (documents, or pairs)")
    if spans.shape[1] < GB:
        raise evaluation.TaskError(f'{spans.shape[1]:,} training pairs, fewer than one batch of {GB:,} (batch_size x '
                                 f'processes): lower batch_size')
    sts = evaluation.sts_pairs(c['sts_data']) if c['sts_data'] else None
    return tokens, spans, eval_set, sts, said


