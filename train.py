"""
MPNet pretraining: one loop, bf16 on CUDA (float32 CPU runs for smoke tests), DDP with torchrun.

    python train.py config/tiny.py                          # built-in corpus, small model, CPU minutes
    python train.py config/base.py --batch_size=16          # mpnet-base on one GPU
    python train.py config/base.py --init_from=resume       # continue out_dir/ckpt.pt after a stop or crash
    python train.py config/tiny.py --init_from=out-tiny/best.pt --out_dir=out-next   # a new run from another's weights
    python train.py config/tiny.py --objective=mlm --doc_mask=True --out_dir=out-mlm  # the paper's ablation: BERT's MLM
    torchrun --standalone --nproc_per_node=8 train.py config/base.py
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 --nproc_per_node=8 train.py config/base.py

Every global below can be set by a config file (assignments only) or --key=value; the resolved
config is printed and saved in each checkpoint. A run owns its out_dir (checkpoint.py describes the
files): it refuses to start over a previous run unless told to resume or to overwrite, keeps the best
model beside the latest, and never writes a checkpoint whose validation loss is not finite.
"""

import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from checkpoint import (CheckpointError, carried_for_export, checkpoint_bytes, model_from_checkpoint, restore_random_state,
                        stop_unless_ranks_agree, validation_key)
from configurator import CHOICES, ConfigError, check_device, check_relations, configure, die
from convert_hf import sentence_pooling
from evaluation import CollapsedError, Probe, TaskError
from model import MPNet, MPNetConfig
from permute import n_pred, permute_batch, vocab_tables
from run import Clock, Run, check_fits, check_start, export_tokenizer, start_processes, starting_checkpoint

# -----------------------------------------------------------------------------------------------
# I/O
out_dir: str = 'out'                    # the run's folder: checkpoints, metrics.jsonl, curves.png
init_from: str = 'scratch'              # 'scratch' | 'resume' (out_dir/ckpt.pt) | a .pt file (weights, new optimizer) | HF name/folder
overwrite: bool = False                 # start over in an out_dir that holds a run (moved to replaced/ until beaten)
eval_interval: int = 500                # evaluate (and save) every this many iterations
eval_iters: int = 20                    # validation batches: fixed blocks and fixed permutations
log_interval: int = 10                  # iterations per log line (the loop's only host syncs)
always_save_checkpoint: bool = True     # else save only when the validation loss improves
snapshot_interval: int = 0              # also keep out_dir/snapshots/iter_N.pt every N iters (a multiple of eval_interval)
snapshot_keep: int = 5                  # ... the newest this many of them
curves: bool = True                     # redraw out_dir/curves.png after each eval (plot.py, in the background)
probe: bool = False                     # with each eval, a label-free embedding probe (evaluation.Probe)
probe_docs: int = 1000                  # validation documents the probe splits into halves and compares
long_from: int = 0                      # eval also reports the loss at positions >= this apart (0: an extended model's old length)
wandb_log: bool = False                 # also log to wandb (WANDB_MODE=offline works); a resumed run continues its wandb run
wandb_project: str = 'nano-mpnet'       # wandb project ...
wandb_run_name: str = 'run'             # ... and run name
# data
dataset: str = 'pydocs'                 # 'pydocs' (built in), a .txt/.jsonl/.parquet file or folder, or a hub dataset
tokenizer: str = 'microsoft/mpnet-base' # hub name or folder, or 'train' (WordPiece learned on the corpus)
vocab_size: int = 30527                 # only for tokenizer='train'
data_dir: str = ''                      # a prepared folder (data.py; $VARS expand, e.g. node-local scratch); '' = prepare under data/
streaming: bool = False                 # tokenize on the fly (corpora too large to prepare); validate on data_dir or held-out docs
text_field: str = 'text'                # the text column of .jsonl / .parquet / hub datasets
txt_split: str = 'paragraph'            # a .txt file's documents: 'line', 'paragraph' (blank-line separated) or 'file'
val_frac: float = 0.005                 # documents held out for validation when preparing
batch_size: int = 32                    # sequences per GPU per micro-step
block_size: int = 512                   # tokens per sequence: <s> + packed text
gradient_accumulation_steps: int = 1    # micro-steps per optimizer step; never changed by the number of GPUs
# MPNet objective (paper sec. 2)
pred_frac: float = 0.15                 # fraction of each sequence predicted
mask_prob: float = 0.8                  # predicted tokens shown as <mask> ...
rand_prob: float = 0.1                  # ... as a random token, else unchanged
whole_word: bool = True                 # permute whole words, not tokens
objective: str = 'mpnet'                # 'mpnet' | 'mlm' (BERT) | 'plm' (XLNet): the paper's ablation, same model
doc_mask: bool = False                  # no attention across the documents of a block; positions restart per document
# model (ignored on resume or HF init: the checkpoint's architecture is used, but for a larger max_positions)
n_layer: int = 12                       # mpnet-base: 12 layers x 768, 12 heads, feed-forward 3072
n_head: int = 12                        # attention heads (n_embd a multiple of it)
n_embd: int = 768                       # hidden size
n_inner: int = 3072                     # feed-forward width
max_positions: int = 512                # longest sequence the position table holds; above an init_from's, extends it
dropout: float = 0.1                    # on embeddings, attention output and feed-forward (BERT's)
attn_dropout: float = 0.1               # on attention probabilities
attn_impl: str = 'sdpa'                 # 'sdpa' | 'flex' (CUDA) | 'manual'
rope: bool = False                      # rotary positions instead of absolute + relative (not HF-exportable)
grad_checkpoint: bool = False           # recompute activations in backward: larger batches fit, ~30% slower
# optimizer: AdamW with MPNet's settings
learning_rate: float = 6e-4             # peak, after warmup
max_iters: int = 100_000                # optimizer steps of the whole run
weight_decay: float = 0.01              # on matrices and embeddings, not biases or norms
beta1: float = 0.9                      # AdamW betas and eps as MPNet / RoBERTa
beta2: float = 0.98                      # ... and the second-moment decay
eps: float = 1e-6                       # added to the second moment root
grad_clip: float = 1.0                  # 0 = off
max_bad_steps: int = 5                  # consecutive non-finite steps that stop the run (each is skipped)
head_warmup_iters: int = 500            # a new MLM head (encoder-only import) first trains alone this many iters
head_warmup_lr: float = 1e-3            # ... at this rate: a random head needs far more than a gentle encoder rate
# learning rate schedule
decay_lr: bool = True                   # else learning_rate throughout
lr_schedule: str = 'linear'             # 'linear' (the paper) or 'cosine', after a linear warmup
warmup_iters: int = 10_000              # linear warmup from 0
lr_decay_iters: int = 100_000           # ~ max_iters
min_lr: float = 0.0                     # the rate at the end of the decay
# system
device: str = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda' or 'cuda:N'
dtype: str = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype on CUDA; CPU runs float32
compile: bool = True                    # torch.compile the model (CUDA only)
seed: int = 1337                        # data order, permutations, initialisation
# -----------------------------------------------------------------------------------------------
config_keys = list(__annotations__)  # the typed globals above, and nothing imported (checkpoint.REPLACED is a str too)


try:
    given = set()  # the keys a config file or argument set: max_positions given extends a checkpoint's table
    config = configure({k: globals()[k] for k in config_keys}, sys.argv[1:], CHOICES, script=__file__, given=given)
    check_device(config['device'], config['attn_impl'])
    check_relations(config)
except ConfigError as e:
    die(e)
globals().update(config)
try:
    MPNetConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_inner=n_inner, max_positions=max_positions,
                dropout=dropout, attn_dropout=attn_dropout, attn_impl=attn_impl, rope=rope, grad_checkpoint=grad_checkpoint,
                objective=objective)
except ValueError as e:
    die(e)

# -----------------------------------------------------------------------------------------------
# processes, devices, precision, and the run's folder (run.py: one run at a time, no run replaced by accident)

ddp, rank, world_size, device = start_processes(device, seed)
master = rank == 0  # rank 0 does all the I/O
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
workers = ('GPU' if device_type == 'cuda' else 'process') + ('es' if device_type != 'cuda' and world_size > 1 else
                                                              's' if world_size > 1 else '')  # for messages
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
P = n_pred(block_size, pred_frac)
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master:
    print('config:\n' + '\n'.join(f'  {k} = {config[k]!r}' for k in config_keys))
    print(f'effective batch: {gradient_accumulation_steps} accum x {world_size} {workers} x {batch_size} seqs = '
          f'{tokens_per_iter // block_size:,} sequences, {tokens_per_iter:,} tokens per optimizer step '
          f'({P} predicted per sequence)')
run = Run(out_dir, init_from == 'resume', overwrite, 'val_loss', 'iter', master, ddp)
run.claim()


# -----------------------------------------------------------------------------------------------
# data

run_data, data_error = data.training_data(config, rank, world_size, device, barrier=dist.barrier if ddp else lambda: None)
stop_unless_ranks_agree(run_data and run_data.fingerprint, data_error, 'prepared data')
train_data, val_tokens, tok, meta, fingerprint, data_dir = (getattr(run_data, k) for k in (
    'train', 'val_tokens', 'tok', 'meta', 'fingerprint', 'data_dir'))
if master:
    print(run_data.val_said)
is_word_start, is_special = (t.to(device) for t in vocab_tables(tok))
mask_id = meta['mask_id']
if meta['pad_id'] != 1:  # MPNet's embeddings (and HF's) treat id 1 as padding: a real token there never learns
    die(f"the tokenizer's pad id is {meta['pad_id']}, but MPNet reserves id 1 for <pad>: use a tokenizer with "
        f"<pad> at id 1 (microsoft/mpnet-base, or --tokenizer=train)")

if probe:
    try:  # whole documents where the data is prepared
        probe_pairs = Probe([data.val_prefix(data_dir)] if data_dir else val_tokens[:, 1:].numpy(), meta, probe_docs,
                            block_size)
    except TaskError as e:
        die(e)
    if master:
        print(probe_pairs.said)

# -----------------------------------------------------------------------------------------------
# model, optimizer, state

model_args = dict(vocab_size=meta['vocab_size'], n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_inner=n_inner,
                  max_positions=max_positions, dropout=dropout, attn_dropout=attn_dropout, attn_impl=attn_impl,
                  rope=rope, grad_checkpoint=grad_checkpoint, objective=objective)
# out_dir's ckpt.pt (resume), another run's weights (a .pt), an HF model, or None: from scratch; max_positions
# given above the checkpoint's grows its table (continued pretraining at a longer context)
ckpt, said = starting_checkpoint(init_from, out_dir, max_positions if 'max_positions' in given else None)
iter_num, best_val_loss, best_iter = (ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('best_iter')) if \
    init_from == 'resume' else (0, None, None)
if ckpt is not None:
    # the architecture comes from the checkpoint; kernel, dropout and recomputation are this run's choice
    model_args = {**ckpt['model_args'], 'attn_impl': attn_impl, 'dropout': dropout, 'attn_dropout': attn_dropout,
                  'grad_checkpoint': grad_checkpoint, 'objective': objective}
    said += check_start(ckpt, init_from == 'resume', config, meta, fingerprint, os.path.join(out_dir, 'ckpt.pt'))
try:
    check_fits(model_args, meta, block_size, extendable=ckpt is not None and init_from != 'resume')
    raw_model = (MPNet(MPNetConfig(**model_args)) if ckpt is None else
                 model_from_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from,
                                       **model_args))
except (ValueError, CheckpointError) as e:  # an impossible shape or combination, named by MPNetConfig
    die(e)
short = long_from or (ckpt or {}).get('positions_extended', [[512]])[0][0]  # the length the model was pretrained at
if block_size > short:  # a longer context teaches only what the blocks hold of long documents
    runs = data.longest_document_run(val_tokens, meta['eos_id'])
    said.append(f'long documents: {int((runs > short).sum()):,} of {len(runs):,} validation blocks hold more than '
                f'{short} consecutive tokens of one document (median run {int(runs.median()):,} of {block_size - 1:,})')
raw_model.to(device)
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), eps, device_type)
perm_gen = torch.Generator(device).manual_seed(seed + rank)  # the permutations' own random stream
resuming = init_from == 'resume' and 'optimizer' in ckpt
if resuming:
    optimizer.load_state_dict(ckpt['optimizer'])
    try:  # prepared data: one position for all ranks, mapped exactly; streaming: per rank, same world size
        train_data.load_state_dict([s['data'] for s in ckpt['rank_states']])
    except data.DataError as e:
        die(e)
    said.append(restore_random_state(ckpt['rank_states'], rank, world_size, perm_gen, seed + rank + 7919 * iter_num))
# the first iterations may train a new MLM head alone (an encoder-only import: its encoder is trained, the head
# random); a resumed run keeps the boundary it was given
head_only_until = (ckpt.get('head_only_until', 0) if resuming else
                   iter_num + head_warmup_iters if ckpt is not None and ckpt.get('head_fresh') else 0)
if head_only_until > iter_num:
    said.append(f'head warmup: until iter {head_only_until} only the new MLM head trains (lr {head_warmup_lr:g}), '
                f'then everything (head_warmup_iters=0 turns this off)')
# what an export needs: the data's tokenizer, and what the start model carried (its sentence modules, its lengths)
carried = {**carried_for_export(ckpt), **export_tokenizer(meta, master)}
if master:
    print('\n'.join(line for line in said if line))
start_file = init_from if os.path.isfile(init_from) else None  # the checkpoint this run starts from
run.ready(start_file, iter_num, best_iter, best_val_loss, checkpoint_bytes(raw_model), curves,
          dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None,
          ckpt.get('wandb_run_id') if init_from == 'resume' else None)
ckpt = None  # free the memory

model = raw_model
raw_model.build_masks(block_size, P, device)  # outside the compiled graph: one compile
if compile and device_type == 'cuda':
    if master:
        print('compiling the model...')
    model = torch.compile(model)
head_model = model  # a new head training alone: no DDP hooks, as the encoder gets no gradients (see the loop)
if ddp:
    model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
if master:
    print(f'model: {raw_model.get_num_params() / 1e6:.2f}M parameters, {model_args}')


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 1.0 - progress if lr_schedule == 'linear' else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (learning_rate - min_lr)


def permute(tokens, generator):
    """The objective's input for a batch of blocks: input_ids, positions, targets, and docs (doc_mask) or None."""
    batch = permute_batch(tokens, is_word_start, is_special, mask_id, generator, pred_frac=pred_frac,
                          mask_prob=mask_prob, rand_prob=rand_prob, whole_word=whole_word, objective=objective,
                          eos_id=meta['eos_id'] if doc_mask else None)
    return batch if doc_mask else (*batch, None)


@torch.no_grad()
def evaluate():
    """Loss and accuracy on fixed blocks with fixed permutations (batch k always uses seed k), so
    validation numbers are comparable across runs and world sizes; past the length the model was pretrained
    at (short), also the loss of the tokens read at positions >= short: does the longer context catch up?"""
    model.eval()
    sums = torch.zeros(5, device=device)  # loss * tokens, correct, tokens, loss at positions >= short, their tokens
    g = torch.Generator(device)
    for k in range(rank, eval_iters, world_size):
        x = val_tokens[k * batch_size:(k + 1) * batch_size].to(device)
        input_ids, positions, targets, docs = permute(x, g.manual_seed(k))
        with autocast:
            logits, loss = model(input_ids, positions, P, targets, docs=docs)
        far = positions[:, -P:] >= short  # every layout ends with the predicted tokens' positions
        far_loss = (torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction='none')
                    * far).sum() if block_size > short else torch.zeros((), device=device)
        sums += torch.stack([loss.float() * targets.numel(), (logits.argmax(-1) == targets).sum().float(),
                             torch.tensor(float(targets.numel()), device=device), far_loss, far.sum().float()])
    if ddp:
        dist.all_reduce(sums)
    model.train()
    split = {} if block_size <= short or not sums[4] else dict(
        val_loss_near=((sums[0] - sums[3]) / (sums[2] - sums[4])).item(), val_loss_far=(sums[3] / sums[4]).item())
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item(), split


def embedding_probe():
    """The probe's numbers, or None for a model that gives every text the same embedding (no score is meaningful;
    the validation loss still judges the run)."""
    try:
        return probe_pairs(raw_model, probe_pooling, device, autocast)
    except CollapsedError:
        return None
    except TaskError as e:
        run.die(f'probe at iter {iter_num}: {e}: nothing saved', 'lower learning_rate, or check the data')


def save(val_loss=None, improved=False):
    """Every rank's RNG states and data position gathered; rank 0 writes ckpt.pt (and best.pt when the validation
    loss improved) through run.save. Called between steps, where the live RNG states are the resume point
    (evaluation draws from its own generator and has no dropout) and data_state is the loader's position before
    the prefetched batch. Weights that are not finite are never written."""
    states = run.gather(dict(data=data_state, perm_rng=perm_gen.get_state(), cpu_rng=torch.get_rng_state(),
                             cuda_rng=torch.cuda.get_rng_state() if device_type == 'cuda' else None))
    if not master:
        return
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():  # a host sync, at save time only
        print(f'warning: the weights are not finite at iter {iter_num}: not saved; {run.kept()}')
        return
    run.save(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args, config=config,
                  iter_num=iter_num, val_loss=val_loss, best_val_loss=run.best_score, best_iter=run.best_iter,
                  rank_states=states, data_fingerprint=fingerprint, head_only_until=head_only_until,
                  wandb_run_id=run.wandb_run_id, data_dir=os.path.abspath(data_dir), **carried),
             improved, validation_key(config, fingerprint),
             snapshot_keep if snapshot_interval and val_loss is not None and iter_num % snapshot_interval == 0 else 0)


def say_eval(record, scores):
    by_position = 'val_loss_near' in record
    print(f"iter {iter_num}: val loss {record['val_loss']:.4f}" + (
          f" (positions < {short}: {record['val_loss_near']:.4f}, >= {short}: {record['val_loss_far']:.4f})"
          if by_position else '') + f", val acc {record['val_acc']:.4f}, best {run.best_score:.4f}" +
          (f", probe: {record['probe_found']:.3f} of halves find their other half (MRR {record['probe_mrr']:.3f}, "
           f"{probe_pairs.n} pairs), unrelated cosine {record['probe_cos']:.3f}" if probe and scores else
           ', probe: no score (every text gets the same embedding: collapsed)' if probe else ''))


def say_step(record, eta):
    rate = f"head only, lr {head_warmup_lr:.2e}" if record['head_only'] else f"lr {record['lr']:.2e}"
    mfu = '' if record['mfu'] is None else f", MFU {record['mfu'] * 100:.1f}%"
    print(f"iter {iter_num}: loss {record['loss']:.4f}, acc {record['acc']:.4f}, {rate}, grad norm "
          f"{record['grad_norm']:.3f}, {record['ms_per_iter']:.0f} ms/iter, {record['tokens_per_sec']:,.0f} tok/s"
          f"{f' on {world_size} {workers}' if ddp else ''}, ETA {eta}{mfu}")


# -----------------------------------------------------------------------------------------------
# the loop

start_iter = iter_num
data_state = train_data.state_dict()  # the loader's resume point: before the next batch is drawn
X = train_data.next()                 # first micro-batch of the coming step
params = [p for p in raw_model.parameters() if p.requires_grad]
probe_pooling = sentence_pooling(carried.get('st_files'))  # the probe pools as the sentence model does
device_name = torch.cuda.get_device_name(device) if device_type == 'cuda' else 'cpu'
bad_run = torch.zeros((), device=device)  # consecutive non-finite steps, read at log steps only
bad_total = torch.zeros((), device=device)
loss_sum, correct_sum = torch.zeros((), device=device), torch.zeros((), device=device)
clock, iters_since_log = Clock(device), 0  # training time of the log window: evaluations, the first step left out
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    head_only = iter_num < head_only_until
    for group in optimizer.param_groups:
        group['lr'] = (head_warmup_lr if group['part'] == 'head' else 0.0) if head_only else lr

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        clock.pause()
        val_loss, val_acc, by_position = evaluate()  # all-reduced: every rank decides alike below
        if not math.isfinite(val_loss):
            run.die(f'validation loss is {val_loss} at iter {iter_num}: nothing saved',
                    'lower learning_rate, raise warmup_iters, or check the data')
        improved = run.evaluated(iter_num, val_loss)
        record = dict(iter=iter_num, val_loss=val_loss, val_acc=val_acc, objective=objective, **by_position)
        scores = embedding_probe() if probe else None
        if scores:
            record.update(probe_found=scores['acc1'], probe_mrr=scores['mrr'], probe_cos=scores['unrelated_cos'])
        if master:
            say_eval(record, scores)
        run.log(record)
        if iter_num > start_iter and (improved or always_save_checkpoint or
                                      snapshot_interval and iter_num % snapshot_interval == 0):
            save(val_loss, improved)
        run.draw()
        clock.resume()
    if run.should_stop():  # a signal, on any rank: every rank stops here
        if iter_num > start_iter:
            save()
        break
    if iter_num >= max_iters:
        break

    is_log_step = (iter_num + 1) % log_interval == 0
    for micro_step in range(gradient_accumulation_steps):
        input_ids, positions, targets, docs = permute(X, perm_gen)
        data_state = train_data.state_dict()
        X = train_data.next()  # queued from pinned memory: the CPU does not wait for the copy
        last = micro_step == gradient_accumulation_steps - 1
        step_model = head_model if head_only else model
        with (model.no_sync() if ddp and not last and not head_only else nullcontext()):  # DDP syncs once per step
            with autocast:
                logits, loss = step_model(input_ids, positions, P, targets, docs=docs, head_only=head_only)
            (loss / gradient_accumulation_steps).backward()
        loss_sum += loss.detach().float()  # the log window's sums: no host sync until the log step
        correct_sum += (logits.detach().argmax(-1) == targets).float().mean()
        del logits  # (B, P, V): not kept alive through the next forward
    if head_only and ddp:  # only the head has gradients (the encoder ran without autograd): averaged here
        for p in raw_model.head_parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'), foreach=True)
    # a non-finite loss makes a non-finite norm (identical on all ranks after DDP's all-reduce);
    # fused AdamW then skips the whole update on the device, with no host sync
    found_inf = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = found_inf
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bad_run = (bad_run + found_inf) * found_inf
    bad_total += found_inf
    iter_num += 1
    iters_since_log += 1
    clock.tick(drop=iter_num == start_iter + 1 and not is_log_step)  # compilation and warm-up are not throughput

    if is_log_step:  # the loop's host syncs: here, at evaluation, and once after the first step
        dt = clock.per_step()
        n_micro = iters_since_log * gradient_accumulation_steps
        evals_left = max_iters // eval_interval - iter_num // eval_interval + bool(max_iters % eval_interval)
        record = dict(iter=iter_num, loss=loss_sum.item() / n_micro, acc=correct_sum.item() / n_micro,
                      lr=head_warmup_lr if head_only else lr, head_only=head_only, grad_norm=grad_norm.item(),
                      ms_per_iter=dt * 1000, tokens_per_sec=tokens_per_iter / dt,
                      tokens_per_sec_per_gpu=tokens_per_iter / world_size / dt, skipped_steps=int(bad_total.item()),
                      mfu=raw_model.estimate_mfu(block_size, P, batch_size * gradient_accumulation_steps / dt,
                                                 device_name))  # per GPU, so also right under DDP
        if master:
            say_step(record, clock.eta(dt, max_iters - iter_num, evals_left))
        run.log(record)
        loss_sum.zero_()
        correct_sum.zero_()
        iters_since_log = 0
        if bad_run.item() >= max_bad_steps:
            run.die(f'{int(bad_run.item())} non-finite losses in a row at iter {iter_num}; stopping',
                    'lower learning_rate, raise warmup_iters, or check the data')

run.close(iter_num, max_iters, 'hf')
