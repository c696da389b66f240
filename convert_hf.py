"""
Checkpoint <-> HuggingFace MPNetForMaskedLM.

    python convert_hf.py out/ckpt.pt out/hf                     # export: safetensors + config.json + tokenizer
    python convert_hf.py --from_hf=microsoft/mpnet-base out/ckpt.pt   # import, to continue pretraining (never over a file)
    python convert_hf.py --from_hf=path/to/sentence-mpnet out/ckpt.pt # encoder-only MPNetModel: fresh MLM head

Export reloads the written folder with transformers and compares its logits with ours on a sample
batch; a mismatch exits non-zero. HF parameter names appear only in HF_NAMES below.
"""

import os
import sys
import tempfile

import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
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
# tokenizer files travel inside the checkpoint as {filename: text}, so an export can ship them

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')


def read_tokenizer_files(folder):
    files = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                files[name] = f.read()
    return files


def tokenizer_files_of(name_or_dir):
    """{filename: text} of a tokenizer given by a folder or a hub name; {} if it cannot be loaded."""
    if os.path.isdir(name_or_dir):
        files = read_tokenizer_files(name_or_dir)
        if files:
            return files
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return read_tokenizer_files(tmp)


# ----------------------------------------------------------------------------------------------

def export(ckpt_path, out_dir, atol=1e-4):
    """Write an HF MPNetForMaskedLM folder and check its logits against ours. Returns the max |diff|."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path).eval()
    c = model.config
    check_exportable(c)
    from transformers import MPNetForMaskedLM
    hf = MPNetForMaskedLM(hf_config(c, ckpt.get('special_ids'))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith('position_ids')]
    if missing or unexpected:
        raise ConvertError(f'internal: HF names do not match (missing {missing[:3]}, unexpected {unexpected[:3]})')
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    tok_files = ckpt.get('tokenizer_files') or {}
    if not tok_files and ckpt.get('config', {}).get('tokenizer'):
        tok_files = tokenizer_files_of(ckpt['config']['tokenizer'])
    for name, text in tok_files.items():
        with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
            f.write(text)
    if not tok_files:
        print('note: the checkpoint names no loadable tokenizer; the export holds the model only')

    # parity: reload the folder as a user would and compare logits on a padded sample batch
    reloaded = MPNetForMaskedLM.from_pretrained(out_dir).eval()
    ids, attention_mask = sample_batch(c)
    with torch.no_grad():
        ours = model.lm_logits(model.encode(ids, attention_mask))
        theirs = reloaded(input_ids=ids, attention_mask=attention_mask).logits
    keep = attention_mask.bool()
    diff = (ours[keep] - theirs[keep]).abs().max().item()
    print(f'wrote {out_dir} ({", ".join(sorted(os.listdir(out_dir)))}); max |logit diff| vs transformers: {diff:.2e}')
    if not diff < atol:
        raise ConvertError(f'exported model disagrees with ours: max |logit diff| {diff:.2e} >= {atol}')
    return diff


def sample_batch(config, B=2, T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = min(T, config.max_positions)
    ids = torch.randint(config.pad_id + 1, config.vocab_size, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    ids[1, T - 5:], attention_mask[1, T - 5:] = config.pad_id, 0  # a padded row
    return ids, attention_mask


def hf_to_checkpoint(name_or_dir):
    """HF MPNetForMaskedLM or MPNetModel (hub name or folder) -> a checkpoint dict train.py can start from."""
    if name_or_dir.startswith(('/', '.', '~')) and not os.path.isdir(name_or_dir):
        raise ConvertError(f"HF model folder '{name_or_dir}' not found (give a local folder or a hub name)")
    from transformers import AutoConfig, MPNetForMaskedLM
    try:
        hf_cfg = AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot load HF model '{name_or_dir}': {str(e).splitlines()[0]}")
    model_args = config_from_hf(hf_cfg)
    hf, info = MPNetForMaskedLM.from_pretrained(name_or_dir, output_loading_info=True)
    model = MPNet(MPNetConfig(**model_args))
    hf_sd = {k: v for k, v in hf.state_dict().items() if k not in info['missing_keys']}
    if from_hf_state_dict(hf_sd, model):
        print(f"note: '{name_or_dir}' has no MLM head (encoder-only MPNetModel); the head is initialised fresh")
    return {'model': model.state_dict(), 'model_args': model_args, 'config': {'init_from': name_or_dir},
            'iter_num': 0, 'best_val_loss': float('inf'), 'tokenizer_files': tokenizer_files_of(name_or_dir),
            'special_ids': {k: getattr(hf_cfg, k) for k in ('bos_token_id', 'pad_token_id', 'eos_token_id')}}


def import_hf(name_or_dir, ckpt_path, overwrite=False):
    if os.path.exists(ckpt_path) and not overwrite:
        raise ConvertError(f"'{ckpt_path}' already exists and may hold a trained model: choose another path, "
                           f"or pass --overwrite to replace it")
    ckpt = hf_to_checkpoint(name_or_dir)
    save_checkpoint(ckpt, ckpt_path)
    n_params = sum(t.numel() for t in ckpt['model'].values())
    print(f'wrote {ckpt_path} from {name_or_dir} ({n_params / 1e6:.1f}M parameters)')
    return ckpt


def main(argv):
    from_hf = [a.split('=', 1)[1] for a in argv if a.startswith('--from_hf=')]
    args = [a for a in argv if not a.startswith('--')]
    unknown = [a for a in argv if a.startswith('--') and not a.startswith('--from_hf=') and a != '--overwrite']
    if unknown:
        raise ConvertError(f'unknown option {unknown[0]} (usage: convert_hf.py CKPT OUT_DIR | convert_hf.py --from_hf=NAME CKPT)')
    if from_hf and len(args) == 1:
        import_hf(from_hf[0], args[0], overwrite='--overwrite' in argv)
    elif not from_hf and len(args) == 2:
        export(args[0], args[1])
    else:
        raise ConvertError('usage: python convert_hf.py CKPT OUT_DIR  |  python convert_hf.py --from_hf=NAME_OR_DIR CKPT')


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConvertError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
