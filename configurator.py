"""
The configurator shared by train.py and bench.py (nanoGPT's, made strict):

    python train.py config/base.py --batch_size=16 --compile=False

Each argument without '=' is a config file executed over the script's globals (assignments only);
each --key=value is parsed as a Python literal (a bare word stays a string). An unknown key, a value of
the wrong type or a missing file is a ConfigError: one line, naming the problem and the fix.
CHOICES and check_device hold the value and machine checks both scripts make.
"""

import ast
import difflib
import os

import torch


class ConfigError(Exception):
    pass


# values a key may take in both train.py and bench.py (no float16: it would need loss scaling)
CHOICES = dict(attn_impl=('sdpa', 'flex', 'manual'), dtype=('float32', 'bfloat16'))


def check_device(device, attn_impl):
    """The refusals that depend on the machine, shared by train.py and bench.py."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no GPU is visible: pass --device=cpu (and --dtype=float32)")
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
    return config
