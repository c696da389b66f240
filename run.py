"""
The run harness: what every training script does around its algorithm, in one place, so that train.py and
contrastive.py keep one policy for their run folder and a fix lands once. A reader after the algorithm can skip it.

    ddp, rank, world_size, device = start_processes(device, seed)     # torchrun's processes, or one
    run = Run(out_dir, resume, overwrite, measure='val_loss', unit='iter', master=rank == 0, ddp=ddp)
    run.claim()                           # the folder's lock: one run at a time, no run replaced by accident
    ...                                   # load the model and the data, check them
    run.ready(start_file, iter_num, best_iter, best_score, checkpoint_bytes(model))
    while True:
        if evaluating:
            improved = run.evaluated(iter_num, score)            # best so far, by the run's measure
            run.log(record); run.save(ckpt, improved, key)       # ckpt.pt, best.pt, snapshots, replaced/
        if run.should_stop() or iter_num >= max_iters: break     # a signal, on any rank
        ...                                                      # one step; run.die(msg) for an error
    run.close(iter_num, max_iters, 'hf')                          # the closing line

The files of a run folder and the rules that keep a model safe are checkpoint.py's (its docstring says them); this
file calls them in order. The measure that picks best.pt (checkpoint.MEASURES: lowest validation loss for train.py,
highest held-out MRR for contrastive.py) is an argument, and the same measure releases a replaced run.
"""

import json
import math
import os
import secrets
import signal
import time

import torch
import torch.distributed as dist

from checkpoint import (MEASURES, CheckpointError, claim_run_dir, exportable, extend_checkpoint, load_checkpoint,
                        ready_run_dir, run_summary, save_run, stop_on_signals, stop_unless_ranks_agree)
from configurator import die
from convert_hf import ConvertError, hf_to_checkpoint, read_tokenizer_files, tokenizer_files_of
from plot import BackgroundCurves


def start_processes(device, seed):
    """torchrun's processes (NCCL between GPUs, gloo between CPU processes) or a single one: (ddp, rank, world_size,
    device: a GPU per process under torchrun). Each rank seeds its own dropout stream; TF32 matmuls are allowed."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        if device.startswith('cuda'):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world_size, device


class Run:
    """One run's folder and life. Rank 0 alone touches the folder; under torchrun every rank calls every method
    (the ones that need all ranks gather or vote), and every rank stops with the same one line on an error."""

    def __init__(self, out_dir, resume, overwrite, measure='val_loss', unit='iter', master=True, ddp=False):
        self.out_dir, self.resume, self.overwrite, self.measure, self.unit = out_dir, resume, overwrite, measure, unit
        self.master, self.ddp = master, ddp
        self.lower = MEASURES[measure][0] == 'min'
        self.best_score = math.inf if self.lower else -math.inf
        self.best_iter = self.last_saved = self.start_file = self.lock = self.plotter = self.wandb = None
        self.start_iter, self.stop, self.stopped, self.wandb_run_id = 0, [], False, None
        self.metrics_path = os.path.join(out_dir, 'metrics.jsonl')
        # under torchrun: stop votes and gathered states go through a CPU (gloo) group, no GPU sync
        self.group = dist.new_group(backend='gloo') if ddp else None
        self.stop_flag, self.stop_work = torch.zeros(1), None

    def claim(self):
        """The folder's lock, held until the process exits (checkpoint.claim_run_dir: refused while another run
        writes there, or over a previous run neither resumed nor overwritten); resume needs its ckpt.pt."""
        error = None
        if self.master:
            try:
                self.lock = claim_run_dir(self.out_dir, self.resume, self.overwrite)
            except CheckpointError as e:
                error = str(e)
        stop_unless_ranks_agree(None, error, 'run folder')
        path = os.path.join(self.out_dir, 'ckpt.pt')
        if self.resume and not os.path.isfile(path):
            die(f"init_from='resume' but {path} does not exist: train first, or set --out_dir to the run's folder")

    def ready(self, start_file, iter_num, best_iter, best_score, n_bytes, curves=True, wandb=None, wandb_run_id=None):
        """Once the run has everything it needs: an overwritten run moves aside only now, a resumed one is mended
        (checkpoint.ready_run_dir), there must be room to save. The run's state as its checkpoint left it (start_file:
        the checkpoint it starts from, if any; best_score None: none yet); from here on a signal saves and stops.
        curves: out_dir/curves.png redrawn after each evaluation; wandb: dict(project, name, config) to log there too
        (a resumed run goes on in its wandb_run_id). Returns start_file (a replaced one has moved)."""
        error = None
        if self.master:
            try:
                said, start_file = ready_run_dir(self.out_dir, self.overwrite, self.resume, start_file, iter_num,
                                                 best_iter, n_bytes, self.unit)
                for line in said:
                    print(line)
            except CheckpointError as e:
                error = str(e)
        stop_unless_ranks_agree(None, error, 'run folder')
        self.start_file, self.start_iter, self.best_iter = start_file, iter_num, best_iter
        if best_score is not None:
            self.best_score = best_score
        self.stop = stop_on_signals(self.master, 'iteration' if self.unit == 'iter' else self.unit)
        if self.master and curves:
            self.plotter = BackgroundCurves(self.out_dir)  # plot.py, in the background
            if self.plotter.missing:
                print('note: curves=True needs matplotlib (pip install matplotlib): no curves.png for this run')
                self.plotter = None
        if self.master and wandb:
            import wandb as wandb_module
            self.wandb_run_id = wandb_run_id or secrets.token_hex(4)  # ours, so that a resumed run finds it again
            wandb_module.init(**wandb, dir=self.out_dir, id=self.wandb_run_id, resume='allow')
            self.wandb = wandb_module
        return start_file

    def evaluated(self, iter_num, score):
        """An evaluation's score at iter_num: whether it beats every earlier one (its save then becomes best.pt). A
        new run's starting model is the first to beat; a resumed run's best stands."""
        better = score < self.best_score if self.lower else score > self.best_score
        improved = better and iter_num > self.start_iter
        if better and (iter_num > self.start_iter or not self.resume):
            self.best_score = score
        if improved:
            self.best_iter = iter_num
        return improved

    def kept(self):
        """Which files hold what (checkpoint.run_summary), for every line that ends the run."""
        return run_summary(self.out_dir, self.best_iter, self.best_score, self.last_saved, self.start_file,
                           self.measure, self.unit)

    def die(self, msg, fix=''):
        """The run ends with one line: what went wrong, what is kept, and the fix."""
        die(f'{msg}; {self.kept()}' + (f' ({fix})' if fix else ''))

    def gather(self, state):
        """Every rank's state (RNG streams, data position) in rank order, for the checkpoint rank 0 writes."""
        if not self.ddp:
            return [state]
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state, group=self.group)
        return states

    def save(self, ckpt, improved=False, key=None, snapshot_keep=0):
        """Rank 0: ckpt (with iter_num and the measure's value) saved by checkpoint.save_run: ckpt.pt; best.pt when
        improved; a snapshot with snapshot_keep; a replaced run released once beaten on the same held-out data (key)."""
        if not self.master:
            return
        try:
            said = save_run(ckpt, self.out_dir, improved, key, self.best_iter is not None, snapshot_keep, self.unit,
                            self.measure)
        except CheckpointError as e:
            self.die(e)
        self.last_saved = (ckpt['iter_num'], ckpt.get(self.measure))
        print('\n'.join(said))

    def log(self, record):
        """Rank 0: a record appended to metrics.jsonl (plot.py draws it), and logged to wandb when on."""
        if not self.master:
            return
        try:
            with open(self.metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            self.die(f'cannot append to {self.metrics_path} ({e.strerror})')
        if self.wandb:
            self.wandb.log(record, step=record['iter'])

    def draw(self):
        """out_dir/curves.png redrawn in the background (after an evaluation)."""
        if self.plotter:
            self.plotter.draw()

    def should_stop(self):
        """Whether a signal asks the run to stop now. Under torchrun any rank's signal counts, read from a vote
        started at the previous call (a tiny all-reduce on the CPU group: no GPU sync), so every rank stops at the
        same step."""
        if not self.ddp:
            self.stopped = bool(self.stop)
            return self.stopped
        requested = False
        if self.stop_work is not None:
            self.stop_work.wait()
            requested = self.stop_flag.item() > 0
        self.stop_flag = torch.tensor([float(bool(self.stop))])
        self.stop_work = dist.all_reduce(self.stop_flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.stopped = requested
        return requested

    def close(self, iter_num, max_iters, export_dir):
        """The closing line (rank 0): done or stopped, which files hold what, and the export command of the model to
        use (never one worse than the start); then every rank leaves together."""
        if self.master:
            if self.wandb:
                self.wandb.finish()  # its own summary first, so that the last line is ours
            if self.plotter:  # the final curves include the final evaluation
                self.plotter.finish()
            if iter_num == self.start_iter and self.start_iter >= max_iters > 0:
                print(f'nothing to train: the run is at {self.unit} {iter_num} and max_iters is {max_iters} '
                      f'(raise --max_iters); {self.kept()}')
            else:
                signalled = signal.Signals(self.stop[0]).name if self.stop else 'a signal'  # another rank's, under DDP
                how = f'stopped by {signalled} at {self.unit} {iter_num}' if self.stop or self.stopped else 'done'
                export = exportable(self.out_dir, self.start_file, self.best_iter)
                print(f'{how}: {self.kept()}' + (f'; export with: python convert_hf.py {export} '
                                                f'{os.path.join(self.out_dir, export_dir)}' if export else ''))
        if self.ddp:
            if self.stop_work is not None:
                self.stop_work.wait()
            dist.barrier()  # rank 0 may still be writing the last checkpoint
            dist.destroy_process_group()


class Clock:
    """Training time per step over log windows, on the host: evaluations and a dropped step (the first, compiling
    one) left out; on CUDA read once the GPU has run what was queued, so that work is timed in the window that
    queued it. The ETA adds the evaluations left at the last one's duration."""

    def __init__(self, device):
        self.cuda = str(device).startswith('cuda')
        self.device, self.start, self.spent, self.steps, self.eval_seconds = device, time.time(), 0.0, 0, 0.0

    def now(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.time()

    def pause(self):
        """Before an evaluation."""
        self.spent += self.now() - self.start
        self.eval_start = time.time()

    def resume(self):
        """After it."""
        self.start = time.time()
        self.eval_seconds = self.start - self.eval_start

    def tick(self, drop=False):
        """One step done; drop: leave the window's steps so far out (compilation and warm-up are not throughput)."""
        self.steps += 1
        if drop:
            self.start, self.spent, self.steps = self.now(), 0.0, 0

    def per_step(self):
        """Seconds per step of the window (a host sync), and a new window."""
        dt = (self.spent + self.now() - self.start) / max(self.steps, 1)
        self.start, self.spent, self.steps = time.time(), 0.0, 0
        return dt

    def eta(self, dt, steps_left, evals_left):
        seconds = steps_left * dt + evals_left * self.eval_seconds
        return (f'{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m' if seconds >= 3600 else
                f'{seconds // 60:.0f}m{seconds % 60:02.0f}s')


# -----------------------------------------------------------------------------------------------
# how a pretraining run (train.py) starts: from what, and whether it fits its data

def starting_checkpoint(init_from, out_dir, extend_to=None):
    """(the checkpoint a pretraining run starts from, lines to print): out_dir's ckpt.pt whole (init_from='resume'),
    another run's weights (a .pt file: its optimizer and RNG states are not this run's), an HF name or folder
    (convert_hf.hf_to_checkpoint), or None ('scratch'). extend_to: a longer position table for a run that does not
    resume (checkpoint.extend_checkpoint: continued pretraining at a longer context). One line and exit otherwise."""
    said, ckpt = [], None
    try:
        if init_from == 'resume':
            ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
            if 'optimizer' not in ckpt:  # e.g. written by convert_hf.py --from_hf
                said.append(f"note: {os.path.join(out_dir, 'ckpt.pt')} holds weights only; starting a fresh optimizer "
                            f"and schedule from them")
        elif os.path.isfile(init_from):
            ckpt = {k: v for k, v in load_checkpoint(init_from).items() if k not in ('optimizer', 'rank_states')}
        elif init_from != 'scratch':
            ckpt = hf_to_checkpoint(init_from)
        if ckpt is not None and extend_to and init_from != 'resume':
            said.append(extend_checkpoint(ckpt, extend_to))
    except (CheckpointError, ConvertError) as e:
        die(e)
    return ckpt, said


def check_start(ckpt, resume, config, meta, fingerprint, path):
    """A start checkpoint against the run's data: the same vocabulary, or one line and exit; a resumed run (path) says
    what changed since it was written (the task, the data) and where it goes on. Lines to print."""
    trained_on = (ckpt.get('data_fingerprint') or {}).get('tokenizer')
    if trained_on and trained_on != fingerprint['tokenizer']:
        die(f"the checkpoint was trained with another vocabulary than the data's tokenizer {meta['tokenizer']!r} "
            f"(the same token ids would mean other tokens): train on data prepared with the checkpoint's tokenizer")
    if not resume:
        return []
    said = []
    task_then = {k: ckpt.get('config', {}).get(k, v) for k, v in (('objective', 'mpnet'), ('doc_mask', False))}
    if task_then != dict(objective=config['objective'], doc_mask=config['doc_mask']):
        said.append(f"note: {path} was trained with {task_then}; under objective={config['objective']!r}, doc_mask="
                    f"{config['doc_mask']} the validation loss measures another task, and best.pt compares across both "
                    f"(to keep them apart, start a new run from its weights: --init_from={path} --out_dir=NEW)")
    if ckpt.get('data_fingerprint', fingerprint) != fingerprint:
        said.append(f'note: the prepared data changed since {path} was written (same vocabulary): resuming on the new data')
    return said + [f"resuming from iter {ckpt['iter_num']} of {path}" +
                   (f" (val loss {ckpt['val_loss']:.4f})" if ckpt.get('val_loss') is not None else '')]


def check_fits(model_args, meta, block_size, extendable):
    """ValueError unless the model reads the data: the same vocabulary size, blocks within its position table
    (extendable: a start model whose table --max_positions may grow)."""
    if model_args['vocab_size'] != meta['vocab_size']:
        raise ValueError(f"vocab mismatch: the model has {model_args['vocab_size']} tokens but the data's tokenizer "
                         f"{meta['tokenizer']!r} has {meta['vocab_size']}: prepare the data with the model's tokenizer")
    if block_size > model_args['max_positions']:
        raise ValueError(f"block_size {block_size} exceeds the model's max_positions {model_args['max_positions']}" + (
            f": --max_positions={block_size} extends the checkpoint's table (continued pretraining at a longer context)"
            if extendable else ''))


def export_tokenizer(meta, master):
    """What each checkpoint carries of the data's tokenizer for convert_hf.py: its files (read by rank 0, which writes
    the checkpoints) and its special ids; every rank stops with one line if the files cannot be read."""
    files, error = {}, None
    try:
        if master:
            name = meta['tokenizer']
            files = read_tokenizer_files(name) if os.path.isdir(str(name)) else tokenizer_files_of(name)
    except (ConvertError, OSError) as e:  # e.g. a full temp folder
        error = f'cannot read the tokenizer files the checkpoints carry: {e}'
    stop_unless_ranks_agree(None, error, 'tokenizer')
    return dict(tokenizer_files=files, special_ids=dict(bos_token_id=meta['bos_id'], pad_token_id=meta['pad_id'],
                                                        eos_token_id=meta['eos_id']))
