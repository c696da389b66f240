"""
The checks behind .ci/gpu (read that script first), one subcommand per step. .ci/gpu runs each under
`timeout`; each appends its verdict rows to REPORT/verdicts.tsv the moment it knows them (step, check,
PASS | FAIL | SKIP, the number or the reason), so that a run cut off by its time box still reports.

    python .ci/gpu_check.py env   --device=cuda --work=DIR      # 1: device, versions, does torch.compile work
    python .ci/gpu_check.py grads --device=cuda --compile=True  # 2: each attention path's gradients vs fp32 math
    python .ci/gpu_check.py e2e   --device=cuda --compile=True --data_dir=DIR --work=DIR --deadline=EPOCH
    python .ci/gpu_check.py pytest LOG RC                       # 2: the CUDA tests' pytest output -> a row
    python .ci/gpu_check.py bench LOG IMPL BATCH RC             # 4: one bench.py output -> a row of the speed table
    python .ci/gpu_check.py table --elapsed=SECONDS             # the verdict table (REPORT/summary.txt); its exit
                                                                # status is the run's: 0 PASS, 1 FAIL, 2 not checked

REPORT is $GPU_CHECK_REPORT (.ci/gpu sets it). Torch is imported only by the steps that need it.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REPORT = os.environ.get('GPU_CHECK_REPORT', os.path.join(ROOT, 'out-gpu-check'))
STEPS = {'1': '1 environment', '2': '2 correctness', '3': '3 end to end', '4': '4 speed', '5': '5 long context'}
MIN_BOX = 10  # seconds: a check with less time left is a SKIP (as .ci/gpu's steps), not a time box it must overrun
NO_TIME = 'no time left'  # how a SKIP for lack of time begins: table() counts such a check as not checked


def row(step, check, verdict, number):
    """One verdict, appended at once (a cut-off run keeps every row written before the cut)."""
    number = ' '.join(str(number).split())  # one line, no tabs
    with open(os.path.join(REPORT, 'verdicts.tsv'), 'a') as f:
        f.write(f'{STEPS[step]}\t{check}\t{verdict}\t{number}\n')
    print(f'[{verdict}] {STEPS[step]}: {check}: {number}', flush=True)


def first_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f'{type(e).__name__}: {lines[0] if lines else ""}'[:300]


# -----------------------------------------------------------------------------------------------
# 1 environment

def env(a):
    import importlib.metadata as md
    import torch

    def version(package):
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return 'absent'
    cuda = a.device.startswith('cuda')
    compile_works = False
    if cuda and not torch.cuda.is_available():
        row('1', 'device', 'FAIL', f'torch {torch.__version__} sees no CUDA device (CUDA runtime {torch.version.cuda})')
        return 3  # .ci/gpu stops: nothing else can run on this machine
    n = torch.cuda.device_count() if cuda else 0
    if cuda and (torch.device(a.device).index or 0) >= n:  # else every later step fails on the same missing device
        row('1', 'device', 'FAIL', f'--device={a.device} is not on this machine: it has {n} CUDA device{"s" if n > 1 else ""} '
            f'(cuda:0{f" to cuda:{n - 1}" if n > 1 else ""})')
        return 4  # .ci/gpu stops, with this row as its error
    if cuda:
        p = torch.cuda.get_device_properties(a.device)
        try:
            driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                    capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = 'unknown (no nvidia-smi)'
        row('1', 'device', 'PASS', f'{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, '
            f'{p.total_memory / 2**30:.0f} GiB; driver {driver}')
    else:
        row('1', 'device', 'PASS', f'cpu, {os.cpu_count()} cores (dry run: tiny shapes, no GPU kernels)')
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    row('1', 'versions', 'PASS', f'torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), '
        f'triton {version("triton")}, transformers {version("transformers")}, sentence-transformers '
        f'{version("sentence-transformers")}, python {sys.version.split()[0]}')
    datasets = version('datasets')
    row('1', 'optional packages', 'PASS', f'pytest {version("pytest")}, datasets {datasets}'
        f'{" (data must arrive prepared)" if datasets == "absent" else ""}, wandb {version("wandb")}')
    if not cuda:
        row('1', 'torch.compile', 'SKIP', 'train.py compiles on CUDA only')
    else:
        # a small MPNet, forward and backward in bf16, compiled against eager: inductor, triton and the
        # backward graph all work here; if not, every later step runs eager and says so
        from model import MPNet, MPNetConfig
        try:
            torch.manual_seed(0)
            model = MPNet(MPNetConfig(vocab_size=101, n_layer=1, n_head=2, n_embd=64, n_inner=128, max_positions=32,
                                      dropout=0.0, attn_dropout=0.0)).to(a.device)
            ids = torch.randint(5, 101, (2, 32 + 10), device=a.device)
            pos = torch.cat([torch.randperm(32, device=a.device), torch.arange(27, 32, device=a.device).repeat(2)])
            pos, targets = pos.expand(2, -1), ids[:, -5:]
            model.build_masks(32, 5, a.device)
            losses = []
            t0 = time.time()
            for step in (torch.compile(model), model):
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    loss = step(ids, pos, 5, targets)[1]
                loss.backward()
                losses.append(loss.item())
            dt = time.time() - t0
            if abs(losses[0] - losses[1]) > 0.05:
                raise RuntimeError(f'compiled loss {losses[0]:.4f} differs from eager {losses[1]:.4f}')
            compile_works = True
            row('1', 'torch.compile', 'PASS', f'a small MPNet forward + backward compiled in {dt:.1f} s, '
                f'loss {losses[0]:.4f} as eager {losses[1]:.4f}')
        except Exception as e:
            row('1', 'torch.compile', 'FAIL', f'{first_line(e)}; every later step runs eager (--compile=False)')
    with open(os.path.join(a.work, 'compile'), 'w') as f:
        f.write(str(compile_works))
    return 0


# -----------------------------------------------------------------------------------------------
# 2 correctness: gradients of every attention path against an fp32 math reference

SDPA_KERNELS = {'_scaled_dot_product_efficient_attention': 'efficient', '_scaled_dot_product_flash_attention': 'flash',
                '_scaled_dot_product_cudnn_attention': 'cudnn', '_scaled_dot_product_attention_math': 'math',
                '_scaled_dot_product_flash_attention_for_cpu': 'flash (cpu)',
                '_scaled_dot_product_fused_attention_overrideable': 'overrideable'}


def kernels_seen(prof, train=True):
    """Which SDPA backend ran, from the aten ops the profiler saw: forward, and backward when it has its own op."""
    keys = {e.key.removeprefix('aten::') for e in prof.key_averages()}
    fwd = sorted({v for k, v in SDPA_KERNELS.items() if k in keys})
    bwd = sorted({v for k, v in SDPA_KERNELS.items() if k + '_backward' in keys})
    if not fwd:
        return 'no SDPA kernel (decomposed into matmuls)'
    if not train:
        return f"{'+'.join(fwd)} kernel"
    return f"{'+'.join(fwd)} forward, {'+'.join(bwd) if bwd else 'autograd of the math ops'} backward"


def grads(a):
    import torch
    from torch.profiler import ProfilerActivity, profile
    from model import MPNet, MPNetConfig
    from permute import n_pred, permute_batch
    cuda = a.device.startswith('cuda')
    dev_type = 'cuda' if cuda else 'cpu'
    # mpnet-base's attention (T=512, P=77, 12 heads x 64, its vocabulary) in 2 layers, so that each compile is
    # short; the dry run: tiny shapes, float32 (CPU training runs float32)
    T, H, C, B, V = (512, 12, 768, 4, 30527) if cuda else (37, 4, 32, 2, 101)
    P = n_pred(T)
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = 0.05 if cuda else 1e-4  # relative error (norm of the difference / norm of the reference)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = dict(vocab_size=V, n_layer=2, n_head=H, n_embd=C, n_inner=4 * C, max_positions=T, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    base = MPNet(MPNetConfig(**cfg)).to(a.device)
    with torch.no_grad():  # a trained table's scale (a few units), so that the bias shapes the attention
        base.rel_bias.weight.normal_(0.0, 1.0)
    g = torch.Generator(a.device).manual_seed(0)
    tokens = torch.randint(5, V, (B, T), generator=g, device=a.device)
    is_word_start = torch.ones(V, dtype=torch.bool, device=a.device)
    is_special = torch.zeros(V, dtype=torch.bool, device=a.device)
    is_special[:5] = True
    input_ids, positions, targets = permute_batch(tokens, is_word_start, is_special, 4, g)
    watched = ['rel_bias.weight'] + [f'blocks.{i}.attn.{n}.weight' for i in range(2) for n in ('q', 'kv')]

    def run(impl, compiled, autocast_dtype, train=True):
        """logits, {parameter: gradient} (kv split into k and v), the SDPA kernels seen."""
        model = MPNet(MPNetConfig(**cfg, attn_impl=impl)).to(a.device)
        model.load_state_dict(base.state_dict())
        model.build_masks(T, P, a.device)
        step = torch.compile(model) if compiled else model
        ctx = torch.autocast(dev_type, dtype=autocast_dtype) if autocast_dtype != torch.float32 else nullcontext()
        if not train:
            model.eval()
        for warm in ((True, False) if compiled else (False,)):  # compile first, then profile the compiled step
            model.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) if not warm else nullcontext() as prof:
                with ctx, (nullcontext() if train else torch.no_grad()):
                    logits, loss = step(input_ids, positions, P, targets)
                if train:
                    loss.backward()
        out = {}
        for name, p in model.named_parameters():
            if name in watched:
                grad = p.grad.float() if p.grad is not None else None
                if name.endswith('kv.weight'):  # (2C, C): k's rows, then v's
                    for half, part in zip(('k', 'v'), (grad.chunk(2) if grad is not None else (None, None))):
                        out[name.replace('kv', half)] = part
                else:
                    out[name] = grad
        return logits.float(), out, kernels_seen(prof, train)

    def rel(x, ref):
        return ((x - ref).norm() / ref.norm()).item()

    ref_logits, ref, _ = run('manual', False, torch.float32)
    assert ref['rel_bias.weight'].abs().sum() > 0, 'the reference gives the relative bias no gradient'
    rows = 0
    for impl, compiled in (('sdpa', False), ('sdpa', True), ('flex', False), ('flex', True), ('manual', False),
                           ('manual', True)):
        name = f"{impl} {'compiled' if compiled else 'eager'}"
        if impl == 'flex' and not cuda:
            row('2', name, 'SKIP', 'FlexAttention has no backward on the CPU (train.py refuses it there)')
            continue
        if compiled and not cuda:
            row('2', name, 'SKIP', 'train.py compiles on CUDA only')
            continue
        if compiled and not a.compile:
            row('2', name, 'SKIP', 'torch.compile failed in step 1')
            continue
        try:
            t0 = time.time()
            logits, got, kernels = run(impl, compiled, dtype)
            errors = {k: (rel(got[k], ref[k]) if got[k] is not None else math.inf) for k in ref}
            worst = max(errors, key=errors.get)
            said = (f"max rel error {errors[worst]:.1e} ({worst}), rel_bias {errors['rel_bias.weight']:.1e}, "
                    f"logits {rel(logits, ref_logits):.1e}; "
                    f"{'flex kernel' if impl == 'flex' else 'no SDPA' if impl == 'manual' else kernels}; {time.time() - t0:.0f} s")
            missing = [k for k in got if got[k] is None]
            if missing:
                row('2', name, 'FAIL', f'no gradient reaches {", ".join(missing)}; {said}')
            else:
                row('2', name, 'PASS' if errors[worst] < tol else 'FAIL', said + ('' if errors[worst] < tol else f' >= {tol}'))
        except Exception as e:
            row('2', name, 'FAIL', first_line(e))
        rows += 1
    # evaluation needs no bias gradient, so PyTorch may choose any backend (cuDNN on H100/H200): say which, and check it
    try:
        logits, _, kernels = run('sdpa', False, dtype, train=False)
        err = rel(logits, ref_logits)
        row('2', 'sdpa eval (no grad)', 'PASS' if err < tol else 'FAIL', f'logits rel error {err:.1e}; {kernels}')
    except Exception as e:
        row('2', 'sdpa eval (no grad)', 'FAIL', first_line(e))
    return 0


def pytest_row(a):
    """The summary of `pytest -k test_cuda_ test_all.py` as one row."""
    text = open(a.log, errors='replace').read() if os.path.exists(a.log) else ''
    summary = ([line.strip('= ') for line in text.splitlines() if re.search(r'\d+ (passed|failed|error)', line)] or [''])[-1]
    failed = [line.split()[1] for line in text.splitlines() if line.startswith(('FAILED ', 'ERROR '))]
    if a.rc in (124, 137, 143):
        row('2', 'CUDA tests (pytest)', 'FAIL', f'stopped by its time box{f" after {summary}" if summary else ""} '
            f'(pytest.log); a second run is faster: compiles are cached')
    elif a.rc == 0:
        row('2', 'CUDA tests (pytest)', 'PASS', summary)
    elif a.rc == 5:
        row('2', 'CUDA tests (pytest)', 'FAIL', 'no test_cuda_ tests were collected from test_all.py')
    else:
        row('2', 'CUDA tests (pytest)', 'FAIL', f'{summary}: {", ".join(failed) or "see pytest.log"}')
    return 0


# -----------------------------------------------------------------------------------------------
# 3 end to end on prepared data

def run_script(cmd, limit, on_line=None, env=None):
    """Run cmd from the repo root as a user would, its output echoed (indented) as it comes; stopped after
    limit seconds (SIGTERM, then SIGKILL). Returns (exit code, or 'timeout'; the output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    timed_out = []

    def stop():
        timed_out.append(True)
        for sig_wait in (10, 10):  # train.py saves on the first SIGTERM and quits on the second
            proc.terminate()
            try:
                proc.wait(sig_wait)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    timer = threading.Timer(limit, stop)
    timer.start()
    lines = []
    print(f"  $ {' '.join(cmd)}", flush=True)
    for line in proc.stdout:
        print('    ' + line, end='', flush=True)
        lines.append(line)
        if on_line:
            on_line(line, proc)
    proc.wait()
    timer.cancel()
    return ('timeout' if timed_out else proc.returncode), ''.join(lines)


def failure(rc, out, limit):
    """A failed script's reason: its error line, else its last line."""
    if rc == 'timeout':
        return f'timed out after {limit:.0f} s'
    lines = [line.strip() for line in out.splitlines() if line.strip() and not line.startswith('USDT')]
    errors = [line for line in lines if line.startswith('error:')]
    return f"exit {rc}: {(errors or lines or ['no output'])[-1][:300]}"


def loss_records(run_dir, key='loss'):
    """The records of a run's metrics.jsonl that log key, read as plot.py and train.py's resume read it: a line cut
    short by a killed run (SIGKILL after the second SIGTERM) is skipped, not a traceback."""
    from plot import read_metrics
    path = os.path.join(run_dir, 'metrics.jsonl')
    return [r for r in read_metrics(path, warn=False) if key in r] if os.path.exists(path) else []


def loss_problem(records):
    """Why a run's logged training loss shows it did not train (no loss logged, or the last one not finite), or None."""
    if not records:
        return 'no training loss in its metrics.jsonl'
    last = records[-1]['loss']
    if type(last) not in (int, float) or not math.isfinite(last):
        return f"its loss is {last} at iter {records[-1]['iter']}: training diverged"
    return None


def e2e(a):
    import data
    cuda = a.device.startswith('cuda')
    checks = ['data', 'train + SIGTERM', 'resume', 'export', 'fill-mask', 'torchrun']

    def skip_rest(after, why):
        for check in checks[checks.index(after) + 1:]:
            row('3', check, 'SKIP', why)

    def limit(cap):  # a sub-step's time box: its cap, or what the step's own box has left
        return min(cap, a.deadline - time.time() - 5)

    def no_time(check, box):  # under MIN_BOX left: this check and the rest are SKIPs, not sure FAILs "timed out"
        if box >= MIN_BOX:
            return False
        for c in checks[checks.index(check):]:
            row('3', c, 'SKIP', f"{NO_TIME}: {max(box, 0):.0f} s of this step's time box")
        return True

    prepare = ('prepare it on a machine with `datasets` (python data.py --dataset=pydocs --tokenizer=train '
               '--vocab_size=8192 --out_dir=DIR), copy DIR here and pass --data_dir=DIR')
    d = a.data_dir
    if not d:
        d = data.default_out_dir('pydocs', 'train', 8192)  # what config/tiny.py would have prepared
        if not os.path.isfile(os.path.join(ROOT, d, 'meta.json')):
            row('3', 'data', 'SKIP', f'no --data_dir given and {d} is not prepared: {prepare}')
            skip_rest('data', 'no prepared data')
            return 0
    d = os.path.abspath(os.path.join(ROOT, os.path.expanduser(d)))
    try:
        if not os.path.isdir(d):
            raise data.DataError(f'--data_dir={a.data_dir or d} does not exist: {prepare}')
        meta, _, _ = data.load_prepared(d)
    except data.DataError as e:
        row('3', 'data', 'FAIL', e)
        skip_rest('data', 'needs the prepared data')
        return 1
    row('3', 'data', 'PASS', f"{d}: {meta['n_tokens']['train']:,} train and {meta['n_tokens']['val']:,} val tokens, "
        f"vocab {meta['vocab_size']:,} ({meta.get('tokenizer_source')})")

    # a small but real model on the GPU (4 x 256, T=128, batch 32, bf16, compiled when compile works);
    # the dry run: 2 x 64, T=32, batch 4, float32. config/tiny.py's data keys point at the prepared folder.
    if cuda:
        model = ['--n_layer=4', '--n_head=4', '--n_embd=256', '--n_inner=1024', '--block_size=128', '--batch_size=32',
                 '--eval_iters=10', '--dtype=bfloat16']
        stop_at, more = 150, 150
    else:
        model = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--n_inner=128', '--block_size=32', '--batch_size=4',
                 '--eval_iters=2', '--dtype=float32']
        stop_at, more = 30, 20
    far = 100_000  # the first run is stopped by the signal long before this
    run_dir, hf_dir, ddp_dir = (os.path.join(a.work, x) for x in ('run', 'hf', 'ddp'))
    for folder in (run_dir, hf_dir, ddp_dir):
        subprocess.run(['rm', '-rf', folder])
    common = [sys.executable, 'train.py', 'config/tiny.py', f'--data_dir={d}', f'--device={a.device}',
              f'--compile={a.compile}', *model, '--log_interval=10', '--warmup_iters=20', '--learning_rate=1e-3',
              f'--lr_decay_iters={far}', f'--eval_interval={far}', '--curves=False']

    # train, stopped by SIGTERM mid-run (as a scheduler or a spot machine stops it)
    signalled = []

    def signal_when_due(line, proc):
        m = re.match(r'iter (\d+): loss', line)
        if m and int(m.group(1)) >= stop_at and not signalled:
            signalled.append(int(m.group(1)))
            proc.terminate()
    t0 = time.time()
    box = limit(180)
    if no_time('train + SIGTERM', box):
        return 0
    rc, out = run_script([*common, f'--out_dir={run_dir}', f'--max_iters={far}'], box, signal_when_due)
    m = re.search(r'stopped by SIGTERM at iter (\d+)', out)
    before = loss_records(run_dir)
    if rc != 0 or not m or loss_problem(before):
        row('3', 'train + SIGTERM', 'FAIL', failure(rc, out, box) if rc != 0 else
            f'no "stopped by SIGTERM" line (signal sent: {bool(signalled)})' if not m else loss_problem(before))
        skip_rest('train + SIGTERM', 'needs the stopped run')
        return 1
    stopped = int(m.group(1))
    row('3', 'train + SIGTERM', 'PASS', f'SIGTERM after iter {signalled[0]}: saved and stopped at iter {stopped} '
        f'in {time.time() - t0:.0f} s; loss {before[0]["loss"]:.3f} at iter {before[0]["iter"]} -> '
        f'{before[-1]["loss"]:.3f} at iter {before[-1]["iter"]}')

    # resume: the curve continues where it stopped (a lost optimizer state or model jumps back up)
    t0 = time.time()
    box = limit(120)
    if no_time('resume', box):
        return 0
    rc, out = run_script([*common, f'--out_dir={run_dir}', '--init_from=resume', f'--max_iters={stopped + more}'], box)
    records = loss_records(run_dir)
    after = [r for r in records if r['iter'] > stopped]
    if rc != 0 or f'resuming from iter {stopped}' not in out or not after:
        row('3', 'resume', 'FAIL', failure(rc, out, box) if rc != 0 else
            f'no "resuming from iter {stopped}" line or no loss logged after it')
        skip_rest('resume', 'needs the resumed run')
        return 1
    iters = [r['iter'] for r in records]
    start, last, first = before[0]['loss'], [r for r in records if r['iter'] <= stopped][-1], after[0]
    tol = max(0.3, 0.25 * (start - last['loss']))  # well below a restart from scratch once the loss has fallen
    ok = first['loss'] <= last['loss'] + tol and iters == sorted(set(iters))  # a NaN loss is never <=: a FAIL
    vals = loss_records(run_dir, 'val_loss')
    row('3', 'resume', 'PASS' if ok else 'FAIL',
        f"loss {last['loss']:.3f} at iter {last['iter']} before the stop, {first['loss']:.3f} at iter {first['iter']} "
        f"after it (allowed: up to +{tol:.2f}; started at {start:.3f}); " +
        (f"val loss {vals[0]['val_loss']:.3f} -> {vals[-1]['val_loss']:.3f} at iter {vals[-1]['iter']}; " if vals else
         'no val loss logged; ') + f'{time.time() - t0:.0f} s' +
        ('' if iters == sorted(set(iters)) else '; metrics.jsonl repeats iterations'))

    # export, with convert_hf.py's own parity check against transformers
    best = os.path.join(run_dir, 'best.pt' if os.path.exists(os.path.join(run_dir, 'best.pt')) else 'ckpt.pt')
    box = limit(90)
    if no_time('export', box):
        return 0
    rc, out = run_script([sys.executable, 'convert_hf.py', best, hf_dir], box)
    m = re.search(r'(max \|[\w ]+ diff\|) vs transformers: (\S+)', out)
    if rc != 0 or not m:
        row('3', 'export', 'FAIL', failure(rc, out, box) if rc != 0 else 'no parity line in its output')
        row('3', 'fill-mask', 'SKIP', 'needs the export')
    else:
        row('3', 'export', 'PASS', f'{os.path.basename(best)} -> {hf_dir}: {m.group(1)} vs transformers {m.group(2).rstrip(",")}')
        if no_time('fill-mask', limit(60)):  # it has no box of its own: the step's box would stop it as a FAIL
            return 0
        try:
            fill_mask(hf_dir, best, d, meta, a.device)
        except Exception as e:
            row('3', 'fill-mask', 'FAIL', first_line(e))

    # torchrun with one process: DDP's nccl (gloo on a CPU); eager, to keep within the time budget
    box = limit(120)
    if no_time('torchrun', box):
        return 0
    rc, out = run_script([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                          *common[1:], f'--out_dir={ddp_dir}', '--max_iters=20', '--compile=False'],
                         box, env={'NCCL_DEBUG': 'INFO'} if cuda else None)
    nccl = re.search(r'NCCL version (\S+)', out)
    ms = re.findall(r'iter \d+: loss .*?(\d+) ms/iter', out)
    if rc != 0 or 'done:' not in out or (cuda and not nccl):
        row('3', 'torchrun', 'FAIL', failure(rc, out, box) if rc != 0 else 'no "done:" line (or no NCCL in its log)')
    else:
        backend = f'nccl {nccl.group(1)}' if cuda else 'gloo'
        row('3', 'torchrun', 'PASS', f'--standalone --nproc_per_node=1 on {backend}: 20 iters, '
            f'{ms[-1] if ms else "?"} ms/iter (eager)')
    return 0


def fill_mask(hf_dir, ckpt_path, data_dir, meta, device):
    """transformers' fill-mask pipeline on the export, on the device: a masked word in each of 32 validation
    documents; its top-1 must be our checkpoint's argmax on the same ids (in >= 90% of them)."""
    import numpy as np
    import torch
    from transformers import pipeline
    from checkpoint import load_checkpoint, model_from_checkpoint
    fm = pipeline('fill-mask', model=hf_dir, device=torch.device(device))
    tok = fm.tokenizer
    val = np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=meta['dtype']).astype(np.int64)
    ends = np.flatnonzero(val == meta['eos_id'])
    texts, targets = [], []
    for a, b in zip(np.r_[0, ends[:-1] + 1], ends):
        doc = val[a:b][:48].tolist()
        words = [j for j in range(4, len(doc) - 1) if not tok.convert_ids_to_tokens(doc[j]).startswith('##')
                 and not tok.convert_ids_to_tokens(doc[j + 1]).startswith('##') and doc[j] > 4]
        if len(doc) >= 12 and words:
            j = words[len(words) // 2]
            targets.append(doc[j])
            texts.append(tok.decode(doc[:j] + [tok.mask_token_id] + doc[j + 1:]))
        if len(texts) == 32:
            break
    if not texts:
        raise ValueError(f'no validation document of 12 tokens or more in {data_dir}/val.bin')
    preds = fm(texts, top_k=5)
    preds = [p if isinstance(p[0], dict) else p[0] for p in preds]  # one mask per text: a list of 5 dicts each
    model = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path).to(device).eval()
    agree = 0
    with torch.no_grad():
        for text, p in zip(texts, preds):
            ids = torch.tensor([tok(text)['input_ids']], device=device)
            at = (ids[0] == tok.mask_token_id).nonzero()[0, 0]
            agree += int(model.lm_logits(model.encode(ids)[0, at]).argmax().item() == p[0]['token'])
    hits = sum(t in [c['token'] for c in p] for t, p in zip(targets, preds))
    ok = agree >= 0.9 * len(texts) and fm.device.type == torch.device(device).type
    example = f"'{tok.convert_ids_to_tokens(targets[0])}' masked: top-5 {[c['token_str'] for c in preds[0]]}"
    row('3', 'fill-mask', 'PASS' if ok else 'FAIL', f'pipeline on {fm.device}: top-1 is the checkpoint\'s own argmax in '
        f'{agree}/{len(texts)}; the masked word in its top 5 in {hits}/{len(texts)}; e.g. {example}')


# -----------------------------------------------------------------------------------------------
# 4 speed

def bench_row(a):
    """One bench.py output -> a verdict row and a line of REPORT/speed.md (step 4 at T=512, step 5 past it)."""
    text = open(a.log, errors='replace').read() if os.path.exists(a.log) else ''
    step_id = '5' if a.long else '4'
    name = f'bench {a.impl} batch {a.batch}' + (f' T={a.block_size}' if a.long else '')
    step = re.search(r'step: ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) TFLOP/s, MFU ([^,]+), peak memory ([^,]+), loss (\S+)', text)
    sampler = re.search(r'permutation sampler: ([\d.]+) ms per batch, ([\d.]+)% of the step', text)
    syncs = re.search(r'host syncs in one step: (\d+)', text)
    flops = re.search(r'FLOPs per sequence: (\S+) \(attention scores and sums (\d+)%\); torch.utils.flop_counter: (\S+)', text)
    if a.long and a.rc not in (124, 137, 143) and 'out of GPU memory' in text:
        # past 512 a kernel that does not fit is what the step measures (sdpa's dense bias grows with T^2)
        row(step_id, name, 'SKIP', f'does not fit: out of GPU memory at batch {a.batch} x {a.block_size}')
        speed_line(a, 'out of memory', '-', '-', '-', '-', '-', '-')  # no step, so no numbers
        return 0
    if a.rc in (124, 137, 143) or not step:
        row(step_id, name, 'FAIL', f'timed out after its time box' if a.rc in (124, 137, 143) else failure(a.rc, text, 0))
        return 0
    ms, tps, tflops, mfu, mem, loss = step.groups()
    n_syncs = int(syncs.group(1)) if syncs else None
    said = (f'{ms} ms/step, {tps} tokens/s, {tflops} TFLOP/s, MFU {mfu}, peak {mem}, '
            f'{"n/a" if n_syncs is None else n_syncs} host syncs, sampler {sampler.group(2) if sampler else "?"}% of the step')
    try:
        finite = math.isfinite(float(loss.rstrip(',;')))
    except ValueError:  # not a number at all
        finite = False
    counted = 'estimate_flops is wrong here' not in text  # bench.py compares it with torch's FLOP counter
    if flops:
        said += f', {float(flops.group(1)):.3g} FLOPs/sequence ({flops.group(2)}% attention)' + (
            '' if counted else f', torch.utils.flop_counter counts {flops.group(3)}: estimate_flops is wrong here')
    ok = a.rc == 0 and finite and not n_syncs and counted
    row(step_id, name, 'PASS' if ok else 'FAIL', said + ('' if finite else f'; loss {loss}') +
        (f'; bench.py exit {a.rc}' if a.rc else ''))
    speed_line(a, ms, tps, tflops, mfu, mem, 'n/a' if n_syncs is None else n_syncs,
               sampler.group(2) + '%' if sampler else '?',
               f'{float(flops.group(1)):.3g} ({flops.group(2)}% attention)' if flops else '?')
    return 0


def speed_line(a, ms, tps, tflops, mfu, mem, syncs, share, flops='-'):
    """A row of REPORT/speed.md: the step's numbers at its T (the model FLOPs a sequence grow with T: attention)."""
    path = os.path.join(REPORT, 'speed.md')
    if not os.path.exists(path):
        with open(path, 'w') as f:
            f.write('| attn_impl | T | batch | ms/step | tokens/s | TFLOP/s | MFU | peak memory | host syncs | sampler share '
                    '| FLOPs/sequence |\n|---|---|---|---|---|---|---|---|---|---|---|\n')
    with open(path, 'a') as f:
        f.write(f'| {a.impl} | {a.block_size} | {a.batch} | {ms} | {tps} | {tflops} | {mfu} | {mem} | {syncs} | {share} '
                f'| {flops} |\n')


def verdict(rows, interrupted=False):
    """(the run's verdict line, its exit status): 1 if a check FAILed; 2 if a check had no time left or none ran to
    a verdict, since a run that checked nothing must not pass; else 0, SKIPs that cannot run here being no failure."""
    fails = sum(r[2] == 'FAIL' for r in rows)
    no_time = sum(r[2] == 'SKIP' and r[3].startswith(NO_TIME) for r in rows)
    skips = sum(r[2] == 'SKIP' for r in rows) - no_time
    if interrupted:
        return 'verdict: STOPPED: the run was interrupted before it finished', 130
    if fails:
        return f"verdict: FAIL: {fails} check{'s' if fails > 1 else ''} failed", 1
    if not any(r[2] == 'PASS' for r in rows):
        return 'verdict: NOTHING CHECKED: no check ran to a PASS or a FAIL', 2
    if no_time:
        return (f"verdict: INCOMPLETE: {no_time} check{'s' if no_time > 1 else ''} had no time left, and a SKIP for "
                f"lack of time is not a PASS: give a larger --budget"), 2
    return 'verdict: PASS' + (f" ({skips} SKIP: checks that cannot run here, each row says why)" if skips else ''), 0


def table(a):
    """The verdict table so far (REPORT/summary.txt, rewritten after every step), then the speed table; the final
    one (not --quiet) ends with the verdict, and its exit status is the run's."""
    path = os.path.join(REPORT, 'verdicts.tsv')
    # four fields a row, whatever a cut-off writer left
    rows = [(line.rstrip('\n').split('\t', 3) + [''] * 4)[:4] for line in open(path, errors='replace') if line.strip()] \
        if os.path.exists(path) else []
    counts = {v: sum(r[2] == v for r in rows) for v in ('PASS', 'FAIL', 'SKIP')}
    w0, w1 = (max([len(r[i]) for r in rows] + [5]) for i in (0, 1))
    lines = [f"== .ci/gpu verdict{f' after {a.elapsed} s' if a.elapsed is not None else ''}: "
             f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"]
    lines += [f'{"step":<{w0}}  {"check":<{w1}}  verdict  number']
    lines += [f'{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<7}  {r[3]}' for r in rows]
    speed = os.path.join(REPORT, 'speed.md')
    if os.path.exists(speed):
        lines += ['', 'speed (bench.py, timed after the compile, alone on the device):', open(speed).read().rstrip()]
    said, rc = verdict(rows, a.interrupted)
    if not a.quiet:  # the table so far has no verdict yet
        lines += ['', said]
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(REPORT, 'summary.txt'), 'w') as f:
        f.write(text)
    if not a.quiet:
        print(text, end='')
    return rc


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='the checks behind .ci/gpu (run that)')
    sub = parser.add_subparsers(dest='cmd', required=True)
    for name in ('env', 'grads', 'e2e'):
        p = sub.add_parser(name)
        p.add_argument('--device', default='cuda')
        p.add_argument('--compile', default='True', choices=['True', 'False'])
        p.add_argument('--work', default='/tmp/nano-mpnet-gpu-check')
        p.add_argument('--data_dir', default='')
        p.add_argument('--deadline', type=float, default=math.inf)
    p = sub.add_parser('pytest')
    p.add_argument('log')
    p.add_argument('rc', type=int)
    p = sub.add_parser('bench')
    p.add_argument('log')
    p.add_argument('impl')
    p.add_argument('batch')
    p.add_argument('rc', type=int)
    p.add_argument('--block_size', default='512')
    p.add_argument('--long', action='store_true')
    p = sub.add_parser('table')
    p.add_argument('--elapsed', type=int, default=None)
    p.add_argument('--quiet', action='store_true')
    p.add_argument('--interrupted', action='store_true')
    args = parser.parse_args()
    if hasattr(args, 'compile'):
        args.compile = args.compile == 'True'
    os.makedirs(REPORT, exist_ok=True)
    sys.exit({'env': env, 'grads': grads, 'e2e': e2e, 'pytest': pytest_row, 'bench': bench_row, 'table': table}[args.cmd](args))
