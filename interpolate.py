"""
Weight-space interpolation between a sentence model and what a contrastive run made of it (WiSE-FT, Wortsman et al.
2022): each weight (1 - alpha) x start + alpha x adapted. A sweep of alpha reports the in-domain measure (the held-out
pairs the run picked best.pt on) beside a general one (--sts_data: scored pairs, Spearman); the chosen point is
written as a checkpoint that convert_hf.py exports.

    python interpolate.py out-contrastive-sentence/best.pt --sts_data=general.csv                   # the sweep
    python interpolate.py out-contrastive-sentence/best.pt --alpha=0.5 --out=out-mix.pt           # write one point
    python convert_hf.py out-mix.pt out-mix/st                                                    # SentenceTransformer(...)

The start is the model the run started from (its checkpoint says which), or --start=. Both must be one architecture
with one vocabulary; anything else is one line, and nothing is written.
"""

import os
import sys
from contextlib import nullcontext

import torch

import data
import evaluation
from checkpoint import CheckpointError, cpu_attention, model_from_checkpoint, save_checkpoint
from configurator import ConfigError, check_device, configure, die
from convert_hf import ConvertError, quiet_transformers, sentence_pooling

# -----------------------------------------------------------------------------------------------
start: str = ''                         # the model the adapted one came from ('' = the one its run started from)
alphas: str = '0,0.25,0.5,0.75,1'       # the sweep: the adapted model's share of every weight, each in [0, 1]
alpha: float = 0.5                      # with out: the point written
out: str = ''                           # write the point alpha here, a new .pt (convert_hf.py exports it)
eval_data: str = ''                     # in-domain: documents or pairs ('' = the held-out pairs the checkpoint carries)
sts_data: str = ''                      # general: scored pairs (sentence1, sentence2, score), Spearman ('' = the run's --sts_data)
max_len: int = 128                      # tokens per text, <s> and </s> included
device: str = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda' or 'cuda:N'
# -----------------------------------------------------------------------------------------------
config_keys = list(__annotations__)
LIMITS = dict(alpha='[0, 1]', max_len='>= 8')
RUN_STATE = ('optimizer', 'rank_states', 'data_pos', 'best_iter', 'best_mrr', 'best_score', 'best_val_loss', 'validation_key')


def mixed(start_ckpt, adapted_ckpt, start_name, adapted_name, same_vocabulary):
    """A function of alpha giving the interpolated state dict; TaskError unless both hold one architecture (every
    tensor the same name and shape) and one vocabulary (same_vocabulary: their tokenizers map tokens to the same ids)."""
    a, b = start_ckpt['model'], adapted_ckpt['model']
    shape = {k: v for k, v in start_ckpt['model_args'].items() if k not in ('dropout', 'attn_dropout', 'attn_impl',
                                                                            'grad_checkpoint', 'objective')}
    other = {k: v for k, v in adapted_ckpt['model_args'].items() if k in shape}
    differ = next((k for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k].shape != b[k].shape), None)
    if shape != other or differ:
        said = next((f'{k} {shape.get(k)} vs {other.get(k)}' for k in sorted(set(shape) | set(other))
                     if shape.get(k) != other.get(k)), f'{differ}')
        raise evaluation.TaskError(f"'{start_name}' and '{adapted_name}' are models of different shapes ({said}): "
                                   f"interpolate a model with one trained from it")
    if not same_vocabulary:
        raise evaluation.TaskError(f"'{start_name}' and '{adapted_name}' have different vocabularies (their tokenizers "
                                   f"differ): the same ids would mean other tokens")
    return lambda t: {k: torch.lerp(a[k].float(), b[k].float(), t).to(b[k].dtype) if b[k].is_floating_point()
                      else b[k] for k in b}


def main(argv):
    models = [x for x in argv if not x.startswith('-') and not x.endswith('.py')]
    try:
        c = configure({k: globals()[k] for k in config_keys}, [x for x in argv if x not in models], script=__file__,
                      limits=LIMITS, also='The adapted model is given first: python interpolate.py BEST.pt [--key=value]')
        check_device(c['device'], 'sdpa')
        sweep = [float(x) for x in c['alphas'].split(',')]
    except ConfigError as e:
        die(e)
    except ValueError:
        die(f"alphas must be numbers separated by commas (--alphas=0,0.5,1); got {c['alphas']!r}")
    if len(models) != 1:
        die('give the adapted model: python interpolate.py out-contrastive/best.pt [--start=MODEL] (see --help)')
    bad = next((x for x in sweep if not 0 <= x <= 1), None)
    if bad is not None:
        die(f'alphas must each be in [0, 1] (0: the start, 1: the adapted model); got {bad}')
    if c['out'] and (os.path.exists(c['out']) or not c['out'].endswith('.pt')):
        die(f"out='{c['out']}': " + ('it exists; choose a new path' if os.path.exists(c['out']) else 'give a .pt path'))
    globals().update(c)
    name = models[0]
    try:
        adapted, tok = evaluation.load_model(name)
        start_name = start or adapted.get('started_from')
        if not start_name:
            raise evaluation.TaskError(f"'{name}' does not say what it started from: give --start=MODEL")
        begin, start_tok = evaluation.load_model(start_name)
        mix = mixed(begin, adapted, start_name, name, data.tokenizer_fingerprint(start_tok) == data.tokenizer_fingerprint(tok))
        pairs = evaluation.retrieval_pairs(adapted, tok, name, eval_data=eval_data, max_len=max_len, max_pairs=0,
                                           text_field='text')
        general_data = sts_data or (adapted.get('config') or {}).get('sts_data') or ''  # the run's own general set
        if general_data and not sts_data and not os.path.isfile(general_data):
            print(f"note: the run's general set, {general_data}, is not here: in-domain only (give --sts_data=FILE)")
            general_data = ''
        general = evaluation.sts_pairs(general_data) if general_data else None
    except (evaluation.TaskError, CheckpointError, ConvertError) as e:
        die(e)
    model = model_from_checkpoint(adapted, name, dropout=0.0, attn_dropout=0.0, **cpu_attention(device)).to(device).eval()
    pooling = sentence_pooling(adapted.get('st_files'))
    print(f'{start_name} (alpha 0) -> {name} (alpha 1): in-domain {pairs[0].size(1):,} held-out pairs, MRR' +
          (f'; general {len(general):,} scored pairs of {general_data}, Spearman' if general else ''))
    for t in sweep:
        model.load_state_dict(mix(t))
        try:
            mrr = evaluation.retrieval_scores(model, pairs[0].to(device), pairs[1].to(device), pooling)['mrr']
            rho = evaluation.sts_scores(model, tok, general, pooling, device, nullcontext(), max_len)['spearman'] \
                if general else None
        except evaluation.TaskError as e:
            die(f'alpha {t:g}: {e}')
        print(f'alpha {t:.2f}: in-domain MRR {mrr:.4f}' + (f', general Spearman {evaluation.shown(rho)}' if general else ''))
    if out:
        ckpt = {k: v for k, v in adapted.items() if k not in RUN_STATE}
        ckpt.update(model=mix(alpha), interpolated=dict(start=start_name, adapted=os.path.abspath(name), alpha=alpha))
        try:
            save_checkpoint(ckpt, out)
        except CheckpointError as e:
            die(e)
        print(f'wrote {out} (alpha {alpha:g}); export with: python convert_hf.py {out} {os.path.splitext(out)[0]}-st')


if __name__ == '__main__':
    with quiet_transformers():
        main(sys.argv[1:])
