"""
Checkpoint <-> HuggingFace MPNetForMaskedLM.

    python convert_hf.py out/ckpt.pt out/hf                     # export: safetensors + config.json + tokenizer
    python convert_hf.py --from_hf=microsoft/mpnet-base out/ckpt.pt   # import, to continue pretraining (never over a file)
    python convert_hf.py --from_hf=path/to/all-mpnet-base-v2 out/ckpt.pt  # sentence-transformers MPNet: new MLM head

A sentence-transformers folder (modules.json: Transformer + Pooling / Normalize) keeps its modules: an
import carries their configuration in the checkpoint, and the export writes it back with the encoder as it
came (MPNetModel, its trained pooler included: ckpt['hf_extra']), so that SentenceTransformer(export) is the
same model with the trained encoder. The MLM head of such a model stays in the checkpoint.

Export builds the folder beside OUT_DIR (inside it, as .nano_mpnet.partial-PID, where OUT_DIR is a mount point or
its parent cannot be written), reloads it with transformers, compares it with ours on a sample batch (a tolerance
scaled to the depth and the values), checks that its tokenizer loads and encodes (one that does not is left out,
with a note), and only then moves it into OUT_DIR. OUT_DIR, however spelled ('.', a link, the folder you stand in,
a mount point), must be new, empty, or an earlier export holding no checkpoint; an earlier export stays until the
new one is complete. A mismatch, a failed write (a full disk), Ctrl-C or SIGTERM exits non-zero in one line and
leaves nothing half-written.
HF parameter names appear only in HF_NAMES, HF_LAYER_NAMES and HF_EXTRA_NAMES below.
"""

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import zipfile

import torch
from torch.nn import functional as F

from checkpoint import (CheckpointError, load_checkpoint, model_from_checkpoint, remove_dead_writers_temp_files,
                        save_checkpoint)
from configurator import ConfigError, configure
from model import MPNet, MPNetConfig


class ConvertError(Exception):
    """A user mistake: printed as one line, exit code 1."""


# our parameter name -> HF MPNetForMaskedLM name(s); several names are concatenated along dim 0
HF_NAMES = {
    'wte.weight': 'mpnet.embeddings.word_embeddings.weight',
    'wpe.weight': 'mpnet.embeddings.position_embeddings.weight',
    'ln_emb.weight': 'mpnet.embeddings.LayerNorm.weight',
    'ln_emb.bias': 'mpnet.embeddings.LayerNorm.bias',
    'rel_bias.weight': 'mpnet.encoder.relative_attention_bias.weight',
    'head_dense.weight': 'lm_head.dense.weight',
    'head_dense.bias': 'lm_head.dense.bias',
    'head_ln.weight': 'lm_head.layer_norm.weight',
    'head_ln.bias': 'lm_head.layer_norm.bias',
    'head_bias': 'lm_head.bias',
}
HF_LAYER_NAMES = {
    'attn.q.{}': ['attention.attn.q.{}'],
    'attn.kv.{}': ['attention.attn.k.{}', 'attention.attn.v.{}'],
    'attn.o.{}': ['attention.attn.o.{}'],
    'ln_1.{}': ['attention.LayerNorm.{}'],
    'mlp.fc1.{}': ['intermediate.dense.{}'],
    'mlp.fc2.{}': ['output.dense.{}'],
    'ln_2.{}': ['output.LayerNorm.{}'],
}
# HF weights our model has no place for, carried in the checkpoint as ckpt['hf_extra'] {our name: tensor} and
# written back by export: the trained pooler of an MPNetModel (sentence models have one; AutoModel's
# pooler_output comes from it)
HF_EXTRA_NAMES = {
    'pooler.weight': 'mpnet.pooler.dense.weight',
    'pooler.bias': 'mpnet.pooler.dense.bias',
}
# a fine-tuned classifier (finetune.py's ClassificationHead, HF's MPNetClassificationHead on <s>)
HF_CLASSIFIER_NAMES = {f'{layer}.{kind}': f'classifier.{layer}.{kind}' for layer in ('dense', 'out_proj')
                       for kind in ('weight', 'bias')}
HEAD_KEYS = ('head_dense.weight', 'head_dense.bias', 'head_ln.weight', 'head_ln.bias', 'head_bias')
PADDED_ROWS = ('wte.weight', 'head_bias')  # padded to a multiple of 64 here, exactly vocab_size in HF


def name_map(n_layer):
    """Our name -> list of HF names, for a model of n_layer layers."""
    names = {ours: [hf] for ours, hf in HF_NAMES.items()}
    for i in range(n_layer):
        for kind in ('weight', 'bias'):
            for ours, hf in HF_LAYER_NAMES.items():
                names[f'blocks.{i}.{ours.format(kind)}'] = [f'mpnet.encoder.layer.{i}.{h.format(kind)}' for h in hf]
    return names


def check_exportable(config):
    if config.rope:
        raise ConvertError('this checkpoint uses rotary positions (rope=True), which HF MPNetForMaskedLM cannot represent')
    if (config.rel_buckets, config.rel_max_distance) != (32, 128):
        raise ConvertError(f'HF MPNet always uses 32 relative buckets and max distance 128; this checkpoint has '
                           f'{config.rel_buckets}/{config.rel_max_distance}')
    if config.pad_id != 1:
        raise ConvertError(f'HF MPNet hard-codes padding_idx=1 for positions; this checkpoint has pad_id={config.pad_id}')


def hf_config(config, special_ids=None):
    from transformers import MPNetConfig as HFConfig
    special = {'bos_token_id': 0, 'pad_token_id': 1, 'eos_token_id': 2, **(special_ids or {})}
    return HFConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                    num_attention_heads=config.n_head, intermediate_size=config.n_inner, hidden_act='gelu',
                    hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attn_dropout,
                    max_position_embeddings=config.max_positions + config.pad_id + 1,
                    layer_norm_eps=config.layer_norm_eps, relative_attention_num_buckets=config.rel_buckets,
                    tie_word_embeddings=True, **special)


def to_hf_state_dict(model):
    """Our state dict -> HF MPNetForMaskedLM state dict (padding rows dropped, k/v split)."""
    c = model.config
    sd = model.state_dict()
    out = {}
    for ours, hf_names in name_map(c.n_layer).items():
        t = sd[ours]
        if ours in PADDED_ROWS:
            t = t[:c.vocab_size]
        for hf, part in zip(hf_names, t.chunk(len(hf_names), dim=0)):
            out[hf] = part.clone()
    out['lm_head.decoder.weight'] = out['mpnet.embeddings.word_embeddings.weight']  # tied
    out['lm_head.decoder.bias'] = out['lm_head.bias']
    return out


def from_hf_state_dict(hf_sd, model):
    """Load an HF MPNetForMaskedLM (or MPNetModel, with 'mpnet.' prefix added) state dict into our model.
    Returns the list of our keys that had no HF counterpart (the MLM head of an encoder-only model)."""
    c = model.config
    ours_sd = model.state_dict()
    missing = []
    for ours, hf_names in name_map(c.n_layer).items():
        if not all(h in hf_sd for h in hf_names):
            missing.append(ours)
            continue
        t = torch.cat([hf_sd[h] for h in hf_names], dim=0)
        target = ours_sd[ours]
        if ours in PADDED_ROWS:
            target[:c.vocab_size].copy_(t)
            target[c.vocab_size:].zero_()
        else:
            if target.shape != t.shape:
                raise ConvertError(f'shape mismatch for {hf_names[0]}: HF {tuple(t.shape)} vs ours {tuple(target.shape)}')
            target.copy_(t)
    if missing and any(k not in HEAD_KEYS for k in missing):
        raise ConvertError(f'the HF model lacks encoder weights: {[k for k in missing if k not in HEAD_KEYS][:3]} ...')
    return missing


def config_from_hf(hf_cfg):
    """Our model_args for an HF MPNetConfig. HF's modeling code hard-codes padding_idx=1 and 32 buckets
    whatever the config says, so those are fixed here too (a table of another size cannot be used)."""
    if getattr(hf_cfg, 'model_type', None) != 'mpnet':
        raise ConvertError(f'not an MPNet model (model_type={getattr(hf_cfg, "model_type", None)!r})')
    if hf_cfg.relative_attention_num_buckets != 32:
        raise ConvertError(f'relative_attention_num_buckets={hf_cfg.relative_attention_num_buckets}, but HF MPNet '
                           f'always computes 32 buckets: this model cannot be imported faithfully')
    return dict(vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads,
                n_embd=hf_cfg.hidden_size, n_inner=hf_cfg.intermediate_size,
                max_positions=hf_cfg.max_position_embeddings - 2, rel_buckets=32, dropout=hf_cfg.hidden_dropout_prob,
                attn_dropout=hf_cfg.attention_probs_dropout_prob, layer_norm_eps=hf_cfg.layer_norm_eps, pad_id=1)


# ----------------------------------------------------------------------------------------------
# what travels inside a checkpoint as {relative path: text}, so that an export rebuilds the user's artefact:
# the tokenizer files, and a sentence-transformers folder's module configuration

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')
ST_CARRIED = ('Pooling', 'Normalize', 'Dropout')  # sentence-transformers modules configured by text alone


def read_tokenizer_files(folder):
    files = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                files[name] = f.read()
    return files


def tokenizer_problem(folder, vocab_size=None):
    """Why the tokenizer in folder cannot be used (a short reason), or None. It must load, encode a text and
    give no id the model lacks: transformers loads a folder without a vocabulary as an empty tokenizer that
    fails only when used ('WordPiece error: Missing [UNK] token'), so loading alone proves nothing."""
    from transformers import AutoTokenizer
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder)
            tok('A sentence, to check the tokenizer.')
    except Exception as e:  # tokenizers raises plain Exception; anything here means it cannot be used
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if vocab_size and len(tok) > vocab_size:
        return f'it has {len(tok)} tokens, more than the model\'s {vocab_size}'
    return None


def tokenizer_and_problem(name_or_dir, vocab_size=None):
    """({filename: text}, None) of a usable tokenizer given by a folder or a hub name, or ({}, why not)."""
    files = read_tokenizer_files(name_or_dir) if os.path.isdir(name_or_dir) else {}
    try:
        return _checked_tokenizer(name_or_dir, files, vocab_size)
    except OSError as e:  # it is checked in a temporary folder: /tmp full, or a file size limit
        where = tempfile.gettempdir()
        raise ConvertError(f"could not write {where}/, where the tokenizer is checked ({e.strerror or e}; "
                           f"{_size(shutil.disk_usage(where).free)} free there): free some space there, or set TMPDIR "
                           f"to a folder on a disk with room") from None


def _checked_tokenizer(name_or_dir, files, vocab_size):
    with tempfile.TemporaryDirectory() as tmp:
        if files:
            for name, text in files.items():
                with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
                    f.write(text)
        elif os.path.isdir(name_or_dir):
            return {}, 'no tokenizer.json or vocab.txt in it'
        else:
            try:
                from transformers import AutoTokenizer
                with quiet_transformers():
                    AutoTokenizer.from_pretrained(name_or_dir).save_pretrained(tmp)
            except Exception as e:
                return {}, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            files = read_tokenizer_files(tmp)
        # beside the model's config.json where there is one: a vocab.txt alone is typed by its model_type
        if os.path.isfile(os.path.join(str(name_or_dir), 'config.json')):
            shutil.copyfile(os.path.join(name_or_dir, 'config.json'), os.path.join(tmp, 'config.json'))
        problem = tokenizer_problem(tmp, vocab_size)
    return ({}, problem) if problem else (files, None)


def tokenizer_files_of(name_or_dir, vocab_size=None):
    """{filename: text} of a usable tokenizer given by a folder or a hub name; {} if there is none."""
    return tokenizer_and_problem(name_or_dir, vocab_size)[0]


def read_sentence_transformers(folder):
    """({relative path: text}, path of the Transformer module) of a sentence-transformers folder: its
    modules.json, config_sentence_transformers.json, the Transformer's sentence_bert_config.json and every
    file of its Pooling / Normalize / Dropout modules. ({}, '') for a plain HF folder. A module with weights
    or code of its own (Dense, a custom class) is refused: an export could not rebuild it."""
    if not folder or not os.path.isfile(os.path.join(folder, 'modules.json')):
        return {}, ''
    with open(os.path.join(folder, 'modules.json'), encoding='utf-8') as f:
        modules = json.load(f)
    kinds = [m['type'].rsplit('.', 1)[-1] for m in modules]
    if kinds.count('Transformer') != 1:
        raise ConvertError(f"'{folder}/modules.json' has {kinds.count('Transformer')} Transformer modules; one MPNet is expected")
    for m, kind in zip(modules, kinds):
        if kind != 'Transformer' and (kind not in ST_CARRIED or not m['type'].startswith('sentence_transformers.')):
            raise ConvertError(f"sentence-transformers module '{m.get('path') or m.get('name')}' ({m['type']}) cannot "
                               f"be carried through training and export: only {', '.join(ST_CARRIED)} modules after the "
                               f"Transformer can (others hold weights or code of their own)")
    outside = next((m['path'] for m in modules if not _inside(m.get('path') or '')), None)
    if outside is not None:
        raise ConvertError(f"'{folder}/modules.json' puts a module at '{outside}', outside the folder: it cannot be "
                           f"carried")
    transformer_path = modules[kinds.index('Transformer')]['path']
    names = ['modules.json', 'config_sentence_transformers.json', os.path.join(transformer_path, 'sentence_bert_config.json')]
    for m, kind in zip(modules, kinds):
        if kind != 'Transformer' and m['path']:
            for root, _, files in os.walk(os.path.join(folder, m['path'])):
                names += [os.path.relpath(os.path.join(root, n), folder) for n in sorted(files)]
    carried = {}
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            try:
                with open(os.path.join(folder, name), encoding='utf-8') as f:
                    carried[name] = f.read()
            except UnicodeDecodeError:
                raise ConvertError(f"'{os.path.join(folder, name)}' is not a text file: this module cannot be carried") from None
    return carried, transformer_path


def _inside(name, plain=False):
    """Whether a relative path carried in a checkpoint stays inside the folder it is written into (with plain, a
    file name alone)."""
    if not isinstance(name, str) or os.path.isabs(name):
        return False
    parts = os.path.normpath(name).split(os.sep)
    return parts[0] != '..' and (not plain or (len(parts) == 1 and parts[0] not in ('', '.')))


def carried_outside(ckpt):
    """The names among the files a checkpoint carries that lead out of an export folder ('../x', '/x'): none in a
    checkpoint this project wrote. A checkpoint is data, loaded weights_only: it never writes elsewhere."""
    return ([repr(ckpt.get('st_path'))] if not _inside(ckpt.get('st_path') or '') else []) + \
        [repr(n) for n in ckpt.get('st_files') or {} if not _inside(n) or not _inside(os.path.basename(n), True)] + \
        [repr(n) for n in ckpt.get('tokenizer_files') or {} if not _inside(n, plain=True)]


def sentence_pooling(st_files):
    """'cls' if the carried sentence-transformers Pooling module takes the first token, else 'mean'."""
    for name, text in (st_files or {}).items():
        if name.endswith('config.json') and 'pooling_mode' in text:
            cfg = json.loads(text)
            return 'cls' if cfg.get('pooling_mode_cls_token') or cfg.get('pooling_mode') == 'cls' else 'mean'
    return 'mean'


def _hub_small_files(name):
    """A local snapshot of a hub model's configuration files (no weights), or None if the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=['*.json', '*.txt'])
    except Exception:
        return None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report and progress bars off: an import expects a missing MLM head and says so itself."""
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# export

EXPORT_MARK = 'nano_mpnet.json'  # written into every export: what it came from, and that it may be replaced


def parity(model, hf, head=None, full_length=False):
    """(max |diff| between our model and an HF one on a padded sample batch, the tolerance it must stay under):
    with full_length, a row of max_positions tokens joins it (an extended table: its new rows are checked too);
    of the logits for MPNetForMaskedLM, of the last hidden states for an encoder (MPNetModel). fp32 rounding
    differs between the two implementations and grows with depth and with the values' size: a 12-layer model
    continued from all-mpnet-base-v2 differed by 1.3e-4 at logits near 16 (relative 8e-6). The tolerance,
    5e-6 x n_layer x max|value|, leaves room for that; a wrong conversion is off by O(1)."""
    ids, attention_mask = sample_batch(model.config)
    if full_length:  # the short rows padded to one of every position
        long_ids = sample_batch(model.config, T=model.config.max_positions, seed=1)[0][:1]
        ids = torch.cat([F.pad(ids, (0, long_ids.size(1) - ids.size(1)), value=model.config.pad_id), long_ids])
        attention_mask = (ids != model.config.pad_id).long()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=attention_mask)
        if head is not None:  # the checkpoint's classification head on <s> (eval: no dropout), as HF applies it
            x = torch.tanh(F.linear(model.encode(ids, attention_mask)[:, 0], head['dense.weight'], head['dense.bias']))
            ours, theirs = F.linear(x, head['out_proj.weight'], head['out_proj.bias']), out.logits
            diff = (ours - theirs).abs().max().item()
            return diff, 1e-5 + 5e-6 * model.config.n_layer * theirs.abs().max().item()
        if hasattr(hf, 'lm_head'):
            ours, theirs = model.lm_logits(model.encode(ids, attention_mask)), out.logits
        else:
            ours, theirs = model.encode(ids, attention_mask), out.last_hidden_state
    keep = attention_mask.bool()
    diff = (ours[keep] - theirs[keep]).abs().max().item()
    return diff, 1e-5 + 5e-6 * model.config.n_layer * theirs[keep].abs().max().item()


def _json_object(text):
    """The dict a carried JSON file holds, or None (not JSON, or not an object: left as it is, for a check to name)."""
    try:
        cfg = json.loads(text)
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


def _tokenizer_config(text, max_positions, extended=False):
    """The tokenizer's config for an export: model_max_length at most the model's positions (truncation
    then stops where the model does; a model whose positions train.py extended reads all of them), and a class that
    transformers 4 also knows, giving only the inputs MPNet takes (a generic fast tokenizer of transformers 4 adds
    token_type_ids, which MPNet refuses). Text that is not a JSON object is left as it is, for the tokenizer check
    to name."""
    cfg = _json_object(text)
    if cfg is None:
        return text
    length = cfg.get('model_max_length')
    cfg['model_max_length'] = min(length, max_positions) if isinstance(length, int) and not extended else max_positions
    if cfg.get('tokenizer_class') == 'TokenizersBackend':  # transformers 5's name for a tokenizer.json tokenizer
        cfg['tokenizer_class'] = 'PreTrainedTokenizerFast'
    cfg['model_input_names'] = ['input_ids', 'attention_mask']
    return json.dumps(cfg, indent=2, ensure_ascii=False) + '\n'


def _sentence_bert_config(text, max_positions, extended=False):
    """sentence-transformers' Transformer config for an export: max_seq_length at most the model's positions (a
    longer one indexes past the position table on a long text), and all of them when train.py extended the table
    (the sentence model reads as far as it was trained to). Otherwise the text as it came."""
    cfg = _json_object(text)
    length = (cfg or {}).get('max_seq_length')
    if cfg is None or not extended and not (isinstance(length, int) and length > max_positions):
        return text
    return json.dumps({**cfg, 'max_seq_length': max_positions}, indent=2) + '\n'


def _load_sentence_transformer(folder):
    """One line on how sentence-transformers loads an export that carries its modules."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return 'sentence-transformers is not installed here, so the module files were written but not loaded'
    with quiet_transformers():
        st = SentenceTransformer(folder, device='cpu')
    return (f"SentenceTransformer loads it: {' -> '.join(type(m).__name__ for m in st)}, "
            f"max_seq_length {st.max_seq_length}")


def _is_checkpoint_like(path):
    return path.endswith(('.pt', '.pth', '.ckpt', '.bin')) or (os.path.isfile(path) and zipfile.is_zipfile(path))


def check_destination(out_dir, ckpt_path):
    """The real path of OUT_DIR, or a ConvertError. Whatever spells it ('.', '..', a trailing slash, a link,
    the folder we stand in), it must be a new folder in an existing one, an empty folder, or an earlier
    export (nano_mpnet.json) that holds no checkpoint: the only folders an export may replace."""
    if not out_dir.strip():
        raise ConvertError('OUT_DIR is empty: name the folder to export into')
    dest = os.path.realpath(out_dir)  # a link to an earlier export: its target is replaced, the link kept
    parent = os.path.dirname(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ConvertError(f"'{out_dir}' is a file, not a folder: export into a new or empty folder")
    if not os.path.isdir(parent):
        raise ConvertError(f"cannot export to '{out_dir}': its parent folder '{parent}' "
                           f"{'is a file' if os.path.exists(parent) else 'does not exist (create it first)'}")
    ckpt_real = os.path.realpath(ckpt_path)
    if ckpt_real.startswith(dest.rstrip(os.sep) + os.sep):
        raise ConvertError(f"'{out_dir}' holds the checkpoint being exported ({ckpt_path}): export into a folder "
                           f"of its own, e.g. {os.path.join(os.path.dirname(ckpt_path) or '.', 'hf')}")
    if not os.path.isdir(dest):
        return dest
    try:
        held = sorted(n for n in os.listdir(dest) if not _ours(n))  # not another export's work, still running
        if held and not os.path.isfile(os.path.join(dest, EXPORT_MARK)):
            raise ConvertError(f"'{out_dir}' is not empty and holds no earlier export ({EXPORT_MARK}): export into "
                               f"a new or empty folder (an earlier export is replaced whole, never mixed)")
        for root, dirs, names in os.walk(dest):  # an export never holds a checkpoint: one put there is not ours to remove
            dirs[:] = [d for d in dirs if not _ours(d)]
            for name in names:
                if _is_checkpoint_like(os.path.join(root, name)):
                    raise ConvertError(f"'{os.path.join(root, name)}' is in the earlier export at '{out_dir}' but is "
                                       f"no part of one (a checkpoint?): move it out first, or export elsewhere")
    except OSError as e:
        raise ConvertError(f"cannot read '{out_dir}' ({e.strerror}): export into a folder you can write") from None
    return dest


def _size(n):
    return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n // 2**10} KiB'


def _export_bytes(hf, tok_files, st_files):
    """About how many bytes an export takes: its weights (tied ones once) and its text files."""
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    return weights + sum(len(text.encode()) for text in [*tok_files.values(), *st_files.values()])


def _write_failed(e, path, staging, out_dir, dest, need):
    """The one line of a write into the export that failed (a full disk, a file size limit, a read-only folder):
    the file as it would be in out_dir, why, what stays (the staging folder is gone), and the fix.
    safetensors reports an I/O error as its own SafetensorError, with the OS error's number in the text."""
    number = e.errno if isinstance(e, OSError) else next(map(int, re.findall(r'os error (\d+)', str(e))), None)
    reason = os.strerror(number) if number else (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if isinstance(e, OSError) and e.filename and str(e.filename).startswith(staging + os.sep):
        path = e.filename
    shown = (os.path.join(out_dir, os.path.relpath(path, staging)) if path and path.startswith(staging + os.sep)
             else out_dir)
    try:
        free = f'; {_size(shutil.disk_usage(os.path.dirname(staging)).free)} free there'
    except OSError:
        free = ''
    kept = ('the earlier export there is unchanged' if os.path.isfile(os.path.join(dest, EXPORT_MARK))
            else 'nothing was written')
    fix = {errno.ENOSPC: f'the export takes about {_size(need)}: free some space, or export to another disk',
           errno.EDQUOT: f'the export takes about {_size(need)}: free some of your quota, or export to another disk',
           errno.EFBIG: 'a file size limit (ulimit -f) or the file system caps the size of a file: raise the limit, '
                        'or export to another disk'}.get(number, 'export into a folder on a writable disk')
    return ConvertError(f'could not write {shown} ({reason}{free}): {kept}; {fix}')


WORK = '.nano_mpnet'  # inside OUT_DIR when it must be: WORK.partial-PID (the new export), WORK.old-PID (the earlier)


def _work_folders(dest):
    """(staging, aside) of this process for dest: beside it (dest.partial-PID, dest.old-PID), where what a kill -9
    leaves is in sight and never inside an export; inside an existing dest when beside cannot be: a volume mounted
    as OUT_DIR (its parent is another file system, and a rename cannot cross one) or a parent this user cannot
    write. _move_into renames between them and dest."""
    inside = os.path.isdir(dest) and (os.path.ismount(dest) or not os.access(os.path.dirname(dest), os.W_OK))
    base = os.path.join(dest, WORK) if inside else dest
    return f'{base}.partial-{os.getpid()}', f'{base}.old-{os.getpid()}'


def _ours(name):
    return name.startswith(WORK + '.')


def _mend_killed_exports(dest):
    """A kill -9 during an export leaves its staging folder (the unfinished new export) and, during the swap of
    _move_into, its aside folder (the earlier export, moved out of dest): beside dest, or inside it (_work_folders).
    Once that process is gone,
    the earlier export goes back into dest unless the new one arrived whole (its EXPORT_MARK, moved last, is
    there); then the leftovers are removed, with one line each."""
    from data import pid_alive
    bases = [glob.escape(dest), glob.escape(os.path.join(dest, WORK))]
    lefts = [left for kind in ('old', 'partial') for base in bases for left in sorted(glob.glob(f'{base}.{kind}-*'))]
    for left in lefts:
        pid = left.rsplit('-', 1)[1]
        if not pid.isdigit() or pid_alive(int(pid)) or not os.path.isdir(left):
            continue
        if left.endswith(f'.old-{pid}') and not os.path.isfile(os.path.join(dest, EXPORT_MARK)):
            first = [n for n in os.listdir(dest) if not _ours(n)] if os.path.isdir(dest) else []
            for name in first:  # the new export's first files
                path = os.path.join(dest, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            os.makedirs(dest, exist_ok=True)
            for name in os.listdir(left):
                os.rename(os.path.join(left, name), os.path.join(dest, name))
            print(f'restored the earlier export in {dest}: export process {pid} was killed while replacing it')
        shutil.rmtree(left, ignore_errors=True)
        print(f'removed {left}: left by export process {pid}, which is gone')


def _move_into(staging, aside, dest):
    """Put the complete export in staging at dest. A new dest is staging renamed. An existing one keeps its own
    folder (a shell standing in it stays there): its entries are moved aside, the new ones moved in, and only
    then is the old content removed; if a move fails, everything goes back where it was."""
    if not os.path.exists(dest):
        os.rename(staging, dest)
        return
    os.mkdir(aside)
    old, new = [], []
    try:
        held = [n for n in os.listdir(dest) if not _ours(n)]
        for name in sorted(held, key=lambda n: n != EXPORT_MARK):  # the mark first: see _mend_killed_exports
            os.rename(os.path.join(dest, name), os.path.join(aside, name))
            old.append(name)
        for name in sorted(os.listdir(staging), key=lambda n: n == EXPORT_MARK):  # the mark last: dest is whole once it is there
            os.rename(os.path.join(staging, name), os.path.join(dest, name))
            new.append(name)
    except BaseException:  # Ctrl-C included: the earlier export comes back whole
        for name in new:
            os.rename(os.path.join(dest, name), os.path.join(staging, name))
        for name in old:
            os.rename(os.path.join(aside, name), os.path.join(dest, name))
        os.rmdir(aside)
        raise
    shutil.rmtree(aside)
    os.rmdir(staging)


def hf_model_of(model, special_ids=None, extra=None, encoder_only=False, classifier=None):
    """The HF model holding our weights (and the carried extras): MPNetForMaskedLM, or for a sentence model
    the MPNetModel inside it, as sentence-transformers keeps it (encoder and pooler, no MLM head), or for a
    fine-tuned classifier (finetune.py --save; classifier = {'head': tensors, 'labels': names or None for a
    score}) MPNetForSequenceClassification, which pipeline('text-classification') loads."""
    from transformers import MPNetForMaskedLM, MPNetForSequenceClassification
    from transformers.models.mpnet.modeling_mpnet import MPNetPooler
    if classifier:
        labels = classifier.get('labels')
        cfg = hf_config(model.config, special_ids)
        cfg.num_labels = len(labels) if labels else 1
        cfg.problem_type = 'single_label_classification' if labels else 'regression'
        if labels:
            cfg.id2label, cfg.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
        hf = MPNetForSequenceClassification(cfg).eval()
        sd = {k: v for k, v in to_hf_state_dict(model).items() if k.startswith('mpnet.')}
        sd.update({HF_CLASSIFIER_NAMES[k]: v for k, v in classifier['head'].items()})
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        if [k for k in missing if not k.endswith('position_ids')] or unexpected:
            raise ConvertError(f'internal: HF names do not match (missing {missing[:3]}, unexpected {unexpected[:3]})')
        return hf
    hf = MPNetForMaskedLM(hf_config(model.config, special_ids)).eval()
    if extra:
        hf.mpnet.pooler = MPNetPooler(hf.config)  # MaskedLM has no pooler; a trained one is kept all the same
    sd = {**to_hf_state_dict(model), **{HF_EXTRA_NAMES[k]: v for k, v in (extra or {}).items()}}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith('position_ids')]
    if missing or unexpected:
        raise ConvertError(f'internal: HF names do not match (missing {missing[:3]}, unexpected {unexpected[:3]})')
    return hf.mpnet if encoder_only else hf


def export(ckpt_path, out_dir):
    """Write an HF folder (plus the sentence-transformers modules the checkpoint carries) and check it against
    our model: MPNetForMaskedLM, or for a sentence model the MPNetModel it came as. The folder is built beside
    out_dir (_work_folders) and moved there only once it passed; an out_dir that is not empty must be an earlier
    export, whose content stays until the new one is complete (check_destination, _move_into). A failed write is
    one line naming the file (_write_failed). Returns the diff."""
    from safetensors import SafetensorError  # a failed write of the weights (transformers writes them with it)
    if os.path.isdir(ckpt_path):
        raise ConvertError(_folder_given_as_checkpoint(ckpt_path, out_dir))
    ckpt = load_checkpoint(ckpt_path)
    _mend_killed_exports(os.path.realpath(out_dir))
    dest = check_destination(out_dir, ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path).eval()
    c = model.config
    check_exportable(c)
    broken = next((k for k, v in ckpt['model'].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:  # a diverged run's weights: any comparison with them is nan, and no user wants them
        raise ConvertError(f"'{ckpt_path}' holds non-finite weights ({broken} has nan or inf): it comes from a diverged "
                           f"run; export the run's best.pt or an earlier snapshot")
    outside = carried_outside(ckpt)
    if outside:
        raise ConvertError(f"'{ckpt_path}' carries files to be written outside the export ({', '.join(outside[:3])}): "
                           f"it was not made by this project's import or training; nothing was written")
    st_files, st_path = ckpt.get('st_files') or {}, ckpt.get('st_path') or ''
    extra = {k: v for k, v in (ckpt.get('hf_extra') or {}).items() if k in HF_EXTRA_NAMES}
    classifier = ckpt.get('classifier')  # a model fine-tuned by finetune.py --save
    if classifier:
        st_files, st_path, extra = {}, '', {}  # a classifier now, not the sentence model it may have been
    hf = hf_model_of(model, ckpt.get('special_ids'), extra, encoder_only=bool(st_files), classifier=classifier)
    extended = bool(ckpt.get('positions_extended'))  # train.py --max_positions above the checkpoint's
    tok_files = ckpt.get('tokenizer_files') or {}
    if not tok_files and ckpt.get('config', {}).get('tokenizer'):
        tok_files = tokenizer_files_of(ckpt['config']['tokenizer'])
    staging, aside = _work_folders(dest)  # on dest's file system: the final moves are renames
    try:
        os.mkdir(staging)
    except OSError as e:
        where = 'beside' if os.path.dirname(staging) != dest else 'into'
        raise ConvertError(f"cannot write {where} '{out_dir}' ({e.strerror}), where the export is built first: "
                           f"choose a folder on a writable disk") from None
    hf_dir = os.path.join(staging, st_path)  # sentence-transformers may keep it in a subfolder
    writing = os.path.join(hf_dir, 'config.json')  # the file being written, named if the write fails
    def put(name, text):  # a text file of the export, name relative to staging
        nonlocal writing
        writing = os.path.join(staging, name)
        os.makedirs(os.path.dirname(writing), exist_ok=True)
        with open(writing, 'w', encoding='utf-8') as f:
            f.write(text)
    try:
        with quiet_transformers():  # config.json, then model.safetensors (safetensors reports its own errors)
            hf.save_pretrained(hf_dir, safe_serialization=True)
        for name, text in tok_files.items():
            put(os.path.join(st_path, name),
                _tokenizer_config(text, c.max_positions, extended) if name == 'tokenizer_config.json' else text)
        # an unusable tokenizer breaks every use of the export: it is left out, and the note says so
        tok_problem = tokenizer_problem(hf_dir, c.vocab_size) if tok_files else 'the checkpoint names none'
        if tok_files and tok_problem:
            for name in tok_files:
                os.remove(os.path.join(hf_dir, name))
        for name, text in st_files.items():
            if name == os.path.join(st_path, 'sentence_bert_config.json'):  # the Transformer module's, wherever it is
                text = _sentence_bert_config(text, c.max_positions, extended)
            put(name, text)
        # parity: reload the folder as a user would
        writing = None
        with quiet_transformers():
            back = type(hf).from_pretrained(hf_dir).eval()
        diff, tol = parity(model, back, classifier['head'] if classifier else None, full_length=extended)
        if not diff < tol:
            raise ConvertError(f'exported model disagrees with ours: max |diff| {diff:.2e} >= {tol:.2e} '
                               f'(tolerance for {c.n_layer} layers at these values); nothing was written to {out_dir}')
        if extra and st_files and not torch.equal(back.pooler.dense.weight, extra['pooler.weight']):
            raise ConvertError(f'internal: the exported pooler differs from the checkpoint\'s; nothing was written to {out_dir}')
        st_said = _load_sentence_transformer(staging) if st_files and not tok_problem else None
        put(EXPORT_MARK, json.dumps(dict(checkpoint=os.path.abspath(ckpt_path), iter_num=ckpt.get('iter_num'),
                                         val_loss=ckpt.get('val_loss'), max_diff=diff, tolerance=tol,
                                         compared='last hidden states' if st_files else
                                         'classifier logits' if classifier else 'logits'), indent=2))
        writing = staging
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, names in os.walk(staging):  # ordinary modes (safetensors writes 0600)
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for n in names:
                os.chmod(os.path.join(root, n), 0o666 & ~umask)
        os.chmod(staging, 0o777 & ~umask)
        writing = dest
        _move_into(staging, aside, dest)
    except (OSError, SafetensorError) as e:
        if isinstance(e, SafetensorError) and writing == os.path.join(hf_dir, 'config.json'):
            writing = os.path.join(hf_dir, 'model.safetensors')
        shutil.rmtree(staging, ignore_errors=True)  # before the free space is measured
        raise _write_failed(e, writing, staging, out_dir, dest, _export_bytes(hf, tok_files, st_files)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = 'hidden state' if st_files else 'logit'
    held = sorted(n for n in os.listdir(dest) if not _ours(n))
    print(f'wrote {dest} ({", ".join(held)}); max |{what} diff| vs transformers: {diff:.2e} (tolerance {tol:.1e})')
    if st_files:
        print(f"note: a sentence model: it holds the encoder{' and its pooler' if extra else ''} (MPNetModel), as it "
              f"came in; the MLM head stays in {ckpt_path}")
    if tok_problem:
        fix = ('' if not tok_files else ' (its tokenizer cannot be used: ' + tok_problem + ')')
        print(f'note: the export holds the model without a tokenizer{fix}; add one with '
              f'AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained({out_dir!r})'
              + ('; SentenceTransformer needs it' if st_files else ''))
    if st_said:
        print(st_said)
    return diff


def _folder_given_as_checkpoint(folder, out_dir):
    """What to say when CKPT is a folder: a run folder (give its checkpoint), an HF model (an export already; to
    continue from it, import it), or anything else."""
    run = next((n for n in ('best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(folder, n))), None)
    if run:
        return f"'{folder}' is a run folder: give its checkpoint: python convert_hf.py {os.path.join(folder, run)} {out_dir}"
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return (f"'{folder}' is an HF model folder, which needs no export; to train from it: python convert_hf.py "
                f"--from_hf={folder} CKPT (or train.py --init_from={folder})")
    return f"'{folder}' is a folder, not a checkpoint: give a checkpoint file (out_dir/best.pt, ckpt.pt or a snapshot)"


def sample_batch(config, B=2, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = min(T, config.max_positions)
    ids = torch.randint(config.pad_id + 1, config.vocab_size, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    ids[1, T - 5:], attention_mask[1, T - 5:] = config.pad_id, 0  # a padded row
    return ids, attention_mask


# ----------------------------------------------------------------------------------------------
# import

def hf_to_checkpoint(name_or_dir):
    """HF MPNetForMaskedLM or MPNetModel, or a sentence-transformers MPNet (hub name or folder) -> a checkpoint
    dict train.py can start from. Prints one line on what it found. head_fresh says the MLM head is new."""
    local = os.path.isdir(name_or_dir)
    if os.path.isfile(name_or_dir):  # a file of an HF folder, or a checkpoint of this project
        raise ConvertError(f"'{name_or_dir}' is a file, not an HF model: " + (
            'it is a checkpoint of this project, which needs no import (train.py --init_from, finetune.py and '
            'convert_hf.py CKPT OUT_DIR take it as it is)' if _is_checkpoint_like(name_or_dir) else
            f"give the folder that holds its config.json, '{os.path.dirname(name_or_dir) or '.'}'"))
    if not name_or_dir.strip():
        raise ConvertError('the HF model to import is empty: give a folder or a hub name (--from_hf=NAME_OR_DIR)')
    if name_or_dir.startswith(('/', '.', '~')) and not local:
        raise ConvertError(f"HF model folder '{name_or_dir}' not found (give a local folder or a hub name)")
    if local and not os.path.isfile(os.path.join(name_or_dir, 'config.json')):
        run = next((n for n in ('best.pt', 'ckpt.pt') if os.path.isfile(os.path.join(name_or_dir, n))), None)
        if run:  # a train.py run folder given where its checkpoint was meant
            raise ConvertError(f"'{name_or_dir}' is a run folder of this project, not an HF model: give its checkpoint, "
                               f"{os.path.join(name_or_dir, run)}")
    st_files, st_path = read_sentence_transformers(name_or_dir if local else _hub_small_files(name_or_dir))
    from transformers import AutoConfig, MPNetForMaskedLM, MPNetModel
    where = dict(pretrained_model_name_or_path=os.path.join(name_or_dir, st_path) if local else name_or_dir,
                 **({} if local or not st_path else {'subfolder': st_path}))
    try:
        hf_cfg = AutoConfig.from_pretrained(**where)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot load HF model '{name_or_dir}': {str(e).splitlines()[0]}")
    model_args = config_from_hf(hf_cfg)
    try:
        with quiet_transformers():
            hf, info = MPNetForMaskedLM.from_pretrained(**where, output_loading_info=True)
            extra = {}
            if any('pooler.dense' in k for k in info['unexpected_keys']):  # a trained pooler, which MaskedLM drops
                pooled = MPNetModel.from_pretrained(**where).state_dict()
                extra = {ours: pooled[hf_name.removeprefix('mpnet.')].clone() for ours, hf_name in HF_EXTRA_NAMES.items()}
    except Exception as e:  # config.json without weights (transformers' OSError), or damaged ones (SafetensorError)
        raise ConvertError(f"cannot load the weights of HF model '{name_or_dir}' ({(str(e).strip() or type(e).__name__).splitlines()[0][:160]}): "
                           f"it needs model.safetensors (or pytorch_model.bin) beside its config.json") from None
    model = MPNet(MPNetConfig(**model_args))
    hf_sd = {k: v for k, v in hf.state_dict().items() if k not in info['missing_keys']}
    head_fresh = bool(from_hf_state_dict(hf_sd, model))
    tok_files, tok_problem = tokenizer_and_problem(where['pretrained_model_name_or_path'], model_args['vocab_size'])
    said = [f"imported '{name_or_dir}': MPNet {model_args['n_layer']} x {model_args['n_embd']}"]
    if head_fresh:
        said.append('encoder only: its MLM head is new (train.py trains it alone first, head_warmup_iters)')
    if st_files:
        modules = ' -> '.join(m['type'].rsplit('.', 1)[-1] for m in json.loads(st_files['modules.json']))
        said.append(f'sentence-transformers modules {modules} carried for export')
    if extra:
        said.append('its trained pooler carried for export')
    print(', '.join(said))
    if tok_problem:
        print(f"note: '{name_or_dir}' has no usable tokenizer ({tok_problem}): the checkpoint carries none, so train "
              f"with --tokenizer=NAME_OR_DIR (the one this model was trained with); an export of it has no tokenizer")
    return {'model': model.state_dict(), 'model_args': model_args, 'config': {'init_from': name_or_dir},
            'iter_num': 0, 'best_val_loss': float('inf'), 'head_fresh': head_fresh, 'st_files': st_files,
            'st_path': st_path, 'tokenizer_files': tok_files, 'hf_extra': extra,
            'special_ids': {k: getattr(hf_cfg, k) for k in ('bos_token_id', 'pad_token_id', 'eos_token_id')}}


def import_hf(name_or_dir, ckpt_path, overwrite=False):
    if os.path.isdir(ckpt_path) or not os.path.basename(ckpt_path):  # 'out/' too
        raise ConvertError(f"'{ckpt_path}' is a folder, but the import writes one checkpoint file: give its path, "
                           f"e.g. {os.path.join(ckpt_path, 'ckpt.pt')}")
    for line in remove_dead_writers_temp_files(ckpt_path, 'import process'):  # a kill -9 during an earlier import's save
        print(line)
    if os.path.exists(ckpt_path) and not overwrite:
        raise ConvertError(f"'{ckpt_path}' already exists and may hold a trained model: choose another path, "
                           f"or pass --overwrite to replace it")
    ckpt = hf_to_checkpoint(name_or_dir)
    save_checkpoint(ckpt, ckpt_path)
    print(f'wrote {ckpt_path}')
    return ckpt


# the command line, through configurator.py as every script's (python convert_hf.py --help)
USAGE = 'python convert_hf.py CKPT OUT_DIR  |  python convert_hf.py --from_hf=NAME_OR_DIR CKPT [--overwrite]'
SETTINGS = [('group', 'export CKPT to OUT_DIR, or with --from_hf import an HF MPNet as the checkpoint CKPT'),
            ('key', 'from_hf', '', 'an MPNetForMaskedLM / MPNetModel / sentence-transformers MPNet, hub name or folder'),
            ('key', 'overwrite', False, 'let the import replace an existing CKPT file')]
ABOUT = """  CKPT      a train.py checkpoint: out_dir/ckpt.pt, best.pt, or a snapshot (snapshots/iter_N.pt)
  OUT_DIR   the HF folder to write: new (its parent must exist), empty, or an earlier export
            (replaced whole, once the new one is complete); never the folder holding CKPT

Export: MPNetForMaskedLM (model.safetensors, config.json), the tokenizer, nano_mpnet.json; for a sentence
model its modules and the encoder as MPNetModel with its pooler; checked against transformers (and the
tokenizer loaded) before it is moved into OUT_DIR."""


def main(argv):
    paths, given = [a for a in argv if not a.startswith('-')], set()
    try:
        c = configure({e[1]: e[2] for e in SETTINGS if e[0] == 'key'}, [a for a in argv if a.startswith('-')],
                      script=__file__, also=ABOUT, settings=SETTINGS, usage=USAGE, given=given)
    except ConfigError as e:
        raise ConvertError(f'{e} (usage: {USAGE})') from None
    if 'from_hf' in given and len(paths) == 1:  # an empty --from_hf= is import_hf's to refuse, naming the flag
        import_hf(c['from_hf'], paths[0], overwrite=c['overwrite'])
    elif 'from_hf' not in given and len(paths) == 2:
        export(*paths)
    else:
        raise ConvertError(f'usage: {USAGE}')


if __name__ == '__main__':
    from data import interruptible
    got = []
    try:
        with interruptible() as got:  # SIGTERM too raises KeyboardInterrupt: the staging folder or temp file goes
            main(sys.argv[1:])
    except (ConvertError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f'error: interrupted ({signal.Signals(got[0] if got else signal.SIGINT).name}): nothing half-written is '
              f'left, and an earlier export or checkpoint there is unchanged', file=sys.stderr)
        sys.exit(128 + (got[0] if got else signal.SIGINT))
