"""
The whole test suite, CPU only, a few minutes on 2 cores:

    python -m pytest -q test_all.py

Fast code is compared with slow, obvious code: HF transformers for the plain encoder, loop-based
references written here for the two-stream masks and the permutation. Tiny real tokenizers and
corpora are built in the tests; the hubs are never contacted.
"""

import math
import os
import subprocess
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest
import torch
import torch.nn.functional as F

from model import MPNet, MPNetConfig, relative_position_bucket, two_stream_mask
import convert_hf

HERE = os.path.dirname(os.path.abspath(__file__))


def run_cli(*args, cwd=HERE, timeout=600):
    """Run a project script as a user would; returns the CompletedProcess."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc, *words):
    """Non-zero exit, one 'error:' line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('error:')]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ==============================================================================================
# model.py

def tiny_config(**kw):
    args = dict(vocab_size=101, n_layer=2, n_head=4, n_embd=32, n_inner=64, max_positions=64,
                dropout=0.0, attn_dropout=0.0)
    args.update(kw)
    return MPNetConfig(**args)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = MPNet(tiny_config(**kw)).eval()
    with torch.no_grad():  # perturb so that biases, norms and the padding rows are not trivially 0/1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def set_impl(model, impl):
    model.config.attn_impl = impl
    for block in model.blocks:
        block.attn.impl = impl


def two_stream_batch(B=2, T=37, P=6, V=101, seed=0):
    """A two-stream layout built here from a random permutation per row (independent of permute.py)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (B, T), generator=g)
    perm = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    corrupted = torch.randint(4, V, (B, P), generator=g)
    input_ids = torch.cat([tokens.gather(1, perm), corrupted, corrupted], dim=1)
    positions = torch.cat([perm, perm[:, T - P:], perm[:, T - P:]], dim=1)
    targets = tokens.gather(1, perm)[:, T - P:]
    return input_ids, positions, targets


def reference_visible(T, P):
    """DESIGN.md's rules, row by row: N non-predicted, originals x_1..x_P, mask copies m_1..m_P."""
    N = T - P
    vis = torch.zeros(T + 2 * P, T + P, dtype=torch.bool)
    for i in range(T + 2 * P):
        for j in range(T + P):
            if j < N:
                vis[i, j] = True  # everyone sees the non-predicted tokens
                continue
            is_x, k = (True, j - N + 1) if j < T else (False, j - T + 1)  # key is x_k or m_k
            if i < N or T <= i < T + P:  # non-predicted row, or content row of a mask copy
                vis[i, j] = not is_x
            elif i < T:  # content row of x_r
                r = i - N + 1
                vis[i, j] = k <= r if is_x else k > r
            else:  # query row r
                r = i - T - P + 1
                vis[i, j] = k < r if is_x else k >= r
    return vis


def reference_two_stream(model, input_ids, positions, P):
    """Per query row: the visible key set, scores + bias, softmax, weighted sum. Slow and obvious."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    c = model.config
    B, L = input_ids.shape
    T, S, hs = L - 2 * P, L - P, c.n_embd // c.n_head
    vis = reference_visible(T, P)
    x = model.ln_emb(model.wte(input_ids) + model.wpe(positions + 2))
    for block in model.blocks:
        q = block.attn.q(x)
        k, v = block.attn.kv(x[:, :S]).split(c.n_embd, dim=-1)
        out = torch.zeros_like(q)
        for b in range(B):
            for i in range(L):
                keys = vis[i].nonzero().flatten()
                dist = positions[b, keys] - positions[b, i]
                bias = model.rel_bias.weight[MPNetEncoder.relative_position_bucket(dist)]  # (n_keys, nh)
                for h in range(c.n_head):
                    sl = slice(h * hs, (h + 1) * hs)
                    scores = k[b, keys, sl] @ q[b, i, sl] / math.sqrt(hs) + bias[:, h]
                    out[b, i, sl] = torch.softmax(scores, dim=0) @ v[b, keys, sl]
        x = block.ln_1(x + block.attn.o(out))
        x = block.ln_2(x + block.mlp(x))
    return model.lm_logits(x[:, T + P:])


def test_two_stream_mask_matches_rules():
    for T, P in [(37, 6), (10, 1), (8, 8), (64, 10)]:
        assert torch.equal(two_stream_mask(T, P, torch.device('cpu')), reference_visible(T, P)), (T, P)


def test_two_stream_attention_matches_loop_reference():
    model = tiny_model(seed=0)
    input_ids, positions, targets = two_stream_batch(T=37, P=6)
    with torch.no_grad():
        slow = reference_two_stream(model, input_ids, positions, 6)
        for impl in ('sdpa', 'manual', 'flex'):
            set_impl(model, impl)
            fast = model(input_ids, positions, 6)[0]
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0, msg=impl)


def test_no_leakage_from_later_predictions():
    model = tiny_model(seed=1)
    T, P = 37, 6
    input_ids, positions, _ = two_stream_batch(B=1, T=T, P=P)
    with torch.no_grad():
        base = model(input_ids, positions, P)[0]
        for k in range(P):
            changed = input_ids.clone()
            changed[0, T - P + k] = (changed[0, T - P + k] + 7) % 97 + 4  # original x_k, not its mask copies
            out = model(changed, positions, P)[0]
            assert torch.equal(out[0, :k + 1], base[0, :k + 1]), f'query rows 0..{k} saw x_{k}'
            for later in range(k + 1, P):
                assert not torch.allclose(out[0, later], base[0, later]), f'query row {later} missed x_{k}'


def test_bucket_function_equals_hf():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    d = torch.arange(-600, 601)
    assert torch.equal(relative_position_bucket(d), MPNetEncoder.relative_position_bucket(d))
    d2 = d[None, :] - torch.arange(0, 50)[:, None]
    assert torch.equal(relative_position_bucket(d2), MPNetEncoder.relative_position_bucket(d2))


def test_impls_agree_and_bias_gets_gradients():
    input_ids, positions, targets = two_stream_batch(B=3, T=41, P=7, seed=3)
    outs = {}
    for impl in ('sdpa', 'manual', 'flex'):
        model = tiny_model(seed=2, attn_impl=impl)
        with torch.no_grad():
            outs[impl] = model(input_ids, positions, 7)[0]
    torch.testing.assert_close(outs['sdpa'], outs['manual'], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs['flex'], outs['manual'], atol=1e-5, rtol=0)
    grads = {}
    for impl in ('sdpa', 'manual'):  # FlexAttention has no backward on CPU
        model = tiny_model(seed=2, attn_impl=impl).train()
        _, loss = model(input_ids, positions, 7, targets)
        loss.backward()
        grads[impl] = model.rel_bias.weight.grad
        assert grads[impl].abs().sum() > 0
    torch.testing.assert_close(grads['sdpa'], grads['manual'], atol=1e-6, rtol=1e-4)


def test_padded_vocab_rows_never_predicted():
    model = tiny_model(seed=0)
    assert model.wte.weight.shape[0] == 128 and model.config.vocab_size == 101
    input_ids, positions, targets = two_stream_batch()
    logits, loss = model(input_ids, positions, 6, targets)
    assert logits.shape == (2, 6, 101)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_flop_count_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(seed=0, attn_impl='manual')
    input_ids, positions, targets = two_stream_batch(B=1, T=37, P=6)
    with FlopCounterMode(display=False) as counter:
        model(input_ids, positions, 6)
    assert model.estimate_flops(37, 6) == 3 * counter.get_total_flops()
    assert model.estimate_mfu(37, 6, 1.0, 'Some Unknown Accelerator') is None
    assert model.estimate_mfu(37, 6, 1e6, 'NVIDIA H100 80GB HBM3') == pytest.approx(3 * counter.get_total_flops() * 1e6 / 989e12)


def test_optimizer_groups_skip_decay_on_biases_and_norms():
    model = tiny_model()
    opt = model.configure_optimizers(0.01, 1e-3, (0.9, 0.98), 1e-6, 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.01 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.get_num_params()


def test_rope_model_trains_and_export_is_refused(tmp_path):
    torch.manual_seed(0)
    model = MPNet(tiny_config(rope=True)).train()
    assert not hasattr(model, 'wpe') and not hasattr(model, 'rel_bias')
    input_ids, positions, targets = two_stream_batch()
    opt = model.configure_optimizers(0.01, 3e-3, (0.9, 0.98), 1e-6, 'cpu')
    losses = []
    for _ in range(5):
        _, loss = model(input_ids, positions, 6, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]
    # positions matter: the same tokens under another permutation give other logits
    with torch.no_grad():
        model.eval()
        other = torch.cat([positions[:, :37].flip(1), positions[:, 37:]], dim=1)
        assert not torch.allclose(model(input_ids, positions, 6)[0], model(input_ids, other, 6)[0])
    ckpt = tmp_path / 'rope.pt'
    torch.save({'model': model.state_dict(), 'model_args': vars(tiny_config(rope=True))}, ckpt)
    proc = run_cli('convert_hf.py', str(ckpt), str(tmp_path / 'hf'))
    assert_clean_error(proc, 'rotary')
    assert not (tmp_path / 'hf').exists()


# ==============================================================================================
# convert_hf.py

def random_hf_mlm(seed=0, **kw):
    from transformers import MPNetForMaskedLM
    torch.manual_seed(seed)
    hf = MPNetForMaskedLM(convert_hf.hf_config(tiny_config(**kw))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def padded_batch(V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 29), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 20:], mask[1, 20:] = 1, 0
    ids[2, 9:], mask[2, 9:] = 1, 0
    return ids, mask


def test_hf_import_plain_path_and_export_roundtrip(tmp_path):
    from transformers import MPNetForMaskedLM
    hf = random_hf_mlm(seed=0)
    hf.save_pretrained(tmp_path / 'hf_in')
    ckpt = tmp_path / 'ckpt.pt'
    proc = run_cli('convert_hf.py', f'--from_hf={tmp_path / "hf_in"}', str(ckpt))
    assert proc.returncode == 0, proc.stderr
    _, model = convert_hf.load_checkpoint(str(ckpt))
    ids, mask = padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        for impl in ('sdpa', 'manual', 'flex'):
            set_impl(model, impl)
            ours = model.lm_logits(model.encode(ids, mask))
            assert (ours[keep] - theirs[keep]).abs().max() < 1e-4, impl
    proc = run_cli('convert_hf.py', str(ckpt), str(tmp_path / 'hf_out'))
    assert proc.returncode == 0, proc.stderr
    assert 'max |logit diff|' in proc.stdout
    assert (tmp_path / 'hf_out' / 'model.safetensors').exists()
    back = MPNetForMaskedLM.from_pretrained(tmp_path / 'hf_out').eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits
    assert (again[keep] - theirs[keep]).abs().max() < 1e-5


def test_import_encoder_only_model_gets_fresh_head(tmp_path):
    from transformers import MPNetModel
    torch.manual_seed(1)
    enc = MPNetModel(convert_hf.hf_config(tiny_config()), add_pooling_layer=True).eval()  # sentence-embedding style
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    enc.save_pretrained(tmp_path / 'enc')
    proc = run_cli('convert_hf.py', f'--from_hf={tmp_path / "enc"}', str(tmp_path / 'ckpt.pt'))
    assert proc.returncode == 0, proc.stderr
    assert 'no MLM head' in proc.stdout
    _, model = convert_hf.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model.encode(ids, mask)
        theirs = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() < 1e-4
    torch.testing.assert_close(model.head_ln.weight, torch.ones_like(model.head_ln.weight))  # fresh init


@pytest.mark.parametrize('change, words', [({'rel_buckets': 64}, '32'), ({'pad_id': 0}, 'padding_idx')])
def test_export_refuses_what_hf_cannot_represent(tmp_path, change, words):
    model = MPNet(tiny_config(**change))
    ckpt = tmp_path / 'c.pt'
    torch.save({'model': model.state_dict(), 'model_args': vars(tiny_config(**change))}, ckpt)
    assert_clean_error(run_cli('convert_hf.py', str(ckpt), str(tmp_path / 'out')), words)


def test_export_missing_checkpoint_and_bad_usage(tmp_path):
    assert_clean_error(run_cli('convert_hf.py', str(tmp_path / 'nope.pt'), str(tmp_path / 'out')), 'not found')
    assert_clean_error(run_cli('convert_hf.py', str(tmp_path / 'nope.pt')), 'usage')
    assert_clean_error(run_cli('convert_hf.py', f'--from_hf={tmp_path / "missing"}', str(tmp_path / 'c.pt')), 'missing')
