"""
A run's curves from its metrics.jsonl, as one PNG: no account and no server, open it anywhere.

    python plot.py out-tiny                      # -> out-tiny/curves.png
    python plot.py out-a out-b --out=cmp.png     # several runs on the same axes (or cmp.pdf, cmp.svg)

train.py starts this in the background after each evaluation (curves=True), so out_dir/curves.png
follows the run. Panels: loss (training, and validation as dots), accuracy on the predicted tokens, learning
rate, throughput and MFU, and the embedding probe when the run logged it (probe=True).

read_metrics() is the one reader of metrics.jsonl (train.py's resume trims the log with it too): it imports
nothing heavy, matplotlib is imported only to draw.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time


class PlotError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def valid_record(record):
    """The rule for a usable line of metrics.jsonl: a JSON object whose 'iter' is an int >= 0 (and below 2**63, as
    any iteration count is). Its other values are not checked here: a log window with a skipped step honestly logs
    loss NaN and grad_norm Infinity."""
    return isinstance(record, dict) and type(record.get('iter')) is int and 0 <= record['iter'] < 2**63  # bool is no iter


def finite(value):
    """Whether value is a finite number (not a bool, not NaN or Infinity; an integer too large for a float is not)."""
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # a 400-digit integer in the JSON
        return False


def parse_record(line):
    """The record of one metrics.jsonl line (bytes or text), or None for a line that is not one (valid_record)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if valid_record(record) else None


def read_metrics(path_or_dir, warn=True, numbered=False):
    """The valid records (valid_record) of a metrics.jsonl (or of a run folder's), in file order; with numbered,
    (line number, record) pairs. A line that is not one (cut short by a crash, undecodable bytes, not an object,
    no integer 'iter') is skipped, and with warn, one line on stderr says how many and where the first is.
    OSError if the file cannot be read."""
    path = os.path.join(path_or_dir, 'metrics.jsonl') if os.path.isdir(path_or_dir) else path_or_dir
    records, bad, first_bad = [], 0, None
    with open(path, 'rb') as f:  # bytes: an undecodable line is one bad line, not an error for the whole file
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = parse_record(line)
            if record is not None:
                records.append((n, record) if numbered else record)
            else:
                bad, first_bad = bad + 1, first_bad or n
    if bad and warn:
        print(f"warning: {path}: skipped {bad} malformed line{'s' if bad > 1 else ''} (the first is line {first_bad}): "
              f"each line must be a JSON object with an integer 'iter'", file=sys.stderr)
    return records


def curves_of(records):
    """(training records, evaluation records), one per iteration each: the last written wins, should a crashed
    run have left a record that its resumption wrote again."""
    train, evals = {}, {}
    for record in records:
        (evals if 'val_loss' in record else train)[record['iter']] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def series(records, key):
    """(iterations, values) of key where it is a finite number: NaN, Infinity and anything else is a gap."""
    points = [(r['iter'], r[key]) for r in records if finite(r.get(key))]
    return [i for i, _ in points], [v for _, v in points]


# the recipe keys a score depends on, by kind of task (finetune.py's RECIPE holds them all): retrieval, STS and BEIR
# embed with the pretrained encoder and train nothing, so the training recipe (epochs, learning rate, ...) must not
# split their identical scores into separate lines; classification and regression use none of EMBEDDING_ONLY
EMBEDDING_RECIPE = {'retrieval': ('max_len', 'max_pairs', 'eval_data'), 'sts': ('max_len', 'eval_data'),
                    'beir': ('max_len', 'eval_data', 'beir_split')}
EMBEDDING_ONLY = ('max_pairs', 'eval_data', 'beir_split')


def recipe_of(record):
    """The recorded recipe keys that the record's kind of task uses: a key missing is not recorded (records older than
    the key), never a value."""
    recipe = record.get('recipe') if isinstance(record.get('recipe'), dict) else {}
    used = EMBEDDING_RECIPE.get(record['task'])
    return {k: v for k, v in recipe.items() if (k in used if used else k not in EMBEDDING_ONLY)}


def short(value, width=24):
    """A recipe value for a legend: a long one (a path) keeps its end, where the file name is."""
    text = str(value) if value != '' else "''"  # eval_data='' (the default) reads as a value
    return text if len(text) <= width else '...' + text[-(width - 3):]


def read_scores(run_dir):
    """finetune.py's downstream scores of a run's checkpoints (run_dir/scores.jsonl, one record per checkpoint
    and task: iter, task, metric, mean, std, seeds, recipe) as {'task metric': [(iter, mean, std)]}, the last
    per iter. Scores of one task under different recipes (a quick --max_train=50 check beside the real one) are
    different lines, each named by the settings in which it differs: one curve never mixes them. A record that is
    no score (no task, a mean that is not a finite number, a negative or non-finite std) is skipped with one line
    naming its line; an undefined metric (mean null) with a note: never drawn as a value."""
    path = os.path.join(run_dir, 'scores.jsonl')
    if not os.path.isfile(path):
        return {}
    try:
        numbered = read_metrics(path, numbered=True)
    except OSError as e:
        print(f'warning: cannot read {path} ({e.strerror or e}): no scores drawn', file=sys.stderr)
        return {}
    out, recipes = {}, {}
    for n, r in numbered:
        where = f"{path}: line {n}"
        task = r.get('task')
        if not isinstance(task, str) or not task.strip():
            print(f"warning: {where}: no task named: skipped", file=sys.stderr)
            continue
        name = f"{task} {r['metric'] if isinstance(r.get('metric'), str) else ''}".strip()
        std = 0.0 if r.get('std') is None else r['std']  # not recorded: no spread to draw
        if r.get('mean') is None:
            print(f"note: {where}: {name} at iter {r['iter']} is undefined (mean null): not drawn", file=sys.stderr)
            continue
        if not finite(r['mean']):
            print(f"warning: {where}: {name} at iter {r['iter']} has mean {r['mean']!r}, not a finite number: skipped",
                  file=sys.stderr)
            continue
        if not finite(std) or std < 0:
            print(f"warning: {where}: {name} at iter {r['iter']} has std {std!r}, not a finite number >= 0: skipped",
                  file=sys.stderr)
            continue
        recipe = recipe_of(r)
        key = (name, json.dumps(recipe, sort_keys=True, default=str))
        recipes[key] = recipe
        out.setdefault(key, {})[r['iter']] = (r['mean'], std)
    named = {}
    for name, key in out:
        mine = recipes[name, key]
        others = [recipes[k] for k in out if k[0] == name and k[1] != key]
        if not mine:  # a record older than recipes
            label = name + (' (recipe not recorded)' if others else '')
        else:
            # the keys both record with different values; a line that agrees with another on every key both
            # record is told apart by the keys only it records. A key one of them lacks is never shown as None.
            differ = {k for o in others for k in mine if k in o and o[k] != mine[k]}
            for o in others:
                if o and not any(k in o and o[k] != mine[k] for k in mine):
                    differ |= set(mine) - set(o)
            label = name + (f" ({', '.join(f'{k}={short(mine[k])}' for k in sorted(differ))})" if differ else '')
        base, copy = label, 2
        while label in named:  # shortened values that collide: still two lines
            label, copy = f'{base} #{copy}', copy + 1
        named[label] = [(i, *out[name, key][i]) for i in sorted(out[name, key])]
    return named


def objective_of(run_dir, records):
    """The training objective of a run (mpnet, mlm, plm): from its log, else from its checkpoint's config;
    None when neither says (no checkpoint yet, or no torch to read it)."""
    logged = [r['objective'] for r in records if isinstance(r.get('objective'), str)]
    if logged:
        return logged[-1]
    for name in ('ckpt.pt', 'best.pt'):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) and importlib.util.find_spec('torch'):
            import torch
            try:  # mmap: only the config is read, not gigabytes of weights
                config = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('config', {})
                return config.get('objective', 'mpnet')  # train.py's default before the option existed
            except Exception:  # unreadable: the curves do not need it
                pass
    return None


class BackgroundCurves:
    """train.py's curves=True: redraw out_dir/curves.png in a child process (this file) after each evaluation,
    one drawing at a time (a busy one is not queued), and a last one after the run that includes its end."""

    def __init__(self, out_dir):
        self.out_dir, self.child = out_dir, None
        self.missing = importlib.util.find_spec('matplotlib') is None

    def draw(self):
        if not self.missing and (self.child is None or self.child.poll() is not None):
            self.child = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.out_dir],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self):
        if self.child is not None:
            self.child.wait()
            self.draw()


def plot(run_dirs, out_path):
    """Draw the runs' curves into out_path (its extension names the format). PlotError if there is nothing to
    draw, or if out_path cannot be written (then the previous out_path is unchanged and no temp file is left)."""
    runs = []
    for d in run_dirs:
        try:
            records = read_metrics(d)
        except OSError as e:  # unreadable (permissions, a folder named metrics.jsonl...)
            raise PlotError(f"cannot read {os.path.join(d, 'metrics.jsonl')} ({e.strerror or e})") from None
        name = os.path.basename(os.path.normpath(d)) or d
        runs.append((name, d, *curves_of(records), records))
    if len({name for name, *_ in runs}) < len({d for _, d, *_ in runs}):  # out-a/run and out-b/run: tell them apart
        runs = [(os.path.normpath(d), d, *rest) for _, d, *rest in runs]
    keys = ('loss', 'acc', 'lr', 'tokens_per_sec', 'val_loss', 'val_acc', 'probe_found', 'probe_cos')
    empty = [name for name, _, train, evals, _ in runs if not any(series(train + evals, k)[0] for k in keys)]
    if len(empty) == len(runs):
        # no file, and a non-zero exit, so that `plot.py out && open out/curves.png` stops at this line
        raise PlotError(f"{' and '.join(os.path.join(d, 'metrics.jsonl') for d in run_dirs)} "
                        f"{'holds' if len(runs) == 1 else 'hold'} nothing to plot yet: the first records come at "
                        f"the first evaluation and every log_interval iterations")
    for name in empty:
        print(f'note: {name} has nothing to plot yet', file=sys.stderr)
    # losses of different objectives are different tasks (MLM predicts with every other token visible, PLM with
    # fewer): same axis, but not comparable, and the plot says so
    objectives = {name: objective_of(d, records) for name, d, _, _, records in runs} if len(runs) > 1 else {}
    mixed = len({o for o in objectives.values() if o}) > 1
    if mixed:
        which = ', '.join(f"{n}: {o or 'unknown'}" for n, o in objectives.items())
        print(f'note: these runs train different objectives ({which}): their losses measure different tasks and '
              f'are not comparable', file=sys.stderr)

    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    probed = any('probe_found' in e for _, _, _, evals, _ in runs for e in evals)
    general = any('sts_spearman' in e for _, _, _, evals, _ in runs for e in evals)
    scores = {name: read_scores(d) for name, d, *_ in runs}  # finetune.py's scores of the run's snapshots
    ncols = 2 + probed + any(scores.values())
    fig, axes = plt.subplots(2, ncols, figsize=(4 + 3.7 * ncols, 7.5), squeeze=False)
    (loss_ax, acc_ax, *rest), (lr_ax, speed_ax, *rest2) = axes
    n_score = 0  # every score line (run, task, recipe) gets a colour and marker of its own
    for i, (name, _, train, evals, _) in enumerate(runs):
        color, run_scores = f'C{i}', scores[name]
        name = f'{name} ({objectives[name] or "objective unknown"})' if mixed else name
        loss_ax.plot(*series(train, 'loss'), color=color, alpha=0.6, label=f'{name} train')
        loss_ax.plot(*series(evals, 'val_loss'), 'o-', color=color, label=f'{name} val')
        acc_ax.plot(*series(train, 'acc'), color=color, alpha=0.6, label=f'{name} train')
        acc_ax.plot(*series(evals, 'val_acc'), 'o-', color=color, label=f'{name} val')
        lr_ax.plot(*series(train, 'lr'), color=color, label=name)
        speed_ax.plot(*series(train, 'tokens_per_sec'), color=color, label=f'{name} tokens/s')
        if probed:
            rest[0].plot(*series(evals, 'probe_found'), 'o-', color=color, label=f'{name} found')
            if general:  # contrastive.py: the MRR that picks best.pt, and the general set it should not lose
                rest[0].plot(*series(evals, 'probe_mrr'), 's--', color=color, label=f'{name} MRR')
                rest[0].plot(*series(evals, 'sts_spearman'), '^:', color=color, label=f'{name} general Spearman')
            rest2[0].plot(*series(evals, 'probe_cos'), 'o-', color=color, label=f'{name} unrelated cos')
        for task, points in run_scores.items():
            it, mean, std = zip(*points)
            # 10 colours x 7 markers: no two of the first 70 lines look alike
            rest[-1].errorbar(it, mean, yerr=std, fmt='osD^vP*'[n_score % 7] + ('-', '--', ':')[i % 3],
                              color=f'C{n_score % 10}', capsize=3, label=f'{name} {task}')
            n_score += 1
    loss_title = 'loss (dots: validation)' + ('\ndifferent objectives: losses of different tasks, not comparable'
                                              if mixed else '')
    titles = [(loss_ax, loss_title), (acc_ax, 'accuracy on predicted tokens'), (lr_ax, 'learning rate'),
              (speed_ax, 'tokens/s')]
    if probed:
        titles += [(rest[0], 'probe: halves that find their other half' + (
                       '\n(dashed: held-out MRR; dotted: general Spearman)' if general else '')),
                   (rest2[0], 'probe: cosine of unrelated halves')]
    if any(scores.values()):
        titles.append((rest[-1], 'fine-tuned score (finetune.py; bars: spread over seeds)'))
        rest2[-1].axis('off')  # the score panel has no second row: its legend goes there, off the scores
    for ax, title in titles:
        ax.set_title(title, color='C3' if mixed and ax is loss_ax else 'black')
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        if ax.lines and not (any(scores.values()) and ax is rest[-1]):
            ax.legend(fontsize=8)
    if any(scores.values()):
        handles, labels = rest[-1].get_legend_handles_labels()
        labels = [l if len(l) <= 90 else l[:87] + '...' for l in labels]  # the colour and marker tell lines apart
        rest2[-1].legend(handles, labels, loc='upper left', fontsize=7, ncol=1 + (len(labels) > 14),
                         title='scores', title_fontsize=8, borderaxespad=0)
    fig.tight_layout()
    # a viewer never sees half a file: a temp file of our own (the pattern checkpoint.py's writers use, which
    # train.py removes when a killed run's folder is taken over), then os.replace; any failure (a full disk)
    # removes it and leaves the previous file as it was
    tmp = f'{out_path}.{os.getpid()}.{time.monotonic_ns() % 10**9}.tmp'
    try:
        fig.savefig(tmp, dpi=80, format=os.path.splitext(out_path)[1][1:].lower())
        os.replace(tmp, out_path)
    except Exception as e:  # OSError (disk full, a size limit, permissions), or a backend's own error
        reason = (e.strerror if isinstance(e, OSError) and e.strerror
                  else (str(e).strip().splitlines() or [type(e).__name__])[0][:160])
        kept = (f'the previous {os.path.basename(out_path)} is unchanged' if os.path.exists(out_path)
                else 'nothing was written')
        raise PlotError(f'could not write {out_path} ({reason}): {kept}') from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def out_problem(out_path):
    """Why out_path cannot be written (a one-line reason), or None: checked before any work."""
    from matplotlib.backend_bases import FigureCanvasBase  # no figure, no backend: just the formats
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(out_path)[1][1:].lower()
    folder = os.path.dirname(out_path) or '.'
    if os.path.isdir(out_path):
        return f"--out='{out_path}' is a folder: name the file, e.g. {os.path.join(out_path, 'curves.png')}"
    if ext not in formats:
        others = ' '.join('.' + f for f in sorted(formats) if f not in ('png', 'pdf', 'svg'))
        why = f'matplotlib cannot write .{ext} files' if ext else 'no extension names the format'
        return f"--out='{out_path}': {why}: use .png, .pdf or .svg (or {others})"
    if not os.path.isdir(folder):
        return f"--out='{out_path}': the folder '{folder}' does not exist: create it, or choose another --out"
    return None


if __name__ == '__main__':
    SETTINGS = [('group', 'plot the curves of training runs (their metrics.jsonl) into a PNG (or any format matplotlib '
                          'writes: .pdf, .svg, ...)'),
                ('key', 'out', '', "the file to write, its extension names the format ('': RUN_DIR/curves.png for one run)")]
    run_dirs, options = [a for a in sys.argv[1:] if not a.startswith('-')], [a for a in sys.argv[1:] if a.startswith('-')]
    out = ''
    if options:  # through configurator.py, as every script's; imported only then: it imports torch, which the curves
        from configurator import ConfigError, configure  # a run redraws after each evaluation do without
        try:
            out = configure(dict(out=''), options, script=__file__, settings=SETTINGS, also="run_dirs: train.py's out_dir",
                            usage='python plot.py RUN_DIR [RUN_DIR ...] [--out=FILE]')['out']
        except ConfigError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(1)
    if not run_dirs:
        print("error: give a run folder: python plot.py RUN_DIR (train.py's out_dir)", file=sys.stderr)
        sys.exit(1)
    missing = [d for d in run_dirs if not os.path.isfile(os.path.join(d, 'metrics.jsonl'))]
    if missing:
        print(f"error: '{missing[0]}' has no metrics.jsonl: give a run folder (train.py's out_dir)", file=sys.stderr)
        sys.exit(1)
    if not out and len(run_dirs) > 1:
        print('error: several runs need --out=FILE.png', file=sys.stderr)
        sys.exit(1)
    if importlib.util.find_spec('matplotlib') is None:
        print('error: plotting needs matplotlib: pip install matplotlib', file=sys.stderr)
        sys.exit(1)
    out = out or os.path.join(run_dirs[0], 'curves.png')
    problem = out_problem(out)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        sys.exit(1)
    try:
        plot(run_dirs, out)
    except PlotError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    print(f'wrote {out}')
