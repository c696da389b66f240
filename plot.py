"""
A run's curves from its metrics.jsonl, as one PNG: no account and no server, open it anywhere.

    python plot.py out-tiny                      # -> out-tiny/curves.png
    python plot.py out-a out-b --out=cmp.png     # several runs on the same axes

train.py starts this in the background after each evaluation (curves=True), so out_dir/curves.png
follows the run. Panels: loss (training, and validation as dots), accuracy on the predicted tokens, learning
rate, throughput and MFU, and the embedding probe when the run logged it (probe=True).
"""

import argparse
import importlib.util
import json
import os
import sys


def read_metrics(run_dir):
    """(training records, evaluation records) of run_dir/metrics.jsonl, one per iteration (the last written
    wins, should a crashed run have left a record that its resumption wrote again)."""
    train, evals = {}, {}
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            (evals if 'val_loss' in record else train)[record['iter']] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot(run_dirs, out_path):
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    runs = {os.path.basename(os.path.normpath(d)) or d: read_metrics(d) for d in run_dirs}
    probed = any('probe_found' in e for _, evals in runs.values() for e in evals)
    fig, axes = plt.subplots(2, 3 if probed else 2, figsize=(15 if probed else 11, 7.5), squeeze=False)
    (loss_ax, acc_ax, *rest), (lr_ax, speed_ax, *rest2) = axes
    for i, (name, (train, evals)) in enumerate(runs.items()):
        color = f'C{i}'
        series = lambda records, key: ([r['iter'] for r in records if r.get(key) is not None],
                                       [r[key] for r in records if r.get(key) is not None])
        loss_ax.plot(*series(train, 'loss'), color=color, alpha=0.6, label=f'{name} train')
        loss_ax.plot(*series(evals, 'val_loss'), 'o-', color=color, label=f'{name} val')
        acc_ax.plot(*series(train, 'acc'), color=color, alpha=0.6, label=f'{name} train')
        acc_ax.plot(*series(evals, 'val_acc'), 'o-', color=color, label=f'{name} val')
        lr_ax.plot(*series(train, 'lr'), color=color, label=name)
        speed_ax.plot(*series(train, 'tokens_per_sec'), color=color, label=f'{name} tokens/s')
        if probed:
            rest[0].plot(*series(evals, 'probe_found'), 'o-', color=color, label=f'{name} found')
            rest2[0].plot(*series(evals, 'probe_cos'), 'o-', color=color, label=f'{name} unrelated cos')
    titles = [(loss_ax, 'loss (dots: validation)'), (acc_ax, 'accuracy on predicted tokens'), (lr_ax, 'learning rate'),
              (speed_ax, 'tokens/s')]
    if probed:
        titles += [(rest[0], 'probe: halves that find their other half'), (rest2[0], 'probe: cosine of unrelated halves')]
    for ax, title in titles:
        ax.set_title(title)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f'{out_path}.{os.getpid()}.tmp.png'
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_path)  # a viewer never sees half a file
    return out_path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='plot the curves of training runs (their metrics.jsonl) into a PNG',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('run_dirs', nargs='+', help="run folders (train.py's out_dir)")
    parser.add_argument('--out', default=None, help='the PNG to write (default: RUN_DIR/curves.png for one run)')
    args = parser.parse_args()
    missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, 'metrics.jsonl'))]
    if missing:
        print(f"error: '{missing[0]}' has no metrics.jsonl: give a run folder (train.py's out_dir)", file=sys.stderr)
        sys.exit(1)
    if args.out is None and len(args.run_dirs) > 1:
        print('error: several runs need --out=FILE.png', file=sys.stderr)
        sys.exit(1)
    if importlib.util.find_spec('matplotlib') is None:
        print('error: plotting needs matplotlib: pip install matplotlib', file=sys.stderr)
        sys.exit(1)
    print(f'wrote {plot(args.run_dirs, args.out or os.path.join(args.run_dirs[0], "curves.png"))}')
