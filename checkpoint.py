"""
Checkpoints and the run folder that holds them: the one place train.py and convert_hf.py write and
read them.

    from checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint('out-tiny/best.pt')   # a dict; one-line CheckpointError if unreadable
    model = model_from_checkpoint(ckpt, 'out-tiny/best.pt')

A checkpoint is a dict of tensors and plain Python values (torch.load(..., weights_only=True)): model,
model_args, config, iter_num, val_loss, best_val_loss, optimizer, rank_states (every rank's RNG states and
data position), data_fingerprint, tokenizer_files, special_ids. A run folder (train.py's out_dir) holds:

    ckpt.pt        the latest state, what --init_from=resume continues
    best.pt        the state with the lowest validation loss so far (a hard link while it is the latest):
                   a run that diverges later never reaches it
    train.lock     locked by the run writing here (it names that run's PID and host); the kernel frees
                   the lock when the process dies, so a killed run's lock is simply taken over (and the
                   temp file it may have left is removed)
    snapshots/     iter_N.pt every snapshot_interval iterations (hard links of ckpt.pt when it was written)
    metrics.jsonl  the log, and curves.png its curves

Writes are atomic: a temp file of the writer's own beside the target, fsync, then os.replace. A crash,
a full disk or a second writer never leaves a torn file, and the previous file stays until the new one
is complete; a failed write removes its temp file.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import time
import zipfile

import torch

from model import MPNet, MPNetConfig


class CheckpointError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def _reason(e):
    return e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _temp_name(path):
    return f'{path}.{os.getpid()}.{time.monotonic_ns() % 10**9}.tmp'  # one writer's own, never shared


def save_checkpoint(ckpt, path):
    """Write ckpt to path atomically (see the module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temp_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'xb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch reports a short write as a RuntimeError ("unexpected pos ..."), not as the OSError behind it
        reason = _reason(e) if isinstance(e, OSError) else 'the write was cut short: disk full or a file size limit'
        free = f'{shutil.disk_usage(folder).free / 2**30:.1f} GiB free there' if os.path.isdir(folder) else 'no folder'
        kept = f'the previous {os.path.basename(path)} is unchanged' if os.path.exists(path) else 'nothing was written'
        raise CheckpointError(f'could not write {path} ({reason}; {free}): {kept}') from None


def link_checkpoint(src, dst):
    """dst becomes the same file as src (a hard link, no copy; a copy where links are not supported), atomically."""
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f'could not write {dst} ({_reason(e)}): the previous {os.path.basename(dst)} is unchanged') from None


def same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def clear_run(out_dir):
    """Remove a previous run's files (overwrite=True): its checkpoints, snapshots, log and curves."""
    for name in ('ckpt.pt', 'best.pt', 'metrics.jsonl', 'curves.png'):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, 'snapshots'), ignore_errors=True)


def trim_log(path, iter_num):
    """A run resumed at iter_num trains the iterations after it again: drop what the interrupted run logged of
    them (and its evaluation at iter_num, logged again at start), so that the log holds each iteration once.
    Returns the number of records dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()

    def kept(line):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # cut short by the crash
            return False
        return record['iter'] < iter_num or record['iter'] == iter_num and 'val_loss' not in record
    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines):
        tmp = _temp_name(path)
        try:
            with open(tmp, 'w') as f:
                f.writelines(keep)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CheckpointError(f'could not rewrite {path} ({_reason(e)})') from None
    return len(lines) - len(keep)


def load_checkpoint(path):
    """The checkpoint dict at path, on the CPU; a CheckpointError naming the problem if it cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found (train one with: python train.py config/tiny.py)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated, or not a PyTorch file): "
                              f"use another (best.pt, an export), or start over")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a damaged archive, or objects that are not tensors and plain values
        reason = ('it holds Python objects, which are not loaded (weights_only=True)' if 'Weights only' in str(e)
                  else _reason(e)[:120])
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({reason}): "
                              f"use another (best.pt, an export), or start over") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= set(ckpt):
        raise CheckpointError(f"'{path}' is a PyTorch file but not a nano-mpnet checkpoint (no 'model' and 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt, path, **overrides):
    """The MPNet of a checkpoint dict, its weights loaded; overrides replace model_args entries."""
    try:
        model = MPNet(MPNetConfig(**{**ckpt['model_args'], **overrides}))
        model.load_state_dict(ckpt['model'])
    except (TypeError, ValueError, RuntimeError) as e:  # load_state_dict names the keys on its second line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"'{path}' does not hold a model this code can build "
                              f"({(lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:160]})") from None
    return model


def checkpoint_bytes(model, with_optimizer=True):
    """About how many bytes one checkpoint of model takes: fp32 weights, plus AdamW's two moments."""
    return sum(p.numel() for p in model.parameters()) * 4 * (3 if with_optimizer else 1)


def claim_run_dir(out_dir, resume, overwrite):
    """Create out_dir if needed and take its lock; returns the open lock file, held until the process
    exits. CheckpointError if out_dir cannot be written, if another live run holds it, or if it holds a
    previous run that this one neither resumes nor was told to overwrite."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = _temp_name(os.path.join(out_dir, 'write-test'))
        open(probe, 'x').close()  # a read-only folder or file system fails here, before any work
        os.remove(probe)
        lock = open(os.path.join(out_dir, 'train.lock'), 'a+')
    except OSError as e:
        raise CheckpointError(f"cannot write to out_dir '{out_dir}' ({_reason(e)}): choose a writable --out_dir") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        raise CheckpointError(f"out_dir '{out_dir}' is in use by a running training ({holder}): wait for it, "
                              f"stop it, or choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {socket.gethostname()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    lock.flush()
    for folder in (out_dir, os.path.join(out_dir, 'snapshots')):  # a killed writer's temp files (_temp_name's):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:  # with the lock held, no writer is left
            if re.search(r'\.\d+\.\d+\.tmp$', name):
                os.remove(os.path.join(folder, name))
    held = [p for p in ('ckpt.pt', 'best.pt') if os.path.exists(os.path.join(out_dir, p))]
    if held and not resume and not overwrite:
        when = time.strftime('%Y-%m-%d %H:%M', time.localtime(max(os.path.getmtime(os.path.join(out_dir, p)) for p in held)))
        raise CheckpointError(f"out_dir '{out_dir}' already holds a run ({' and '.join(held)}, last written {when}): "
                              f"continue it with --init_from=resume, replace it with --overwrite=True, or choose "
                              f"another --out_dir")
    return lock


def check_free_space(out_dir, n_bytes, copies):
    """CheckpointError if out_dir's file system cannot hold `copies` checkpoints of n_bytes."""
    free = shutil.disk_usage(out_dir).free
    if free < copies * n_bytes:
        raise CheckpointError(f"out_dir '{out_dir}' has {free / 2**30:.2f} GiB free, but a checkpoint takes about "
                              f"{n_bytes / 2**30:.2f} GiB and the run may keep {copies} at once (latest, best, the one "
                              f"being written): free some space or choose another --out_dir")
