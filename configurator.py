"""
The configurator shared by train.py and bench.py (nanoGPT's, made strict):

    python train.py config/base.py --batch_size=16 --compile=False

Each argument without '=' is a config file executed over the script's globals (assignments only);
each --key=value is parsed as a Python literal (a bare word stays a string). An unknown key, a value of
the wrong type or a missing file is a ConfigError: one line, naming the problem and the fix.
CHOICES, LIMITS and check_device hold the value, range and machine checks both scripts make.
"""

import ast
import difflib
import os

import torch


class ConfigError(Exception):
    pass


# values a key may take in both train.py and bench.py (no float16: it would need loss scaling)
CHOICES = dict(attn_impl=('sdpa', 'flex', 'manual'), dtype=('float32', 'bfloat16'))


# the range of every numeric setting of train.py and bench.py, checked once by configure() (the model's
# shape and dropout are checked by MPNetConfig, where they are defined): '>= 1', '> 0', '[0, 1)', ...
LIMITS = dict(
    batch_size='>= 1', block_size='>= 2', gradient_accumulation_steps='>= 1', max_iters='>= 0',
    eval_interval='>= 1', eval_iters='>= 1', log_interval='>= 1', learning_rate='> 0', min_lr='>= 0',
    warmup_iters='>= 0', lr_decay_iters='>= 0', weight_decay='>= 0', beta1='[0, 1)', beta2='[0, 1)', eps='> 0',
    grad_clip='>= 0', max_bad_steps='>= 1', pred_frac='(0, 1)', mask_prob='[0, 1]', rand_prob='[0, 1]',
    vocab_size='>= 6', val_frac='(0, 1)', seed='>= 0', burn_in='>= 0', steps='>= 1', num_proc='>= 1',
    head_warmup_iters='>= 0', head_warmup_lr='> 0', probe_docs='>= 2')


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


def configure(defaults, argv, choices=None):
    """Return {key: value} of the defaults overridden by config files and --key=value arguments;
    choices: {key: allowed values} for keys that take one of a few values."""
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
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"argument '{arg}' needs a value: --{key}=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word, e.g. --dataset=pydocs
            if isinstance(defaults.get(key), str):
                value = text  # a string key takes the text as written, e.g. --out_dir=2024
            config[key] = _check(key, value, defaults, f'--{key}')
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {config[key]!r}")
    check_limits(config)
    return config


def check_limits(config):
    """ConfigError for the first value of config outside its LIMITS, or an empty name or path."""
    for key, limit in LIMITS.items():
        if config.get(key) is not None and not _within(config[key], limit):
            raise ConfigError(f"{key} must be {'in ' * (limit[0] in '[(')}{limit}; got {config[key]!r}")
    for key in ('out_dir', 'dataset', 'tokenizer'):
        if isinstance(config.get(key), str) and not config[key].strip():
            raise ConfigError(f'{key} must not be empty')
