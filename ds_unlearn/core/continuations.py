"""Exact greedy continuations from many start positions of the same sequences, fast.

EL_n needs, for every wrong teacher-forced position ``f`` of a sequence ``x`` (see
memorization.py), the greedy continuation of ``x[:f+1]`` up to the sequence's last position. This
module produces exactly those tokens (token-by-token greedy decoding gives the same ones; the
tests hold it to the per-prefix reference in float64) with three levers:

* **No prompt pass.** Every prompt is a prefix of a sequence the teacher-forced pass already ran,
  so its keys and values are copied out of that pass's KV cache, and its first token is that pass's
  (wrong) argmax at ``f``.
* **Draft and verify.** A row appends a block of proposed tokens after its last token; one forward
  returns the model's argmax at every block position, and the row keeps the longest run of drafts
  equal to that argmax plus the argmax after it. Each kept token is the argmax given exactly the
  tokens before it, so the result is token-by-token greedy decoding whatever the drafts were.
  Drafts come from a per-sequence table of the latest token anyone predicted at each absolute
  position: the teacher-forced argmax to begin with, then every continuation's accepted tokens. A
  continuation of partly memorized text usually drops back into the text the model memorized,
  which the teacher-forced pass and the other continuations of the same sequence already spelled
  out at the same positions. The block width of a round is chosen from each row's recent
  acceptance, and is 0 whenever a row that gets nothing accepted has the most tokens left (it sets
  the number of forwards whatever the width; ``draft_width``), so on unseen text, and on partly
  memorized text whose longest continuation has left the text for good, rounds are one token per
  row.
* **Rows leave when done.** Rows live in one preallocated, right-aligned KV buffer (a forward
  writes its block in place: no per-step concatenation); finished rows are dropped and new
  requests join whenever half the rows are done, so no row computes past its own last position.

Right alignment (every row's last cached token in the same column, left padding masked) keeps
relative column distances equal to position distances, which GPT-Neo's column-based local
attention needs; the buffer never grows past ``max_position_embeddings`` columns, the size of
GPT-Neo's causal-mask buffer. Models whose KV cache is not plain per-layer keys and values
(sliding-window or recurrent layers) use ``passes.greedy_continuations`` instead (``supports``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

PAD_ID = 0  # any valid id: padding is masked (cache) or lies after every real token (blocks)
MAX_DRAFT = 64  # longest block of drafts one row proposes in a round
DRAFT_WIDTHS = (0, 1, 2, 4, 8, 16, 32, MAX_DRAFT)


class _BufferLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer ``[rows, heads, capacity, head_dim]``;
    a forward writes its block at column ``end`` in place and attends to columns ``[0, end)``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, end: int):
        super().__init__()
        self.buf_k, self.buf_v, self.end = keys, values, end
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        stop = self.end + key_states.shape[-2]
        self.buf_k[:, :, self.end : stop].copy_(key_states)
        self.buf_v[:, :, self.end : stop].copy_(value_states)
        self.end = stop
        self.keys, self.values = self.buf_k[:, :, :stop], self.buf_v[:, :, :stop]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end + query_length, 0


def supports(cache) -> bool:
    """True when ``cache`` (a teacher-forced pass's ``past_key_values``) holds plain full-attention
    keys and values per layer, the layout this module copies prompts out of."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


@dataclass
class Request:
    """Continue ``x[:start+1]`` of batch sequence ``seq`` for ``length`` tokens (EOS is not special)."""

    seq: int
    start: int
    length: int


def draft_width(room: np.ndarray, eps: np.ndarray, waiting_left: int, col_room: int, rows: int) -> int:
    """Drafts per row for the next round: 0 when drafting cannot cut the number of forwards left,
    else the width in ``DRAFT_WIDTHS`` that maximizes expected accepted tokens per unit of work,
    counting a forward's fixed cost as about half a token per row.

    ``room`` [live] int: drafts each live row can still use (tokens left after the next one);
    ``eps`` [live] float: drafts each is expected to get accepted; ``waiting_left``: forwards the
    waiting requests not expected to get drafts accepted need at one token per forward (0: none);
    ``col_room``: free buffer columns; ``rows``: rows in the forward, live or not.

    A block is as wide for every row, so drafts cost every row a slot each, and a row whose drafts
    are all accepted does the same work in fewer forwards, not less work. Drafts pay only by
    shortening the decode: when a row not expected to get drafts accepted (live, or waiting to
    join) has at least as many tokens left as every drafting row, that row sets the forwards left
    whatever the width.
    """
    cap = np.minimum(room, np.floor(eps))
    drafting = cap >= 1
    if not drafting.any() or room[drafting].max() <= max(room[~drafting].max(initial=-1), waiting_left - 1):
        return 0
    best, best_rate = 0, -1.0
    overhead = 0.5 * rows + 16
    for width in DRAFT_WIDTHS:
        if width > col_room or (width and width > room.max()):
            break
        gain = len(room) + np.minimum(cap, width).sum()
        rate = gain / (overhead + rows * (width + 1))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


class ContinuationBatch:
    """Greedy continuations of ``requests`` over sequences whose teacher-forced pass is known.

    ``tokens`` [S, W] int64 (right-padded sequences), ``predictions`` [S, W-1] int64 (the
    teacher-forced argmax: ``predictions[i, j]`` is the greedy token after ``x[:j+1]``), ``cache``
    that pass's KV cache (``supports(cache)``; keys [S, heads, W, head_dim]), ``expected_run`` [S]
    float: how many drafts per row to expect accepted at first (0 on unseen text). ``rows`` caps
    the rows per forward; ``position_limit`` the columns (GPT-Neo's mask buffer; None: no cap).

    Rows join in order of prompt length, each as soon as the buffer's columns reach its prompt
    length, so rows decoded together sit at nearly the same position and attend to almost no
    padding. Drive it with ``step()`` while ``has_work()``; ``results[k]`` is then request k's
    continuation (``length`` ints) and ``nonfinite`` the sequences whose logits were NaN/inf.
    """

    def __init__(
        self,
        model,
        tokens: np.ndarray,
        predictions: np.ndarray,
        cache,
        requests: Sequence[Request],
        expected_run: np.ndarray,
        rows: int,
        position_limit: int | None,
    ):
        self.model = model
        # Eager and SDPA attention take a ready 4D additive mask; others (flash) need the 2D one.
        attn = getattr(model.config, "_attn_implementation", None)
        self.additive_mask_dtype = model.dtype if attn in ("eager", "sdpa") else None
        self.limit = position_limit or math.inf
        self.tf_keys = [layer.keys for layer in cache.layers]
        self.tf_values = [layer.values for layer in cache.layers]
        self.device = self.tf_keys[0].device
        self.predictions = np.asarray(predictions, dtype=np.int64)
        # The draft table: the latest token any continuation produced at each absolute position of
        # each sequence, the true text where none has been yet.
        self.table = np.array(tokens, dtype=np.int64, copy=True)
        self.expected_run = np.asarray(expected_run, dtype=np.float64)
        self.requests = list(requests)
        self.results: list[list[int] | None] = [None] * len(self.requests)
        self.nonfinite: set[int] = set()
        self.forward_calls = 0
        pending = []
        for k, req in enumerate(self.requests):
            if req.length == 1:  # the teacher-forced argmax is the whole continuation
                self.results[k] = [int(self.predictions[req.seq, req.start])]
            else:
                pending.append(k)
        # Shortest prompt last, so pop() takes it first.
        pending.sort(key=lambda k: (-self.requests[k].start, -self.requests[k].seq))
        self.queue = pending
        # Column after the last token of each waiting request not expected to get drafts accepted
        # (0 for the others), in queue order (pop() takes the last).
        self.queue_end = np.array(
            [
                req.start + 1 + req.length if self.expected_run[req.seq] < 1 else 0
                for req in map(self.requests.__getitem__, pending)
            ],
            dtype=np.int64,
        )
        capacity = max(1, min(int(rows), len(pending)))
        self.columns = int(min(self.limit, tokens.shape[1] + MAX_DRAFT + 1))
        longest = max((self.requests[k].length for k in pending), default=1)
        self.buf_k = [k.new_zeros((capacity, k.shape[1], self.columns, k.shape[3])) for k in self.tf_keys]
        self.buf_v = [v.new_zeros((capacity, v.shape[1], self.columns, v.shape[3])) for v in self.tf_values]
        self.n = 0  # rows in use: [0, n)
        self.end = 0  # columns in use: [0, end); every row's last cached token is in column end-1
        ints = lambda: np.zeros(capacity, dtype=np.int64)
        self.req, self.seq, self.need, self.count = ints(), ints(), ints(), ints()
        self.last, self.pos, self.first_col = ints(), ints(), ints()
        self.eps = np.zeros(capacity, dtype=np.float64)  # drafts the row is expected to get accepted
        self.live = np.zeros(capacity, dtype=bool)
        self.generated = np.zeros((capacity, longest), dtype=np.int64)

    def has_work(self) -> bool:
        return bool(self.live[: self.n].any()) or bool(self.queue)

    # -- rows joining and leaving -------------------------------------------------------------------
    def _compact(self) -> None:
        """Move the live rows to the front and drop the columns that are padding in all of them."""
        keep = np.flatnonzero(self.live[: self.n])
        trim = int(self.first_col[keep].min()) if len(keep) else self.end
        if len(keep) == self.n and trim == 0:
            return
        idx = torch.as_tensor(keep, device=self.device)
        width = self.end - trim
        for buf in (*self.buf_k, *self.buf_v):
            buf[: len(keep), :, :width] = buf[idx, :, trim : self.end]
        for arr in (self.req, self.seq, self.need, self.count, self.last, self.pos, self.first_col, self.eps):
            arr[: len(keep)] = arr[keep]
        self.generated[: len(keep)] = self.generated[keep]
        self.live[: len(keep)] = True
        self.live[len(keep) :] = False
        self.first_col[: len(keep)] -= trim
        self.n, self.end = len(keep), width

    def _admit(self) -> None:
        n_live = int(self.live[: self.n].sum())
        if n_live == 0:
            self.n = 0
            if self.queue:  # start over at the shortest waiting prompt
                self.end = self.requests[self.queue[-1]].start + 1
        dead = self.n - n_live
        capacity = len(self.live)
        ready = bool(self.queue) and self.requests[self.queue[-1]].start + 1 <= self.end
        if dead and (dead >= self.n // 2 or (ready and self.n == capacity and dead >= self.n // 8)):
            self._compact()
        if self.end + 2 > self.columns:
            self._compact()  # out of columns: drop the left padding
        admit = []
        while self.queue and self.n + len(admit) < capacity and self.requests[self.queue[-1]].start + 1 <= self.end:
            admit.append(self.queue.pop())
        if not admit:
            return
        lo, hi = self.n, self.n + len(admit)
        seq = np.array([self.requests[k].seq for k in admit], dtype=np.int64)
        start = np.array([self.requests[k].start for k in admit], dtype=np.int64)
        # Right-aligned: the prompt's f+1 cached tokens end in column end-1.
        src = (
            torch.arange(self.end, device=self.device)[None, :] - torch.as_tensor(self.end - start - 1)[:, None]
        ).clamp(min=0)
        seq_t = torch.as_tensor(seq, device=self.device)
        for tf, buf in zip((*self.tf_keys, *self.tf_values), (*self.buf_k, *self.buf_v)):
            idx = src.to(self.device)[:, None, :, None].expand(-1, tf.shape[1], -1, tf.shape[3])
            buf[lo:hi, :, : self.end] = tf[seq_t].gather(2, idx)
        self.req[lo:hi] = admit
        self.seq[lo:hi] = seq
        self.need[lo:hi] = [self.requests[k].length for k in admit]
        self.count[lo:hi] = 1
        self.last[lo:hi] = self.predictions[seq, start]  # the teacher-forced argmax at the start
        self.generated[lo:hi, 0] = self.last[lo:hi]
        self.pos[lo:hi] = start + 1
        self.first_col[lo:hi] = self.end - start - 1
        self.eps[lo:hi] = self.expected_run[seq]
        self.live[lo:hi] = True
        self.n = hi

    # -- one round --------------------------------------------------------------------------------
    def _choose_width(self) -> int:
        live = self.live[: self.n]
        return draft_width(
            room=(self.need - self.count - 1)[: self.n][live],
            eps=self.eps[: self.n][live],
            waiting_left=self._queued_left(),
            col_room=int(min(self.limit, self.columns) - self.end - 1),
            rows=self.n,
        )

    def _queued_left(self) -> int:
        """Forwards the waiting requests not expected to get drafts accepted need at one token per
        forward: the buffer's columns reach a prompt of ``start + 1`` tokens after that many
        columns, then ``length`` more (0: none)."""
        if not self.queue:
            return 0
        return int(self.queue_end[: len(self.queue)].max()) - self.end

    @torch.no_grad()  # a graph here would also leak: the in-place cache writes make a reference cycle through autograd
    def step(self) -> None:
        """Admit/compact rows if due, then one draft-and-verify forward over every row."""
        self._admit()
        n, live = self.n, self.live[: self.n]
        width = self._choose_width()
        block = np.full((n, width + 1), PAD_ID, dtype=np.int64)
        block[:, 0] = self.last[:n]
        k_row = np.where(live, np.minimum(width, self.need[:n] - self.count[:n] - 1), 0)
        pos = self.pos[:n]
        if width:
            offs = np.arange(1, width + 1)
            cols = np.minimum(pos[:, None] + offs, self.table.shape[1] - 1)
            drafts = self.table[self.seq[:n, None], cols]
            block[:, 1:] = np.where(offs[None, :] <= k_row[:, None], drafts, PAD_ID)
        positions = pos[:, None] + np.arange(width + 1)
        if self.limit != math.inf:  # finished rows and unused draft slots: any valid position will do
            positions = np.minimum(positions, self.limit - 1)
        total = self.end + width + 1
        mask = self._attention_mask(n, width + 1, total)
        layers = [_BufferLayer(k[:n], v[:n], self.end) for k, v in zip(self.buf_k, self.buf_v)]
        out = self.model(
            input_ids=torch.as_tensor(block, device=self.device),
            attention_mask=mask,
            position_ids=torch.as_tensor(positions, device=self.device),
            past_key_values=Cache(layers=layers),
            use_cache=True,
        )
        self.forward_calls += 1
        best, argmax = out.logits.max(-1)
        finite = torch.isfinite(best)
        argmax, finite = argmax.cpu().numpy(), finite.cpu().numpy()  # the one host sync of a round
        # Accepted drafts: the run of drafts equal to the model's argmax at the slot before them.
        if width:
            hits = (argmax[:, :width] == block[:, 1:]) & (np.arange(width)[None, :] < k_row[:, None])
            accepted = np.cumprod(hits, axis=1).sum(axis=1)
        else:
            accepted = np.zeros(n, dtype=np.int64)
        accepted = np.where(live, accepted, 0)
        self._record(np.flatnonzero(live), accepted, argmax, finite, k_row)
        # Keep every row's last cached token in one column: rows that kept fewer tokens move right.
        top = int(accepted.max(initial=0))
        shift = top - accepted
        if shift.any():
            end = self.end + width + 1
            lo = int(self.first_col[:n].min())
            cols = torch.arange(lo, end, device=self.device)
            src = (cols[None, :] - torch.as_tensor(shift, device=self.device)[:, None]).clamp(min=0)
            for buf in (*self.buf_k, *self.buf_v):
                idx = src[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                buf[:n, :, lo:end] = buf[:n, :, :end].gather(2, idx)
            self.first_col[:n] += shift
        self.end += top + 1

    def _attention_mask(self, n: int, block: int, total: int) -> torch.Tensor:
        """The mask of a forward of ``block`` tokens per row over ``total`` columns: [n, total] 0/1 (a
        row's left padding is 0), or, where the attention accepts one, the 4D additive mask
        [n, 1, block, total] that transformers would build from it (0 where a query may attend,
        the dtype's minimum elsewhere), built here in one op: transformers' own mask builder costs
        several times a small decode forward's attention."""
        cols = torch.arange(total, device=self.device)
        first_col = torch.as_tensor(self.first_col[:n], device=self.device)
        if self.additive_mask_dtype is None:
            return (cols[None, :] >= first_col[:, None]).long()
        query_col = cols[total - block :]
        allowed = (cols[None, None, :] >= first_col[:, None, None]) & (cols[None, None, :] <= query_col[None, :, None])
        mask = torch.zeros(allowed.shape, dtype=self.additive_mask_dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.additive_mask_dtype).min)[:, None]

    def _record(self, rows, accepted, argmax, finite, k_row) -> None:
        a = accepted[rows]
        # Tokens kept by row r: argmax[r, 0..a_r] (the accepted drafts equal the argmax there).
        r_idx = np.repeat(rows, a + 1)
        j_idx = np.arange(len(r_idx)) - np.repeat(np.cumsum(a + 1) - (a + 1), a + 1)
        toks = argmax[r_idx, j_idx]
        self.generated[r_idx, self.count[r_idx] + j_idx] = toks
        self.table[self.seq[r_idx], self.pos[r_idx] + 1 + j_idx] = toks
        bad = ~finite[r_idx, j_idx]
        if bad.any():
            self.nonfinite.update(int(s) for s in np.unique(self.seq[r_idx[bad]]))
        self.count[rows] += a + 1
        self.pos[rows] += a + 1
        self.last[rows] = argmax[rows, a]
        drafted = k_row[rows] > 0
        # Expect twice as many after a fully accepted block; after a miss, what was accepted, or half
        # the old expectation (a row that keeps missing soon stops drafting).
        grown = np.where(a == k_row[rows], 2.0 * a, np.maximum(a, 0.5 * self.eps[rows]))
        self.eps[rows] = np.where(drafted, grown, self.eps[rows])
        done = rows[self.count[rows] >= self.need[rows]]
        for r in done:
            self.results[int(self.req[r])] = self.generated[r, : self.need[r]].tolist()
        self.live[done] = False


@torch.no_grad()
def run_in_lockstep(batches: Sequence[ContinuationBatch], dummy_forward: Callable[[], None], any_rank) -> None:
    """Drive ``batches`` one after another; under a process group every rank makes the same number
    of forward calls (ZeRO-3 gathers parameters collectively per forward): each round the ranks
    agree (``any_rank``, a collective) whether anyone still has work, and an idle rank runs
    ``dummy_forward``. Without a process group ``any_rank`` is the identity."""
    pending = [b for b in batches]
    while True:
        while pending and not pending[0].has_work():
            pending.pop(0)
        mine = bool(pending)
        if not any_rank(mine):
            return
        if mine:
            pending[0].step()
        else:
            dummy_forward()
