"""GPU attention routes (FlashAttention paged / packed) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from services.worker.ops import flash
from services.worker.ops.attention import paged_attention
from services.worker.ops.attn_metadata import AttnMetadata


def _case(q_lens, ctx_lens, heads=(16, 8), d=128, bs=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, kvh = heads
    nb_per = [-(-c // bs) for c in ctx_lens]
    num_blocks = sum(nb_per) + 7
    perm = torch.randperm(num_blocks, device="cuda", generator=g).tolist()  # scattered blocks
    tables, k = [], 0
    for n in nb_per:
        tables.append(perm[k : k + n])
        k += n
    width = max(nb_per)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                      device="cuda")
    kc = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(sum(q_lens), h, d, device="cuda", dtype=dtype, generator=g)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    meta = AttnMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64, device="cuda"),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"),
        block_tables=bt, cu_seqlens_q=cu, context_lens_host=list(ctx_lens),
        num_decode_seqs=next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens)),
        cu_seqlens_q_dev=torch.tensor(cu, dtype=torch.int32, device="cuda"),
        max_q=max(q_lens),
    )
    return q, kc, vc, meta


CASES = [
    ([1] * 64, [2048] * 64),  # decode, batch 64, context 2k
    ([1] * 7, [1, 17, 300, 1000, 33, 4096, 5]),  # ragged decode
    ([1, 1, 40, 100], [50, 7, 40, 230]),  # decodes + a fresh prompt + a chunk over a prefix
]


@pytest.mark.parametrize("route", ["paged", "packed"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_flash_routes_match_reference(route, case, monkeypatch):
    q, kc, vc, meta = _case(*CASES[case])
    scale = q.shape[-1] ** -0.5
    monkeypatch.setattr(flash, "_routes", [route])
    out = flash.flash_attention(q, kc, vc, meta, scale)
    if out is None:
        pytest.skip(f"route {route} does not run on torch {torch.__version__}")
    monkeypatch.setattr(flash, "_routes", [])
    ref = paged_attention(q.float(), kc.float(), vc.float(), meta, scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n", [1024, 3000])
def test_whole_long_prompt_takes_cudnn_and_matches_reference(n, monkeypatch):
    q, kc, vc, meta = _case([n], [n])
    scale = q.shape[-1] ** -0.5
    monkeypatch.setattr(flash, "_routes", ["packed"])
    assert flash._whole_prompt_cudnn(q, kc, vc, meta, scale) is not None or not flash._cudnn_ok
    out = flash.flash_attention(q, kc, vc, meta, scale)
    monkeypatch.setattr(flash, "_routes", [])
    ref = paged_attention(q.float(), kc.float(), vc.float(), meta, scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    short = _case([n - 1000], [n])  # a chunk over a prefix: not this route
    assert flash._whole_prompt_cudnn(*short, scale) is None
