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

import json
import math
import os
import secrets
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from checkpoint import (CheckpointError, carried_for_export, checkpoint_bytes, claim_run_dir, exportable, extend_checkpoint,
                        load_checkpoint, model_from_checkpoint, ready_run_dir, restore_random_state,
                        run_summary, save_run, stop_on_signals, stop_unless_ranks_agree, validation_key)
from configurator import CHOICES, ConfigError, check_device, check_relations, configure, die
from convert_hf import ConvertError, hf_to_checkpoint, read_tokenizer_files, sentence_pooling, tokenizer_files_of
from evaluation import CollapsedError, Probe, TaskError
from model import MPNet, MPNetConfig
from permute import n_pred, permute_batch, vocab_tables
from plot import BackgroundCurves

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
# processes, devices, precision

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0  # rank 0 does all the I/O
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
workers = ('GPU' if device_type == 'cuda' else 'process') + ('es' if device_type != 'cuda' and world_size > 1 else
                                                              's' if world_size > 1 else '')  # for messages
torch.manual_seed(seed + rank)  # dropout; each rank its own stream
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
P = n_pred(block_size, pred_frac)
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master:
    print('config:\n' + '\n'.join(f'  {k} = {config[k]!r}' for k in config_keys))
    print(f'effective batch: {gradient_accumulation_steps} accum x {world_size} {workers} x {batch_size} seqs = '
          f'{tokens_per_iter // block_size:,} sequences, {tokens_per_iter:,} tokens per optimizer step '
          f'({P} predicted per sequence)')

# -----------------------------------------------------------------------------------------------
# the run's folder: one run at a time, and never a previous run replaced by accident

ckpt_path = os.path.join(out_dir, 'ckpt.pt')
run_error = None  # rank 0 owns the folder; under torchrun every rank stops with its one line
if master:
    try:
        run_lock = claim_run_dir(out_dir, init_from == 'resume', overwrite)  # held until this process exits
    except CheckpointError as e:
        run_error = str(e)
stop_unless_ranks_agree(None, run_error, 'run folder')
if init_from == 'resume' and not os.path.isfile(ckpt_path):
    die(f"init_from='resume' but {ckpt_path} does not exist: train first, or set --out_dir to the run's folder")


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
iter_num, best_val_loss, best_iter, last_saved, ckpt = 0, float('inf'), None, None, None
try:
    if init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path)
        iter_num, best_val_loss, best_iter = ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('best_iter')
        if 'optimizer' not in ckpt and master:  # e.g. written by convert_hf.py --from_hf
            print(f'note: {ckpt_path} holds weights only; starting a fresh optimizer and schedule from them')
        task_then = {k: ckpt.get('config', {}).get(k, v) for k, v in (('objective', 'mpnet'), ('doc_mask', False))}
        if master and task_then != dict(objective=objective, doc_mask=doc_mask):
            print(f'note: {ckpt_path} was trained with {task_then}; under objective={objective!r}, doc_mask={doc_mask} '
                  f'the validation loss measures another task, and best.pt compares across both (to keep them apart, '
                  f'start a new run from its weights: --init_from={ckpt_path} --out_dir=NEW)')
    elif os.path.isfile(init_from):  # another run's checkpoint: its weights start a new run
        ckpt = {k: v for k, v in load_checkpoint(init_from).items() if k not in ('optimizer', 'rank_states')}
    elif init_from != 'scratch':
        ckpt = hf_to_checkpoint(init_from)
except (CheckpointError, ConvertError) as e:
    die(e)
if ckpt is not None and init_from != 'resume' and 'max_positions' in given:  # continued at a longer context
    try:
        said = extend_checkpoint(ckpt, max_positions)
    except CheckpointError as e:
        die(e)
    if said and master:
        print(said)
if ckpt is not None:
    # the architecture comes from the checkpoint; kernel, dropout and recomputation are this run's choice
    model_args = {**ckpt['model_args'], 'attn_impl': attn_impl, 'dropout': dropout, 'attn_dropout': attn_dropout,
                  'grad_checkpoint': grad_checkpoint, 'objective': objective}
    trained_on = (ckpt.get('data_fingerprint') or {}).get('tokenizer')
    if trained_on and trained_on != fingerprint['tokenizer']:
        die(f"the checkpoint was trained with another vocabulary than the data's tokenizer {meta['tokenizer']!r} "
            f"(the same token ids would mean other tokens): train on data prepared with the checkpoint's tokenizer")
    if init_from == 'resume' and ckpt.get('data_fingerprint', fingerprint) != fingerprint and master:
        print(f'note: the prepared data changed since {ckpt_path} was written (same vocabulary): resuming on the new data')
if model_args['vocab_size'] != meta['vocab_size']:
    die(f"vocab mismatch: the model has {model_args['vocab_size']} tokens but the data's tokenizer "
        f"{meta['tokenizer']!r} has {meta['vocab_size']}: prepare the data with the model's tokenizer")
if block_size > model_args['max_positions']:
    die(f"block_size {block_size} exceeds the model's max_positions {model_args['max_positions']}" +
        (f": --max_positions={block_size} extends the checkpoint's table (continued pretraining at a longer context)"
         if ckpt is not None and init_from != 'resume' else ''))
short = long_from or (ckpt or {}).get('positions_extended', [[512]])[0][0]  # the length the model was pretrained at
if block_size > short and master:  # a longer context teaches only what the blocks hold of long documents
    runs = data.longest_document_run(val_tokens, meta['eos_id'])
    print(f'long documents: {int((runs > short).sum()):,} of {len(runs):,} validation blocks hold more than {short} '
          f'consecutive tokens of one document (median run {int(runs.median()):,} of {block_size - 1:,})')
try:
    raw_model = (MPNet(MPNetConfig(**model_args)) if ckpt is None else
                 model_from_checkpoint(ckpt, ckpt_path if init_from == 'resume' else init_from, **model_args))
except (ValueError, CheckpointError) as e:  # an impossible shape or combination, named by MPNetConfig
    die(e)
raw_model.to(device)
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), eps, device_type)
resuming = init_from == 'resume' and 'optimizer' in ckpt
if resuming:
    optimizer.load_state_dict(ckpt['optimizer'])
perm_gen = torch.Generator(device).manual_seed(seed + rank)  # the permutations' own random stream
if resuming:
    states = ckpt['rank_states']
    try:  # prepared data: one position for all ranks, mapped exactly; streaming: per rank, same world size
        train_data.load_state_dict([s['data'] for s in states])
    except data.DataError as e:
        die(e)
    said = restore_random_state(states, rank, world_size, perm_gen, reseed=seed + rank + 7919 * iter_num)
    if said and master:
        print(said)
# the first iterations may train a new MLM head alone (an encoder-only import: its encoder is trained, the head
# random); a resumed run keeps the boundary it was given
head_only_until = (ckpt.get('head_only_until', 0) if resuming else
                   iter_num + head_warmup_iters if ckpt is not None and ckpt.get('head_fresh') else 0)
if master and head_only_until > iter_num:
    print(f'head warmup: until iter {head_only_until} only the new MLM head trains (lr {head_warmup_lr:g}), '
          f'then everything (head_warmup_iters=0 turns this off)')
carried = {k: v for k, v in carried_for_export(ckpt).items() if k not in ('tokenizer_files', 'special_ids')}  # the data's own
wandb_run_id = ckpt.get('wandb_run_id') if init_from == 'resume' else None  # a resumed run goes on logging there
if master and init_from == 'resume':
    print(f'resuming from iter {iter_num} of {ckpt_path}' +
          (f" (val loss {ckpt['val_loss']:.4f})" if ckpt.get('val_loss') is not None else ''))
probe_pooling = sentence_pooling(carried.get('st_files'))  # the probe pools as the sentence model does
tokenizer_files, tok_error = {}, None
try:  # rank 0 writes the checkpoints that carry them
    tokenizer_files = (read_tokenizer_files(meta['tokenizer']) if os.path.isdir(str(meta['tokenizer']))
                       else tokenizer_files_of(meta['tokenizer'])) if master else {}
except (ConvertError, OSError) as e:  # e.g. a full temp folder
    tok_error = f'cannot read the tokenizer files the checkpoints carry: {e}'
stop_unless_ranks_agree(None, tok_error, 'tokenizer')
special_ids = dict(bos_token_id=meta['bos_id'], pad_token_id=meta['pad_id'], eos_token_id=meta['eos_id'])
ckpt = None  # free the memory
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
start_file = init_from if os.path.isfile(init_from) else None  # the checkpoint this run starts from
space_error = None
if master:
    try:
        said, start_file = ready_run_dir(out_dir, overwrite, init_from == 'resume', start_file, iter_num, best_iter,
                                         checkpoint_bytes(raw_model))
        for line in said:
            print(line)
    except CheckpointError as e:
        space_error = str(e)
stop_unless_ranks_agree(None, space_error, 'run folder')

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
        die(f'probe at iter {iter_num}: {e}: nothing saved; {kept()} (lower learning_rate, or check the data)')


def kept():
    """Which files hold what, for the messages that end a run."""
    return run_summary(out_dir, best_iter, best_val_loss, last_saved, start_file)


def save(val_loss=None, improved=False):
    """All ranks gather their RNG and data positions; rank 0 writes ckpt.pt atomically, and links best.pt to
    it when the validation loss improved. Called between steps, where the live RNG states are the resume
    point (evaluation draws from its own generator and has no dropout) and data_state is the loader's
    position before the prefetched batch. Weights that are not finite are never written."""
    state = dict(data=data_state, perm_rng=perm_gen.get_state(), cpu_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
    states = [None] * world_size
    if ddp:
        dist.all_gather_object(states, state)
    else:
        states = [state]
    if not master:
        return
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():  # a host sync, at save time only
        print(f'warning: the weights are not finite at iter {iter_num}: not saved; {kept()}')
        return
    try:
        said = save_run(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=model_args,
                             config=config, iter_num=iter_num, val_loss=val_loss, best_val_loss=best_val_loss,
                             best_iter=best_iter, rank_states=states, data_fingerprint=fingerprint,
                             head_only_until=head_only_until, wandb_run_id=wandb_run_id, tokenizer_files=tokenizer_files,
                             special_ids=special_ids, data_dir=os.path.abspath(data_dir), **carried),
                        out_dir, improved, validation_key(config, fingerprint), best_iter is not None,
                        snapshot_keep if snapshot_interval and val_loss is not None and iter_num % snapshot_interval == 0 else 0)
    except CheckpointError as e:
        die(e)
    global last_saved
    last_saved = (iter_num, val_loss)
    print('\n'.join(said))


def log(record):
    if master:
        try:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            die(f"cannot append to {metrics_path} ({e.strerror}); {kept()}")
        if wandb_log:
            wandb.log(record, step=record['iter'])


def now():
    """Wall time once the GPU has run what was queued, so that work is timed in the window that queued it."""
    if device_type == 'cuda':
        torch.cuda.synchronize(device)
    return time.time()


stop_signal = stop_on_signals(master)  # SIGINT/SIGTERM: save and exit at the next iteration; a second: at once
# under DDP the ranks agree on stopping through a tiny all-reduce on a CPU (gloo) group, started at one
# iteration and read at the next: no GPU sync, and every rank stops at the same iteration
stop_group = dist.new_group(backend='gloo') if ddp else None
stop_flag, stop_work = torch.zeros(1), None

if wandb_log and master:
    import wandb
    wandb_run_id = wandb_run_id or secrets.token_hex(4)  # ours, so that a resumed run finds it in the checkpoint
    wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir, id=wandb_run_id, resume='allow')
plotter = BackgroundCurves(out_dir) if curves and master else None  # out_dir/curves.png, redrawn by plot.py
if plotter and plotter.missing:
    print('note: curves=True needs matplotlib (pip install matplotlib): no curves.png for this run')
    plotter = None


def duration(seconds):
    return f'{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m' if seconds >= 3600 else \
        f'{seconds // 60:.0f}m{seconds % 60:02.0f}s'


# -----------------------------------------------------------------------------------------------
# the loop

start_iter = iter_num
data_state = train_data.state_dict()  # the loader's resume point: before the next batch is drawn
X = train_data.next()                 # first micro-batch of the coming step
params = [p for p in raw_model.parameters() if p.requires_grad]
encoder_params = [p for g in optimizer.param_groups if g['part'] == 'encoder' for p in g['params']]
device_name = torch.cuda.get_device_name(device) if device_type == 'cuda' else 'cpu'
bad_run = torch.zeros((), device=device)  # consecutive non-finite steps, read at log steps only
bad_total = torch.zeros((), device=device)
loss_sum, correct_sum = torch.zeros((), device=device), torch.zeros((), device=device)
# training time of the current log window: train_time plus the running segment since t_last, over
# timed_iters steps (evaluation and the first, compiling, step are left out)
t_last, train_time, timed_iters, iters_since_log = time.time(), 0.0, 0, 0
eval_seconds = 0.0  # the last evaluation's duration, for the ETA
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    head_only = iter_num < head_only_until
    for group in optimizer.param_groups:
        group['lr'] = (head_warmup_lr if group['part'] == 'head' else 0.0) if head_only else lr

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        train_time += now() - t_last
        t_eval = time.time()
        val_loss, val_acc, by_position = evaluate()  # all-reduced: every rank decides alike below
        if not math.isfinite(val_loss):
            die(f'validation loss is {val_loss} at iter {iter_num}: nothing saved; {kept()} '
                f'(lower learning_rate, raise warmup_iters, or check the data)')
        improved = val_loss < best_val_loss and iter_num > start_iter
        if iter_num > start_iter or init_from != 'resume':  # a new run's starting model is the first to beat
            best_val_loss = min(best_val_loss, val_loss)
        best_iter = iter_num if improved else best_iter
        record = dict(iter=iter_num, val_loss=val_loss, val_acc=val_acc, objective=objective, **by_position)  # plot.py compares runs
        if probe:
            scores = embedding_probe()
            if scores:
                record.update(probe_found=scores['acc1'], probe_mrr=scores['mrr'], probe_cos=scores['unrelated_cos'])
        if master:
            print(f'iter {iter_num}: val loss {val_loss:.4f}' + (f" (positions < {short}: {by_position['val_loss_near']:.4f}, "
                  f">= {short}: {by_position['val_loss_far']:.4f})" if by_position else '') +
                  f', val acc {val_acc:.4f}, best {best_val_loss:.4f}' +
                  (f", probe: {record['probe_found']:.3f} of halves find their other half (MRR "
                   f"{record['probe_mrr']:.3f}, {probe_pairs.n} pairs), unrelated cosine {record['probe_cos']:.3f}"
                   if probe and scores else ', probe: no score (every text gets the same embedding: collapsed)'
                   if probe else ''))
        log(record)
        snapshot_due = snapshot_interval and iter_num % snapshot_interval == 0
        if iter_num > start_iter and (improved or always_save_checkpoint or snapshot_due):
            save(val_loss, improved)
        if plotter:
            plotter.draw()
        t_last = time.time()
        eval_seconds = t_last - t_eval
    stop_requested = bool(stop_signal)
    if ddp:  # act on what the previous iteration's all-reduce says, so that all ranks stop together
        stop_requested = False
        if stop_work is not None:
            stop_work.wait()
            stop_requested = stop_flag.item() > 0
        stop_flag = torch.tensor([float(bool(stop_signal))])
        stop_work = dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX, group=stop_group, async_op=True)
    if stop_requested:
        if iter_num > start_iter:
            save()
        if master:
            print(f'stopped by {signal.Signals(stop_signal[0]).name if stop_signal else "a signal"} at iter {iter_num}')
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
    timed_iters += 1
    if iter_num == start_iter + 1 and not is_log_step:  # compilation and warm-up are not throughput
        t_last, train_time, timed_iters = now(), 0.0, 0

    if is_log_step:  # the loop's host syncs: here, at evaluation, and once after the first step
        dt = (train_time + now() - t_last) / timed_iters
        n_micro = iters_since_log * gradient_accumulation_steps
        seqs_per_sec = batch_size * gradient_accumulation_steps / dt  # per GPU
        mfu = raw_model.estimate_mfu(block_size, P, seqs_per_sec, device_name)  # per GPU, so also right under DDP
        evals_left = max_iters // eval_interval - iter_num // eval_interval + bool(max_iters % eval_interval)
        eta = duration((max_iters - iter_num) * dt + evals_left * eval_seconds)
        record = dict(iter=iter_num, loss=loss_sum.item() / n_micro, acc=correct_sum.item() / n_micro,
                      lr=head_warmup_lr if head_only else lr, head_only=head_only, grad_norm=grad_norm.item(),
                      ms_per_iter=dt * 1000, tokens_per_sec=tokens_per_iter / dt,
                      tokens_per_sec_per_gpu=tokens_per_iter / world_size / dt, mfu=mfu,
                      skipped_steps=int(bad_total.item()))
        if master:
            print(f"iter {iter_num}: loss {record['loss']:.4f}, acc {record['acc']:.4f}, "
                  f"{f'head only, lr {head_warmup_lr:.2e}' if head_only else f'lr {lr:.2e}'}, "
                  f"grad norm {record['grad_norm']:.3f}, {record['ms_per_iter']:.0f} ms/iter, "
                  f"{record['tokens_per_sec']:,.0f} tok/s{f' on {world_size} {workers}' if ddp else ''}, ETA {eta}"
                  f"{'' if mfu is None else f', MFU {mfu * 100:.1f}%'}")
        log(record)
        loss_sum.zero_()
        correct_sum.zero_()
        t_last, train_time, timed_iters, iters_since_log = time.time(), 0.0, 0, 0
        if bad_run.item() >= max_bad_steps:
            die(f'{int(bad_run.item())} non-finite losses in a row at iter {iter_num}; stopping: {kept()} '
                f'(lower learning_rate, raise warmup_iters, or check the data)')

if master:
    if wandb_log:
        wandb.finish()  # its own summary first, so that the last line is ours
    if plotter:  # the final curves include the final evaluation
        plotter.finish()
    if iter_num == start_iter and start_iter >= max_iters > 0:
        print(f'nothing to train: the run is at iter {iter_num} and max_iters is {max_iters} (raise --max_iters)')
    else:
        export = exportable(out_dir, start_file, best_iter)  # never worse than the model the run started from
        print(f"{'stopped' if stop_signal else 'done'}: {kept()}" +
              (f'; export with: python convert_hf.py {export} {os.path.join(out_dir, "hf")}' if export else ''))
if ddp:
    stop_work.wait()
    dist.barrier()  # rank 0 may still be writing the last checkpoint
    dist.destroy_process_group()
