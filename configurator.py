"""
The configurator shared by every script (nanoGPT's, made strict), and its one-line error (die):

    python train.py config/base.py --batch_size=16 --compile=False

Each argument without '=' is a config file executed over the script's globals (assignments only);
each --key=value is parsed as a Python literal (a bare word stays a string). An unknown key, a value of
the wrong type or a missing file is a ConfigError: one line, naming the problem and the fix. --help lists
every key with its default and the comment beside it in the script (script_settings reads them).
CHOICES, LIMITS and check_device hold the value, range and machine checks both scripts make.
"""

import ast
import difflib
import math
import os
import sys

import torch
import torch.distributed as dist

from permute import OBJECTIVES


class ConfigError(Exception):
    pass


def die(msg):
    """Every script's end for a mistake the user can fix: one line 'error: ...' on stderr (once per node under
    torchrun), exit code 1, never a traceback."""
    if int(os.environ.get('LOCAL_RANK', 0)) == 0:  # one line per node, not one per process
        print(f'error: {msg}', file=sys.stderr)
    if dist.is_initialized():  # leaving with a live process group aborts the process instead of exiting 1
        dist.destroy_process_group()
    sys.exit(1)


# values a key may take in both train.py and bench.py (no float16: it would need loss scaling)
CHOICES = dict(attn_impl=('sdpa', 'flex', 'manual'), dtype=('float32', 'bfloat16'), lr_schedule=('linear', 'cosine'),
               objective=OBJECTIVES, txt_split=('line', 'paragraph', 'file'))


# the range of every numeric setting of train.py and bench.py, checked once by configure() (the model's
# shape and dropout are checked by MPNetConfig, where they are defined): '>= 1', '> 0', '[0, 1)', ...
LIMITS = dict(
    batch_size='>= 1', block_size='>= 2', gradient_accumulation_steps='>= 1', max_iters='>= 0',
    eval_interval='>= 1', eval_iters='>= 1', log_interval='>= 1', learning_rate='> 0', min_lr='>= 0',
    warmup_iters='>= 0', lr_decay_iters='>= 0', weight_decay='>= 0', beta1='[0, 1)', beta2='[0, 1)', eps='> 0',
    grad_clip='>= 0', max_bad_steps='>= 1', pred_frac='(0, 1)', mask_prob='[0, 1]', rand_prob='[0, 1]',
    vocab_size='>= 6', val_frac='(0, 1)', seed='>= 0', burn_in='>= 0', steps='>= 1', num_proc='>= 1',
    head_warmup_iters='>= 0', head_warmup_lr='> 0', probe_docs='>= 2', snapshot_interval='>= 0', snapshot_keep='>= 1',
    long_from='>= 0')


def _within(value, limit):
    if limit[0] in '[(':
        lo, hi = (float(x) for x in limit[1:-1].split(','))
        return (lo <= value if limit[0] == '[' else lo < value) and (value <= hi if limit[-1] == ']' else value < hi)
    op, bound = limit.split()
    return value >= float(bound) if op == '>=' else value > float(bound)


def check_device(device, attn_impl):
    """The refusals that depend on the machine, shared by train.py and bench.py."""
    kind, _, index = device.partition(':')
    if kind not in ('cpu', 'cuda') or (index and (kind != 'cuda' or not index.isdigit())):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no GPU is visible: pass --device=cpu (and --dtype=float32)")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    if attn_impl == 'flex' and not device.startswith('cuda'):
        raise ConfigError("attn_impl='flex' has no backward on CPU: use --attn_impl=sdpa (or manual) on the CPU")


def check_relations(c):
    """What no single key's range can say, for train.py and bench.py (each key's range is checked by configure()
    above, the model's shape by MPNetConfig)."""
    if c['mask_prob'] + c['rand_prob'] > 1:
        raise ConfigError(f"mask_prob + rand_prob must be at most 1; got {c['mask_prob']} + {c['rand_prob']}")
    if c['decay_lr'] and c['lr_decay_iters'] < c['warmup_iters']:
        raise ConfigError(f"lr_decay_iters ({c['lr_decay_iters']}) must be at least warmup_iters ({c['warmup_iters']}): "
                          f"decay follows warmup")
    if c['min_lr'] > c['learning_rate']:
        raise ConfigError(f"min_lr ({c['min_lr']}) must not exceed learning_rate ({c['learning_rate']})")
    if c['overwrite'] and c['init_from'] == 'resume':
        raise ConfigError("overwrite=True starts the run over; it cannot be combined with init_from='resume'")
    if c['snapshot_interval'] % c['eval_interval']:
        raise ConfigError(f"snapshot_interval ({c['snapshot_interval']}) must be a multiple of eval_interval "
                          f"({c['eval_interval']}): snapshots are the checkpoints saved at evaluations")
    init_from = c['init_from']
    if init_from not in ('scratch', 'resume') and init_from.endswith('.pt') and not os.path.isfile(init_from):
        raise ConfigError(f"init_from '{init_from}' not found: give 'scratch', 'resume', a checkpoint file, or an HF "
                          f"model name or folder")


def _check(key, value, defaults, source):
    if key not in defaults:
        initials = [k for k in defaults if ''.join(w[0] for w in k.split('_')) == key]  # lr -> learning_rate
        close = initials + [k for k in difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6) if k not in initials]
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ''
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
    default = defaults[key]
    ok = (isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
          or isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key '{key}' in {source} must be {type(default).__name__} "
                          f"(like {default!r}), got {type(value).__name__} {value!r}")
    return float(value) if isinstance(default, float) else value


def script_settings(path):
    """A script's settings as it declares them, in order: ('key', name, default, comment) for each typed
    global `name: type = default  # comment` (defaults evaluated, with torch at hand), and ('group', text)
    for each comment line on its own that heads a group. Read from the source: bench.py learns train.py's
    keys this way, and --help shows the comments without repeating them."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    tree = ast.parse(source)
    assigns = [n for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value]
    first, last = assigns[0].lineno, assigns[-1].lineno
    while first > 1 and lines[first - 2].startswith('# ') and not lines[first - 2].startswith('# ---'):
        first -= 1  # the heading of the first group
    by_line = {n.lineno: n for n in assigns}
    settings = []
    for number in range(first, last + 1):
        line = lines[number - 1]
        if number in by_line:
            node = by_line[number]
            default = eval(compile(ast.Expression(node.value), path, 'eval'), {'torch': torch})
            comment = line.split('#', 1)[1].strip() if '#' in line[node.value.end_col_offset:] else ''
            settings.append(('key', node.target.id, default, comment))
        elif line.startswith('# ') and not line.startswith('# ---'):
            settings.append(('group', line[2:].strip()))
    return settings


def help_text(script, defaults, choices=None, also=None, limits=None, settings=None, usage=None):
    """--help: usage, then every key of the script with its default, range and comment, by group (settings: the
    entries script_settings gives, for a command line whose keys are no typed globals of its file)."""
    name = os.path.basename(script)
    out = [f"usage: {usage or f'python {name} [CONFIG_FILE ...] [--key=value ...]'}",
           'Config files (assignments only) and --key=value (a Python literal) set the keys below, left to right.', '']
    for entry in settings or script_settings(script):
        if entry[0] == 'group':
            out.append(entry[1])
            continue
        _, key, _, comment = entry
        allowed = (choices or {}).get(key)
        limit = {**LIMITS, **(limits or {})}.get(key, '')
        extra = f"one of {', '.join(allowed)}" if allowed else f"in {limit}" if limit[:1] in '[(' and limit else limit
        out.append(f'  --{key}={defaults[key]}'.ljust(40) + ' ' + comment + (f' [{extra}]' if extra else ''))
    if also:
        out += ['', also]
    return '\n'.join(out)


def configure(defaults, argv, choices=None, script=None, also=None, limits=None, given=None, settings=None, usage=None):
    """Return {key: value} of the defaults overridden by config files and --key=value arguments (a bare --key sets
    a bool key True); choices: {key: allowed values} for keys that take one of a few values; limits: the script's own
    ranges, beside LIMITS; given: a set that receives the keys a config file or argument set (a default is no choice).
    --help (or -h) prints help_text(script, ..., settings, usage) and exits."""
    given = set() if given is None else given
    if script and any(a in ('--help', '-h') for a in argv):
        print(help_text(script, defaults, choices, also, limits, settings, usage))
        sys.exit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found (see config/ for the shipped ones)")
            scope = {}
            with open(arg) as f:
                try:
                    exec(compile(f.read(), arg, 'exec'), {}, scope)
                except Exception as e:
                    raise ConfigError(f'config file {arg} failed: {type(e).__name__}: {e}')
            for key, value in scope.items():
                if not key.startswith('_') and not callable(value) and not hasattr(value, '__file__'):
                    config[key] = _check(key, value, defaults, arg)
                    given.add(key)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq and isinstance(defaults.get(key), bool):
                text = 'True'  # --overwrite
            elif not eq:
                raise ConfigError(f"argument '{arg}' needs a value: --{key}=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word, e.g. --dataset=pydocs
            if isinstance(defaults.get(key), str):
                value = text  # a string key takes the text as written, e.g. --out_dir=2024
            config[key] = _check(key, value, defaults, f'--{key}')
            given.add(key)
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {config[key]!r}")
    check_limits(config, limits, defaults)
    return config


def check_limits(config, limits=None, defaults=None):
    """ConfigError for the first value of config outside its LIMITS (and a script's own limits), or an empty
    name or path (where the default is not empty: '' is the script's own choice there)."""
    for key, value in config.items():  # inf passes every '> 0'; nan fails silently later
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f'{key} must be a finite number; got {value}')
    for key, limit in {**LIMITS, **(limits or {})}.items():
        if config.get(key) is not None and not _within(config[key], limit):
            raise ConfigError(f"{key} must be {'in ' * (limit[0] in '[(')}{limit}; got {config[key]!r}")
    for key in ('out_dir', 'dataset', 'tokenizer'):
        if isinstance(config.get(key), str) and not config[key].strip() and (defaults or {}).get(key) != '':
            raise ConfigError(f'{key} must not be empty')
