"""
Throughput / MFU / memory of one MPNet training step (forward, backward, fused AdamW).

    python bench.py                                          # mpnet-base, T=512, bf16, compiled, on the GPU
    python bench.py --batch_size=64 --attn_impl=flex
    python bench.py --data_dir=data/pydocs-mpnet-base         # real tokens instead of random ones
    python bench.py --profile=out/bench_trace.json             # also a torch.profiler trace + summary
    python bench.py --device=cpu --dtype=float32 --compile=False --n_layer=2 --n_embd=128 --n_head=2 \
        --n_inner=512 --batch_size=4 --block_size=128 --vocab_size=8192   # small CPU run

The permutation sampler runs inside every timed step (as in train.py) and is also timed alone, so its
share of the step is reported.
"""

import os
import sys
import time
import warnings

import torch

from configurator import CHOICES, ConfigError, check_device, configure
from model import MPNet, MPNetConfig
from permute import n_pred, permute_batch

# -----------------------------------------------------------------------------------------------
batch_size: int = 32                    # sequences per step
block_size: int = 512
pred_frac: float = 0.15
vocab_size: int = 30527                 # random tokens; ignored with data_dir (the data's vocabulary is used)
n_layer: int = 12                       # mpnet-base
n_head: int = 12
n_embd: int = 768
n_inner: int = 3072
attn_impl: str = 'sdpa'                 # 'sdpa' | 'flex' | 'manual'
dropout: float = 0.1
grad_checkpoint: bool = False           # recompute activations in backward
data_dir: str = ''                      # a prepared folder (data.py) for real tokens; '' = random tokens
device: str = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype: str = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile: bool = True                    # torch.compile (CUDA only)
burn_in: int = 10                       # untimed steps (compilation, autotuning, allocator warm-up)
steps: int = 20                         # timed steps
profile: str = ''                       # path: profile 3 more steps, write the trace there, print a summary
seed: int = 1337
# -----------------------------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]


def die(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)


try:
    globals().update(configure({k: globals()[k] for k in config_keys}, sys.argv[1:], CHOICES))
    check_device(device, attn_impl)
except ConfigError as e:
    die(e)

torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)

if data_dir:
    import data
    from permute import vocab_tables
    try:
        meta, tok, _ = data.load_prepared(data_dir)
    except data.DataError as e:
        die(e)
    vocab_size = meta['vocab_size']
    is_word_start, is_special = (t.to(device) for t in vocab_tables(tok))
    mask_id = meta['mask_id']
    batches = data.Batches(data_dir, 'train', batch_size, block_size, seed=seed, device=device)
    get_tokens = batches.next
else:
    is_word_start = torch.ones(vocab_size, dtype=torch.bool, device=device)  # token-level: words are real-data only
    is_special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    is_special[:5] = True
    mask_id = 4
    fixed = torch.randint(5, vocab_size, (batch_size, block_size), device=device)
    get_tokens = lambda: fixed

P = n_pred(block_size, pred_frac)
try:
    config = MPNetConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_inner=n_inner,
                         max_positions=max(512, block_size), dropout=dropout, attn_dropout=dropout,
                         attn_impl=attn_impl, grad_checkpoint=grad_checkpoint)
except ValueError as e:
    die(e)
model = MPNet(config).to(device)
optimizer = model.configure_optimizers(0.01, 1e-4, (0.9, 0.98), 1e-6, device_type)
model.build_masks(block_size, P, device)  # before compiling, as train.py
step_model = torch.compile(model) if compile and device_type == 'cuda' else model
generator = torch.Generator(device).manual_seed(seed)


def permute(tokens):
    return permute_batch(tokens, is_word_start, is_special, mask_id, generator, pred_frac=pred_frac)


def train_step():
    input_ids, positions, targets = permute(get_tokens())
    with autocast:
        _, loss = step_model(input_ids, positions, P, targets)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
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


for _ in range(burn_in):
    train_step()
if device_type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
dt, loss = timed(train_step, steps)
dt_perm, _ = timed(lambda: permute(get_tokens()), max(steps, 20))

device_name = torch.cuda.get_device_name(device) if device_type == 'cuda' else 'cpu'
mfu = model.estimate_mfu(block_size, P, batch_size / dt, device_name)
peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device_type == 'cuda' else None
print(f'device: {device_name}, torch {torch.__version__}, {dtype}, compile={compile and device_type == "cuda"}, '
      f'attn_impl={attn_impl}, grad_checkpoint={grad_checkpoint}')
print(f'model: {model.get_num_params() / 1e6:.1f}M parameters, {n_layer} layers x {n_embd}; '
      f'batch {batch_size} x {block_size} tokens, {P} predicted per sequence, {"real" if data_dir else "random"} data')
print(f'step: {dt * 1000:.2f} ms, {batch_size * block_size / dt:,.0f} tokens/s, '
      f'{model.estimate_flops(block_size, P) * batch_size / dt / 1e12:.2f} TFLOP/s, '
      f'MFU {"n/a (unknown device peak)" if mfu is None else f"{mfu * 100:.1f}%"}, '
      f'peak memory {"n/a" if peak_mem is None else f"{peak_mem:.2f} GiB"}, loss {loss.item():.3f}')
print(f'permutation sampler: {dt_perm * 1000:.3f} ms per batch, {dt_perm / dt * 100:.2f}% of the step')
if device_type == 'cuda':  # a host sync stalls the CPU until the GPU drains; train.py has them at log steps only
    torch.cuda.set_sync_debug_mode('warn')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train_step()
    torch.cuda.set_sync_debug_mode('default')
    syncs = [w for w in caught if 'synchroniz' in str(w.message)]
    print(f'host syncs in one step: {len(syncs)}' + ''.join(f'\n  {w.filename}:{w.lineno}' for w in syncs[:5]))

if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
        sync()
    os.makedirs(os.path.dirname(os.path.abspath(profile)), exist_ok=True)
    prof.export_chrome_trace(profile)
    sort_by = 'self_device_time_total' if device_type == 'cuda' else 'self_cpu_time_total'  # own time, not nested
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
    print(f'wrote {profile} (open in ui.perfetto.dev or chrome://tracing)')
