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
    hf/            the export the run's last line suggests (convert_hf.py)
    replaced/      a previous run's files, moved aside by overwrite=True (replace_run): they stay until this
                   run saves a model at least as good as the one they hold (release_replaced), or the user
                   deletes them, so that starting over never deletes a model before a better one exists

Writes are atomic: a temp file of the writer's own beside the target, fsync, then os.replace. A crash,
a full disk or a second writer never leaves a torn file, and the previous file stays until the new one
is complete; a failed write removes its temp file.
"""

import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import zipfile

import torch
import torch.distributed as dist

from configurator import die
from model import MPNet, MPNetConfig, extend_positions


class CheckpointError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def _reason(e):
    return e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _temp_name(path):
    return f'{path}.{os.getpid()}.{time.monotonic_ns() % 10**9}.tmp'  # one writer's own, never shared


def remove_dead_writers_temp_files(path, who='process'):
    """The temp files beside path (_temp_name's PATH.PID.N.tmp, as large as a checkpoint) of writers that are gone (a
    kill -9 during a save) removed; a line to print for each. A live writer's stays."""
    from data import pid_alive
    said = []
    for left in glob.glob(glob.escape(path) + '.*.tmp'):
        pid = re.fullmatch(r'\.(\d+)\.\d+\.tmp', left[len(path):])
        if pid and not pid_alive(int(pid[1])) and os.path.isfile(left):
            os.remove(left)
            said.append(f'removed {left}: left by {who} {pid[1]}, which is gone')
    return said


_writing = set()  # temp files being written now: a second Ctrl-C (stop_on_signals) removes them before quitting


def save_checkpoint(ckpt, path):
    """Write ckpt to path atomically (see the module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temp_name(path)
    _writing.add(tmp)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'xb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C or a signal during the write too: the temp file never stays
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        # torch reports a short write as a RuntimeError ("unexpected pos ..."), not as the OSError behind it
        reason = _reason(e) if isinstance(e, OSError) else 'the write was cut short: disk full or a file size limit'
        free = f'{shutil.disk_usage(folder).free / 2**30:.1f} GiB free there' if os.path.isdir(folder) else 'no folder'
        kept = f'the previous {os.path.basename(path)} is unchanged' if os.path.exists(path) else 'nothing was written'
        raise CheckpointError(f'could not write {path} ({reason}; {free}): {kept}') from None
    finally:
        _writing.discard(tmp)


def link_checkpoint(src, dst):
    """dst becomes the same file as src (a hard link, no copy; a copy where links are not supported), atomically."""
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f'could not write {dst} ({_reason(e)}): the previous {os.path.basename(dst)} is unchanged') from None


def same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


# what a run leaves in out_dir: all of it is the run's, and overwrite=True moves all of it (finetune.py's scores of
# the run's checkpoints included: a new run's curves must not draw the old model's scores)
RUN_FILES = ('ckpt.pt', 'best.pt', 'snapshots', 'hf', 'metrics.jsonl', 'curves.png', 'scores.jsonl')
MODEL_FILES = RUN_FILES[:4]
REPLACED = 'replaced'
# what a validation loss was measured on: two runs' losses compare only when all of these agree (the same
# blocks, the same fixed permutations, the same task); the data fingerprint is added to them
VALIDATION_KEYS = ('block_size', 'batch_size', 'eval_iters', 'pred_frac', 'mask_prob', 'rand_prob', 'whole_word',
                   'objective', 'doc_mask')


# what a checkpoint carries for convert_hf.py to rebuild the user's artefact (tokenizer, sentence-transformers modules,
# an HF pooler, the context extension the export's lengths follow): every stage that writes a checkpoint from another
# one (train.py, contrastive.py, finetune.py) passes all of it on
EXPORT_KEYS = ('tokenizer_files', 'special_ids', 'st_files', 'st_path', 'hf_extra', 'positions_extended')


def carried_for_export(ckpt):
    return {k: ckpt[k] for k in EXPORT_KEYS if ckpt is not None and ckpt.get(k) is not None}


def validation_key(config, fingerprint):
    return json.dumps([fingerprint, [(config or {}).get(k) for k in VALIDATION_KEYS]], sort_keys=True, default=str)


# what picks best.pt: the checkpoint value it reads, and whether lower (train.py's validation loss) or higher
# (contrastive.py's held-out MRR) is better; the same measure, on the same validation key, releases a replaced run
MEASURES = {'val_loss': ('min', 'val loss'), 'val_mrr': ('max', 'held-out MRR'), 'val_sts': ('max', 'general Spearman'),
            'val_mean': ('max', 'mean of held-out MRR and general Spearman')}


def at_least_as_good(score, other, measure):
    return score <= other if MEASURES[measure][0] == 'min' else score >= other


def shown_score(score, measure):
    return f'{MEASURES[measure][1]} {score:.4f}' if isinstance(score, (int, float)) and math.isfinite(score) else ''


def _held(out_dir):
    """The run files out_dir holds (an empty log or snapshot folder is none)."""
    def present(name):
        path = os.path.join(out_dir, name)
        return (bool(os.listdir(path)) if os.path.isdir(path) else os.path.getsize(path) > 0 if os.path.isfile(path)
                else os.path.lexists(path))
    return [name for name in RUN_FILES if present(name)]


def replace_run(out_dir, start=None):
    """overwrite=True: move the previous run's files into out_dir/replaced/ instead of deleting them. `start` is
    the checkpoint file this run starts from, if any. Returns a line to print (None if there was nothing to
    move) and where the start file is now."""
    keep = os.path.join(out_dir, REPLACED)
    record = os.path.join(keep, 'replaced.json')  # written last: without it, a move was cut short and goes on
    present = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    if os.path.isfile(record):
        _check_one_replaced(out_dir, present)
        for name in present:  # the log of a run that saved nothing
            os.remove(os.path.join(out_dir, name))
        try:  # the kept run stays; whether it is this run's start is this run's to say
            with open(record) as f:
                info = json.load(f)
            info['start'] = any(start and same_file(start, os.path.join(keep, n)) for n in ('best.pt', 'ckpt.pt'))
            with open(record, 'w') as f:
                json.dump(info, f)
        except (OSError, ValueError, TypeError):  # unreadable: never released automatically
            pass
        return None, start
    if not present and not os.path.isdir(keep):
        return None, start
    best = next((n for n in ('best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(out_dir, n))), None)
    is_start = bool(best and start and same_file(start, os.path.join(out_dir, best)))
    real_dir = os.path.realpath(out_dir)
    if start and os.path.realpath(start).startswith(real_dir + os.sep):  # it moves with the rest
        start = os.path.join(keep, os.path.relpath(os.path.realpath(start), real_dir))
    try:
        os.makedirs(keep, exist_ok=True)
        for name in present:
            os.replace(os.path.join(out_dir, name), os.path.join(keep, name))
        # a run that saved no model (killed before its first save) left only its log: nothing to protect, so this
        # run's first save releases it
        info = dict(start=is_start, iter_num=None, measure=None, score=None, key=None,
                    no_model=not any(n in MODEL_FILES for n in present))
        best = next((n for n in ('best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(keep, n))), None)
        if best:
            try:  # only a few values of it: mapped, not read whole
                ckpt = torch.load(os.path.join(keep, best), map_location='cpu', weights_only=True, mmap=True)
                measure = ckpt.get('best_measure', 'val_loss')  # older checkpoints: train.py's validation loss
                info.update(iter_num=ckpt.get('iter_num'), measure=measure, score=ckpt.get(measure),
                            key=ckpt.get('validation_key') or validation_key(ckpt.get('config'), ckpt.get('data_fingerprint')))
            except Exception:  # unreadable: kept until the user deletes it
                pass
        with open(record, 'w') as f:
            json.dump(info, f)
    except OSError as e:
        raise CheckpointError(f"cannot move the previous run's files into {keep} ({_reason(e)}): nothing was "
                              f"deleted; free the folder or choose another --out_dir") from None
    if info['no_model']:
        return (f"overwrite: the previous run saved no model; its files ({', '.join(present)}) are moved to {keep} "
                f"until this run saves its first checkpoint"), start
    score = shown_score(info['score'], info['measure']) if info['measure'] in MEASURES else ''
    return (f"overwrite: the previous run's files ({', '.join(present)}) are moved to {keep}; they stay until this "
            f"run saves a model at least as good as {best or 'theirs'} (iter {info['iter_num']}{', ' * bool(score)}"
            f"{score}) on the same held-out data"), start


def _check_one_replaced(out_dir, present):
    keep = os.path.join(out_dir, REPLACED)
    models = [n for n in present if n in MODEL_FILES]
    if models and os.path.isfile(os.path.join(keep, 'replaced.json')):
        raise CheckpointError(f"out_dir '{out_dir}' holds a run ({', '.join(models)}) and, in {keep}, an earlier one "
                              f"that it has not beaten; overwrite=True keeps one replaced run only: delete whichever "
                              f"you no longer need, or choose another --out_dir")


def release_replaced(out_dir, score, key, measure, beat_start, improved=True):
    """After this run saved a new best (score of `measure`, on the held-out data validation_key names): delete
    out_dir/replaced/ if that model is at least as good as the replaced run's best by the same measure on the same
    held-out data, or if the replaced best is the model this run started from and this run beat it. A replaced run
    judged by another measure (or an unreadable one) stays. Returns a line to print, or None."""
    keep = os.path.join(out_dir, REPLACED)
    try:
        with open(os.path.join(keep, 'replaced.json')) as f:
            info = json.load(f)
        if 'measure' not in info:  # written before measures were named: train.py's validation loss
            info.update(measure='val_loss', score=info.get('val_loss'))
    except (OSError, ValueError, AttributeError):
        return None  # no replaced run, or one that is not ours to judge
    if info.get('no_model'):
        shutil.rmtree(keep, ignore_errors=True)
        return f"removed {keep}: the replaced run had saved no model"
    if not improved:
        return None
    if not (info.get('start') and beat_start or info.get('key') == key and info.get('measure') == measure
            and isinstance(info.get('score'), (int, float)) and isinstance(score, (int, float))
            and at_least_as_good(score, info['score'], measure)):
        return None
    shutil.rmtree(keep, ignore_errors=True)
    return f"removed {keep}: this run's best ({shown_score(score, measure)}) is at least as good as the replaced run's"


def keep_snapshot(out_dir, iter_num, keep):
    """out_dir/snapshots/iter_N.pt, a hard link to the ckpt.pt just saved (no copy); only the newest `keep`
    snapshots stay. Returns its path."""
    folder = os.path.join(out_dir, 'snapshots')
    snapshot = os.path.join(folder, f'iter_{iter_num:07d}.pt')
    os.makedirs(folder, exist_ok=True)
    link_checkpoint(os.path.join(out_dir, 'ckpt.pt'), snapshot)
    for old in sorted(f for f in os.listdir(folder) if f.endswith('.pt'))[:-keep]:
        os.remove(os.path.join(folder, old))
    return snapshot


def save_run(ckpt, out_dir, improved=False, key=None, beat_start=True, snapshot_keep=0, unit='iter', measure='val_loss'):
    """The run folder's saving policy: ckpt (a checkpoint dict with iter_num and the value of `measure`, what picks
    best.pt: see MEASURES) written atomically to out_dir/ckpt.pt; when the run improved, best.pt linked to it and a
    replaced run that it beat by the same measure on the same held-out data (validation_key `key`) released; with
    snapshot_keep, also kept as a snapshot. Returns the lines to print; CheckpointError."""
    ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
    # what a later overwrite=True run compares with: the measure, and what it was measured on
    save_checkpoint({**ckpt, 'validation_key': key, 'best_measure': measure}, ckpt_path)
    also, released = [], None
    if improved:
        link_checkpoint(ckpt_path, best_path)
        also.append(f'{best_path}: the best so far')
    released = release_replaced(out_dir, ckpt[measure], key, measure, beat_start, improved)
    if snapshot_keep:
        also.append(f"snapshot {keep_snapshot(out_dir, ckpt['iter_num'], snapshot_keep)}")
    return [f"saved {ckpt_path} at {unit} {ckpt['iter_num']}" + (f" (also {'; '.join(also)})" if also else '')] + (
        [released] if released else [])


def exportable(out_dir, start_file, best_iter):
    """The file an ended run's last line suggests exporting: its best, else the model it started from when
    nothing beat it, else its latest checkpoint; never one worse than the start. None if there is none."""
    best_path, ckpt_path = os.path.join(out_dir, 'best.pt'), os.path.join(out_dir, 'ckpt.pt')
    return (best_path if os.path.exists(best_path) else start_file if start_file and best_iter is None else
            ckpt_path if os.path.exists(ckpt_path) else None)


def run_summary(out_dir, best_iter, best_score, last_saved, start_file, measure='val_loss', unit='iter'):
    """Which files of a run hold what, for every line that ends it (done, stopped, or an error): the best model (or
    that none beat the model it started from), the latest checkpoint when it is another, and a replaced run still
    kept. best_score: the best value of `measure` so far (MEASURES); last_saved: (iter, score) of the latest save."""
    best_path, ckpt_path = os.path.join(out_dir, 'best.pt'), os.path.join(out_dir, 'ckpt.pt')
    best = (f'the best model is {best_path} ({unit} {best_iter}, {shown_score(best_score, measure)})'
            if best_iter is not None and os.path.exists(best_path) else
            'no checkpoint beat the starting model' + (f' {start_file}' if start_file else '') +
            f' ({shown_score(best_score, measure)})' if shown_score(best_score, measure) else
            'no model was evaluated yet')
    last = (f'the latest checkpoint is {ckpt_path}' + (f' ({unit} {last_saved[0]}, {shown_score(last_saved[1], measure)})'
            if last_saved and shown_score(last_saved[1], measure) and last_saved[0] != best_iter else '')
            if os.path.exists(ckpt_path) else 'no checkpoint was saved')
    replaced = os.path.join(out_dir, REPLACED)
    return f'{best}; {last}' + (f'; {replaced} keeps the replaced run until a model at least as good is saved'
                                if os.path.isdir(replaced) else '')


def stop_on_signals(master, unit='iteration'):
    """SIGINT/SIGTERM make a run save and stop at its next `unit` boundary (the returned list then holds the
    signal); a second one quits at once, saving nothing: the last checkpoint stays as it is."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            for tmp in list(_writing):  # a checkpoint half written: the previous one stays, the temp file goes
                if os.path.exists(tmp):
                    os.remove(tmp)
            if master:
                print(f'{signal.Signals(signum).name} again: quitting without saving', file=sys.stderr, flush=True)
            os._exit(130)
        stop.append(signum)
        if master:
            print(f'{signal.Signals(signum).name}: stopping after this {unit}, saving first if it trained anything '
                  f'(press Ctrl-C again to quit at once without saving)', flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop


def ranks_disagree(value, error, what):
    """Under torchrun every rank passes its value of `what` (e.g. its data's fingerprint), or the error that kept it
    from one; returns the one line every rank stops with if any rank failed or differs from rank 0 (naming that
    rank's node), else None. A single process: its own error."""
    mine = dict(rank=dist.get_rank() if dist.is_initialized() else 0, host=socket.gethostname(), value=value, error=error)
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    first = everyone[0]
    for r in everyone:
        if r['error'] and (r['rank'] == 0 or not first['error']):  # rank 0's own error is said as it is
            return r['error'] if r['rank'] == 0 else (
                f"rank {r['rank']} on node {r['host']}: {r['error']} (every node needs the same {what}: a shared file "
                f"system, or a copy of rank 0's folder; see README, several nodes)")
    for r in everyone:
        if r['value'] != first['value']:
            differ = ' and '.join(k for k in first['value'] if r['value'][k] != first['value'][k])
            return (f"rank {r['rank']} on node {r['host']} sees other {what} than rank 0 on node {first['host']} "
                    f"({differ} differ): copy rank 0's folder to every node (a vocabulary trained twice differs) or use "
                    f"a shared file system; see README, several nodes")


def stop_unless_ranks_agree(value, error, what):
    """Every rank stops with one line if any rank failed or sees another `what` than rank 0 (ranks_disagree)."""
    disagree = ranks_disagree(value, error, what)
    if disagree:
        die(disagree)


def trim_log(path, iter_num):
    """A run resumed at iter_num trains the iterations after it again: drop what the interrupted run logged of
    them (and its evaluation at iter_num, measured and logged again at start: not counted, nothing is lost), so that
    the log holds each iteration once.
    Lines that are no record (plot.parse_record, the rule plot.py reads by) are dropped too. Returns (records dropped, bad lines dropped)."""
    if not os.path.exists(path):
        return 0, 0
    try:
        with open(path, 'rb') as f:
            lines = f.read().splitlines(keepends=True)
    except OSError as e:
        raise CheckpointError(f'cannot read {path} ({_reason(e)})') from None
    from plot import parse_record  # standard library only at plot.py's top
    lines = [line for line in lines if line.strip()]
    records = [parse_record(line) for line in lines]
    keep = [line if line.endswith(b'\n') else line + b'\n' for line, r in zip(lines, records)
            if r is not None and (r['iter'] < iter_num or r['iter'] == iter_num and 'val_loss' not in r)]
    redone = sum(r is not None and r['iter'] == iter_num and 'val_loss' in r for r in records)  # measured again now
    if len(keep) < len(lines):
        tmp = _temp_name(path)
        try:
            with open(tmp, 'wb') as f:
                f.writelines(keep)
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not isinstance(e, OSError):
                raise
            raise CheckpointError(f'could not rewrite {path} ({_reason(e)})') from None
    bad = records.count(None)
    return len(lines) - len(keep) - bad - redone, bad


def _others(path):
    """The other checkpoints of path's run folder, most useful first: what to try when path is unreadable."""
    folder = os.path.dirname(os.path.abspath(path))
    snapshots = sorted(glob.glob(os.path.join(folder, 'snapshots', '*.pt')), reverse=True)
    candidates = [os.path.join(folder, n) for n in ('best.pt', 'ckpt.pt')] + snapshots[:1] + \
        [os.path.join(folder, REPLACED, 'best.pt')]
    return [c for c in candidates if zipfile.is_zipfile(c) and not same_file(c, path)]


def _unreadable(path, reason):
    others = _others(path)
    return CheckpointError(f"'{path}' is not a readable checkpoint ({reason}): " +
                           (f"use {others[0]} (another checkpoint of that run), or start over" if others else
                            'no other checkpoint is beside it: use an export, or start over'))


def load_checkpoint(path):
    """The checkpoint dict at path, on the CPU; a CheckpointError naming the problem if it cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' not found (train one with: python train.py config/tiny.py)")
    if not zipfile.is_zipfile(path):
        raise _unreadable(path, 'truncated, or not a PyTorch file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a damaged archive, or objects that are not tensors and plain values
        reason = ('it holds Python objects, which are not loaded (weights_only=True)' if 'Weights only' in str(e)
                  else _reason(e)[:120])
        raise _unreadable(path, reason) from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= set(ckpt):
        raise CheckpointError(f"'{path}' is a PyTorch file but not a nano-mpnet checkpoint (no 'model' and 'model_args')")
    return ckpt


def cpu_attention(device):
    """model_args overrides for a sentence model on a CPU: the plain attention, since SDPA's CPU path adds a safe-softmax
    pass over (B, nh, T, T) (MEASUREMENTS.md, against sentence-transformers); a checkpoint keeps its own attn_impl."""
    return {'attn_impl': 'manual'} if torch.device(device).type == 'cpu' else {}


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


def extend_checkpoint(ckpt, max_positions):
    """A run from ckpt asked for max_positions: grow its position table in place (model.extend_positions) and
    record the growth (positions_extended: the export's lengths follow it). Returns a line to print, or None when
    the table already has that size; CheckpointError for a smaller one."""
    held = ckpt['model_args']['max_positions']
    if max_positions < held:
        raise CheckpointError(f"max_positions {max_positions} is below the checkpoint's {held}: a position table never "
                              f"shrinks; leave max_positions out (the checkpoint's is used) or give {held} or more")
    if max_positions == held:
        return None
    rope = ckpt['model_args'].get('rope')
    if not rope:  # rotary positions have no table: nothing to copy
        ckpt['model'] = extend_positions(ckpt['model'], MPNetConfig(**ckpt['model_args']), max_positions)
    ckpt['model_args'] = {**ckpt['model_args'], 'max_positions': max_positions}
    ckpt['positions_extended'] = [*ckpt.get('positions_extended', []), [held, max_positions]]
    return f'positions: {held} -> {max_positions}, ' + ('rotary, no table to grow' if rope else
                                                         f'the new rows copied from the {held} learned ones (Longformer); '
                                                         f'outputs up to {held} tokens unchanged')


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
    held = _held(out_dir)
    if overwrite:
        _check_one_replaced(out_dir, held)
    if held and not resume and not overwrite:
        when = time.strftime('%Y-%m-%d %H:%M', time.localtime(max(os.path.getmtime(os.path.join(out_dir, p)) for p in held)))
        go_on = ('continue it with --init_from=resume, ' if os.path.isfile(os.path.join(out_dir, 'ckpt.pt')) else
                 '')  # a run killed before its first save left only its log: nothing to resume
        nothing = '' if any(n in MODEL_FILES for n in held) else '; it saved no model'
        raise CheckpointError(f"out_dir '{out_dir}' already holds a run ({', '.join(held)}, last written {when}{nothing}): "
                              f"{go_on}replace it with --overwrite=True (its files are kept in {REPLACED}/ until "
                              f"this run beats them), or choose another --out_dir")
    return lock


def mend_resumed_run(out_dir, iter_num, best_iter, unit='iter'):
    """A resumed run's folder as its checkpoint says: best.pt relinked to ckpt.pt if the run was killed between
    writing one and linking the other, and metrics.jsonl trimmed to iter_num (those steps run again). Lines to print."""
    ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
    if best_iter == iter_num and not same_file(ckpt_path, best_path):
        link_checkpoint(ckpt_path, best_path)
    dropped, bad = trim_log(os.path.join(out_dir, 'metrics.jsonl'), iter_num)
    return [f'metrics.jsonl: dropped {dropped} records logged after {unit} {iter_num} by the interrupted run (those '
            f'{unit}s run again)' + (f' and {bad} lines that are no record' if bad else '')] if dropped or bad else []


def ready_run_dir(out_dir, overwrite, resume, start_file, iter_num, best_iter, n_bytes, unit='iter'):
    """A run's rank 0 (train.py, contrastive.py), once the run has everything it needs: an overwritten run moves
    aside only now; a resumed run's folder is mended (mend_resumed_run); and there must be room to save.
    Returns (lines to print, the checkpoint the run starts from: a replaced one has moved). CheckpointError."""
    said, ckpt_path = [], os.path.join(out_dir, 'ckpt.pt')
    if overwrite:
        line, start_file = replace_run(out_dir, start=start_file)
        said += [line] if line else []
    if resume:
        said += mend_resumed_run(out_dir, iter_num, best_iter, unit)
    check_free_space(out_dir, n_bytes, 1 if os.path.exists(ckpt_path) else 2)
    return said, start_file


def restore_random_state(states, rank, world_size, perm_gen, reseed):
    """A resumed rank's random streams (dropout, permutations) as its checkpoint left them; written by another
    number of processes, new streams seeded by reseed (so the run is not bit-identical): then a note to print."""
    if len(states) != world_size:
        perm_gen.manual_seed(reseed)
        torch.manual_seed(reseed)
        return (f'note: the checkpoint was written by {len(states)} processes and resumes on {world_size}: the data '
                f'continues at exactly the next block, with new random streams, so the run is not bit-identical '
                f'to an uninterrupted one')
    perm_gen.set_state(states[rank]['perm_rng'])
    torch.set_rng_state(states[rank]['cpu_rng'])
    if states[rank].get('cuda_rng') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]['cuda_rng'])


def check_free_space(out_dir, n_bytes, copies):
    """CheckpointError if out_dir's file system cannot hold `copies` checkpoints of n_bytes."""
    free = shutil.disk_usage(out_dir).free
    if free < copies * n_bytes:
        raise CheckpointError(f"out_dir '{out_dir}' has {free / 2**30:.2f} GiB free, but a checkpoint takes about "
                              f"{n_bytes / 2**30:.2f} GiB and the run may keep {copies} at once (latest, best, the one "
                              f"being written): free some space or choose another --out_dir")
