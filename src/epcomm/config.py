"""``Config``: the performance knobs of normal-mode dispatch/combine, with DeepEP's field order.

``num_sms`` bounds the streaming multiprocessors our kernels use. The four chunk sizes are
DeepEP's ring-buffer knobs; they are accepted and kept (so DeepEP code that builds or tunes
configs runs unchanged) and feed the buffer-size hints, but our backends write each token once
into its final place and need no rings.

SM presets: ``get_dispatch_config`` / ``get_combine_config`` use ``Buffer.num_sms`` (20 unless
``Buffer.set_num_sms`` changes it, as in DeepEP) for every rank count. Measured on 4x H200
(``benchmarks/bench_normal.py`` at 8/16/24/32 SMs and the push / reduce sweeps of
docs/performance.md): the dispatch push is NVLink-bound from 16
programs on (EP4: 486 / 476 / 471 us at 16 / 24 / 32), so dispatch gains nothing past ~16 SMs;
combine still gains up to 24-32 SMs (its local reduction scales with SMs: 412 / 215 / 153 / 123 us
at 8 / 16 / 24 / 32); 8 SMs cost 1.1x (dispatch) to 1.6x (combine). 20 sits on the flat part for
dispatch and within ~10% of the best combine, so the default stays DeepEP's.
"""

from __future__ import annotations

from dataclasses import dataclass

from epcomm._math import align_up

__all__ = [
    "NUM_MAX_NVL_PEERS",
    "Config",
    "combine_config_preset",
    "dispatch_config_preset",
]

# DeepEP's constants that enter its buffer-size hints (same formula as DeepEP V1's intranode
# hint; our backends size their own buffers and grow them when a call needs more). The 8 is
# DeepEP's API (its NVLink domain and its RDMA hint's node size), used only in these hints: the
# NVLink backend itself serves any number of ranks.
NUM_MAX_NVL_PEERS = 8
NUM_MAX_TOPK = 128
NUM_MAX_SCALES = 128
SOURCE_META_BYTES = 8


@dataclass(frozen=True)
class Config:
    """Performance knobs, positional order as DeepEP's ``Config``.

    Arguments:
        num_sms: SMs the normal-mode kernels may use (even, as DeepEP requires). Multi-node mode
            splits each rank's tokens into ``num_sms // 2`` channels (DeepEP's, one per pair of
            SMs), which its handle's channel matrices count.
        num_max_nvl_chunked_send_tokens: DeepEP's NVLink send chunk (tokens); ``nvl_chunk_size``.
        num_max_nvl_chunked_recv_tokens: DeepEP's NVLink receive ring size (tokens);
            ``nvl_buffer_size``.
        num_max_rdma_chunked_send_tokens: DeepEP's RDMA send chunk (tokens), the internode
            field ``rdma_chunk_size``.
        num_max_rdma_chunked_recv_tokens: DeepEP's RDMA receive ring size (tokens), the internode
            field ``rdma_buffer_size``.

    The keyword names are DeepEP's (its ``Config`` binding); the short names are read-only aliases.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in (
            "num_sms",
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Config.{name} must be an int; got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"Config.{name} must be a positive int; got {value!r}")
        if self.num_sms % 2 != 0:
            raise ValueError(f"Config.num_sms must be even (as in DeepEP); got {self.num_sms}")

    @property
    def num_channels(self) -> int:
        """DeepEP's channels: ``num_sms // 2``."""
        return self.num_sms // 2

    @property
    def nvl_chunk_size(self) -> int:
        """``num_max_nvl_chunked_send_tokens``."""
        return self.num_max_nvl_chunked_send_tokens

    @property
    def nvl_buffer_size(self) -> int:
        """``num_max_nvl_chunked_recv_tokens``."""
        return self.num_max_nvl_chunked_recv_tokens

    @property
    def rdma_chunk_size(self) -> int:
        """``num_max_rdma_chunked_send_tokens`` (internode)."""
        return self.num_max_rdma_chunked_send_tokens

    @property
    def rdma_buffer_size(self) -> int:
        """``num_max_rdma_chunked_recv_tokens`` (internode)."""
        return self.num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer DeepEP would need for this config (same formula as DeepEP V1).

        Arguments:
            hidden_bytes: bytes of one token row, e.g. ``hidden * 2`` for bf16.
            num_ranks: ranks of the group.

        Returns:
            int, a multiple of 128.
        """
        num_channels = self.num_sms // 2
        num_nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        num_rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        slots = num_channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens
        num_bytes = num_channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
        num_bytes += slots * (hidden_bytes + SOURCE_META_BYTES + NUM_MAX_TOPK * (8 + 4) + NUM_MAX_SCALES * 4)
        return align_up(num_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer DeepEP would need for this config; 0 within one node.

        Arguments:
            hidden_bytes: bytes of one token row.
            num_ranks: ranks of the group.

        Returns:
            int, a multiple of 128 (0 when ``num_ranks <= 8``).
        """
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        num_rdma_ranks = num_ranks // NUM_MAX_NVL_PEERS
        num_channels = self.num_sms // 2
        # DeepEP's Config rounds the RDMA ring up to whole send chunks before sizing it.
        recv_tokens = align_up(self.num_max_rdma_chunked_recv_tokens, self.num_max_rdma_chunked_send_tokens)
        slots = num_channels * num_rdma_ranks * recv_tokens * 2
        num_bytes = num_channels * num_rdma_ranks * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        # The last 16 bytes per slot: DeepEP's per-token int4 of RDMA bookkeeping.
        num_bytes += slots * (
            hidden_bytes + SOURCE_META_BYTES + NUM_MAX_TOPK * (8 + 4) + NUM_MAX_SCALES * 4 + 16
        )
        return align_up(num_bytes, 128)


# DeepEP V1's tuned chunk sizes per rank count, (nvl send, nvl recv, rdma send, rdma recv), copied
# from DeepEP V1 (deep_ep's Buffer.get_dispatch_config / get_combine_config): 2-8 ranks are one
# NVLink node, 16-160 are 2-20 nodes of 8 GPUs (the RDMA fields matter there).
_DISPATCH_CHUNKS: dict[int, tuple[int, int, int, int]] = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    24: (32, 288, 8, 128),
    32: (32, 288, 8, 128),
    48: (32, 288, 8, 128),
    64: (32, 288, 8, 128),
    96: (20, 480, 12, 128),
    128: (20, 560, 12, 128),
    144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
_COMBINE_CHUNKS: dict[int, tuple[int, int, int, int]] = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    24: (1, 288, 8, 128),
    32: (1, 288, 8, 128),
    48: (1, 288, 8, 128),
    64: (1, 288, 8, 128),
    96: (1, 480, 8, 128),
    128: (1, 560, 8, 128),
    144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def _preset(table: dict[int, tuple[int, int, int, int]], num_sms: int, num_ranks: int) -> Config:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1; got {num_ranks}")
    if num_ranks in table:
        chunks = table[num_ranks]
    else:
        # Any other count (DeepEP raises): the preset of the nearest covered count at or above it,
        # or the largest one, so a 6- or 12-rank group still gets a sensible config.
        covered = sorted(table)
        chunks = table[next((n for n in covered if n >= num_ranks), covered[-1])]
    return Config(num_sms, *chunks)


def dispatch_config_preset(num_sms: int, num_ranks: int) -> Config:
    """The default dispatch ``Config`` for ``num_ranks`` ranks with ``num_sms`` SMs."""
    return _preset(_DISPATCH_CHUNKS, num_sms, num_ranks)


def combine_config_preset(num_sms: int, num_ranks: int) -> Config:
    """The default combine ``Config`` for ``num_ranks`` ranks with ``num_sms`` SMs."""
    return _preset(_COMBINE_CHUNKS, num_sms, num_ranks)
