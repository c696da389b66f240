"""
Contrastive fine-tuning: an MPNet becomes (or becomes a better) sentence-embedding model. InfoNCE with
in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss), large batches at the memory of a
small one (gradient caching), the negatives of every GPU shared under torchrun.

    python contrastive.py out-tiny/best.pt config/contrastive_raw.py                  # pretrained here, then this stage
    python contrastive.py out-tiny/best.pt config/contrastive_raw.py --pairs=simcse   # SimCSE: a text twice, dropout as noise
    python contrastive.py path/to/all-mpnet-base-v2 config/contrastive_raw.py --dataset=my_docs.jsonl   # your domain's text
    python contrastive.py path/to/all-mpnet-base-v2 config/contrastive_pairs.py --dataset=pairs.jsonl   # labelled pairs
    python contrastive.py config/contrastive_raw.py --init_from=resume                # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=8 contrastive.py MODEL config/contrastive_pairs.py   # 8 x the negatives
    python convert_hf.py out-contrastive-raw/best.pt out-contrastive-raw/st           # -> SentenceTransformer(folder)

Models: checkpoints of this project, HF MPNet names or folders, sentence-transformers folders, whose pooling
and normalisation are used and kept for the export; a model without them gets mean pooling + Normalize (see
sentence_files). Data: labelled pairs or triplets (.jsonl/.csv/.tsv, sentence-transformers' columns), or raw
text (the sources train.py reads, or a prepared data_dir) whose positives come from the text itself: the two
halves of a document (--pairs=halves) or the same text twice (--pairs=simcse). Every eval_interval steps: the
retrieval finetune.py --task=retrieval measures (MRR, top-1, unrelated cosine) on held-out pairs, the held-out
InfoNCE loss, optionally STS. The run folder is train.py's (checkpoint.py): a previous run is never replaced by
accident, saves are atomic, best.pt holds the highest held-out MRR, ckpt.pt resumes, metrics.jsonl feeds plot.py.
"""

import json
import math
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention import sdpa_kernel

import data
import evaluation
from checkpoint import (CheckpointError, carried_for_export, checkpoint_bytes, cpu_attention, model_from_checkpoint,
                        shown_score, stop_unless_ranks_agree)
from configurator import ConfigError, check_device, configure, die
from convert_hf import ConvertError, quiet_transformers, sentence_pooling, tokenizer_files_of
from model import MASK_GRAD_BACKENDS, MPNet
from pairs import clip, collate, digest, load, text_ids
from run import Clock, Run, start_processes

# -----------------------------------------------------------------------------------------------
# I/O
init_from: str = ''                     # the model, usually given first: a .pt, an HF or sentence-transformers name/folder; 'resume'
out_dir: str = 'out-contrastive'        # the run's folder: ckpt.pt, best.pt (see best_by), metrics.jsonl, curves.png
overwrite: bool = False                 # start over in an out_dir that holds a run (moved to replaced/ until beaten)
eval_interval: int = 100                # evaluate (and save) every this many steps
eval_pairs: int = 1000                  # held-out pairs the retrieval ranks, each first text against every second one
log_interval: int = 10                  # steps per log line
curves: bool = True                     # redraw out_dir/curves.png after each evaluation (plot.py, in the background)
# data
dataset: str = 'pydocs'                 # raw: 'pydocs' (built in), a .txt/.jsonl/.parquet file or folder; labelled: a .jsonl/.csv/.tsv
data_dir: str = ''                      # raw text from a prepared folder instead of dataset (data.py): train.bin trains, val.bin evaluates
pairs: str = 'halves'                   # raw text: 'halves' (of each document) or 'simcse' (each text twice); 'labelled': columns
anchor_field: str = ''                  # labelled: the anchor column ('' = anchor, sentence1, query or question, else the first)
positive_field: str = ''                # ... the positive ('' = positive, sentence2, document or answer, else the second)
negative_field: str = ''                # ... a hard negative ('' = negative or sentence3, else a third column if any)
text_field: str = 'text'                # raw text: the column of .jsonl / .parquet files
txt_split: str = 'paragraph'            # raw text: a .txt file's documents: 'line', 'paragraph' or 'file'
val_frac: float = 0.05                  # held out for evaluation, by document (raw) or by anchor (labelled), unless eval_data
eval_data: str = ''                     # evaluate on this instead: .txt/.jsonl documents (their halves) or a pairs file
sts_data: str = ''                      # a general set: Spearman on its scored pairs (sentence1, sentence2, score) at each evaluation
best_by: str = 'mrr'                    # what picks best.pt: 'mrr' (held-out), 'sts' (sts_data's Spearman) or 'mean' (of the two)
max_len: int = 128                      # tokens per text, <s> and </s> included (sentence-transformers' max_seq_length)
tokenizer: str = 'model'                # 'model' = the one the model carries; another must have its vocabulary
# loss: InfoNCE with in-batch negatives
scale: float = 20.0                     # cosine similarity x scale: temperature 0.05, as sentence-transformers' MNRL
symmetric: bool = False                 # also each positive against every anchor, the two losses averaged
distill: float = 0.0                    # keep what the start knew: + distill x each text's squared distance from the start's embedding
batch_size: int = 64                    # pairs per GPU per step: the texts of the others are each pair's negatives
mini_batch_size: int = 0                # gradient caching: at most this many texts through the model at once (0 = off)
# optimizer: AdamW, linear warmup, then linear decay to 0 at max_iters (sentence-transformers' schedule)
learning_rate: float = 2e-5             # peak, after warmup
max_iters: int = 1000                   # optimizer steps of the whole run
warmup_iters: int = 100                 # linear warmup from 0
weight_decay: float = 0.01              # on matrices and embeddings, not biases or norms
grad_clip: float = 1.0                  # 0 = off
dropout: float = 0.1                    # hidden and attention dropout of the encoder; SimCSE's only noise
# system
device: str = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda' or 'cuda:N'
dtype: str = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype on CUDA; CPU runs float32
seed: int = 1337                        # data order and dropout (the held-out split is fixed: pairs.SPLIT_SEED)
# -----------------------------------------------------------------------------------------------
config_keys = list(__annotations__)
CHOICES = dict(pairs=('labelled', 'halves', 'simcse'), best_by=('mrr', 'sts', 'mean'), dtype=('float32', 'bfloat16'),
               txt_split=('line', 'paragraph', 'file'))
MEASURE = dict(mrr='val_mrr', sts='val_sts', mean='val_mean')  # checkpoint.MEASURES: what picks best.pt
LIMITS = dict(max_len='>= 8', eval_pairs='>= 2', scale='> 0', mini_batch_size='>= 0', dropout='[0, 1)', distill='>= 0')



# -----------------------------------------------------------------------------------------------
# the loss, and one step's gradients with gradient caching and negatives from every rank

def embed(model, seqs, special, pooling, autocast=nullcontext()):
    """Sentence embeddings [N, C] (fp32, not normalised) of token arrays: <s> ('cls') or the mean over the text
    and its <s> </s> ('mean'), as sentence-transformers pools (and evaluation.pool, which adds no autograd)."""
    ids, mask = collate(seqs, *special, device=next(model.parameters()).device)
    with autocast:
        h = model.encode(ids, mask)
    return MPNet.pool(h, mask, pooling)  # fp32 (fp64 in the tests)


def info_nce(emb, text_ids, scale=20.0, symmetric=False):
    """MultipleNegativesRankingLoss of N pairs: emb [K, N, C] holds anchors, positives (and hard negatives,
    K=3); each anchor's cosine x scale with every positive and negative of the batch, cross-entropy with its own
    positive. text_ids [K, N]: equal ids are equal texts. A candidate that is the same text as the anchor or as
    its positive, or the positive of another copy of the anchor, is another right answer, not a negative:
    masked out. symmetric: also each positive against every anchor (sentence-transformers' per-direction mean)."""
    e = F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=-1)
    ga, gp, gc = text_ids[0], text_ids[1], text_ids[1:].flatten()
    n, own = e.size(1), torch.arange(e.size(1), device=e.device)
    same = (gc[None, :] == gp[:, None]) | (gc[None, :] == ga[:, None])
    same[:, :n] |= ga[None, :] == ga[:, None]
    same[own, own] = False
    loss = F.cross_entropy((scale * e[0] @ e[1:].flatten(0, 1).T).masked_fill(same, -math.inf), own)
    if symmetric:
        same = (ga[None, :] == ga[:, None]) | (gp[None, :] == gp[:, None]) | (ga[None, :] == gp[:, None])
        same[own, own] = False
        loss = (loss + F.cross_entropy((scale * e[1] @ e[0].T).masked_fill(same, -math.inf), own)) / 2
    return loss


def gather(x):
    """[K, B, C] of this rank -> [K, W*B, C] of every rank, in rank order. Only this rank's rows keep their autograd
    history: every rank computes the loss of the whole batch, so each row's full gradient reaches its own rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=1)


def rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def keep_start(emb, start_emb, n_texts):
    """Distillation toward the start model: the squared distance between each text's normalised embedding and the
    start's (start_emb, normalised, no gradient), summed over this rank's texts and divided by the whole batch's
    n_texts, so that the ranks' gradients add up to the batch mean (sum_gradients)."""
    e = F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=-1)
    return ((e - start_emb.to(e.dtype)) ** 2).sum() / n_texts


def contrastive_step(model, seqs, text_ids, special, pooling='mean', mini_batch_size=0, scale=20.0, symmetric=False,
                     autocast=nullcontext(), start=None, distill=0.0):
    """The loss of one step, its gradient accumulated into .grad (this rank's share: sum_gradients adds the ranks').
    seqs: this rank's K*B token arrays column by column (B anchors, B positives, B negatives); text_ids [K, W*B]:
    the whole batch's. mini_batch_size > 0: gradient caching (GradCache, Gao et al. 2021; sentence-transformers'
    CachedMultipleNegativesRankingLoss): every mini-batch is embedded without autograd, the gradient of the whole
    batch's loss w.r.t. those embeddings is taken, then each mini-batch runs again with autograd, its dropout
    replayed from the RNG state saved before its first run, and that gradient flows back through it. The memory
    is one mini-batch's; the gradient is exactly the whole batch's. start, distill > 0: the frozen start model, and
    the weight of keep_start's pull toward its embeddings of the same texts (dropout off, no autograd)."""
    device, m = next(model.parameters()).device, mini_batch_size
    if not m:  # a forward per column (anchors, positives, negatives), each padded to its own longest text, as
        B = len(seqs) // text_ids.size(0)  # sentence-transformers does: less padding, smaller (B, nh, T, T) tensors
        emb = torch.cat([embed(model, seqs[a:a + B], special, pooling, autocast) for a in range(0, len(seqs), B)])
    else:  # both runs on the SDPA backends autograd allows for a bias with a gradient: the same kernels, same dropout
        states, parts = [], []
        with torch.no_grad(), sdpa_kernel(MASK_GRAD_BACKENDS):
            for a in range(0, len(seqs), m):
                states.append(rng_state(device))
                parts.append(embed(model, seqs[a:a + m], special, pooling, autocast))
        emb = torch.cat(parts).requires_grad_()
    loss = info_nce(gather(emb.view(text_ids.size(0), -1, emb.size(-1))), text_ids, scale, symmetric)
    if distill:
        with torch.no_grad():
            size = m or len(seqs)
            start_emb = F.normalize(torch.cat([embed(start, seqs[a:a + size], special, pooling, autocast).float()
                                               for a in range(0, len(seqs), size)]), dim=-1)
        loss = loss + distill * keep_start(emb, start_emb, text_ids.numel())
    loss.backward()
    for a, state in zip(range(0, len(seqs), m or 1), states if m else []):
        set_rng_state(state, device)
        with sdpa_kernel(MASK_GRAD_BACKENDS):
            embed(model, seqs[a:a + m], special, pooling, autocast).backward(emb.grad[a:a + m])
    return loss.detach()


def sum_gradients(params):
    """Add up every rank's gradients: each rank holds its own rows' part of the gradient of the whole batch's loss."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def check_resume(ckpt, fingerprint, key, path, model=None):
    """CheckpointError unless the run resumed from ckpt goes on as it was: from the model given (if one is), on the
    same training pairs, with the same loss, and the same held-out pairs (best.pt's MRR is only comparable on those);
    names what changed and the way out."""
    started = ckpt.get('started_from')
    if model and started and os.path.abspath(model) != os.path.abspath(started) and model != started:
        raise CheckpointError(f"init_from='resume' continues {path}, a run that started from {started}, not from {model}: "
                              f"leave the model out to resume it, or start a new run from {model} with another --out_dir")
    then = ckpt.get('data_fingerprint') or {}
    changed = [what for what, same in (
        ('the training pairs (--dataset, --data_dir, --pairs, --val_frac, --max_len or the files changed)',
         then.get('pairs') == fingerprint['pairs']),
        (f"the loss ({then.get('loss')} then, {fingerprint['loss']} now)", then.get('loss', fingerprint['loss']) == fingerprint['loss']),
        ('the held-out pairs, or what best.pt was picked by (--eval_data, --eval_pairs, --val_frac, --max_len, '
         '--best_by or --sts_data)',
         ckpt.get('validation_key') == key)) if not same]
    if changed:
        raise CheckpointError(f"init_from='resume' but {'; '.join(changed)} differ from {path}'s run: resume with the "
                              f"settings it ran with, or start a new run from its weights: python contrastive.py "
                              f"{path} ... --out_dir=NEW")


def sentence_files(n_embd):
    """sentence-transformers' modules for a model without them (pretrained here, a plain HF MPNet): Transformer ->
    mean Pooling -> Normalize at max_len, as this script embeds, in all-mpnet-base-v2's layout, which every version
    of the library loads. With them convert_hf.py exports a folder SentenceTransformer loads as the model trained here."""
    modules = [dict(idx=i, name=str(i), path=path, type=f'sentence_transformers.models.{kind}')
               for i, (path, kind) in enumerate((('', 'Transformer'), ('1_Pooling', 'Pooling'), ('2_Normalize', 'Normalize')))]
    pool = dict(word_embedding_dimension=n_embd, pooling_mode_cls_token=False, pooling_mode_mean_tokens=True,
                pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False)
    return {'modules.json': json.dumps(modules, indent=2), 'config_sentence_transformers.json':
            json.dumps(dict(similarity_fn_name='cosine'), indent=2), '1_Pooling/config.json': json.dumps(pool, indent=2),
            'sentence_bert_config.json': json.dumps(dict(max_seq_length=max_len, do_lower_case=False), indent=2)}


def hf_pooler(n_embd):
    """A pooler as HF initialises one (N(0, 0.02), zero bias) for a model without one: sentence-transformers never
    uses it, but AutoModel builds one, and a folder without its weights loads with a report of missing weights."""
    return {'pooler.weight': torch.randn(n_embd, n_embd, generator=torch.Generator().manual_seed(0)) * 0.02,
            'pooler.bias': torch.zeros(n_embd)}


# -----------------------------------------------------------------------------------------------
# the run

def settings(argv):
    """(the resolved config, the models given first): configurator's rules, and the combinations that cannot work."""
    models = [a for a in argv if not a.startswith('-') and not a.endswith('.py')]
    on_command_line = {a[2:].split('=')[0] for a in argv if a.startswith('--')}
    try:
        config = configure({k: globals()[k] for k in config_keys}, [a for a in argv if a not in models], CHOICES,
                           script=__file__, limits=LIMITS, also='The model may be given first: python contrastive.py '
                           'MODEL config/contrastive_raw.py [--key=value ...]; then export: python convert_hf.py BEST.pt DIR')
        check_device(config['device'], 'sdpa')
    except ConfigError as e:
        die(e)
    if models and config['init_from'] not in ('resume', '', models[0]):
        die(f"two models: {models[0]} (given first) and --init_from={config['init_from']}: give one (--init_from=resume "
            f"beside the model continues out_dir's run)")
    if models and config['init_from'] != 'resume':  # the same command with --init_from=resume continues the run
        config['init_from'] = models[0]
    if config['data_dir'] and 'dataset' in on_command_line:
        die(f"--dataset={config['dataset']} and data_dir={config['data_dir']} both name the raw text: give one "
            f"(data_dir: a folder data.py prepared; dataset: files or pydocs)")
    if len(models) > 1 or not config['init_from']:
        die('give one model: python contrastive.py MODEL config/contrastive_raw.py (a .pt checkpoint, an HF MPNet or a '
            'sentence-transformers name or folder; --init_from=resume continues out_dir)')
    if config['best_by'] != 'mrr' and not config['sts_data']:
        die(f"best_by='{config['best_by']}' picks best.pt by the general Spearman, and no --sts_data gives it: add "
            f"--sts_data=PAIRS.csv (sentence1, sentence2, score), or pick by the held-out MRR (--best_by=mrr)")
    if config['overwrite'] and config['init_from'] == 'resume':
        die("overwrite=True starts the run over; it cannot be combined with init_from='resume'")
    if config['pairs'] == 'labelled' and config['data_dir']:
        die('data_dir holds raw text: train on it with --pairs=halves or --pairs=simcse, or give labelled pairs with '
            '--dataset=PAIRS.jsonl|.csv|.tsv')
    return config, models


def start(config, resume, model_given, GB):
    """Everything the run needs, checked before anything is written: the start model and its tokenizer, the training
    pairs, the held-out pairs (and STS pairs), and what the run is (its fingerprint, its held-out key). Every rank
    stops with one line for what cannot work."""
    ckpt_path, error, s = os.path.join(out_dir, 'ckpt.pt'), None, None
    name = ckpt_path if resume else init_from
    try:
        if resume and not os.path.isfile(ckpt_path):
            raise CheckpointError(f"init_from='resume' but {ckpt_path} does not exist: set --out_dir to the run's folder")
        ckpt, tok = evaluation.load_model(name, tokenizer)
        if resume and 'data_pos' not in ckpt:
            raise CheckpointError(f"{ckpt_path} was not written by contrastive.py: start a new run from it instead")
        if max_len > ckpt['model_args']['max_positions']:
            raise evaluation.TaskError(f"max_len {max_len} exceeds the model's max_positions {ckpt['model_args']['max_positions']}")
        special = tuple(data._special_ids(tok)[k] for k in ('bos_id', 'eos_id'))
        tokens, spans, eval_set, sts, said = load(tok, special, ckpt, name, GB, config)
        if mini_batch_size > len(spans) * batch_size:  # texts, not pairs: K texts a pair
            raise evaluation.TaskError(
                f"mini_batch_size ({mini_batch_size}) is larger than a step's {len(spans) * batch_size} texts on each "
                f"process ({len(spans)} x batch_size {batch_size}): use at most that (0 = no gradient caching)")
        # what the run is: its training pairs, its held-out pairs (which best.pt's MRR is measured on), its loss
        fingerprint = dict(tokenizer=data.tokenizer_fingerprint(tok), pairs=f'{spans.shape[1]} x {digest(clip(spans, max_len))}',
                           loss=dict(scale=scale, symmetric=symmetric, **({'distill': distill} if distill else {})))
        key = f'contrastive: held-out pairs {digest(eval_set[0].numpy())}'  # the measure is MRR: scale plays no part
        if best_by != 'mrr':  # best.pt is picked (and a replaced run released) on the general pairs too
            key += f'; best by {best_by}, general pairs {digest(np.frombuffer(json.dumps(sts).encode(), np.uint8))}'
        if resume:
            check_resume(ckpt, fingerprint, key, ckpt_path, model_given)
        s = SimpleNamespace(ckpt=ckpt, name=name, tok=tok, special=special, tokens=tokens, spans=spans, eval_set=eval_set,
                            sts=sts, said=said, fingerprint=fingerprint, key=key)
    except (CheckpointError, ConvertError, data.DataError, evaluation.TaskError) as e:
        error = str(e)
    stop_unless_ranks_agree(None, error, 'model and data')
    return s


def sentence_model(s, dev):
    """(the model to train, its model_args, what its checkpoints carry for the export, its pooling): a model without
    sentence modules gets mean pooling + Normalize (sentence_files) and an HF pooler (hf_pooler)."""
    ckpt = s.ckpt
    model_args = {**ckpt['model_args'], 'dropout': dropout, 'attn_dropout': dropout}
    model = model_from_checkpoint(ckpt, s.name, **{**model_args, **cpu_attention(dev)})
    n_embd = model_args['n_embd']
    carried = {**carried_for_export(ckpt),  # everything an export needs survives this stage (positions_extended too)
               **dict(st_files=ckpt.get('st_files') or sentence_files(n_embd), st_path=ckpt.get('st_path') or '',
                      hf_extra=ckpt.get('hf_extra') or hf_pooler(n_embd),
                      tokenizer_files=ckpt.get('tokenizer_files') or tokenizer_files_of(tokenizer),
                      special_ids=ckpt.get('special_ids') or dict(bos_token_id=s.special[0], pad_token_id=1,
                                                                  eos_token_id=s.special[1]))}
    # the held-out pairs best.pt was picked on, for finetune.py --task=retrieval on this checkpoint
    carried['heldout'] = dict(ids=s.eval_set[0], mask=s.eval_set[1], source=eval_data or (
        f'{data_dir}/val.bin' if data_dir else f'{dataset} (val_frac={val_frac}, held out by content)'))
    return model.to(dev).train(), model_args, carried, sentence_pooling(carried['st_files'])


def start_model(s, resume, dev):
    """The frozen model --distill pulls toward: the model given (a new run), or the one a resumed run started from."""
    ckpt, name = s.ckpt, s.name
    if resume:
        name = s.ckpt.get('started_from')
        try:
            ckpt = evaluation.load_model(name, tokenizer)[0]
        except (CheckpointError, ConvertError, evaluation.TaskError) as e:
            die(f'--distill pulls toward the model the run started from, {name}, which cannot be loaded: {e}')
    model = model_from_checkpoint(ckpt, name, dropout=0.0, attn_dropout=0.0, **cpu_attention(dev))
    return model.to(dev).eval().requires_grad_(False)


class Batches:
    """The training data, epoch after epoch, each in a seeded order of its own: batch(pos) is this rank's texts of the
    step at position pos, column by column; the ids of the whole step's texts; the number of tokens."""

    def __init__(self, tokens, spans, GB, rank):
        self.tokens, self.spans, self.GB, self.rank, self.orders = tokens, spans, GB, rank, {}

    def __call__(self, pos):
        n = self.spans.shape[1]
        e, i = np.divmod(pos + np.arange(self.GB), n)
        if not set(e.tolist()) <= set(self.orders):
            self.orders = {k: np.random.default_rng([seed, k]).permutation(n) for k in set(e.tolist())}
        step = clip(self.spans[:, [self.orders[k][j] for k, j in zip(e.tolist(), i.tolist())]], max_len)
        mine = step[:, self.rank * batch_size:(self.rank + 1) * batch_size]
        seqs = [self.tokens[a:b] for column in mine for a, b in column]
        return seqs, text_ids(self.tokens, step, max_len), int((step[..., 1] - step[..., 0]).sum()) + 2 * step[..., 0].size


def evaluate(model, s, pooling, dev, autocast, run, iter_num):
    """Held-out retrieval as finetune.py --task=retrieval scores it, the InfoNCE of all held-out pairs at once, STS;
    under train.py's probe names, which plot.py draws. Rank 0's numbers decide for every rank."""
    model.eval()  # the held-out pairs embedded once: their InfoNCE and their ranking
    ids, mask = (x.flatten(0, 1).to(dev) for x in s.eval_set)
    first, second = evaluation.pool(model, ids, mask, pooling, autocast).view(2, s.eval_set[0].size(1), -1)
    val_loss = F.cross_entropy(scale * first @ second.T, torch.arange(first.size(0), device=dev)).item()
    found = evaluation.ranking(first, second)
    rho = evaluation.sts_scores(model, s.tok, s.sts, pooling, dev, autocast, max_len)['spearman'] if s.sts else math.nan
    model.train()
    numbers = torch.tensor([val_loss, found['acc1'], found['mrr'], found['unrelated_cos'], rho], dtype=torch.float64)
    if run.ddp:
        dist.broadcast(numbers, 0, group=run.group)
    record = dict(iter=iter_num, val_loss=numbers[0].item(), probe_found=numbers[1].item(),
                  probe_mrr=numbers[2].item(), probe_cos=numbers[3].item(), objective='contrastive')
    if s.sts:  # an undefined Spearman (every pair the same cosine) is null in the log, never NaN
        record['sts_spearman'] = evaluation.defined(numbers[4].item())
    if run.master:
        print(f"step {iter_num}: held-out MRR {record['probe_mrr']:.4f} (top-1 {record['probe_found']:.3f}, "
              f"{s.eval_set[0].size(1)} pairs), InfoNCE {record['val_loss']:.4f}, unrelated cosine {record['probe_cos']:.3f}"
              + (f", general Spearman {evaluation.shown(record['sts_spearman'])}" if s.sts else ''))
    return record


def picked(record):
    """The measures best.pt can be picked by (--best_by), of an evaluation's record; None without one (a save at a
    signal), NaN for an undefined Spearman, which never beats anything."""
    if not record or 'sts_spearman' not in record:
        return dict(val_mrr=record and record['probe_mrr'])
    rho = math.nan if record['sts_spearman'] is None else record['sts_spearman']
    return dict(val_mrr=record['probe_mrr'], val_sts=rho, val_mean=(record['probe_mrr'] + rho) / 2)


def log_steps(run, iter_num, losses, n_tokens, lr, grad_norm, dt, GB):
    """The log window's record: mean loss, rate, throughput (every rank's texts)."""
    record = dict(iter=iter_num, loss=sum(losses) / len(losses), lr=lr, grad_norm=grad_norm, ms_per_iter=dt * 1000,
                  pairs_per_sec=GB / dt, tokens_per_sec=n_tokens / len(losses) / dt)
    if run.master:
        print(f"step {iter_num}: loss {record['loss']:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
              f"{record['ms_per_iter']:.0f} ms/step, {record['pairs_per_sec']:,.0f} pairs/s")
    run.log(record)


def main(argv):
    config, models = settings(argv)
    globals().update(config)
    resume = init_from == 'resume'
    ddp, rank, world, dev = start_processes(device, seed)
    master, dev = rank == 0, torch.device(dev)
    autocast = torch.autocast('cuda', torch.bfloat16) if dev.type == 'cuda' and dtype == 'bfloat16' else nullcontext()
    GB = batch_size * world  # pairs per step: each one's texts are negatives of all the others
    if GB < 2:
        die('batch_size=1: a batch of one pair has no negatives (the other pairs of a batch are its negatives): '
            'use batch_size >= 2')
    run = Run(out_dir, resume, overwrite, MEASURE[best_by], 'step', master, ddp)
    s = start(config, resume, models[0] if models else None, GB)
    model, model_args, carried, pooling = sentence_model(s, dev)
    frozen = start_model(s, resume, dev) if distill else None
    if master:
        print('config:\n' + '\n'.join(f'  {k} = {config[k]!r}' for k in config_keys) + ''.join(f'\n{x}' for x in s.said))
        print(f"{s.spans.shape[1]:,} training {'triplets' if len(s.spans) == 3 else 'pairs'} ({pairs}), {GB:,} a step "
              f"({batch_size} x {world} process{'es' * (world > 1)}"
              f"{f', embedded {mini_batch_size} texts at a time' if mini_batch_size else ''}); {pooling} pooling; "
              f"{f'pulled toward the start model x {distill:g}; ' if distill else ''}"
              f"evaluation: {s.eval_set[0].size(1)} held-out pairs" + (f', {len(s.sts)} general scored pairs (--sts_data)' if s.sts else ''))
    started_from = (s.ckpt.get('started_from') if resume else os.path.abspath(init_from) if os.path.exists(init_from)
                    else init_from)
    run.claim()
    iter_num, best_score, best_iter, data_pos = ((s.ckpt['iter_num'], s.ckpt.get('best_score', s.ckpt.get('best_mrr')),
                                                  s.ckpt['best_iter'], s.ckpt['data_pos']) if resume else (0, None, None, 0))
    run.ready(init_from if os.path.isfile(init_from) else None, iter_num, best_iter, best_score,
              checkpoint_bytes(model), curves)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.999), 1e-6, dev.type)
    params = [p for p in model.parameters() if p.requires_grad]
    if resume:
        optimizer.load_state_dict(s.ckpt['optimizer'])
        if len(s.ckpt['rank_states']) == world:  # else new dropout streams; the data continues exactly all the same
            set_rng_state(s.ckpt['rank_states'][rank], dev)
        if master:
            print(f"resuming from step {iter_num} of {os.path.join(out_dir, 'ckpt.pt')} (" + (
                f"best {shown_score(best_score, run.measure)} at step {best_iter})" if best_iter is not None else
                f"no step beat the starting model yet, {shown_score(best_score, run.measure)})"))
    start_iter, s.ckpt, batch, clock, losses, n_tokens = iter_num, None, Batches(s.tokens, s.spans, GB, rank), Clock(dev), [], 0

    def save(record=None, improved=False):
        """Every rank's RNG state gathered; rank 0 writes ckpt.pt (best.pt when improved: the highest held-out MRR; a
        replaced run goes once a model at least as good on the same held-out pairs is saved)."""
        states = run.gather(rng_state(dev))
        run.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args, config=config,
                      iter_num=iter_num, val_loss=record and record['val_loss'], **evaluation.defined(picked(record)),
                      best_score=run.best_score, best_iter=run.best_iter, data_pos=data_pos, rank_states=states,
                      data_fingerprint=s.fingerprint, data_dir=os.path.abspath(data_dir) if data_dir else None,
                      started_from=started_from, **carried), improved, s.key)

    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            clock.pause()
            try:
                record = evaluate(model, s, pooling, dev, autocast, run, iter_num)
            except evaluation.TaskError as e:  # NaN embeddings, or a model that gives every text the same one
                run.die(f'{e} (step {iter_num}): not saved')
            improved = run.evaluated(iter_num, picked(record)[run.measure])
            run.log(record)
            if iter_num > start_iter:
                save(record, improved)
            run.draw()
            clock.resume()
        if run.should_stop():  # a signal, on any rank: every rank stops here
            if iter_num > start_iter:
                save()
            break
        if iter_num >= max_iters:
            break
        seqs, ids, tokens_seen = batch(data_pos)
        lr = learning_rate * min((iter_num + 1) / (warmup_iters + 1), (max_iters - iter_num) / max(1, max_iters - warmup_iters))
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss = contrastive_step(model, seqs, ids, s.special, pooling, mini_batch_size, scale, symmetric, autocast,
                                frozen, distill)
        sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
        if not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
            run.die(f'the loss or its gradient is not finite at step {iter_num}: stopped without saving it',
                    'lower learning_rate or check the data')
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num, data_pos = iter_num + 1, data_pos + GB
        losses.append(loss.item())
        n_tokens += tokens_seen  # every rank's texts
        clock.tick()
        if iter_num % log_interval == 0:
            log_steps(run, iter_num, losses, n_tokens, lr, norm.item(), clock.per_step(), GB)
            losses, n_tokens = [], 0
    run.close(iter_num, max_iters, 'st')


if __name__ == '__main__':
    try:
        with quiet_transformers():
            main(sys.argv[1:])
    except KeyboardInterrupt:  # before training began (its own handler answers later)
        die('interrupted before training began: nothing was written')
