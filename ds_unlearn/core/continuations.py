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
  acceptance, so on unseen text (nothing accepted) rounds fall back to one token per row.
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


class ContinuationBatch:
    """Greedy continuations of ``requests`` over sequences whose teacher-forced pass is known.

    ``tokens`` [S, W] int64 (right-padded sequences), ``predictions`` [S, W-1] int64 (the
    teacher-forced argmax: ``predictions[i, j]`` is the greedy token after ``x[:j+1]``), ``cache``
    that pass's KV cache (``supports(cache)``; keys [S, heads, W, head_dim]), ``expected_run`` [S]
    float: how many drafts per row to expect accepted at first (0 on unseen text). ``rows`` caps
    the rows per forward; ``position_limit`` the columns (GPT-Neo's mask buffer, None for no cap).

    Drive it with ``step()`` while ``has_work()``; ``results[k]`` is then request k's continuation
    (a list of ``length`` ints) and ``nonfinite`` the sequences whose logits were NaN/inf.
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
        self.rows = max(1, int(rows))
        self.limit = position_limit or math.inf
        self.tf_keys = [layer.keys for layer in cache.layers]
        self.tf_values = [layer.values for layer in cache.layers]
        self.device = self.tf_keys[0].device
        # The draft table: the latest token predicted at each absolute position of each sequence.
        self.predictions = np.asarray(predictions, dtype=np.int64)
        self.table = np.array(tokens, dtype=np.int64, copy=True)
        self.table[:, 1:] = self.predictions
        self.expected_run = np.asarray(expected_run, dtype=np.float64)
        self.requests = list(requests)
        self.results: list[list[int] | None] = [None] * len(self.requests)
        self.nonfinite: set[int] = set()
        self.forward_calls = 0
        # Longest first: rows admitted together finish together, so a refill finds half the rows done.
        pending = []
        for k, req in enumerate(self.requests):
            if req.length == 1:  # the teacher-forced argmax is the whole continuation
                self.results[k] = [int(self.predictions[req.seq, req.start])]
            else:
                pending.append(k)
        pending.sort(key=lambda k: (-self.requests[k].length, self.requests[k].seq, self.requests[k].start))
        self.queue = pending[::-1]  # pop() from the end
        self._empty_batch()

    # -- batch state ------------------------------------------------------------------------------
    def _empty_batch(self) -> None:
        self.req = np.zeros(0, dtype=np.int64)  # request index per row
        self.seq = np.zeros(0, dtype=np.int64)
        self.need = np.zeros(0, dtype=np.int64)  # continuation length
        self.count = np.zeros(0, dtype=np.int64)  # tokens generated so far (the last one not yet cached)
        self.last = np.zeros(0, dtype=np.int64)  # last generated token
        self.pos = np.zeros(0, dtype=np.int64)  # its absolute position
        self.first_col = np.zeros(0, dtype=np.int64)  # first cached column of the row
        self.eps = np.zeros(0, dtype=np.float64)  # drafts the row is expected to get accepted
        self.live = np.zeros(0, dtype=bool)
        self.generated = np.zeros((0, 1), dtype=np.int64)
        self.end = 0
        self.layers: list[_BufferLayer] = []

    def has_work(self) -> bool:
        return bool(self.live.any()) or bool(self.queue)

    def _rebuild(self, admit: list[int]) -> None:
        """New buffer: this batch's live rows, then the ``admit`` requests, right-aligned at the
        longest row; drops finished rows and all-padding columns."""
        keep = np.flatnonzero(self.live)
        lengths = self.end - self.first_col[keep]  # cached tokens per kept row
        new_req = np.array(admit, dtype=np.int64)
        new_seq = np.array([self.requests[k].seq for k in admit], dtype=np.int64)
        new_start = np.array([self.requests[k].start for k in admit], dtype=np.int64)
        new_len = np.array([self.requests[k].length for k in admit], dtype=np.int64)
        all_lengths = np.concatenate([lengths, new_start + 1])
        end = int(all_lengths.max())
        # Room for the longest remaining continuation's blocks; trimmed again when full.
        remaining = np.concatenate([self.need[keep] - self.count[keep], new_len - 1])
        capacity = int(min(self.limit, end + remaining.max() + MAX_DRAFT + 1))
        n = len(keep) + len(admit)
        cols = torch.arange(end, device=self.device)
        keep_t = torch.as_tensor(keep, device=self.device)
        old_idx = torch.as_tensor(self.first_col[keep] - (end - lengths), device=self.device)[:, None] + cols
        new_idx = torch.as_tensor(-(end - (new_start + 1)), device=self.device)[:, None] + cols
        new_seq_t = torch.as_tensor(new_seq, device=self.device)
        layers = []
        for i, (tk, tv) in enumerate(zip(self.tf_keys, self.tf_values)):
            heads, dim = tk.shape[1], tk.shape[3]
            buf_k = tk.new_zeros((n, heads, capacity, dim))
            buf_v = tv.new_zeros((n, heads, capacity, dim))
            if len(keep):
                src = self.layers[i]
                idx = old_idx.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, dim)
                buf_k[: len(keep), :, :end] = src.buf_k[keep_t].gather(2, idx)
                buf_v[: len(keep), :, :end] = src.buf_v[keep_t].gather(2, idx)
            if len(admit):
                idx = new_idx.clamp(min=0)[:, None, :, None].expand(-1, heads, -1, dim)
                buf_k[len(keep) :, :, :end] = tk[new_seq_t].gather(2, idx)
                buf_v[len(keep) :, :, :end] = tv[new_seq_t].gather(2, idx)
            layers.append(_BufferLayer(buf_k, buf_v, end))
        self.layers = layers
        first = np.array([self.requests[k].start for k in admit], dtype=np.int64)
        width = int(max(self.generated.shape[1], new_len.max(initial=1)))
        generated = np.zeros((n, width), dtype=np.int64)
        generated[: len(keep), : self.generated.shape[1]] = self.generated[keep]
        preds = self.predictions[new_seq, first]  # the teacher-forced argmax at the start
        generated[len(keep) :, 0] = preds
        self.req = np.concatenate([self.req[keep], new_req])
        self.seq = np.concatenate([self.seq[keep], new_seq])
        self.need = np.concatenate([self.need[keep], new_len])
        self.count = np.concatenate([self.count[keep], np.ones(len(admit), dtype=np.int64)])
        self.last = np.concatenate([self.last[keep], preds])
        self.pos = np.concatenate([self.pos[keep], first + 1])
        self.first_col = end - all_lengths
        self.eps = np.concatenate([self.eps[keep], self.expected_run[new_seq]])
        self.live = np.ones(n, dtype=bool)
        self.generated = generated
        self.end = end

    def _maybe_rebuild(self) -> None:
        n_live = int(self.live.sum())
        if self.queue and n_live <= self.rows // 2:
            admit = [self.queue.pop() for _ in range(min(self.rows - n_live, len(self.queue)))]
            self._rebuild(admit)
        elif n_live and n_live <= len(self.live) // 2:
            self._rebuild([])  # fewer rows, less compute per forward
        elif n_live and self.end + 2 > min(self.limit, self.layers[0].buf_k.shape[2]):
            self._rebuild([])  # out of columns: drop the left padding

    # -- one round --------------------------------------------------------------------------------
    def _choose_width(self, live: np.ndarray) -> int:
        """Drafts per row this round: the width that maximizes expected accepted tokens per unit of
        work, counting a forward's fixed cost as about half a token per row."""
        room = self.need[live] - self.count[live] - 1  # drafts a row can still use
        cap = np.minimum(room, np.floor(self.eps[live]))
        col_room = int(min(self.limit - self.end - 1, self.layers[0].buf_k.shape[2] - self.end - 1))
        best, best_rate = 0, -1.0
        overhead = 0.5 * len(self.live) + 16
        for width in DRAFT_WIDTHS:
            if width > max(col_room, 0) or (width and width > room.max()):
                break
            gain = live.sum() + np.minimum(cap, width).sum()
            rate = gain / (overhead + len(self.live) * (width + 1))
            if rate > best_rate:
                best, best_rate = width, rate
        return best

    def step(self) -> None:
        """Admit/compact if due, then one draft-and-verify forward over every row."""
        self._maybe_rebuild()
        live = self.live
        n = len(live)
        width = self._choose_width(live)
        block = np.full((n, width + 1), PAD_ID, dtype=np.int64)
        block[:, 0] = self.last
        k_row = np.where(live, np.minimum(width, self.need - self.count - 1), 0)
        if width:
            offs = np.arange(1, width + 1)
            cols = np.minimum(self.pos[:, None] + offs, self.table.shape[1] - 1)
            drafts = self.table[self.seq[:, None], cols]
            use = offs[None, :] <= k_row[:, None]
            block[:, 1:] = np.where(use, drafts, PAD_ID)
        max_pos = self.limit - 1 if self.limit != math.inf else None
        positions = self.pos[:, None] + np.arange(width + 1)
        if max_pos is not None:  # finished rows and unused draft slots: any valid position will do
            positions = np.minimum(positions, max_pos)
        total = self.end + width + 1
        mask = (
            torch.arange(total, device=self.device)[None, :]
            >= torch.as_tensor(self.first_col, device=self.device)[:, None]
        )
        for layer in self.layers:
            layer.end = self.end
        out = self.model(
            input_ids=torch.as_tensor(block, device=self.device),
            attention_mask=mask.long(),
            position_ids=torch.as_tensor(positions, device=self.device),
            past_key_values=Cache(layers=self.layers),
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
        self._record(live, accepted, argmax, finite, k_row)
        # Keep every row's last cached token in one column: rows that kept fewer tokens move right.
        top = int(accepted.max(initial=0))
        shift = top - accepted
        if shift.any():
            end = self.end + width + 1
            lo = int(self.first_col.min())
            cols = torch.arange(lo, end, device=self.device)
            src = (cols[None, :] - torch.as_tensor(shift, device=self.device)[:, None]).clamp(min=0)
            for layer in self.layers:
                heads, dim = layer.buf_k.shape[1], layer.buf_k.shape[3]
                idx = src[:, None, :, None].expand(-1, heads, -1, dim)
                layer.buf_k[:, :, lo:end] = layer.buf_k[:, :, :end].gather(2, idx)
                layer.buf_v[:, :, lo:end] = layer.buf_v[:, :, :end].gather(2, idx)
            self.first_col = self.first_col + shift
        self.end += top + 1

    def _record(self, live, accepted, argmax, finite, k_row) -> None:
        rows = np.flatnonzero(live)
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
        self.eps[rows] = np.where(drafted, np.where(a == k_row[rows], 2.0 * a, a), self.eps[rows])
        done = rows[self.count[rows] >= self.need[rows]]
        for r in done:
            self.results[int(self.req[r])] = self.generated[r, : self.need[r]].tolist()
        self.live[done] = False


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
