"""
The whole test suite, CPU only, about 4 minutes on 2 cores:

    python -m pytest -q -n 2 --dist loadgroup test_all.py

Fast code is compared with slow, obvious code: HF transformers for the plain encoder, loop-based
references written here for the two-stream masks and the permutation. Tiny real tokenizers and
corpora are built in the tests; the hubs are never contacted.
"""

import argparse
import contextlib
import csv
import functools
import gc
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import pathlib
import random
import re
import resource
import runpy
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# `pytest -n N` on C cores: each worker, and every script it runs, gets C // N threads. N workers of C threads each
# fight over the same cores (the suite's seven slowest tests, -n 2 on 2 cores: 134 s with 2 threads each, 96 s with 1)
_cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
os.environ.setdefault('OMP_NUM_THREADS', str(max(1, _cores // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))))

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import data
from permute import n_pred, permute_batch, vocab_tables
from model import MPNet, MPNetConfig, empty_rows, layout, relative_position_bucket, two_stream_mask
import checkpoint
import configurator
import contrastive
import pairs as pairs_py  # (a test's own `pairs` is its list of text pairs)
import convert_hf
import evaluation
import finetune
import plot

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))  # torch may have been imported before the line above
HERE = os.path.dirname(os.path.abspath(__file__))
# CPU FlexAttention runs unfused (no torch.compile) by design here: forward parity only
pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')


def run_cli(*args, cwd=HERE, timeout=600):
    """Run a project script as a user would; returns the CompletedProcess."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_here(script, *args):
    """Run a project script in this process (runpy, as `python script args` from the project folder): the same
    code as a subprocess without a fresh torch import (~3 s of CPU each). What a process would start afresh is
    set as python sets it (the data root, warning filters) and put back after (signal handlers, torch's RNG and
    threads), so tests that run after see no trace of it. An exception other than SystemExit comes back as a
    traceback on stderr, as it would from python. Runs that must be signalled or killed use run_cli."""
    out, err, argv, cwd, code = io.StringIO(), io.StringIO(), sys.argv, os.getcwd(), 0
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    rng, threads, data_root = torch.get_rng_state(), torch.get_num_threads(), data.DATA_ROOT
    # loggers (transformers') write to the stream they were given at import: send them to this run's stderr
    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    streams = {h: h.stream for l in loggers for h in l.handlers if type(h) is logging.StreamHandler}
    sys.argv = [script, *args]
    os.chdir(HERE)
    for h in streams:
        h.stream = err  # not setStream: it flushes the old stream, which a finished test may have closed
    data.DATA_ROOT = 'data'  # data.py's default, relative to the project folder (a fixture may have moved it)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # python's own filters: a warning shows once per run, as in a fresh process
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter('ignore', category)
            warnings.filterwarnings('default', category=DeprecationWarning, module='__main__')
            runpy.run_path(os.path.join(HERE, script), run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
        data.DATA_ROOT = data_root
        for h, stream in streams.items():
            h.stream = stream
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
        for name in [k for k, m in sys.modules.items() if getattr(m, '__file__', None) == os.path.join(HERE, script)]:
            del sys.modules[name]  # '__mp_main__': multiprocess (imported by datasets) keeps the script's module
    gc.collect()  # the script's globals (an out_dir lock among them) go, as they would with its process
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_clean_error(proc, *words):
    """Non-zero exit, one 'error:' line on stderr naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('error:')]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def calling(function, *args):
    """The arguments of a python that runs `function(*args)`, a function of this file, in a process of its own:
    `python -c` imports test_all (about 0.4 s of CPU more than importing torch alone) and calls it with args as
    strings. For a script that must be a process: one that is signalled, killed, time-boxed or limited."""
    code = f'import sys; sys.path.insert(0, {HERE!r}); import test_all; test_all.{function.__name__}(*sys.argv[1:])'
    return ['-c', code, *map(str, args)]


# ===== helpers and fixtures that several sections use (a helper of one section is in that section) =====

# ---- tiny models, HF models and checkpoints made here

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


def load_model(path):
    path = str(path)
    return checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path), path).eval()


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


def small_checkpoint(path, tokenizer_files=None, vocab_size=None):
    """A checkpoint as train.py writes one (weights, model_args, the tokenizer's files as text)."""
    vocab_size = vocab_size or len(hf_wordpiece())
    model = tiny_model(vocab_size=vocab_size)
    if tokenizer_files is None:
        with tempfile.TemporaryDirectory() as tok_dir:
            hf_wordpiece().save_pretrained(tok_dir)
            tokenizer_files = convert_hf.read_tokenizer_files(tok_dir)
    torch.save({'model': model.state_dict(), 'model_args': vars(tiny_config(vocab_size=vocab_size)),
                'tokenizer_files': tokenizer_files, 'iter_num': 7}, path)
    return path


# ---- tokenizers and text made up here; the objectives

TOKENIZER_SPECIALS = ['<s>', '<pad>', '</s>', '<unk>']  # MPNet/fairseq order: bos 0, pad 1, eos 2, unk 3; <mask> last


def sentences(n=400, seed=0):
    """English-ish text whose made-up words are long enough to be split into sub-words."""
    rng = random.Random(seed)
    syllables = 'ka ri to men sa lo ver un der stand ing tion al pre fix ed ly ness ful re'.split()
    words = [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(150)]
    out = []
    for _ in range(n):
        s = ' '.join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        out.append(s.capitalize() + rng.choice(['.', '!', ', ok.']))
    return out


def fit_tokenizer(model, trainer, pre_tokenizer, normalizer=None, decoder=None):
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    tok.train_from_iterator(sentences(), trainer)
    tok.add_special_tokens(['<mask>'])
    return tok


@functools.cache
def wordpiece():
    return fit_tokenizer(models.WordPiece(unk_token='<unk>'),
                 trainers.WordPieceTrainer(vocab_size=200, special_tokens=TOKENIZER_SPECIALS),
                 pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True),
                 decoders.WordPiece())


@functools.cache
def hf_wordpiece():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece(), bos_token='<s>', pad_token='<pad>',
                                   eos_token='</s>', unk_token='<unk>', mask_token='<mask>')


@functools.cache
def tables():
    return vocab_tables(hf_wordpiece())


def blocks(B, T, seed=0):
    """Packed blocks as data.py makes them: '<s>' then documents joined by '</s>', cut at T tokens.
    Row 0 starts mid-word, which whole-word permutation must survive."""
    tok, rng = wordpiece(), random.Random(seed)
    stream = []
    for s in sentences(60, seed=seed + 1):
        stream += tok.encode(s).ids + [2]
    is_word_start = tables()[0]
    mid_word = [i for i in range(1, len(stream) - T) if not is_word_start[stream[i]]]
    starts = [mid_word[0]] + [rng.randrange(len(stream) - T) for _ in range(B - 1)]
    return torch.tensor([stream[i:i + T] for i in starts])


OBJECTIVE_NAMES = ('mpnet', 'plm', 'mlm')


# ---- a small train.py run, copied by the tests that change it

SMALL = ['--n_layer=2', '--n_head=2', '--n_embd=64', '--n_inner=128', '--batch_size=8', '--block_size=64',
         '--eval_iters=2', '--log_interval=5', '--warmup_iters=5', '--curves=False']


def train(out_dir, *args):
    """`python train.py config/tiny.py --out_dir=... args`, in this process (run_here)."""
    return run_here('train.py', 'config/tiny.py', f'--out_dir={out_dir}', *args)


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    """A run folder of SMALL trained 10 iterations (checkpoints at 5 and 10); tests work on copies."""
    folder = tmp_path_factory.mktemp('small_run')
    proc = train(folder, *SMALL, '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=40')
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def copy_run(small_run, folder):
    shutil.copytree(small_run, folder, dirs_exist_ok=True)
    return folder


# ---- the pydocs corpus and a tokenizer trained on it; corpora and training logs written here

@pytest.fixture(scope='session')
def env(tmp_path_factory):
    """DATA_ROOT and the datasets cache in a temp folder; the pydocs corpus built through the real builder;
    a small WordPiece vocab trained on part of it (the full corpus is exercised by `python data.py`)."""
    import datasets
    root = tmp_path_factory.mktemp('data')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'DATA_ROOT', str(root))
        mp.setattr(datasets.config, 'HF_DATASETS_CACHE', root / 'hf_cache')
        pydocs = data.build_pydocs()
        docs = [json.loads(line)['text'] for line in open(pydocs, encoding='utf-8')]
        tok = data.train_tokenizer(iter(docs[:2500]), vocab_size=2000)
        tok.save_pretrained(root / 'tok')
        yield types.SimpleNamespace(root=root, pydocs=pydocs, docs=docs, tok_dir=str(root / 'tok'))


def write_jsonl(path, texts, field='text'):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps({field: t}) + '\n' for t in texts)
    return str(path)


def good(i, **kw):
    return json.dumps(dict(iter=i, loss=5 - i / 10, acc=0.1 + i / 100, lr=1e-3, tokens_per_sec=1000.0, mfu=None, **kw))


def write_log(folder, lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'metrics.jsonl'), 'wb') as f:
        f.write(b''.join((l if isinstance(l, bytes) else l.encode()) + b'\n' for l in lines))
    return folder


# ---- sentence-transformers folders

def st_folder(path, tok_dir, pooling='cls', max_seq_length=40, legacy=False, seed=3):
    """A small sentence-transformers MPNet folder, Transformer -> Pooling -> Normalize with a non-default
    max_seq_length: written by sentence-transformers itself, or (legacy=True) by hand in the 2.x layout
    that all-mpnet-base-v2 ships with (modules.json types sentence_transformers.models.*, no Normalize folder)."""
    from transformers import AutoTokenizer, MPNetModel
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = MPNetModel(convert_hf.hf_config(tiny_config(vocab_size=len(tok))), add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if legacy:
        enc.save_pretrained(path)
        tok.save_pretrained(path)
        modules = [dict(idx=i, name=str(i), path=p, type=f'sentence_transformers.models.{t}')
                   for i, (p, t) in enumerate([('', 'Transformer'), ('1_Pooling', 'Pooling'), ('2_Normalize', 'Normalize')])]
        (path / '1_Pooling').mkdir()
        files = {'modules.json': modules, 'sentence_bert_config.json': dict(max_seq_length=max_seq_length, do_lower_case=False),
                 'config_sentence_transformers.json': {'__version__': {'sentence_transformers': '2.0.0'}},
                 '1_Pooling/config.json': dict(word_embedding_dimension=32, pooling_mode_cls_token=pooling == 'cls',
                                               pooling_mode_mean_tokens=pooling == 'mean', pooling_mode_max_tokens=False,
                                               pooling_mode_mean_sqrt_len_tokens=False)}
        for name, content in files.items():
            (path / name).write_text(json.dumps(content, indent=2))
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        enc.save_pretrained(path.parent / f'{path.name}-hf')
        tok.save_pretrained(path.parent / f'{path.name}-hf')
        t = Transformer(str(path.parent / f'{path.name}-hf'), max_seq_length=max_seq_length)
        SentenceTransformer(modules=[t, Pooling(t.get_embedding_dimension(), pooling), Normalize()]).save(str(path))
    return path


def st_embeddings(folder, texts):
    from sentence_transformers import SentenceTransformer
    with convert_hf.quiet_transformers():
        st = SentenceTransformer(str(folder), device='cpu')
    return st, st.encode(texts, convert_to_tensor=True)


# ---- a contrastive.py run on a tiny corpus, shared by the tests that read or copy it

def topic_docs(n, seed=0):
    """Documents of made-up words, each drawing 40% of its words from 8 words of its own: the two halves of a
    document share words that other documents rarely use, so that finding a document's other half can be learned."""
    rng = random.Random(seed)
    syllables = 'ka ri to men sa lo ver un der stand ing tion al pre fix ed ly ness ful re'.split()
    words = sorted({''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)})
    docs = []
    for _ in range(n):
        topic = rng.sample(words, 8)
        docs.append(' '.join(' '.join(rng.choice(topic) if rng.random() < 0.4 else rng.choice(words)
                                      for _ in range(rng.randint(6, 10))).capitalize() + '.' for _ in range(rng.randint(4, 6))))
    return docs


def write_rows(path, rows):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(path)


CONTRASTIVE_RUN = ['--pairs=halves', '--max_iters=40', '--log_interval=10', '--batch_size=16', '--learning_rate=1e-3',
       '--warmup_iters=5', '--max_len=64', '--val_frac=0.25', '--device=cpu', '--dtype=float32', '--curves=False']


def contrastive_here(*args):
    """contrastive.py run in this process (test_all.run_here), then its signal handlers put back as they were."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_here('contrastive.py', *args)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def contrastive_cli(folder, *args, popen=False):
    command = ['contrastive.py', str(folder / 'start.pt'), f'--dataset={folder / "corpus.jsonl"}', *args]
    if popen:  # a process of its own, to be signalled
        env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONUNBUFFERED': '1',
               'HF_DATASETS_CACHE': str(folder / 'hf_cache')}
        return subprocess.Popen([sys.executable, *command], cwd=HERE, env=env, stdout=open(folder / 'stdout.txt', 'w'),
                                stderr=open(folder / 'stderr.txt', 'w'), text=True)
    import datasets
    with pytest.MonkeyPatch.context() as mp:  # in this process (run_here), with the same datasets cache
        mp.setattr(datasets.config, 'HF_DATASETS_CACHE', str(folder / 'hf_cache'))
        return run_here(*command)


@pytest.fixture(scope='module')
def contrastive_run(tmp_path_factory):
    """A checkpoint of this project (a random tiny MPNet with its tokenizer), a corpus, and a run of 40 steps on the
    halves of its documents, evaluated every 20."""
    folder = tmp_path_factory.mktemp('contrastive')
    write_rows(folder / 'corpus.jsonl', [{'text': d} for d in topic_docs(600)])
    small_checkpoint(folder / 'start.pt')
    proc = contrastive_cli(folder, *CONTRASTIVE_RUN, f'--out_dir={folder / "out"}', '--eval_interval=20')
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder / 'run.stdout').write_text(proc.stdout)
    return folder


# ---- a private mount namespace (a small or read-only tmpfs)

def in_private_mount(script):
    """Run a shell script in a private mount namespace (unshare -m, root only), where it may mount a
    small or read-only tmpfs; None where this machine does not allow it."""
    if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode != 0:
        return None
    return subprocess.run(['unshare', '-m', 'sh', '-ec', script], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


# ===== model.py: the two-stream encoder against HF MPNet and loop references; kernels, objectives, compile =====

# ---- the two-stream mask and attention against a loop reference; the kernels agree, compiled and on CUDA

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


def test_two_stream_mask_matches_rules():
    for T, P in [(37, 6), (10, 1), (8, 8), (64, 10)]:
        assert torch.equal(two_stream_mask(T, P, torch.device('cpu')), reference_visible(T, P)), (T, P)


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


def reference_visible_rows(T, P, objective):
    """Who sees whom, row by row, from each objective's definition (mpnet: DESIGN.md, as reference_visible).
    plm (XLNet): content x_r sees the non-predicted and x_1..x_r, query r sees the non-predicted and
    x_1..x_{r-1}, a non-predicted token sees the non-predicted; mlm (BERT): everyone sees everyone."""
    if objective == 'mpnet':
        return reference_visible(T, P)
    if objective == 'mlm':
        return torch.ones(T, T, dtype=torch.bool)
    N = T - P
    vis = torch.zeros(T + P, T, dtype=torch.bool)
    for i in range(T + P):
        for j in range(T):
            if j < N:
                vis[i, j] = True
            elif N <= i < T:  # content row of x_r sees x_k for k <= r
                vis[i, j] = j <= i
            elif i >= T:  # query row r sees x_k for k < r
                vis[i, j] = j - N < i - T
    return vis


def reference_forward(model, input_ids, positions, P, objective, docs=None):
    """Per row: the keys its objective lets it see (and, with docs, only its own document's), scores +
    bias, softmax, weighted sum; a row with no key left gets no attention output. Slow and obvious."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    c = model.config
    B, L = input_ids.shape
    T = {'mpnet': L - 2 * P, 'plm': L - P, 'mlm': L}[objective]
    S, hs = {'mpnet': T + P, 'plm': T, 'mlm': T}[objective], c.n_embd // c.n_head
    vis = reference_visible_rows(T, P, objective)
    x = model.ln_emb(model.wte(input_ids) + model.wpe(positions + 2))
    for block in model.blocks:
        q = block.attn.q(x)
        k, v = block.attn.kv(x[:, :S]).split(c.n_embd, dim=-1)
        out = torch.zeros_like(q)
        for b in range(B):
            for i in range(L):
                keys = [j for j in range(S) if vis[i, j] and (docs is None or docs[b, j] == docs[b, i])]
                if not keys:
                    continue
                keys = torch.tensor(keys)
                bias = model.rel_bias.weight[MPNetEncoder.relative_position_bucket(positions[b, keys] - positions[b, i])]
                for h in range(c.n_head):
                    sl = slice(h * hs, (h + 1) * hs)
                    scores = k[b, keys, sl] @ q[b, i, sl] / math.sqrt(hs) + bias[:, h]
                    out[b, i, sl] = torch.softmax(scores, dim=0) @ v[b, keys, sl]
        x = block.ln_1(x + block.attn.o(out))
        x = block.ln_2(x + block.mlp(x))
    return model.lm_logits(x[:, L - P:])


def test_two_stream_attention_matches_loop_reference():
    model = tiny_model(seed=0)
    input_ids, positions, targets = two_stream_batch(T=37, P=6)
    with torch.no_grad():
        slow = reference_forward(model, input_ids, positions, 6, 'mpnet')  # (the loop reference above)
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


def test_sdpa_trains_the_bias_only_with_backends_that_differentiate_the_mask():
    # cuDNN and flash SDPA return no gradient for attn_mask; with the bias learned, they must be off
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
            return func(*args, **(kwargs or {}))
    model = tiny_model(seed=0, attn_impl='sdpa').train()
    input_ids, positions, targets = two_stream_batch()
    with Watch():
        model(input_ids, positions, 6, targets)[1].backward()
    assert len(seen) == 2 and set(seen) == {(False, False, True, True)}
    assert model.rel_bias.weight.grad.abs().sum() > 0
    seen.clear()
    with Watch(), torch.no_grad():  # no bias gradient (evaluation): every backend stays allowed
        model(input_ids, positions, 6)
    assert set(seen) == {(True, True, True, True)}


def test_flex_with_grad_checkpoint_is_refused():
    # its bias gradient comes out NaN (FlexAttention recomputed under checkpoint), so it is not offered
    with pytest.raises(ValueError, match='grad_checkpoint'):
        tiny_config(attn_impl='flex', grad_checkpoint=True)
    tiny_config(attn_impl='flex', grad_checkpoint=True, rope=True)  # no captured bias: fine


def test_grad_checkpoint_gives_the_same_gradients():
    input_ids, positions, targets = two_stream_batch()
    grads = []
    for recompute in (False, True):
        model = tiny_model(seed=4, grad_checkpoint=recompute).train()
        model(input_ids, positions, 6, targets)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def objective_batch(objective, doc_mask, B=3, T=37, seed=0, **kw):
    is_word_start, is_special = tables()
    tokens = blocks(B, T, seed=seed)
    return permute_batch(tokens, is_word_start, is_special, hf_wordpiece().mask_token_id, torch.Generator().manual_seed(seed),
                         objective=objective, eos_id=2 if doc_mask else None, **kw)


@pytest.mark.parametrize('impl, grad_checkpoint, objective, doc_mask', [
    ('sdpa', False, 'mpnet', False), ('sdpa', True, 'mpnet', False), ('manual', False, 'mpnet', False),
    ('flex', False, 'mpnet', False), ('sdpa', False, 'plm', True), ('flex', False, 'mlm', True),
    ('manual', False, 'mlm', False)])
def test_whole_model_compiles_as_one_graph_once(impl, grad_checkpoint, objective, doc_mask):
    # fullgraph=True makes any graph break an error; a recording backend counts compilations. Dynamo
    # traces on the CPU as on the GPU (the backend is the only device-specific part). A (T, P) no
    # other test uses, so the mask cache starts empty as in train.py. With doc_mask the mask (flex: the
    # block mask) is built from each batch inside the graph, still one graph.
    T, P = 53, 8
    graphs = []
    torch._dynamo.reset()  # the earlier cases' compilations count towards dynamo's recompile limit for forward
    model = tiny_model(seed=5, attn_impl=impl, grad_checkpoint=grad_checkpoint, objective=objective,
                       vocab_size=201).train(impl != 'flex')
    model.build_masks(T, P, 'cpu')
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    for seed in range(3):
        input_ids, positions, targets, *docs = objective_batch(objective, doc_mask, B=2, T=T, seed=seed)
        docs = docs[0] if docs else None
        with torch.set_grad_enabled(impl != 'flex'):  # FlexAttention has no backward on CPU
            logits, loss = compiled(input_ids, positions, P, targets, docs=docs)
        if impl != 'flex':
            loss.backward()
    assert len(graphs) == 1  # no recompilation across steps: masks come from the cache, shapes are static
    with torch.no_grad():  # the traced graph computes what the eager model computes
        model.eval()
        torch.testing.assert_close(compiled(input_ids, positions, P, docs=docs)[0],
                                   model(input_ids, positions, P, docs=docs)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bf16_sdpa_and_flex_agree_with_manual():
    # mpnet-base in bf16, forward + backward: sdpa (eager and compiled, whichever kernel PyTorch picks)
    # and compiled flex against the manual softmax(QK^T/sqrt(d) + bias) V in fp32 softmax (GPU only)
    input_ids, positions, targets = (t.cuda() for t in two_stream_batch(B=8, T=512, P=77, V=30527, seed=0))
    out = {}
    for impl, compiled in (('manual', False), ('sdpa', False), ('sdpa', True), ('flex', True)):
        torch.manual_seed(0)
        model = MPNet(MPNetConfig(attn_impl=impl, dropout=0.0, attn_dropout=0.0)).cuda()
        model.build_masks(512, 77, 'cuda')
        step = torch.compile(model) if compiled else model
        with torch.autocast('cuda', dtype=torch.bfloat16):
            logits, loss = step(input_ids, positions, 77, targets)
        loss.backward()
        out[impl, compiled] = logits.float(), model.rel_bias.weight.grad.float(), model.wte.weight.grad.float()
    ref = out['manual', False]
    assert ref[1].abs().sum() > 0
    for key in (('sdpa', False), ('sdpa', True), ('flex', True)):
        logit_diff = (out[key][0] - ref[0]).abs().max().item()
        grad_err = [((out[key][i] - ref[i]).norm() / ref[i].norm()).item() for i in (1, 2)]
        print(f'{key}: max |logit diff| {logit_diff:.3e}, relative grad error rel_bias {grad_err[0]:.3e}, wte {grad_err[1]:.3e}')
        assert logit_diff < 0.1 and max(grad_err) < 0.05, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_objectives_with_doc_mask_agree_and_do_not_sync():
    # each objective under doc_mask in bf16: eager sdpa and compiled flex (its per-batch block mask built on
    # the device) against manual, logits and the bias gradient; no host sync in a step (GPU only)
    is_word_start, is_special = (t.cuda() for t in tables())
    tokens = blocks(8, 512).cuda()
    for objective in ('mpnet', 'plm', 'mlm'):
        input_ids, positions, targets, docs = permute_batch(tokens, is_word_start, is_special, 200,
                                                            torch.Generator('cuda').manual_seed(0),
                                                            objective=objective, eos_id=2)
        out = {}
        for impl, compiled in (('manual', False), ('sdpa', False), ('flex', True)):
            torch.manual_seed(0)
            model = MPNet(MPNetConfig(vocab_size=201, attn_impl=impl, dropout=0.0, attn_dropout=0.0,
                                      objective=objective)).cuda()
            model.build_masks(512, 77, 'cuda')
            step = torch.compile(model) if compiled else model
            for sync_check in (False, True):  # the second step runs warm, under the sync check
                model.zero_grad()
                torch.cuda.set_sync_debug_mode('error' if sync_check else 'default')
                try:
                    with torch.autocast('cuda', dtype=torch.bfloat16):
                        logits, loss = step(input_ids, positions, 77, targets, docs=docs)
                    loss.backward()
                finally:
                    torch.cuda.set_sync_debug_mode('default')
            out[impl] = logits.float(), model.rel_bias.weight.grad.float()
        for impl in ('sdpa', 'flex'):
            logit_diff = (out[impl][0] - out['manual'][0]).abs().max().item()
            grad_err = ((out[impl][1] - out['manual'][1]).norm() / out['manual'][1].norm()).item()
            print(f'{objective} {impl}: max |logit diff| {logit_diff:.3e}, relative rel_bias grad error {grad_err:.3e}')
            assert logit_diff < 0.1 and grad_err < 0.05, (objective, impl)


# ---- the head, the FLOP count, the optimizer groups, rotary positions and an extended position table

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
    assert model.estimate_mfu(37, 6, 1e6, 'NVIDIA H200 NVL') == pytest.approx(3 * counter.get_total_flops() * 1e6 / 835e12)
    assert model.estimate_mfu(37, 6, 1e6, 'NVIDIA H100 80GB HBM3') == pytest.approx(3 * counter.get_total_flops() * 1e6 / 989e12)
    # at long contexts too, where attention's share grows with T (bench.py prints both counts)
    long = tiny_model(seed=0, attn_impl='manual', max_positions=2048)
    for T in (512, 1024, 2048):
        P = n_pred(T)
        input_ids, positions, _ = two_stream_batch(B=1, T=T, P=P)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            long(input_ids, positions, P)
        assert long.estimate_flops(T, P) == 3 * counter.get_total_flops(), T


def test_optimizer_groups_skip_decay_on_biases_and_norms():
    model = tiny_model()
    opt = model.configure_optimizers(0.01, 1e-3, (0.9, 0.98), 1e-6, 'cpu')
    for decay, no_decay in (opt.param_groups[:2], opt.param_groups[2:]):
        assert decay['weight_decay'] == 0.01 and no_decay['weight_decay'] == 0.0 and decay['part'] == no_decay['part']
        assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() == 1 for p in no_decay['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.get_num_params()
    head = [p for g in opt.param_groups if g['part'] == 'head' for p in g['params']]
    assert {id(p) for p in head} == {id(p) for p in model.head_parameters()}
    assert id(model.head_dense.weight) in map(id, head) and id(model.wte.weight) not in map(id, head)  # tied decoder


def test_a_head_training_alone_costs_only_the_heads_backward_with_the_same_gradients():
    model = tiny_model(seed=2)
    model.train()
    input_ids, positions, targets = two_stream_batch(T=37, P=6)[:3]
    grads = []
    for head_only in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        model(input_ids, positions, 6, targets, head_only=head_only)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    head = {n for n, p in model.named_parameters() if any(p is h for h in model.head_parameters())}
    assert all(grads[1][n] is None for n in grads[1] if n not in head)  # no graph through the encoder, nor wte
    for n in head:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


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
    proc = run_here('convert_hf.py', str(ckpt), str(tmp_path / 'hf'))
    assert_clean_error(proc, 'rotary')
    assert not (tmp_path / 'hf').exists()


def test_extended_positions_leave_outputs_up_to_the_old_length_unchanged():
    from model import extend_positions
    model = tiny_model(seed=2, max_positions=24)
    sd = extend_positions(model.state_dict(), model.config, 61)  # not a multiple: the last copy is cut
    longer = MPNet(tiny_config(max_positions=61)).eval()
    longer.load_state_dict(sd)
    first = model.config.pad_id + 1
    assert torch.equal(sd['wpe.weight'][:first + 24], model.state_dict()['wpe.weight'])
    torch.testing.assert_close(sd['wpe.weight'][first + 24 + 5], model.wpe.weight[first + 5], rtol=0, atol=0)
    torch.testing.assert_close(sd['wpe.weight'][first + 48 + 12], model.wpe.weight[first + 12], rtol=0, atol=0)
    ids, mask = (t[:, :24] for t in padded_batch())
    with torch.no_grad():  # the plain path (HF's) and the two-stream path, at the old length and below
        assert torch.equal(model.encode(ids, mask), longer.encode(ids, mask))
        batch = two_stream_batch(B=2, T=24, P=4)
        assert torch.equal(model(*batch[:2], 4)[0], longer(*batch[:2], 4)[0])


# ---- the three objectives (mpnet, plm, mlm) and doc_mask: who sees whom, against a loop reference in every kernel

def test_visibility_of_each_objective_matches_its_definition():
    for objective in OBJECTIVE_NAMES:
        for T, P in [(37, 6), (10, 1), (8, 8), (23, 4)]:
            assert torch.equal(two_stream_mask(T, P, torch.device('cpu'), objective),
                               reference_visible_rows(T, P, objective)), (objective, T, P)


def lonely_rows(objective, T, P, docs):
    vis = reference_visible_rows(T, P, objective)
    S = vis.size(1)
    return [(b, i) for b in range(docs.size(0)) for i in range(vis.size(0))
            if not any(vis[i, j] and docs[b, j] == docs[b, i] for j in range(S))]


@pytest.mark.parametrize('objective', OBJECTIVE_NAMES)
@pytest.mark.parametrize('doc_mask', [False, True])
def test_each_objective_matches_loop_reference_in_every_impl(objective, doc_mask):
    T, P = 37, 6
    if objective == 'plm' and doc_mask:
        # a block whose short last document is predicted whole: its first query row has nothing to see
        seed = next(s for s in range(200) if lonely_rows('plm', T, P, objective_batch('plm', True, B=1, seed=s)[3]))
        batch = objective_batch('plm', True, B=1, seed=seed)
        assert lonely_rows('plm', T, P, batch[3])
    else:
        batch = objective_batch(objective, doc_mask)
    input_ids, positions, targets = batch[:3]
    docs = batch[3] if doc_mask else None
    model = tiny_model(seed=0, objective=objective, vocab_size=201)
    with torch.no_grad():
        slow = reference_forward(model, input_ids, positions, P, objective, docs)
        for impl in ('sdpa', 'manual', 'flex'):
            set_impl(model, impl)
            fast = model(input_ids, positions, P, docs=docs)[0]
            assert torch.isfinite(fast).all()
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0, msg=impl)
    for impl in ('sdpa', 'manual'):  # gradients are finite and the bias learns (FlexAttention: no CPU backward)
        model = tiny_model(seed=0, objective=objective, attn_impl=impl, vocab_size=201).train()
        model(input_ids, positions, P, targets, docs=docs)[1].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.rel_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('objective', OBJECTIVE_NAMES)
def test_doc_mask_no_logit_depends_on_another_document(objective):
    T, P = 37, 6
    input_ids, positions, targets, docs = objective_batch(objective, True, B=4, seed=1)
    L = input_ids.size(1)
    pred_docs = docs[:, L - P:]
    model = tiny_model(seed=3, objective=objective, vocab_size=201)
    with torch.no_grad():
        base = model(input_ids, positions, P, docs=docs)[0]
        changed_any = False
        for b in range(4):
            for d in pred_docs[b].unique().tolist():
                other = input_ids.clone()
                other[b][docs[b] != d] = (other[b][docs[b] != d] + 11) % 190 + 5  # every token of the other documents
                out = model(other, positions, P, docs=docs)[0]
                mine = pred_docs[b] == d
                assert torch.equal(out[b][mine], base[b][mine]), (b, d)
                unmasked = model(other, positions, P)[0]  # without doc_mask the documents do see each other
                changed_any |= not torch.allclose(unmasked[b][mine], model(input_ids, positions, P)[0][b][mine])
        assert changed_any


def test_plm_query_never_sees_its_token_or_later_ones():
    T, P = 37, 6
    input_ids, positions, _ = objective_batch('plm', False, B=1, seed=4)
    assert (input_ids[:, T:] == hf_wordpiece().mask_token_id).all()  # the query stream carries <mask> and a position, never a token
    model = tiny_model(seed=1, objective='plm', vocab_size=201)
    with torch.no_grad():
        base = model(input_ids, positions, P)[0]
        for k in range(P):
            changed = input_ids.clone()
            changed[0, T - P + k] = (changed[0, T - P + k] + 7) % 97 + 4  # the original x_k in the content stream
            out = model(changed, positions, P)[0]
            assert torch.equal(out[0, :k + 1], base[0, :k + 1]), f'query rows 0..{k} saw x_{k}'
            for later in range(k + 1, P):
                assert not torch.allclose(out[0, later], base[0, later]), f'query row {later} missed x_{k}'


def test_flop_count_of_each_objective_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    for objective in OBJECTIVE_NAMES:
        model = tiny_model(seed=0, attn_impl='manual', objective=objective, vocab_size=201)
        input_ids, positions, _ = objective_batch(objective, False, B=1)
        with FlopCounterMode(display=False) as counter:
            model(input_ids, positions, 6)
        assert model.estimate_flops(37, 6) == 3 * counter.get_total_flops(), objective


# ---- a query row with nothing to see (every token predicted): no NaN, in any kernel or objective

def test_rows_with_nothing_to_see_are_known_when_the_table_is_built():
    cpu = torch.device('cpu')
    for objective in OBJECTIVE_NAMES:
        assert empty_rows(37, 6, cpu, objective) is None  # the usual path: nothing to handle, nothing paid
        lonely = empty_rows(37, 37, cpu, objective)
        if objective == 'plm':  # the first query row: no unpredicted token, no earlier prediction
            assert lonely is not None and lonely.nonzero().flatten().tolist() == [37]
        else:
            assert lonely is None


@pytest.mark.parametrize('objective', OBJECTIVE_NAMES)
@pytest.mark.parametrize('doc_mask', [False, True])
def test_every_token_predicted_gives_finite_loss_and_gradients_in_every_impl(objective, doc_mask):
    T = 17
    P = T  # pred_frac=1.0: the largest P that n_pred allows
    batch = objective_batch(objective, doc_mask, B=2, T=T, pred_frac=1.0)
    input_ids, positions, targets = batch[:3]
    assert targets.size(1) == P
    docs = batch[3] if doc_mask else None
    if objective == 'plm':  # the case of the finding: a query row that sees nothing
        assert lonely_rows('plm', T, P, docs if doc_mask else torch.zeros_like(input_ids))
    model = tiny_model(seed=0, objective=objective, vocab_size=201)
    with torch.no_grad():
        slow = reference_forward(model, input_ids, positions, P, objective, docs)
        for impl in ('sdpa', 'manual', 'flex'):
            set_impl(model, impl)
            logits, loss = model(input_ids, positions, P, targets, docs=docs)
            assert torch.isfinite(loss), impl
            torch.testing.assert_close(logits, slow, atol=1e-5, rtol=0, msg=impl)
    for impl in ('sdpa', 'manual'):  # FlexAttention has no backward on CPU
        model = tiny_model(seed=0, objective=objective, attn_impl=impl, vocab_size=201, dropout=0.1,
                           attn_dropout=0.1).train()
        loss = model(input_ids, positions, P, targets, docs=docs)[1]
        loss.backward()
        assert torch.isfinite(loss), impl
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), impl


def test_rows_with_nothing_to_see_compile_as_one_graph():
    # the static table's empty rows are decided when it is built: no data-dependent branch in the graph
    T = 29
    graphs = []
    torch._dynamo.reset()
    model = tiny_model(seed=1, attn_impl='manual', objective='plm', vocab_size=201).train()
    model.build_masks(T, T, 'cpu')
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    for seed in range(2):
        input_ids, positions, targets = objective_batch('plm', False, B=2, T=T, seed=seed, pred_frac=1.0)
        loss = compiled(input_ids, positions, T, targets)[1]
        loss.backward()
        assert torch.isfinite(loss)
    assert len(graphs) == 1


# ===== permute.py: the permutation sampler against a loop reference (fairseq span_perm + mask_perm) =====

# ---- word starts in every kind of vocabulary: WordPiece, byte-level BPE, SentencePiece, none

def test_n_pred():
    assert n_pred(512) == 77 and n_pred(37) == 6 and n_pred(2) == 1 and n_pred(37, 0.5) == 18
    assert all(n_pred(T) == max(1, round(0.15 * T)) for T in range(1, 1000))


def test_vocab_tables_wordpiece():
    raw, hf = wordpiece(), hf_wordpiece()
    is_word_start, is_special = vocab_tables(hf)
    raw_tables = vocab_tables(raw)
    assert torch.equal(is_word_start, raw_tables[0]) and torch.equal(is_special, raw_tables[1])
    V = raw.get_vocab_size(with_added_tokens=True)
    assert len(is_word_start) == len(is_special) == V == len(hf) and hf.mask_token_id == V - 1
    assert is_special.nonzero().flatten().tolist() == [0, 1, 2, 3, V - 1]
    assert is_word_start[is_special].all()
    assert any(t.startswith('##') for t in raw.get_vocab())
    enc = raw.encode(' '.join(sentences(5, seed=3)))
    assert any(t.startswith('##') for t in enc.tokens)
    expected = [i == 0 or enc.word_ids[i] != enc.word_ids[i - 1] for i in range(len(enc.ids))]
    assert is_word_start[enc.ids].tolist() == expected


def test_vocab_tables_byte_level_bpe():
    tok = fit_tokenizer(models.BPE(), trainers.BpeTrainer(vocab_size=250, special_tokens=TOKENIZER_SPECIALS,
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                pre_tokenizers.ByteLevel(add_prefix_space=False), decoder=decoders.ByteLevel())
    is_word_start, is_special = vocab_tables(tok)
    assert is_special.nonzero().flatten().tolist() == [0, 1, 2, 3, len(is_special) - 1]
    enc = tok.encode('kamen unstanding riversa lo tionalful')  # letters and spaces: pre-tokens are words
    assert any(t.startswith('\u0120') for t in enc.tokens) and len(enc.ids) > 6
    expected = [enc.word_ids[i] != enc.word_ids[i - 1] for i in range(1, len(enc.ids))]
    # the first word has no leading space, so no marker: permute_batch makes position 0 a start
    assert is_word_start[enc.ids[1:]].tolist() == expected


def test_vocab_tables_sentencepiece_metaspace():
    tok = fit_tokenizer(models.BPE(unk_token='<unk>'), trainers.BpeTrainer(vocab_size=200, special_tokens=TOKENIZER_SPECIALS),
                pre_tokenizers.Metaspace(), decoder=decoders.Metaspace())
    is_word_start, is_special = vocab_tables(tok)
    assert is_word_start[is_special].all()
    enc = tok.encode('kamen unstanding riversa lo tionalful')
    assert all(t.startswith('\u2581') == (i == 0 or enc.word_ids[i] != enc.word_ids[i - 1])
               for i, t in enumerate(enc.tokens))
    expected = [i == 0 or enc.word_ids[i] != enc.word_ids[i - 1] for i in range(len(enc.ids))]
    assert is_word_start[enc.ids].tolist() == expected and not all(expected)


def test_vocab_tables_without_markers_falls_back_to_tokens(capsys):
    tok = fit_tokenizer(models.BPE(unk_token='<unk>'), trainers.BpeTrainer(vocab_size=150, special_tokens=TOKENIZER_SPECIALS),
                pre_tokenizers.Whitespace())
    is_word_start, is_special = vocab_tables(tok)
    assert is_word_start.all() and is_special.sum() == 5
    assert 'falls back to single tokens' in capsys.readouterr().out


# ---- the layout, whole words, the statistics of the draws, the generator as the one source of randomness

def check_layout(tokens, out, mask_id, is_special):
    input_ids, positions, targets = out
    B, T = tokens.shape
    P = n_pred(T)
    assert input_ids.shape == positions.shape == (B, T + 2 * P) and targets.shape == (B, P)
    assert input_ids.dtype == positions.dtype == targets.dtype == torch.long
    assert input_ids.device == positions.device == targets.device == tokens.device
    perm = positions[:, :T]
    assert torch.equal(perm.sort(1).values, torch.arange(T, device=tokens.device).expand(B, T))
    assert torch.equal(input_ids[:, :T], tokens.gather(1, perm))
    assert torch.equal(targets, input_ids[:, T - P:T])
    assert torch.equal(positions[:, T:T + P], perm[:, T - P:])
    assert torch.equal(positions[:, T + P:], perm[:, T - P:])
    assert torch.equal(input_ids[:, T:T + P], input_ids[:, T + P:])
    corrupted = input_ids[:, T:T + P]
    replaced = (corrupted != targets) & (corrupted != mask_id)
    assert not is_special.to(corrupted.device)[corrupted[replaced]].any()


def word_ids(row, is_word_start):
    ids, w = [], -1
    for t, x in enumerate(row):
        w += t == 0 or bool(is_word_start[x])
        ids.append(w)
    return ids


def check_whole_words(row, perm, P, is_word_start):
    """Non-predicted tokens of a word are contiguous and in order, and form a prefix of the word;
    at most one word (the one cut at T-P) has tokens in both parts."""
    T, words = len(row), word_ids(row, is_word_start)
    head = perm[:T - P]
    for i in range(1, len(head)):
        if words[head[i]] == words[head[i - 1]]:
            assert head[i] == head[i - 1] + 1
        else:
            assert words[head[i]] not in {words[t] for t in head[:i]}, 'a word is split in the non-predicted part'
            assert head[i] == 0 or words[head[i] - 1] != words[head[i]], 'a word lost its first tokens'
    shared = {words[t] for t in head} & {words[t] for t in perm[T - P:]}
    assert len(shared) <= 1


@pytest.mark.parametrize('whole_word', [True, False])
@pytest.mark.parametrize('T', [37, 2, 512])
def test_layout(T, whole_word):
    is_word_start, is_special = tables()
    mask_id = hf_wordpiece().mask_token_id
    tokens = blocks(5, T)
    out = permute_batch(tokens, is_word_start, is_special, mask_id, torch.Generator().manual_seed(0),
                        whole_word=whole_word)
    check_layout(tokens, out, mask_id, is_special)
    if whole_word:
        for row, perm in zip(tokens.tolist(), out[1].tolist()):
            check_whole_words(row, perm, n_pred(T), is_word_start)


def test_whole_words_stay_contiguous_and_token_level_splits_them():
    is_word_start, is_special = tables()
    tokens = blocks(8, 37).repeat(25, 1)
    gen = torch.Generator().manual_seed(1)
    _, positions, _ = permute_batch(tokens, is_word_start, is_special, 4, gen)
    for row, perm in zip(tokens.tolist(), positions[:, :37].tolist()):
        check_whole_words(row, perm, n_pred(37), is_word_start)
    _, positions, _ = permute_batch(tokens, is_word_start, is_special, 4, gen, whole_word=False)
    with pytest.raises(AssertionError):
        for row, perm in zip(tokens.tolist(), positions[:, :37].tolist()):
            check_whole_words(row, perm, n_pred(37), is_word_start)


def reference_permute(row, is_word_start, is_special, mask_id, rng, pred_frac=0.15, mask_prob=0.8,
                      rand_prob=0.1, whole_word=True):
    """One row, the obvious way (fairseq span_perm + mask_perm): lists and random.Random."""
    T = len(row)
    P = max(1, round(pred_frac * T))
    if whole_word:
        starts = [t for t in range(T) if t == 0 or is_word_start[row[t]]]
        spans = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [T])]
        rng.shuffle(spans)
        perm = [t for span in spans for t in span]
        tail = perm[T - P:]
        rng.shuffle(tail)
        perm[T - P:] = tail
    else:
        perm = list(range(T))
        rng.shuffle(perm)
    allowed = [v for v in range(len(is_special)) if not is_special[v]]
    targets = [row[t] for t in perm[T - P:]]
    corrupted = []
    for x in targets:
        u = rng.random()
        corrupted.append(mask_id if u < mask_prob else rng.choice(allowed) if u < mask_prob + rand_prob else x)
    return [row[t] for t in perm] + corrupted + corrupted, perm + perm[T - P:] * 2, targets


@pytest.mark.parametrize('whole_word', [True, False])
def test_statistics_match_loop_reference(whole_word):
    is_word_start, is_special = tables()
    mask_id, (B, T), repeats = hf_wordpiece().mask_token_id, (4, 37), 1500
    rows = blocks(B, T, seed=5)
    P = n_pred(T)
    tokens = rows.repeat_interleave(repeats, 0)
    fast = permute_batch(tokens, is_word_start, is_special, mask_id, torch.Generator().manual_seed(2),
                         whole_word=whole_word)
    rng, ws, sp = random.Random(2), is_word_start.tolist(), is_special.tolist()
    slow = [reference_permute(row, ws, sp, mask_id, rng, whole_word=whole_word) for row in tokens.tolist()]
    slow = tuple(torch.tensor([s[i] for s in slow]) for i in range(3))
    check_layout(tokens, slow, mask_id, is_special)
    assert fast[2].shape == slow[2].shape == (B * repeats, P)

    for input_ids, positions, targets in (fast, slow):
        corrupted = input_ids[:, T:T + P]
        masked = corrupted == mask_id
        kept = corrupted == targets
        replaced = ~masked & ~kept
        assert abs(masked.float().mean() - 0.8) < 0.01
        assert abs(replaced.float().mean() - 0.1) < 0.01
        assert abs(kept.float().mean() - 0.1) < 0.01
        assert not is_special[corrupted[replaced]].any()

    def frequencies(positions):
        """per (row, position): how often it is predicted, and how often it comes first in perm"""
        pos = positions.view(B, repeats, -1)
        predicted = torch.zeros(B, repeats, T).scatter_(2, pos[:, :, T - P:T], 1.0).mean(1)
        first = torch.zeros(B, repeats, T).scatter_(2, pos[:, :, :1], 1.0).mean(1)
        return predicted, first

    (fast_pred, fast_first), (slow_pred, slow_first) = frequencies(fast[1]), frequencies(slow[1])
    # fairseq reshuffles the tail: neighbours in the prediction order are rarely neighbours in the text
    tail_runs = [(pos[:, T - P + 1:T] == pos[:, T - P:T - 1] + 1).float().mean() for pos in (fast[1], slow[1])]
    assert abs(tail_runs[0] - tail_runs[1]) < 0.01 and tail_runs[0] < 0.1
    for predicted in (fast_pred, slow_pred):
        torch.testing.assert_close(predicted.mean(1), torch.full((B,), P / T))
        assert (predicted - P / T).abs().max() < 0.08  # every position is predicted at about pred_frac
    assert (fast_pred - slow_pred).abs().max() < 0.05
    assert (fast_first - slow_first).abs().max() < 0.05
    if whole_word:  # only word starts can come first in the permutation
        starts = is_word_start[rows]
        starts[:, 0] = True
        assert (fast_first[~starts] == 0).all() and (slow_first[~starts] == 0).all()


def test_random_replacements_are_uniform_over_non_special_ids():
    V = 50
    is_special = torch.zeros(V, dtype=torch.bool)
    is_special[[0, 1, 2, 3, 17, 18, 30, 49]] = True  # scattered specials, as with holes or added tokens
    tokens = torch.randint(4, 17, (2000, 101), generator=torch.Generator().manual_seed(0))
    input_ids, _, targets = permute_batch(tokens, torch.ones(V, dtype=torch.bool), is_special, 49,
                                          torch.Generator().manual_seed(3), mask_prob=0.0, rand_prob=1.0)
    counts = torch.bincount(input_ids[:, 101:101 + 15].flatten(), minlength=V).float()
    assert (counts[is_special] == 0).all()
    expected = counts.sum() / (~is_special).sum()
    assert ((counts[~is_special] - expected).abs() / expected).max() < 0.1


def test_generator_is_the_only_source_of_randomness():
    is_word_start, is_special = tables()
    tokens = blocks(6, 37)

    def draw(seed, global_seed):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        out = permute_batch(tokens, is_word_start, is_special, 4, torch.Generator().manual_seed(seed))
        assert torch.equal(torch.get_rng_state(), state)
        return out

    a, b, c = draw(0, 0), draw(0, 1), draw(1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])


def test_tables_on_another_device_are_an_error():
    is_word_start, is_special = tables()
    with pytest.raises(ValueError, match='move them once'):
        permute_batch(blocks(2, 37), is_word_start.to('meta'), is_special, 4, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_layout_and_no_host_sync():
    is_word_start, is_special = (t.cuda() for t in tables())
    mask_id = hf_wordpiece().mask_token_id
    tokens = blocks(16, 512).cuda()
    gen = torch.Generator('cuda').manual_seed(0)
    permute_batch(tokens, is_word_start, is_special, mask_id, gen)  # warm up caches
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = permute_batch(tokens, is_word_start, is_special, mask_id, gen)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    check_layout(tokens, out, mask_id, is_special)
    for row, perm in zip(tokens.tolist(), out[1].tolist()):
        check_whole_words(row, perm, n_pred(512), is_word_start.cpu())


# ---- each objective's layout, with and without the documents of a block

def reference_layout(row, perm, corrupted, P, objective, mask_id, eos_id=None):
    """One row's input, from first principles: tokens in permuted order, the predicted P last; the
    documents of the block (each closed by its </s>) and positions counted from each document's start
    (a later document from 1, where its <s> would stand)."""
    N = len(row) - P
    predicted = perm[N:]
    doc, in_doc, d, start = [], [], 0, 0
    for i, x in enumerate(row):
        doc.append(d)
        in_doc.append(i - start + (d > 0))
        if x == eos_id:
            d, start = d + 1, i + 1
    if objective == 'mpnet':
        ids, rows = [row[i] for i in perm] + corrupted + corrupted, perm + predicted + predicted
    elif objective == 'plm':
        ids, rows = [row[i] for i in perm] + [mask_id] * P, perm + predicted
    else:
        ids, rows = [row[i] for i in perm[:N]] + corrupted, list(perm)
    positions = [in_doc[i] for i in rows] if eos_id is not None else rows
    return ids, positions, [row[i] for i in predicted], [doc[i] for i in rows]


@pytest.mark.parametrize('objective', OBJECTIVE_NAMES)
@pytest.mark.parametrize('doc_mask', [False, True])
def test_objective_layouts_match_loop_reference(objective, doc_mask):
    is_word_start, is_special = tables()
    mask_id, T = hf_wordpiece().mask_token_id, 37
    P, tokens = n_pred(T), blocks(6, T, seed=3)
    assert (tokens[:, 1:-1] == 2).any(1).all()  # every block packs several documents
    # the random draws do not depend on the objective: mpnet's layout shows the permutation and corruption
    base_ids, base_pos, _ = permute_batch(tokens, is_word_start, is_special, mask_id, torch.Generator().manual_seed(7))
    out = permute_batch(tokens, is_word_start, is_special, mask_id, torch.Generator().manual_seed(7),
                        objective=objective, eos_id=2 if doc_mask else None)
    assert len(out) == (4 if doc_mask else 3)
    L = layout(objective, T, P)[0]
    for b in range(6):
        ids, positions, targets, docs = reference_layout(tokens[b].tolist(), base_pos[b, :T].tolist(),
                                                         base_ids[b, T:T + P].tolist(), P, objective, mask_id,
                                                         2 if doc_mask else None)
        assert len(ids) == L
        assert out[0][b].tolist() == ids and out[1][b].tolist() == positions and out[2][b].tolist() == targets
        if doc_mask:
            assert out[3][b].tolist() == docs and max(docs) >= 1
    with pytest.raises(ValueError, match='objective'):
        permute_batch(tokens, is_word_start, is_special, mask_id, torch.Generator(), objective='xlnet')


def test_mlm_shows_no_predicted_original_anywhere():
    is_word_start, is_special = tables()
    T, P = 37, 6
    tokens = blocks(4, T, seed=2)
    gen, mask_id = lambda: torch.Generator().manual_seed(5), hf_wordpiece().mask_token_id
    ids, positions, targets = permute_batch(tokens, is_word_start, is_special, mask_id, gen(), objective='mlm',
                                            mask_prob=1.0, rand_prob=0.0, whole_word=False)
    assert (ids[:, T - P:] == mask_id).all()  # the predicted rows hold <mask>, nothing of the original
    # the originals can be anything: the input, and so every logit, stays the same
    other = tokens.clone()
    other.scatter_(1, positions[:, T - P:], (targets + 17) % 190 + 5)
    ids2, positions2, targets2 = permute_batch(other, is_word_start, is_special, mask_id, gen(), objective='mlm',
                                               mask_prob=1.0, rand_prob=0.0, whole_word=False)
    assert torch.equal(ids2, ids) and torch.equal(positions2, positions) and not torch.equal(targets2, targets)
    model = tiny_model(seed=2, objective='mlm', vocab_size=201)
    with torch.no_grad():
        torch.testing.assert_close(model(ids2, positions2, P)[0], model(ids, positions, P)[0], atol=0, rtol=0)


# ===== data.py: sources, preparation, batches, streaming, bad input, signals while preparing =====

# ---- the built-in corpus and tokenizer; preparing a source, checked against it; vocabulary training

def test_pydocs_corpus_and_trained_tokenizer(env):
    from transformers import AutoTokenizer
    assert len(env.docs) > 3000 and os.path.getsize(env.pydocs) > 1_000_000  # ~2 MB of real English
    assert len(set(env.docs)) == len(env.docs)
    assert any('semaphore' in d.lower() for d in env.docs) and any('lambda' in d for d in env.docs)
    tok = AutoTokenizer.from_pretrained(env.tok_dir)
    assert [tok.convert_tokens_to_ids(t) for t in ['<s>', '<pad>', '</s>', '<unk>', '<mask>']] == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert 1500 < len(tok) <= 2000 and any(t.startswith('##') for t in tok.get_vocab())
    ids = tok('Return the Lowercase string.')['input_ids']
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == 'return the lowercase string.'
    assert data.load_tokenizer(env.tok_dir).mask_token == '<mask>'


def test_prepare_round_trip_and_blocks(env, tmp_path, capsys):
    docs = env.docs[:300] + ['', '   ']  # empty documents contribute nothing, not even a separator
    src = write_jsonl(tmp_path / 'corpus.jsonl', docs)
    out = data.prepare(src, tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'), val_frac=0.1)
    assert sorted(os.listdir(out)) == ['meta.json', 'tokenizer', 'train.bin', 'val.bin']
    meta = data.load_meta(out)
    tok = data.load_tokenizer(meta['tokenizer'])
    assert meta['dtype'] == 'uint16' and (meta['bos_id'], meta['eos_id'], meta['mask_id']) == (0, 2, 4)
    streams = {s: np.fromfile(os.path.join(out, f'{s}.bin'), dtype=np.uint16).astype(np.int64) for s in ('train', 'val')}
    assert {s: len(v) for s, v in streams.items()} == meta['n_tokens']
    # the two streams are the documents in order, each encoded without specials and followed by </s>,
    # every document in exactly one of them
    pos, n_val = {'train': 0, 'val': 0}, 0
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False)
        if not ids:
            continue
        ids = np.array(ids + [2])
        hits = [s for s in pos if np.array_equal(streams[s][pos[s]:pos[s] + len(ids)], ids)]
        assert len(hits) == 1, doc[:80]
        pos[hits[0]] += len(ids)
        n_val += hits[0] == 'val'
    assert pos == meta['n_tokens'] and 10 < n_val < 60 and meta['n_docs']['val'] == n_val
    # decoding a document's slice of the stream gives back the text, up to lowercase/accents/spacing
    norm = tok.backend_tokenizer.normalizer
    for doc in docs[:50]:
        ids = tok.encode(doc, add_special_tokens=False)
        if 3 not in ids:
            assert ''.join(tok.decode(ids).split()) == ''.join(norm.normalize_str(doc).split())
    # a block is <s> + a contiguous slice of the train stream
    b = data.Batches(out, 'train', batch_size=4, block_size=37)
    starts, x = b.starts(0), b.next()
    assert x.shape == (4, 37) and x.dtype == torch.long
    assert (x[:, 0] == 0).all()
    for s, row in zip(starts, x):
        assert torch.equal(row[1:], torch.from_numpy(streams['train'][s:s + 36]))
    # prepared once: a second call is a no-op, other settings in the same folder are refused
    capsys.readouterr()
    assert data.prepare(src, tokenizer=env.tok_dir, out_dir=out, val_frac=0.1) == out
    assert 'already prepared' in capsys.readouterr().out
    with pytest.raises(data.DataError, match='other settings.*val_frac'):
        data.prepare(src, tokenizer=env.tok_dir, out_dir=out, val_frac=0.2)


def test_default_out_dir():
    assert data.default_out_dir('pydocs', 'train', 8192) == os.path.join(data.DATA_ROOT, 'pydocs-train8192')
    assert data.default_out_dir('HuggingFaceFW/fineweb-edu:sample-10BT', 'microsoft/mpnet-base', 30527) == \
        os.path.join(data.DATA_ROOT, 'fineweb-edu_sample-10BT-mpnet-base')
    assert data.default_out_dir('/corpora/books/', 'data/pydocs-train8192/tokenizer', 0).endswith('books-pydocs-train8192')


def test_prepared_data_is_checked_against_its_source_and_itself(env, tmp_path):
    src = tmp_path / 'corpus'
    src.mkdir()
    write_jsonl(src / 'a.jsonl', env.docs[:150] + [None, 42, ['a', 'list']] + env.docs[150:300])  # not text: skipped
    out = data.prepare(str(src), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'), val_frac=0.1)
    meta, tok, fp = data.load_prepared(out)
    assert meta['n_skipped_rows'] == 3 and meta['n_docs']['train'] + meta['n_docs']['val'] == 300
    # 3. a file added to (or changed in) the source folder is noticed, and re-preparing is one flag
    write_jsonl(src / 'c.jsonl', env.docs[300:320])
    with pytest.raises(data.DataError, match=r"earlier version.*c\.jsonl added.*--overwrite"):
        data.prepare(str(src), tokenizer=env.tok_dir, out_dir=out, val_frac=0.1)
    data.prepare(str(src), tokenizer=env.tok_dir, out_dir=out, val_frac=0.1, overwrite=True)
    assert data.load_meta(out)['n_docs']['train'] + data.load_meta(out)['n_docs']['val'] == 320
    os.utime(src / 'a.jsonl', ns=(1, 1))
    with pytest.raises(data.DataError, match=r'a\.jsonl modified'):
        data.prepare(str(src), tokenizer=env.tok_dir, out_dir=out, val_frac=0.1)
    # a failed prepare leaves nothing behind (it builds under a temporary name)
    with pytest.raises(data.DataError, match='non-empty documents'):
        data.prepare(write_jsonl(tmp_path / 'nulls.jsonl', [None, None]), tokenizer=env.tok_dir,
                     out_dir=str(tmp_path / 'never'))
    assert not [p for p in os.listdir(tmp_path) if p.startswith('never')]
    # 7. damaged prepared files: one DataError each, naming the file and the fix
    def damaged(name, change, match):
        bad = tmp_path / name
        shutil.copytree(out, bad)
        change(bad)
        with pytest.raises(data.DataError, match=match):
            data.load_prepared(str(bad))
    def set_meta(**kw):
        def change(folder):
            meta = json.load(open(folder / 'meta.json'))
            json.dump({**meta, **kw}, open(folder / 'meta.json', 'w'))
        return change
    def append(raw):
        return lambda folder: open(folder / 'train.bin', 'ab').write(raw)
    def put_id(folder):
        val = np.fromfile(folder / 'val.bin', dtype=np.uint16)
        val[7] = 9999
        val.tofile(folder / 'val.bin')
    damaged('odd', append(b'\x01'), 'not a whole number of uint16 tokens')
    damaged('longer', append(b'\x01\x00'), 'meta.json says')
    damaged('vocab', set_meta(vocab_size=2500), 'says vocab_size 2500 but its tokenizer has')
    damaged('ids', put_id, "token id 9999, beyond the tokenizer's")
    damaged('dtype', set_meta(dtype='int8'), 'dtype int8')
    # the fingerprint DDP ranks compare: the same for a copy, different for other tokens or another vocabulary
    shutil.copytree(out, tmp_path / 'copy')
    assert data.load_prepared(str(tmp_path / 'copy'))[2] == data.load_prepared(out)[2]


def find_slice(stream, row):
    """Whether row is a contiguous slice of stream (both int arrays)."""
    s, r = stream.astype('<i4').tobytes(), row.astype('<i4').tobytes()
    pos = s.find(r)
    while pos >= 0 and pos % 4:
        pos = s.find(r, pos + 1)
    return pos >= 0


def test_a_text_given_twice_is_in_one_split_only(env, tmp_path):
    """Issue 40, finding 5 in data.py: the validation split was drawn by document index, so a document given twice
    could be held out once and trained on once. Now by content, in prepared folders and streams alike."""
    docs = env.docs[:150]
    src = write_jsonl(tmp_path / 'twice.jsonl', docs + docs[::-1])
    data.prepare(src, tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'), val_frac=0.2)
    meta = json.load(open(tmp_path / 'prep' / 'meta.json'))

    def documents(split):
        tokens = np.fromfile(tmp_path / 'prep' / f'{split}.bin', dtype=meta['dtype'])
        return [tuple(d) for d in np.split(tokens, np.flatnonzero(tokens == meta['eos_id']) + 1) if len(d)]
    train, val = documents('train'), documents('val')
    assert meta['split'] == 'content' and 10 < len(val) < 120 and len(val) % 2 == 0
    assert not set(train) & set(val) and len(train) + len(val) == 300
    # a stream: copies of its first (held-out) documents later on are never trained on
    src = write_jsonl(tmp_path / 'stream.jsonl', docs[:100] + docs[:100])
    tok = data.load_tokenizer(env.tok_dir)
    val, n_val, held = data.stream_val_blocks(src, env.tok_dir, n_blocks=6, block_size=33)
    val_stream = np.concatenate([np.array(tok.encode(t, add_special_tokens=False) + [2]) for t in docs[:n_val]])
    s = data.StreamingBatches(src, env.tok_dir, 4, 33, seed=3, held_out=n_val, held_texts=held, buffer_blocks=8)
    while s.doc <= 100:  # until the window that read the copies is used up
        for row in s.next().numpy():
            assert not find_slice(val_stream, row[1:])
    assert s.n_held_copies == n_val


def test_txt_folder_undecodable_bytes_counted(env, tmp_path, capsys):
    folder = tmp_path / 'txt'
    (folder / 'sub').mkdir(parents=True)
    paras = env.docs[300:400]
    (folder / 'a.txt').write_text('\n\n'.join(paras[:50]), encoding='utf-8')
    (folder / 'sub' / 'b.txt').write_bytes('\n\n'.join(paras[50:]).encode() + b'\n\nbad \xff\xfe bytes \xc3 here\n')
    out = data.prepare(str(folder), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'))
    meta = data.load_meta(out)
    assert meta['n_undecodable'] == 3 and 'undecodable' in capsys.readouterr().out
    assert meta['n_docs']['train'] + meta['n_docs']['val'] >= 100


def test_smaller_txt_split_line_paragraph_file(env, tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'a.txt').write_text('one two three\nfour five six\n\nseven eight nine\n\nten eleven\ntwelve\n')
    (src / 'b.txt').write_text('alpha beta\ngamma\n')
    n_docs = {}
    for split in ('line', 'paragraph', 'file'):
        out = data.prepare(str(src), tokenizer=env.tok_dir, out_dir=str(tmp_path / f'p-{split}'), val_frac=0.5,
                           txt_split=split)
        meta = data.load_meta(out)
        n_docs[split] = meta['n_docs']['train'] + meta['n_docs']['val']
        assert meta['settings']['txt_split'] == split
    assert n_docs == dict(line=7, paragraph=4, file=2)
    # another split over a prepared folder is other settings; jsonl sources do not record it
    with pytest.raises(data.DataError, match="txt_split: 'line' -> 'file'"):
        data.prepare(str(src), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'p-line'), val_frac=0.5,
                     txt_split='file')
    assert 'txt_split=line' in data.prepare_command(data.load_meta(str(tmp_path / 'p-line'))['settings'], 'x')
    # a folder prepared before txt_split existed (no such setting) split into paragraphs: still accepted as that
    meta = json.load(open(tmp_path / 'p-paragraph' / 'meta.json'))
    del meta['settings']['txt_split']
    json.dump(meta, open(tmp_path / 'p-paragraph' / 'meta.json', 'w'))
    data.prepare(str(src), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'p-paragraph'), val_frac=0.5)
    proc = run_cli('data.py', f'--dataset={src}', '--txt_split=sentence')
    assert proc.returncode != 0 and 'txt_split' in proc.stderr and 'Traceback' not in proc.stderr


def prepare_with_a_trained_vocabulary(src, out):
    """data.prepare training a 300-token vocabulary on src, in a process of its own (time-boxed by the test below);
    prints the vocabulary's size."""
    out = data.prepare(src, tokenizer="train", vocab_size=300, out_dir=out, val_frac=0.1)
    print(data.load_meta(out)["vocab_size"])


def test_vocabulary_training_is_bounded_on_one_huge_word(tmp_path):
    # 1 MB without a separator: the trainer's time grows with the square of a word's length (about 40 min
    # here unbounded); words over 100 characters are <unk> for WordPiece anyway and are left out
    rng = random.Random(0)
    blob = ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz0123456789') for _ in range(1_000_000))
    src = write_jsonl(tmp_path / 'c.jsonl', sentences(300) + [f'see {blob} here'])
    proc = subprocess.run([sys.executable, *calling(prepare_with_a_trained_vocabulary, src, tmp_path / 'prep')],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 100 < int(proc.stdout.split()[-1]) <= 300
    assert not data.LONG_WORD.search(data.LONG_WORD.sub(' ', f'x {blob} y')) and data.LONG_WORD.search('a' * 101)
    assert not data.LONG_WORD.search('a' * 100 + '_' + 'b' * 100) and not data.LONG_WORD.search('\u4e00' * 500)


def test_smaller_vocab_size_below_the_alphabet_is_refused(env, tmp_path):
    src = write_jsonl(tmp_path / 'c.jsonl', env.docs[:200])
    with pytest.raises(data.DataError, match=r'vocab_size 6 is too small.*--vocab_size=\d+ or more') as e:
        data.prepare(src, tokenizer='train', vocab_size=6, out_dir=str(tmp_path / 'p'), val_frac=0.1)
    need = int(str(e.value).split('--vocab_size=')[1].split()[0])
    assert need > 6 and not (tmp_path / 'p').exists()
    tok = data.train_tokenizer(iter(env.docs[:200]), need)  # exactly what it asked for is accepted
    assert len(tok) == need


def prepare_memory_probe(tok_dir, small, big, out):
    """In a process of its own: how much the heap grows while data.prepare prepares big, once every lazy import is
    loaded; prints {growth, n_tokens} as JSON."""
    def rss_anon():  # heap memory only: memory-mapped Arrow and .bin files are page cache, not held data
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                return int(line.split()[1]) * 1024
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)
    data.prepare(small, tokenizer=tok_dir, out_dir=out + '-warm')  # load every lazy import first
    data._source(big)  # datasets' own json -> Arrow conversion (chunked, its memory pool stays allocated)
    base = rss_anon()
    threading.Thread(target=sample, daemon=True).start()
    out = data.prepare(big, tokenizer=tok_dir, out_dir=out)
    done.set()
    print(json.dumps(dict(growth=peak[0] - base, n_tokens=sum(data.load_meta(out)['n_tokens'].values()))))


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs Linux /proc')
def test_prepare_memory_is_bounded(env, tmp_path):
    # ~4M tokens: as Python lists of ids that is ~150 MB (an 8-byte pointer + a 28-byte int each); prepare
    # tokenizes and writes batch by batch, so its heap grows by a small fraction of that (~15 MB)
    words = np.array(sorted({w for d in env.docs[:500] for w in d.split() if w.isalpha()}))
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 200, size=18_000)
    picks = rng.integers(0, len(words), size=lens.sum())
    ends = np.cumsum(lens)
    texts = [' '.join(words[picks[e - n:e]]) for n, e in zip(lens, ends)]
    big = write_jsonl(tmp_path / 'big.jsonl', texts)
    small = write_jsonl(tmp_path / 'small.jsonl', texts[:50])
    envs = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))
    r = subprocess.run([sys.executable, *calling(prepare_memory_probe, env.tok_dir, small, big, tmp_path / 'out')],
                       cwd=tmp_path, env=envs, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    as_lists = res['n_tokens'] * 36
    assert res['n_tokens'] > 3_000_000
    assert res['growth'] < as_lists / 5, res


# ---- batches of prepared data: ranks, epochs, resume on another number of processes

def test_permutation_is_a_bijection():
    for n in [1, 2, 3, 5, 17, 1000, 4097]:
        p = data._permute(np.arange(n), n, 1337, 3)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(data._permute(np.arange(100), 100, 1, 0), data._permute(np.arange(100), 100, 1, 1))


def fake_prepared(path, tokens, dtype=np.uint16, bos=0):
    """A prepared-dataset folder whose train stream is `tokens`: offsets can be read off the batches."""
    os.makedirs(path, exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(os.path.join(path, 'train.bin'))
    np.asarray(tokens[:100], dtype=dtype).tofile(os.path.join(path, 'val.bin'))
    meta = dict(dataset='fake', tokenizer='none', vocab_size=int(max(tokens)) + 1, dtype=np.dtype(dtype).name,
                bos_id=bos, eos_id=2, pad_id=1, unk_id=3, mask_id=4, n_tokens=dict(train=len(tokens), val=100))
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


def test_batches_ranks_epochs_and_resume(tmp_path):
    n, T = 10_007, 17                      # odd sizes; the stream is arange so a row's 2nd token is its offset
    d = fake_prepared(tmp_path / 'fake', np.arange(n))
    ranks = [data.Batches(d, 'train', 5, T, seed=3, rank=r, world_size=3) for r in range(3)]
    n_blocks = ranks[0].n_blocks
    assert n_blocks == (n - (T - 1) + 1) // (T - 1)
    seen = []
    for _ in range(n_blocks // 15):        # just under one epoch over all ranks
        for b in ranks:
            x = b.next().numpy()
            assert (x[:, 0] == 0).all() and (np.diff(x[:, 1:], axis=1) == 1).all()
            seen += x[:, 1].tolist()
    assert len(seen) == len(set(seen))     # no two ranks (or steps) share a block within an epoch
    assert len({s % (T - 1) for s in seen}) == 1 and max(seen) + T - 1 <= n
    # one full epoch visits every block once; the next epoch shifts the grid
    b = data.Batches(d, 'train', 1, T, seed=3)
    epoch0 = [b.next()[0, 1].item() for _ in range(n_blocks)]
    epoch1 = [b.next()[0, 1].item() for _ in range(n_blocks)]
    assert len(set(epoch0)) == n_blocks and len(set(epoch1)) == n_blocks and set(epoch0) != set(epoch1)
    # resume mid-run, across an epoch boundary: identical to the uninterrupted run
    run = data.Batches(d, 'train', 7, T, seed=5, rank=1, world_size=2)
    full = [run.next() for _ in range(60)]
    first = data.Batches(d, 'train', 7, T, seed=5, rank=1, world_size=2)
    for _ in range(30):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # plain python values
    again = data.Batches(d, 'train', 7, T, seed=5, rank=1, world_size=2)
    again.load_state_dict(state)
    assert all(torch.equal(again.next(), x) for x in full[30:])
    # another batch size or number of processes continues at exactly the next block of the sequence: the
    # 2 x 7 run above consumed 420 blocks, so the ranks' next batches, in rank order, are blocks 420, 421, ...
    seq = data.Batches(d, 'train', 1, T, seed=5)
    sequence = [seq.next()[0] for _ in range(420 + 12)]
    for bs, ws in ((12, 1), (3, 4), (5, 2)):
        ranks = [data.Batches(d, 'train', bs, T, seed=5, rank=r, world_size=ws) for r in range(ws)]
        for b in ranks:
            b.load_state_dict([state] * 2)  # the list of every rank's state, as a checkpoint holds it
        rows = torch.cat([b.next() for b in ranks])  # one step of every rank: bs * ws blocks
        assert torch.equal(rows, torch.stack(sequence[420:420 + bs * ws])), (bs, ws)


def test_eval_blocks_fixed(tmp_path):
    d = fake_prepared(tmp_path / 'fake', np.arange(5000))
    a, b = data.eval_blocks(d, 'train', 9, 33), data.eval_blocks(d, 'train', 9, 33)
    assert a.shape == (9, 33) and torch.equal(a, b)
    assert not torch.equal(a, data.eval_blocks(d, 'train', 9, 33, seed=1))


def test_uint32_when_vocab_needs_it(tmp_path):
    assert data.token_dtype(30527) == np.uint16 and data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32 and data.token_dtype(250_002) == np.uint32
    d = fake_prepared(tmp_path / 'big', 70_000 + np.arange(3000), dtype=np.uint32)
    x = data.Batches(d, 'train', 3, 11).next()
    assert x.dtype == torch.long and (x[:, 1:] >= 70_000).all() and (x[:, 2:] - x[:, 1:-1] == 1).all()


def test_smaller_too_few_tokens_says_what_a_block_needs(tmp_path):
    from test_all import fake_prepared
    folder = fake_prepared(tmp_path / 'p', list(range(5, 55)))  # 50 tokens
    with pytest.raises(data.DataError, match=r'has 50 tokens; block_size 40 needs at least 77 .*block_size <= 26'):
        data.Batches(folder, 'train', 2, 40)
    batches = data.Batches(folder, 'train', 2, 26)  # the largest block the message allows works
    assert batches.n_blocks == 1 and batches.next().shape == (2, 26)
    with pytest.raises(data.DataError):
        data.Batches(folder, 'train', 2, 27)


def test_longest_document_run_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 9, (6, 41), generator=g)
    blocks[:, 0] = 0  # <s>
    blocks[3, 1:] = 2  # nothing but separators
    blocks[4, 1:] = 5  # one document throughout
    expected = []
    for row in blocks.tolist():
        best = run = 0
        for t in row[1:]:
            run = 0 if t == 2 else run + 1
            best = max(best, run)
        expected.append(best)
    assert data.longest_document_run(blocks, eos_id=2).tolist() == expected and expected[3:5] == [0, 40]


# ---- streaming: ranks, resume, validation held out of training

def test_streaming_local_jsonl_ranks_and_resume(env, tmp_path):
    docs = env.docs[:160]
    src = write_jsonl(tmp_path / 'stream.jsonl', docs)
    tok = data.load_tokenizer(env.tok_dir)
    rank_stream = [np.concatenate([np.array(tok.encode(t, add_special_tokens=False) + [2])
                                   for t in docs[r::2] if tok.encode(t, add_special_tokens=False)]) for r in range(2)]
    kw = dict(batch_size=3, block_size=33, seed=7, world_size=2, buffer_blocks=8)
    for r in range(2):
        s = data.StreamingBatches(src, env.tok_dir, rank=r, **kw)
        for _ in range(5):
            x = s.next().numpy()
            assert x.shape == (3, 33) and (x[:, 0] == 0).all()
            assert all(find_slice(rank_stream[r], row[1:]) for row in x)  # rank r reads only docs r, r+2, ...
    # resume, crossing windows and the end of the stream: identical to the uninterrupted run
    n_epoch = len(rank_stream[1]) // 32    # blocks per epoch of rank 1 (a few fewer: window ends are dropped)
    steps = n_epoch // 4                   # 3 blocks a step: the run stops 3/4 into epoch 0, then goes on into epoch 1
    full = data.StreamingBatches(src, env.tok_dir, rank=1, **kw)
    xs = [full.next() for _ in range(2 * steps)]
    assert full.state_dict()['epoch'] == 1
    part = data.StreamingBatches(src, env.tok_dir, rank=1, **kw)
    for _ in range(steps):
        part.next()
    state = json.loads(json.dumps(part.state_dict()))
    again = data.StreamingBatches(src, env.tok_dir, rank=1, **kw)
    again.load_state_dict([{}, state])     # every rank's state, as a DDP run saves them
    assert all(torch.equal(again.next(), x) for x in xs[steps:])
    assert again.meta['bos_id'] == 0 and again.meta['mask_id'] == 4 and again.meta['vocab_size'] == len(tok)
    with pytest.raises(data.DataError, match='same number of processes'):
        data.StreamingBatches(src, env.tok_dir, rank=0, **dict(kw, world_size=4)).load_state_dict(state)


def test_streaming_validation_is_held_out_of_training(env, tmp_path):
    docs = env.docs[:200]
    src = write_jsonl(tmp_path / 'stream.jsonl', docs)
    tok = data.load_tokenizer(env.tok_dir)
    val, n_val, _ = data.stream_val_blocks(src, env.tok_dir, n_blocks=6, block_size=33)
    encoded = [tok.encode(t, add_special_tokens=False) + [2] for t in docs]
    val_stream = np.concatenate([np.array(e) for e in encoded[:n_val]])
    assert val.shape == (6, 33) and torch.equal(val[:, 1:].flatten(), torch.from_numpy(val_stream[:6 * 32]))
    assert 0 < n_val < 50 and len(val_stream) - 6 * 32 < len(encoded[n_val - 1])  # just enough documents
    for r in range(2):
        rank_stream = np.concatenate([np.array(e) for i, e in enumerate(encoded) if i >= n_val and i % 2 == r])
        s = data.StreamingBatches(src, env.tok_dir, 4, 33, seed=3, rank=r, world_size=2, held_out=n_val, buffer_blocks=8)
        for _ in range(40):  # beyond one epoch: the held-out documents never come back
            for row in s.next().numpy():
                assert find_slice(rank_stream, row[1:]) and not find_slice(val_stream, row[1:])
    with pytest.raises(data.DataError, match='held out its first'):
        data.StreamingBatches(src, env.tok_dir, 4, 33, held_out=3).load_state_dict(s.state_dict() | {'world_size': 1})


def test_streaming_run_says_where_validation_comes_from(env, tmp_path):
    src = write_jsonl(tmp_path / 'stream.jsonl', env.docs[:300])
    proc = train(tmp_path / 'run', *SMALL, f'--dataset={src}', f'--tokenizer={env.tok_dir}', '--streaming=True',
                 '--max_iters=2', '--eval_interval=2')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r'validation: the first \d+ documents of the stream, held out of training', proc.stdout)


# ---- bad input: one line naming the file, the line and the fix

def test_bad_inputs(env, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    with pytest.raises(data.DataError, match="does not exist"):
        data.prepare(str(tmp_path / 'missing'), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'o1'))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.csv').write_text('a,b\n')
    with pytest.raises(data.DataError, match=r"is empty: no \.txt, \.jsonl or \.parquet"):
        data.prepare(str(tmp_path / 'empty'), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'o2'))
    src = write_jsonl(tmp_path / 'c.jsonl', ['one doc', 'another doc'], field='content')
    with pytest.raises(data.DataError, match="no column 'text'.*content.*--text_field"):
        data.prepare(src, tokenizer=env.tok_dir, out_dir=str(tmp_path / 'o3'))
    with pytest.raises(data.DataError, match="has no documents"):
        data.prepare(write_jsonl(tmp_path / 'z.jsonl', []), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'o4'))
    (tmp_path / 'blank').mkdir()
    (tmp_path / 'blank' / 'a.txt').write_text('\n\n\n')
    with pytest.raises(data.DataError, match="has no non-empty documents"):
        data.prepare(str(tmp_path / 'blank'), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'o5'))
    vocab = {t: i for i, t in enumerate(['<s>', '<pad>', '</s>', '<unk>', 'hello'])}
    nomask = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token='<unk>')),
                                     bos_token='<s>', eos_token='</s>', pad_token='<pad>', unk_token='<unk>')
    nomask.save_pretrained(tmp_path / 'nomask')
    with pytest.raises(data.DataError, match='no mask token'):
        data.load_tokenizer(str(tmp_path / 'nomask'))
    with pytest.raises(data.DataError, match='hub'):  # hub unreachable: a clear error, not a hang
        data.StreamingBatches('nobody/no-such-dataset', env.tok_dir, 2, 16)
    with pytest.raises(data.DataError, match='no meta.json'):
        data.Batches(str(tmp_path), 'train', 2, 16)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, 'data.py'), '--dataset=/nonexistent'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert lines == ["error: dataset path '/nonexistent' does not exist"]


@pytest.mark.parametrize('content, words', [
    ('{"tokenizer": "tokenizer", "vocab_si', 'cannot be read'),               # truncated
    ('not json at all', 'cannot be read'),
    (b'\xff\xfe{}', 'cannot be read'),                                       # not UTF-8
    ('[1, 2, 3]', 'JSON list'),
    ('null', 'JSON NoneType'),
    ('{"tokenizer": "tokenizer", "vocab_size": 100, "bos_id": 0, "eos_id": 2}', "no 'dtype'"),
    ('{"tokenizer": "tokenizer", "vocab_size": "100", "dtype": "uint16", "bos_id": 0, "eos_id": 2}', 'vocab_size'),
    ('{"tokenizer": 5, "vocab_size": 100, "dtype": "uint16", "bos_id": 0, "eos_id": 2}', 'tokenizer'),
    ('{"tokenizer": "t", "vocab_size": 100, "dtype": "float", "bos_id": 0, "eos_id": 2}', 'dtype'),
    ('{"tokenizer": "t", "vocab_size": 100, "dtype": "uint16", "bos_id": 0, "eos_id": 2, "settings": [1]}', 'settings'),
])
def test_finding8_unreadable_meta_json_is_one_line_naming_it_and_the_fix(tmp_path, content, words):
    folder = tmp_path / 'prep'
    folder.mkdir()
    (folder / 'meta.json').write_bytes(content if isinstance(content, bytes) else content.encode())
    for read in (data.load_meta, data.load_prepared, lambda d: data.Batches(d, 'train', 2, 8),
                 lambda d: data.prepare('pydocs', out_dir=d)):
        with pytest.raises(data.DataError) as e:
            read(str(folder))
        msg = str(e.value)
        assert str(folder / 'meta.json') in msg and words in msg and 'python data.py' in msg and '\n' not in msg, msg


def test_finding8_unreadable_meta_json_from_the_command_line(tmp_path):
    (tmp_path / 'prep').mkdir()
    (tmp_path / 'prep' / 'meta.json').write_text('{"tokenizer": ')
    assert_clean_error(run_cli('data.py', f'--out_dir={tmp_path / "prep"}'), 'meta.json', 'python data.py')


def test_finding9_bad_dataset_files_name_the_file_line_and_fix(env, tmp_path):
    def refused(src, *words, streaming=False):
        with pytest.raises(data.DataError) as e:
            if streaming:
                data.StreamingBatches(str(src), env.tok_dir, 2, 16).next()
            else:
                data.prepare(str(src), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'out'), val_frac=0.1)
        for w in words:
            assert w in str(e.value), str(e.value)
        assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('out.partial-*'))
    # a folder with a broken link beside good files
    folder = tmp_path / 'links'
    folder.mkdir()
    write_jsonl(folder / 'a.jsonl', env.docs[:50])
    os.symlink(tmp_path / 'gone.jsonl', folder / 'b.jsonl')
    refused(folder, str(folder / 'b.jsonl'), 'broken link', 'gone.jsonl')
    # a .jsonl with a broken line (and one that is JSON but not an object): the file and the line, prepared or streamed
    bad = write_jsonl(tmp_path / 'bad.jsonl', env.docs[:30])
    with open(bad, 'a') as f:
        f.write('{"text": "half a line\n' + json.dumps({'text': 'fine'}) + '\n')
    refused(bad, 'bad.jsonl', 'line 31', 'not valid JSON')
    refused(bad, 'bad.jsonl', 'line 31', streaming=True)
    lst = write_jsonl(tmp_path / 'list.jsonl', env.docs[:5])
    with open(lst, 'a') as f:
        f.write('["a", "list"]\n')
    refused(lst, 'list.jsonl', 'line 6', 'not an object')
    bytes_ = tmp_path / 'bytes.jsonl'
    bytes_.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    refused(bytes_, 'bytes.jsonl', 'line 2', 'UTF-8')
    # a .parquet that is not parquet, or empty, among good ones
    import pyarrow as pa, pyarrow.parquet as pq
    pdir = tmp_path / 'pq'
    pdir.mkdir()
    pq.write_table(pa.table({'text': env.docs[:50]}), pdir / 'a.parquet')
    (pdir / 'b.parquet').write_text('this is text')
    refused(pdir, str(pdir / 'b.parquet'), 'not a parquet file')
    (pdir / 'b.parquet').write_bytes(b'')
    refused(pdir, str(pdir / 'b.parquet'), 'empty')
    # a folder named like a data file
    os.remove(pdir / 'b.parquet')
    (pdir / 'c.parquet').mkdir()
    data.prepare(str(pdir), tokenizer=env.tok_dir, out_dir=str(tmp_path / 'ok'), val_frac=0.1)  # skipped, not a crash
    # a file this user cannot read (root reads anything: checked only as another user)
    if os.geteuid() != 0:
        locked = write_jsonl(tmp_path / 'locked.jsonl', env.docs[:5])
        os.chmod(locked, 0)
        refused(locked, 'locked.jsonl', 'ermission')


def test_finding9_bad_dataset_file_from_the_command_line(env, tmp_path):
    folder = tmp_path / 'links'
    folder.mkdir()
    write_jsonl(folder / 'a.jsonl', env.docs[:50])
    os.symlink(tmp_path / 'gone.jsonl', folder / 'b.jsonl')
    assert_clean_error(run_cli('data.py', f'--dataset={folder}', f'--tokenizer={env.tok_dir}',
                               f'--out_dir={tmp_path / "out"}'), 'b.jsonl', 'broken link')


# ---- signals while preparing (data.py, train.py): one line in seconds; a killed one's staging removed

@pytest.fixture(scope='module')
def slow_corpus(tmp_path_factory):
    """Documents of long random words: WordPiece training on them takes many seconds in Rust (its time
    grows with the square of a word's length), the step that used to hold Ctrl-C until it ended."""
    r = random.Random(0)
    texts = [' '.join(''.join(r.choices(string.ascii_lowercase, k=r.randint(40, 90))) for _ in range(20))
             for _ in range(2000)]
    return write_jsonl(tmp_path_factory.mktemp('slow') / 'slow.jsonl', texts)


OFFLINE = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='offline', PYTHONUNBUFFERED='1')


def start(args, tmp_path, cwd=HERE):
    """Start a project script; stderr goes to a file, so the test can watch it while the script runs."""
    err = open(tmp_path / 'stderr.txt', 'w+')
    env = {**os.environ, **OFFLINE, 'HF_DATASETS_CACHE': str(tmp_path / 'hf_cache')}  # fresh: the split is generated
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, err


def wait_for(proc, err, text, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        err.seek(0)
        if text in err.read():
            return
        time.sleep(0.1)
    raise AssertionError(f'never saw {text!r}; rc {proc.poll()}')


def interrupt(proc, err, sig=signal.SIGINT):
    """Once the corpus is read (the vocabulary trainer starts right after), send sig; -> (seconds to exit, stderr)."""
    wait_for(proc, err, 'Generating train split')
    time.sleep(2)  # well inside the vocabulary training, which takes ~15 s
    assert proc.poll() is None, 'preparation ended before the signal: make slow_corpus slower'
    t0 = time.time()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err.seek(0)
    return time.time() - t0, err.read()


def no_progress(stderr):  # datasets' progress bars share stderr
    return [l for l in stderr.replace('\r', '\n').splitlines()
            if l.strip() and not any(w in l for w in ('Generating', 'examples/s', 'tokenizing', '%|'))]


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_finding6_data_py_answers_a_signal_in_seconds_with_one_line_and_leaves_nothing(tmp_path, slow_corpus, sig):
    out = tmp_path / 'prep'
    proc, err = start(['data.py', f'--dataset={slow_corpus}', '--tokenizer=train', '--vocab_size=8192',
                       f'--out_dir={out}'], tmp_path)
    took, stderr = interrupt(proc, err, sig)
    assert took < 5, f'{took:.1f}s to answer {sig.name}'
    lines = no_progress(stderr)
    assert len(lines) == 1 and lines[0].startswith(f'interrupted by {sig.name}') and 'nothing written' in lines[0], stderr
    assert 'Traceback' not in stderr and proc.returncode == 130
    assert not out.exists() and not list(tmp_path.glob('prep.partial-*'))


def test_finding6_train_py_preparing_answers_ctrl_c_in_seconds(tmp_path, slow_corpus):
    """train.py with no data_dir prepares under ./data first; Ctrl-C there is one line, and no staging is left."""
    proc, err = start([os.path.join(HERE, 'train.py'), os.path.join(HERE, 'config/tiny.py'), *SMALL,
                       f'--dataset={slow_corpus}', f'--out_dir={tmp_path / "run"}'], tmp_path, cwd=tmp_path)
    took, stderr = interrupt(proc, err)
    assert took < 5, f'{took:.1f}s to answer SIGINT'
    lines = no_progress(stderr)
    assert len(lines) == 1 and 'interrupted' in lines[0] and 'nothing written' in lines[0], stderr
    assert 'Traceback' not in stderr and proc.returncode != 0
    assert not list((tmp_path / 'data').glob('*')), os.listdir(tmp_path / 'data')


def test_finding6_a_later_prepare_removes_the_staging_of_a_killed_one(tmp_path, slow_corpus, env):
    out = tmp_path / 'prep'
    proc, err = start(['data.py', f'--dataset={slow_corpus}', '--tokenizer=train', '--vocab_size=8192',
                       f'--out_dir={out}'], tmp_path)
    staging = tmp_path / f'prep.partial-{proc.pid}'
    t0 = time.time()
    while not staging.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()  # kill -9: nothing of the process runs, its staging folder stays
    proc.wait()
    assert staging.is_dir()
    # a live process's staging is another preparation at work: kept
    alive = tmp_path / f'prep.partial-{os.getpid()}'
    alive.mkdir()
    small = write_jsonl(tmp_path / 'small.jsonl', env.docs[:200])
    proc = run_cli('data.py', f'--dataset={small}', f'--tokenizer={env.tok_dir}', f'--out_dir={out}', '--val_frac=0.1')
    assert proc.returncode == 0, proc.stderr
    said = [l for l in proc.stdout.splitlines() if 'removed' in l]
    assert len(said) == 1 and str(staging) in said[0] and alive.name not in proc.stdout, proc.stdout
    assert not staging.exists() and alive.is_dir() and (out / 'meta.json').is_file()


# ---- without the datasets package, as on the GPU machines: a prepared folder is found and trained on

def without_datasets(tmp_path, code, cwd=HERE):
    """Run python code where `import datasets` fails, as on the GPU machines (a module in front of it on the
    path that raises, not a stand-in for its behaviour); the project folder is on the path."""
    fake = tmp_path / 'no_datasets'
    fake.mkdir(exist_ok=True)
    (fake / 'datasets.py').write_text("raise ModuleNotFoundError(\"No module named 'datasets'\", name='datasets')\n")
    env = {**os.environ, **OFFLINE, 'PYTHONPATH': os.pathsep.join([str(fake), HERE])}
    return subprocess.run([sys.executable, *code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_finding12_without_datasets_a_prepared_folder_is_found_and_preparing_is_one_line(env, tmp_path):
    # prepared here, where datasets is installed; the source then stays behind (the GPU machine has only the folder)
    src = write_jsonl(tmp_path / 'corpus.jsonl', env.docs[:300])
    out = data.prepare(src, tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'), val_frac=0.1)
    # a string, not a function of this file: the process is data.py alone where `import datasets` fails, as on a GPU
    # machine; through test_all it would first import pytest, matplotlib and every other module of the project
    call = (f"import data; data.prepare({src!r}, tokenizer={env.tok_dir!r}, out_dir={out!r}, val_frac=0.1); "
            f"print(data.load_prepared({out!r})[2])")
    proc = without_datasets(tmp_path, ['-c', call])
    assert proc.returncode == 0 and 'already prepared' in proc.stdout, proc.stderr
    os.rename(src, tmp_path / 'elsewhere.jsonl')
    proc = without_datasets(tmp_path, ['-c', call])
    assert proc.returncode == 0 and 'already prepared' in proc.stdout and 'not here' in proc.stdout, proc.stderr
    # other settings are still refused, source or not
    proc = without_datasets(tmp_path, ['-c', call.replace('val_frac=0.1', 'val_frac=0.2', 1)])
    assert 'other settings' in proc.stderr, proc.stderr
    # preparing needs datasets: one line saying where to prepare and how to pass the result
    other = write_jsonl(tmp_path / 'other.jsonl', env.docs[:50])
    proc = without_datasets(tmp_path, [os.path.join(HERE, 'data.py'), f'--dataset={other}', f'--tokenizer={env.tok_dir}',
                                       f'--out_dir={tmp_path / "new"}'])
    assert_clean_error(proc, 'datasets package', 'python data.py', '--data_dir')
    assert not (tmp_path / 'new').exists()


def test_finding12_train_py_trains_from_a_prepared_folder_without_datasets(env, tmp_path):
    """train.py with data_dir='' finds data/<dataset>-<tokenizer> prepared elsewhere, the pydocs corpus absent."""
    src = write_jsonl(tmp_path / 'corpus.jsonl', env.docs[:400])
    os.makedirs(tmp_path / 'data')
    data.prepare(src, tokenizer=env.tok_dir, val_frac=0.1,
                 out_dir=str(tmp_path / 'data' / os.path.basename(data.default_out_dir(src, env.tok_dir, 0))))
    os.remove(src)
    proc = without_datasets(tmp_path, [os.path.join(HERE, 'train.py'), os.path.join(HERE, 'config/tiny.py'), *SMALL,
                                       f'--dataset={src}', f'--tokenizer={env.tok_dir}', '--val_frac=0.1',
                                       '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path / "run"}'],
                            cwd=tmp_path)
    assert proc.returncode == 0 and 'already prepared' in proc.stdout, proc.stderr[-2000:]
    assert (tmp_path / 'run' / 'ckpt.pt').is_file()


# ===== configurator.py: config files, --key=value settings refused in one line, --help =====

@pytest.mark.parametrize('args, words', [
    (['--batch_size=0'], 'batch_size must be >= 1; got 0'), (['--batch_size=-4'], 'batch_size must be >= 1'),
    (['--eval_iters=0'], 'eval_iters'), (['--gradient_accumulation_steps=0'], 'gradient_accumulation_steps'),
    (['--max_iters=-1'], 'max_iters must be >= 0'), (['--eval_interval=0'], 'eval_interval'),
    (['--log_interval=0'], 'log_interval'), (['--block_size=1'], 'block_size must be >= 2'),
    (['--out_dir='], 'out_dir must not be empty'), (['--device=mps'], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (['--init_from=run/ckpt.pt'], "init_from 'run/ckpt.pt' not found"), (['--learning_rate=-0.001'], 'learning_rate'),
    (['--beta2=1.0'], 'beta2 must be in [0, 1)'), (['--pred_frac=1.0'], 'pred_frac'), (['--dropout=1.5'], 'dropout'),
    (['--n_layer=0'], 'n_layer must be at least 1'), (['--mask_prob=0.9', '--rand_prob=0.2'], 'mask_prob + rand_prob'),
    (['--warmup_iters=2000'], 'lr_decay_iters (1000) must be at least warmup_iters (2000)'),
    (['--min_lr=0.1'], 'min_lr'), (['--overwrite=True', '--init_from=resume'], 'overwrite'),
    (['--seed=-1'], 'seed'), (['--rope=True', '--n_embd=132', '--n_head=4'], 'head size'),
    (['--snapshot_keep=0', '--snapshot_interval=100'], 'snapshot_keep must be >= 1'),
    (['--snapshot_interval=150'], 'snapshot_interval (150) must be a multiple of eval_interval (100)'),
    (['--objective=xlnet'], "objective must be one of mpnet, mlm, plm; got 'xlnet'"),
    (['--REPLACED=x'], "unknown config key 'REPLACED'")])  # a str constant imported by train.py is no setting
def test_nonsense_settings_are_refused_in_one_line(tmp_path, args, words):
    assert_clean_error(run_here('train.py', 'config/tiny.py', f'--out_dir={tmp_path}', *args), words)


@pytest.mark.parametrize('config_file', sorted(os.listdir(os.path.join(HERE, 'config'))))
def test_shipped_config_files_are_accepted(tmp_path, config_file):
    # every key known and of the right type: the run gets as far as the range check of the value given here
    script = ('finetune.py' if config_file.startswith('finetune') else  # finetune_*.py are finetune.py's, and so on
              'contrastive.py' if config_file.startswith('contrastive') else 'train.py')
    out = f'--out_file={tmp_path / "r.jsonl"}' if script == 'finetune.py' else f'--out_dir={tmp_path}'
    proc = run_here(script, f'config/{config_file}', out, '--batch_size=0')
    assert_clean_error(proc, 'batch_size must be >= 1')


def test_shipped_config_files_and_help():
    import configurator
    defaults = {k: getattr(contrastive, k) for k in contrastive.config_keys}
    for name, pairs in (('contrastive_raw.py', 'halves'), ('contrastive_pairs.py', 'labelled'),
                        ('contrastive_sentence.py', 'halves')):
        config = configurator.configure(defaults, [os.path.join(HERE, 'config', name)], contrastive.CHOICES,
                                        limits=contrastive.LIMITS)
        assert config['pairs'] == pairs
    proc = contrastive_here('--help')
    assert proc.returncode == 0 and '--mini_batch_size=0' in proc.stdout and 'gradient caching' in proc.stdout


def test_nonsense_in_the_other_scripts_is_one_line(tmp_path):
    assert_clean_error(run_here('bench.py', '--batch_size=0'), 'batch_size')
    assert_clean_error(run_here('bench.py', '--steps=0', '--device=cpu'), 'steps')
    assert_clean_error(run_here('data.py', '--val_frac=0'), 'val_frac')
    assert_clean_error(run_here('data.py', '--vocab_size=3', '--tokenizer=train'), 'vocab_size')
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(1000))
    assert_clean_error(run_here('convert_hf.py', str(garbage), str(tmp_path / 'hf')), 'not a readable checkpoint')
    # importing over an existing checkpoint file would replace a trained model
    assert_clean_error(run_here('convert_hf.py', '--from_hf=anything', str(garbage)), 'already exists', '--overwrite')
    proc = run_cli('train.py', 'config/tiny.py', '--batch_size=0')  # and as a real process: one line, no traceback
    assert_clean_error(proc, 'batch_size must be >= 1')


@pytest.mark.parametrize('script, words', [('train.py', '--batch_size=32'), ('bench.py', '--burn_in=10'),
                                           ('data.py', '--val_frac'), ('convert_hf.py', '--from_hf'),
                                           ('plot.py', 'run_dirs'), ('contrastive.py', '--mini_batch_size')])
def test_every_script_has_help(script, words):
    proc = run_here(script, '--help')
    assert proc.returncode == 0 and words in proc.stdout, proc.stdout + proc.stderr
    if script in ('train.py', 'bench.py'):  # every key, its default and the comment beside it in the script
        for entry in configurator.script_settings(os.path.join(HERE, script)):
            if entry[0] == 'key':
                _, key, default, comment = entry
                line = next(l for l in proc.stdout.splitlines() if l.startswith(f'  --{key}='))
                assert line.startswith(f'  --{key}={default} ') and comment in line, line
                assert comment, f'{script}: {key} has no comment'


# ===== checkpoint.py and run.py: the run folder (lock, resume, overwrite, saves, signals, closing lines) =====

# ---- never a trained model lost: one run per folder, best.pt, overwrite and the replaced run

def test_never_lose_a_trained_model(tmp_path, small_run):
    common = [*SMALL, '--eval_interval=5', '--lr_decay_iters=40']
    copy_run(small_run, tmp_path)  # trained 10 iterations with these settings
    first = load_ckpt(tmp_path / 'ckpt.pt')
    assert load_ckpt(tmp_path / 'best.pt')['iter_num'] == 10
    # 1. the same command again, without resume: refused, nothing touched
    proc = train(tmp_path, *common, '--max_iters=4')
    assert_clean_error(proc, 'already holds a run', '--init_from=resume', '--overwrite=True')
    assert load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] == 10
    # killed between writing ckpt.pt (the best so far) and linking best.pt to it: the resume below mends best.pt
    os.remove(tmp_path / 'best.pt')
    torch.save({**first, 'iter_num': 5}, tmp_path / 'best.pt')  # the previous best
    # 2. a run that diverges while staying finite: the latest checkpoint is worse, best.pt keeps the good model
    proc = train(tmp_path, *common, '--max_iters=20', '--init_from=resume', '--learning_rate=50.0', '--warmup_iters=0')
    assert proc.returncode == 0, proc.stderr[-2000:]
    latest, best = load_ckpt(tmp_path / 'ckpt.pt'), load_ckpt(tmp_path / 'best.pt')
    assert latest['iter_num'] == 20 and latest['val_loss'] > 2 * first['val_loss']
    assert best['iter_num'] == 10 and all(torch.equal(best['model'][k], first['model'][k]) for k in first['model'])
    assert f"the best model is {tmp_path / 'best.pt'} (iter 10" in proc.stdout
    # ... and one whose weights overflow: a non-finite validation loss is never written
    proc = train(tmp_path, *common, '--max_iters=30', '--init_from=resume', '--learning_rate=1e38', '--warmup_iters=0')
    assert_clean_error(proc, 'validation loss is nan', 'nothing saved', 'best.pt (iter 10')
    assert load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] == 20 and load_ckpt(tmp_path / 'best.pt')['iter_num'] == 10
    # 3. overwrite=True, starting from the folder's own best.pt, and the new run never beats it: the model it
    # started from is moved aside (replaced/), not deleted, and the last line exports it, not the worse ckpt.pt
    (tmp_path / 'hf').mkdir()  # an export of the old run goes with it
    proc = train(tmp_path, *common, '--max_iters=5', '--overwrite=True', f'--init_from={tmp_path / "best.pt"}',
                 '--learning_rate=50.0', '--warmup_iters=0')
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = load_ckpt(tmp_path / 'replaced' / 'best.pt')
    assert kept['iter_num'] == 10 and all(torch.equal(kept['model'][k], first['model'][k]) for k in first['model'])
    assert not (tmp_path / 'best.pt').exists() and load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] == 5
    assert (tmp_path / 'replaced' / 'hf').is_dir() and not (tmp_path / 'hf').exists()
    assert max(json.loads(line)['iter'] for line in open(tmp_path / 'metrics.jsonl')) == 5  # a log of its own
    assert f"export with: python convert_hf.py {tmp_path / 'replaced' / 'best.pt'}" in proc.stdout.splitlines()[-1]
    # ... a second overwrite would have to drop one of the two runs: refused, the user chooses
    proc = train(tmp_path, *common, '--max_iters=5', '--overwrite=True')
    assert_clean_error(proc, 'keeps one replaced run only', 'delete whichever')
    # ... with the worse run deleted, a run that beats the kept model (the same validation) releases it
    for name in ('ckpt.pt', 'metrics.jsonl'):
        os.remove(tmp_path / name)
    proc = train(tmp_path, *common, '--max_iters=5', '--overwrite=True', f'--init_from={tmp_path / "replaced/best.pt"}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {tmp_path / 'replaced'}" in proc.stdout and not (tmp_path / 'replaced').exists()
    assert load_ckpt(tmp_path / 'best.pt')['val_loss'] < first['val_loss']
    assert not list(tmp_path.glob('*.tmp'))
    # 4. another run's checkpoint file starts a new run: its weights, a fresh optimizer, iteration 0
    proc = train(tmp_path / 'next', *common, f'--init_from={tmp_path / "best.pt"}', '--max_iters=3')
    assert proc.returncode == 0, proc.stderr[-2000:]
    nxt = load_ckpt(tmp_path / 'next' / 'ckpt.pt')
    assert nxt['iter_num'] == 3 and int(nxt['optimizer']['state'][0]['step']) == 3


def test_a_log_alone_is_a_run_and_an_unreadable_checkpoint_names_a_real_alternative(tmp_path, small_run):
    # killed after its first evaluation, before its first save: metrics.jsonl alone still belongs to a run
    (tmp_path / 'log_only').mkdir()
    (tmp_path / 'log_only' / 'metrics.jsonl').write_text('{"iter": 0, "val_loss": 9.0}\n')
    proc = train(tmp_path / 'log_only', *SMALL, '--max_iters=2')
    assert_clean_error(proc, 'already holds a run (metrics.jsonl', '--overwrite=True')
    assert 'init_from=resume' not in proc.stderr  # nothing to resume
    # a truncated checkpoint points to another checkpoint that exists, and to none that does not
    copy_run(small_run, tmp_path / 'run')
    os.remove(tmp_path / 'run' / 'ckpt.pt')
    shutil.copyfile(tmp_path / 'run' / 'best.pt', tmp_path / 'run' / 'ckpt.pt')
    with open(tmp_path / 'run' / 'ckpt.pt', 'r+b') as f:
        f.truncate(1000)
    with pytest.raises(checkpoint.CheckpointError, match=f"use {re.escape(str(tmp_path / 'run' / 'best.pt'))}"):
        checkpoint.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))
    os.remove(tmp_path / 'run' / 'best.pt')
    with pytest.raises(checkpoint.CheckpointError, match='no other checkpoint is beside it'):
        checkpoint.load_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))


def test_overwrite_moves_everything_of_the_run_its_scores_included(tmp_path, small_run):
    # finetune.py's scores of the old run's checkpoints stayed behind and were drawn on the new run's curves
    copy_run(small_run, tmp_path)
    (tmp_path / 'scores.jsonl').write_text(json.dumps(dict(iter=10, task='pydocs', metric='accuracy', mean=0.5)) + '\n')
    said, _ = checkpoint.replace_run(str(tmp_path))
    assert 'scores.jsonl' in said and not (tmp_path / 'scores.jsonl').exists()
    assert (tmp_path / 'replaced' / 'scores.jsonl').is_file()
    # a checkpoint names its prepared data by an absolute path: finetune.py --task=retrieval finds it from anywhere
    assert os.path.isabs(load_ckpt(small_run / 'ckpt.pt')['data_dir'])


def test_a_replaced_run_is_released_only_by_the_measure_that_picks_best_pt(tmp_path):
    """Finding 1: contrastive.py picks best.pt by held-out MRR; a replaced run went by InfoNCE, which a smaller batch
    lowers, so the only model left was the worse one. Now the same measure, on the same held-out pairs, releases it."""
    out = str(tmp_path)
    def save(it, loss, mrr, key='pairs A'):
        return checkpoint.save_run(dict(iter_num=it, val_loss=loss, val_mrr=mrr), out, True, key, unit='step',
                                   measure='val_mrr')
    save(12, 1.9301, 0.6325)  # run A
    said, _ = checkpoint.replace_run(out)
    assert 'held-out MRR 0.6325' in said and 'same held-out data' in said
    said = save(16, 1.5431, 0.6042)  # run B: a lower InfoNCE, a worse MRR
    assert not any('removed' in line for line in said) and (tmp_path / 'replaced' / 'best.pt').exists()
    summary = checkpoint.run_summary(out, 16, 0.6042, (16, 0.6042), None, 'val_mrr', 'step')
    assert 'step 16, held-out MRR 0.6042' in summary and 'replaced keeps the replaced run' in summary
    said = save(18, 9.0, 0.9, key='pairs B')  # a higher MRR on other held-out pairs is no comparison
    assert not any('removed' in line for line in said) and (tmp_path / 'replaced').exists()
    said = save(20, 9.0, 0.6325)  # as good on the same pairs, whatever its InfoNCE
    assert f'removed {tmp_path / "replaced"}' in said[-1] and 'held-out MRR 0.6325' in said[-1]
    assert not (tmp_path / 'replaced').exists()
    # train.py's measure is unchanged: the lowest validation loss
    checkpoint.save_run(dict(iter_num=5, val_loss=2.0), out, True, 'k')
    checkpoint.replace_run(out)
    assert not any('removed' in l for l in checkpoint.save_run(dict(iter_num=6, val_loss=2.5), out, True, 'k'))
    assert 'val loss 1.9000' in checkpoint.save_run(dict(iter_num=7, val_loss=1.9), out, True, 'k')[-1]


def test_overwrite_keeps_the_replaced_run_until_a_model_as_good_is_saved(contrastive_run, tmp_path):
    """A contrastive run started over with overwrite=True keeps the old one in replaced/ while it is worse on the
    same held-out pairs, and removes it once it saves a model at least as good (the checkpoint carries the key)."""
    out = tmp_path / 'out'
    short = ['--max_iters=10', '--eval_interval=10']
    assert contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', *short).returncode == 0
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', *short, '--overwrite=True',
                           '--learning_rate=1e-9')  # no better than its start, nor than the run it replaced
    assert proc.returncode == 0 and (out / 'replaced' / 'best.pt').exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    kept = json.loads((out / 'replaced' / 'replaced.json').read_text())
    assert kept['key'].startswith('contrastive: held-out pairs') and kept['measure'] == 'val_mrr'
    shutil.rmtree(out)
    assert contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', *short).returncode == 0
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--overwrite=True',
                           '--max_iters=40', '--eval_interval=20')  # the same start and seed, trained further: better
    assert f"removed {out / 'replaced'}" in proc.stdout and not (out / 'replaced').exists(), proc.stdout[-2000:]


def test_a_run_that_saved_no_model_says_so_and_overwrite_does_not_park_its_log_for_good(contrastive_run, tmp_path):
    """Finding 17: a run stopped by a non-finite loss before its first save said 'the last checkpoint is intact';
    overwrite=True then moved its lone log into replaced/, which nothing could ever release."""
    out = tmp_path / 'out'
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--learning_rate=1e30', '--warmup_iters=0',
                           '--eval_interval=5')
    assert_clean_error(proc, 'not finite at step 1', 'no checkpoint was saved', 'lower learning_rate')
    assert 'intact' not in proc.stderr and sorted(os.listdir(out)) == ['metrics.jsonl', 'train.lock']
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--max_iters=2', '--eval_interval=2')
    assert_clean_error(proc, 'already holds a run (metrics.jsonl', 'it saved no model', '--overwrite=True')
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
                           '--overwrite=True')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {out / 'replaced'}: the replaced run had saved no model" in proc.stdout
    assert not (out / 'replaced').exists() and 'replaced' not in proc.stdout.strip().splitlines()[-1]


# ---- saves: no temp file left, the previous checkpoint kept, a damaged log read, a full disk or read-only folder

def test_resume_reads_a_damaged_log(tmp_path):
    log = tmp_path / 'metrics.jsonl'
    lines = [b'{"iter": 0, "val_loss": 9.0}', b'{"val_loss": 1.0}', b'[1, 2]', b'{"iter": "3"}', b'\xff\xfe{"iter"',
             b'[' * 100_000, b'{"iter": -1}',
             b'{"iter": 5, "loss": 8.0}', b'{"iter": 10, "loss": NaN}', b'{"iter": 1']
    log.write_bytes(b'\n'.join(lines))  # the last line cut short by a crash
    assert checkpoint.trim_log(str(log), 5) == (1, 7)  # iter 10 comes again; seven lines are no record
    assert [json.loads(line)['iter'] for line in log.read_text().splitlines()] == [0, 5]
    assert checkpoint.trim_log(str(log), 5) == (0, 0)


def save_40_times(path, who):
    """One of the two writers of one path below, in a process of its own."""
    for i in range(40):
        checkpoint.save_checkpoint({"who": who, "x": torch.randn(50_000)}, path)


def test_concurrent_writers_never_share_a_temp_file(tmp_path):
    # two writers of one path (two runs before the lock existed) crashed on one shared '.tmp' name
    path = str(tmp_path / 'ckpt.pt')
    procs = [subprocess.Popen([sys.executable, *calling(save_40_times, path, who)], stderr=subprocess.PIPE, text=True)
             for who in 'ab']
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert torch.load(path, weights_only=True)['who'] in 'ab' and os.listdir(tmp_path) == ['ckpt.pt']


class _Interrupted:
    """Pickling it is a Ctrl-C in the middle of torch.save."""
    def __reduce__(self):
        raise KeyboardInterrupt


def test_ctrl_c_during_a_save_leaves_no_temp_file_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    checkpoint.save_checkpoint({'x': torch.ones(3)}, path)
    with pytest.raises(KeyboardInterrupt):  # not swallowed: the run's own handler says what happened
        checkpoint.save_checkpoint({'x': torch.zeros(3), 'y': _Interrupted()}, path)
    assert os.listdir(tmp_path) == ['ckpt.pt'] and torch.equal(load_ckpt(path)['x'], torch.ones(3))


def second_signal_during_a_save(path):
    """In a process of its own (the second signal ends it): a run told to stop by SIGINT, signalled again while
    it writes its checkpoint."""
    checkpoint.stop_on_signals(True, 'step')
    os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step, saving first

    class Again:  # the second arrives while the checkpoint is being written
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            return (int, (1,))
    checkpoint.save_checkpoint({'x': torch.ones(1000), 'y': Again()}, path)


def test_a_second_signal_during_a_save_leaves_no_temp_file(tmp_path):
    """Finding 18: the second Ctrl-C quits at once (os._exit), which skipped save_checkpoint's clean-up: a 217 MB
    temp file stayed beside ckpt.pt."""
    proc = subprocess.run([sys.executable, *calling(second_signal_during_a_save, tmp_path / 'ckpt.pt')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and 'SIGINT again: quitting without saving' in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_read_only_folder_and_full_disk_are_one_line_and_keep_the_checkpoint(tmp_path, small_run):
    run = copy_run(small_run, tmp_path / 'run')
    before = (run / 'ckpt.pt').read_bytes()
    # a write that fails half-way (here a file size limit; a full disk behaves alike): one line, the previous
    # checkpoint intact, no temp file left
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
    proc = subprocess.run([sys.executable, 'train.py', 'config/tiny.py', f'--out_dir={run}', *SMALL, '--max_iters=15',
                           '--eval_interval=5', '--lr_decay_iters=40', '--init_from=resume'], cwd=HERE,
                          capture_output=True, text=True, preexec_fn=limit)
    assert_clean_error(proc, 'could not write', 'the previous ckpt.pt is unchanged')
    assert (run / 'ckpt.pt').read_bytes() == before and not list(run.glob('*.tmp'))
    # a read-only out_dir (resume) and a disk too small for a checkpoint (new run): refused before any work
    py = f'{sys.executable} train.py config/tiny.py {" ".join(SMALL)} --max_iters=5'
    proc = in_private_mount(f'''
        mkdir -p {tmp_path}/ro {tmp_path}/small
        mount -t tmpfs tmpfs {tmp_path}/ro && cp {run}/ckpt.pt {tmp_path}/ro/ && mount -o remount,ro {tmp_path}/ro
        mount -t tmpfs -o size=1m tmpfs {tmp_path}/small
        {py} --out_dir={tmp_path}/ro --init_from=resume 2>&1 || true
        echo ===
        {py} --out_dir={tmp_path}/small 2>&1 || true''')
    if proc is None:
        pytest.skip('unshare -m is not allowed here: no private tmpfs for the read-only / small-disk cases')
    ro, small = proc.stdout.split('===')
    assert ro.strip().splitlines()[-1].startswith(f"error: cannot write to out_dir '{tmp_path}/ro' (Read-only"), ro
    assert 'val loss' not in ro and 'Traceback' not in ro  # before loading or evaluating anything
    assert small.strip().splitlines()[-1].startswith(f"error: out_dir '{tmp_path}/small' has 0.00 GiB free"), small
    assert 'iter 0' not in small


def test_a_run_killed_between_its_checkpoint_and_best_pt_is_mended_on_resume(contrastive_run, tmp_path):
    out = tmp_path / 'out'
    args = [*CONTRASTIVE_RUN, f'--out_dir={out}', '--max_iters=10', '--eval_interval=10']
    assert contrastive_cli(contrastive_run, *args).returncode == 0
    assert checkpoint.load_checkpoint(str(out / 'ckpt.pt'))['best_iter'] == 10
    (out / 'best.pt').unlink()  # killed after writing ckpt.pt, the best so far, before linking best.pt to it
    with open(out / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 11, "loss": 1.0}\n{"iter": 1')  # and a record of a later step, and a torn line
    proc = contrastive_cli(contrastive_run, *args, '--init_from=resume')  # at max_iters already: mends, trains nothing
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the step-11 record is dropped; the evaluation at step 10 is measured again at start: replaced, not counted
    assert 'metrics.jsonl: dropped 1 records logged after step 10 by the interrupted run (those steps run again) and 1 lines' in proc.stdout, proc.stdout[-3000:]
    assert checkpoint.same_file(str(out / 'best.pt'), str(out / 'ckpt.pt'))
    assert f"the best model is {out / 'best.pt'} (step 10" in proc.stdout.strip().splitlines()[-1]


# ---- a killed or signalled run: its lock taken over, SIGTERM and Ctrl-C save and stop, the closing line

def test_sigkill_mid_training_resumes_and_one_run_per_out_dir(tmp_path):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    args = [sys.executable, 'train.py', 'config/tiny.py', f'--out_dir={tmp_path}', *SMALL, '--max_iters=100000',
            '--eval_interval=3']
    proc = subprocess.Popen(args, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saves = 0
    for line in proc.stdout:  # kill it right after its second save, while it trains on
        saves += line.startswith('saved ')
        if saves == 2:
            break
    # 9. a second run into the same folder, while the first one trains: refused, naming the holder
    second = train(tmp_path, *SMALL, '--init_from=resume')
    assert_clean_error(second, 'is in use by a running training', f'pid {proc.pid} on {socket.gethostname()}')
    proc.kill()
    proc.wait()
    killed = proc.pid
    ckpt = load_ckpt(tmp_path / 'ckpt.pt')  # never a torn file: written to a temp file, then os.replace
    assert ckpt['iter_num'] >= 6
    (tmp_path / f'ckpt.pt.{killed}.123.tmp').write_bytes(b'half a checkpoint')  # as kill -9 mid-save leaves it
    # the killed run's lock is taken over, and its temp file removed
    logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    # what the resumed run logs again: the evaluation at its checkpoint, and whatever followed before the kill
    assert any(r['iter'] >= ckpt['iter_num'] and 'val_loss' in r for r in logged)
    proc = train(tmp_path, *SMALL, f'--max_iters={ckpt["iter_num"] + 6}', '--eval_interval=3', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from iter {ckpt['iter_num']} of {tmp_path / 'ckpt.pt'}" in proc.stdout
    assert load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] == ckpt['iter_num'] + 6
    lock = (tmp_path / 'train.lock').read_text()  # taken over: it names the resumed run (train() runs in this process)
    assert f'pid {killed} ' not in lock and f'pid {os.getpid()} ' in lock and not list(tmp_path.glob('*.tmp'))
    # metrics.jsonl holds each iteration once: what the killed run logged after its checkpoint was trained again
    logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    for kind in ('val_loss', 'loss'):
        iters = [r['iter'] for r in logged if kind in r]
        assert len(iters) == len(set(iters)) and iters == sorted(iters), (kind, iters)


def test_a_signal_saves_and_stops_a_second_one_quits_and_wandb_resumes_its_run(tmp_path):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'WANDB_MODE': 'offline'}
    args = [sys.executable, 'train.py', 'config/tiny.py', f'--out_dir={tmp_path}', *SMALL, '--max_iters=100000',
            '--eval_interval=1000', '--wandb_log=True']
    proc = subprocess.Popen(args, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('iter 5:'):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert 'SIGTERM: stopping after this iteration, saving first if it trained anything (press Ctrl-C again' in out
    assert 'stopped by SIGTERM at iter' in out and 'export with: python convert_hf.py' in out.strip().splitlines()[-1]
    first = load_ckpt(tmp_path / 'ckpt.pt')
    assert first['iter_num'] >= 5 and first['wandb_run_id']
    # resumed (long iterations), then Ctrl-C twice: the second quits at once, saving nothing
    proc = subprocess.Popen(args + ['--init_from=resume', '--gradient_accumulation_steps=50', '--log_interval=1'],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('iter '):  # training, wandb started
            proc.send_signal(signal.SIGINT)
        if line.startswith('SIGINT: stopping after this iteration'):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and 'SIGINT again: quitting without saving' in out, out[-2000:]
    assert load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] == first['iter_num']
    # both sessions logged into one wandb run
    runs = [d.name for d in (tmp_path / 'wandb').iterdir() if d.name.startswith('offline-run-')]
    assert len(runs) == 2 and all(r.endswith(first['wandb_run_id']) for r in runs), runs


def test_ddp_sigterm_saves_between_log_steps(tmp_path):
    # torchrun forwards SIGTERM to its workers and kills them ~30 s later: they must agree to stop and
    # save at once, not at the next log step
    args = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
            'config/tiny.py', f'--out_dir={tmp_path}', *SMALL, '--log_interval=100000', '--eval_interval=100000',
            '--max_iters=100000']
    proc = subprocess.Popen(args, cwd=HERE, env={**os.environ, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('iter 0: val loss'):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=25)[0]
    assert 'stopped by SIGTERM' in out, out[-3000:]
    assert load_ckpt(tmp_path / 'ckpt.pt')['iter_num'] > 0


# ===== train.py: end to end runs, resume exactness, DDP, objectives, longer context, the probe =====

# ---- a run that learns, resumes exactly, trains every objective; bad input

def test_tiny_config_learns(tmp_path):
    proc = train(tmp_path, '--max_iters=40', '--eval_interval=20', '--snapshot_interval=20', '--snapshot_keep=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 20, 40]
    ln_vocab = math.log(load_ckpt(tmp_path / 'ckpt.pt')['model_args']['vocab_size'])
    assert evals[0]['val_loss'] > ln_vocab - 0.5  # starts at chance
    assert evals[-1]['val_loss'] < ln_vocab - 2.0, evals  # and falls well below it
    logs = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"loss"' in l]
    assert logs and all(math.isfinite(r['loss']) and r['tokens_per_sec'] > 0 for r in logs)
    # accuracy is counted over every step of the log window (10 x 16 sequences x 19 predictions), like the loss,
    # not over the last step's 16 x 19
    assert any(abs(r['acc'] * 304 - round(r['acc'] * 304)) > 1e-6 for r in logs)
    assert re.search(r'iter 40: loss [\d.]+, acc [\d.]+, lr [\d.e+-]+, grad norm [\d.]+, \d+ ms/iter, [\d,]+ tok/s, '
                     r'ETA 0m\d\ds\n', proc.stdout)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith('done: the best model is') and f'python convert_hf.py {tmp_path}/best.pt' in last
    # snapshots every 20 iterations, the newest kept, exportable like any checkpoint
    assert os.listdir(tmp_path / 'snapshots') == ['iter_0000040.pt']
    convert_hf.export(str(tmp_path / 'snapshots' / 'iter_0000040.pt'), str(tmp_path / 'hf'))
    # curves: drawn in the background after each evaluation
    for _ in range(100):
        if (tmp_path / 'curves.png').exists():
            break
        time.sleep(0.2)
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    proc = run_here('plot.py', str(tmp_path), str(tmp_path), f'--out={tmp_path / "two.png"}')  # runs side by side
    assert proc.returncode == 0 and (tmp_path / 'two.png').stat().st_size > 10_000, proc.stderr


def test_resume_is_exact(tmp_path):
    common = [*SMALL, '--lr_decay_iters=40', '--eval_interval=10']
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert train(straight, *common, '--max_iters=20').returncode == 0
    assert train(split, *common, '--max_iters=10').returncode == 0
    assert load_ckpt(split / 'ckpt.pt')['iter_num'] == 10
    proc = train(split, *common, '--max_iters=20', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_ckpt(straight / 'ckpt.pt'), load_ckpt(split / 'ckpt.pt')
    assert a['iter_num'] == b['iter_num'] == 20
    for k in a['model']:
        assert (a['model'][k] - b['model'][k]).abs().max() < 1e-6, k


@pytest.mark.parametrize('args', [['--objective=mlm'], ['--objective=plm', '--doc_mask=True']])  # (mpnet: above)
def test_other_objectives_and_doc_mask_learn(tmp_path, args):
    proc = train(tmp_path, *SMALL, *args, '--max_iters=50', '--eval_interval=50')  # (SMALL: 2.1 lower in 5 s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 50]
    assert evals[1]['val_loss'] < evals[0]['val_loss'] - 1.5, evals  # from chance (ln 8192 = 9.0) well down
    ckpt = load_ckpt(tmp_path / 'ckpt.pt')
    assert ckpt['model_args']['objective'] == (args[0].split('=')[1] if 'objective' in args[0] else 'mpnet')
    if 'plm' in args[0]:
        convert_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))  # the same weights, the same export
    else:
        proc = train(tmp_path, *SMALL, '--max_iters=50', '--init_from=resume')  # resumed under mpnet: another task, said so
        assert proc.returncode == 0 and "under objective='mpnet', doc_mask=False the validation loss measures another " \
            "task" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bad_input_is_one_clear_line(tmp_path):
    def here(*args):
        return run_here('train.py', 'config/tiny.py', f'--out_dir={tmp_path}', *args)
    assert_clean_error(here('--lr=1e-3'), "unknown config key 'lr'", 'learning_rate')
    assert_clean_error(here('--batch_size=big'), 'batch_size', 'int')
    assert_clean_error(run_here('train.py', 'config/nope.py'), "config file 'config/nope.py' not found")
    assert_clean_error(here(f'--dataset={tmp_path / "missing"}'), 'missing')
    (tmp_path / 'empty').mkdir()
    assert_clean_error(here(f'--dataset={tmp_path / "empty"}'), 'empty')
    assert_clean_error(run_here('train.py', 'config/tiny.py', f'--out_dir={tmp_path / "fresh"}', '--init_from=resume'),
                       'ckpt.pt', 'does not exist')
    assert_clean_error(here('--attn_impl=flex'), 'flex', 'CPU')
    assert_clean_error(here('--dtype=float16'), 'dtype')
    assert_clean_error(here('--n_embd=100', '--n_head=3'), 'n_embd', 'multiple of n_head')


# ---- DDP on the CPU (torchrun, gloo)

def test_ddp_two_processes_on_cpu(tmp_path):
    proc = run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', 'config/tiny.py',
                   f'--out_dir={tmp_path}', *SMALL, '--max_iters=10', '--eval_interval=10',
                   '--gradient_accumulation_steps=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'effective batch: 2 accum x 2 processes x 8 seqs = 32 sequences' in proc.stdout  # CPU: no GPUs
    # throughput counts every micro-batch on every rank in total, and half of that per GPU
    logs = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if '"loss"' in l]
    assert [r['iter'] for r in logs] == [5, 10]
    for r in logs:
        assert r['tokens_per_sec'] == pytest.approx(2 * 2 * 8 * 64 / (r['ms_per_iter'] / 1000))
        assert r['tokens_per_sec_per_gpu'] == pytest.approx(r['tokens_per_sec'] / 2)
        assert r['mfu'] is None  # no made-up peak for a CPU
    assert f"{logs[-1]['tokens_per_sec']:,.0f} tok/s on 2 processes, ETA" in proc.stdout
    ckpt = load_ckpt(tmp_path / 'ckpt.pt')
    assert ckpt['iter_num'] == 10 and len(ckpt['rank_states']) == 2
    assert ckpt['rank_states'][0]['data'] == ckpt['rank_states'][1]['data'] == {'blocks': 10 * 2 * 2 * 8}
    # 10. prepared data resumes on another number of processes, at exactly the next block, and says so
    proc = train(tmp_path, *SMALL, '--max_iters=15', '--eval_interval=5', '--gradient_accumulation_steps=2',
                 '--init_from=resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'written by 2 processes and resumes on 1' in proc.stdout and 'not bit-identical' in proc.stdout
    assert load_ckpt(tmp_path / 'ckpt.pt')['rank_states'][0]['data'] == {'blocks': 320 + 5 * 2 * 8}
    # a refusal that rank 0 alone makes (the folder holds a run) stops every rank with its one line, no traceback
    proc = run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', 'config/tiny.py',
                   f'--out_dir={tmp_path}', *SMALL, '--max_iters=10')
    assert proc.returncode != 0 and 'train.py", line' not in proc.stderr, proc.stderr[-3000:]
    assert [l for l in proc.stderr.splitlines() if l.startswith('error:')] == [
        next(l for l in proc.stderr.splitlines() if l.startswith('error:'))] and 'already holds a run' in proc.stderr


def builtin_prepared():
    """data/pydocs-train8192, as `train.py config/tiny.py` prepares it, whichever DATA_ROOT the session fixture
    `env` has set in this worker (else the pydocs corpus compared with that folder's source is env's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'DATA_ROOT', os.path.join(HERE, 'data'))
        return data.prepare('pydocs', 'train', 8192, out_dir=os.path.join(HERE, 'data', 'pydocs-train8192'),
                            val_frac=0.05)


def test_ddp_ranks_that_see_different_or_no_data_stop_every_rank(tmp_path):
    # data_dir expands $LOCAL_RANK, so two ranks on one machine can be given the folders two nodes would have
    prepared = builtin_prepared()
    shutil.copytree(prepared, tmp_path / 'd0')
    shutil.copytree(prepared, tmp_path / 'd1')
    val = np.fromfile(tmp_path / 'd1' / 'val.bin', dtype=np.uint16)
    val[:100] = val[100:200]  # same size and vocabulary, other tokens: as if prepared apart
    val.tofile(tmp_path / 'd1' / 'val.bin')
    def torchrun(data_dir):
        return run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                       'config/tiny.py', f'--out_dir={tmp_path / "run"}', *SMALL, '--max_iters=2', f'--data_dir={data_dir}')
    def check_one_line(proc, words):  # every rank stops, one line says why (torchrun then reports its children)
        assert proc.returncode != 0 and 'File "' + os.path.join(HERE, 'train.py') not in proc.stderr, proc.stderr[-3000:]
        lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
        assert len(lines) == 1 and words in lines[0] and 'shared file system' in lines[0], proc.stderr[-3000:]
    node = socket.gethostname()
    check_one_line(torchrun(f'{tmp_path}/d$LOCAL_RANK'),
                   f'rank 1 on node {node} sees other prepared data than rank 0 on node {node} (tokens differ)')
    shutil.rmtree(tmp_path / 'd1')
    check_one_line(torchrun(f'{tmp_path}/d$LOCAL_RANK'), f"rank 1 on node {node}: '{tmp_path}/d1' is not a prepared dataset")
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()


# ---- starting from another model: a longer context, an HF model, a sentence model (head first, probe)

def test_continued_pretraining_at_a_longer_context(tmp_path, small_run):
    # small_run: 128 positions, trained at 64; continued at 256 from its best.pt
    common = [*SMALL, '--eval_interval=2', '--lr_decay_iters=40', f'--init_from={small_run / "best.pt"}']
    proc = train(tmp_path / 'long', *common, '--max_positions=256', '--block_size=256', '--max_iters=2',
                 '--batch_size=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'positions: 128 -> 256, the new rows copied from the 128 learned ones' in proc.stdout
    assert re.search(r'long documents: \d+ of 4 validation blocks hold more than 128 consecutive tokens', proc.stdout)
    evals = [json.loads(l) for l in open(tmp_path / 'long' / 'metrics.jsonl') if 'val_loss' in l]
    for e in evals:  # the loss of the tokens read at the new positions, and of the others: they add up to the whole
        assert e['val_loss_near'] > 0 and e['val_loss_far'] > 0 and min(e['val_loss_near'], e['val_loss_far']) <= \
            e['val_loss'] + 1e-6 <= max(e['val_loss_near'], e['val_loss_far']) + 2e-6
    assert re.search(r'iter 0: val loss [\d.]+ \(positions < 128: [\d.]+, >= 128: [\d.]+\)', proc.stdout)
    ckpt = load_ckpt(tmp_path / 'long' / 'best.pt')
    assert ckpt['model_args']['max_positions'] == 256 and ckpt['positions_extended'] == [[128, 256]]
    # the export reads all 256 positions: config, tokenizer, and parity on a row of every position
    proc = run_here('convert_hf.py', str(tmp_path / 'long' / 'best.pt'), str(tmp_path / 'hf'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['max_position_embeddings'] == 258
    assert json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())['model_max_length'] == 256
    from transformers import MPNetForMaskedLM
    hf = MPNetForMaskedLM.from_pretrained(tmp_path / 'hf').eval()
    model = load_model(tmp_path / 'long' / 'best.pt')
    ids = torch.randint(5, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.lm_logits(model.encode(ids))[0, 128:] - hf(input_ids=ids).logits[0, 128:]).abs().max()
    assert diff < 1e-4
    # a table never shrinks; a block beyond the table names the way to extend it
    assert_clean_error(train(tmp_path / 'short', *common, '--max_positions=64', '--max_iters=1'),
                       'below the checkpoint', 'never shrinks')
    assert_clean_error(train(tmp_path / 'short', *common, '--block_size=256', '--max_iters=1'),
                       'block_size 256 exceeds', '--max_positions=256 extends')
    assert not (tmp_path / 'short' / 'ckpt.pt').exists()


def test_continue_pretraining_from_hf(tmp_path):
    prepared = builtin_prepared()
    hf = random_hf_mlm(seed=0, vocab_size=data.load_meta(prepared)['vocab_size'])
    hf.save_pretrained(tmp_path / 'hf')
    proc = train(tmp_path / 'a', *SMALL, f'--init_from={tmp_path / "hf"}', '--max_iters=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_ckpt(tmp_path / 'a' / 'ckpt.pt')
    assert ckpt['model_args']['n_embd'] == 32 and ckpt['iter_num'] == 3  # the HF architecture, not SMALL's
    # the two-step form: import to a checkpoint, then start from it
    convert_hf.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'b' / 'ckpt.pt'))
    proc = train(tmp_path / 'b', *SMALL, '--init_from=resume', '--max_iters=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'holds weights only' in proc.stdout
    assert load_ckpt(tmp_path / 'b' / 'ckpt.pt')['iter_num'] == 3
    small_vocab = random_hf_mlm(seed=0)  # 101 tokens: not the data's vocabulary
    small_vocab.save_pretrained(tmp_path / 'hf101')
    assert_clean_error(run_here('train.py', 'config/tiny.py', f'--out_dir={tmp_path / "c"}', *SMALL,
                                f'--init_from={tmp_path / "hf101"}'), 'vocab mismatch')


def test_adapting_a_sentence_model_trains_the_new_head_alone_first(env, tmp_path):
    folder = st_folder(tmp_path / 'st', env.tok_dir, pooling='mean', legacy=True)
    src = write_jsonl(tmp_path / 'domain.jsonl', env.docs[:400])
    prepared = data.prepare(src, tokenizer=env.tok_dir, out_dir=str(tmp_path / 'prep'), val_frac=0.2)
    run = tmp_path / 'run'
    args = [f'--init_from={folder}', f'--data_dir={prepared}', '--batch_size=8', '--block_size=64', '--eval_iters=2',
            '--log_interval=1', '--warmup_iters=0', '--lr_decay_iters=100', '--learning_rate=1e-3', '--probe=True',
            '--probe_docs=20', '--head_warmup_iters=2', '--eval_interval=2', '--max_positions=64']  # the model's (tiny.py: 128)
    proc = train(run, *args, '--max_iters=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'until iter 2 only the new MLM head trains' in proc.stdout and 'head only, lr 1.00e-03' in proc.stdout
    found = int(re.search(r'probe: (\d+) validation documents of 32 tokens or more \(probe_docs=20 asked\)', proc.stdout)[1])
    assert 2 <= found <= 20  # the probe says how many pairs its numbers rest on
    start = convert_hf.hf_to_checkpoint(str(folder))
    after = load_ckpt(run / 'ckpt.pt')
    head = {'head_dense.weight', 'head_dense.bias', 'head_ln.weight', 'head_ln.bias', 'head_bias'}
    assert all(torch.equal(after['model'][k], v) for k, v in start['model'].items() if k not in head)  # encoder untouched
    assert not torch.equal(after['model']['head_dense.weight'], start['model']['head_dense.weight'])
    evals = [json.loads(l) for l in open(run / 'metrics.jsonl') if 'val_loss' in l]
    assert evals[0]['probe_found'] == evals[1]['probe_found'] and evals[0]['probe_cos'] == evals[1]['probe_cos']
    assert 0 <= evals[0]['probe_found'] <= 1 and -1 <= evals[0]['probe_cos'] <= 1
    proc = train(run, *args, '--max_iters=3', '--init_from=resume')  # then everything trains
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_ckpt(run / 'ckpt.pt')
    assert final['head_only_until'] == 2 and not torch.equal(final['model']['wte.weight'], start['model']['wte.weight'])
    # the trained model exports as the same sentence-transformers model, its encoder adapted
    convert_hf.export(str(run / 'ckpt.pt'), str(tmp_path / 'out'))
    (a, ea), (b, eb) = st_embeddings(folder, env.docs[:4]), st_embeddings(tmp_path / 'out', env.docs[:4])
    assert [type(m).__name__ for m in b] == [type(m).__name__ for m in a] and b.max_seq_length == 40
    assert (ea - eb).abs().max() > 1e-3


# ===== convert_hf.py: export and import, parity with transformers, sentence-transformers models =====

# ---- import from HF and export back, with parity against transformers

def test_hf_import_plain_path_and_export_roundtrip(tmp_path):
    from transformers import MPNetForMaskedLM
    hf = random_hf_mlm(seed=0)
    hf.save_pretrained(tmp_path / 'hf_in')
    ckpt = tmp_path / 'ckpt.pt'
    proc = run_here('convert_hf.py', f'--from_hf={tmp_path / "hf_in"}', str(ckpt))
    assert proc.returncode == 0, proc.stderr
    model = load_model(ckpt)
    ids, mask = padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        for impl in ('sdpa', 'manual', 'flex'):
            set_impl(model, impl)
            ours = model.lm_logits(model.encode(ids, mask))
            assert (ours[keep] - theirs[keep]).abs().max() < 1e-4, impl
    proc = run_here('convert_hf.py', str(ckpt), str(tmp_path / 'hf_out'))
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
    proc = run_here('convert_hf.py', f'--from_hf={tmp_path / "enc"}', str(tmp_path / 'ckpt.pt'))
    assert proc.returncode == 0, proc.stderr
    assert 'its MLM head is new' in proc.stdout and proc.stderr == ''  # our line, not transformers' load report
    model = load_model(tmp_path / 'ckpt.pt')
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model.encode(ids, mask)
        theirs = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max() < 1e-4
    torch.testing.assert_close(model.head_ln.weight, torch.ones_like(model.head_ln.weight))  # fresh init


def test_import_ignores_hf_config_pad_id_as_hf_does(tmp_path):
    # transformers hard-codes padding_idx=1 whatever pad_token_id says; the import must do the same
    from transformers import MPNetForMaskedLM
    torch.manual_seed(0)
    cfg = convert_hf.hf_config(tiny_config(), {'pad_token_id': 0})
    hf = MPNetForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / 'hf')
    ckpt = convert_hf.hf_to_checkpoint(str(tmp_path / 'hf'))
    model = MPNet(MPNetConfig(**ckpt['model_args'])).eval()
    model.load_state_dict(ckpt['model'])
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (model.lm_logits(model.encode(ids, mask)) - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4


def realistic_model(n_layer=12, seed=0):
    """mpnet-base's shape with weights whose statistics give logits like a trained model's (up to ~30):
    larger query/key weights (peaked attention), LayerNorm gains around 1, a sharpened head."""
    torch.manual_seed(seed)
    model = MPNet(MPNetConfig(n_layer=n_layer, dropout=0.0, attn_dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'ln' in name and name.endswith('weight'):  # the LayerNorm gains
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08 if '.q.' in name or '.kv.' in name else 0.04)
        model.head_ln.weight.mul_(6)
    return model


def test_export_check_holds_for_a_realistic_12_layer_model_and_catches_a_broken_conversion():
    from transformers import MPNetForMaskedLM
    model = realistic_model()
    right = convert_hf.to_hf_state_dict(model)
    hf = MPNetForMaskedLM(convert_hf.hf_config(model.config)).eval()
    hf.load_state_dict(right, strict=False)
    diff, tol = convert_hf.parity(model, hf)
    assert 1e-4 < diff < tol  # the old fixed 1e-4 failed such a model; the scaled tolerance does not
    layer = 'mpnet.encoder.layer.5.attention.attn'
    for broken in ({f'{layer}.q.weight': right[f'{layer}.k.weight'], f'{layer}.k.weight': right[f'{layer}.q.weight']},
                   {'mpnet.encoder.relative_attention_bias.weight': torch.zeros(32, 12)}):  # q/k swapped, bias lost
        hf.load_state_dict({**right, **broken}, strict=False)
        diff, tol = convert_hf.parity(model, hf)
        assert diff > 10 * tol, broken.keys()


def test_trained_checkpoint_exports_with_tokenizer(tmp_path, small_run):
    copy_run(small_run, tmp_path)
    proc = run_here('convert_hf.py', str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoTokenizer, MPNetForMaskedLM
    tok = AutoTokenizer.from_pretrained(tmp_path / 'hf')
    hf = MPNetForMaskedLM.from_pretrained(tmp_path / 'hf').eval()
    enc = tok(['the return value of a function'], return_tensors='pt')
    assert enc['input_ids'][0, 0] == 0 and enc['input_ids'][0, -1] == 2  # <s> ... </s>
    model = load_model(tmp_path / 'ckpt.pt')
    with torch.no_grad():
        ours = model.lm_logits(model.encode(enc['input_ids']))
        theirs = hf(**enc).logits
    assert (ours - theirs).abs().max() < 1e-4
    # a tokenizer that truncates where the model stops, in a class transformers 4 knows too; ordinary file modes
    cfg = json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())
    assert tok.model_max_length == cfg['model_max_length'] == 128 and cfg['tokenizer_class'] == 'PreTrainedTokenizerFast'
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / 'hf').iterdir()} == {oct(0o666 & ~umask)}
    from transformers import pipeline
    fill = pipeline('fill-mask', model=str(tmp_path / 'hf'))
    assert len(fill('the <mask> of a function ' + 'and more words ' * 300, tokenizer_kwargs={'truncation': True})) == 5
    # exporting again replaces the earlier export whole (nothing stale stays); a folder of anything else is refused
    (tmp_path / 'hf' / 'stale.txt').write_text('from an earlier export')
    convert_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf' / 'stale.txt').exists() and (tmp_path / 'hf' / 'model.safetensors').exists()
    (tmp_path / 'link').symlink_to(tmp_path / 'hf')  # a link to an earlier export: its target is replaced
    convert_hf.export(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'link'))
    assert (tmp_path / 'link').is_symlink() and (tmp_path / 'hf' / 'model.safetensors').exists()
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    assert_clean_error(run_here('convert_hf.py', str(tmp_path / 'ckpt.pt'), str(tmp_path / 'other')), 'not empty')
    assert os.listdir(tmp_path / 'other') == ['notes.txt'] and not list(tmp_path.glob('*.partial-*'))


def test_import_without_tokenizer_says_so_and_export_has_none_rather_than_a_broken_one(tmp_path):
    from transformers import AutoTokenizer, MPNetForMaskedLM
    random_hf_mlm(seed=0).save_pretrained(tmp_path / 'weights_only')
    proc = run_here('convert_hf.py', f'--from_hf={tmp_path / "weights_only"}', str(tmp_path / 'c.pt'))
    assert proc.returncode == 0, proc.stderr
    assert 'no usable tokenizer' in proc.stdout and '--tokenizer=' in proc.stdout
    assert torch.load(tmp_path / 'c.pt', weights_only=True)['tokenizer_files'] == {}
    # what the old import carried for such a folder: transformers' empty tokenizer, which fails when used
    AutoTokenizer.from_pretrained(tmp_path / 'weights_only').save_pretrained(tmp_path / 'empty_tok')
    broken = convert_hf.read_tokenizer_files(str(tmp_path / 'empty_tok'))
    for name, files, words in (('broken', broken, 'Missing [UNK]'), ('too_big', None, "more than the model's 101")):
        # files=None: a real tokenizer, but one that gives ids the model lacks (its 200 tokens, 101 rows)
        ckpt = small_checkpoint(tmp_path / f'{name}.pt', tokenizer_files=files, vocab_size=101)
        proc = run_here('convert_hf.py', str(ckpt), str(tmp_path / f'{name}_hf'))
        assert proc.returncode == 0, proc.stderr
        note = [l for l in proc.stdout.splitlines() if l.startswith('note:')]
        assert len(note) == 1 and 'without a tokenizer' in note[0] and words in note[0], proc.stdout
        assert not {'tokenizer.json', 'tokenizer_config.json', 'vocab.txt'} & set(os.listdir(tmp_path / f'{name}_hf'))
        MPNetForMaskedLM.from_pretrained(tmp_path / f'{name}_hf')  # the model itself is fine


# ---- what cannot be converted is one line, and nothing is written

@pytest.mark.parametrize('change, words', [({'rel_buckets': 64}, '32'), ({'pad_id': 0}, 'padding_idx')])
def test_export_refuses_what_hf_cannot_represent(tmp_path, change, words):
    model = MPNet(tiny_config(**change))
    ckpt = tmp_path / 'c.pt'
    torch.save({'model': model.state_dict(), 'model_args': vars(tiny_config(**change))}, ckpt)
    assert_clean_error(run_here('convert_hf.py', str(ckpt), str(tmp_path / 'out')), words)


def test_export_missing_checkpoint_and_bad_usage(tmp_path):
    assert_clean_error(run_here('convert_hf.py', str(tmp_path / 'nope.pt'), str(tmp_path / 'out')), 'not found')
    assert_clean_error(run_here('convert_hf.py', str(tmp_path / 'nope.pt')), 'usage')
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={tmp_path / "missing"}', str(tmp_path / 'c.pt')), 'missing')


def test_hf_folders_that_cannot_be_imported_are_one_line(tmp_path):
    convert_hf.hf_config(tiny_config()).save_pretrained(tmp_path / 'no_weights')  # config.json alone
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={tmp_path / "no_weights"}', str(tmp_path / 'c.pt')),
                       'cannot load the weights', 'model.safetensors')
    run = tmp_path / 'run'  # a run folder of this project given as an HF model
    run.mkdir()
    torch.save({'model': {}, 'model_args': {}}, run / 'best.pt')
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={run}', str(tmp_path / 'c.pt')),
                       'a run folder of this project', str(run / 'best.pt'))
    assert not (tmp_path / 'c.pt').exists()
    shutil.copytree(tmp_path / 'no_weights', tmp_path / 'damaged')  # weights that are not safetensors
    (tmp_path / 'damaged' / 'model.safetensors').write_bytes(b'not a safetensors file')
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={tmp_path / "damaged"}', str(tmp_path / 'c.pt')),
                       'cannot load the weights')
    # a setting that is not a finite number passes every range ('> 0') and fails far later: refused up front
    assert_clean_error(run_here('train.py', 'config/tiny.py', '--learning_rate=1e999'), 'learning_rate', 'finite')
    assert_clean_error(run_here('finetune.py', 'x.pt', '--weight_decay=-1e999'), 'weight_decay', 'finite')


def test_export_of_non_finite_weights_is_refused_in_one_line(tmp_path):
    model = MPNet(tiny_config())
    sd = model.state_dict()
    sd['blocks.1.mlp.fc1.weight'][0, 0] = float('nan')
    torch.save({'model': sd, 'model_args': vars(tiny_config())}, tmp_path / 'c.pt')
    assert_clean_error(run_here('convert_hf.py', str(tmp_path / 'c.pt'), str(tmp_path / 'out')),
                       'non-finite weights', 'blocks.1.mlp.fc1.weight', 'best.pt')
    assert not (tmp_path / 'out').exists()


def test_a_folder_or_file_in_the_wrong_place_says_what_to_give_and_writes_nothing(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    ckpt = small_checkpoint(run / 'best.pt')
    random_hf_mlm().save_pretrained(tmp_path / 'hf')
    (tmp_path / 'empty').mkdir()
    around = sorted(os.listdir(tmp_path))
    for args, words in (
            ([run, tmp_path / 'out'], [f"'{run}' is a run folder", f'convert_hf.py {ckpt} {tmp_path / "out"}']),
            ([tmp_path / 'hf', tmp_path / 'out'], ['is an HF model folder', f'--from_hf={tmp_path / "hf"}']),
            ([tmp_path / 'empty', tmp_path / 'out'], ['is a folder, not a checkpoint']),
            ([f'--from_hf={tmp_path / "hf"}', run], [f"'{run}' is a folder", f'{run / "ckpt.pt"}']),
            ([f'--from_hf={tmp_path / "hf"}', f'{tmp_path / "new"}/'], ['is a folder', f'{tmp_path / "new" / "ckpt.pt"}']),
            ([f'--from_hf={ckpt}', tmp_path / 'c.pt'], ['is a checkpoint of this project', 'needs no import']),
            ([f'--from_hf={tmp_path / "hf" / "config.json"}', tmp_path / 'c.pt'], ['is a file', repr(str(tmp_path / 'hf'))]),
            (['--from_hf=', tmp_path / 'c.pt'], ['empty', '--from_hf=NAME_OR_DIR'])):
        assert_clean_error(run_here('convert_hf.py', *map(str, args)), *words)
    assert sorted(os.listdir(tmp_path)) == around and os.listdir(run) == ['best.pt']


# a checkpoint is data: the file names it carries never lead out of the export folder
@pytest.mark.parametrize('change', [{'st_files': '../../outside.txt'}, {'st_files': '/tmp/outside.txt'},
                                    {'tokenizer_files': '../outside.txt'}, {'st_path': '../../outside'}])
def test_a_checkpoint_whose_file_names_lead_out_of_the_export_is_refused(tmp_path, change):
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'a' / 'b' / 'st', str(tmp_path / 'tok'), legacy=True)
    ckpt = convert_hf.hf_to_checkpoint(str(folder))
    (key, name), = change.items()
    if key == 'st_path':
        ckpt['st_path'] = name
    else:
        ckpt[key][name] = 'written where it should not be'
    torch.save(ckpt, tmp_path / 'a' / 'b' / 'c.pt')
    around = {root: sorted(names) for root, _, names in os.walk(tmp_path)}
    assert_clean_error(run_here('convert_hf.py', str(tmp_path / 'a' / 'b' / 'c.pt'), str(tmp_path / 'a' / 'b' / 'hf')),
                       'carries files to be written outside the export', repr(name), 'nothing was written')
    assert {root: sorted(names) for root, _, names in os.walk(tmp_path)} == around
    assert not os.path.exists('/tmp/outside.txt')
    # a sentence-transformers folder whose modules.json leads out of it is refused at the import
    modules = json.loads((folder / 'modules.json').read_text())
    modules[1]['path'] = '../../tok'
    (folder / 'modules.json').write_text(json.dumps(modules))
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={folder}', str(tmp_path / 'd.pt')), "'../../tok'",
                       'outside the folder')


# ---- sentence-transformers models: a drop-in round trip, the trained pooler, their lengths in every layout

def test_sentence_transformers_round_trip_is_a_drop_in(env, tmp_path, capsys):
    texts = [d[:300] for d in env.docs[:6]] + [' '.join(env.docs[6:12])]  # the last one is cut at max_seq_length
    for legacy, pooling in ((True, 'mean'), (False, 'cls')):
        folder = st_folder(tmp_path / f'st{legacy}', env.tok_dir, pooling=pooling, legacy=legacy)
        capsys.readouterr()
        convert_hf.import_hf(str(folder), str(tmp_path / f'ckpt{legacy}.pt'))
        said = capsys.readouterr()
        assert said.err == '' and said.out.count('\n') == 2 and 'Pooling -> Normalize carried' in said.out  # ours only
        assert 'its MLM head is new' in said.out
        convert_hf.export(str(tmp_path / f'ckpt{legacy}.pt'), str(tmp_path / f'out{legacy}'))
        (a, ea), (b, eb) = st_embeddings(folder, texts), st_embeddings(tmp_path / f'out{legacy}', texts)
        assert [type(m).__name__ for m in b] == [type(m).__name__ for m in a] == ['Transformer', 'Pooling', 'Normalize']
        assert b.max_seq_length == a.max_seq_length == 40 and b[1].get_config_dict() == a[1].get_config_dict()
        assert (ea - eb).abs().max() < 1e-5, legacy
    # a module with weights of its own cannot be carried: refused in one line, never dropped
    dense = st_folder(tmp_path / 'dense', env.tok_dir, legacy=True)
    modules = json.loads((dense / 'modules.json').read_text())
    (dense / 'modules.json').write_text(json.dumps(modules + [dict(idx=3, name='3', path='3_Dense',
                                                                   type='sentence_transformers.models.Dense')]))
    assert_clean_error(run_here('convert_hf.py', f'--from_hf={dense}', str(tmp_path / 'd.pt')), '3_Dense', 'cannot be carried')


def check_loads(original, export):
    """In a fresh process (whatever transformers reports on loading is seen): the export loads in
    SentenceTransformer and AutoModel; prints its pooler output's largest difference from the original's."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    SentenceTransformer(export, device='cpu')
    a, b = AutoModel.from_pretrained(original).eval(), AutoModel.from_pretrained(export).eval()
    enc = AutoTokenizer.from_pretrained(export)(['the pooler of a sentence model', 'and another'], padding=True, return_tensors='pt')
    with torch.no_grad():
        print('pooler_output diff', (a(**enc).pooler_output - b(**enc).pooler_output).abs().max().item())


def test_sentence_model_round_trip_keeps_the_pooler_and_loads_without_a_report(tmp_path):
    from transformers import MPNetModel
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'st', str(tmp_path / 'tok'), legacy=True)  # all-mpnet-base-v2's layout
    convert_hf.import_hf(str(folder), str(tmp_path / 'c.pt'))
    ckpt = torch.load(tmp_path / 'c.pt', weights_only=True)
    original = MPNetModel.from_pretrained(folder)
    assert torch.equal(ckpt['hf_extra']['pooler.weight'], original.pooler.dense.weight)
    convert_hf.export(str(tmp_path / 'c.pt'), str(tmp_path / 'out'))
    back = MPNetModel.from_pretrained(tmp_path / 'out')
    assert torch.equal(back.pooler.dense.weight, original.pooler.dense.weight)
    assert torch.equal(back.pooler.dense.bias, original.pooler.dense.bias)
    proc = run_cli(*calling(check_loads, folder, tmp_path / 'out'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split('pooler_output diff')[1]) < 1e-5
    assert 'LOAD REPORT' not in proc.stderr + proc.stdout and 'UNEXPECTED' not in proc.stderr + proc.stdout, proc.stderr


def moved_into(folder, sub):
    """folder with its Transformer module moved into the subfolder sub (the layout of older sentence-transformers
    models, e.g. 0_BERT/), modules.json saying so."""
    (folder / sub).mkdir()
    for name in ('config.json', 'model.safetensors', 'sentence_bert_config.json', 'tokenizer.json', 'tokenizer_config.json'):
        os.rename(folder / name, folder / sub / name)
    modules = json.loads((folder / 'modules.json').read_text())
    modules[0]['path'] = sub
    (folder / 'modules.json').write_text(json.dumps(modules))
    return folder


def lengths(out, sub=''):
    read = lambda name: json.loads((out / sub / name).read_text())
    return (read('config.json')['max_position_embeddings'], read('sentence_bert_config.json')['max_seq_length'],
            read('tokenizer_config.json')['model_max_length'])


LONG_TEXT = ' '.join(['karito menslover understanding prefixedly'] * 60)  # over 200 tokens


def st_reads(out):
    """(max_seq_length, tokens of a long text) as SentenceTransformer loads the export; it embeds the long text."""
    from sentence_transformers import SentenceTransformer
    with convert_hf.quiet_transformers():
        st = SentenceTransformer(str(out), device='cpu')
    assert torch.isfinite(st.encode([LONG_TEXT], convert_to_tensor=True)).all()
    return st.max_seq_length, st.tokenize([LONG_TEXT])['input_ids'].shape[1]


@pytest.mark.parametrize('sub', ['', '0_Transformer'])
def test_an_extended_sentence_model_exports_its_new_length_in_every_layout(tmp_path, sub):
    # all-mpnet-base-v2's shape in small: 64 positions, max_seq_length 48 (its 512 and 384), then train.py
    # --max_positions=96 (checkpoint.extend_checkpoint): the export reads all 96 in every file
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'st', str(tmp_path / 'tok'), legacy=True, max_seq_length=48)
    if sub:
        moved_into(folder, sub)
    assert lengths(folder, sub)[:2] == (66, 48)
    ckpt = convert_hf.hf_to_checkpoint(str(folder))
    assert ckpt['st_path'] == sub
    assert 'positions: 64 -> 96' in checkpoint.extend_checkpoint(ckpt, 96)
    checkpoint.save_checkpoint(ckpt, str(tmp_path / 'long.pt'))
    proc = run_here('convert_hf.py', str(tmp_path / 'long.pt'), str(tmp_path / 'out'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'SentenceTransformer loads it: Transformer -> Pooling -> Normalize, max_seq_length 96' in proc.stdout
    assert lengths(tmp_path / 'out', sub) == (98, 96, 96)
    assert st_reads(tmp_path / 'out') == (96, 96)


def test_a_sentence_model_made_here_at_384_tokens_and_extended_to_1024_reads_1024(tmp_path):
    # contrastive.py's layout (all-mpnet-base-v2's: Transformer at the root, max_seq_length 384) on a model of 512
    # positions, whose table train.py --max_positions=1024 then extended: the export reads 1024 in every file
    from test_all import tiny_model
    tok = hf_wordpiece()
    model = tiny_model(vocab_size=len(tok), max_positions=512)
    tok.save_pretrained(tmp_path / 'tok')
    tokenizer_files = convert_hf.read_tokenizer_files(str(tmp_path / 'tok'))
    tokenizer_files['tokenizer_config.json'] = json.dumps({**json.loads(tokenizer_files['tokenizer_config.json']),
                                                           'model_max_length': 512})
    modules = [dict(idx=i, name=str(i), path=path, type=f'sentence_transformers.models.{kind}') for i, (path, kind)
               in enumerate((('', 'Transformer'), ('1_Pooling', 'Pooling'), ('2_Normalize', 'Normalize')))]
    pooling = dict(word_embedding_dimension=32, pooling_mode_cls_token=False, pooling_mode_mean_tokens=True)
    st_files = {'modules.json': json.dumps(modules), 'config_sentence_transformers.json': '{}',
                '1_Pooling/config.json': json.dumps(pooling),
                'sentence_bert_config.json': json.dumps(dict(max_seq_length=384, do_lower_case=False))}
    ckpt = dict(model=model.state_dict(), model_args=vars(model.config), tokenizer_files=tokenizer_files,
                st_files=st_files, st_path='', iter_num=5)
    checkpoint.extend_checkpoint(ckpt, 1024)
    checkpoint.save_checkpoint(ckpt, str(tmp_path / 'c.pt'))
    convert_hf.export(str(tmp_path / 'c.pt'), str(tmp_path / 'out'))
    assert lengths(tmp_path / 'out') == (1026, 1024, 1024)
    assert st_reads(tmp_path / 'out')[0] == 1024


def test_a_sentence_model_never_reads_past_its_position_table(tmp_path):
    # a folder whose max_seq_length (384) exceeds its 64 positions: SentenceTransformer would index past the table
    # on any long text (IndexError); the export reads what the model has
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'st', str(tmp_path / 'tok'), legacy=True, max_seq_length=384)
    convert_hf.import_hf(str(folder), str(tmp_path / 'c.pt'))
    convert_hf.export(str(tmp_path / 'c.pt'), str(tmp_path / 'out'))
    assert lengths(tmp_path / 'out') == (66, 64, 64)
    assert st_reads(tmp_path / 'out') == (64, 64)
    # within the table, the length is the model's own choice, carried as it came
    folder = st_folder(tmp_path / 'st40', str(tmp_path / 'tok'), legacy=True, max_seq_length=40)
    convert_hf.import_hf(str(folder), str(tmp_path / 'c40.pt'))
    convert_hf.export(str(tmp_path / 'c40.pt'), str(tmp_path / 'out40'))
    assert (tmp_path / 'out40' / 'sentence_bert_config.json').read_text() == (folder / 'sentence_bert_config.json').read_text()
    assert st_reads(tmp_path / 'out40') == (40, 40)


# ---- the destination: never emptied before the new export is complete, whatever path spells it

def exported(folder):
    return {'config.json', 'model.safetensors', 'nano_mpnet.json', 'tokenizer.json'} <= set(os.listdir(folder))


def test_export_into_the_folder_we_stand_in_and_every_spelling_of_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / 'O'
    run.mkdir()
    ckpt = small_checkpoint(run / 'best.pt')
    convert_hf.export(str(ckpt), str(run / 'hf'))
    inode = os.stat(run / 'hf').st_ino
    monkeypatch.chdir(run / 'hf')  # cd O/hf && python convert_hf.py ../best.pt .
    for spelling in ('.', './', str(run / 'hf') + '/', '../hf', '../hf/../hf'):
        convert_hf.export('../best.pt', spelling)
        assert exported('.') and exported(run / 'hf'), spelling  # the shell standing in it still sees the export
        assert os.stat(run / 'hf').st_ino == inode  # the same folder, its content replaced
    assert json.loads((run / 'hf' / 'nano_mpnet.json').read_text())['iter_num'] == 7
    (tmp_path / 'link').symlink_to(run / 'hf')
    convert_hf.export('../best.pt', str(tmp_path / 'link') + '/')
    assert (tmp_path / 'link').is_symlink() and exported(run / 'hf')
    empty = tmp_path / 'E'
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty folder we stand in
    convert_hf.export(str(ckpt), '.')
    assert exported(empty)
    assert sorted(os.listdir(tmp_path)) == ['E', 'O', 'link'] and sorted(os.listdir(run)) == ['best.pt', 'hf']


def test_a_folder_that_holds_the_checkpoint_is_never_an_export_destination(tmp_path, monkeypatch):
    run = tmp_path / 'O'
    run.mkdir()
    ckpt = small_checkpoint(run / 'best.pt')
    monkeypatch.chdir(run)
    for dest in ('.', './', str(run), 'hf/..'):
        with pytest.raises(convert_hf.ConvertError, match='holds the checkpoint being exported'):
            convert_hf.export('best.pt', dest)
    # an earlier export that a checkpoint was put into: the checkpoint is not the export's to remove
    convert_hf.export('best.pt', 'hf')
    (run / 'hf' / 'copy.pt').write_bytes(ckpt.read_bytes())
    with pytest.raises(convert_hf.ConvertError, match='copy.pt'):
        convert_hf.export('best.pt', 'hf')
    assert (run / 'hf' / 'copy.pt').read_bytes() == ckpt.read_bytes() and exported(run / 'hf')
    assert sorted(os.listdir(run)) == ['best.pt', 'hf']  # no staging folder left


def test_export_destination_that_cannot_be_one_is_one_line(tmp_path):
    ckpt = small_checkpoint(tmp_path / 'c.pt')
    (tmp_path / 'afile').write_text('mine')
    for dest, words in (('/proc/x', ['/proc/x']), (tmp_path / 'no' / 'such' / 'hf', ['does not exist']),
                        (tmp_path / 'afile', ['is a file']), (tmp_path / 'afile' / 'hf', ['is a file'])):
        proc = run_here('convert_hf.py', str(ckpt), str(dest))
        assert_clean_error(proc, *words)
        assert 'not empty' not in proc.stderr
    assert (tmp_path / 'afile').read_text() == 'mine' and not (tmp_path / 'no').exists()


# an OUT_DIR that is a mount point (a volume mounted for the export, a drive's root): its parent is another
# file system, which a rename cannot cross; the export is built inside it
def test_export_into_a_mount_point_and_over_an_earlier_export_there(tmp_path):
    ckpt = small_checkpoint(tmp_path / 'c.pt')
    py = f'{sys.executable} convert_hf.py {ckpt} {tmp_path}/volume'
    proc = in_private_mount(f'''
        mkdir -p {tmp_path}/volume && mount -t tmpfs tmpfs {tmp_path}/volume
        {py} 2>&1 || true
        echo ---; ls -A {tmp_path}/volume; echo ===
        sh -c true & wait $!
        mkdir {tmp_path}/volume/.nano_mpnet.old-$! {tmp_path}/volume/.nano_mpnet.partial-$!
        mv {tmp_path}/volume/nano_mpnet.json {tmp_path}/volume/config.json {tmp_path}/volume/.nano_mpnet.old-$!/
        echo half > {tmp_path}/volume/config.json
        {py} 2>&1 || true
        echo ---; ls -A {tmp_path}/volume; echo ===
        ls -A {tmp_path}''')
    if proc is None:
        pytest.skip('unshare -m is not allowed here: no private tmpfs to mount')
    (first, first_ls), (mended, mended_ls), (around,) = [part.split('---') for part in proc.stdout.split('===')]
    files = ['config.json', 'model.safetensors', 'nano_mpnet.json', 'tokenizer.json', 'tokenizer_config.json']
    assert first.strip().startswith(f'wrote {tmp_path}/volume (config.json,'), proc.stdout + proc.stderr
    assert first_ls.split() == mended_ls.split() == files, proc.stdout  # nothing hidden left
    # over that export, killed while swapping (inside the volume): the earlier export back, then replaced; the
    # leftovers removed
    assert 'restored the earlier export' in mended and mended.count('removed ') == 2, mended
    assert 'error' not in proc.stdout and around.split() == ['c.pt', 'volume']


# ---- a failed write, a signal or a kill during an export or import: one line, the earlier one kept

def files_of(folder):
    """{relative path: bytes} of every file under folder: what a failed export must leave as it was."""
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), 'rb').read()
            for root, _, names in os.walk(folder) for n in names}


def file_size_limit(limit):
    """preexec_fn: a write past limit bytes fails half-way with EFBIG 'File too large' (python ignores SIGXFSZ), as
    on a full disk; the hard limit stays, so that a process may raise it again."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def sentence_checkpoint(tmp_path):
    """A sentence-transformers MPNet imported as a checkpoint: it carries tokenizer files and module files."""
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'st', str(tmp_path / 'tok'), legacy=True)
    convert_hf.import_hf(str(folder), str(tmp_path / 'c.pt'))
    return folder, tmp_path / 'c.pt'


def failing_writes(ckpt_path, hf, new, weights):
    """In a process of its own, a file size limit set and raised for each case: every kind of file the export writes,
    made the one file over the limit (the model's config, a tokenizer file, a sentence-transformers module's files),
    and the weights into a new folder; prints one line a case."""
    weights = int(weights)
    for case, out, limit in (('config.json', hf, 300), ('tokenizer.json', hf, weights + 4096),
                             ('1_Pooling/config.json', hf, weights + 4096), ('modules.json', hf, weights + 4096),
                             ('model.safetensors', new, weights // 2)):
        ckpt = torch.load(ckpt_path, weights_only=True)
        carried = ckpt['tokenizer_files'] if case == 'tokenizer.json' else ckpt['st_files']
        if case in carried:
            carried[case] += '\n' * 2 * limit  # still valid JSON
        torch.save(ckpt, f'{ckpt_path}.case.pt')
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            convert_hf.export(f'{ckpt_path}.case.pt', out)
            print(case, 'written')
        except convert_hf.ConvertError as e:
            print(case, 'error:', e)
        except Exception as e:
            print(case, 'uncaught', type(e).__name__, str(e).splitlines()[0])
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        os.remove(f'{ckpt_path}.case.pt')


EFBIG_FIX = 'a file size limit (ulimit -f) or the file system caps the size of a file: raise the limit, or export to another disk'


def test_finding10_a_full_disk_is_one_line_naming_the_file_and_keeps_the_earlier_export(tmp_path):
    folder, ckpt = sentence_checkpoint(tmp_path)
    hf = tmp_path / 'hf'
    convert_hf.export(str(ckpt), str(hf))
    env = {**os.environ, 'TMPDIR': str(tmp_path / 'tmp')}
    (tmp_path / 'tmp').mkdir()
    before, around = files_of(hf), sorted(os.listdir(tmp_path))
    weights = len(before['model.safetensors'])
    # the user's command, the weights cut short half-way
    proc = subprocess.run([sys.executable, 'convert_hf.py', str(ckpt), str(hf)], cwd=HERE, env=env, text=True,
                          capture_output=True, preexec_fn=file_size_limit(weights // 2), timeout=300)
    assert_clean_error(proc, f'could not write {hf}/model.safetensors (File too large', ' free there):',
                       f'the earlier export there is unchanged; {EFBIG_FIX}')
    assert files_of(hf) == before and sorted(os.listdir(tmp_path)) == around and not os.listdir(tmp_path / 'tmp')
    proc = subprocess.run([sys.executable, *calling(failing_writes, ckpt, hf, tmp_path / 'new', weights)], cwd=HERE,
                          env=env, text=True, capture_output=True, timeout=300)
    said = dict(line.split(' ', 1) for line in proc.stdout.splitlines())
    assert list(said) == ['config.json', 'tokenizer.json', '1_Pooling/config.json', 'modules.json',
                          'model.safetensors'], proc.stdout + proc.stderr
    for case, line in said.items():
        where, kept = (tmp_path / 'new', 'nothing was written') if case == 'model.safetensors' else \
            (hf, 'the earlier export there is unchanged')
        assert line.startswith(f'error: could not write {where}/{case} (File too large'), line
        assert line.endswith(f'{kept}; {EFBIG_FIX}'), line
    assert files_of(hf) == before and sorted(os.listdir(tmp_path)) == around and not os.listdir(tmp_path / 'tmp')


def test_finding10_an_import_that_cannot_write_is_one_line_and_keeps_the_checkpoint(tmp_path):
    folder, ckpt = sentence_checkpoint(tmp_path)
    env = {**os.environ, 'TMPDIR': str(tmp_path / 'tmp')}
    (tmp_path / 'tmp').mkdir()
    before, around = ckpt.read_bytes(), sorted(os.listdir(tmp_path))
    tokenizer = (folder / 'tokenizer.json').stat().st_size
    for limit, words in ((len(before) // 2, [f'could not write {ckpt} (File too large', 'the previous c.pt is unchanged']),
                         # the import checks the tokenizer in a temporary folder first
                         (tokenizer // 2, [f"could not write {tmp_path / 'tmp'}", 'File too large', 'TMPDIR'])):
        proc = subprocess.run([sys.executable, 'convert_hf.py', f'--from_hf={folder}', str(ckpt), '--overwrite'],
                              cwd=HERE, env=env, text=True, capture_output=True, preexec_fn=file_size_limit(limit),
                              timeout=300)
        assert_clean_error(proc, *words)
        assert ckpt.read_bytes() == before and sorted(os.listdir(tmp_path)) == around
        assert not os.listdir(tmp_path / 'tmp')


def test_finding10_a_really_full_disk_says_how_much_the_export_needs(tmp_path):
    folder, ckpt = sentence_checkpoint(tmp_path)
    convert_hf.export(str(ckpt), str(tmp_path / 'hf'))
    proc = in_private_mount(f'''
        mkdir -p {tmp_path}/disk && mount -t tmpfs -o size=192k tmpfs {tmp_path}/disk
        cp -r {tmp_path}/hf {tmp_path}/disk/
        {sys.executable} convert_hf.py {ckpt} {tmp_path}/disk/hf 2>&1 || true
        echo ===
        ls -A {tmp_path}/disk {tmp_path}/disk/hf''')
    if proc is None:
        pytest.skip('unshare -m is not allowed here: no private tmpfs for the full-disk case')
    said, listed = proc.stdout.split('===')
    assert re.fullmatch(re.escape(f'error: could not write {tmp_path}/disk/hf/model.safetensors (No space left on device; ')
                        + r'\d\d KiB free there\): the earlier export there is unchanged; the export takes about 1\d\d '
                        r'KiB: free some space, or export to another disk', said.strip()), said
    assert listed.split() == [f'{tmp_path}/disk:', 'hf', f'{tmp_path}/disk/hf:', '1_Pooling', 'config.json',
                              'config_sentence_transformers.json', 'model.safetensors', 'modules.json',
                              'nano_mpnet.json', 'sentence_bert_config.json', 'tokenizer.json',
                              'tokenizer_config.json'], listed


def mid_size_checkpoint(path):
    """A model whose export takes a second or so (21 MB of weights): long enough to be signalled in the middle."""
    args = dict(vocab_size=8000, n_layer=4, n_head=4, n_embd=256, n_inner=1024, max_positions=128)
    torch.manual_seed(0)
    from model import MPNet, MPNetConfig
    checkpoint.save_checkpoint(dict(model=MPNet(MPNetConfig(**args)).state_dict(), model_args=args, iter_num=3), str(path))
    return path


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_export_is_one_line_and_leaves_the_earlier_export_and_no_staging(tmp_path, sig):
    ckpt = mid_size_checkpoint(tmp_path / 'c.pt')
    convert_hf.export(str(ckpt), str(tmp_path / 'hf'))
    before, around = files_of(tmp_path / 'hf'), sorted(os.listdir(tmp_path))
    proc = subprocess.Popen([sys.executable, 'convert_hf.py', str(ckpt), str(tmp_path / 'hf')], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    while not [n for n in os.listdir(tmp_path) + os.listdir(tmp_path / 'hf') if '.partial-' in n] and proc.poll() is None:
        time.sleep(0.01)  # until the new export is being built: signal it then
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    assert_clean_error(subprocess.CompletedProcess([], proc.returncode, out, err), f'interrupted ({sig.name})',
                       'an earlier export or checkpoint there is unchanged')
    assert files_of(tmp_path / 'hf') == before and sorted(os.listdir(tmp_path)) == around


def test_an_import_killed_while_saving_leaves_a_temp_file_that_the_next_import_removes(tmp_path):
    random_hf_mlm().save_pretrained(tmp_path / 'hf')
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # a PID that is gone
    killed, live = tmp_path / f'c.pt.{dead.pid}.123456.tmp', tmp_path / f'c.pt.{os.getpid()}.1.tmp'
    killed.write_bytes(b'half a checkpoint')
    live.write_bytes(b'another import, still writing')
    proc = run_here('convert_hf.py', f'--from_hf={tmp_path / "hf"}', str(tmp_path / 'c.pt'))
    assert proc.returncode == 0, proc.stderr
    assert f'removed {killed}: left by import process {dead.pid}, which is gone' in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ['c.pt', live.name, 'hf']


def test_an_export_killed_mid_build_is_mended_by_the_next_one(tmp_path):
    ckpt = mid_size_checkpoint(tmp_path / 'c.pt')
    convert_hf.export(str(ckpt), str(tmp_path / 'hf'))
    before = files_of(tmp_path / 'hf')
    proc = subprocess.Popen([sys.executable, 'convert_hf.py', str(ckpt), str(tmp_path / 'hf')], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f'hf.partial-{proc.pid}'
    while not (staging / 'model.safetensors').exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()  # kill -9 while the new export is being built
    proc.wait()
    assert staging.is_dir() and files_of(tmp_path / 'hf') == before
    proc = run_here('convert_hf.py', str(ckpt), str(tmp_path / 'hf'))
    assert proc.returncode == 0, proc.stderr
    assert f'removed {staging}: left by export process' in proc.stdout
    assert sorted(files_of(tmp_path / 'hf')) == sorted(before) and sorted(os.listdir(tmp_path)) == ['c.pt', 'hf']


def test_an_export_killed_while_replacing_another_is_mended_by_the_next(tmp_path):
    ckpt = small_checkpoint(tmp_path / 'best.pt')
    convert_hf.export(str(ckpt), str(tmp_path / 'hf'))
    before = sorted(os.listdir(tmp_path / 'hf'))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()  # a PID that is gone
    # killed mid-swap: the earlier export half moved aside (its mark first), the new one unfinished beside it
    aside, partial = tmp_path / f'hf.old-{dead.pid}', tmp_path / f'hf.partial-{dead.pid}'
    aside.mkdir()
    partial.mkdir()
    for name in ('nano_mpnet.json', 'config.json'):
        os.rename(tmp_path / 'hf' / name, aside / name)
    (partial / 'model.safetensors').write_bytes(b'half')
    proc = run_here('convert_hf.py', str(ckpt), str(tmp_path / 'hf'))
    assert proc.returncode == 0, proc.stderr
    assert 'restored the earlier export' in proc.stdout and f'removed {partial}' in proc.stdout
    assert sorted(os.listdir(tmp_path / 'hf')) == before and not aside.exists() and not partial.exists()


# ===== bench.py: a step measured on the CPU, and the model a run starts from =====

def test_bench_runs_on_cpu(tmp_path):
    small = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=2', '--n_embd=64', '--n_head=2',
             '--n_inner=128', '--batch_size=4', '--burn_in=1', '--steps=2']
    proc = run_here('bench.py', *small, '--block_size=67', '--vocab_size=1000', f'--profile={tmp_path}/trace.json',
                   '--gradient_accumulation_steps=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'no GPU: measuring config/tiny.py' in out  # no config file on a CPU: the tiny one, with these overrides
    assert 'device: cpu, torch ' in out and 'attn_impl=sdpa' in out
    step = re.search(r'step: ([\d.]+) ms, ([\d,]+) tokens/s', out)
    assert step and float(step.group(1)) > 0 and int(step.group(2).replace(',', '')) > 0
    # a step is an optimizer step, as train.py's: 2 micro-batches of 4 x 67
    assert int(step.group(2).replace(',', '')) == pytest.approx(2 * 4 * 67 / (float(step.group(1)) / 1000), rel=0.01)
    assert 'batch 4 x 67 tokens x 2 accum, 10 predicted per sequence, random tokens' in out
    assert 'MFU n/a (unknown device peak)' in out  # no made-up peak for a CPU
    assert re.search(r'permutation sampler: [\d.]+ ms per batch, [\d.]+% of the step', out)
    assert 'Self CPU time total' in out and 'aten::mm' in out  # the profile summary
    assert json.load(open(tmp_path / 'trace.json'))['traceEvents']
    # a training config file as it is: train.py's I/O keys are accepted and ignored, the run's data is used
    proc = run_here('data.py', '--dataset=pydocs', '--tokenizer=train', '--vocab_size=8192', '--val_frac=0.05')
    assert proc.returncode == 0, proc.stderr  # where train.py config/tiny.py prepares it
    proc = run_here('bench.py', 'config/tiny.py', '--out_dir=elsewhere', '--wandb_log=True', '--max_iters=3',
                   '--n_layer=2', '--batch_size=4', '--burn_in=1', '--steps=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'batch 4 x 128 tokens x 1 accum, 19 predicted per sequence, real data from data/pydocs-train8192' in proc.stdout
    assert not os.path.exists(os.path.join(HERE, 'elsewhere'))
    # another objective's step, with doc_mask (its FLOPs are counted from its own layout: see the FLOP test)
    proc = run_here('bench.py', *small, '--block_size=67', '--vocab_size=1000', '--objective=plm', '--doc_mask=True')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'objective=plm, doc_mask=True' in proc.stdout
    step = re.search(r'step: ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) TFLOP/s', proc.stdout)
    assert step and float(step.group(1)) > 0
    assert_clean_error(run_here('bench.py', '--batch_size=x'), 'batch_size')
    assert_clean_error(run_here('bench.py', '--dtype=float16'), 'dtype')
    assert_clean_error(run_here('bench.py', '--attn_impl=fast'), 'attn_impl', 'sdpa')
    assert_clean_error(run_here('bench.py', *small, '--attn_impl=flex'), 'flex', 'CPU')
    # more than this machine holds: refused before it starts, with what to do instead
    assert_clean_error(run_here('bench.py', 'config/large.py', '--device=cpu', '--dtype=float32', '--batch_size=256'),
                       'GB on the CPU', 'config/tiny.py')


def save_tiny_checkpoint(path, **kw):
    """A checkpoint as train.py writes one (its model_args hold the run's kernel and dropout choices too)."""
    args = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=64, n_inner=128, max_positions=64, dropout=0.1,
                attn_dropout=0.1, attn_impl='sdpa', rope=False, grad_checkpoint=False, objective='mpnet')
    args.update(kw)
    torch.manual_seed(0)
    checkpoint.save_checkpoint(dict(model=MPNet(MPNetConfig(**args)).state_dict(), model_args=args, iter_num=0), str(path))


def test_bench_measures_the_model_of_a_checkpoint_resume_and_an_hf_folder(tmp_path):
    # --dataset names nothing prepared, so that tokens are random and the vocabulary is the model's
    small = ['--device=cpu', '--dtype=float32', '--compile=False', '--batch_size=2', '--block_size=40',
             '--burn_in=1', '--steps=1', f'--dataset={tmp_path}/unprepared']

    def bench(*args):
        proc = run_here('bench.py', *small, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        step = re.search(r'step: ([\d.]+) ms, .* loss ([\d.]+)', proc.stdout)
        assert step and float(step.group(1)) > 0 and 0 < float(step.group(2)) < 20, proc.stdout
        return proc.stdout

    # a checkpoint file: its architecture (rotary, 3 layers) whatever the config says; the kernel is this run's
    save_tiny_checkpoint(tmp_path / 'rope.pt', n_layer=3, rope=True)
    out = bench(f'--init_from={tmp_path}/rope.pt', '--attn_impl=manual')
    assert 'model: ' in out and '3 layers x 64 (rotary positions)' in out and 'attn_impl=manual' in out
    # resume: out_dir's ckpt.pt
    (tmp_path / 'run').mkdir()
    save_tiny_checkpoint(tmp_path / 'run' / 'ckpt.pt', n_layer=1, n_embd=48)
    out = bench('--init_from=resume', f'--out_dir={tmp_path}/run')
    assert '1 layers x 48;' in out
    # an HF MPNetForMaskedLM folder, offline (its dropout is replaced by the run's, as train.py does)
    random_hf_mlm(seed=0, n_layer=3, vocab_size=300).save_pretrained(tmp_path / 'hf')
    out = bench(f'--init_from={tmp_path}/hf', '--dropout=0.0')
    assert f"imported '{tmp_path}/hf'" in out and '3 layers x 32;' in out
    # what cannot be read is one line
    (tmp_path / 'empty').mkdir()
    assert_clean_error(run_here('bench.py', *small, '--init_from=resume', f'--out_dir={tmp_path}/empty'),
                       'ckpt.pt', 'not found')


# ===== plot.py: a damaged log, --out, runs it cannot compare, no torn file, the scores panel =====

# ---- the curves: damaged logs, --out checked first, different objectives said, a failed write

PNG = b'\x89PNG\r\n\x1a\n'


def test_malformed_metrics_lines_are_skipped_with_one_warning(tmp_path):
    bad = ['{"loss": 1.0}',                   # line 2: valid JSON, no iter
           '[1, 2]', '3', '"text"', 'null',    # JSON values that are not objects
           b'\xff\xfe not utf-8',             # undecodable bytes
           '{"iter": "10", "loss": 1.0}', '{"iter": 10.5}', '{"iter": true}', '{"iter": null}', '{"iter": -1}',
           '{"iter": NaN}', '[' * 100_000]    # iter not a non-negative int; nesting deep enough for RecursionError
    lines = [good(0), *bad, good(5), '', good(10), json.dumps(dict(iter=15, loss=float('nan'), grad_norm=float('inf'))),
             good(20, note='x'), json.dumps(dict(iter=25, val_loss=4.0, val_acc=0.2)), '{"iter": 30, "lo']  # cut short
    run = write_log(tmp_path / 'run', lines)
    proc = run_here('plot.py', str(run))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'skipped 14 malformed lines (the first is line 2)' in warnings[0], proc.stderr
    assert (run / 'curves.png').read_bytes()[:8] == PNG
    # the reader others reuse (train.py's resume): valid records in file order, NaN/Infinity values kept as logged
    records = plot.read_metrics(str(run), warn=False)
    assert [r['iter'] for r in records] == [0, 5, 10, 15, 20, 25]
    assert plot.read_metrics(str(run / 'metrics.jsonl'), warn=False) == records
    assert plot.series(records, 'loss')[0] == [0, 5, 10, 20]  # a non-finite loss is a gap in the curve
    # importing plot.py (as checkpoint.py may) pulls in neither matplotlib nor torch
    # a string, not a function of this file: importing test_all imports torch and matplotlib, what this checks for
    check = "import sys, plot; assert not {'matplotlib', 'torch'} & set(sys.modules), sorted(sys.modules)"
    assert subprocess.run([sys.executable, '-c', check], cwd=HERE).returncode == 0


def test_plot_survives_numbers_too_large_for_a_float(tmp_path):
    run = write_log(tmp_path / 'run', [good(0), '{"iter": 5, "loss": 1' + '0' * 400 + '}', good(10),
                                       '{"iter": 1' + '0' * 30 + ', "loss": 1.0}'])
    proc = run_here('plot.py', str(run))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'skipped 1 malformed line (the first is line 4)' in proc.stderr  # an iteration no run reaches
    assert plot.series(plot.read_metrics(str(run), warn=False), 'loss')[0] == [0, 10]


def test_out_is_checked_before_drawing(tmp_path):
    run = write_log(tmp_path / 'run', [good(0), good(5)])
    for out, words in [(tmp_path / 'missing_dir' / 'x.png', ["the folder '", "missing_dir' does not exist"]),
                       (tmp_path / 'x.txt', ['cannot write .txt files', '.png, .pdf or .svg']),
                       (tmp_path / 'x', ['no extension']),
                       (run, ['is a folder'])]:
        proc = run_here('plot.py', str(run), f'--out={out}')
        assert_clean_error(proc, *words)
    assert sorted(os.listdir(tmp_path)) == ['run'] and os.listdir(run) == ['metrics.jsonl']
    # the extension names the format
    assert run_here('plot.py', str(run), f'--out={tmp_path / "c.pdf"}').returncode == 0
    assert run_here('plot.py', str(run), f'--out={tmp_path / "c.svg"}').returncode == 0
    assert (tmp_path / 'c.pdf').read_bytes()[:5] == b'%PDF-' and b'<svg' in (tmp_path / 'c.svg').read_bytes()[:2000]


def test_nothing_to_plot_is_one_line_and_writes_nothing(tmp_path):
    empty = write_log(tmp_path / 'empty', [])
    only_bad = write_log(tmp_path / 'bad', ['{"loss": 1.0}', '{"iter": 3, "lr": "x"}', '{"iter": 4, "lo'])
    for run in (empty, only_bad):
        proc = run_here('plot.py', str(run))
        assert_clean_error(proc, 'metrics.jsonl holds nothing to plot yet')
        assert not (run / 'curves.png').exists()
    # one run of several without records is a note; the others are drawn
    full = write_log(tmp_path / 'full', [good(0), good(5)])
    proc = run_here('plot.py', str(full), str(empty), f'--out={tmp_path / "both.png"}')
    assert proc.returncode == 0 and 'note: empty has nothing to plot yet' in proc.stderr, proc.stderr
    assert (tmp_path / 'both.png').read_bytes()[:8] == PNG


def test_runs_of_different_objectives_are_said_to_be_incomparable(tmp_path):
    runs = []
    for name, objective in [('a', 'mpnet'), ('b', 'mlm'), ('c', 'mpnet')]:
        runs.append(write_log(tmp_path / name, [good(0), good(5), json.dumps(dict(iter=5, val_loss=4.0, val_acc=0.2))]))
        # the run's checkpoint config says what it trained, as train.py writes it
        torch.save({'model': {}, 'model_args': {}, 'config': {'objective': objective}, 'iter_num': 5},
                   runs[-1] / 'ckpt.pt')
    with matplotlib.rc_context({'svg.fonttype': 'none'}):  # text stays text in the SVG: legend and title can be read
        proc = run_here('plot.py', str(runs[0]), str(runs[1]), f'--out={tmp_path / "cmp.svg"}')
        same = run_here('plot.py', str(runs[0]), str(runs[2]), f'--out={tmp_path / "same.svg"}')
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in proc.stderr.splitlines() if l.startswith('note:')]
    assert len(notes) == 1 and 'different objectives (a: mpnet, b: mlm)' in notes[0] and 'not comparable' in notes[0]
    svg = (tmp_path / 'cmp.svg').read_text()
    assert 'a (mpnet) train' in svg and 'b (mlm) val' in svg and 'not comparable' in svg
    # the same objective: nothing to say
    assert same.returncode == 0 and 'note' not in same.stderr, same.stderr
    assert 'not comparable' not in (tmp_path / 'same.svg').read_text()


def test_a_failed_write_keeps_the_previous_curves_and_leaves_no_temp_file(tmp_path):
    run = write_log(tmp_path / 'run', [good(i) for i in range(0, 200, 5)])
    (run / 'curves.png').write_bytes(b'the previous curves')
    # a write that fails half-way: a file size limit (a full disk behaves alike, below)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    proc = subprocess.run([sys.executable, 'plot.py', str(run)], cwd=HERE, capture_output=True, text=True,
                          preexec_fn=limit)
    assert_clean_error(proc, f'could not write {run}/curves.png', 'the previous curves.png is unchanged')
    assert (run / 'curves.png').read_bytes() == b'the previous curves'
    assert sorted(os.listdir(run)) == ['curves.png', 'metrics.jsonl']
    # a really full disk: a small tmpfs, filled
    proc = in_private_mount(f'''
        mkdir -p {tmp_path}/disk && mount -t tmpfs -o size=256k tmpfs {tmp_path}/disk
        cp {run}/metrics.jsonl {run}/curves.png {tmp_path}/disk/
        dd if=/dev/zero of={tmp_path}/disk/fill bs=4k 2>/dev/null || true
        {sys.executable} plot.py {tmp_path}/disk 2>&1 || true
        cat {tmp_path}/disk/curves.png; echo; ls {tmp_path}/disk''')
    if proc is None:
        pytest.skip('unshare -m is not allowed here: no private tmpfs for the full-disk case')
    out = proc.stdout.splitlines()
    assert out[0] == (f'error: could not write {tmp_path}/disk/curves.png (No space left on device): '
                      f'the previous curves.png is unchanged'), proc.stdout + proc.stderr
    assert out[1:] == ['the previous curves', 'curves.png', 'fill', 'metrics.jsonl'], out


# ---- the scores panel: one line a task and recipe, values that are none skipped, a legend off the scores

def test_scores_of_different_recipes_are_different_lines(tmp_path):
    recipe = dict(max_len=64, max_train=0, epochs=15, learning_rate=5e-4)
    quick = dict(recipe, max_train=50, epochs=1)  # a quick check of the same checkpoint, written to the same run
    records = [dict(iter=10, task='pydocs', metric='accuracy', mean=0.5, std=0.01, seeds=3, recipe=recipe),
               dict(iter=20, task='pydocs', metric='accuracy', mean=0.6, std=0.02, seeds=3, recipe=recipe),
               dict(iter=20, task='pydocs', metric='accuracy', mean=0.1, std=0.0, seeds=1, recipe=quick)]
    (tmp_path / 'scores.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records[:2]))
    assert plot.read_scores(str(tmp_path)) == {'pydocs accuracy': [(10, 0.5, 0.01), (20, 0.6, 0.02)]}
    (tmp_path / 'scores.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert plot.read_scores(str(tmp_path)) == {'pydocs accuracy (epochs=15, max_train=0)': [(10, 0.5, 0.01), (20, 0.6, 0.02)],
                                               'pydocs accuracy (epochs=1, max_train=50)': [(20, 0.1, 0.0)]}


def scores_run(tmp_path, records):
    run = write_log(tmp_path / 'run', [good(0), good(10), good(20)])
    (run / 'scores.jsonl').write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
    return run


def test_scores_that_are_no_values_are_skipped_with_their_line(tmp_path):
    ok = dict(iter=10, task='pydocs', metric='accuracy/f1 mean', mean=0.5, std=0.01, seeds=3)
    run = scores_run(tmp_path, [ok, dict(ok, iter=20, std=-0.1),                          # line 2: negative std
                                dict(ok, iter=20, mean=None), dict(ok, iter=30, mean=float('nan')),
                                dict(ok, iter=30, std=float('inf')), dict(ok, iter=40, mean='0.7'),
                                dict(ok, iter=40, task=None), dict(ok, iter=50, std=None)])  # std null: no bar
    proc = run_here('plot.py', str(run))
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert (run / 'curves.png').read_bytes()[:8] == PNG
    said = proc.stderr.strip().splitlines()
    path = run / 'scores.jsonl'
    assert said[0] == f"warning: {path}: line 2: pydocs accuracy/f1 mean at iter 20 has std -0.1, not a finite number >= 0: skipped"
    assert said[1] == f'note: {path}: line 3: pydocs accuracy/f1 mean at iter 20 is undefined (mean null): not drawn'
    assert [l.split(': ')[2] for l in said[2:]] == ['line 4', 'line 5', 'line 6', 'line 7'] and len(said) == 6
    assert plot.read_scores(str(run)) == {'pydocs accuracy/f1 mean': [(10, 0.5, 0.01), (50, 0.5, 0.0)]}


def test_embedding_scores_are_not_split_by_a_training_recipe_and_missing_keys_are_not_none(tmp_path):
    train_a = dict(epochs=3, learning_rate=2e-5, batch_size=32, max_train=0, max_eval=0, grad_clip=1.0)
    train_b = dict(epochs=1, learning_rate=1e-3, batch_size=8, max_train=50, max_eval=0, grad_clip=0.0)
    emb = dict(max_len=128, max_pairs=0, eval_data='')
    run = scores_run(tmp_path, [
        dict(iter=10, task='retrieval', metric='mrr', mean=0.3, std=0.0, recipe={**emb, **train_a}),
        dict(iter=20, task='retrieval', metric='mrr', mean=0.4, std=0.0, recipe={**emb, **train_b}),
        dict(iter=20, task='sts', metric='spearman', mean=0.6, std=0.0, recipe={**emb, **train_a}),
        dict(iter=30, task='sts', metric='spearman', mean=0.7, std=0.0, recipe={**emb, **train_b, 'max_pairs': 9}),
        dict(iter=30, task='retrieval', metric='mrr', mean=0.5, std=0.0, recipe={**emb, 'eval_data': '/data/' + 'x' * 40 + '/docs.jsonl'}),
        dict(iter=10, task='pydocs', metric='accuracy', mean=0.5, std=0.0),                  # before recipes existed
        dict(iter=20, task='pydocs', metric='accuracy', mean=0.6, std=0.0, recipe=train_a),  # before max_pairs existed
        dict(iter=30, task='pydocs', metric='accuracy', mean=0.7, std=0.0, recipe={**train_a, **emb})])
    scores = plot.read_scores(str(run))
    assert scores == {
        "retrieval mrr (eval_data='')": [(10, 0.3, 0.0), (20, 0.4, 0.0)],  # epochs and the rest: not retrieval's
        'retrieval mrr (eval_data=...xxxxxxxxxx/docs.jsonl)': [(30, 0.5, 0.0)],
        'sts spearman': [(20, 0.6, 0.0), (30, 0.7, 0.0)],     # max_pairs is retrieval's
        'pydocs accuracy (recipe not recorded)': [(10, 0.5, 0.0)],
        'pydocs accuracy': [(20, 0.6, 0.0)],
        'pydocs accuracy (max_len=128)': [(30, 0.7, 0.0)]}, scores
    assert not any('None' in label for label in scores)


def test_each_score_line_has_its_own_look_and_the_legend_stays_off_the_scores(tmp_path, monkeypatch):
    records = [dict(iter=i, task=task, metric='m', mean=0.1 * k + i / 100, std=0.01, recipe=dict(max_len=64, epochs=e))
               for k, task in enumerate(['pydocs', 'cola', 'sst2', 'mrpc']) for e in (1, 3) for i in (10, 20)]
    run = scores_run(tmp_path, records)
    figures = []
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, 'close', figures.append)  # keep the figure to look at
    plot.plot([str(run)], str(tmp_path / 'c.png'))
    fig = figures[0]
    ax = next(a for a in fig.axes if a.get_title().startswith('fine-tuned score'))
    lines = [c.lines[0] for c in ax.containers]  # errorbar: the data line of each labelled container
    looks = {(matplotlib.colors.to_hex(l.get_color()), l.get_marker()) for l in lines}
    assert len(lines) == 8 and len(looks) == 8, looks
    legend = next(a.get_legend() for a in fig.axes
                  if a.get_legend() and 'run pydocs m (epochs=1)' in [t.get_text() for t in a.get_legend().get_texts()])
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer))  # not drawn over the scores
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # and not cut off
    plt.close(fig)


# ===== evaluation.py and finetune.py: metrics, tasks, retrieval, STS, BEIR =====

# ---- the classification head and the metrics against transformers, scipy, sklearn; undefined is not zero

TINY = dict(n_layer=2, n_head=2, n_embd=64, n_inner=128, max_positions=64, dropout=0.0, attn_dropout=0.0)


def test_head_and_classifier_match_transformers():
    from transformers import MPNetForSequenceClassification
    from transformers.models.mpnet.modeling_mpnet import MPNetClassificationHead
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=101, **TINY)).eval()
    head = finetune.ClassificationHead(64, 3, dropout=0.1).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf = MPNetForSequenceClassification(convert_hf.hf_config(model.config)).eval()
    hf.config.num_labels = 3
    hf.classifier = MPNetClassificationHead(hf.config).eval()
    hf.classifier.load_state_dict(head.state_dict())  # the same names: dense, out_proj
    missing, unexpected = hf.mpnet.load_state_dict({k.removeprefix('mpnet.'): v for k, v in
                                                    convert_hf.to_hf_state_dict(model).items() if k.startswith('mpnet.')},
                                                   strict=False)
    assert not unexpected and all('position_ids' in k or 'pooler' in k for k in missing)
    features = torch.randn(4, 9, 64)
    torch.testing.assert_close(head(features), hf.classifier(features), atol=1e-6, rtol=0)
    ids = torch.randint(5, 101, (3, 11))
    ids[1, 7:] = 1  # padding
    mask = (ids != 1).long()
    with torch.no_grad():
        torch.testing.assert_close(head(model.encode(ids, mask)), hf(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_metrics_on_hand_computed_examples():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1, tn 2
    assert evaluation.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert evaluation.f1(pred, gold) == pytest.approx(2 * 2 / (3 + 3))
    assert evaluation.matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / 9)  # sqrt(3*3*3*3)
    assert math.isnan(evaluation.matthews([1, 1, 1], [1, 0, 1]))  # one predicted class: undefined, never a 0 (issue 26)
    assert evaluation.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(4.5 / math.sqrt(2 * 61 / 6))  # centred: -1 0 1; -13/6 -1/6 14/6
    # ranks with ties: x -> 1, 2.5, 2.5, 4; y -> 1, 2, 3, 4; rho = 4.5 / sqrt(4.5 * 5)
    assert list(evaluation.ranks([1, 5, 5, 9])) == [1, 2.5, 2.5, 4]
    assert evaluation.spearman([1, 5, 5, 9], [0, 1, 2, 3]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert evaluation.scores(('f1', 'accuracy'), pred, gold)['score'] == pytest.approx((4 / 6 + 4 / 6) / 2)


def test_metrics_match_scipy_and_sklearn():
    stats = pytest.importorskip('scipy.stats')
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    for _ in range(5):
        gold, pred = rng.integers(0, 2, 97), rng.integers(0, 2, 97)
        assert evaluation.accuracy(pred, gold) == pytest.approx(metrics.accuracy_score(gold, pred))
        assert evaluation.f1(pred, gold) == pytest.approx(metrics.f1_score(gold, pred))
        assert evaluation.matthews(pred, gold) == pytest.approx(metrics.matthews_corrcoef(gold, pred))
        x, y = rng.normal(size=53), rng.integers(0, 6, 53)  # y with many ties, as STS-B's scores
        x[:10] = x[10:20]  # ties in x too
        assert evaluation.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert evaluation.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_undefined_metrics_are_nan_and_defined_ones_match_scipy_and_sklearn():
    stats = pytest.importorskip('scipy.stats')
    metrics = pytest.importorskip('sklearn.metrics')
    assert math.isnan(evaluation.pearson([1, 2, 3], [2, 2, 2]))  # a constant side: no correlation to speak of
    assert math.isnan(evaluation.spearman([3, 3, 3], [1, 2, 3]))
    assert math.isnan(evaluation.matthews([1, 1, 1], [1, 0, 1]))  # one predicted class (sklearn's convention: 0)
    assert math.isnan(evaluation.f1([0, 0, 0], [0, 0, 0]))  # no positive on either side
    assert math.isnan(evaluation.scores(('accuracy', 'f1'), [0, 0], [0, 0])['score'])  # a mean with an undefined part
    assert evaluation.f1([1, 0, 0], [0, 1, 0]) == 0.0 == metrics.f1_score([0, 1, 0], [1, 0, 0])  # defined: 0
    rng = np.random.default_rng(1)
    for _ in range(5):  # where defined, still scipy's and sklearn's numbers
        gold, pred = rng.integers(0, 2, 41), rng.integers(0, 2, 41)
        assert evaluation.f1(pred, gold) == pytest.approx(metrics.f1_score(gold, pred))
        assert evaluation.matthews(pred, gold) == pytest.approx(metrics.matthews_corrcoef(gold, pred))
        x, y = rng.normal(size=41), rng.integers(0, 5, 41)
        assert evaluation.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        assert evaluation.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert evaluation.defined({'a': math.nan, 'b': [1.0, math.nan]}) == {'a': None, 'b': [1.0, None]}
    assert evaluation.shown(math.nan) == evaluation.shown(None) == 'undefined'


def test_max_train_keeps_a_fixed_random_subset_not_the_first_rows():
    examples = [(f'text {i}', None, i // 100) for i in range(1300)]  # sorted by label, as pydocs' file is
    got = evaluation.subset(examples, 48)
    assert len(got) == 48 and got == evaluation.subset(examples, 48)  # the same subset in every run and seed
    assert got == sorted(got, key=lambda e: int(e[0].split()[1]))  # in the file's order
    assert len({e[2] for e in got}) >= 8  # first 48 rows would be label 0 alone
    assert evaluation.subset(examples, 0) is examples and evaluation.subset(examples, 5000) is examples


def test_an_undefined_epoch_is_never_the_best_one():
    assert finetune.rank(math.nan) < finetune.rank(0.0) and finetune.rank(0.3) == 0.3


# ---- fine-tuning end to end: the built-in task, a run's snapshots and scores, export for pipeline

def types_ns(**kw):
    import types
    return types.SimpleNamespace(**kw)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A folder with the built-in task cached under data/, a WordPiece vocabulary learned on it and two
    checkpoints of a 2-layer, 64-wide MPNet (iterations 7 and 14) that carry it, as train.py writes them."""
    root = tmp_path_factory.mktemp('ft')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, 'DATA_ROOT', str(root / 'data'))
        task = finetune.pydocs_task()
    tok = data.train_tokenizer(iter([e[0] for e in task['splits']['train']]), vocab_size=600)
    tok.save_pretrained(root / 'tok')
    files = convert_hf.read_tokenizer_files(root / 'tok')
    paths = []
    for seed, it in ((0, 7), (1, 14)):
        torch.manual_seed(seed)
        model = MPNet(MPNetConfig(vocab_size=len(tok), **TINY))
        path = root / f'iter_{it}.pt'
        torch.save(dict(model=model.state_dict(), model_args=dict(vocab_size=len(tok), **TINY), iter_num=it,
                        config={}, tokenizer_files=files), path)
        paths.append(str(path))
    return types_ns(root=root, tok=tok, tok_dir=str(root / 'tok'), ckpts=paths, task=task)


def test_finetune_end_to_end_on_the_builtin_task(tiny, tmp_path):
    out = tmp_path / 'results.jsonl'
    proc = run_cli(os.path.join(HERE, 'finetune.py'), *tiny.ckpts, '--max_train=48', '--max_eval=32', '--epochs=2', '--seeds=2',
                   '--batch_size=16', '--max_len=32', '--learning_rate=1e-3', f'--out_file={out}', cwd=tiny.root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'task pydocs: train 48, dev 32, test 32, 13 labels; metric accuracy; majority class' in proc.stdout
    assert proc.stdout.count(' seed ') == 4 and 'over 2 seeds' in proc.stdout
    assert 'iter  score' in proc.stdout and '     7  ' in proc.stdout and '    14  ' in proc.stdout
    records = [json.loads(line) for line in open(out)]
    assert [(r['iter_num'], r['seed']) for r in records] == [(7, 0), (7, 1), (14, 0), (14, 1)]
    for r in records:
        assert r['metrics'] == ['accuracy'] and len(r['epochs_dev']) == 2 and r['best_epoch'] in (1, 2)
        assert r['score'] == r['dev']['score'] and abs(r['score'] - max(r['epochs_dev'])) < 1e-4  # the best epoch's
        assert 0 <= r['test']['accuracy'] <= 1 and r['sizes']['train'] == 48
        assert r['config']['max_train'] == 48 and r['command'].startswith(os.path.join(HERE, 'finetune.py'))


def test_pairs_are_encoded_as_hf_mpnet_does_and_batches_are_length_sorted(tiny):
    ids = finetune.encode_split(tiny.tok, [('a cat', 'the dog', 0)])[0]
    bos, eos = tiny.tok.bos_token_id, tiny.tok.eos_token_id
    a, b = (tiny.tok(t, add_special_tokens=False)['input_ids'] for t in ('a cat', 'the dog'))
    assert ids == [bos, *a, eos, eos, *b, eos]  # <s> a </s></s> b </s>
    lengths = [random.Random(i).randint(3, 60) for i in range(500)]
    got = evaluation.batches(lengths, 16, np.random.default_rng(0))
    assert sorted(np.concatenate(got).tolist()) == list(range(500))  # each example once
    padding = sum(16 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in got[:-1])
    assert padding < 0.1 * sum(lengths)  # length-sorted buckets: little padding
    assert got[0].tolist() != evaluation.batches(lengths, 16, np.random.default_rng(1))[0].tolist()


def test_a_fine_tuned_model_exports_for_pipeline_and_a_runs_scores_are_plotted(tiny, tmp_path):
    run = tmp_path / 'run'
    (run / 'snapshots').mkdir(parents=True)
    (run / 'metrics.jsonl').write_text('{"iter": 7, "val_loss": 6.5}\n')
    snapshot = run / 'snapshots' / 'iter_0000007.pt'
    os.link(tiny.ckpts[0], snapshot)
    proc = run_cli(os.path.join(HERE, 'finetune.py'), str(snapshot), '--max_train=48', '--max_eval=32', '--epochs=2',
                   '--seeds=2', '--batch_size=16', '--max_len=32', '--learning_rate=1e-3', f'--save={tmp_path / "ft.pt"}',
                   f'--out_file={tmp_path / "results.jsonl"}', cwd=tiny.root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = max(json.loads(line)['score'] for line in open(tmp_path / 'results.jsonl'))
    assert f'saved the fine-tuned model to {tmp_path / "ft.pt"} (dev {best:.4f})' in proc.stdout  # the best seed's
    scores = [json.loads(line) for line in open(run / 'scores.jsonl')]
    assert scores[0]['iter'] == 7 and scores[0]['task'] == 'pydocs' and scores[0]['seeds'] == 2
    assert scores[0]['recipe']['max_train'] == 48 and scores[0]['recipe']['epochs'] == 2  # what the score depends on
    assert run_cli(os.path.join(HERE, 'plot.py'), str(run)).returncode == 0 and (run / 'curves.png').exists()
    # exported as MPNetForSequenceClassification: pipeline gives our predictions, with the label names
    proc = run_cli(os.path.join(HERE, 'convert_hf.py'), str(tmp_path / 'ft.pt'), str(tmp_path / 'hf'))
    assert proc.returncode == 0 and 'max |logit diff| vs transformers' in proc.stdout, proc.stderr[-2000:]
    from transformers import pipeline
    ckpt = torch.load(tmp_path / 'ft.pt', weights_only=True)
    model = MPNet(MPNetConfig(**ckpt['model_args'])).eval()
    model.load_state_dict(ckpt['model'])
    head = finetune.ClassificationHead(model.config.n_embd, 13, 0.0).eval()
    head.load_state_dict(ckpt['classifier']['head'])
    texts = [e[0] for e in tiny.task['splits']['dev'][:12]]
    enc = tiny.tok(texts, padding=True, truncation=True, max_length=32, return_tensors='pt')
    with torch.no_grad():
        ours = head(model.encode(enc['input_ids'], enc['attention_mask'])).argmax(-1).tolist()
    with convert_hf.quiet_transformers():
        theirs = pipeline('text-classification', model=str(tmp_path / 'hf'), device='cpu')(
            texts, truncation=True, max_length=32)
    assert [t['label'] for t in theirs] == [ckpt['classifier']['labels'][i] for i in ours]


def write(path, text, encoding='utf-8'):
    path.write_bytes(text.encode(encoding))
    return str(path)


def binary_folder(path, n_train=40, n_dev=12, labels=('neg', 'pos'), dev_labels=None):
    """A folder task: train.csv and dev.csv of short texts, labels alternating."""
    path.mkdir()
    rows = [f'some text number {i} about cats and dogs' for i in range(n_train)]
    write(path / 'train.csv', 'text,label\n' + ''.join(f'{t},{labels[i % 2]}\n' for i, t in enumerate(rows)))
    dev = dev_labels or labels
    write(path / 'dev.csv', 'text,label\n' + ''.join(f'{t},{dev[i % 2]}\n' for i, t in enumerate(rows[:n_dev])))
    return str(path)


def records(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


FAST = ('--epochs=1', '--max_len=32', '--batch_size=8')


def test_the_score_is_named_and_the_majority_baseline_is_on_its_scale(tiny, tmp_path):
    run = tmp_path / 'run'  # a snapshot of a run: its scores.jsonl names the metric too
    (run / 'snapshots').mkdir(parents=True)
    (run / 'metrics.jsonl').write_text('{"iter": 7, "val_loss": 6.5}\n')
    snapshot = run / 'snapshots' / 'iter_0000007.pt'
    os.link(tiny.ckpts[0], snapshot)
    task = binary_folder(tmp_path / 'bin', n_dev=9)  # dev: 5 neg, 4 pos; always 'neg': accuracy 5/9, F1 0
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', str(snapshot), f'--task={task}', *FAST, f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert f"metric accuracy/f1 mean; majority class 'neg' scores {(5 / 9 + 0) / 2:.4f} on dev" in proc.stdout
    record, = records(out)
    assert record['score_metric'] == 'accuracy/f1 mean' and record['metrics'] == ['accuracy', 'f1']
    assert record['score'] == pytest.approx((record['dev']['accuracy'] + record['dev']['f1']) / 2)
    score, = records(run / 'scores.jsonl')
    assert score['metric'] == 'accuracy/f1 mean'
    assert evaluation.score_name(('pearson', 'spearman')) == 'pearson/spearman mean'
    assert evaluation.score_name(('accuracy',)) == 'accuracy'


def sts_file(path, scores, header='sentence1\tsentence2\tscore'):
    texts = [f'some text number {i}' for i in range(len(scores))]
    return write(path, header + '\n' + ''.join(f'{t}\t{t} again\t{s}\n' for t, s in zip(texts, scores)))


def test_the_summary_of_several_models_says_what_its_score_is(tiny, tmp_path):
    gold = sts_file(tmp_path / 'sts.tsv', [i % 5 for i in range(12)])
    proc = run_here('finetune.py', *tiny.ckpts, '--task=sts', f'--eval_data={gold}', f'--out_file={tmp_path / "r.jsonl"}',
                    '--max_len=32')
    assert proc.returncode == 0, proc.stderr
    assert 'iter  score (spearman)' in proc.stdout and 'mean over seeds' not in proc.stdout


def save_model(path, state, tiny, **extra):
    torch.save(dict(model=state, model_args=dict(vocab_size=len(tiny.tok), **TINY), iter_num=7, config={},
                    tokenizer_files=torch.load(tiny.ckpts[0], weights_only=True)['tokenizer_files'], **extra), path)
    return str(path)


def test_a_fine_tuned_model_saved_in_a_run_folder_is_no_snapshot_of_it(tiny, tmp_path):
    run = tmp_path / 'run'
    (run / 'snapshots').mkdir(parents=True)
    (run / 'metrics.jsonl').write_text('{"iter": 7, "val_loss": 6.5}\n')
    ckpt = torch.load(tiny.ckpts[0], weights_only=True)
    ft = save_model(run / 'ft.pt', ckpt['model'], tiny, finetune=dict(task='t'))
    also = save_model(run / 'snapshots' / 'ft.pt', ckpt['model'], tiny, classifier=dict(head={}, labels=None))
    docs = write(tmp_path / 'docs.txt', '\n\n'.join(e[0] for e in tiny.task['splits']['test'][:20]))
    for path in (ft, also):
        proc = run_here('finetune.py', path, '--task=retrieval', f'--eval_data={docs}', '--max_len=64',
                        f'--out_file={tmp_path / "r.jsonl"}')
        assert proc.returncode == 0, proc.stderr
    assert not (run / 'scores.jsonl').exists()
    os.link(tiny.ckpts[0], run / 'best.pt')
    assert finetune.run_folder(str(run / 'best.pt'), ckpt) == str(run)  # the run's own checkpoints still count
    assert finetune.run_folder(str(run / 'other.pt'), ckpt) is None


def test_an_hf_model_is_named_without_an_iteration(tiny, tmp_path):
    from transformers import MPNetForMaskedLM
    import convert_hf
    folder = tmp_path / 'hf'
    torch.manual_seed(0)
    MPNetForMaskedLM(convert_hf.hf_config(tiny_config(vocab_size=len(tiny.tok)))).save_pretrained(folder)
    tiny.tok.save_pretrained(folder)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', str(folder), '--task=sts', f'--eval_data={sts_file(tmp_path / "s.tsv", [1, 2, 3])}',
                    f'--out_file={out}', '--max_len=32')
    assert proc.returncode == 0, proc.stderr
    assert f'{folder}, mean pooling: spearman' in proc.stdout and '(iter' not in proc.stdout
    assert records(out)[0]['iter_num'] is None


# ---- embeddings: retrieval and STS against a per-document reference; a contrastive run's held-out pairs

def reference_embedding(model, ids, pooling):
    with torch.no_grad():
        h = model.encode(torch.tensor([ids]))[0]
    return torch.nn.functional.normalize(h[0] if pooling == 'cls' else h.mean(0), dim=-1)


@pytest.mark.parametrize('pooling', ['mean', 'cls'])
def test_retrieval_scores_against_a_loop_and_a_known_answer(pooling):
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=101, **TINY)).eval()
    with torch.no_grad():  # at init (std 0.02) attention is near uniform and every text's <s> state nearly the same
        for p in model.parameters():  # (CLS cosines all ~0.99995: ranks decided by float noise); larger weights
            if p.dim() == 2:          # sharpen attention, so that the first token's state carries its text
                p.mul_(10)
    rng = random.Random(0)
    docs = [[rng.randrange(5, 101) for _ in range(rng.randrange(32, 70))] for _ in range(13)]
    ids, mask = data.probe_pairs([np.array([t for d in docs for t in (*d, 2)])], 0, 2, 1, 1000, max_len=40)
    assert ids.shape[:2] == (2, 13)  # every document of 32 tokens or more gives a pair
    got = evaluation.retrieval_scores(model, ids, mask, pooling)
    halves = [[row[m.bool()].tolist() for row, m in zip(ids[s], mask[s])] for s in (0, 1)]
    first, second = (torch.stack([reference_embedding(model, h, pooling) for h in hs]) for hs in halves)
    sim = first @ second.T
    assert ((sim - sim.diag()[:, None]).abs() + torch.eye(13)).min() > 1e-5  # no rank hangs on float noise
    rank = [1 + sum(sim[i, j] > sim[i, i] for j in range(13)) for i in range(13)]
    assert got['pairs'] == 13
    assert got['acc1'] == pytest.approx(np.mean([r == 1 for r in rank]))
    assert got['mrr'] == pytest.approx(np.mean([1 / r for r in rank]), abs=1e-6)
    assert got['unrelated_cos'] == pytest.approx(((sim.sum() - sim.trace()) / (13 * 12)).item(), abs=1e-5)
    same = evaluation.retrieval_scores(model, torch.stack([ids[0], ids[0]]), torch.stack([mask[0], mask[0]]), pooling)
    assert same['acc1'] == 1.0 and same['mrr'] == 1.0  # a half finds itself first


def test_sts_scores_and_retrieval_from_the_command_line(tiny, tmp_path):
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    texts = [e[0][:80] for e in tiny.task['splits']['dev'][:30]]
    pairs = [(texts[i], texts[(i * 7 + 3) % 30]) for i in range(30)]
    cos = [float(reference_embedding(model, tiny.tok(a)['input_ids'], 'mean') @
                 reference_embedding(model, tiny.tok(b)['input_ids'], 'mean')) for a, b in pairs]
    scored = [(a, b, 5 * c) for (a, b), c in zip(pairs, cos)]  # human scores that are the cosines: rho = 1
    got = evaluation.sts_scores(model, tiny.tok, scored, 'mean', 'cpu')
    assert got['spearman'] == pytest.approx(1.0) and got['pearson'] == pytest.approx(1.0, abs=1e-5)
    docs = tmp_path / 'docs.jsonl'
    docs.write_text(''.join(json.dumps({'text': e[0]}) + '\n' for e in tiny.task['splits']['test']))
    n = sum(len(tiny.tok(e[0], add_special_tokens=False)['input_ids']) >= 32 for e in tiny.task['splits']['test'])
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=retrieval', f'--eval_data={docs}', '--max_len=64',
                   f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'pairs {n}' in proc.stdout and 'mean pooling' in proc.stdout
    record = json.loads(out.read_text())
    assert record['pairs'] == n and record['iter_num'] == 7 and record['score'] == record['mrr']


def test_ties_that_remain_count_as_chance_as_before():
    """test_retrieval_ties_count_as_chance_not_as_a_win's rule, now that a model with one embedding for every text gets
    no score: two halves that embed alike still count as the expected value of breaking their tie at random."""
    first = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    second = first.clone()
    second[1] = second[0]  # the first half 0 finds halves 0 and 1 alike, and so does 1
    got = evaluation.ranking(first, second)
    sim = (first @ second.T).tolist()
    acc1, mrr = [], []
    for i in range(5):
        above = sum(s > sim[i][i] for s in sim[i])
        ties = sum(s == sim[i][i] for s in sim[i]) - 1
        acc1.append((above == 0) / (ties + 1))
        mrr.append(np.mean([1 / (1 + above + k) for k in range(ties + 1)]))
    assert got['acc1'] == pytest.approx(np.mean(acc1)) and got['mrr'] == pytest.approx(np.mean(mrr))
    assert got['acc1'] == pytest.approx((0.5 + 0.5 * (sim[1][0] >= max(sim[1])) + 3) / 5)


def settings(**kw):
    """The settings finetune.py's command line passes to the retrieval functions (evaluation.retrieval_source)."""
    return {'eval_data': '', 'text_field': '', 'max_pairs': 0, 'max_len': 64, **kw}


def heldout(tiny, n=7, L=30, source='data/held.txt'):
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((2, n, L), 1, dtype=torch.long)
    for s in range(2):
        for i in range(n):
            length = int(torch.randint(10, L - 1, (1,), generator=gen))
            ids[s, i, :length + 2] = torch.tensor([0, *torch.randint(5, len(tiny.tok), (length,), generator=gen).tolist(), 2])
    return dict(ids=ids, mask=(ids != 1).long(), source=source)


def test_f22_retrieval_scores_a_contrastive_checkpoints_held_out_pairs(tiny, tmp_path, monkeypatch):
    kw = settings(max_len=64)
    held = heldout(tiny)
    ids, mask = evaluation.retrieval_pairs({'heldout': held}, tiny.tok, 'run/best.pt', **kw)  # before: "not on this machine"
    L = ids.size(2)
    assert torch.equal(ids, held['ids'][..., :L]) and (held['ids'][..., L:] == 1).all() and torch.equal(mask, held['mask'][..., :L])
    kw = settings(max_len=64, max_pairs=4)
    assert evaluation.retrieval_pairs({'heldout': held}, tiny.tok, **kw)[0].shape[1] == 4
    kw = settings(max_len=16)  # cut at max_len as every text is: <s> 14 tokens </s>
    ids, mask = evaluation.retrieval_pairs({'heldout': held}, tiny.tok, **kw)
    assert ids.shape[2] == 16 and (ids == 2).sum() == 14 and (mask.sum(-1) <= 16).all()  # one </s> a half
    long = held['mask'].sum(-1) > 16
    assert (ids[..., 15][long] == 2).all() and torch.equal(ids[..., :15], held['ids'][..., :15])
    state = torch.load(tiny.ckpts[0], weights_only=True)['model']
    path = save_model(tmp_path / 'c.pt', state, tiny, heldout=held)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', path, '--task=retrieval', '--max_len=64', f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert "the contrastive run's 7 held-out pairs (data/held.txt)" in proc.stdout, proc.stdout
    assert records(out)[0]['pairs'] == 7
    bad = save_model(tmp_path / 'bad.pt', state, tiny, heldout=dict(held, ids=held['ids'][0]))
    assert_clean_error(run_here('finetune.py', bad, '--task=retrieval', '--max_len=64', f'--out_file={out}'), 'heldout', '[2, n, L]')


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets' cache in a temp folder: data.py's reader of .txt and .jsonl files caches what it read."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))


def paragraphs(tiny, n=60):
    """n different texts of 40 words or more (each gives a retrieval pair: two halves of 16 tokens or more)."""
    texts = [e[0] for e in tiny.task['splits']['train'] if len(e[0].split()) >= 40]
    return [' '.join(t.split()) for t in texts[:n]]


def st_model(tiny, tmp_path, max_seq_length=48):
    return save_model(tmp_path / 'st.pt', torch.load(tiny.ckpts[0], weights_only=True)['model'], tiny,
                      st_files={'sentence_bert_config.json': json.dumps({'max_seq_length': max_seq_length})})


def write_beir(folder, docs, queries, qrels, split='test', header='query-id\tcorpus-id\tscore'):
    """A BEIR folder: docs [(id, title or None, text)], queries [(id, text)], qrels [(query id, doc id, score)]."""
    os.makedirs(os.path.join(folder, 'qrels'), exist_ok=True)
    with open(os.path.join(folder, 'corpus.jsonl'), 'w') as f:
        for i, title, text in docs:
            f.write(json.dumps({'_id': i, **({} if title is None else {'title': title}), 'text': text}) + '\n')
    with open(os.path.join(folder, 'queries.jsonl'), 'w') as f:
        f.write(''.join(json.dumps({'_id': i, 'text': t}) + '\n' for i, t in queries))
    with open(os.path.join(folder, 'qrels', f'{split}.tsv'), 'w') as f:
        f.write(header + '\n' + ''.join(f'{q}\t{d}\t{s}\n' for q, d, s in qrels))
    return str(folder)


def tiny_beir(tiny, folder, n_docs=40, n_queries=12):
    """Documents from the built-in task's dev texts (some with a title), queries cut from some of them, each judged
    relevant to its source (2) and another (1), a 0 judgment, and a query 'd4' that is also a document's _id (and text)."""
    texts = [e[0][:200] for e in tiny.task['splits']['dev'][:n_docs]]
    docs = [(f'd{i}', f'title {i}' if i % 3 == 0 else None, t) for i, t in enumerate(texts)]
    queries = [(f'q{i}', texts[3 * i][:60]) for i in range(n_queries)] + [('d4', texts[4]), ('q-none', 'nothing relevant')]
    qrels = [(f'q{i}', f'd{3 * i}', 2) for i in range(n_queries)] + [(f'q{i}', f'd{(5 * i + 1) % n_docs}', 1) for i in range(n_queries)]
    qrels += [('q0', 'd7', 0), ('d4', 'd5', 1), ('q-none', 'd1', 0)]
    return write_beir(folder, docs, queries, qrels), docs, queries, qrels


@pytest.mark.parametrize('task', ['retrieval', 'sts', 'beir'])
def test_f7_every_embedding_task_says_where_it_cuts_and_the_models_own_length(tiny, tmp_path, hf_cache, task):
    texts = paragraphs(tiny, 20)
    data_file = {'retrieval': lambda: write(tmp_path / 'd.jsonl', ''.join(json.dumps({'text': t}) + '\n' for t in texts)),
                 'sts': lambda: write(tmp_path / 's.tsv', 'sentence1\tsentence2\tscore\n' +
                                      ''.join(f'{t}\t{texts[(i + 1) % 20]}\t{i % 5}\n' for i, t in enumerate(texts))),
                 'beir': lambda: tiny_beir(tiny, tmp_path / 'b')[0]}[task]()
    for model, own, max_len in ((st_model(tiny, tmp_path), 48, 32), (tiny.ckpts[0], None, 32)):
        proc = run_here('finetune.py', model, f'--task={task}', f'--eval_data={data_file}', f'--max_len={max_len}',
                        f'--out_file={tmp_path / "r.jsonl"}')
        assert proc.returncode == 0, proc.stderr
        line = next(l for l in proc.stdout.splitlines() if 'pooling:' in l)
        assert f'cut at {max_len} tokens' in line, line  # before: nothing said (retrieval, sts) or a note only for beir
        if own:  # a sentence-transformers model: what it (and BEIR with it) cuts at
            assert f'cuts at {own}: pass --max_len={own}' in line, line
        else:  # the model reads up to its max_positions (64): how to read more of the texts cut
            assert '--max_len=64' in line, line
        cut = records(tmp_path / 'r.jsonl')[-1]['texts_cut']
        assert cut > 0 and f'{cut:,} of ' in line


# ---- no wrong number said silently: undefined, non-finite, diverged or collapsed is an error, no score

def test_sts_scores_all_equal_are_refused_before_any_model_work(tiny, tmp_path):
    gold = sts_file(tmp_path / 'sts.tsv', [3.0] * 12)
    broken = tmp_path / 'hf'  # a model that cannot load: the task's refusal must come first
    broken.mkdir()
    (broken / 'config.json').write_text('{}')
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', str(broken), '--task=sts', f'--eval_data={gold}', f'--out_file={out}')
    assert_clean_error(proc, 'sts.tsv', 'every pair has the score 3', 'undefined')
    assert not out.exists()


def test_a_constant_regression_dev_split_is_refused_at_load(tiny, tmp_path):
    task = tmp_path / 'reg'
    task.mkdir()
    write(task / 'train.csv', 'text,score\n' + ''.join(f'text {i},{i / 10}\n' for i in range(20)))
    write(task / 'dev.csv', 'text,score\n' + ''.join(f'text {i},0.5\n' for i in range(6)))
    out = tmp_path / 'r.jsonl'
    assert_clean_error(run_here('finetune.py', tiny.ckpts[0], f'--task={task}', f'--out_file={out}'),
                       'dev split', 'all scored 0.5', 'undefined')
    assert not out.exists()


def test_a_binary_dev_split_without_the_positive_class_is_refused(tiny, tmp_path):
    task = binary_folder(tmp_path / 'bin', dev_labels=('neg', 'neg'))  # F1 of 'pos' would be 0 or undefined
    assert_clean_error(run_here('finetune.py', tiny.ckpts[0], f'--task={task}', f'--out_file={tmp_path / "r.jsonl"}'),
                       "no example of label 'pos'", 'F1')


@pytest.mark.parametrize('bad', ['nan', 'inf', '-Infinity'])
def test_non_finite_sts_scores_are_refused_with_file_and_line(tiny, tmp_path, bad):
    gold = sts_file(tmp_path / 'sts.tsv', [1, 2, bad, 4, 5])
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=sts', f'--eval_data={gold}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'sts.tsv', 'line 4', 'score')


def test_non_finite_labels_are_refused_in_every_problem(tiny, tmp_path):
    task = binary_folder(tmp_path / 'bin')
    with open(os.path.join(task, 'train.csv'), 'a') as f:
        f.write('one more text,nan\n')
    for problem in ('auto', 'classification'):
        proc = run_here('finetune.py', tiny.ckpts[0], f'--task={task}', f'--problem={problem}',
                        f'--out_file={tmp_path / "r.jsonl"}')
        assert_clean_error(proc, 'train.csv', 'line 42', '"nan"')
    jsonl = write(tmp_path / 't.jsonl', ''.join(json.dumps(dict(text=f'text {i}', label=i % 2)) + '\n' for i in range(30)) +
                  '{"text": "a text", "label": NaN}\n')
    with pytest.raises(evaluation.TaskError, match='line 31'):
        finetune.local_task(jsonl)


def constant_model(tiny, seed=0):
    """A model whose every token's output is 0 (the last LayerNorm's weight and bias are): every text gets the
    same embedding, exactly (a constant vector would be pooled to slightly different ones by mean pooling)."""
    torch.manual_seed(seed)
    model = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    with torch.no_grad():
        model.blocks[-1].ln_2.weight.zero_()
        model.blocks[-1].ln_2.bias.zero_()
    return model


def test_non_finite_embeddings_are_an_error_in_retrieval_and_sts(tiny):
    model = constant_model(tiny)
    with torch.no_grad():
        model.blocks[0].ln_1.bias[0] = float('nan')
    ids = torch.randint(5, len(tiny.tok), (2, 6, 20))
    error = getattr(finetune, 'NonFiniteError', ())  # train.py's probe catches it (a TaskError)
    with pytest.raises(evaluation.TaskError, match='non-finite') as e:
        evaluation.retrieval_scores(model.train(), ids, torch.ones_like(ids))
    assert isinstance(e.value, error) and model.training  # the caller's mode is restored
    with pytest.raises(error, match='non-finite'):
        evaluation.sts_scores(model, tiny.tok, [('a cat', 'a dog', 1.0), ('a car', 'a bus', 2.0)], 'mean', 'cpu')


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(tiny, tmp_path):
    state = torch.load(tiny.ckpts[0], weights_only=True)['model']
    state['blocks.0.ln_1.bias'][0] = float('nan')
    path = save_model(tmp_path / 'nan.pt', state, tiny)
    docs = write(tmp_path / 'docs.txt', '\n\n'.join(e[0] for e in tiny.task['splits']['test'][:20]))
    proc = run_here('finetune.py', path, '--task=retrieval', f'--eval_data={docs}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'NaN or inf', 'blocks.0.ln_1.bias')
    assert not (tmp_path / 'r.jsonl').exists()


def test_a_diverged_fine_tune_stops_in_one_line_and_saves_nothing(tiny, tmp_path):
    task, out, save = binary_folder(tmp_path / 'bin'), tmp_path / 'r.jsonl', tmp_path / 'ft.pt'
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={task}', '--learning_rate=1e4', '--grad_clip=0', *FAST,
                    f'--out_file={out}', f'--save={save}')
    assert_clean_error(proc, 'seed 0 diverged at step', '--learning_rate', '--grad_clip')
    assert not out.exists() and not save.exists()


def test_non_finite_weights_are_never_saved(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, 'save', str(tmp_path / 'ft.pt'))
    state = torch.load(tiny.ckpts[0], weights_only=True)['model']
    state['blocks.0.ln_1.bias'][0] = float('inf')
    head = finetune.ClassificationHead(64, 2, 0.0).state_dict()
    spec = dict(name='t', labels=['a', 'b'])
    with pytest.raises(evaluation.TaskError, match='NaN or inf'):
        finetune.save_finetuned({'model_args': {}}, (state, head), spec, {}, {'dev': {'score': 0.5}})
    assert not (tmp_path / 'ft.pt').exists()


def collapsed(tiny, how):
    model = constant_model(tiny)  # the last LayerNorm outputs 0 for every token: every embedding is 0
    with torch.no_grad():
        if how == 'constant output':  # every token's output is the same vector: mean pooling gives it back within float noise
            model.blocks[-1].ln_2.bias.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
        if how == 'all weights zero':
            for p in model.parameters():
                p.zero_()
    return model


@pytest.mark.parametrize('how', ['zero output', 'constant output', 'all weights zero'])
def test_f3_a_collapsed_model_gets_no_score_from_retrieval_sts_or_beir(tiny, tmp_path, monkeypatch, how):
    kw = settings(max_len=64)
    model = collapsed(tiny, how)
    ids = torch.randint(5, len(tiny.tok), (2, 9, 20), generator=torch.Generator().manual_seed(0))
    error = getattr(finetune, 'CollapsedError', evaluation.TaskError)  # a TaskError: train.py's probe catches it
    for pooling in ('mean', 'cls'):
        with pytest.raises(error, match='same embedding .collapsed.: no retrieval score'):
            evaluation.retrieval_scores(model, ids, torch.ones_like(ids), pooling)  # before: chance, acc1 1/9
    pairs = [(f'a text about cats {i}', f'another text about dogs {i}', float(i % 4)) for i in range(8)]
    with pytest.raises(error, match='same embedding .collapsed.: no STS score'):
        evaluation.sts_scores(model, tiny.tok, pairs, 'mean', 'cpu', max_len=kw['max_len'])  # before: 'undefined', or a Spearman of float noise
    beir = evaluation.beir_data(tiny_beir(tiny, tmp_path / 'b')[0], 'test')
    with pytest.raises(error, match='same embedding .collapsed.: no BEIR score'):
        evaluation.beir_scores(model, tiny.tok, beir, 'mean', 'cpu', chunk=7, max_len=kw['max_len'])  # before: the corpus order's ndcg@10


def test_f3_a_collapsed_checkpoint_is_one_line_from_the_command_line_and_writes_nothing(tiny, tmp_path):
    path = save_model(tmp_path / 'flat.pt', constant_model(tiny).state_dict(), tiny)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', path, '--task=beir', f'--eval_data={tiny_beir(tiny, tmp_path / "b")[0]}', '--max_len=64',
                    f'--out_file={out}')
    assert_clean_error(proc, 'the model gives every text the same embedding (collapsed)', 'BEIR')
    assert not out.exists()


def test_f3_near_is_not_collapsed(tiny):
    """A random init's embeddings are ~1 apart; a model whose every output is one vector plus a thousandth of a text's
    own is ~1e-3 apart, and still ranks by the text: neither is collapsed (COLLAPSED is float noise, 1e-5)."""
    torch.manual_seed(0)
    random_init = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    near = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    near.load_state_dict(random_init.state_dict())
    with torch.no_grad():
        near.blocks[-1].ln_2.weight.mul_(1e-3)
        near.blocks[-1].ln_2.bias.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(5, len(tiny.tok), (2, 9, 20), generator=torch.Generator().manual_seed(0))
    for model, lo, hi in ((random_init, 0.1, 2), (near, 1e-4, 1e-2)):
        for pooling in ('cls', 'mean'):
            emb = evaluation.pool(model, ids.flatten(0, 1), torch.ones_like(ids.flatten(0, 1)), pooling)
            assert lo < evaluation.spread(emb, emb[0]) < hi, (lo, pooling)
            assert evaluation.retrieval_scores(model, ids, torch.ones_like(ids), pooling)['pairs'] == 9


def test_a_collapsed_snapshot_of_a_run_adds_nothing_to_its_scores(tiny, tmp_path):
    """test_a_model_that_gives_every_pair_the_same_score_is_undefined_and_never_a_mean, now that such a model is
    refused: one line, no record, nothing in the run's scores.jsonl."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'metrics.jsonl').write_text('{"iter": 7, "val_loss": 6.5}\n')
    path = save_model(run / 'best.pt', constant_model(tiny).state_dict(), tiny)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', path, '--task=sts', f'--eval_data={sts_file(tmp_path / "sts.tsv", [i % 5 for i in range(12)])}',
                    f'--out_file={out}', '--max_len=32')
    assert_clean_error(proc, 'same embedding (collapsed): no STS score')
    assert not out.exists() and not (run / 'scores.jsonl').exists()


# ---- reading task files: csv, tsv, jsonl, txt; encodings, line endings; odd rows named by file and line

def test_equal_numbers_are_one_label_in_a_file_and_across_files(tmp_path):
    one = write(tmp_path / 'one.csv', 'text,label\n' + ''.join(f'text {i},{["1", "1.0", "0", "0.0"][i % 4]}\n' for i in range(80)))
    spec = finetune.local_task(one)
    assert spec['num_labels'] == 2 and spec['labels'] in (['0', '1'], ['0.0', '1'], ['0', '1.0'], ['0.0', '1.0'])
    assert all(y == (int(t.split()[1]) % 4 < 2) for split in spec['splits'].values() for t, _, y in split)
    folder = tmp_path / 'f'
    folder.mkdir()
    write(folder / 'train.csv', 'text,label\n' + ''.join(f'text {i},{i % 2}\n' for i in range(20)))
    write(folder / 'dev.csv', 'text,label\n' + ''.join(f'text {i},{i % 2}.0\n' for i in range(6)))
    spec = finetune.local_task(str(folder))
    assert [e[2] for e in spec['splits']['dev']] == [i % 2 for i in range(6)]


@pytest.mark.parametrize('row, words', [('a text, with a comma,1', ['3 fields', 'header has 2', 'quote']),
                                        ('a text with no label', ['1 field where', 'header has 2'])])
def test_a_row_with_more_or_fewer_fields_than_the_header_names_file_and_line(tiny, tmp_path, row, words):
    task = binary_folder(tmp_path / 'bin')
    with open(os.path.join(task, 'train.csv'), 'a') as f:
        f.write(row + '\n')
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={task}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'train.csv', 'line 42', *words)
    single = write(tmp_path / 'one.csv', f'text,label\n{row}\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40)))
    with pytest.raises(evaluation.TaskError, match=r"one.csv', line 2: "):
        finetune.local_task(single)


@pytest.mark.parametrize('line', ['{"text": null, "label": 1}', '{"text": NaN, "label": 1}', '{"text": 5, "label": 1}'])
def test_a_json_text_that_is_null_nan_or_a_number_is_refused(tmp_path, line):
    path = write(tmp_path / 't.jsonl', ''.join(json.dumps(dict(text=f'text {i}', label=i % 2)) + '\n' for i in range(30)) + line + '\n')
    with pytest.raises(evaluation.TaskError, match=r"t.jsonl', line 31: 'text' is"):
        finetune.local_task(path)
    sts = write(tmp_path / 's.jsonl', json.dumps(dict(sentence1='a', sentence2='b', score=1)) + '\n' +
                json.dumps(dict(sentence1='a', sentence2=None, score=2)) + '\n')
    with pytest.raises(evaluation.TaskError, match=r"s.jsonl', line 2: 'sentence2' is empty \(null\)"):
        evaluation.sts_pairs(sts)


def test_a_cp1252_csv_says_it_is_not_utf8_and_how_to_convert(tiny, tmp_path):
    path = write(tmp_path / 't.csv', 'text,label\n' + ''.join(f'caf\u00e9 number {i},{i % 2}\n' for i in range(40)), 'cp1252')
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={path}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 't.csv', 'line 2', 'not UTF-8', 'iconv')


def test_a_field_over_csv_s_default_limit_is_read(tmp_path):
    long = 'word ' * 30_000  # 150,000 characters: over csv's default 131,072
    path = write(tmp_path / 't.csv', 'text,label\n' + f'{long},1\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40)))
    rows = evaluation.read_rows(path)
    assert rows[0] == (2, {'text': long, 'label': '1'}) and len(rows) == 41


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    body = 'text,label\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40))
    assert evaluation.read_rows(write(tmp_path / 't.csv', '\ufeff' + body))[0] == (2, {'text': 'text 0', 'label': '0'})
    jsonl = write(tmp_path / 't.jsonl', '\ufeff' + json.dumps(dict(text='a', label=1)) + '\n')
    assert evaluation.read_rows(jsonl) == [(1, {'text': 'a', 'label': 1})]


def test_an_empty_value_is_said_to_be_empty_not_a_missing_column(tmp_path):
    path = write(tmp_path / 't.csv', 'text,label\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40)) + 'a text,\n')
    with pytest.raises(evaluation.TaskError, match=r"t.csv', line 42: 'label' is empty"):
        finetune.local_task(path)


def test_row_numbers_are_file_lines_also_after_multi_line_quoted_texts(tmp_path):
    with open(tmp_path / 't.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['text', 'label'])
        w.writerows([(f'a text\nover\nthree lines {i}', i % 2) for i in range(30)])  # lines 2-4, 5-7, ...
        w.writerow(['the last text', ''])  # line 92
    with pytest.raises(evaluation.TaskError, match=r"line 92: 'label' is empty"):
        finetune.local_task(str(tmp_path / 't.csv'))


def test_a_quoted_tsv_and_a_glue_tsv_with_bare_quotes_both_read_right(tmp_path):
    texts = [f'a "quoted" text\twith a tab {i}\nand a second line' for i in range(20)]
    with open(tmp_path / 'quoted.tsv', 'w', newline='') as f:  # csv.writer's tsv: quotes what needs it
        w = csv.writer(f, delimiter='\t')
        w.writerow(['text', 'label'])
        w.writerows((t, i % 2) for i, t in enumerate(texts))
    rows = evaluation.read_rows(str(tmp_path / 'quoted.tsv'))
    assert [r['text'] for _, r in rows] == texts and [line for line, _ in rows][:2] == [2, 4]
    glue = ['"the movie" is good', 'a "so-called" hit', '" an opening quote alone', 'it\'s fine']  # GLUE: quotes are text
    path = write(tmp_path / 'glue.tsv', 'sentence\tlabel\n' + ''.join(f'{t}\t{i % 2}\n' for i, t in enumerate(glue)))
    assert [r['sentence'] for _, r in evaluation.read_rows(path)] == glue


def test_a_utf16_file_is_read(tmp_path):
    body = 'text,label\n' + ''.join(f'caf\u00e9 {i},{i % 2}\n' for i in range(10))
    assert evaluation.read_rows(write(tmp_path / 't.csv', body, 'utf-16'))[0] == (2, {'text': 'caf\u00e9 0', 'label': '0'})


@pytest.mark.parametrize('content, words', [
    ('', ['has no rows']),
    ('text,label\n', ['has no rows', 'a header alone']),
    ('text,text,label\n' + 'a,b,1\n' * 5, ["column 'text' twice"]),
    ('text;label\n' + ''.join(f'text {i};{i % 2}\n' for i in range(20)), ["no 'text' column", "';'-separated"]),
])
def test_empty_header_only_duplicate_columns_and_other_delimiters_are_one_line(tiny, tmp_path, content, words):
    path = write(tmp_path / 't.csv', content)
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={path}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 't.csv', *words)


def test_a_folder_with_two_files_for_a_split_is_refused(tiny, tmp_path):
    task = binary_folder(tmp_path / 'bin')
    write(tmp_path / 'bin' / 'train.jsonl', json.dumps(dict(text='a', label='pos')) + '\n')
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={task}', f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'train.csv', 'train.jsonl', 'keep one')


@pytest.mark.parametrize('ending', ['\r\n', '\r', 'mixed'])
def test_f8_retrieval_reads_txt_paragraphs_with_any_line_ending(tiny, tmp_path, monkeypatch, hf_cache, ending):
    texts = paragraphs(tiny, 60)  # each of two lines, the paragraphs a blank line apart
    if ending == 'mixed':  # Windows lines, and every other blank line a Unix one (a file edited on both)
        body = ''.join(t.replace(' ', '\r\n', 1) + ('\n\n' if i % 2 else '\r\n\r\n') for i, t in enumerate(texts))
    else:
        body = (2 * ending).join(t.replace(' ', ending, 1) for t in texts) + ending
    kw = settings(eval_data=write(tmp_path / 'docs.txt', body))
    ids, mask = evaluation.retrieval_pairs({}, tiny.tok, **kw)
    assert ids.shape[1] == 60  # before: 1 document (CRLF, CR: 'needs at least 2 documents'), 31 (mixed)


def test_f8_jsonl_csv_and_tsv_with_other_line_endings_read_the_same_rows(tmp_path):
    rows = [dict(sentence1=f'text {i}', sentence2=f'other {i}', score=i % 3) for i in range(6)]
    for ending in ('\r\n', '\r'):
        jsonl = write(tmp_path / 'p.jsonl', ''.join(json.dumps(r) + ending for r in rows))
        assert evaluation.read_rows(jsonl) == list(enumerate(rows, 1)), repr(ending)  # before, '\r': "line 1: not a JSON object"
        for ext, sep in (('csv', ','), ('tsv', '\t')):
            table = write(tmp_path / f'p.{ext}', ending.join([sep.join(rows[0])] + [sep.join(map(str, r.values())) for r in rows]) + ending)
            assert evaluation.read_rows(table) == [(i, {k: str(v) for k, v in r.items()}) for i, r in enumerate(rows, 2)]


@pytest.mark.parametrize('encoding', ['utf-16', 'cp1252'])
def test_a_txt_file_in_another_encoding_is_read_right_or_refused_never_scored_as_garbage(tiny, tmp_path, monkeypatch, hf_cache, encoding):
    texts = [t.replace('module', 'caf\u00e9') for t in paragraphs(tiny, 6)]
    kw = settings(eval_data=write(tmp_path / 'docs.txt', '\n\n'.join(texts), encoding))
    try:
        ids, mask = evaluation.retrieval_pairs({}, tiny.tok, **kw)
    except evaluation.TaskError as e:
        assert 'docs.txt' in str(e) and 'iconv' in str(e)
    else:  # read right: the documents' first halves
        want = [tiny.tok(t, add_special_tokens=False)['input_ids'] for t in texts]
        assert [row[1:3].tolist() for row in ids[0]] == [w[:2] for w in want]


def test_jsonl_documents_without_a_text_are_skipped_and_counted_as_data_py_does(tiny, tmp_path, monkeypatch, hf_cache):
    texts = paragraphs(tiny, 6)
    path = write(tmp_path / 'd.jsonl', '\ufeff' + ''.join(json.dumps({'text': t}) + '\r\n' for t in texts) + '{"text": null}\n{"text": "  "}\n')
    kw = settings(eval_data=path)
    ids, mask, about = evaluation.retrieval_source({}, tiny.tok, **kw)
    assert ids.shape[1] == 6 and '2 rows without a text skipped' in about['said']


def test_f15_sts_pairs_names_flags_only_when_its_caller_has_them(tmp_path):
    path = write(tmp_path / 's.csv', 'a,b,human\n' + ''.join(f'text {i},other {i},{i % 4}\n' for i in range(8)))
    with pytest.raises(evaluation.TaskError) as e:
        evaluation.sts_pairs(path)  # contrastive.py's --sts_data: it has no --text_field
    assert "no 'sentence1' column (columns: a, b, human)" in str(e.value) and '--' not in str(e.value)
    assert 'sentence1, sentence2 and score' in str(e.value)
    flags = ('text_field', 'pair_field', 'label_field')
    with pytest.raises(evaluation.TaskError, match="no 'sentence1' column .*--text_field="):
        evaluation.sts_pairs(path, flags=flags)
    with pytest.raises(evaluation.TaskError, match="no 'y' column .*--label_field="):
        evaluation.sts_pairs(path, 'a', 'b', 'y', flags=flags)
    assert evaluation.sts_pairs(path, 'a', 'b', 'human')[1] == ('text 1', 'other 1', 1.0)
    bad = write(tmp_path / 'bad.csv', 'sentence1,sentence2,score\nx,y,1\nx,y,high\n')
    with pytest.raises(evaluation.TaskError, match="line 3: the score in 'score' is 'high', not a number"):
        evaluation.sts_pairs(bad)


def test_an_sts_file_whose_every_pair_is_one_text_twice_is_refused(tmp_path):
    """Every cosine is 1 for every model: Spearman is undefined, or a ranking of float noise."""
    path = write(tmp_path / 's.tsv', 'sentence1\tsentence2\tscore\n' + ''.join(f'text {i}\ttext {i}\t{i % 4}\n' for i in range(8)))
    with pytest.raises(evaluation.TaskError, match="every pair is one text twice"):
        evaluation.sts_pairs(path)


def test_repeated_documents_are_one_pair_each_in_retrieval(tiny, tmp_path, monkeypatch, hf_cache):
    """Two copies of a document are two right answers for each of its halves: the second copy is left out (as
    contrastive.py leaves a repeated held-out pair out), so that a perfect model can score 1."""
    texts = paragraphs(tiny, 12)
    path = write(tmp_path / 'd.jsonl', ''.join(json.dumps({'text': t}) + '\n' for t in texts + texts[:5]))
    kw = settings(eval_data=path)
    ids, mask, about = evaluation.retrieval_source({}, tiny.tok, **kw)
    assert ids.shape[1] == 12 and '5 repeated pairs left out' in about['said']  # before: 17 pairs, 5 of them tied twice


def test_documents_that_give_no_pairs_say_why(tiny, tmp_path, monkeypatch, hf_cache):
    path = write(tmp_path / 'd.jsonl', ''.join(json.dumps({'body': t, 'text': None}) + '\n' for t in paragraphs(tiny, 4)))
    kw = settings(eval_data=path)
    with pytest.raises(evaluation.TaskError, match=r"holds no documents \(4 rows without a text in 'text': name the text's key with --text_field="):
        evaluation.retrieval_pairs({}, tiny.tok, **kw)  # before: "line 1: 'text' is empty (null)"
    kw = settings(eval_data=path, text_field='body', max_pairs=1)
    with pytest.raises(evaluation.TaskError, match='--max_pairs=1 ranks one pair against nothing'):
        evaluation.retrieval_pairs({}, tiny.tok, **kw)  # before: "needs at least 2 documents of 32 tokens or more; found 1"


# ---- the command line: bad input and settings a task does not read are one line; nothing written

def write_csv(path, rows, header='text,label'):
    path.write_text(header + '\n' + ''.join(r + '\n' for r in rows))
    return str(path)


def test_finetune_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / 'results.jsonl'
    good = [f'some text number {i},{"pos" if i % 2 else "neg"}' for i in range(60)]
    table = write_csv(tmp_path / 't.csv', good)
    unseen = tmp_path / 'unseen'
    unseen.mkdir()
    write_csv(unseen / 'train.csv', good[:20])
    write_csv(unseen / 'dev.csv', ['a new text,neutral'])
    empty = tmp_path / 'empty'
    empty.mkdir()
    write_csv(empty / 'train.csv', good[:20])
    write_csv(empty / 'dev.csv', [])
    one = write_csv(tmp_path / 'one.csv', [f'text {i},pos' for i in range(30)])
    other = data.train_tokenizer(iter(['completely different words here'] * 50 + good), vocab_size=200)
    other.save_pretrained(tmp_path / 'other_tok')
    cases = [
        (['--task=nosuch'], ['unknown task', 'nosuch']),
        ([f'--task={table}', '--label_field=stars'], ["no 'stars' column", '--label_field']),
        ([f'--task={table}', '--text_field=review'], ["no 'review' column", '--text_field']),
        ([f'--task={unseen}'], ["'neutral'", 'never occurs in training']),
        ([f'--task={one}'], ['at least 2 labels']),
        ([f'--task={table}', '--problem=regression'], ['needs numbers', "'neg'", '--problem=classification']),
        ([f'--task={empty}'], ['dev split', 'empty']),
        ([f'--task={table}', f'--tokenizer={tmp_path / "other_tok"}'], ['another vocabulary']),
        (['--task=rte'], ["cannot load GLUE task 'rte'", '--task=FILE.csv']),
        (['--task=sts'], ['--eval_data=FILE']),
        (['--seeds=a,b'], ['seeds must be']),
        (['--lr=1e-4'], ["unknown config key 'lr'", 'learning_rate']),
        (['--warmup_frac=1.5'], ['warmup_frac must be in [0, 1)']),
        ([f'--task={table}', '--max_len=128'], ["max_len 128 exceeds the model's max_positions 64"]),
    ]
    for args, words in cases:
        proc = run_here('finetune.py', tiny.ckpts[0], f'--out_file={out}', *args)
        assert_clean_error(proc, *words)
        assert not out.exists(), args
    assert_clean_error(run_here('finetune.py', str(tmp_path / 'missing.pt')), 'not found')
    assert_clean_error(run_here('finetune.py'), 'give a model')


@pytest.mark.parametrize('seeds, words', [('0', ['runs nothing']), ('0,0', ['seed 0 twice']), ('-1', ['seed -1', 'range']),
                                          ('3,-2', ['seed -2'])])
def test_seeds_that_run_nothing_twice_or_negative_are_refused(tiny, tmp_path, seeds, words):
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={binary_folder(tmp_path / "bin")}', f'--seeds={seeds}',
                    *FAST, f'--out_file={out}')
    assert_clean_error(proc, *words)
    assert not out.exists()


def convert_hf_config(tiny):
    import convert_hf
    return convert_hf.hf_config(tiny_config(vocab_size=len(tiny.tok))).to_dict()


@pytest.mark.parametrize('weights', [None, b'not a safetensors file'])
def test_a_model_folder_without_weights_or_with_damaged_ones_is_one_line(tiny, tmp_path, weights):
    folder = tmp_path / 'hf'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(convert_hf_config(tiny)))
    if weights:
        (folder / 'model.safetensors').write_bytes(weights)
    proc = run_here('finetune.py', str(folder), '--task=sts', f'--eval_data={sts_file(tmp_path / "s.tsv", [1, 2, 3])}',
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, str(folder))


def test_an_out_file_that_cannot_be_written_is_refused_before_any_work(tiny, tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=nosuch', f'--out_file={folder}')  # the task would fail later
    assert_clean_error(proc, 'out_file', str(folder), 'cannot be written')
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=nosuch', f'--out_file={tmp_path / "new.jsonl"}')
    assert_clean_error(proc, 'unknown task')
    assert not (tmp_path / 'new.jsonl').exists()  # the check leaves no file behind


def test_a_missing_sts_file_is_one_line(tiny, tmp_path):
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=sts', f'--eval_data={tmp_path / "nosuch.tsv"}',
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'nosuch.tsv', 'file not found')


def test_ctrl_c_is_one_line_exit_130_and_keeps_finished_records(tiny, tmp_path):
    task, out = binary_folder(tmp_path / 'bin', n_train=200), tmp_path / 'r.jsonl'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'finetune.py'), tiny.ckpts[0], f'--task={task}',
                             '--epochs=1000', '--max_len=32', '--batch_size=8', f'--out_file={out}'],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # 'task ...': the fine-tune has started
    assert line.startswith('task '), line + proc.stderr.read() if proc.poll() is not None else line
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == f'error: interrupted; the records of finished runs are in {out}'


def test_sts_honours_the_field_names(tiny, tmp_path):
    path = write(tmp_path / 's.csv', 'a,b,human\n' + ''.join(f'text {i},other {i},{i % 4}\n' for i in range(8)))
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=sts', f'--eval_data={path}', '--text_field=a', '--pair_field=b',
                    '--label_field=human', f'--out_file={out}', '--max_len=32')
    assert proc.returncode == 0, proc.stderr
    assert records(out)[0]['pairs'] == 8


def test_retrieval_on_another_key_names_text_field_and_the_keys(tiny, tmp_path):
    docs = write(tmp_path / 'd.jsonl', ''.join(json.dumps(dict(body=e[0], id=i)) + '\n' for i, e in enumerate(tiny.task['splits']['test'][:20])))
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=retrieval', f'--eval_data={docs}', '--max_len=64',
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, "no column 'text'", 'body, id', '--text_field')


def test_a_relative_data_dir_is_found_beside_the_run_and_the_tried_paths_are_said(tiny, tmp_path, monkeypatch):
    root = tmp_path / 'project'  # train.py ran in project/: data/x and out/best.pt
    (root / 'data' / 'x').mkdir(parents=True)
    (root / 'data' / 'x' / 'val.bin').write_bytes(b'')
    (root / 'out').mkdir()
    (root / 'out' / 'best.pt').write_bytes(b'')
    monkeypatch.chdir(tmp_path)  # run from elsewhere
    found, tried = evaluation.prepared_dir({'data_dir': 'data/x'}, str(root / 'out' / 'best.pt'))
    assert found == str(root / 'data' / 'x') and tried[0] == 'data/x'
    with pytest.raises(evaluation.TaskError, match=f"tried data/y/val.bin, {root / 'data' / 'y' / 'val.bin'}, "):
        evaluation.retrieval_pairs({'data_dir': 'data/y'}, tiny.tok, str(root / 'out' / 'best.pt'))


def test_a_run_folder_given_as_the_model_says_give_its_checkpoint(tiny, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    os.link(tiny.ckpts[0], run / 'best.pt')
    proc = run_here('finetune.py', str(run), '--task=sts', f'--eval_data={sts_file(tmp_path / "s.tsv", [1, 2, 3])}',
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'run folder', str(run / 'best.pt'))


def test_a_missing_table_is_file_not_found_not_an_unknown_task(tiny, tmp_path):
    for name in ('nosuch.csv', 'nosuch.tsv', 'nosuch.jsonl'):
        proc = run_here('finetune.py', tiny.ckpts[0], f'--task={tmp_path / name}', f'--out_file={tmp_path / "r.jsonl"}')
        assert_clean_error(proc, name, 'file not found')


@pytest.mark.parametrize('args', [['--task=pydocs', '--problem=regression'], ['--task=rte', '--problem=classification'],
                                  ['--task=pydocs', '--text_field=body'], ['--task=retrieval', '--label_field=y'],
                                  ['--task=pydocs', '--eval_data=x.tsv'], ['--task=sts', '--eval_data=x.tsv', '--seeds=3']])
def test_a_setting_the_task_does_not_read_is_refused(tiny, tmp_path, args):
    proc = run_here('finetune.py', tiny.ckpts[0], *args, f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, args[-1].split('=')[0])


def test_an_out_file_that_is_a_model_or_the_task_s_data_is_refused_and_left_as_it_was(tiny, tmp_path):
    task = binary_folder(tmp_path / 'bin')
    table = write(tmp_path / 't.csv', 'text,label\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40)))
    before = [open(p, 'rb').read() for p in (tiny.ckpts[0], table)]
    for args in ([f'--task={task}', f'--out_file={tiny.ckpts[0]}'], [f'--task={table}', f'--out_file={table}'],
                 [f'--task={task}', f'--out_file={tmp_path / "new.pt"}']):
        assert_clean_error(run_here('finetune.py', tiny.ckpts[0], *args, *FAST), 'out_file', 'damage')
    assert [open(p, 'rb').read() for p in (tiny.ckpts[0], table)] == before
    assert not (tmp_path / 'new.pt').exists()


def test_a_model_given_twice_is_refused(tiny, tmp_path):
    proc = run_here('finetune.py', tiny.ckpts[0], tiny.ckpts[0], f'--task={binary_folder(tmp_path / "bin")}', *FAST,
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'given twice')


def test_an_empty_document_file_and_a_label_read_as_text_are_one_line(tiny, tmp_path):
    empty = write(tmp_path / 'docs.txt', '\n\n')
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=retrieval', f'--eval_data={empty}', '--max_len=64',
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, 'docs.txt', 'no documents')
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={binary_folder(tmp_path / "bin")}', '--text_field=label', *FAST,
                    f'--out_file={tmp_path / "r.jsonl"}')
    assert_clean_error(proc, "'label' is both a text and the label column")


def test_a_save_path_another_run_wrote_meanwhile_is_kept(tiny, tmp_path, monkeypatch):
    import data
    save, other = tmp_path / 'ft.pt', b'another run\'s model'
    load = data.load_tokenizer
    def load_and_meanwhile(*args, **kw):  # after the start's checks, before the fine-tune ends
        save.write_bytes(other)
        return load(*args, **kw)
    monkeypatch.setattr(data, 'load_tokenizer', load_and_meanwhile)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], f'--task={binary_folder(tmp_path / "bin")}', *FAST, f'--save={save}',
                    f'--out_file={out}')
    assert_clean_error(proc, 'appeared while this ran')
    assert save.read_bytes() == other and len(records(out)) == 1  # the seed's record stays: its numbers are true


def test_f19_max_eval_limits_beir_queries_and_max_pairs_is_refused_for_beir(tiny, tmp_path):
    folder = tiny_beir(tiny, tmp_path / 'b')[0]
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=beir', f'--eval_data={folder}', '--max_len=64', '--max_eval=5',
                    f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert '5 queries scored (a fixed random 5 of 14: --max_eval)' in proc.stdout, proc.stdout
    assert records(out)[0]['queries'] == 5
    again = run_here('finetune.py', tiny.ckpts[0], '--task=beir', f'--eval_data={folder}', '--max_len=64', '--max_eval=5',
                     f'--out_file={out}')
    assert again.returncode == 0, again.stderr
    assert records(out)[1]['ndcg@10'] == records(out)[0]['ndcg@10']  # the same subset each time
    for args, flag in ((['--task=beir', f'--eval_data={folder}', '--max_pairs=5'], '--max_pairs'),
                       (['--task=retrieval', '--max_eval=5'], '--max_eval'),
                       (['--task=sts', f'--eval_data={sts_file(tmp_path / "s.tsv", [1, 2, 3])}', '--max_train=5'], '--max_train')):
        assert_clean_error(run_here('finetune.py', tiny.ckpts[0], *args, f'--out_file={tmp_path / "x.jsonl"}'), flag, 'does not apply')
    assert not (tmp_path / 'x.jsonl').exists()


def test_f19_max_eval_limits_sts_pairs_and_a_subset_with_one_score_is_refused(tiny, tmp_path):
    gold = sts_file(tmp_path / 's.tsv', [i % 5 for i in range(30)])
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=sts', f'--eval_data={gold}', '--max_eval=12', '--max_len=32',
                    f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert records(out)[0]['pairs'] == 12
    flat = sts_file(tmp_path / 'f.tsv', [3] * 29 + [4])
    with pytest.raises(evaluation.TaskError, match='every pair has the score 3'):
        evaluation.sts_pairs(flat, keep=2)


# ---- --task=beir: metrics as pytrec_eval and BEIR compute them, an exact chunked search, ties, bad folders

def reference_metrics(ranked, qrels):
    """nDCG@10, recall@100, MRR@10 of each query, written out from the definitions (trec_eval's ndcg_cut: gain = the
    judged relevance, none below 1; BEIR's mrr: relevant = score above 0)."""
    out = []
    for docs, rel in zip(ranked, qrels):
        dcg = 0.0
        for rank in range(1, min(10, len(docs)) + 1):
            if rel.get(docs[rank - 1], 0) > 0:
                dcg += rel[docs[rank - 1]] / math.log2(rank + 1)
        ideal, idcg = sorted([s for s in rel.values() if s > 0], reverse=True), 0.0
        for rank in range(1, min(10, len(ideal)) + 1):
            idcg += ideal[rank - 1] / math.log2(rank + 1)
        found = 0
        for d in docs[:100]:
            if rel.get(d, 0) > 0:
                found += 1
        mrr = 0.0
        for rank in range(1, min(10, len(docs)) + 1):
            if rel.get(docs[rank - 1], 0) > 0:
                mrr = 1 / rank
                break
        out.append((dcg / idcg, found / len(ideal), mrr) if ideal else (0.0, 0.0, 0.0))  # nothing relevant: 0, as trec_eval
    return out


def random_judgments(seed, n_queries=40, n_docs=300):
    """Rankings of 120 documents (some relevant ones never retrieved) and graded judgments with 0s and a -1."""
    rng = random.Random(seed)
    ranked, qrels = [], []
    for _ in range(n_queries):
        ranked.append(rng.sample(range(n_docs), 120))
        judged = rng.sample(range(n_docs), rng.randrange(1, 25))
        qrels.append({d: rng.choice([0, 0, 1, 1, 2, 3, -1]) for d in judged})
        qrels[-1][judged[0]] = rng.choice([1, 2, 3])  # a relevant document ...
    qrels[-1] = {d: 0 for d in qrels[-1]}  # ... but for the last query: it scores 0 in BEIR, and so here
    return ranked, qrels


def test_beir_metrics_match_hand_computed_values_and_a_loop_reference():
    # ranks 1..4 judged 0, 1, -, 2: DCG = 1/log2(3) + 2/log2(5); ideal 2, 1: 2 + 1/log2(3)
    got = evaluation.beir_metrics([[3, 2, 5, 1]], [{1: 2, 2: 1, 3: 0}])
    assert got['ndcg@10'] == pytest.approx((1 / math.log2(3) + 2 / math.log2(5)) / (2 + 1 / math.log2(3)))
    assert got['ndcg@10'] == pytest.approx(0.5672074169568709)  # pytrec_eval's ndcg_cut_10, run once by hand
    assert got['recall@100'] == 1.0 and got['mrr@10'] == 0.5
    # a -1 is no gain (trec_eval), a relevant document past 10 is no reciprocal rank but is recalled up to 100
    got = evaluation.beir_metrics([[4, 9, *range(10, 20), 7]], [{4: -1, 7: 1, 8: 1}])
    assert got == {'ndcg@10': 0.0, 'recall@100': 0.5, 'mrr@10': 0.0}
    ranked, qrels = random_judgments(0)
    got = evaluation.beir_metrics(ranked, qrels)
    ref = reference_metrics(ranked, qrels)
    for i, name in enumerate(('ndcg@10', 'recall@100', 'mrr@10')):
        assert got[name] == pytest.approx(sum(r[i] for r in ref) / len(ref), abs=1e-12), name


def test_beir_metrics_match_pytrec_eval():
    pytrec_eval = pytest.importorskip('pytrec_eval')
    ranked, qrels = random_judgments(1)
    got = evaluation.beir_metrics(ranked, qrels)
    run = {f'q{q}': {f'd{d}': float(len(docs) - r) for r, d in enumerate(docs)} for q, docs in enumerate(ranked)}
    judged = {f'q{q}': {f'd{d}': s for d, s in rel.items()} for q, rel in enumerate(qrels)}
    theirs = pytrec_eval.RelevanceEvaluator(judged, {'ndcg_cut.10', 'recall.100'}).evaluate(run)
    cut = {q: {d: s for d, s in docs.items() if s > len(ranked[0]) - 10} for q, docs in run.items()}  # the top 10
    mrr10 = pytrec_eval.RelevanceEvaluator(judged, {'recip_rank'}).evaluate(cut)
    assert len(theirs) == len(ranked)
    assert got['ndcg@10'] == pytest.approx(sum(s['ndcg_cut_10'] for s in theirs.values()) / len(theirs), abs=1e-12)
    assert got['recall@100'] == pytest.approx(sum(s['recall_100'] for s in theirs.values()) / len(theirs), abs=1e-12)
    assert got['mrr@10'] == pytest.approx(sum(s['recip_rank'] for s in mrr10.values()) / len(mrr10), abs=1e-12)


def reference_search(sim, k, same, doc_ids=None):
    """Each row's k best columns by (score descending, then column ascending, or with doc_ids, document id descending
    in strcmp order: trec_eval's tie rule), its own column left out: a Python sort."""
    out = []
    for q, row in enumerate(sim.tolist()):
        cols = sorted((c for c in range(len(row)) if c != same[q]), key=(lambda c: doc_ids[c]) if doc_ids else None,
                      reverse=bool(doc_ids))
        out.append(sorted(cols, key=lambda c: -row[c])[:k])  # stable: ties stay in the tie order
    return out


@pytest.mark.parametrize('by_id', [False, True])
@pytest.mark.parametrize('k', [5, 100])
def test_chunked_search_equals_a_whole_stable_sort_also_with_ties(k, by_id):
    """Ties in corpus order (tie=None), or as pytrec_eval breaks them: by document id, descending (issue 40, finding 4)."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(-2, 3, (23, 4), generator=gen).float()  # few distinct dot products: ties everywhere
    corpus = torch.randint(-2, 3, (61, 4), generator=gen).float()
    same = [int(x) for x in torch.randint(-1, 61, (23,), generator=gen)]
    doc_ids = [str(i) for i in torch.randperm(200, generator=gen)[:61].tolist()] if by_id else None  # '9' > '10' > '1'
    want = reference_search(queries @ corpus.T, k, same, doc_ids)
    tie = evaluation.tie_order(doc_ids) if by_id else None
    for chunk, block in ((61, 1024), (7, 5), (1, 2)):
        val, idx = evaluation.beir_search(queries, (corpus[i:i + chunk] for i in range(0, 61, chunk)), k, same, block=block,
                                        tie=tie)
        got = [[c for c, v in zip(r, vs) if v > -math.inf] for r, vs in zip(idx.tolist(), val.tolist())]
        assert got == want, (chunk, block)
        if k > 61:  # one slot per query left for the document left out
            assert val.shape == (23, 61) and all((v == -math.inf).sum() == (s >= 0) for v, s in zip(val, same))


def test_f4_two_identical_documents_rank_as_pytrec_eval_ranks_them(tiny, tmp_path, monkeypatch):
    kw = settings(max_len=64)
    texts = paragraphs(tiny, 8)
    same_text = texts[0][:150]
    docs = [('a', None, same_text), ('b', None, same_text)] + [(f'c{i}', None, t[:150]) for i, t in enumerate(texts[1:])]
    folder = write_beir(tmp_path / 'b', docs, [('q', same_text)], [('q', 'b', 1)])
    beir = evaluation.beir_data(folder, 'test')
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    got = evaluation.beir_scores(model, tiny.tok, beir, 'mean', 'cpu', max_len=kw['max_len'])
    # trec_eval ranks 'b' above 'a' (equal scores, ids descending): the relevant document is first. pytrec_eval, run once by
    # hand on {'q': {'a': s, 'b': s}} against {'q': {'b': 1}}: ndcg_cut_10 1.0, recip_rank 1.0 (corpus order gave 0.6309, 0.5)
    assert got['ndcg@10'] == 1.0 and got['mrr@10'] == 1.0
    # against a loop: every text embedded alone, the whole matrix sorted by (-score, id descending)
    emb = [evaluation.pool(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 'mean')[0]
           for ids in tiny.tok(beir['queries'] + beir['texts'], truncation=True, max_length=64)['input_ids']]
    sim = emb[0][None] @ torch.stack(emb[1:]).T
    ranked = reference_search(sim, 100, [-1], beir["doc_ids"])
    assert ranked[0][:2] == [1, 0]
    ref = reference_metrics(ranked, beir['qrels'])[0]
    assert (got['ndcg@10'], got['recall@100'], got['mrr@10']) == pytest.approx(ref)


def test_f4_copies_of_a_text_in_different_chunks_tie_exactly_and_rank_by_id(tiny, tmp_path, monkeypatch):
    """6 texts, each under 5 ids spread over the corpus among 12 others: whatever chunk and batch (padded to another
    length) a copy is embedded in, it scores as its copies do to the bit, and they rank by id descending; the search
    equals a loop over every text embedded alone and scored in float64."""
    kw = settings(max_len=64)
    every = paragraphs(tiny, 18)
    texts = [t[:120] for t in every[:6]]
    fillers = [t[:40 + 25 * i] for i, t in enumerate(every[6:])]  # of other lengths: chunks padded to other lengths
    gen = torch.Generator().manual_seed(0)
    names = [f'd{i}' for i in torch.randperm(100, generator=gen)[:42].tolist()]
    order = torch.randperm(42, generator=gen).tolist()
    docs = [(names[k], None, texts[k % 6] if k < 30 else fillers[k - 30]) for k in order]
    names = [n for n, _, _ in docs]
    copies = [[n for n, _, t in docs if t == texts[j]] for j in range(6)]
    queries = [(f'q{j}', texts[j][:60]) for j in range(6)]
    folder = write_beir(tmp_path / 'b', docs, queries, [(f'q{j}', copies[j][j % 5], 1 + j % 2) for j in range(6)])
    beir = evaluation.beir_data(folder, 'test')
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    got = evaluation.beir_scores(model, tiny.tok, beir, 'mean', 'cpu', chunk=7, max_len=kw['max_len'])  # copies in 6 chunks of 7
    every = sorted(set(beir['queries'] + beir['texts']))
    emb = {t: evaluation.pool(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 'mean')[0].double()
           for t, ids in zip(every, tiny.tok(every, truncation=True, max_length=64)['input_ids'])}
    sim = torch.tensor([[float(emb[q] @ emb[d]) for d in beir['texts']] for q in beir['queries']]).float()
    ranked = reference_search(sim, 100, [-1] * 6, beir["doc_ids"])
    ref = reference_metrics(ranked, beir['qrels'])
    for i, name in enumerate(('ndcg@10', 'recall@100', 'mrr@10')):
        assert got[name] == pytest.approx(sum(r[i] for r in ref) / 6, abs=1e-12), name


def test_f4_pytrec_eval_breaks_ties_by_document_id_descending():
    """The rule the two tests above follow, checked against pytrec_eval itself where it is installed."""
    pytrec_eval = pytest.importorskip('pytrec_eval')
    ids = ['a', 'b', 'B', 'aa', '10', '9', '\u00e9', 'z', 'Z', '_']
    for target in ids:
        rr = pytrec_eval.RelevanceEvaluator({'q': {target: 1}}, {'recip_rank'}).evaluate({'q': dict.fromkeys(ids, 1.0)})
        assert round(1 / rr['q']['recip_rank']) == sorted(ids, reverse=True).index(target) + 1, target


def test_beir_scores_equal_a_whole_corpus_reference(tiny, tmp_path, monkeypatch):
    folder, docs, queries, qrels = tiny_beir(tiny, tmp_path / 'b')
    beir = evaluation.beir_data(folder, 'test')
    assert beir['texts'][0] == 'title 0 ' + docs[0][2] and beir['texts'][1] == docs[1][2]  # (title + ' ' + text).strip()
    assert beir['query_ids'] == [f'q{i}' for i in range(12)] + ['d4', 'q-none'] and beir['unanswerable'] == 1
    torch.manual_seed(0)
    model = MPNet(MPNetConfig(vocab_size=len(tiny.tok), **TINY)).eval()
    got = evaluation.beir_scores(model, tiny.tok, beir, 'mean', 'cpu', chunk=7, max_len=64)  # 6 chunks: merging across them
    # reference: every text embedded alone (no padding), the whole similarity matrix sorted in Python
    emb = [evaluation.pool(model, torch.tensor([tiny.tok(t, truncation=True, max_length=64)['input_ids']]),
                         torch.ones(1, len(tiny.tok(t, truncation=True, max_length=64)['input_ids']), dtype=torch.long), 'mean')[0]
           for t in beir['queries'] + beir['texts']]
    sim = torch.stack(emb[:14]) @ torch.stack(emb[14:]).T
    ids = [d[0] for d in docs]
    same = [ids.index(q) if q in ids else -1 for q in beir['query_ids']]
    ranked = reference_search(sim, 100, same)
    assert 4 not in ranked[-2] and sim[-2, 4] == sim[-2].max()  # query 'd4' is document d4's text: left out, as BEIR
    rel = [{ids.index(d): s for q2, d, s in qrels if q2 == q} for q in beir['query_ids']]
    ref = reference_metrics(ranked, rel)
    assert got['queries'] == 14 and got['documents'] == 40 and ref[-1] == (0.0, 0.0, 0.0)  # q-none: 0, as in BEIR
    for i, name in enumerate(('ndcg@10', 'recall@100', 'mrr@10')):
        assert got[name] == pytest.approx(sum(r[i] for r in ref) / 14, abs=1e-5), name


def test_beir_from_the_command_line_prints_records_and_adds_a_runs_score(tiny, tmp_path):
    folder = tiny_beir(tiny, tmp_path / 'b')[0]
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'metrics.jsonl').write_text('{"iter": 7, "val_loss": 6.5}\n')
    os.link(tiny.ckpts[0], run / 'best.pt')
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', str(run / 'best.pt'), '--task=beir', f'--eval_data={folder}', '--max_len=64', f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert f'beir {folder} (test): 40 documents, 14 queries scored (1 of them without a relevant document in qrels/test.tsv: each scores 0, as in BEIR)' in proc.stdout
    record = records(out)[0]
    assert f"{run / 'best.pt'} (iter 7), mean pooling: ndcg@10 {record['ndcg@10']:.4f}, recall@100 {record['recall@100']:.4f}, " \
           f"mrr@10 {record['mrr@10']:.4f}, queries 14, documents 40" in proc.stdout
    assert record['score'] == record['ndcg@10'] and record['score_metric'] == 'ndcg@10' and record['task'] == 'beir'
    assert record['config']['beir_split'] == 'test' and record['iter_num'] == 7
    score = records(run / 'scores.jsonl')[0]
    assert score['metric'] == 'ndcg@10' and score['mean'] == record['score'] and score['recipe']['beir_split'] == 'test'
    # another split by name; a model run twice scores the same
    os.rename(os.path.join(folder, 'qrels', 'test.tsv'), os.path.join(folder, 'qrels', 'dev.tsv'))
    proc = run_here('finetune.py', str(run / 'best.pt'), '--task=beir', f'--eval_data={folder}', '--beir_split=dev',
                    '--max_len=64', f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert records(out)[1]['ndcg@10'] == record['ndcg@10']


def test_a_few_judged_documents_the_corpus_lacks_are_kept_as_beir_keeps_them(tiny, tmp_path):
    docs = [(f'd{i}', None, f'text number {i}') for i in range(200)]
    queries = [(f'q{i}', f'text number {i}') for i in range(150)]
    qrels = [(f'q{i}', f'd{i}', 1) for i in range(149)] + [('q149', 'gone', 1)]  # 1 of 150 rows: ArguAna has such
    folder = write_beir(tmp_path / 'b', docs, queries, qrels)
    beir = evaluation.beir_data(folder, 'test')
    assert beir['unknown'] == [(151, 'gone')] and len(beir['queries']) == 150  # its query stays, unreachable
    assert evaluation.beir_metrics([[0]] * 150, beir['qrels'])['recall@100'] == pytest.approx(1 / 150)
    out = tmp_path / 'r.jsonl'
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=beir', f'--eval_data={folder}', '--max_len=64', f'--out_file={out}')
    assert proc.returncode == 0, proc.stderr
    assert "note: 1 judgment(s) name a document corpus.jsonl lacks (line 151: 'gone')" in proc.stdout


def test_bad_beir_folders_are_one_line_and_write_nothing(tiny, tmp_path):
    good = dict(docs=[('d1', 't', 'one'), ('d2', None, 'two')], queries=[('q1', 'one?'), ('q2', 'two?')],
                qrels=[('q1', 'd1', 1), ('q2', 'd2', 2)])

    def folder(name, **change):
        return write_beir(tmp_path / name, **{**good, **change})

    no_corpus = folder('no_corpus')
    os.remove(os.path.join(no_corpus, 'corpus.jsonl'))
    gz = folder('gz')
    os.rename(os.path.join(gz, 'corpus.jsonl'), os.path.join(gz, 'corpus.jsonl.gz'))
    dup = folder('dup')
    with open(os.path.join(dup, 'corpus.jsonl'), 'a') as f:
        f.write(json.dumps({'_id': 'd1', 'text': 'again'}) + '\n')
    cases = [
        ([f'--eval_data={tmp_path / "nosuch"}'], ['nosuch', 'folder not found']),
        ([f'--eval_data={folder("f") + "/corpus.jsonl"}'], ['a file', 'BEIR folder']),
        ([f'--eval_data={no_corpus}'], ['no corpus.jsonl', 'queries.jsonl']),
        ([f'--eval_data={gz}'], ['corpus.jsonl.gz', 'gunzip']),
        ([f'--eval_data={folder("split")}', '--beir_split=dev'], ['qrels/dev.tsv', 'test', '--beir_split=']),
        ([f'--eval_data={folder("empty", docs=[])}'], ['corpus.jsonl', 'no documents']),
        ([f'--eval_data={dup}'], ['corpus.jsonl', 'line 3', "'d1' again", 'line 1']),
        ([f'--eval_data={folder("qdup", queries=[("q1", "a"), ("q1", "b")])}'], ['queries.jsonl', 'line 2', "'q1' again"]),
        ([f'--eval_data={folder("noid", docs=[(None, None, "x")])}'], ['corpus.jsonl', 'line 1', "'_id' is null"]),
        ([f'--eval_data={folder("notext", docs=[("d1", None, 5)])}'], ['corpus.jsonl', 'line 1', "'text' is 5, not a text"]),
        ([f'--eval_data={folder("word", qrels=[("q1", "d1", "high")])}'], ['test.tsv', 'line 2', "'high'", 'whole number']),
        ([f'--eval_data={folder("half", qrels=[("q1", "d1", "1.5")])}'], ['test.tsv', 'line 2', "'1.5'", 'whole number']),
        ([f'--eval_data={folder("uq", qrels=[("q1", "d1", 1), ("q9", "d1", 1)])}'], ['test.tsv', 'line 3', "query 'q9'", '1 row']),
        ([f'--eval_data={folder("ud", qrels=[("q1", "d1", 1), ("q2", "d9", 1)])}'], ['test.tsv', 'line 3', "document 'd9'", 'different datasets']),
        ([f'--eval_data={folder("zero", qrels=[("q1", "d1", 0), ("q2", "d2", -1)])}'], ['test.tsv', 'no query has a relevant document']),
        ([f'--eval_data={folder("twice", qrels=[("q1", "d1", 1), ("q1", "d1", 2)])}'], ['line 3', 'judged 2', 'and 1 on line 2']),
        ([f'--eval_data={write_beir(tmp_path / "nohead", header="q1	d2	1", **good)}'], ['line 1', 'not the header']),
        ([f'--eval_data={write_beir(tmp_path / "cols", header="a	b	c	d", **{**good, "qrels": [("q1", "d1", "1	x")]})}'],
         ['line 1', '4 columns']),
        ([], ['--task=beir needs --eval_data=FOLDER']),
        ([f'--eval_data={folder("seeds")}', '--seeds=2'], ['trains nothing']),
    ]
    out = tmp_path / 'results.jsonl'
    for args, words in cases:
        proc = run_here('finetune.py', tiny.ckpts[0], '--task=beir', f'--out_file={out}', *args)
        assert_clean_error(proc, *words)
        assert not out.exists(), args
    # a setting for another task, and an out_file that is one of the folder's files
    assert_clean_error(run_here('finetune.py', tiny.ckpts[0], '--task=pydocs', '--beir_split=dev', f'--out_file={out}'),
                       '--beir_split', '--task=beir')
    ok = folder('ok')
    before = open(os.path.join(ok, 'corpus.jsonl')).read()
    proc = run_here('finetune.py', tiny.ckpts[0], '--task=beir', f'--eval_data={ok}', f'--out_file={ok}/corpus.jsonl')
    assert_clean_error(proc, "the task's data")
    assert open(os.path.join(ok, 'corpus.jsonl')).read() == before


def test_a_sentence_transformers_models_own_length_is_said_when_max_len_differs(tiny, tmp_path):
    from test_all import save_model
    folder = tiny_beir(tiny, tmp_path / 'b')[0]
    st = save_model(tmp_path / 'st.pt', torch.load(tiny.ckpts[0], weights_only=True)['model'], tiny,
                    st_files={'sentence_bert_config.json': json.dumps({'max_seq_length': 48})})
    for max_len, said in ((64, True), (48, False)):
        proc = run_here('finetune.py', st, '--task=beir', f'--eval_data={folder}', f'--max_len={max_len}',
                        f'--out_file={tmp_path / "r.jsonl"}')
        assert proc.returncode == 0, proc.stderr
        assert ('cuts at 48: pass --max_len=48 to score as BEIR does' in proc.stdout) == said, proc.stdout


# ===== pairs.py and contrastive.py: the loss, gradient caching, gathered negatives, held-out pairs, a run =====

# ---- the loss against sentence-transformers' as a loop; gradient caching and gathered negatives, exact

def reference_mnrl(texts, emb, scale=20.0, symmetric=False):
    """sentence-transformers' MultipleNegativesRankingLoss as a loop over anchors, in float64: -log of the softmax
    of scale x cosine of the anchor's own positive among the positives and negatives of the batch; a candidate that
    is the same text as the anchor or its positive, or the positive of another copy of the anchor, is skipped.
    texts: K lists of N strings (anchor, positive, negative); emb [K, N, C]."""
    e = F.normalize(emb.double(), dim=-1)
    K, N = len(texts), len(texts[0])
    cos = lambda u, v: float((u * v).sum())
    total = 0.0
    for i in range(N):
        terms = []
        for k in range(1, K):
            for j in range(N):
                right = (k, j) == (1, i)
                same = texts[k][j] in (texts[0][i], texts[1][i]) or (k == 1 and texts[0][j] == texts[0][i])
                if right or not same:
                    terms.append((right, scale * cos(e[0, i], e[k, j])))
        total += -next(s for r, s in terms if r) + math.log(sum(math.exp(s) for _, s in terms))
    forward = total / N
    if not symmetric:
        return forward
    total = 0.0
    for i in range(N):
        terms = [(j == i, scale * cos(e[1, i], e[0, j])) for j in range(N)
                 if j == i or texts[0][j] not in (texts[0][i], texts[1][i]) and texts[1][j] != texts[1][i]]
        total += -next(s for r, s in terms if r) + math.log(sum(math.exp(s) for _, s in terms))
    return (forward + total / N) / 2


def ids_of(texts):
    return torch.tensor([[hash(t) for t in column] for column in texts])


@pytest.mark.parametrize('symmetric', [False, True])
def test_info_nce_equals_a_loop_reference_and_masks_duplicates(symmetric):
    torch.manual_seed(0)
    rng = random.Random(0)
    # duplicates of every kind: an anchor twice (with other positives), a positive twice, a negative equal to another
    # row's positive, a positive equal to another row's anchor
    texts = [[f'q{rng.randint(0, 7)}' for _ in range(13)], [f'd{rng.randint(0, 9)}' for _ in range(13)],
             [f'd{rng.randint(5, 14)}' for _ in range(13)]]
    texts[1][3] = texts[0][5]
    emb = torch.randn(3, 13, 24)
    for K in (2, 3):
        ours = contrastive.info_nce(emb[:K], ids_of(texts[:K]), symmetric=symmetric).item()
        assert abs(ours - reference_mnrl(texts[:K], emb[:K], symmetric=symmetric)) < 1e-5
    # without duplicates, sentence-transformers' own loss on the same embeddings
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    unique = [[f'{c}{i}' for i in range(13)] for c in 'qdn']
    st = (MultipleNegativesRankingLoss(None, directions=('query_to_doc', 'doc_to_query'), partition_mode='per_direction')
          if symmetric else MultipleNegativesRankingLoss(None))
    for K in ((2,) if symmetric else (2, 3)):
        theirs = st.compute_loss_from_embeddings(list(emb[:K]), None).item()
        assert abs(contrastive.info_nce(emb[:K], ids_of(unique[:K]), symmetric=symmetric).item() - theirs) < 1e-5
        assert abs(reference_mnrl(unique[:K], emb[:K], symmetric=symmetric) - theirs) < 1e-5


SPECIAL = (0, 2)  # <s>, </s> of the test tokenizer (MPNet's layout)


def dropout_model(p, seed=0):
    torch.manual_seed(seed)
    model = MPNet(tiny_config(vocab_size=101, dropout=p, attn_dropout=p)).train()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    return model


def random_batch(n_pairs=64, K=2, seed=0):
    """K*n token arrays of odd lengths (column by column), some texts repeated, and the ids of the texts."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, 101, rng.integers(3, 30)) for _ in range(K * n_pairs)]
    seqs[7] = seqs[3]  # a duplicate anchor
    return seqs, torch.tensor([[hash(s.tobytes()) for s in seqs[k * n_pairs:(k + 1) * n_pairs]] for k in range(K)])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('p', [0.0, 0.1])
def test_gradient_caching_is_exact(p):
    seqs, ids = random_batch(K=3)
    model = dropout_model(p)
    torch.manual_seed(5)
    cached = contrastive.contrastive_step(model, seqs, ids, SPECIAL, mini_batch_size=8, symmetric=True)
    cached_grads = grads(model)
    model.zero_grad(set_to_none=True)
    # the reference: each mini-batch of 8 embedded with autograd, in the same order from the same RNG state (the
    # same dropout), all kept in memory, one loss, one backward
    torch.manual_seed(5)
    emb = torch.cat([contrastive.embed(model, seqs[i:i + 8], SPECIAL, 'mean') for i in range(0, len(seqs), 8)])
    loss = contrastive.info_nce(emb.view(3, 64, -1), ids, symmetric=True)
    loss.backward()
    assert abs(cached.item() - loss.item()) < 1e-6
    reference = grads(model)
    assert set(reference) == set(cached_grads) and len(reference) > 20  # every encoder parameter
    for n in reference:
        torch.testing.assert_close(cached_grads[n], reference[n], atol=1e-6, rtol=1e-5, msg=n)
    if p == 0:  # without dropout, also without caching (a forward a column, padded to its longest): in fp32 that
        # sums in another order (a LayerNorm bias's gradient adds ~3000 tokens: 1e-5 apart), so compared in fp64
        model.double().zero_grad(set_to_none=True)
        cached = contrastive.contrastive_step(model, seqs, ids, SPECIAL, mini_batch_size=8, symmetric=True)
        cached_grads = grads(model)
        model.zero_grad(set_to_none=True)
        whole = contrastive.contrastive_step(model, seqs, ids, SPECIAL, mini_batch_size=0, symmetric=True)
        assert whole.dtype == torch.float64 and abs(whole.item() - cached.item()) < 1e-12
        for n, g in grads(model).items():
            torch.testing.assert_close(cached_grads[n], g, atol=1e-12, rtol=1e-10, msg=n)


def test_distillation_toward_the_start_is_the_mean_squared_distance_and_exact_with_gradient_caching():
    """--distill: InfoNCE + distill x the mean over the batch's texts of |normalised embedding - the start model's|^2,
    against a reference written out here; with gradient caching the gradient is the same; the start model gets none."""
    seqs, ids = random_batch(K=2)
    model, frozen = dropout_model(0.0).double(), dropout_model(0.0, seed=1).double().eval().requires_grad_(False)
    cached = contrastive.contrastive_step(model, seqs, ids, SPECIAL, mini_batch_size=8, start=frozen, distill=0.7)
    cached_grads = grads(model)
    model.zero_grad(set_to_none=True)
    emb = torch.cat([contrastive.embed(model, seqs[i:i + 64], SPECIAL, 'mean') for i in range(0, len(seqs), 64)])
    with torch.no_grad():
        target = torch.cat([contrastive.embed(frozen, [x], SPECIAL, 'mean') for x in seqs])  # one text at a time
    pull = ((F.normalize(emb, dim=-1) - F.normalize(target, dim=-1)) ** 2).sum(-1).mean()
    loss = contrastive.info_nce(emb.view(2, 64, -1), ids) + 0.7 * pull
    loss.backward()
    # fp64; the reference pads each text to other lengths (columns of 64, texts one by one): 1e-9 apart, not 1e-16
    assert pull.item() > 1e-3 and abs(cached.item() - loss.item()) < 1e-7
    for n, g in grads(model).items():
        torch.testing.assert_close(cached_grads[n], g, atol=1e-7, rtol=1e-6, msg=n)
    assert all(p.grad is None for p in frozen.parameters())


def gathered_negatives_worker(out):
    """One of two gloo processes (torchrun, below): its share of every column of the batch, the negatives
    gathered from the other; rank 0 saves the loss and the summed gradients to out."""
    import torch.distributed as dist
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    seqs, ids = random_batch(K=3)
    B = 64 // world
    mine = [s for k in range(3) for s in seqs[k * 64 + rank * B:k * 64 + (rank + 1) * B]]
    model = dropout_model(0.0).double()  # fp64: fp32 would differ in summation order only
    params = list(model.parameters())
    loss = contrastive.contrastive_step(model, mine, ids, SPECIAL, mini_batch_size=8)
    contrastive.sum_gradients(params)
    if rank == 0:
        torch.save(dict(loss=loss, grads=grads(model)), out)
    dist.destroy_process_group()


def test_gathered_negatives_on_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    proc = run_cli('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--no-python', sys.executable,
                   *calling(gathered_negatives_worker, tmp_path / 'out.pt'), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / 'out.pt', weights_only=True)
    seqs, ids = random_batch(K=3)
    model = dropout_model(0.0).double()
    one = contrastive.contrastive_step(model, seqs, ids, SPECIAL, mini_batch_size=0)  # no caching, all 64 pairs at once
    assert two['loss'].dtype == torch.float64 and abs(two['loss'].item() - one.item()) < 1e-12
    assert set(two['grads']) == set(grads(model))
    for n, g in grads(model).items():
        torch.testing.assert_close(two['grads'][n], g, atol=1e-12, rtol=1e-10, msg=n)


# ---- the held-out pairs (pairs.py): held out by content, never trained on, recorded in the checkpoint

def test_held_out_text_is_never_trained_on_by_content(contrastive_run, tmp_path, monkeypatch):
    """Finding 5: raw text was held out by document index, so a document given twice was held out once and trained
    on once; --eval_data equal to --dataset evaluated on training text. Now held out by content, duplicates dropped."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
    docs = topic_docs(200, seed=4)
    twice = write_rows(tmp_path / 'twice.jsonl', [{'text': d} for d in docs + docs[::-1]])
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    tok = data.load_tokenizer(str(tmp_path / 'tok'))
    c = dict(dataset=twice, val_frac=0.2, eval_data='', data_dir='', text_field='text', txt_split='paragraph',
             pairs='halves', eval_pairs=1000, max_len=128)
    tokens, train_docs, held, said = pairs_py.raw_text(tok, tok.eos_token_id, c)
    held_docs = pairs_py.split_documents(held, tok.eos_token_id)
    held_ids = set(pairs_py.digests(held, held_docs).tolist())
    assert 20 < len(held_ids) == len(held_docs) < 80  # each held-out text once
    assert not held_ids & set(pairs_py.digests(tokens, train_docs).tolist())  # and never trained on
    assert len(train_docs) == 2 * (200 - len(held_ids))
    # labelled pairs, each given twice: a held-out pair's texts are in no training pair
    pairs = [(d[:60], d[60:140]) for d in docs]
    tokens, spans = pairs_py.encode(tok, [p[k] for k in (0, 1) for p in pairs + pairs])
    c['max_len'] = 64
    train, evaluation, dropped = pairs_py.heldout_pairs(tokens, spans.reshape(2, -1, 2), (0, 2), c)
    seen = set(pairs_py.digests(tokens, pairs_py.clip(train, 64)).ravel().tolist())
    first = [tokens[a:b].tolist() for a, b in pairs_py.clip(spans.reshape(2, -1, 2), 64)[0]]
    held_anchors = {tuple(r[1:r.index(2)]) for r in evaluation[0][0].tolist()}
    assert held_anchors and not held_anchors & {tuple(f) for f, d in zip(first, pairs_py.digests(tokens, pairs_py.clip(spans.reshape(2, -1, 2), 64))[0].tolist()) if d in seen}
    # the same file to train on and to evaluate on: refused, nothing trained
    proc = contrastive_here(str(contrastive_run / 'start.pt'), *CONTRASTIVE_RUN, f'--dataset={twice}', f'--eval_data={twice}',
                            f'--out_dir={tmp_path / "out"}')
    assert_clean_error(proc, 'every training document', 'also held out', 'evaluate on other text')
    assert not (tmp_path / 'out').exists()


def contrastive_records(out):
    lines = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    return [r for r in lines if 'loss' in r], [r for r in lines if 'val_loss' in r]


def test_the_checkpoint_records_the_held_out_pairs_it_was_picked_on(contrastive_run):
    """Finding 22 (contrastive side): a contrastive checkpoint did not record where its held-out text is, so
    finetune.py --task=retrieval said it 'is not on this machine'. It now carries the pairs themselves."""
    best = checkpoint.load_checkpoint(str(contrastive_run / 'out' / 'best.pt'))
    held = best['heldout']
    evals = contrastive_records(contrastive_run / 'out')[1]
    assert held['ids'].shape[0] == 2 and held['ids'].size(1) > 100 and held['mask'].shape == held['ids'].shape
    assert 'corpus.jsonl' in held['source'] and 'by content' in held['source']
    assert f"evaluation: {held['ids'].size(1)} held-out pairs" in (contrastive_run / 'run.stdout').read_text()
    model = checkpoint.model_from_checkpoint(best, 'best.pt')
    assert evaluation.retrieval_scores(model, held['ids'], held['mask'])['mrr'] == pytest.approx(
        max(e['probe_mrr'] for e in evals), abs=1e-6)


# ---- a whole run on a tiny corpus: learns, keeps its best, resumes exactly, torchrun, every kind of pairs

def test_a_run_learns_keeps_its_best_and_exports_what_sentence_transformers_loads(contrastive_run, tmp_path, capfd):
    out = contrastive_run / 'out'
    train, evals = contrastive_records(out)
    assert [e['iter'] for e in evals] == [0, 20, 40] and [r['iter'] for r in train] == [10, 20, 30, 40]
    assert train[-1]['loss'] < train[0]['loss'] - 0.2, train  # the loss goes down
    assert evals[-1]['probe_mrr'] > evals[0]['probe_mrr'] + 0.03, evals  # held-out retrieval goes up
    assert all(e['objective'] == 'contrastive' and e['val_loss'] > 0 for e in evals)
    best = checkpoint.load_checkpoint(str(out / 'best.pt'))
    assert best['val_mrr'] == max(e['probe_mrr'] for e in evals[1:]) == best['best_score']
    last = (contrastive_run / 'run.stdout').read_text().strip().splitlines()[-1]
    assert last.startswith('done: the best model is') and f'python convert_hf.py {out}/best.pt {out}/st' in last
    # plot.py draws the run: the loss, and the held-out retrieval in the probe's panels
    assert run_here('plot.py', str(out)).returncode == 0 and (out / 'curves.png').stat().st_size > 10_000
    # the export: a sentence-transformers folder, loaded without a report, that embeds as this project does
    proc = run_here('convert_hf.py', str(out / 'best.pt'), str(tmp_path / 'st'))
    assert proc.returncode == 0 and 'SentenceTransformer loads it: Transformer -> Pooling -> Normalize' in proc.stdout, proc.stderr
    from sentence_transformers import SentenceTransformer
    capfd.readouterr()
    st = SentenceTransformer(str(tmp_path / 'st'), device='cpu')
    assert 'LOAD REPORT' not in capfd.readouterr().err and st.max_seq_length == 64
    texts = [json.loads(line)['text'] for line in open(contrastive_run / 'corpus.jsonl')][:12]
    ckpt, tok = evaluation.load_model(str(out / 'best.pt'))
    model = checkpoint.model_from_checkpoint(ckpt, 'best.pt').eval()
    ours = evaluation.pool(model, *evaluation.pad(tok(texts, truncation=True, max_length=64)['input_ids'], 'cpu'), 'mean')
    assert (ours - st.encode(texts, convert_to_tensor=True)).abs().max() < 1e-5


def test_ctrl_c_keeps_the_last_checkpoint_and_resuming_gives_the_uninterrupted_run(contrastive_run):
    split = contrastive_run / 'split'
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={split}', '--eval_interval=5', popen=True)
    for _ in range(600):  # the first checkpoint, at step 5
        if 'saved' in (contrastive_run / 'stdout.txt').read_text() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    said, err = (contrastive_run / 'stdout.txt').read_text(), (contrastive_run / 'stderr.txt').read_text()
    assert 'SIGINT: stopping after this step, saving first' in said and 'Traceback' not in err, err
    stopped = checkpoint.load_checkpoint(str(split / 'ckpt.pt'))  # intact, and where the run stopped
    assert 5 <= stopped['iter_num'] < 40 and f"saved {split}/ckpt.pt at step {stopped['iter_num']}" in said
    assert said.strip().splitlines()[-1].startswith('stopped by SIGINT')
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={split}', '--eval_interval=5', '--init_from=resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step {stopped['iter_num']}" in proc.stdout
    a, b = (checkpoint.load_checkpoint(str(f / 'ckpt.pt')) for f in (contrastive_run / 'out', split))
    assert a['iter_num'] == b['iter_num'] == 40
    for k in a['model']:  # dropout, data order and optimizer continue exactly
        assert torch.equal(a['model'][k], b['model'][k]), k
    iters = [r['iter'] for r in contrastive_records(split)[0]]
    assert iters == sorted(set(iters)) and iters[-1] == 40  # each step logged once
    # a finished run is never started over by accident
    proc = contrastive_here(str(contrastive_run / 'start.pt'), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN, f'--out_dir={split}')
    assert_clean_error(proc, 'already holds a run', '--init_from=resume', '--overwrite=True')
    assert torch.equal(checkpoint.load_checkpoint(str(split / 'ckpt.pt'))['model']['wte.weight'], b['model']['wte.weight'])


def test_resume_refuses_other_data_held_out_pairs_or_loss_and_a_finished_run_drops_nothing(contrastive_run, tmp_path):
    """Finding 6: --init_from=resume with another --eval_data and --scale went on silently (best.pt compared MRRs of
    two held-out sets); resuming a run that ended normally said it dropped a record of an interrupted run."""
    out = tmp_path / 'out'
    shutil.copytree(contrastive_run / 'out', out)
    other = write_rows(tmp_path / 'other.jsonl', [{'text': d} for d in topic_docs(40, seed=9)])
    before = (out / 'metrics.jsonl').read_text()
    for args, words in (([f'--eval_data={other}'], ['held-out pairs', 'best.pt was picked']),
                        (['--scale=5.0'], ["the loss ({'scale': 20.0", "'scale': 5.0"]),
                        (['--val_frac=0.3'], ['the training pairs']),
                        ([f'--eval_data={other}', '--scale=5.0'], ['held-out pairs', 'the loss'])):
        proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--init_from=resume', '--max_iters=50', *args)
        assert_clean_error(proc, "init_from='resume' but", *words, '--out_dir=NEW')
        assert (out / 'metrics.jsonl').read_text() == before
    proc = contrastive_cli(contrastive_run, *CONTRASTIVE_RUN, f'--out_dir={out}', '--init_from=resume', '--eval_interval=20')
    assert proc.returncode == 0 and 'dropped' not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # this stop's own pass: resuming with another model given first went on from the run's own weights, silently
    other = shutil.copyfile(contrastive_run / 'start.pt', tmp_path / 'other.pt')
    proc = contrastive_here(str(other), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN, f'--out_dir={out}',
                            '--init_from=resume', '--max_iters=50')
    assert_clean_error(proc, f"a run that started from {contrastive_run / 'start.pt'}, not from {other}")


def test_best_by_picks_best_pt_by_the_general_set_or_the_mean(contrastive_run, tmp_path):
    """Issue 42: the general set is evaluated beside the held-out pairs, and --best_by says which picks best.pt: the
    saved best is the step whose chosen measure first beat the start and every step before (recomputed here from the
    log); without a general set, or resumed under another choice, one line."""
    docs = topic_docs(60, seed=3)
    general = write_rows(tmp_path / 'general.jsonl', [dict(sentence1=a[:60], sentence2=b[:60], score=(i * 7) % 5)
                                                      for i, (a, b) in enumerate(zip(docs, docs[1:]))])
    common = [str(contrastive_run / 'start.pt'), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN,
              '--max_iters=6', '--eval_interval=1', '--batch_size=8', f'--sts_data={general}']
    for best_by in ('sts', 'mean'):
        out = tmp_path / best_by
        proc = contrastive_here(*common, f'--best_by={best_by}', f'--out_dir={out}')
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals = contrastive_records(out)[1]
        assert [e['iter'] for e in evals] == list(range(7))
        measure = [e['sts_spearman'] if best_by == 'sts' else (e['probe_mrr'] + e['sts_spearman']) / 2 for e in evals]
        best, best_iter = measure[0], None
        for i, m in enumerate(measure[1:], 1):
            if m > best:
                best, best_iter = m, i
        if best_iter is None:
            assert not (out / 'best.pt').exists()
        else:
            ckpt = checkpoint.load_checkpoint(str(out / 'best.pt'))
            assert ckpt['iter_num'] == best_iter and ckpt['best_score'] == pytest.approx(best)
        assert ('general Spearman' if best_by == 'sts' else 'mean of held-out MRR') in proc.stdout.splitlines()[-1]
    proc = contrastive_here(*common, '--best_by=mrr', f'--out_dir={tmp_path / "sts"}', '--init_from=resume', '--max_iters=8')
    assert_clean_error(proc, 'what best.pt was picked by', '--best_by')
    proc = contrastive_here(*[a for a in common if not a.startswith('--sts_data')], '--best_by=sts', f'--out_dir={tmp_path / "x"}')
    assert_clean_error(proc, "best_by='sts'", '--sts_data=')
    assert not (tmp_path / 'x').exists()


def test_torchrun_two_processes_share_their_negatives(contrastive_run):
    out = contrastive_run / 'ddp'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'HF_DATASETS_CACHE': str(contrastive_run / 'hf_cache')}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'contrastive.py', str(contrastive_run / 'start.pt'), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN,
                           f'--out_dir={out}', '--max_iters=4', '--eval_interval=2', '--batch_size=8',
                           '--mini_batch_size=4'], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '16 a step (8 x 2 processes, embedded 4 texts at a time)' in proc.stdout, proc.stdout
    assert proc.stdout.count('done: ') == 1  # rank 0 speaks
    ckpt = checkpoint.load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 4 and ckpt['data_pos'] == 64 and len(ckpt['rank_states']) == 2


def test_labelled_triplets_simcse_prepared_data_and_evaluation_files(contrastive_run, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
    docs = topic_docs(300, seed=1)
    triplets = write_rows(tmp_path / 'triplets.jsonl', [dict(query=d[:50], document=d[50:150], negative=e[50:150], label=1)
                                                         for d, e in zip(docs, docs[1:] + docs[:1])])
    write_rows(tmp_path / 'sts.jsonl', [dict(sentence1=d[:40], sentence2=d[40:80], score=i % 5) for i, d in enumerate(docs[:30])])
    common = [str(contrastive_run / 'start.pt'), *CONTRASTIVE_RUN, '--max_iters=3', '--eval_interval=3', '--batch_size=8',
              f'--sts_data={tmp_path / "sts.jsonl"}']
    proc = contrastive_here(*common, '--pairs=labelled', f'--dataset={triplets}', '--symmetric=True', '--mini_batch_size=5',
                            f'--out_dir={tmp_path / "a"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'triplets (query / document / negative)' in proc.stdout and 'embedded 5 texts at a time' in proc.stdout
    evals = contrastive_records(tmp_path / 'a')[1]
    assert evals[0]['iter'] == 0 and all(-1 <= e['sts_spearman'] <= 1 for e in evals)
    # SimCSE on raw text, evaluated on the halves of another file's documents (finetune.py's reader)
    held = write_rows(tmp_path / 'held.jsonl', [{'text': d} for d in docs])
    proc = contrastive_here(*common, '--pairs=simcse', f'--dataset={contrastive_run / "corpus.jsonl"}', f'--eval_data={held}',
                            f'--out_dir={tmp_path / "b"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '600 training pairs (simcse)' in proc.stdout and 'evaluation: 300 held-out pairs' in proc.stdout
    # a prepared folder (data.py): train.bin's documents train, val.bin's are held out
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    prepared = data.prepare(str(contrastive_run / 'corpus.jsonl'), tokenizer=str(tmp_path / 'tok'), out_dir=str(tmp_path / 'prep'),
                            val_frac=0.2)
    proc = contrastive_here(*common, '--pairs=halves', f'--data_dir={prepared}', f'--out_dir={tmp_path / "c"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_val = json.load(open(tmp_path / 'prep' / 'meta.json'))['n_docs']['val']
    assert f'evaluation: {n_val} held-out pairs' in proc.stdout and 'training pairs (halves)' in proc.stdout


def test_a_sentence_transformers_model_keeps_its_pooling_through_training_and_export(contrastive_run, tmp_path, monkeypatch):
    import datasets
    from test_all import st_embeddings, st_folder
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
    hf_wordpiece().save_pretrained(tmp_path / 'tok')
    folder = st_folder(tmp_path / 'st', str(tmp_path / 'tok'), pooling='cls', legacy=True)  # all-mpnet-base-v2's layout
    proc = contrastive_here(str(folder), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN, '--max_iters=4', '--eval_interval=2',
                            f'--out_dir={tmp_path / "out"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'cls pooling' in proc.stdout and 'sentence-transformers modules Transformer -> Pooling -> Normalize' in proc.stdout
    trained = tmp_path / 'out' / ('best.pt' if (tmp_path / 'out' / 'best.pt').exists() else 'ckpt.pt')
    convert_hf.export(str(trained), str(tmp_path / 'export'))
    texts = topic_docs(8, seed=2)
    (_, before), (after, theirs) = st_embeddings(folder, texts), st_embeddings(tmp_path / 'export', texts)
    assert [type(m).__name__ for m in after] == ['Transformer', 'Pooling', 'Normalize'] and after.max_seq_length == 40
    assert after[1].get_config_dict()['pooling_mode'] == 'cls' and (before - theirs).abs().max() > 1e-3  # trained
    ckpt, tok = evaluation.load_model(str(trained))
    model = checkpoint.model_from_checkpoint(ckpt, str(trained)).eval()
    ours = evaluation.pool(model, *evaluation.pad(tok(texts, truncation=True, max_length=40)['input_ids'], 'cpu'), 'cls')
    assert (ours - theirs).abs().max() < 1e-5


def test_an_extended_model_keeps_its_length_through_contrastive_training(contrastive_run, tmp_path):
    """Finding 2: contrastive.py dropped what the checkpoint carries for the export (positions_extended): an
    all-mpnet-base-v2 extended to 1,024 came out with max_seq_length 384 and model_max_length 512."""
    ckpt = checkpoint.load_checkpoint(str(contrastive_run / 'start.pt'))
    checkpoint.extend_checkpoint(ckpt, 96)
    torch.save(ckpt, tmp_path / 'long.pt')
    proc = contrastive_here(str(tmp_path / 'long.pt'), f'--dataset={contrastive_run / "corpus.jsonl"}', *CONTRASTIVE_RUN,
                            '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path / "out"}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = checkpoint.load_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))
    assert trained['positions_extended'] == [[64, 96]] and trained['model_args']['max_positions'] == 96
    assert {k for k in checkpoint.EXPORT_KEYS if k != 'st_path'} <= set(trained)  # st_path: '' for a model without one
    convert_hf.export(str(tmp_path / 'out' / 'ckpt.pt'), str(tmp_path / 'st'))
    assert json.load(open(tmp_path / 'st' / 'sentence_bert_config.json'))['max_seq_length'] == 96
    assert json.load(open(tmp_path / 'st' / 'tokenizer_config.json'))['model_max_length'] == 96


# ---- bad input: one line, nothing written; what is skipped is said

def test_bad_input_is_one_line_and_writes_nothing(contrastive_run, tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
    start, out = str(contrastive_run / 'start.pt'), tmp_path / 'out'
    pairs = [{'anchor': d[:60], 'positive': d[60:120]} for d in topic_docs(40)]  # words of the test vocabulary
    files = dict(
        one=write_rows(tmp_path / 'one.jsonl', [{'text': p['anchor']} for p in pairs]),
        empty=write_rows(tmp_path / 'empty.jsonl', pairs[:5] + [{'anchor': 'a question', 'positive': ' '}] + pairs[5:]),
        same=write_rows(tmp_path / 'same.jsonl', [{'anchor': pairs[0]['anchor'], 'positive': p['positive']} for p in pairs]),
        short=write_rows(tmp_path / 'short.jsonl', [{'text': 'a few words only'} for _ in range(40)]),
        good=write_rows(tmp_path / 'good.jsonl', pairs))
    no_tokenizer = small_checkpoint(tmp_path / 'no_tok.pt', tokenizer_files={})
    cases = [
        ([f'--dataset={files["one"]}'], ['1 text column (text)', 'a pair needs two', '--pairs=halves']),
        ([f'--dataset={files["empty"]}'], ["line 6: 'positive' is empty"]),
        ([f'--dataset={files["good"]}', '--batch_size=1'], ['a batch of one pair has no negatives']),
        ([f'--dataset={files["same"]}'], ['every anchor text', 'is the same']),
        ([f'--dataset={files["short"]}', '--pairs=halves'], ['32 tokens or more to split into halves', '--pairs=simcse']),
        ([f'--dataset={files["good"]}', '--batch_size=8', '--mini_batch_size=17', '--val_frac=0.3'], ['mini_batch_size (17) is larger than a step',
                                                                                  "16 texts"]),
        ([f'--dataset={files["good"]}', f'--init_from={no_tokenizer}'], ['carries no tokenizer', '--tokenizer=']),
        ([f'--dataset={files["good"]}', '--max_len=500'], ["exceeds the model's max_positions 64"]),
        ([f'--dataset={files["good"]}', '--lr=0.1'], ["unknown config key 'lr'", 'learning_rate']),
    ]
    for args, words in cases:
        model = [] if any(a.startswith('--init_from') for a in args) else [start]
        proc = contrastive_here(*model, f'--out_dir={out}', '--batch_size=4', '--device=cpu', '--dtype=float32',
                                '--max_len=64', '--pairs=labelled', *args)
        assert_clean_error(proc, *words)
        assert not out.exists(), args


def latin1_txt(tmp_path, docs):
    (tmp_path / 'latin1.txt').write_bytes('\n\n'.join(d.replace('a', '\xe9') for d in docs).encode('latin-1'))
    return tmp_path / 'latin1.txt'


def contrastive_run_corpus(tmp_path):
    return write_rows(tmp_path / 'corpus.jsonl', [{'text': d} for d in topic_docs(100, seed=6)])


def contrastive_input_cases(tmp_path):
    docs = topic_docs(300, seed=5)
    rows = lambda name, r: write_rows(tmp_path / name, r)
    bad = tmp_path / 'latin1.jsonl'
    bad.write_bytes(b'{"text": "caf\xe9 ' + docs[0].encode() + b'"}\n')
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({'text': [None if i % 5 == 0 else d for i, d in enumerate(docs)]}), tmp_path / 'nulls.parquet')
    prepared = tmp_path / 'prep'
    return [  # (finding, arguments, words of the one line; None: the run goes on, and the words are in its output)
        (9, [f'--dataset={bad}'], ["latin1.jsonl' line 1 is not UTF-8", 'fix or remove that line']),
        (11, [f"--dataset={rows('short.jsonl', [{'text': ' '.join(d.split()[:3])} for d in docs])}", '--pairs=simcse'],
         ['the longest', '--eval_data=PAIRS.jsonl']),
        (12, [f"--dataset={contrastive_run_corpus(tmp_path)}", '--val_frac=0.999'], ['val_frac=0.999 holds out every document', 'lower --val_frac']),
        (13, [f"--eval_data={rows('one_pair.jsonl', [{'anchor': docs[0][:50], 'positive': docs[0][50:100]}])}"],
         ["one_pair.jsonl' gives fewer than 2 held-out pairs", 'give more pairs']),
        (14, [f"--dataset={rows('one_doc.jsonl', [{'text': docs[0]}] + [{'text': 'a b'}] * 30)}", '--val_frac=0.01'],
         ['gives 1 training pair', 'a batch needs 2']),
        (19, ['--init_from=elsewhere.pt'], ['two models', '--init_from=elsewhere.pt', 'give one']),
        (19, [f'--data_dir={prepared}'], ['both name the raw text', 'give one']),
        (20, ['--pairs=labelled', f"--dataset={rows('scored.jsonl', [dict(sentence1=d[:40], sentence2=d[40:80], score=i % 2) for i, d in enumerate(docs)])}"],
         ["has a 'score' column (2 values: 0, 1)", 'every row as a positive', '--sts_data=']),
        (16, ['--pairs=labelled', '--batch_size=4', '--mini_batch_size=5', '--max_iters=1', '--eval_interval=1',
              f"--dataset={rows('triplets.jsonl', [dict(anchor=d[:40], positive=d[40:90], negative=e[:50]) for d, e in zip(docs, docs[1:])])}"],
         None, ['4 a step (4 x 1 process, embedded 5 texts at a time)']),
        (21, [f'--dataset={tmp_path / "nulls.parquet"}', '--max_iters=1', '--eval_interval=1'], None,
         ["skipped 60 rows whose 'text' is null, blank or not text"]),
        # this stop's own hostile pass: pairs whose positive is their anchor (a perfect held-out score, nothing learnt)
        ('own', ['--pairs=labelled', f"--dataset={rows('itself.jsonl', [dict(anchor=d[:60], positive=d[:60]) for d in docs])}"],
         ['every positive is the same text as its anchor']),
        ('own', ['--pairs=labelled', '--max_iters=1', '--eval_interval=1', f"--dataset={rows('some_itself.jsonl', [dict(anchor=d[:60], positive=d[:60] if i % 3 == 0 else d[60:120]) for i, d in enumerate(docs)])}"],
         None, ['; 100 whose positive is their anchor left out']),
        # ... and a .txt file in latin-1: its bytes replaced without a word
        ('own', [f"--dataset={latin1_txt(tmp_path, docs)}", '--max_iters=1', '--eval_interval=1'], None,
         ['undecodable byte sequences in the .txt files', 'were replaced by U+FFFD']),
    ]


@pytest.mark.parametrize('case', range(13))
def test_contrastive_input_that_cannot_work_is_one_line_and_what_is_skipped_is_said(contrastive_run, tmp_path, monkeypatch, case):
    """Findings 9, 11-14, 16, 19-21: a traceback, misleading advice, settings ignored without a word, a scored file
    trained as positives, null rows skipped uncounted, and triplets refused a valid mini-batch."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_cache')
    finding, args, words, *said = contrastive_input_cases(tmp_path)[case]
    out = tmp_path / 'out'
    proc = contrastive_here(str(contrastive_run / 'start.pt'), f'--dataset={contrastive_run / "corpus.jsonl"}',
                            *CONTRASTIVE_RUN, f'--out_dir={out}', *args)
    if words is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert all(w in proc.stdout for w in said[0]), (finding, proc.stdout[-3000:])
    else:
        assert_clean_error(proc, *words)
        assert not out.exists(), finding


# ---- interpolate.py: weight-space interpolation between the start and the adapted model (WiSE-FT)

def test_interpolation_sweeps_both_measures_and_writes_the_point_it_was_asked(contrastive_run, tmp_path):
    """alpha 0 is the start's weights exactly, 1 the adapted model's, 0.5 their mean; the sweep scores the held-out pairs
    the run picked best.pt on (alpha 1: the MRR it logged for best.pt) and a general set; the point written exports."""
    best, start = contrastive_run / 'out' / 'best.pt', contrastive_run / 'start.pt'
    general = write_rows(tmp_path / 'general.jsonl', [dict(sentence1=a[:80], sentence2=b[:80], score=i % 5)
                                                      for i, (a, b) in enumerate(zip(topic_docs(30, seed=8),
                                                                                     topic_docs(30, seed=9)))])
    proc = run_here('interpolate.py', str(best), f'--sts_data={general}', '--alphas=0,0.5,1', '--alpha=0.5',
                    f'--out={tmp_path / "mix.pt"}', '--device=cpu', '--max_len=64')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [l for l in proc.stdout.splitlines() if l.startswith('alpha ')]
    assert [l.split(':')[0] for l in rows] == ['alpha 0.00', 'alpha 0.50', 'alpha 1.00'] and all('general Spearman' in l for l in rows)
    logged = max(r['probe_mrr'] for r in plot.read_metrics(str(contrastive_run / 'out')) if r['iter'] > 0 and 'probe_mrr' in r)
    assert f'in-domain MRR {logged:.4f}' in rows[-1], (rows, logged)
    a, b, m = (checkpoint.load_checkpoint(str(p))['model'] for p in (start, best, tmp_path / 'mix.pt'))
    k = 'blocks.0.mlp.fc1.weight' if 'blocks.0.mlp.fc1.weight' in a else next(k for k in a if a[k].is_floating_point() and a[k].dim() == 2)
    assert torch.allclose(m[k], (a[k] + b[k]) / 2, atol=1e-6) and not torch.equal(a[k], b[k])
    assert run_here('convert_hf.py', str(tmp_path / 'mix.pt'), str(tmp_path / 'st')).returncode == 0
    assert (tmp_path / 'st' / 'modules.json').is_file()


def test_interpolation_refuses_what_cannot_work_in_one_line(contrastive_run, tmp_path):
    best = str(contrastive_run / 'out' / 'best.pt')
    other = small_checkpoint(tmp_path / 'other.pt', vocab_size=len(hf_wordpiece()) + 64)  # another vocabulary size
    ckpt = checkpoint.load_checkpoint(str(contrastive_run / 'start.pt'))
    wide, renamed = tmp_path / 'wide.pt', tmp_path / 'renamed.pt'  # another width; the same shapes, other tokens
    config = tiny_config(vocab_size=ckpt['model_args']['vocab_size'], n_embd=64, n_head=4)
    torch.save({**ckpt, 'model': MPNet(config).state_dict(), 'model_args': vars(config)}, wide)
    files = dict(ckpt['tokenizer_files'])
    vocab = json.loads(files['tokenizer.json'])  # two ordinary tokens swap ids: the same shapes, other tokens
    words = [w for w in vocab['model']['vocab'] if w.isalpha()][:2]
    table = vocab['model']['vocab']
    table[words[0]], table[words[1]] = table[words[1]], table[words[0]]
    files['tokenizer.json'] = json.dumps(vocab)
    torch.save({**ckpt, 'tokenizer_files': files}, renamed)
    words_of = write(tmp_path / 'words.csv', 'sentence1,sentence2\nx,y\n')
    for args, words in (
            (['--alpha=1.5', f'--out={tmp_path / "x.pt"}'], ['alpha', '[0, 1]']),
            (['--alphas=0,2'], ['alphas', '[0, 1]']),
            (['--alphas=half'], ['alphas', 'numbers']),
            ([f'--start={wide}', f'--out={tmp_path / "x.pt"}'], ['different shapes', 'n_embd']),
            ([f'--start={other}', f'--out={tmp_path / "x.pt"}'], ['different shapes', 'vocab_size']),
            ([f'--start={renamed}', f'--out={tmp_path / "x.pt"}'], ['different vocabularies']),
            ([f'--sts_data={words_of}', f'--out={tmp_path / "x.pt"}'], ['sentence1, sentence2 and score']),
            ([f'--out={best}'], ['exists'])):
        assert_clean_error(run_here('interpolate.py', best, '--device=cpu', *map(str, args)), *words)
    assert not (tmp_path / 'x.pt').exists()


# ===== .ci/gpu: the one-command GPU check, as its CPU dry run (so that it cannot rot between GPU loans) =====

# ---- the dry run: every step for real on the CPU

STEPS = ['1 environment', '2 correctness', '3 end to end', '4 speed']


E2E = ['data', 'train + SIGTERM', 'resume', 'export', 'fill-mask', 'torchrun']


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('gpu_check')
    src = write_jsonl(root / 'docs.jsonl', sentences(600, seed=3))
    return root, data.prepare(src, tokenizer='train', vocab_size=300, out_dir=str(root / 'prepared'), val_frac=0.1)


def gpu_check(folder, *args, timeout=280):
    """Run `bash .ci/gpu ARGS` as a user would; returns the process, its verdict rows {(step, check): (verdict,
    number)} and its wall time."""
    report = folder / 'report'
    t0 = time.time()
    proc = subprocess.run(['bash', os.path.join(HERE, '.ci', 'gpu'), f'--report={report}', f'--work={folder / "work"}',
                           *args], cwd=HERE, env={**os.environ, 'PYTHON': sys.executable}, capture_output=True,
                          text=True, timeout=timeout)
    path = report / 'verdicts.tsv'
    rows = [line.rstrip('\n').split('\t') for line in open(path)] if path.exists() else []
    return proc, {(r[0], r[1]): (r[2], r[3]) for r in rows}, time.time() - t0


def test_dry_run_reaches_every_step_and_ends_with_the_verdict_table(prepared):
    root, prepared_dir = prepared
    proc, rows, wall = gpu_check(root / 'good', '--device=cpu', f'--data_dir={prepared_dir}', '--long')
    print(proc.stdout[proc.stdout.index('== .ci/gpu verdict'):], f'wall {wall:.0f} s')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {step for step, _ in rows} == set(STEPS) | {'5 long context'}
    verdict = {check: v for (_, check), (v, _) in rows.items()}
    assert verdict['device'] == verdict['versions'] == 'PASS'
    assert verdict['torch.compile'] == 'SKIP'  # CUDA only, as train.py
    # the paths the CPU can train: against the fp32 reference, and the kernel that ran is named
    assert verdict['sdpa eager'] == verdict['manual eager'] == verdict['sdpa eval (no grad)'] == 'PASS'
    assert 'rel_bias' in rows['2 correctness', 'sdpa eager'][1] and 'math forward' in rows['2 correctness', 'sdpa eager'][1]
    for check in ('sdpa compiled', 'flex eager', 'flex compiled', 'manual compiled', 'CUDA tests (pytest)',
                  'bench flex batch 2', 'bench flex batch 2 T=64'):
        assert verdict[check] == 'SKIP', check
    assert all(verdict[check] == 'PASS' for check in E2E), {c: rows['3 end to end', c] for c in E2E}
    assert 'stopped at iter' in rows['3 end to end', 'train + SIGTERM'][1]
    assert 'on gloo' in rows['3 end to end', 'torchrun'][1]
    assert verdict['bench sdpa batch 2'] == 'PASS' and 'ms/step' in rows['4 speed', 'bench sdpa batch 2'][1]
    # --long: step 5 past the step-4 length, with the model FLOPs a sequence that torch's counter agreed with
    assert verdict['bench sdpa batch 2 T=64'] == 'PASS'
    assert '% attention)' in rows['5 long context', 'bench sdpa batch 2 T=64'][1]
    # the table is printed last, and kept in the report with the log of every step
    table = proc.stdout[proc.stdout.index('== .ci/gpu verdict'):]
    assert f"{len(rows) - sum(v == 'SKIP' for v in verdict.values())} PASS, 0 FAIL" in table
    for (step, check), (v, _) in rows.items():
        assert any(line.startswith(step) and check in line and v in line for line in table.splitlines()), (step, check)
    report = root / 'good' / 'report'
    assert (report / 'summary.txt').read_text() == table
    speed = (report / 'speed.md').read_text()
    assert '| sdpa | 32 | 2 |' in speed and '| sdpa | 64 | 2 |' in speed
    assert 'stopped by SIGTERM at iter' in (report / 'check.log').read_text()


def test_long_only_runs_steps_1_and_5_in_one_short_call(tmp_path):
    proc, rows, _ = gpu_check(tmp_path, '--device=cpu', '--long=only')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {step for step, _ in rows} == {'1 environment', '5 long context'}
    assert rows['5 long context', 'bench sdpa batch 2 T=64'][0] == 'PASS'
    assert 'budget 90 s' in proc.stdout  # its own budget: 540 s on a GPU, inside one 600 s call


def test_a_missing_data_dir_fails_step_3_in_one_line_and_the_other_steps_still_run(prepared):
    root, _ = prepared
    missing = root / 'not-prepared'
    proc, rows, _ = gpu_check(root / 'bad', '--device=cpu', f'--data_dir={missing}')
    assert proc.returncode == 1, proc.stdout[-3000:]
    verdict, said = rows['3 end to end', 'data']
    assert verdict == 'FAIL' and f'--data_dir={missing} does not exist' in said and 'python data.py' in said
    assert all(rows['3 end to end', c][0] == 'SKIP' for c in E2E[1:])
    assert {step for step, _ in rows} == set(STEPS)
    assert rows['2 correctness', 'sdpa eager'][0] == rows['4 speed', 'bench sdpa batch 2'][0] == 'PASS'
    assert '1 FAIL' in proc.stdout and 'Traceback' not in proc.stdout + proc.stderr


def test_no_gpu_and_bad_options_are_one_line(tmp_path):
    proc, rows, _ = gpu_check(tmp_path, '--device=cuda')  # this machine has no GPU
    assert proc.returncode == 1 and proc.stderr.strip().startswith('error: no CUDA device here')
    assert len(proc.stderr.strip().splitlines()) == 1 and '--device=cpu' in proc.stderr
    assert rows['1 environment', 'device'][0] == 'FAIL'
    for args, words in ((['--device=mps'], "--device must be cpu, cuda or cuda:N; got 'mps'"),
                        (['--budget=soon'], '--budget must be a whole number'),
                        (['--data-dir=x'], "unknown argument '--data-dir=x'")):
        proc, _, _ = gpu_check(tmp_path, *args)
        assert proc.returncode == 1 and proc.stderr.strip() == f'error: {proc.stderr.strip()[7:]}', proc.stderr
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def verdicts(report):
    return [line.rstrip('\n').split('\t') for line in open(os.path.join(report, 'verdicts.tsv'))]


def test_e2e_with_under_the_minimum_left_skips_instead_of_a_1s_time_box(prepared, tmp_path):
    _, data_dir = prepared
    proc = subprocess.run([sys.executable, '.ci/gpu_check.py', 'e2e', '--device=cpu', '--compile=False',
                           f'--data_dir={data_dir}', f'--work={tmp_path}', f'--deadline={time.time() + 8}'],
                          cwd=HERE, env={**os.environ, 'GPU_CHECK_REPORT': str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r[1]: (r[2], r[3]) for r in verdicts(tmp_path)}
    assert rows.pop('data')[0] == 'PASS'
    assert list(rows) == ['train + SIGTERM', 'resume', 'export', 'fill-mask', 'torchrun']
    assert all(v == 'SKIP' and said.startswith('no time left') for v, said in rows.values()), rows


# ---- verdicts: never a PASS for a run that checked nothing (the steps under a stand-in python)

# a stand-in for python under .ci/gpu: the steps (gpu_check.py env/grads/e2e, bench.py) answer at once as
# $FAKE_PLAN says, so that the script's own logic (locks, paths, verdicts) runs in seconds; everything else (the
# checks up front, the table, the rows of bench.py's output) runs in the real python. A string: it is the content of
# an executable file (fake_python) that .ci/gpu runs in place of python, and it must start at once
FAKE = '''#!{exe}
import json, os, sys, time
args = sys.argv[1:]
what = args[1] if args[:1] == ['.ci/gpu_check.py'] and args[1:2] in (['env'], ['grads'], ['e2e']) else \\
       'bench' if args[:1] == ['bench.py'] else None
if what is None:
    os.execv({exe!r}, [{exe!r}, *args])
step = {{'env': '1 environment', 'grads': '2 correctness', 'e2e': '3 end to end'}}.get(what)
plan = json.loads(os.environ.get('FAKE_PLAN') or '{{}}').get(what, {{}})
if os.environ.get('FAKE_ARGV'):
    with open(os.environ['FAKE_ARGV'], 'a') as f:
        f.write(json.dumps([what, os.getcwd(), *args]) + '\\n')
if plan.get('wait_for'):  # hold the step until the test says
    for _ in range(600):
        if os.path.exists(plan['wait_for']):
            break
        time.sleep(0.1)
if what == 'bench':
    print('step: 10.0 ms, 6,400 tokens/s, 0.1 TFLOP/s, MFU 1.0%, peak memory 1 MiB, loss 6.9')
    print('host syncs in one step: 0')
for check, verdict, number in plan.get('rows', [[what, 'PASS', 'fake']] if step else []):
    with open(os.path.join(os.environ['GPU_CHECK_REPORT'], 'verdicts.tsv'), 'a') as f:
        f.write(f'{{step}}\\t{{check}}\\t{{verdict}}\\t{{number}}\\n')
print(plan.get('print', ''))
sys.exit(plan.get('rc', 0))
'''


def fake_python(folder):
    path = os.path.join(folder, 'fake-python')
    with open(path, 'w') as f:
        f.write(FAKE.format(exe=sys.executable))
    os.chmod(path, 0o755)
    return path


GPU = os.path.join(HERE, '.ci', 'gpu')


def gpu(*args, cwd=HERE, plan=None, python=None, background=False, **env):
    """`bash .ci/gpu ARGS` as a user would type it, under the fake python (or the one given)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHON': python or sys.executable,
           'FAKE_PLAN': json.dumps(plan or {}), **env}
    cmd = ['bash', GPU, *args]
    if background:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_error_line(proc, *words):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_gpu_a_second_run_sharing_a_folder_refuses_and_leaves_the_first_alone(tmp_path):
    py = fake_python(tmp_path)
    release = tmp_path / 'release'
    report, work = tmp_path / 'report', tmp_path / 'work'
    first = gpu('--device=cpu', f'--report={report}', f'--work={work}', python=py, background=True,
                plan={'env': {'wait_for': str(release)}})
    try:
        for _ in range(600):  # until the first run is inside its step 1
            if (report / 'check.log').exists() and 'environment' in (report / 'check.log').read_text():
                break
            time.sleep(0.1)
        log = (report / 'check.log').read_text()
        for args in ([f'--report={report}', f'--work={tmp_path / "own-work"}'],    # the same report folder
                     [f'--report={tmp_path / "own-report"}', f'--work={work}']):   # the same work folder
            proc = gpu('--device=cpu', *args, python=py)
            shared = report if str(report) in args[0] else work
            one_error_line(proc, f'another .ci/gpu run holds {shared} (pid {first.pid})', '--report=', '--work=')
        assert (report / 'check.log').read_text() == log  # the first run's report is untouched
    finally:
        release.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    rows = verdicts(report)
    assert len(rows) == len({(r[0], r[1]) for r in rows})  # one table, no row twice
    assert out.rstrip().splitlines()[-1].startswith('verdict: PASS')
    # once it has ended, the folders are free again
    assert gpu('--device=cpu', f'--report={report}', f'--work={work}', python=py).returncode == 0


def test_gpu_a_budget_too_small_to_check_anything_is_refused_up_front(tmp_path):
    for budget, shown in (('0', '0'), ('5', '5'), ('08', '8'), ('39', '39')):  # 08: not an octal error
        proc = gpu('--device=cpu', f'--budget={budget}', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}')
        one_error_line(proc, f'--budget={shown} is too small to check anything', 'at least 40 s')
    proc = gpu('--device=cuda', '--budget=100', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}')
    one_error_line(proc, 'at least 190 s', 'default is 450')
    assert not (tmp_path / 'r').exists() and not (tmp_path / 'w').exists()


def test_gpu_verdict_is_no_pass_when_a_check_had_no_time_or_nothing_ran(tmp_path, monkeypatch):
    def table(*rows):
        with open(tmp_path / 'verdicts.tsv', 'w') as f:
            f.writelines('\t'.join(r) + '\n' for r in rows)
        proc = subprocess.run([sys.executable, os.path.join(HERE, '.ci', 'gpu_check.py'), 'table', '--elapsed=3'],
                              env={**os.environ, 'GPU_CHECK_REPORT': str(tmp_path)}, capture_output=True, text=True)
        assert (tmp_path / 'summary.txt').read_text() == proc.stdout
        return proc.returncode, proc.stdout.rstrip().splitlines()[-1]
    passed = ('1 environment', 'device', 'PASS', 'cpu')
    cannot = ('2 correctness', 'flex eager', 'SKIP', 'FlexAttention has no backward on the CPU')
    no_time = ('4 speed', 'bench sdpa batch 2', 'SKIP', 'no time left: the 40 s budget is spent')
    assert table(passed, cannot) == (0, 'verdict: PASS (1 SKIP: checks that cannot run here, each row says why)')
    rc, said = table(passed, cannot, no_time)
    assert rc == 2 and said.startswith('verdict: INCOMPLETE: 1 check had no time left') and 'not a PASS' in said
    assert table(cannot, no_time)[0] == 2 and table(cannot, no_time)[1].startswith('verdict: NOTHING CHECKED')
    assert table(passed, ('3 end to end', 'data', 'FAIL', 'x'), no_time) == (1, 'verdict: FAIL: 1 check failed')
    assert table(passed, ('3 end', 'cut sho')) == (0, 'verdict: PASS')  # a torn row is no traceback
    # the whole script's exit status is the verdict's
    proc = gpu('--device=cpu', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}', python=fake_python(tmp_path),
               plan={'e2e': {'rows': [['data', 'PASS', 'fake'], ['train + SIGTERM', 'SKIP', 'no time left: 3 s']]}})
    assert proc.returncode == 2 and proc.stdout.rstrip().splitlines()[-1].startswith('verdict: INCOMPLETE')


def test_gpu_a_step_that_crashes_after_a_pass_row_fails(tmp_path):
    # e2e wrote 'data' PASS, then died: the step has not passed (the old script counted only rows, so exit 0)
    proc = gpu('--device=cpu', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}', python=fake_python(tmp_path),
               plan={'e2e': {'rows': [['data', 'PASS', 'fake']], 'rc': 1, 'print': 'IndexError:\tlist index'}})
    assert proc.returncode == 1, proc.stdout[-2000:]
    rows = verdicts(tmp_path / 'r')
    assert ['3 end to end', 'end to end', 'FAIL', 'exit 1: IndexError: list index'] in rows
    assert all(len(r) == 4 for r in rows)  # the tab in its output did not split the row


def gpu_check_module(monkeypatch, report):
    spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(HERE, '.ci', 'gpu_check.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, 'REPORT', str(report))
    return module


def test_gpu_env_names_a_cuda_index_this_machine_lacks(tmp_path, monkeypatch):
    gc = gpu_check_module(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert gc.env(argparse.Namespace(device='cuda:3', work=str(tmp_path))) == 4
    assert verdicts(tmp_path) == [['1 environment', 'device', 'FAIL',
                                   '--device=cuda:3 is not on this machine: it has 1 CUDA device (cuda:0)']]
    # .ci/gpu stops there, with that row as its one-line error
    row = verdicts(tmp_path)[0]
    proc = gpu('--device=cuda:3', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}', python=fake_python(tmp_path),
               plan={'env': {'rows': [row[1:]], 'rc': 4}})
    one_error_line(proc, row[3])
    assert 'verdict: FAIL' in proc.stdout


def test_gpu_check_reads_a_killed_runs_log_and_fails_a_diverged_one(tmp_path, monkeypatch):
    gc = gpu_check_module(monkeypatch, tmp_path)
    write_log(tmp_path, [good(0), json.dumps(dict(iter=10, val_loss=4.0)), good(20), '{"iter": 30, "lo'])  # kill -9
    assert [r['iter'] for r in gc.loss_records(str(tmp_path))] == [0, 20]
    assert [r['iter'] for r in gc.loss_records(str(tmp_path), 'val_loss')] == [10]
    assert gc.loss_problem(gc.loss_records(str(tmp_path))) is None
    write_log(tmp_path, [good(0), json.dumps(dict(iter=10, loss=float('nan')))])
    assert gc.loss_problem(gc.loss_records(str(tmp_path))) == 'its loss is nan at iter 10: training diverged'
    assert gc.loss_problem([]) == 'no training loss in its metrics.jsonl'


def test_gpu_long_context_rows_out_of_memory_is_a_skip_a_wrong_flop_count_a_fail(tmp_path, monkeypatch):
    gc = gpu_check_module(monkeypatch, tmp_path)
    log = tmp_path / 'bench.log'
    args = lambda rc, T: argparse.Namespace(log=str(log), impl='sdpa', batch='2', rc=rc, block_size=T, long=True)
    # bench.py's own words when a step does not fit (sdpa's dense bias at 4,096): a measurement, not a failure
    log.write_text('error: out of GPU memory at batch 2 x 4096: lower --batch_size (raising '
                   '--gradient_accumulation_steps keeps the step), or --grad_checkpoint=True\n')
    gc.bench_row(args(1, '4096'))
    step = ('step: 812.00 ms, 10,089 tokens/s, 120.00 TFLOP/s, MFU 12.1%, peak memory 70.00 GiB, loss 10.4\n'
            'FLOPs per sequence: 2.1e+12 (attention scores and sums 41%); torch.utils.flop_counter: ')
    log.write_text(step + '2.1e+12\n')
    gc.bench_row(args(0, '2048'))
    log.write_text(step + '2.0e+12 (differs: estimate_flops is wrong here)\n')
    gc.bench_row(args(0, '1024'))
    rows = [line.split('\t') for line in (tmp_path / 'verdicts.tsv').read_text().splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [('5 long context', f'bench sdpa batch 2 T={T}', v)
                                                  for T, v in (('4096', 'SKIP'), ('2048', 'PASS'), ('1024', 'FAIL'))]
    assert 'does not fit: out of GPU memory at batch 2 x 4096' in rows[0][3]
    assert '2.1e+12 FLOPs/sequence (41% attention)' in rows[1][3] and 'estimate_flops is wrong' in rows[2][3]
    speed = (tmp_path / 'speed.md').read_text().splitlines()
    assert speed[2].startswith('| sdpa | 4096 | 2 | out of memory |') and speed[3].startswith('| sdpa | 2048 | 2 | 812.00 |')
    assert gc.verdict([tuple(r) for r in rows])[1] == 1  # the wrong count fails the run; the SKIP does not


# ---- paths, options and messages

def test_gpu_relative_paths_are_the_callers_and_every_listed_report_file_is_written(tmp_path):
    caller = tmp_path / 'caller dir'  # a space, too
    caller.mkdir()
    argv = tmp_path / 'argv.jsonl'
    before = set(os.listdir(HERE))
    try:
        proc = gpu('--device=cpu', '--report=my report', '--work=work', '--data_dir=data', cwd=caller,
                   python=fake_python(tmp_path), FAKE_ARGV=str(argv))
        assert set(os.listdir(HERE)) == before  # nothing landed in the repo
    finally:
        for name in {'my report', 'work'} - before:
            shutil.rmtree(os.path.join(HERE, name), ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = caller / 'my report'
    calls = {c[0]: c for c in map(json.loads, open(argv))}
    assert calls['e2e'][1] == HERE  # the steps run from the repo, with the caller's folders
    assert f'--data_dir={caller / "data"}' in calls['e2e'] and f'--work={caller / "work"}' in calls['e2e']
    # the files the header promises, all there: pytest.log says why the CUDA tests did not run
    header = open(GPU).read().split('\nset -uo')[0]
    listed = re.findall(r'(\w+\.(?:log|tsv|txt|md))', header[header.index('The report folder gets'):])
    assert set(listed) == {'check.log', 'verdicts.tsv', 'summary.txt', 'pytest.log', 'speed.md'}
    assert set(listed) <= set(os.listdir(report)), os.listdir(report)
    assert 'not run: no GPU' in (report / 'pytest.log').read_text()


def test_gpu_a_python_without_torch_or_no_python_is_one_line(tmp_path):
    no_site = tmp_path / 'python -S'  # a python that sees no installed package
    no_site.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    no_site.chmod(0o755)
    for python, words in ((str(tmp_path / 'missing' / 'python3'), ["no python '", 'PYTHON=/path/to/python']),
                          (str(no_site), ['has no torch and numpy: pip install -r requirements.txt', 'PYTHON='])):
        proc = gpu('--device=cpu', f'--report={tmp_path / "r"}', f'--work={tmp_path / "w"}', python=python)
        one_error_line(proc, *words)
        assert not (tmp_path / 'r').exists()  # refused before anything was made
    assert 'PYTHON=/path/to/python' in gpu('--help').stdout  # documented


def test_gpu_options_and_help_are_one_line_from_anywhere(tmp_path):
    for arg in ('--data_dir', '--budget', '--report'):  # the value after a space, as many tools take it
        one_error_line(gpu('--device=cpu', arg, 'x'), f"{arg} takes its value after '=': {arg}=VALUE")
    proc = subprocess.run(['bash', os.path.relpath(GPU, os.path.dirname(HERE)), '--help'], cwd=os.path.dirname(HERE),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and '--budget=S' in proc.stdout and not proc.stderr, proc.stderr


def test_gpu_a_work_folder_it_did_not_make_is_refused(tmp_path):
    mine = tmp_path / 'mine'
    (mine / 'run').mkdir(parents=True)
    (mine / 'run' / 'precious.txt').write_text('keep')
    proc = gpu('--device=cpu', f'--report={tmp_path / "r"}', f'--work={mine}', python=fake_python(tmp_path))
    one_error_line(proc, f'--work={mine} is not empty and is not a .ci/gpu work folder', 'run/, hf/ and ddp/')
    assert (mine / 'run' / 'precious.txt').read_text() == 'keep'


# ===== `pytest -n 2 --dist loadgroup` (.ci/run): the tests that share a module fixture run on one worker =====
# so that each fixture is built once rather than once per worker (small_run, the contrastive run, the gpu check's
# data...); after every test above, before the last

SHARED_FIXTURES = ('small_run', 'contrastive_run', 'tiny', 'prepared', 'slow_corpus', 'env')  # first listed wins
for _name, _test in list(globals().items()):
    if _name.startswith('test_') and callable(_test):
        _shared = [f for f in SHARED_FIXTURES if f in inspect.signature(_test).parameters]
        if _shared:
            pytest.mark.xdist_group(_shared[0])(_test)


# ===== the project's file layout: the module graph =====

def test_module_graph_has_no_entry_point_import_no_cycle_and_no_foreign_global_assignment():
    """The rule of the file layout: no module imports an entry point (train.py, contrastive.py, finetune.py,
    bench.py), the project's imports (at the top or inside functions) form no cycle, and no module assigns another
    module's globals (`module.name = ...`). Read from the source with ast, so a new import that breaks it fails here."""
    import ast
    mods = {p.stem for p in pathlib.Path(HERE).glob('*.py')} - {'test_all'}
    graph, assigned = {}, []
    for m in mods:
        tree = ast.parse((pathlib.Path(HERE) / f'{m}.py').read_text())
        deps = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                deps |= {a.name.split('.')[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                deps.add(n.module.split('.')[0])
            elif isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    for x in ast.walk(t):
                        if isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name) and x.value.id in mods - {m}:
                            assigned.append(f'{m}.py assigns {x.value.id}.{x.attr}')
        graph[m] = deps & mods - {m}
    assert mods >= {'train', 'contrastive', 'finetune', 'bench', 'run', 'evaluation', 'checkpoint', 'data'}
    assert not [f'{m} imports {e}' for m in graph for e in graph[m] & {'train', 'contrastive', 'finetune', 'bench', 'interpolate'}]
    assert not assigned
    done, path = set(), []

    def visit(m):  # depth first: a module met again on the current path closes a cycle
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m not in done:
            path.append(m)
            for d in sorted(graph[m]):
                visit(d)
            path.pop()
            done.add(m)
    for m in sorted(graph):
        visit(m)
