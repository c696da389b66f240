"""
MPNet: masked and permuted pre-training with two-stream self-attention (Song et al. 2020,
arXiv 2004.09297), written to match fairseq's `mpnet_rel_base` and HuggingFace `MPNetForMaskedLM`.

    from model import MPNet, MPNetConfig
    model = MPNet(MPNetConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=8192))
    logits, loss = model(input_ids, positions, n_pred, targets)   # two-stream pretraining step
    hidden = model.encode(input_ids, attention_mask)               # plain encoder, == HF MPNetModel

The two-stream input is [content (T) | mask copies (P) | query copies (P)] of length T+2P (see
permute.py). One attention call serves both streams: queries come from all T+2P rows, keys and
values from the T+P content rows, and `two_stream_visible` is the single statement of who sees whom.
The paper's ablations run on the same path (config.objective): 'plm' (XLNet) drops the mask copies,
'mlm' (BERT) is one stream of T rows that all see each other; `layout` gives each one's lengths. With
docs (doc_mask), rows also see only their own document.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from contextlib import nullcontext
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from einops import rearrange

from permute import OBJECTIVES


@dataclass
class MPNetConfig:
    vocab_size: int = 30527        # microsoft/mpnet-base; the embedding table is padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 3072            # feed-forward width
    max_positions: int = 512       # longest sequence; the position table has max_positions + 2 rows, as HF
    rel_buckets: int = 32          # T5-style relative position buckets, shared by all layers
    rel_max_distance: int = 128
    dropout: float = 0.1
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pad_id: int = 1                # HF MPNet's padding_idx; absolute position rows start at pad_id + 1
    attn_impl: str = 'sdpa'        # 'sdpa' | 'flex' | 'manual'
    rope: bool = False             # rotary embeddings on permuted positions instead of absolute + relative (not HF-exportable)
    rope_theta: float = 10000.0
    grad_checkpoint: bool = False  # recompute each block's activations in backward: less memory, ~30% more compute
    objective: str = 'mpnet'       # 'mpnet' | 'mlm' | 'plm': the input layout forward reads (a training choice; same weights)

    def __post_init__(self):
        for name in ('vocab_size', 'n_layer', 'n_head', 'n_embd', 'n_inner', 'max_positions', 'rel_buckets',
                     'rel_max_distance'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be at least 1; got {getattr(self, name)}')
        for name in ('dropout', 'attn_dropout'):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f'{name} must be in [0, 1); got {getattr(self, name)}')
        if self.vocab_size <= self.pad_id:
            raise ValueError(f'vocab_size ({self.vocab_size}) must exceed pad_id ({self.pad_id})')
        if self.attn_impl not in ('sdpa', 'flex', 'manual'):
            raise ValueError(f"attn_impl must be 'sdpa', 'flex' or 'manual', got {self.attn_impl!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f'n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})')
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f'rope rotates pairs of channels: the head size n_embd/n_head = '
                             f'{self.n_embd // self.n_head} must be even')
        if self.attn_impl == 'flex' and self.grad_checkpoint and not self.rope:
            # measured (torch 2.13, eager): FlexAttention recomputed under checkpoint returns a NaN
            # gradient for the captured bias table, while every other gradient is right
            raise ValueError("attn_impl='flex' with grad_checkpoint gives a wrong relative-bias gradient: "
                             "use attn_impl='sdpa' with grad_checkpoint")

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // 64) * 64


# ----------------------------------------------------------------------------------------------
# The two-stream visibility rule (paper sec. 2.2, fairseq `make_query_and_content_mask`)

def layout(objective, T, P):
    """(rows L, key rows S) of an objective's input for T tokens with P predicted (permute.py lays it out):
    mpnet [content T | mask copies P | queries P], keys the first T+P; plm [content T | queries P], keys
    the T content rows; mlm the T tokens, predicted ones last. The logits are always read from the last P."""
    return {'mpnet': (T + 2 * P, T + P), 'plm': (T + P, T), 'mlm': (T, T)}[objective]


def two_stream_visible(q_idx, kv_idx, T, P, objective='mpnet'):
    """True where query row q_idx may attend to content row kv_idx (broadcasting tensors).

    mpnet rows: [0, N) non-predicted, [N, T) predicted originals x_1..x_P, [T, T+P) content rows of the
    mask copies m_1..m_P, [T+P, T+2P) query rows. Keys are the first T+P rows. Every row sees the N
    non-predicted tokens; x_j is visible iff j < lim(row) and m_j iff j >= lim(row), where lim is
    i+1 for original x_i (sees x_1..x_i), i for query row i (sees x_<i, m_>=i) and 0 otherwise
    (non-predicted and mask-copy content rows see every m and no x).
    plm (XLNet) is the same without mask copies: query rows start at T, keys are the T content rows, so
    query row i sees the N and x_<i, original x_i sees the N and x_<=i. mlm (BERT): every row sees every row.
    """
    if objective == 'mlm':
        return (q_idx >= 0) & (kv_idx >= 0)
    N = T - P
    first_query = T + P if objective == 'mpnet' else T
    lim = torch.where((q_idx >= N) & (q_idx < T), q_idx - N + 1, 0)
    lim = torch.where(q_idx >= first_query, q_idx - first_query, lim)
    is_x = (kv_idx >= N) & (kv_idx < T)
    return (kv_idx < N) | (is_x & (kv_idx - N < lim)) | ((kv_idx >= T) & (kv_idx - T >= lim))


_mask_cache = {}  # (kind, T, P, objective, device) -> mask; a plain dict, which torch.compile traces through and guards on


def two_stream_mask(T, P, device, objective='mpnet'):
    """Boolean [L, S] table of two_stream_visible (layout's L, S), built once per (T, P, objective, device)."""
    key = ('dense', T, P, objective, str(device))
    if key not in _mask_cache:
        L, S = layout(objective, T, P)
        q = torch.arange(L, device=device)[:, None]
        kv = torch.arange(S, device=device)[None, :]
        _mask_cache[key] = visible = two_stream_visible(q, kv, T, P, objective)
        # rows that see no key at all (plm's first query row when every token is predicted, N = 0): known
        # here, once, so that forward handles them only when they exist and never syncs to ask
        lonely = ~visible.any(-1)
        _mask_cache[('lonely', *key[1:])] = lonely if lonely.any() else None
    return _mask_cache[key]


def empty_rows(T, P, device, objective='mpnet'):
    """(L,) True for the rows of two_stream_mask that see no key, or None when every row sees one (usually)."""
    two_stream_mask(T, P, device, objective)
    return _mask_cache[('lonely', T, P, objective, str(device))]


def two_stream_block_mask(T, P, device, objective='mpnet'):
    """FlexAttention block mask of two_stream_visible, built once per (T, P, objective, device); rows that
    see nothing (empty_rows) get every key, as in the dense path, and forward zeroes their output."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = ('flex', T, P, objective, str(device))
    if key not in _mask_cache:
        lonely = empty_rows(T, P, device, objective)

        def mask_mod(b, h, q_idx, kv_idx):
            visible = two_stream_visible(q_idx, kv_idx, T, P, objective)
            return visible if lonely is None else visible | lonely[q_idx]
        _mask_cache[key] = create_block_mask(mask_mod, None, None, *layout(objective, T, P), device=device)
    return _mask_cache[key]


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5 bidirectional buckets of key_pos - query_pos, exactly as HF MPNetEncoder (and fairseq)."""
    n = -relative_position
    num_buckets //= 2
    ret = (n < 0).long() * num_buckets
    n = n.abs()
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced buckets beyond max_exact; clamp(min=1) only avoids log(0) in the unused branch
    val_if_large = max_exact + (torch.log(n.float().clamp(min=1) / max_exact)
                                / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    val_if_large = val_if_large.clamp(max=num_buckets - 1)
    return ret + torch.where(is_small, n, val_if_large)


def rotary(x, positions, theta):
    """Rotate (B, nh, L, hs) by angles positions * theta^(-2i/hs) (RoFormer, half-split layout)."""
    hs = x.size(-1)
    inv_freq = theta ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, L, hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# Which SDPA backends can train the relative bias (torch's derivatives.yaml, the same in 2.11 and 2.13): the
# efficient and math backends differentiate attn_mask; cuDNN does not, and refuses at the forward a bias that
# requires grad ("not differentiable with respect to argument 'attn_bias'"), so on H100/H200, where PyTorch
# prefers cuDNN, training would crash; flash takes no mask at all. Whenever the bias needs a gradient, only
# these may run; evaluation (no grad) lets PyTorch pick any backend, cuDNN included.
MASK_GRAD_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ----------------------------------------------------------------------------------------------
# Modules

class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.impl = config.n_head, config.attn_impl
        self.q = nn.Linear(config.n_embd, config.n_embd)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd)  # k and v, computed for content rows only
        self.o = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_dropout
        self.rope_theta = config.rope_theta if config.rope else None

    def forward(self, x, n_kv, attn):
        """x: (B, L, C); keys/values from x[:, :n_kv]; attn: the per-forward AttnInputs."""
        q = rearrange(self.q(x), 'b l (nh hs) -> b nh l hs', nh=self.n_head)              # (B, nh, L, hs)
        k, v = rearrange(self.kv(x[:, :n_kv]), 'b s (two nh hs) -> two b nh s hs', two=2, nh=self.n_head)
        if self.rope_theta is not None:
            q = rotary(q, attn.positions, self.rope_theta)
            k = rotary(k, attn.positions[:, :n_kv], self.rope_theta)
        dropout_p = self.attn_dropout if self.training else 0.0
        if attn.flex is not None:
            y = attn.flex(q, k, v)  # FlexAttention has no dropout on attention probabilities
        elif self.impl == 'manual':
            att = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1) + attn.bias  # (B, nh, L, S); q scaled, the smaller
            att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), dropout_p, self.training)
            y = att @ v
        else:
            with sdpa_kernel(MASK_GRAD_BACKENDS) if attn.bias.requires_grad else nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.bias, dropout_p=dropout_p)
        if attn.keep is not None:  # rows with nothing to see (see _two_stream_inputs) get no attention output
            y = y * attn.keep
        return self.o(rearrange(y, 'b nh l hs -> b l (nh hs)'))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.n_embd, config.n_inner)
        self.fc2 = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as BERT/MPNet


class Block(nn.Module):
    """Post-LN transformer layer (BERT / fairseq MPNet): x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, n_kv, attn):
        x = self.ln_1(x + self.dropout(self.attn(x, n_kv, attn)))
        return self.ln_2(x + self.mlp(x))


class AttnInputs:
    """What every layer's attention needs, built once per forward and shared by all layers:
    positions (for rope), and either an additive bias with -inf where masked, (B, nh, L, S), for
    sdpa/manual, or a FlexAttention closure; keep (B, 1, L, 1), False for rows whose output is zeroed."""

    def __init__(self, positions, bias=None, flex=None, keep=None):
        if bias is not None and torch.is_autocast_enabled(bias.device.type):
            bias = bias.to(torch.get_autocast_dtype(bias.device.type))  # once here, not in every layer
        if bias is not None and bias.size(-1) % 16:
            # memory-efficient SDPA wants a 16-aligned row stride (T+P rarely is): pad once, keep a view
            S = bias.size(-1)
            bias = F.pad(bias, (0, 16 - S % 16))[..., :S]
        self.positions, self.bias, self.flex, self.keep = positions, bias, flex, keep


class MPNet(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.padded_vocab_size
        self.wte = nn.Embedding(V, C, padding_idx=config.pad_id)
        if not config.rope:
            self.wpe = nn.Embedding(config.max_positions + config.pad_id + 1, C, padding_idx=config.pad_id)
            self.rel_bias = nn.Embedding(config.rel_buckets, config.n_head)  # one table shared by all layers
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        # LM head: dense -> gelu -> LayerNorm -> decoder; the decoder weight IS wte.weight (tied, as
        # HF's lm_head.decoder), so it has only its own bias here
        self.head_dense = nn.Linear(C, C)
        self.head_ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(V))
        self.apply(self._init_weights)
        if config.attn_impl == 'flex' and config.attn_dropout > 0:
            print(f'note: attn_impl=flex has no attention dropout (attn_dropout={config.attn_dropout} is ignored)')

    def _init_weights(self, module):
        # BERT / fairseq init_bert_params: N(0, 0.02) weights, zero biases, zero padding rows
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- shared pieces ----------------------------------------------------------------------

    def embed(self, input_ids, positions):
        """positions are 0-based token indices; embedding row = position + pad_id + 1, as HF."""
        x = self.wte(input_ids)
        if not self.config.rope:
            x = x + self.wpe(positions + self.config.pad_id + 1)
        return self.drop(self.ln_emb(x))

    def distance_bias(self, T, device):
        """(2T-1, nh): the bias of every distance d = k_pos - q_pos in [-(T-1), T-1], at row d + T - 1.
        Biases are looked up by distance, not by bucket, so that the backward's scatter-add lands on
        2T-1 rows rather than 32 (far fewer colliding atomic adds on a GPU); the values are the same."""
        c = self.config
        dist = torch.arange(-(T - 1), T, device=device)
        return self.rel_bias(relative_position_bucket(dist, c.rel_buckets, c.rel_max_distance))

    def rel_bias_table(self, q_pos, k_pos, T):
        """(B, nh, Lq, Lk) relative position bias for query positions (B, Lq), key positions (B, Lk) in [0, T)."""
        d = k_pos[:, None, :] - q_pos[:, :, None] + T - 1
        return rearrange(F.embedding(d, self.distance_bias(T, q_pos.device)), 'b lq lk nh -> b nh lq lk')

    def lm_logits(self, hidden, head_only=False):
        """LM head on (..., C) hidden states -> (..., vocab_size) logits; padding rows are cut off. head_only:
        no gradient reaches the tied decoder (wte, the encoder's)."""
        x = self.head_ln(F.gelu(self.head_dense(hidden)))
        decoder = self.wte.weight.detach() if head_only else self.wte.weight  # tied to the token embedding
        return F.linear(x, decoder, self.head_bias)[..., :self.config.vocab_size]

    # -- the two-stream pretraining forward -----------------------------------------------

    def forward(self, input_ids, positions, n_pred, targets=None, docs=None, head_only=False):
        """input_ids, positions: (B, L) the objective's layout (permute.py; L = T+2P for mpnet); targets: (B, P);
        docs: (B, L) each row's document (doc_mask), or None. Returns logits (B, P, vocab_size) for the last P
        rows (the query stream; mlm's predicted tokens) and the mean cross-entropy (or None). head_only: the
        encoder runs without autograd, so a backward costs only the LM head's (a new head training alone)."""
        B, L = input_ids.shape
        P, objective = n_pred, self.config.objective
        T = L - layout(objective, 0, P)[0]
        n_kv = layout(objective, T, P)[1]
        with torch.no_grad() if head_only else nullcontext():
            attn = self._two_stream_inputs(positions, T, P, docs)
            x = self.embed(input_ids, positions)
            for block in self.blocks:
                if self.config.grad_checkpoint and self.training and not head_only:
                    x = torch.utils.checkpoint.checkpoint(block, x, n_kv, attn, use_reentrant=False)
                else:
                    x = block(x, n_kv, attn)
        logits = self.lm_logits(x[:, L - P:], head_only)  # (B, P, V): LM head only on the predicted rows
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def build_masks(self, T, P, device):
        """Build the (T, P) attention mask now, before torch.compile: the compiled forward then finds it
        in the cache, so the model compiles once and no mask is built inside the graph (otherwise the
        first trace builds it and fills the cache, and that dict change forces a second compile)."""
        device = torch.empty(0, device=device).device  # 'cuda' -> 'cuda:0', the key forward will look up
        two_stream_mask(T, P, device, self.config.objective)  # flex too: doc_mask's per-batch mask starts from it
        if self.config.attn_impl == 'flex':
            two_stream_block_mask(T, P, device, self.config.objective)

    def _two_stream_inputs(self, positions, T, P, docs=None):
        c, device = self.config, positions.device
        L, n_kv = layout(c.objective, T, P)
        visible, keep = two_stream_mask(T, P, device, c.objective), None  # (L, S)
        lonely = empty_rows(T, P, device, c.objective)  # (L,) or, as a rule, None: the usual path pays nothing
        if docs is not None:
            # doc_mask: rows see their own document only, (B, L, S). A plm query row can then have nothing to
            # see (a short document whose tokens are all predicted, this one first)
            visible = visible & (docs[:, :, None] == docs[:, None, :n_kv])
            lonely = ~visible.any(-1)  # (B, L)
        if lonely is not None:
            # a row with nothing to see gets every key (no -inf-only softmax, whose NaN would reach the loss
            # and every gradient) and its attention output is zeroed, so nothing leaks in: (B or 1, 1, L, 1)
            visible, keep = visible | lonely[..., None], ~lonely[..., None, :, None]
        if c.attn_impl == 'flex':
            return AttnInputs(positions, flex=self._flex_attention(positions, T, P, visible if docs is not None else None),
                              keep=keep)
        if docs is not None:
            visible = visible[:, None]  # (B, 1, L, S): the same for every head
        if c.rope:
            bias = torch.zeros(visible.shape[-2:], device=device)
        else:
            # (B, nh, L, S); query rows use their own positions, which equal their mask copies' (fairseq)
            bias = self.rel_bias_table(positions, positions[:, :n_kv], T)
        return AttnInputs(positions, bias=bias.masked_fill(~visible, float('-inf')), keep=keep)

    def _flex_attention(self, positions, T, P, visible=None):
        """visible: (B, L, S) for doc_mask, a per-batch block mask built on the device; else the cached one."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if visible is None:
            block_mask = two_stream_block_mask(T, P, positions.device, self.config.objective)
        else:
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: visible[b, q_idx, kv_idx], visible.size(0), None,
                                           visible.size(1), visible.size(2), device=positions.device)
        if self.config.rope:
            return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)
        # bias by relative distance d = k_pos - q_pos in [-(T-1), T-1]: a (nh, 2T-1) table per forward,
        # looked up inside the kernel, so nothing of size (B, nh, L, L) is ever built
        dist_bias = self.distance_bias(T, positions.device).t()  # (nh, 2T-1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + dist_bias[h, positions[b, kv_idx] - positions[b, q_idx] + T - 1].to(score.dtype)
        return lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    # -- the plain encoder (HF MPNetModel) ------------------------------------------------

    def encode(self, input_ids, attention_mask=None):
        """(B, T) ids -> (B, T, C) hidden states, exactly HF MPNetModel: positions count non-pad tokens,
        the relative bias uses arange(T), padded keys are masked."""
        c = self.config
        B, T = input_ids.shape
        not_pad = input_ids.ne(c.pad_id)
        positions = torch.cumsum(not_pad, dim=1) * not_pad - 1  # a pad gets -1, i.e. embedding row pad_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        arange = torch.arange(T, device=input_ids.device)[None]  # (1, T): every row has the same positions
        if c.rope:
            bias = torch.zeros(1, 1, T, T, device=input_ids.device)
            rope_pos = arange.expand(B, T)
        else:
            # one (1, nh, T, T) table for the batch, broadcast by the padding mask: its backward sums over rows
            # before the embedding lookup's, instead of scattering B * T * T gradients into the bias table
            bias = self.rel_bias_table(arange, arange, T)
            rope_pos = None
        bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], float('-inf'))  # (B, nh or 1, T, T)
        # flex's block mask is specialised to the two-stream layout: the plain path always uses a bias
        attn = AttnInputs(rope_pos, bias=bias)
        x = self.embed(input_ids, positions)
        for block in self.blocks:
            x = block(x, T, attn)
        return x

    @staticmethod
    def pool(hidden, attention_mask, pooling='mean'):
        """(B, T, C) hidden states -> (B, C) sentence embeddings in fp32 (fp64 stays), not normalised: the <s> state
        ('cls') or the mean over the attention mask ('mean': <s> and </s> included), as sentence-transformers'
        Pooling does. The one pooling rule of every embedding: training (contrastive.py) and evaluation alike."""
        h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        if pooling == 'cls':
            return h[:, 0]
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    # -- training helpers ---------------------------------------------------------------

    def head_parameters(self):
        """The LM head's own parameters (its decoder is wte, which belongs to the encoder)."""
        return [self.head_dense.weight, self.head_dense.bias, self.head_ln.weight, self.head_ln.bias, self.head_bias]

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type):
        """AdamW over four groups, each tagged part='encoder' or 'head' (so that a new head can train alone)."""
        # decay matrices and embeddings; never biases or LayerNorm parameters (BERT / fairseq practice)
        head = {id(p) for p in self.head_parameters()}
        groups = []
        for part in ('encoder', 'head'):
            params = [p for p in self.parameters() if p.requires_grad and (id(p) in head) == (part == 'head')]
            groups += [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay, 'part': part},
                       {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0, 'part': part}]
        # fused: one kernel for all parameters (CUDA and CPU), and it can skip a step on the device (found_inf)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)

    def estimate_flops(self, T, P):
        """Training FLOPs per sequence of the objective's step (forward + backward = 3x forward matmuls).

        Per layer, with L query rows and S key rows (layout: T+2P and T+P for mpnet, T+P and T for plm,
        T and T for mlm): q and o projections 2*L*C*C each,
        k and v 2*S*C*C each, feed-forward 2*L*C*F twice, attention scores and weighted sum 2*L*S*C each
        (the full rectangle, masked entries included, as is the convention); LM head on the P query
        rows: 2*P*(C*C + C*V). Embedding lookups, norms and softmax are not counted."""
        c = self.config
        C, F_, V = c.n_embd, c.n_inner, c.padded_vocab_size
        L, S = layout(c.objective, T, P)
        per_layer = 2 * L * C * C * 2 + 2 * S * C * C * 2 + 2 * L * C * F_ * 2 + 2 * L * S * C * 2
        forward = c.n_layer * per_layer + 2 * P * (C * C + C * V)
        return 3 * forward

    def estimate_mfu(self, T, P, seqs_per_sec, device_name):
        """Model FLOPs utilisation against the device's dense bf16 peak; None for an unknown device."""
        peak = peak_flops(device_name)
        return None if peak is None else self.estimate_flops(T, P) * seqs_per_sec / peak


# dense bf16 peak FLOP/s by device name substring (vendor datasheets, no sparsity)
# (first match wins, so 'H200 NVL' comes before 'H200')
PEAK_BF16_FLOPS = {'H200 NVL': 835e12, 'H200': 989e12, 'H100 SXM': 989e12, 'H100 80GB HBM3': 989e12,
                   'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 70e12,
                   'RTX 4090': 165e12}


def extend_positions(state_dict, config, new_max):
    """state_dict with its absolute position table grown from config.max_positions to new_max positions, as
    Longformer grew RoBERTa's 512 to 4,096 (Beltagy et al. 2020, sec. 5): the learned rows are copied over and
    over (position p starts as position p mod max_positions), so the new positions begin with the local
    structure the model already knows, and continued pretraining only has to tell the copies apart. Rows
    0..max_positions+pad_id are kept bit for bit, and the relative bias (saturated past distance 128) needs
    nothing, so the outputs on sequences up to the old length are unchanged. A rotary model has no table."""
    first = config.pad_id + 1  # rows 0..pad_id: the padding rows HF keeps before position 0
    old = state_dict['wpe.weight']  # (max_positions + pad_id + 1, C)
    learned = old[first:]
    copies = learned.repeat(-(-new_max // config.max_positions), 1)[:new_max]
    return {**state_dict, 'wpe.weight': torch.cat([old[:first], copies])}


def peak_flops(device_name):
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None
