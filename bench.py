"""
Throughput / MFU / memory of one MPNet training step as train.py runs it: permutation, forward and
backward over gradient_accumulation_steps micro-batches, gradient clipping, fused AdamW.

    python bench.py                                        # GPU: mpnet-base, T=512, bf16, compiled; CPU: config/tiny.py
    python bench.py config/tiny.py                         # what `python train.py config/tiny.py` would run
    python bench.py config/base.py --batch_size=64 --attn_impl=flex
    python bench.py config/base.py --profile=out/bench_trace.json   # also a torch.profiler trace + summary
    python bench.py config/tiny.py --block_size=2048 --max_positions=2048 --batch_size=2   # a longer context
    python bench.py --embed=path/to/all-mpnet-base-v2 --embed_texts=docs.jsonl    # embedding, beside sentence-transformers

It takes the training config files and every train.py key (keys that only matter for I/O are accepted
and ignored), plus its own keys below. The model is the run's: the config's, or with init_from the
checkpoint's or HF model's (architecture and weights) with this run's kernel, dropout and objective.
Tokens are real when the config's data is prepared (data_dir, or the folder train.py would prepare),
random otherwise. The permutation sampler runs inside every timed step and is also timed alone, so its
share of the step is reported.
"""

import os
import resource
import sys
import time
import warnings
from types import SimpleNamespace

import torch

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from configurator import CHOICES, ConfigError, check_device, check_relations, configure, die, script_settings
from model import MPNet, MPNetConfig, layout
from permute import n_pred, permute_batch

# -----------------------------------------------------------------------------------------------
# bench.py's own keys (every train.py key is accepted too: python train.py --help)
burn_in: int = 10                       # untimed steps (compilation, autotuning, allocator warm-up)
steps: int = 20                         # timed steps
profile: str = ''                       # path: profile 3 more steps, write the trace there, print a summary
embed: str = ''                         # a sentence model (.pt, HF or sentence-transformers folder): time embedding instead
embed_texts: str = 'pydocs'             # ... these documents (as contrastive.py reads raw text), each one text
embed_n: int = 1216                     # ... the first this many
embed_max_len: int = 128                # ... each cut at this many tokens, <s> and </s> included
embed_batch: int = 32                   # ... this many at once, here and in sentence-transformers' encode beside it
# -----------------------------------------------------------------------------------------------
own_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')


argv = sys.argv[1:]
if not torch.cuda.is_available() and not [a for a in argv if not a.startswith('--') or a.startswith('--embed=')] and \
        '--help' not in argv:
    # train.py's defaults are mpnet-base at batch 32 x 512: about 42 GB and minutes per step on a CPU
    print('no GPU: measuring config/tiny.py (give a config file, e.g. python bench.py config/base.py, to choose)')
    argv = [os.path.join(os.path.dirname(TRAIN_PY), 'config', 'tiny.py'), *argv]
try:
    defaults = {e[1]: e[2] for e in script_settings(TRAIN_PY) if e[0] == 'key'}
    defaults.update({k: globals()[k] for k in own_keys})
    config = configure(defaults, argv, CHOICES, script=__file__,
                       also='and every key of train.py (python train.py --help): a training config file runs as is')
    check_device(config['device'], config['attn_impl'])
    check_relations(config)
except ConfigError as e:
    die(e)
cfg = SimpleNamespace(**config)  # the run's settings, as train.py would resolve them


def measure_embedding():
    """--embed: the seconds evaluation.embed (every evaluation's way to embed texts) takes for real documents, and
    sentence-transformers' encode of the same texts beside it (same length, same batch size, same device), each after
    one warm-up batch; and how far their embeddings agree (1.0 = the same)."""
    import evaluation
    from convert_hf import ConvertError, sentence_pooling
    try:
        texts = data.read_texts(cfg.embed_texts)[0][:cfg.embed_n]
        ckpt, tok = evaluation.load_model(cfg.embed)
        encoder = model_from_checkpoint(ckpt, cfg.embed, dropout=0.0, attn_dropout=0.0).to(cfg.device).eval()
    except (data.DataError, evaluation.TaskError, CheckpointError, ConvertError) as e:
        die(e)
    pooling, n, size, max_len = sentence_pooling(ckpt.get('st_files')), len(texts), cfg.embed_batch, cfg.embed_max_len
    try:  # NaN embeddings (a diverged model) are one line, not a speed
        evaluation.embed(encoder, tok, texts[:size], pooling, cfg.device, autocast, size, max_len)
        sync()
        t0 = time.time()
        ours, cut = evaluation.embed(encoder, tok, texts, pooling, cfg.device, autocast, size, max_len)
        sync()
    except evaluation.TaskError as e:
        die(e)
    dt = time.time() - t0
    print(f'device: {cfg.device}, torch {torch.__version__}, {cfg.dtype}, {torch.get_num_threads()} threads; model '
          f'{cfg.embed} ({encoder.get_num_params() / 1e6:.1f}M parameters, {pooling} pooling); {n:,} texts of '
          f'{cfg.embed_texts}, {cut:,} cut at {max_len} tokens, batches of {size}')
    print(f'evaluation.embed: {dt:.1f} s, {n / dt:.1f} texts/s')
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(cfg.embed, device=cfg.device)
    except Exception as e:  # not installed, or not a sentence-transformers model
        print(f'sentence-transformers: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})')
        return
    st.max_seq_length = max_len
    st.encode(texts[:size], batch_size=size)
    sync()
    t0 = time.time()
    theirs = st.encode(texts, batch_size=size, convert_to_tensor=True)
    sync()
    dt_st = time.time() - t0
    agree = torch.nn.functional.cosine_similarity(ours.float().cpu(), theirs.float().cpu()).min().item()
    print(f'SentenceTransformer.encode: {dt_st:.1f} s, {n / dt_st:.1f} texts/s; evaluation.embed is {dt_st / dt:.2f}x '
          f'its speed; lowest cosine between the two embeddings of a text: {agree:.6f}')



torch.manual_seed(cfg.seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if cfg.device.startswith('cuda') else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[cfg.dtype]
autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
if cfg.embed:
    measure_embedding()
    sys.exit(0)

# the model train.py would build: the checkpoint's architecture and weights with init_from (a checkpoint file,
# resume, or an HF model), else the config's; kernel, dropout, recomputation and objective are this run's choice
run_args = dict(dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, attn_impl=cfg.attn_impl,
                grad_checkpoint=cfg.grad_checkpoint, objective=cfg.objective)
model_args = dict(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                  n_inner=cfg.n_inner, max_positions=cfg.max_positions, rope=cfg.rope, **run_args)
ckpt = None
if cfg.init_from != 'scratch':
    from convert_hf import ConvertError, hf_to_checkpoint
    ckpt_path = os.path.join(cfg.out_dir, 'ckpt.pt') if cfg.init_from == 'resume' else cfg.init_from
    try:  # as train.py reads it: a file is a checkpoint, anything else an HF folder or hub name
        ckpt = load_checkpoint(ckpt_path) if cfg.init_from == 'resume' or os.path.isfile(ckpt_path) else \
            hf_to_checkpoint(ckpt_path)
    except (CheckpointError, ConvertError) as e:
        die(f'{e} (or measure an architecture given by keys: --init_from=scratch --n_layer=...)')
    model_args = {**ckpt['model_args'], **run_args}

# real tokens when the run's data is prepared, as train.py would read them
prepared = os.path.expandvars(cfg.data_dir) or data.default_out_dir(cfg.dataset, cfg.tokenizer, cfg.vocab_size)
if os.path.isfile(os.path.join(prepared, 'meta.json')):
    from permute import vocab_tables
    try:
        meta, tok, _ = data.load_prepared(prepared)
        batches = data.Batches(prepared, 'train', cfg.batch_size, cfg.block_size, seed=cfg.seed, device=cfg.device)
    except data.DataError as e:
        die(e)
    if ckpt is not None and model_args['vocab_size'] != meta['vocab_size']:  # train.py refuses the same
        die(f"vocab mismatch: the model has {model_args['vocab_size']} tokens but the data's tokenizer "
            f"{meta['tokenizer']!r} has {meta['vocab_size']}: prepare the data with the model's tokenizer")
    model_args['vocab_size'] = meta['vocab_size']
    is_word_start, is_special = (t.to(cfg.device) for t in vocab_tables(tok))
    mask_id, eos_id, get_tokens, tokens_said = meta['mask_id'], meta['eos_id'], batches.next, f'real data from {prepared}'
elif cfg.data_dir:
    die(f"data_dir '{cfg.data_dir}' is not a prepared dataset (no meta.json)")
else:
    V = model_args['vocab_size']
    is_word_start = torch.ones(V, dtype=torch.bool, device=cfg.device)  # token-level: words are real-data only
    is_special = torch.zeros(V, dtype=torch.bool, device=cfg.device)
    is_special[:5] = True
    mask_id, eos_id = 4, 2
    fixed = torch.randint(5, V, (cfg.batch_size, cfg.block_size), device=cfg.device)
    fixed.masked_fill_(torch.rand(fixed.shape, device=cfg.device) < 1 / 256, eos_id)  # documents of ~256 tokens
    get_tokens, tokens_said = (lambda: fixed), f'random tokens ({prepared} is not prepared)'

P = n_pred(cfg.block_size, cfg.pred_frac)
try:
    mconfig = MPNetConfig(**model_args)
except (TypeError, ValueError) as e:
    die(e)
if cfg.block_size > mconfig.max_positions:
    die(f'block_size {cfg.block_size} exceeds the model\'s max_positions {mconfig.max_positions}')


def estimate_cpu_bytes(c, B, T, P):
    """A generous estimate of a CPU training step's memory: weights, gradients and AdamW moments (16 bytes a
    parameter), plus activations of eager fp32 (calibrated on three measured configurations, rounded up)."""
    L, S = T + 2 * P, T + P
    params = 12 * c.n_layer * c.n_embd ** 2 + c.padded_vocab_size * c.n_embd
    per_layer = 12 * L * c.n_embd + 3 * L * c.n_inner + 5 * c.n_head * L * S
    return 16 * params + 4 * B * (c.n_layer * per_layer + 4 * P * c.padded_vocab_size) + 2**29


def available_bytes():
    try:
        with open('/proc/meminfo') as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable')), None)
    except OSError:  # not Linux: no check
        return None


if device_type == 'cpu':
    need, available = estimate_cpu_bytes(mconfig, cfg.batch_size, cfg.block_size, P), available_bytes()
    if available is not None and need > available:
        die(f'this step needs about {need / 2**30:.0f} GB on the CPU, more than the {available / 2**30:.0f} GB available: '
            f'lower --batch_size or --block_size, measure a smaller config (python bench.py config/tiny.py), or use a GPU')

try:
    model = MPNet(mconfig) if ckpt is None else model_from_checkpoint(ckpt, ckpt_path, **model_args)
except CheckpointError as e:
    die(e)
model.to(cfg.device)
del ckpt  # its optimizer state (resume) is not needed here
optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.eps, device_type)
model.build_masks(cfg.block_size, P, cfg.device)  # before compiling, as train.py
step_model = torch.compile(model) if cfg.compile and device_type == 'cuda' else model
generator = torch.Generator(cfg.device).manual_seed(cfg.seed)


def permute(tokens):
    batch = permute_batch(tokens, is_word_start, is_special, mask_id, generator, pred_frac=cfg.pred_frac,
                          mask_prob=cfg.mask_prob, rand_prob=cfg.rand_prob, whole_word=cfg.whole_word,
                          objective=cfg.objective, eos_id=eos_id if cfg.doc_mask else None)
    return batch if cfg.doc_mask else (*batch, None)


def train_step():
    for _ in range(cfg.gradient_accumulation_steps):
        input_ids, positions, targets, docs = permute(get_tokens())
        with autocast:
            _, loss = step_model(input_ids, positions, P, targets, docs=docs)
        (loss / cfg.gradient_accumulation_steps).backward()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float('inf')
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # train.py's on-device skip of bad steps
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def timed(fn, n):
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync()
    return (time.perf_counter() - t0) / n, out


try:
    for _ in range(cfg.burn_in):
        train_step()
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    dt, loss = timed(train_step, cfg.steps)
except torch.OutOfMemoryError:
    die(f'out of GPU memory at batch {cfg.batch_size} x {cfg.block_size}: lower --batch_size (raising '
        f'--gradient_accumulation_steps keeps the step), or --grad_checkpoint=True')
dt_perm, _ = timed(lambda: permute(get_tokens()), max(cfg.steps, 20))

seqs = cfg.batch_size * cfg.gradient_accumulation_steps
device_name = torch.cuda.get_device_name(cfg.device) if device_type == 'cuda' else 'cpu'
mfu = model.estimate_mfu(cfg.block_size, P, seqs / dt, device_name)
# CPU: the process's peak resident memory (Linux reports KiB), the step's and everything before it
peak_mem = (torch.cuda.max_memory_allocated() if device_type == 'cuda' else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
# the FLOPs MFU counts against torch's own count of one forward (x3 for the backward), on one sequence, through
# the manual attention (torch's counter sees its matmuls; fused sdpa and flex kernels are not all counted):
# attention's share grows with T, and the two must agree at every T
from torch.utils.flop_counter import FlopCounterMode
for m in (model.config, *(block.attn for block in model.blocks)):
    setattr(m, 'attn_impl' if m is model.config else 'impl', 'manual')
with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
    input_ids, positions, targets, docs = permute(get_tokens()[:1])
    model(input_ids, positions, P, docs=docs)
for m in (model.config, *(block.attn for block in model.blocks)):
    setattr(m, 'attn_impl' if m is model.config else 'impl', cfg.attn_impl)
counted = 3 * counter.get_total_flops()
print(f'device: {device_name}, torch {torch.__version__}, {cfg.dtype}, compile={cfg.compile and device_type == "cuda"}, '
      f'attn_impl={cfg.attn_impl}, grad_checkpoint={cfg.grad_checkpoint}, objective={cfg.objective}, doc_mask={cfg.doc_mask}')
rotary = ' (rotary positions)' if mconfig.rope else ''
print(f'model: {model.get_num_params() / 1e6:.1f}M parameters, {mconfig.n_layer} layers x {mconfig.n_embd}{rotary}; '
      f'batch {cfg.batch_size} x {cfg.block_size} tokens x {cfg.gradient_accumulation_steps} accum, '
      f'{P} predicted per sequence, {tokens_said}')
print(f'step: {dt * 1000:.2f} ms, {seqs * cfg.block_size / dt:,.0f} tokens/s, '
      f'{model.estimate_flops(cfg.block_size, P) * seqs / dt / 1e12:.2f} TFLOP/s, '
      f'MFU {"n/a (unknown device peak)" if mfu is None else f"{mfu * 100:.1f}%"}, '
      f'peak memory {peak_mem:.2f} GiB{" (process RSS)" if device_type == "cpu" else ""}, loss {loss.item():.3f}')
L, S = layout(mconfig.objective, cfg.block_size, P)
attention = 3 * mconfig.n_layer * 2 * L * S * mconfig.n_embd * 2
print(f'FLOPs per sequence: {model.estimate_flops(cfg.block_size, P):.4g} (attention scores and sums '
      f'{attention / model.estimate_flops(cfg.block_size, P) * 100:.0f}%); torch.utils.flop_counter: {counted:.4g}' +
      ('' if counted == model.estimate_flops(cfg.block_size, P) else ' (differs: estimate_flops is wrong here)'))
print(f'permutation sampler: {dt_perm * 1000:.3f} ms per batch, '
      f'{dt_perm * cfg.gradient_accumulation_steps / dt * 100:.2f}% of the step')
if device_type == 'cuda':  # a host sync stalls the CPU until the GPU drains; train.py has them at log steps only
    torch.cuda.set_sync_debug_mode('warn')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train_step()
    torch.cuda.set_sync_debug_mode('default')
    syncs = [w for w in caught if 'synchroniz' in str(w.message)]
    print(f'host syncs in one step: {len(syncs)}' + ''.join(f'\n  {w.filename}:{w.lineno}' for w in syncs[:5]))

if cfg.profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
        sync()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.profile)), exist_ok=True)
    prof.export_chrome_trace(cfg.profile)
    sort_by = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'  # own time, not nested
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
    print(f'wrote {cfg.profile} (open in ui.perfetto.dev or chrome://tracing)')
