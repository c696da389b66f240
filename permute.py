"""
The MPNet permutation sampler (Song et al. 2020, sec. 2.2), vectorized in torch so that it runs
on the GPU next to the model: no Python loop over rows or tokens, no host sync, randomness only
from the generator it is handed.

For a block of T tokens it draws a permutation (whole words as units), predicts the last
P = n_pred(T) entries, corrupts them 80/10/10 and lays out the input of the objective
(fairseq MPNet's input modes; model.layout gives the lengths):

    mpnet  input_ids = [tokens[perm] (T) | corrupted (P) | corrupted (P)]     two streams, position compensation
           positions = [perm          (T) | perm[T-P:]  (P) | perm[T-P:]  (P)]   0-based original indices
    plm    input_ids = [tokens[perm] (T) | <mask> (P)]                         XLNet: two streams, no mask copies
           positions = [perm          (T) | perm[T-P:] (P)]
    mlm    input_ids = [tokens[perm[:T-P]] (T-P) | corrupted (P)]              BERT: corrupted in place; the
           positions = [perm (T)]                                               order of rows is immaterial
    targets = tokens[perm][T-P:], the P originals, for each

With eos_id (doc_mask), the documents of a packed block (each ended by </s>) are kept apart: positions
count from each document's start (a later document from 1, where its own <s> would be) and a fourth
tensor gives each row's document, for model(..., docs=docs).

Usage:

    import torch
    from transformers import AutoTokenizer
    from permute import vocab_tables, permute_batch, n_pred

    tok = AutoTokenizer.from_pretrained('microsoft/mpnet-base')
    is_word_start, is_special = (t.to('cuda') for t in vocab_tables(tok))
    gen = torch.Generator('cuda').manual_seed(1337)
    tokens = torch.randint(5, 30000, (16, 512), device='cuda')   # stand-in for a batch of blocks
    input_ids, positions, targets = permute_batch(tokens, is_word_start, is_special,
                                                  tok.mask_token_id, gen)
    logits, loss = model(input_ids, positions, n_pred(512), targets)
"""
import functools

import torch

OBJECTIVES = ('mpnet', 'mlm', 'plm')  # MPNet, BERT's masked LM, XLNet's permuted LM (fairseq MPNet's input modes)

# (marker, does the marker start a word?): WordPiece marks continuations, byte-level BPE and
# SentencePiece mark word starts (the space folded into the token)
WORD_MARKERS = {'wordpiece': ('##', False), 'byte-level bpe': ('\u0120', True), 'sentencepiece': ('\u2581', True)}


def n_pred(T, pred_frac=0.15):
    """Number of predicted tokens in a block of T; fairseq: pred_size = round(sz * pred_prob)."""
    return max(1, round(pred_frac * T))  # fairseq would predict all T with weight 0 here; we predict one


def vocab_tables(tokenizer):
    """(is_word_start, is_special): BoolTensor[V] on CPU, V = max token id + 1.

    tokenizer: a transformers tokenizer or a tokenizers.Tokenizer. Ids in [0, V) that name no
    token are marked special, so that they are never drawn as a random replacement.
    """
    if hasattr(tokenizer, 'all_special_ids'):  # transformers.PreTrainedTokenizerBase
        vocab = tokenizer.get_vocab()
        special_ids = set(tokenizer.all_special_ids)
        added = getattr(tokenizer, 'added_tokens_decoder', {})
    else:  # tokenizers.Tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        special_ids = set()
        added = tokenizer.get_added_tokens_decoder()
    special_ids |= {i for i, token in added.items() if token.special}
    V = max(max(vocab.values()), max(special_ids, default=-1)) + 1

    is_special = torch.ones(V, dtype=torch.bool)
    is_special[list(vocab.values())] = False
    is_special[list(special_ids)] = True
    normal = [(t, i) for t, i in vocab.items() if i not in special_ids]
    # the convention is the one whose marker the vocab uses most; BPE vocabs may hold a stray '##'
    counts = {name: sum(t.startswith(m) for t, _ in normal) for name, (m, _) in WORD_MARKERS.items()}
    convention = max(counts, key=counts.get)
    is_word_start = torch.ones(V, dtype=torch.bool)
    if counts[convention] == 0:
        print('note: vocab has no word markers (##, \u0120, \u2581): whole-word permutation falls back to single tokens')
    else:
        marker, marks_start = WORD_MARKERS[convention]
        ids = [i for t, i in normal]
        is_word_start[ids] = torch.tensor([t.startswith(marker) == marks_start for t, _ in normal])
    # fairseq: "special elements are always considered beginnings"
    is_word_start[is_special] = True
    return is_word_start, is_special


@functools.lru_cache(maxsize=16)
def _arange(n, device):
    return torch.arange(n, device=device)


def permute_batch(tokens, is_word_start, is_special, mask_id, generator, pred_frac=0.15,
                  mask_prob=0.8, rand_prob=0.1, whole_word=True, objective='mpnet', eos_id=None):
    """tokens: LongTensor[B, T] -> (input_ids[B, L], positions[B, L], targets[B, P]), same device, with
    L = T+2P (mpnet), T+P (plm) or T (mlm); with eos_id also docs[B, L], each row's document in the block.

    is_word_start, is_special: the tables of vocab_tables(), moved to tokens.device.
    generator: a torch.Generator on tokens.device, the only source of randomness.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    B, T = tokens.shape
    P = n_pred(T, pred_frac)
    device = tokens.device
    if is_word_start.device != device or is_special.device != device:
        raise ValueError(f'vocab tables are on {is_word_start.device}/{is_special.device} but tokens on {device}: '
                         'move them once with .to(device)')
    tokens = tokens.long()
    rand = functools.partial(torch.rand, generator=generator, device=device)

    if whole_word:
        starts = is_word_start[tokens]
        starts[:, 0] = True  # a packed block may begin mid-word; its fragment is a word of its own
        word_id = starts.cumsum(1) - 1
        # argsort of noise is a uniform random permutation: read it as a distinct rank per word slot.
        # Sorting by (rank of the token's word, original index) keeps each word contiguous and in
        # order, as fairseq's make_span_perm does with a loop over spans.
        word_rank = rand(B, T).argsort(1)
        perm = (word_rank.gather(1, word_id) * T + _arange(T, device)).argsort(1)
        # fairseq reshuffles the predicted tail at token level (span_perm: np.random.shuffle of the
        # last pred_size), so the prediction order is not tied to word order
        tail = perm[:, T - P:].gather(1, rand(B, P).argsort(1))
        perm = torch.cat([perm[:, :T - P], tail], 1)
    else:
        perm = rand(B, T).argsort(1)
        tail = perm[:, T - P:]

    content = tokens.gather(1, perm)
    targets = content[:, T - P:]

    # a uniform non-special id: the r-th allowed id is the first v with (#allowed ids <= v) = r+1.
    # float64 noise keeps floor(u * n) uniform for large vocabs; no .item(), so no host sync
    allowed_upto = (~is_special).cumsum(0)
    r = (rand(B, P, dtype=torch.float64) * allowed_upto[-1]).long()
    random_ids = torch.searchsorted(allowed_upto, r + 1)
    # one uniform per token picks the branch, the same 80/10/10 as fairseq's mask_perm
    u = rand(B, P)
    corrupted = torch.where(u < mask_prob, mask_id, torch.where(u < mask_prob + rand_prob, random_ids, targets))

    if objective == 'mpnet':
        # the same corrupted tokens feed the content stream's mask copies and the query stream (sec. 2.2)
        input_ids, rows = torch.cat([content, corrupted, corrupted], 1), torch.cat([perm, tail, tail], 1)
    elif objective == 'plm':
        # XLNet's query stream carries only its position: no token, not even a corrupted one
        input_ids, rows = torch.cat([content, torch.full_like(corrupted, mask_id)], 1), torch.cat([perm, tail], 1)
    else:
        # BERT: corrupted in place; with positions given, attention is blind to row order, so the predicted
        # tokens may sit last, where the model reads its logits
        input_ids, rows = torch.cat([content[:, :T - P], corrupted], 1), perm
    if eos_id is None:
        return input_ids, rows, targets.contiguous()
    # </s> ends its document; a document's positions count from its start (a later one from 1, after the
    # <s> it would have alone), so each document is seen as it would be seen alone
    is_eos = tokens == eos_id
    doc = is_eos.cumsum(1) - is_eos.long()
    index = _arange(T, device).expand(B, T)
    starts = torch.cat([torch.ones_like(is_eos[:, :1]), is_eos[:, :-1]], 1)
    first = torch.where(starts, index, 0).cummax(1).values
    in_doc = index - first + (doc > 0).long()
    return input_ids, in_doc.gather(1, rows), targets.contiguous(), doc.gather(1, rows)
